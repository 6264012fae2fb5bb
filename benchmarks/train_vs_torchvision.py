"""Ours against torchvision's own Mask R-CNN, trained from scratch on the same real data for the same CPU time.

Both sides run at once, each pinned to its own core with one thread (`taskset`, `OMP_NUM_THREADS=1`), so
machine noise hits both alike; both are scored by the same code (pycocotools, `maskrcnn.engine.evaluator`)
on the same validation images at their original size.

- **ours**: `maskrcnn train data.train=... solver.max_minutes=M` with no recipe keys (the recipe fitted
  to the data), or `--ours "--config blobs"` / `--ours "KEY=VALUE ..."` for a variant. One run per budget:
  our schedule follows the budget (warm-up, cosine decay to its end).
- **torchvision** (the plain from-scratch recipe of issue 33, written down): `torchvision.models.detection.
  MaskRCNN` on `resnet_fpn_backbone("resnet18", weights=None, norm_layer=GroupNorm(32), trainable_layers=5)`,
  torchvision's default heads, anchors (32..512) and sampling; AdamW lr 1e-3, weight decay 1e-4, 50-step
  linear warm-up then constant, gradient norm clipped at 5; random 256x256 crops at native scale
  (`--tv-scale 2` upsamples them, as the issue's second variant did), horizontal and vertical flips, 4 crops a
  step; bfloat16 autocast where the CPU has it natively (as ours does: `solver.amp=auto`), float32 elsewhere.
  Its learning rate is constant, so one run serves every budget: a snapshot is taken when each budget is spent.

    .venv/bin/python benchmarks/train_vs_torchvision.py --train ANN.json:IMAGES --val ANN.json:IMAGES \\
        --minutes 10 30 [--subset 3] [--out runs/vs_tv] [--ours "KEY=VALUE ..."] [--only ours|torchvision]

Results go to OUT/results.json (one entry per side and budget; rerunning skips what is there) and a table is
printed. AP is COCO's (maxDets 100), with the same AP at up to 500 detections an image beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LARGE_MAX_DETS = 500


# ---- data ----------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[Path, Path]:
    """`ANN.json:IMAGES` -> (annotation file, image folder)."""
    ann, _, images = spec.partition(":")
    return Path(ann), Path(images)


def write_subset(spec: str, n: int, seed: int, out: Path) -> str:
    """Write a COCO file of `n` images drawn (seeded) from `spec` and return its spec."""
    ann, images = parse_spec(spec)
    data = json.loads(ann.read_text())
    with_objects = sorted({a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)})
    keep = set(random.Random(seed).sample(with_objects, n))
    subset = {**data, "images": [i for i in data["images"] if i["id"] in keep],
              "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    path = out / f"train_subset{n}_seed{seed}.json"
    path.write_text(json.dumps(subset))
    return f"{path}:{images}"


class RandomCrops:
    """The torchvision side's training samples: a random image, a random crop with objects, random flips."""

    def __init__(self, spec: str, crop: int, seed: int) -> None:
        from pycocotools.coco import COCO

        ann, self.image_dir = parse_spec(spec)
        self.coco = COCO(str(ann))
        self.ids = [i for i in self.coco.getImgIds() if self.coco.getAnnIds(imgIds=i, iscrowd=False)]
        self.cat_to_label = {c: k + 1 for k, c in enumerate(sorted(self.coco.getCatIds()))}
        self.crop = crop
        self.rng = random.Random(seed)

    def sample(self) -> tuple[Any, dict[str, Any]]:
        """Return (image [3,h,w] in 0..1, target with boxes, labels, masks [N,h,w]) of one crop."""
        import numpy as np
        import torch

        from maskrcnn.data.image_io import image_to_tensor, read_image

        image_id = self.rng.choice(self.ids)
        info = self.coco.imgs[image_id]
        image = image_to_tensor(read_image(self.image_dir / info["file_name"]))
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        masks = np.stack([self.coco.annToMask(a) for a in anns])
        labels = [self.cat_to_label[a["category_id"]] for a in anns]
        h, w = masks.shape[1:]
        ch, cw = min(self.crop, h), min(self.crop, w)
        for _ in range(10):  # a window with at least one object
            y, x = self.rng.randint(0, h - ch), self.rng.randint(0, w - cw)
            cut = masks[:, y:y + ch, x:x + cw]
            keep = cut.reshape(len(cut), -1).any(1)
            if keep.any():
                break
        image, cut = image[:, y:y + ch, x:x + cw], torch.from_numpy(cut[keep]).bool()
        if self.rng.random() < 0.5:
            image, cut = image.flip(-1), cut.flip(-1)
        if self.rng.random() < 0.5:
            image, cut = image.flip(-2), cut.flip(-2)
        ys, xs = cut.any(2), cut.any(1)
        idx_y, idx_x = torch.arange(ch), torch.arange(cw)
        boxes = torch.stack([torch.where(xs, idx_x, cw).min(1).values, torch.where(ys, idx_y, ch).min(1).values,
                             torch.where(xs, idx_x, -1).max(1).values + 1, torch.where(ys, idx_y, -1).max(1).values + 1],
                            1).float()
        label_t = torch.tensor(labels)[torch.from_numpy(keep)]
        return image.contiguous(), {"boxes": boxes, "labels": label_t, "masks": cut.to(torch.uint8)}


