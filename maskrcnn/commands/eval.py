"""`maskrcnn eval`: COCO box and mask AP of a model (or of an existing results file) on a COCO-format set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from maskrcnn.errors import UserError

HELP = ("evaluate box and mask AP on a COCO-format set: maskrcnn eval --config C --weights W "
        "[--data ANN.json:IMAGE_DIR] [--predictions FILE] [KEY=VALUE ...]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the eval command's options."""
    from maskrcnn.commands.options import (add_backend_option, add_device_option, add_model_options,
                                          add_overrides)

    add_model_options(p, onnx=True)
    p.add_argument("--data", default=None, metavar="ANN.json:IMAGE_DIR",
                   help="evaluation set (default: data.val of the config)")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="evaluate this COCO results JSON instead of running a model")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <output_dir>/eval)")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="evaluate only the first N images (default: test.max_images; 0 = all)")
    add_device_option(p, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation into the same --out: skip the images already in "
                        "OUT/predictions.jsonl (one process only)")
    add_backend_option(p)
    add_overrides(p, dest="opts", example="model.mask_head.threshold=0.4")


def _load_cfg(args: argparse.Namespace, entry: Any = None) -> Any:
    """Return the config from --config, else the zoo entry's, else the --weights checkpoint's, else the defaults.

    As `load_model` resolves it (`api.resolve_config`), except that scoring a --predictions file needs
    no model, so its config may be the defaults.
    """
    from maskrcnn.api import resolve_config
    from maskrcnn.config import load_config

    weights = None if args.predictions else args.weights
    if not args.config and entry is None and weights and not Path(weights).is_file():
        raise UserError(f"weights file '{weights}' does not exist")
    cfg = resolve_config(args.config or None, weights, entry, list(args.opts))
    return cfg if cfg is not None else load_config(None, list(args.opts))


def _ground_truth_file(spec: str) -> Path:
    """Return the annotation file of `ANN.json:IMAGE_DIR`; a bare ANN.json is enough for --predictions."""
    from maskrcnn.data.coco import parse_data_spec

    if spec.lower().endswith(".json"):
        return Path(spec)
    return parse_data_spec(spec)[0]


def label_to_category(cfg: Any, dataset: Any) -> list[int]:
    """Return the dataset category id of each model label 1..K, or raise if model and data disagree."""
    model_ids = list(cfg.model.category_ids)
    data_ids = list(dataset.category_ids)
    k = cfg.model.num_classes
    if model_ids:
        # The model recorded which dataset category each label means (our trainer does this).
        if sorted(model_ids) != sorted(data_ids):
            raise UserError(
                f"the model was trained for category ids {_short(model_ids)} but '{dataset.ann_file}' has "
                f"{_short(data_ids)}; evaluate on data with the same categories")
        return model_ids
    if k == len(data_ids):
        return data_ids  # contiguous labels 1..K in the dataset's category order (CONTRACTS.md)
    # torchvision's COCO models use the COCO category id itself as the label (1..90 with gaps).
    names = list(cfg.model.class_names)
    same_names = names and all(
        1 <= cid <= k and names[cid - 1] == name for cid, name in zip(data_ids, dataset.class_names))
    if same_names:
        return list(range(1, k + 1))
    raise UserError(
        f"the model has {k} classes but '{dataset.ann_file}' has {len(data_ids)} categories; "
        "evaluate on data with the model's classes (or fine-tune with `maskrcnn train --weights`)")


def _short(ids: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)})"


