"""Peak memory and time of a training step on a dense scene, before and after (issue 25, part 1).

Writes one 1024 x 1024 image holding a grid of `--instances` small squares (10 px, one polygon each, as
an annotator or a contour tracer writes them) as a COCO file plus a PNG, then trains the `shapes` preset
on it at full size (input.min_size_train=[1024], input.max_size_train=1024, batch 2: the same image twice,
flipped at random) for `--steps` steps, in a child process per source, data loading in that process
(data.num_workers=0, so its memory counts too). Reported per source: the peak RSS of the whole child
(os.wait4's ru_maxrss, also when it dies), the time to load the batch, and each step's wall time
(forward + backward + update, bf16 autocast where the CPU has it, as the preset's solver.amp=auto).
After the training steps, one inference pass on the image (eval mode) checks that path on the dense
scene too.

    .venv/bin/python benchmarks/dense_scene.py                          # the working tree only
    .venv/bin/python benchmarks/dense_scene.py --before a821b39         # and a revision, via `git worktree`

The child runs under an address-space cap (`--cap-gb`, default 12) so that a source which holds masks
as [N, H, W] fails inside the cap with its own error instead of pushing a shared machine into swap or
the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"


def write_scene(folder: Path, instances: int, side: int = 1024, square: int = 10, pitch: int = 14) -> Path:
    """Write `folder/scene.json` and `folder/images/scene.png`: a grid of squares; return the JSON path."""
    import numpy as np
    from PIL import Image

    per_row = (side - square) // pitch + 1
    if instances > per_row * per_row:
        raise SystemExit(f"at most {per_row * per_row} squares fit a {side}-px image")
    pixels = np.full((side, side, 3), 30, np.uint8)
    annotations = []
    for k in range(instances):
        y, x = (k // per_row) * pitch + 2, (k % per_row) * pitch + 2
        pixels[y : y + square, x : x + square] = (220, 200, 60)
        polygon = [x, y, x + square, y, x + square, y + square, x, y + square]
        annotations.append({"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": square * square,
                            "bbox": [x, y, square, square], "segmentation": [[float(v) for v in polygon]]})
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / "images" / "scene.png")
    data = {"images": [{"id": 1, "file_name": "scene.png", "width": side, "height": side}],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"}]}
    (folder / "scene.json").write_text(json.dumps(data))
    return folder / "scene.json"


def child(args: argparse.Namespace) -> None:
    """Train `args.steps` steps from `args.source_dir` on the scene; print one JSON line of results."""
    cap = int(args.cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.path.insert(0, args.source_dir)
    import torch

    from maskrcnn.config import load_config
    from maskrcnn.data.loader import build_train_loader
    from maskrcnn.engine.solver import build_lr_scheduler, build_optimizer
    from maskrcnn.modeling import build_model
    from revision_compat import training_helpers

    amp_dtype, seed_all, build_train_dataset = training_helpers()

    result: dict = {"source": args.source, "steps": []}
    try:
        scene = Path(args.scene)
        cfg = load_config("shapes", [f"data.train=['{scene}:{scene.parent / 'images'}']", "data.num_workers=0",
                                     "input.min_size_train=[1024]", "input.max_size_train=1024",
                                     "solver.ims_per_batch=2"])
        seed_all(0)
        model = build_model(cfg)
        model.train()
        loader = build_train_loader(build_train_dataset(cfg), batch_size=2, num_workers=0, aspect_ratio_grouping=True,
                                    seed=0, start_iter=0, max_bad_images=5, max_worker_restarts=1, rank=0,
                                    world_size=1)
        optimizer = build_optimizer(model, cfg.solver)
        scheduler = build_lr_scheduler(optimizer, cfg.solver)
        dtype = amp_dtype(cfg.solver.amp, torch.device("cpu"))
        result["precision"] = str(dtype or torch.float32).replace("torch.", "")
        for _ in range(args.steps):
            start = time.perf_counter()
            images, targets = next(loader)
            loaded = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                losses = model(images, targets)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            done = time.perf_counter()
            result["steps"].append({"load_s": round(loaded - start, 2), "step_s": round(done - loaded, 2),
                                    "loss": round(float(total), 3),
                                    "rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            out = model([images[0]])[0]
        result["inference_s"] = round(time.perf_counter() - start, 2)
        result["detections"] = len(out["boxes"])
        result["ok"] = True
    except (MemoryError, RuntimeError) as e:  # the dense path's failure, reported in one line
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print("RESULT " + json.dumps(result), flush=True)


def run_source(source: str, scene: Path, steps: int, cap_gb: float, threads: int) -> dict:
    """Run the child for one source (a git revision checked out as a temporary worktree, or WORKTREE)."""
    with tempfile.TemporaryDirectory(prefix="dense-scene-src-") as tmp:
        source_dir = REPO
        if source != WORKTREE:
            source_dir = Path(tmp) / "src"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(source_dir), source],
                           check=True, capture_output=True)
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(source_dir)}
            cmd = [sys.executable, __file__, "--child", "--source", source, "--source-dir", str(source_dir),
                   "--scene", str(scene), "--steps", str(steps), "--cap-gb", str(cap_gb)]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
        finally:
            if source != WORKTREE:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(source_dir)],
                               check=False, capture_output=True)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {
        "source": source, "ok": False, "error": f"exit {proc.returncode}: " + (output.strip().splitlines() or [""])[-1][:200]}
    result["peak_rss_gb"] = round(usage.ru_maxrss / 2**20, 2)  # KiB on Linux
    result["wall_s"] = round(wall, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=None, metavar="REV", help="also run this git revision (e.g. a821b39)")
    p.add_argument("--instances", type=int, default=5000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of each child (GiB)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", default=WORKTREE, help=argparse.SUPPRESS)
    p.add_argument("--source-dir", default=str(REPO), help=argparse.SUPPRESS)
    p.add_argument("--scene", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    folder = Path(tempfile.mkdtemp(prefix="dense-scene-"))
    try:
        scene = write_scene(folder, args.instances)
        sources = ([args.before] if args.before else []) + [WORKTREE]
        print(f"# {args.instances} squares in one 1024x1024 image, batch 2, {args.steps} steps, "
              f"{platform.processor() or platform.machine()}, cap {args.cap_gb} GiB")
        for source in sources:
            print(json.dumps(run_source(source, scene, args.steps, args.cap_gb, args.threads)), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
