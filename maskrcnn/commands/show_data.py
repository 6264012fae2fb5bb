"""`maskrcnn show-data`: a grid of training samples exactly as the train loader gives them (augmented)."""

from __future__ import annotations

import argparse

from maskrcnn.commands.options import add_config_option, add_overrides

HELP = ("draw augmented training samples with their masks and boxes: maskrcnn show-data --config C "
        "[--data ANN.json:IMAGE_DIR] --out grid.png [--n 16] [KEY=VALUE ...]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the show-data command's options."""
    add_config_option(p, default="built-in defaults")
    p.add_argument("--data", default=None, metavar="ANN.json:IMAGE_DIR",
                   help="training data to draw (default: the config's data.train)")
    p.add_argument("--out", required=True, metavar="PNG", help="where to write the grid image")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--iteration", type=int, default=0,
                   help="start at this training iteration's batch (default 0: the first)")
    p.add_argument("--cell", type=int, default=256, help="side of one grid cell in pixels (default 256)")
    add_overrides(p, example="input.crop.enabled=true input.vertical_flip=0.5")


def _draw_sample(image, target, class_names: list[str]):
    """Return one sample drawn as a PIL image: masks, boxes, class names; crowd (ignored) regions say so."""
    import torch

    from maskrcnn.visualize import draw_instances

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    labels, crowd = target["labels"].tolist(), target["iscrowd"].tolist()
    names = [class_names[i - 1] if 0 < i <= len(class_names) else str(i) for i in labels]
    output = {"boxes": target["boxes"], "labels": target["labels"], "masks": target["masks"],
              "scores": torch.ones(len(labels))}
    if "keypoints" in target:
        output["keypoints"] = target["keypoints"]
    captions = [f"{n} (ignored)" if c else n for n, c in zip(names, crowd)]
    return draw_instances(pixels, output, class_names, score_threshold=0.0, captions=captions)


def run(args: argparse.Namespace) -> int:
    """Write the grid and print where it is; return the exit status."""
    import itertools
    from pathlib import Path

    from maskrcnn.config import load_config
    from maskrcnn.data.loader import build_train_loader
    from maskrcnn.engine.train_setup import build_train_dataset
    from maskrcnn.errors import UserError
    from maskrcnn.fileio import atomic_path
    from maskrcnn.visualize import image_grid

    if args.n < 1 or args.cell < 16 or args.iteration < 0:
        raise UserError("show-data needs --n >= 1, --cell >= 16 and --iteration >= 0")
    cfg = load_config(args.config, list(args.overrides))
    if args.data:
        cfg.data.train = [args.data]
    dataset = build_train_dataset(cfg)
    # The trainer's own stream (same seed, batch size and grouping): what iteration N of training sees.
    stream = build_train_loader(dataset, batch_size=cfg.solver.ims_per_batch,
                                aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, seed=cfg.solver.seed,
                                start_iter=args.iteration, max_bad_images=cfg.data.max_bad_images)
    try:
        samples = itertools.islice(((im, t) for images, targets in stream for im, t in zip(images, targets)), args.n)
        pictures = [_draw_sample(image, target, list(dataset.class_names)) for image, target in samples]
    finally:
        stream.close()
    out = Path(args.out)
    with atomic_path(out) as tmp:
        image_grid(pictures, cell=args.cell).save(tmp, format="PNG", optimize=True)
    print(f"wrote {len(pictures)} training samples (seed {cfg.solver.seed}, from iteration {args.iteration}) to {out}")
    return 0