# ---- the torchvision side ------------------------------------------------------------------------


def torchvision_model(num_classes: int, scale: float) -> Any:
    """torchvision's MaskRCNN, R18-FPN with GroupNorm, from scratch, run at `scale` times the input size."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

    class FixedScale(GeneralizedRCNNTransform):
        """torchvision's transform, with every image resized by one factor (1 = native) instead of to a side."""

        def resize(self, image, target=None):  # noqa: ANN001, ANN201 (torchvision's signature)
            if scale == 1.0:
                return image, target
            size = [int(round(s * scale)) for s in image.shape[-2:]]
            old = list(image.shape[-2:])
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            if target is not None:
                target["boxes"] = resize_boxes(target["boxes"], old, size)
                if "masks" in target:
                    target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
            return image, target

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=lambda channels: nn.GroupNorm(32, channels))
    model = MaskRCNN(backbone, num_classes=num_classes + 1)
    t = model.transform
    model.transform = FixedScale(t.min_size, t.max_size, t.image_mean, t.image_std)
    return model


def train_torchvision(args: argparse.Namespace) -> None:
    """Train the torchvision side, saving a snapshot each time one of `args.minutes` is spent."""
    import torch

    from maskrcnn.engine.precision import native_bf16

    torch.manual_seed(args.seed)
    data = RandomCrops(args.train, crop=256, seed=args.seed)
    model = torchvision_model(len(data.cat_to_label), args.tv_scale).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    use_bf16 = native_bf16(torch.device("cpu"))
    budgets = sorted(args.minutes)
    out = Path(args.out)
    start, it = time.perf_counter(), 0
    while budgets:
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, 0.01 + it / 50)
        samples = [data.sample() for _ in range(4)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            losses = model([s[0] for s in samples], [s[1] for s in samples])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        it += 1
        if it % 20 == 0:
            print(f"torchvision it {it} {time.perf_counter() - start:.0f}s loss {loss.item():.3f} "
                  + " ".join(f"{k}={v.item():.3f}" for k, v in losses.items()), flush=True)
        elapsed = time.perf_counter() - start
        while budgets and elapsed >= budgets[0] * 60:
            minutes = budgets.pop(0)
            torch.save({"model": model.state_dict(), "iterations": it, "seconds": elapsed,
                        "num_classes": len(data.cat_to_label), "scale": args.tv_scale},
                       out / f"torchvision_{minutes:g}min.pth")
            print(f"torchvision snapshot at {minutes:g} min: {it} iterations", flush=True)


# ---- scoring (both sides, one code path) ---------------------------------------------------------


def score(model: Any, val: str, out_json: Path) -> dict[str, Any]:
    """Predict every val image at its own size and return COCO metrics (maxDets 100 and LARGE_MAX_DETS)."""
    import torch

    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.coco_results import predictions_to_coco
    from maskrcnn.engine.evaluator import evaluate_results

    ann, images = parse_spec(val)
    dataset = CocoDataset(ann, images, filter_empty=False, train=False)
    results, seconds = [], time.perf_counter()
    model.eval()
    with torch.no_grad():
        for index in range(len(dataset)):
            image, target = dataset[index]
            output = model([image])[0]
            results += predictions_to_coco(output, int(target["image_id"]), dataset.category_ids)
    seconds = time.perf_counter() - seconds
    out_json.write_text(json.dumps(results))
    standard = evaluate_results(dataset.coco, results)
    large = evaluate_results(dataset.coco, results, max_dets=LARGE_MAX_DETS, iou_types=("segm",))
    return {"bbox": standard["bbox"], "segm": standard["segm"], "boundary": standard.get("boundary"),
            f"segm@{LARGE_MAX_DETS}": large["segm"], "eval_seconds": round(seconds, 1),
            "max_detections_an_image": max((sum(1 for r in results if r["image_id"] == i)
                                            for i in dataset.image_ids), default=0)}


def score_ours(args: argparse.Namespace) -> None:
    """Score our checkpoint `args.checkpoint` on `args.val`; print the metrics as JSON."""
    import torch

    from maskrcnn.api import load_model

    torch.set_num_threads(1)
    model = load_model(None, weights=args.checkpoint)
    print(json.dumps(score(model, args.val, Path(args.checkpoint).with_suffix(".predictions.json"))))


def score_torchvision(args: argparse.Namespace) -> None:
    """Score a torchvision snapshot `args.checkpoint` on `args.val`; print the metrics as JSON."""
    import torch

    torch.set_num_threads(1)
    state = torch.load(args.checkpoint, map_location="cpu")
    model = torchvision_model(state["num_classes"], state["scale"])
    model.load_state_dict(state["model"])

    class Thresholded(torch.nn.Module):
        """torchvision's soft [N,1,H,W] masks thresholded at 0.5, as its users do."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images):  # noqa: ANN001, ANN201
            outputs = self.inner(images)
            for o in outputs:
                o["masks"] = o["masks"][:, 0] >= 0.5
            return outputs

    print(json.dumps(score(Thresholded(model), args.val, Path(args.checkpoint).with_suffix(".predictions.json"))))


# ---- the driver ----------------------------------------------------------------------------------


def pinned(core: int, argv: list[str], log: Path) -> subprocess.Popen:
    """Start `argv` on CPU `core` with one thread, its output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(["taskset", "-c", str(core), *argv], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=REPO)


def last_json(log: Path) -> dict[str, Any]:
    """Return the last line of `log` parsed as JSON (the scoring child's report)."""
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no result in {log}; its end:\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return json.loads(lines[-1])


def ours_jobs(args: argparse.Namespace, out: Path) -> list[tuple[float, list[str], Path]]:
    """(minutes, command, run folder) of our training runs, one per budget."""
    extra = shlex.split(args.ours)
    jobs = []
    for minutes in sorted(args.minutes):
        run = out / f"ours_{minutes:g}min"
        cmd = [sys.executable, "-m", "maskrcnn.cli", "train", f"data.train=[{args.train}]", f"output_dir={run}",
               f"solver.max_minutes={minutes:g}", *extra]
        jobs.append((minutes, cmd, run))
    return jobs


def run_all(args: argparse.Namespace) -> None:
    """Train both sides at once, each pinned to its core (`--cores`), then score every result."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.subset:
        args.train = write_subset(args.train, args.subset, args.seed, out)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--train", args.train, "--val", args.val, "--out", str(out), "--seed", str(args.seed)]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    tv_keys = [f"torchvision {m:g} min" for m in args.minutes]
    tv = None
    if args.only != "ours" and not all(k in results for k in tv_keys):
        tv = pinned(args.cores[1], [*me, "--worker", "train-torchvision", *common, "--tv-scale", str(args.tv_scale),
                        "--minutes", *map(str, args.minutes)], out / "torchvision_train.log")
    for minutes, cmd, run in ours_jobs(args, out) if args.only != "torchvision" else []:
        key = f"ours {minutes:g} min"
        if key in results:
            continue
        log = out / f"ours_{minutes:g}min_train.log"
        if pinned(args.cores[0], cmd, log).wait() != 0:
            raise RuntimeError(f"our training failed; see {log}")
        scorer = pinned(args.cores[0], [*me, "--worker", "score-ours", *common, "--checkpoint",
                            str(run / "checkpoints" / "model_final.pth")], out / f"ours_{minutes:g}min_score.log")
        scorer.wait()
        metrics = last_json(out / f"ours_{minutes:g}min_score.log")
        metrics["iterations"] = iterations_of(run)
        metrics["command"] = shlex.join(["maskrcnn", *cmd[3:]])
        metrics["chosen"] = chosen_lines(log)
        results[key] = metrics
        save(results_path, results)
    if tv is not None:
        if tv.wait() != 0:
            raise RuntimeError(f"torchvision training failed; see {out / 'torchvision_train.log'}")
        for minutes, key in zip(args.minutes, tv_keys):
            ckpt = out / f"torchvision_{minutes:g}min.pth"
            log = out / f"torchvision_{minutes:g}min_score.log"
            pinned(args.cores[1], [*me, "--worker", "score-torchvision", *common, "--checkpoint", str(ckpt)], log).wait()
            metrics = last_json(log)
            import torch

            metrics["iterations"] = torch.load(ckpt, map_location="cpu")["iterations"]
            results[key] = metrics
            save(results_path, results)
    results.setdefault("runs", []).append({"started": started, "machine": machine(), "train": args.train,
                                           "val": args.val, "ours": args.ours, "tv_scale": args.tv_scale})
    save(results_path, results)
    print(table(results))


def iterations_of(run: Path) -> int:
    """The last iteration our run logged in metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    its = [json.loads(ln).get("iter", 0) for ln in lines if ln.strip()]
    return int(max(its, default=0))


def chosen_lines(log: Path) -> list[str]:
    """The lines of our training log that say what was fitted to the data."""
    return [ln for ln in log.read_text().splitlines() if ln.startswith("fitted to the data")][:12]


def save(path: Path, results: dict[str, Any]) -> None:
    """Write results atomically (a temp file renamed over the old one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def machine() -> str:
    """CPU model and flags that matter here, from lscpu."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "?")
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in text]
    return f"{model}, {os.cpu_count()} cores, " + (" ".join(flags) or "AVX2")