def _run_model(args: argparse.Namespace, cfg: Any, spec: str, out: Path, onnx_model: Any = None) -> dict:
    """Build the dataset and model (or take the exported one), then run the evaluator."""
    from maskrcnn.api import load_model
    from maskrcnn.data.coco import CocoDataset, parse_data_spec
    from maskrcnn.engine.evaluator import evaluate
    from maskrcnn.engine.precision import resolve_device

    if not args.weights:
        raise UserError("eval needs --weights NAME_OR_FILE (a zoo model, checkpoint or state dict), "
                        "or --predictions FILE")
    if not Path(args.weights).is_file():
        raise UserError(f"weights file '{args.weights}' does not exist")
    ann, image_dir = parse_data_spec(spec)
    if not ann.is_file():
        raise UserError(f"annotation file '{ann}' does not exist; pass --data ANN.json:IMAGE_DIR")
    # Every image counts: images without annotations still score their false positives.
    dataset = CocoDataset(ann, image_dir, filter_empty=False, train=False, max_pixels=cfg.input.max_pixels,
                          cache_dir=cfg.data.cache_dir or None)
    ids = label_to_category(cfg, dataset)  # before the (slow) model load, so mistakes show at once
    max_images = cfg.test.max_images if args.max_images is None else args.max_images
    if onnx_model is not None:
        return evaluate(onnx_model, dataset, out, max_images=max_images, progress=True, category_ids=ids,
                        resume=args.resume)
    from maskrcnn import distributed as du

    s = cfg.solver
    # Under torchrun every rank predicts its share of the images and rank 0 scores them (docs/distributed.md).
    with du.session(resolve_device(args.device or cfg.device), s.dist_timeout_minutes, s.dist_heartbeat_timeout) as device:
        model = load_model(cfg, args.weights, device=str(device))
        return evaluate(model, dataset, out, max_images=max_images, progress=True, category_ids=ids,
                        resume=args.resume)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the tables and where the files went; return the exit status."""
    from maskrcnn.engine.evaluator import evaluate_results, format_metrics

    if args.predictions and args.weights:
        raise UserError("give either --weights (run the model) or --predictions (score a results file), not both")
    from maskrcnn.commands.predict import backend_precision
    from maskrcnn.onnx_backends import BACKENDS

    backend_precision(args)  # refused early where it does not apply
    onnx_model = None
    if args.backend in BACKENDS:  # the exported file carries its config
        from maskrcnn.commands.predict import load_backend

        args.device = args.device or "cpu"
        onnx_model = load_backend(args, list(args.opts))
        cfg = onnx_model.cfg
    else:
        entry = None
        if args.weights and not args.predictions:
            from maskrcnn.zoo import resolve_weights

            args.weights, entry = resolve_weights(args.weights)  # a zoo name: fetched once, then its file
        cfg = _load_cfg(args, entry)
    spec = args.data or cfg.data.val
    if not spec:
        raise UserError("no evaluation data: pass --data ANN.json:IMAGE_DIR or set data.val in the config")
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "eval"

    if args.predictions:
        if args.max_images:
            raise UserError("--max-images applies to running a model; filter the --predictions file instead")
        if args.resume:
            raise UserError("--resume continues running a model; drop it to score a --predictions file")
        from maskrcnn.data.coco_checks import check_annotation_file

        gt_file = _ground_truth_file(spec)
        if gt_file.is_file():  # the same one-line schema errors as training and model evaluation give
            check_annotation_file(gt_file)
        # Dense detectors are scored at their own count per image (model.box_head.detections_per_image).
        metrics = evaluate_results(gt_file, args.predictions, out, max_dets=cfg.model.box_head.detections_per_image)
        written = ["metrics.json", "pr_curve.png"]
    else:
        metrics = _run_model(args, cfg, spec, out, onnx_model)
        written = ["predictions.json", "predictions.jsonl", "metrics.json", "pr_curve.png"]
        from maskrcnn.distributed import env_rank

        if env_rank() != 0:
            return 0  # distributed: rank 0 prints the tables

    print(format_metrics(metrics))
    print()
    for name in written:
        if (out / name).exists():
            print(f"{name + ':':<18}{out / name}")
    summary = "  ".join(f"{t} AP {metrics[t]['AP']:.1f}" for t in ("bbox", "segm", "boundary", "keypoints") if t in metrics)
    print(summary + "  (COCO AP@[.5:.95], percent)")
    return 0
