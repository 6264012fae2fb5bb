"""`maskrcnn demo`: the main job on built-in data: make shapes, train, evaluate, draw, report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "Generate synthetic shapes, train the `shapes` preset on them, evaluate it and draw overlays."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the demo command's arguments."""
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget (default: 8)")
    p.add_argument("--train-images", type=int, default=1000, help="synthetic training images (default: 1000)")
    p.add_argument("--val-images", type=int, default=100, help="synthetic validation images (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    p.add_argument("--overlays", type=int, default=8, help="validation overlays to draw (default: 8)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for the shapes preset")


def ensure_shapes(data_dir: Path, num_train: int, num_val: int, seed: int) -> dict[str, tuple[Path, Path]]:
    """Return the shapes dataset under `data_dir`, generating it unless the same one is already there."""
    from maskrcnn.data.shapes import make_shapes

    stamp = data_dir / "params.json"
    params = {"train": num_train, "val": num_val, "seed": seed}
    splits = {s: (data_dir / f"{s}.json", data_dir / s) for s in ("train", "val")}
    if stamp.exists() and json.loads(stamp.read_text()) == params and all(a.exists() for a, _ in splits.values()):
        print(f"using the synthetic shapes in {data_dir}")
        return splits
    print(f"generating {num_train} + {num_val} synthetic shapes images in {data_dir} ...")
    splits = make_shapes(data_dir, num_train, num_val, seed)
    stamp.write_text(json.dumps(params))
    return splits


def draw_overlays(model, val_json: Path, val_dir: Path, out_dir: Path, count: int) -> list[Path]:
    """Write overlays of the first `count` validation images; return their paths."""
    from maskrcnn.config import atomic_path
    from maskrcnn.data.image_io import image_to_tensor, read_image
    from maskrcnn.visualize import draw_instances

    images = json.loads(val_json.read_text())["images"][:count]
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for info in images:
        pixels = read_image(val_dir / info["file_name"])
        output = model.predict(image_to_tensor(pixels), score_threshold=0.5)[0]
        path = out_dir / f"{Path(info['file_name']).stem}.png"
        with atomic_path(path) as tmp:
            draw_instances(pixels, output, model.class_names, 0.5).save(tmp, format="PNG")
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    """Run the demo end to end and print where everything went."""
    from maskrcnn.api import load_model
    from maskrcnn.config import load_config
    from maskrcnn.engine.evaluator import format_metrics
    from maskrcnn.engine.trainer import train

    out = Path(args.out)
    splits = ensure_shapes(out / "data", args.train_images, args.val_images, args.seed)
    (train_json, train_dir), (val_json, val_dir) = splits["train"], splits["val"]
    cfg = load_config("shapes", [
        f"data.train=['{train_json}:{train_dir}']",
        f"data.val={val_json}:{val_dir}",
        # A new run folder each time: a second `make demo` never touches the first one's outputs.
        f"output_dir={out / time.strftime('train-%Y%m%d-%H%M%S')}",
        f"solver.max_minutes={args.minutes}",
        *args.overrides,
    ])
    run_dir = train(cfg)
    metrics_file = run_dir / "eval" / "final" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    model = load_model(None, run_dir / "checkpoints" / "model_final.pth")
    overlays = draw_overlays(model, val_json, val_dir, run_dir / "overlays", args.overlays)

    print()
    print(format_metrics(metrics))
    print()
    print(f"data:        {out / 'data'}")
    print(f"run:         {run_dir}  (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"loss curve:  {run_dir / 'loss_curve.png'}")
    print(f"evaluation:  {metrics_file.parent}  (metrics.json, predictions.json, PR curves)")
    print(f"overlays:    {run_dir / 'overlays'}  ({len(overlays)} images)")
    print(f"output folder: {out}")
    print(f"box AP {metrics['bbox']['AP']:.1f}  mask AP {metrics['segm']['AP']:.1f}  (COCO AP@[.5:.95], validation shapes)")
    return 0