def table(results: dict[str, Any]) -> str:
    """Markdown table of every scored entry."""
    rows = ["| side, budget | iterations | box AP | mask AP | mask AP50 | mask AP75 | mask AP90 | boundary AP | "
            f"mask AP (≤{LARGE_MAX_DETS} dets) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, m in results.items():
        if key == "runs":
            continue
        rows.append(f"| {key} | {m['iterations']} | {m['bbox']['AP']:.1f} | {m['segm']['AP']:.1f} | "
                    f"{m['segm']['AP50']:.1f} | {m['segm']['AP75']:.1f} | {_stat(m['segm'], 'AP90')} | "
                    f"{_stat(m.get('boundary'), 'AP')} | {m[f'segm@{LARGE_MAX_DETS}']['AP']:.1f} |")
    return "\n".join(rows)


def _stat(metrics: dict[str, Any] | None, name: str) -> str:
    """One stat to one decimal, or '—' where it was not scored (results from before it existed)."""
    value = (metrics or {}).get(name)
    return "—" if value is None else f"{value:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="ANN.json:IMAGES")
    p.add_argument("--val", required=True, help="ANN.json:IMAGES")
    p.add_argument("--minutes", type=float, nargs="+", default=[10.0])
    p.add_argument("--subset", type=int, default=0, help="train on this many training images (seeded draw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/vs_torchvision")
    p.add_argument("--ours", default="", help="extra arguments for maskrcnn train (a --config, KEY=VALUE ...)")
    p.add_argument("--tv-scale", type=float, default=1.0, help="torchvision side: resize factor (1 = native)")
    p.add_argument("--only", choices=["ours", "torchvision"], default=None)
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], metavar=("OURS", "TORCHVISION"),
                   help="the CPU each side is pinned to")
    p.add_argument("--table", action="store_true", help="print the table of OUT/results.json and exit")
    p.add_argument("--worker", choices=["train-torchvision", "score-ours", "score-torchvision"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.table:
        print(table(json.loads((Path(args.out) / "results.json").read_text())))
    elif args.worker == "train-torchvision":
        train_torchvision(args)
    elif args.worker == "score-ours":
        score_ours(args)
    elif args.worker == "score-torchvision":
        score_torchvision(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
