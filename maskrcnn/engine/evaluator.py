"""COCO evaluation: box, mask and keypoint AP with pycocotools (results format: `coco_results`), tables and plots.

The numbers are pycocotools' own (`COCOeval.summarize()` stats), reported in percent as the model
zoos quote them, plus AP90 (AP at IoU 0.90 alone, from the same precision array: how many detections
are nearly exact) and, for masks, boundary AP (`boundary`: the same stats with min(mask IoU,
boundary IoU) as the overlap; see maskrcnn.engine.boundary). A stat that pycocotools reports as -1
(nothing to measure, e.g. no small objects in the ground truth) becomes NaN here and `null` in
metrics.json, so it can never be averaged or compared by mistake as if it were a real score.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.engine.coco_results import load_results, predictions_to_coco, write_predictions
from maskrcnn.engine.detections_log import DetectionsLog
from maskrcnn.errors import UserError
from maskrcnn.fileio import atomic_path, atomic_write_text

# Order and names of COCOeval.stats for boxes and masks at COCO's standard 100 detections per image
# (`stat_names` gives them for another count).
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
# COCO counts at most 100 detections per image; a model that keeps more (dense scenes) is scored at its own count.
STANDARD_MAX_DETS = 100
# For keypoints (OKS instead of IoU, 20 detections per image, no small objects).
KEYPOINT_STAT_NAMES = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
IOU_TYPES = ("bbox", "segm", "boundary", "keypoints")
# Scored from the masks: segm (mask IoU) and boundary (min(mask IoU, boundary IoU)).
MASK_IOU_TYPES = ("segm", "boundary")
# The stricter AP reported beside COCO's stats: AP at this IoU threshold alone (AP90).
STRICT_IOU = 0.9
# Per-keypoint OKS sigmas for a keypoint count other than COCO's 17 (whose own sigmas pycocotools has):
# one value for every keypoint, about the mean of COCO's.
DEFAULT_OKS_SIGMA = 0.07


# ---- loading -------------------------------------------------------------------------------------


def load_coco_gt(ann_file: str | os.PathLike) -> COCO:
    """Load a COCO ground-truth file quietly, turning missing or malformed files into UserError."""
    path = Path(ann_file)
    if not path.is_file():
        raise UserError(f"annotation file '{path}' does not exist; pass --data ANN.json:IMAGE_DIR")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"annotation file '{path}' is not valid JSON ({e})") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise UserError(f"annotation file '{path}' is not COCO format (problem with {e!r})") from None


def _results_for(coco_gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """Build pycocotools' results object for one IoU type without mutating `results`."""
    if iou_type in MASK_IOU_TYPES:
        # Drop the box so loadRes takes each detection's area from its mask, as torchvision's and
        # Detectron2's evaluators do; otherwise APs/m/l for masks would bin by box area.
        anns = [{k: v for k, v in r.items() if k not in ("bbox", "keypoints")} for r in results]
    elif iou_type == "keypoints":
        anns = [{k: v for k, v in r.items() if k != "segmentation"} for r in results if "keypoints" in r]
    else:
        anns = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if not anns:
        # loadRes indexes anns[0]; an empty result set is legitimate (a model that finds nothing).
        res = COCO()
        res.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                       "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            res.createIndex()
        return res
    for a in anns:
        if "image_id" not in a or "category_id" not in a or "score" not in a:
            raise UserError("a detection lacks image_id, category_id or score; expected COCO results format")
    unknown = {a["image_id"] for a in anns} - set(coco_gt.getImgIds())
    if unknown:
        raise UserError(f"detections refer to image ids not in the ground truth (e.g. {sorted(unknown)[0]}); "
                        "check that predictions and --data match")
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(anns)


# ---- evaluation ----------------------------------------------------------------------------------


def _percent(x: float) -> float:
    return float("nan") if x < 0 else float(x) * 100.0


def stat_names(max_dets: int = STANDARD_MAX_DETS) -> list[str]:
    """Return the names of the box/mask stats when up to `max_dets` (>= 100) detections per image count."""
    return [f"AR{max_dets}" if name == "AR100" else name for name in STAT_NAMES]


def _precision_all_sizes(ev: COCOeval) -> np.ndarray:
    """Return precision [T, R, K] for objects of all sizes at the most detections scored (maxDets[-1])."""
    area = ev.params.areaRngLbl.index("all")
    return ev.eval["precision"][:, :, :, area, len(ev.params.maxDets) - 1]  # eval["precision"]: [T, R, K, A, M]


def _ap_at_iou(ev: COCOeval, iou: float) -> float:
    """Return AP (all sizes, at maxDets[-1]) at one of COCOeval's IoU thresholds; -1 without ground truth."""
    t = int(np.flatnonzero(np.isclose(ev.params.iouThrs, iou))[0])
    p = _precision_all_sizes(ev)[t]
    p = p[p > -1]
    return float(np.mean(p)) if p.size else -1.0


def _box_mask_stats(ev: COCOeval, max_dets: int) -> dict[str, float]:
    """Return COCO's stats for boxes or masks in percent, with AP90 after AP75."""
    stats = {name: _percent(v) for name, v in zip(stat_names(max_dets), ev.stats)}
    strict = {f"AP{round(STRICT_IOU * 100)}": _percent(_ap_at_iou(ev, STRICT_IOU))}
    names = list(stats)
    at = names.index("AP75") + 1
    return {**{n: stats[n] for n in names[:at]}, **strict, **{n: stats[n] for n in names[at:]}}


def _per_category_ap(ev: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP@[.5:.95] per category (all sizes, at maxDets), in percent; NaN without ground truth."""
    precision = _precision_all_sizes(ev)
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        out[name] = float(np.mean(p)) * 100.0 if p.size else float("nan")
    return out


def _num_gt_keypoints(coco_gt: COCO) -> int:
    """Return the keypoint count of the ground truth's keypoint categories (0 when it has none)."""
    counts = [len(c["keypoints"]) for c in coco_gt.dataset.get("categories", []) if c.get("keypoints")]
    return max(counts, default=0)


def _prepare_keypoint_gt(coco_gt: COCO) -> None:
    """Fill `num_keypoints` (COCOeval reads it) where a ground-truth annotation lacks it."""
    for ann in coco_gt.anns.values():
        if "num_keypoints" not in ann:
            values = ann.get("keypoints") or []
            ann["num_keypoints"] = sum(1 for v in values[2::3] if v > 0)


def _run_cocoeval(coco_gt: COCO, coco_dt: COCO, iou_type: str, image_ids: list[int] | None,
                  kpt_oks_sigmas: list[float] | None = None, max_dets: int = STANDARD_MAX_DETS) -> COCOeval:
    """Run COCOeval; boxes and masks count up to `max_dets` (>= 100) detections per image, keypoints COCO's 20."""
    if iou_type == "boundary":
        from maskrcnn.engine.boundary import BoundaryCOCOeval

        ev = BoundaryCOCOeval(coco_gt, coco_dt)
    else:
        ev = COCOeval(coco_gt, coco_dt, iou_type)
    if iou_type != "keypoints":
        ev.params.maxDets = [1, 10, max_dets]
    else:
        num = _num_gt_keypoints(coco_gt)
        if kpt_oks_sigmas:
            ev.params.kpt_oks_sigmas = np.asarray(kpt_oks_sigmas, dtype=np.float64)
        elif num != len(ev.params.kpt_oks_sigmas):  # pycocotools' defaults are COCO's 17
            ev.params.kpt_oks_sigmas = np.full(num, DEFAULT_OKS_SIGMA)
    if image_ids is not None:
        # Sorted, as COCOeval's default is: the order feeds the stable sort of tied scores.
        ev.params.imgIds = sorted(set(int(i) for i in image_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if iou_type != "keypoints" and max_dets != STANDARD_MAX_DETS:
        # summarize() takes AP (stats[0]) at a hard-coded maxDets=100 (-1 when 100 is not among
        # params.maxDets) while every other stat reads maxDets[2]: compute AP the same way at maxDets[2].
        precision = _precision_all_sizes(ev)
        valid = precision[precision > -1]
        ev.stats[0] = float(np.mean(valid)) if valid.size else -1.0
    return ev


def evaluate_results(
    coco_gt: COCO | str | os.PathLike,
    results: list[dict] | str | os.PathLike,
    out_dir: Path | str | None = None,
    iou_types: Iterable[str] = IOU_TYPES,
    image_ids: list[int] | None = None,
    kpt_oks_sigmas: list[float] | None = None,
    max_dets: int = STANDARD_MAX_DETS,
) -> dict[str, Any]:
    """Score COCO results against ground truth; write metrics.json and pr_curve.png when out_dir is set.

    `image_ids` restricts evaluation to the images that were actually run (e.g. with --max-images).
    Box and mask AP count up to max(100, `max_dets`) detections per image (pycocotools' maxDets
    [1, 10, that]; pass the model's `detections_per_image`), and the AR100 stat is named for that count.
    Masks are scored twice: `segm` (mask IoU) and `boundary` (boundary AP, maskrcnn.engine.boundary);
    boxes and masks also get AP90. Keypoint AP (OKS) is scored when the results carry `keypoints` and
    the ground truth has keypoint categories; `kpt_oks_sigmas` defaults to COCO's for 17 keypoints,
    else DEFAULT_OKS_SIGMA each.
    """
    if not isinstance(coco_gt, COCO):
        coco_gt = load_coco_gt(coco_gt)
    if not isinstance(results, list):
        results = load_results(results)
    max_dets = max(STANDARD_MAX_DETS, int(max_dets))
    has_masks = any("segmentation" in r for r in results)
    has_keypoints = any("keypoints" in r for r in results) and _num_gt_keypoints(coco_gt) > 0
    metrics: dict[str, Any] = {}
    per_category: dict[str, dict[str, float]] = {}
    evals: dict[str, COCOeval] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unsupported iou type {iou_type!r}; expected one of {IOU_TYPES}")
        if iou_type in MASK_IOU_TYPES and results and not has_masks:
            continue  # a box-only detector: nothing to score for masks
        if iou_type == "keypoints":
            if not has_keypoints:
                continue  # no keypoint head, or no keypoint ground truth
            _prepare_keypoint_gt(coco_gt)
        ev = _run_cocoeval(coco_gt, _results_for(coco_gt, results, iou_type), iou_type, image_ids, kpt_oks_sigmas,
                           max_dets)
        if iou_type == "keypoints":
            metrics[iou_type] = {name: _percent(v) for name, v in zip(KEYPOINT_STAT_NAMES, ev.stats)}
        else:
            metrics[iou_type] = _box_mask_stats(ev, max_dets)
        per_category[iou_type] = _per_category_ap(ev, coco_gt)
        evals[iou_type] = ev
    metrics["per_category"] = per_category
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_metrics(metrics, out_dir / "metrics.json")
        if evals:
            plot_pr_curves(evals, out_dir / "pr_curve.png")
    return metrics


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None  # JSON has no NaN; null means "not measurable" (see module docstring)
    return x


def write_metrics(metrics: dict, path: Path) -> None:
    """Write metrics as strict JSON (NaN as null), atomically."""
    atomic_write_text(path, json.dumps(_nan_to_none(metrics), indent=2) + "\n")


def plot_pr_curves(evals: dict[str, COCOeval], out_png: Path) -> None:
    """Plot precision vs recall at IoU .50, .75 and the mean over IoUs; one subplot per IoU type."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 4.2), squeeze=False)
    for ax, (iou_type, ev) in zip(axes[0], evals.items()):
        p = _precision_all_sizes(ev)  # [T, R, K]
        rec = ev.params.recThrs
        valid = p > -1
        # Mean over categories that have ground truth; -1 marks categories without any.
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no category has GT
            by_iou = np.where(valid, p, 0).sum(axis=2) / valid.sum(axis=2)  # [T, R]
            mean_iou = np.nanmean(by_iou, axis=0)
        thrs = ev.params.iouThrs
        curves = [("IoU=0.50", by_iou[np.isclose(thrs, 0.5)].squeeze(0)),
                  ("IoU=0.75", by_iou[np.isclose(thrs, 0.75)].squeeze(0)),
                  ("IoU=0.50:0.95", mean_iou)]
        for label, prec in curves:
            ax.plot(rec, prec, label=label)
        ax.set_title({"bbox": "boxes", "segm": "masks", "boundary": "mask boundaries (boundary AP)",
                      "keypoints": "keypoints (OKS)"}[iou_type])
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---- presentation --------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """Return a readable table of the summary stats (rows) per IoU type (columns), then per-category AP."""
    types = [t for t in IOU_TYPES if t in metrics]
    if not types:
        return "(no metrics)"
    col = max(9, max(len(t) for t in types) + 5)  # room for "keypoints AP", "boundary AP"
    header = f"{'':<8}" + "".join(f"{t:>{col}}" for t in types)
    lines = [header]
    box_names = next((list(metrics[t]) for t in types if t != "keypoints"), STAT_NAMES)  # AR100 may be AR<N>
    for name in box_names + [n for n in KEYPOINT_STAT_NAMES if n not in box_names and "keypoints" in types]:
        lines.append(f"{name:<8}" + "".join(f"{_fmt(metrics[t].get(name)):>{col}}" for t in types))
    per_cat = metrics.get("per_category", {})
    names = list(dict.fromkeys(n for t in types for n in per_cat.get(t, {})))
    if names:
        width = max(8, max(len(n) for n in names) + 2)
        lines += ["", f"{'category':<{width}}" + "".join(f"{t + ' AP':>{col}}" for t in types)]
        for n in names:
            lines.append(f"{n:<{width}}" + "".join(f"{_fmt(per_cat.get(t, {}).get(n)):>{col}}" for t in types))
    return "\n".join(lines)


# ---- running a model -----------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _open_log(out_dir: Path | str | None, resume: bool, world: int) -> DetectionsLog | None:
    """Return the per-image detections log of an evaluation into `out_dir` (None: not written).

    Under torch.distributed no log is written: each rank would need its own, and a resumed run
    with another world size would have to reshard them; `--resume` is refused there.
    """
    if world > 1 or out_dir is None:
        if resume:
            raise UserError("--resume needs a single process and an output folder (--out); "
                            "run the evaluation again from the start")
        return None
    return DetectionsLog(Path(out_dir) / "predictions.jsonl", ("image_id",), resume=resume)


def _resumed_detections(log: DetectionsLog, image_ids: list[int]) -> dict[int, list[dict]]:
    """Return the detections of the images the log already holds, by image id, checking they are among `image_ids`."""
    wanted = set(image_ids)
    done: dict[int, list[dict]] = {}
    for record in log.read(log.entries):
        image_id = record["image_id"]
        if image_id not in wanted or image_id in done:
            raise UserError(f"'{log.path}' holds detections of image id {image_id}, which is "
                            f"{'listed twice' if image_id in done else 'not among the images evaluated'}; "
                            "resume with the same --data and --max-images, or drop --resume to start over")
        done[image_id] = record["detections"]
    return done


def _predict_images(model: torch.nn.Module, dataset: Any, positions: list[int], category_ids: list[int],
                    log: DetectionsLog | None, progress: bool) -> list[tuple[int, list[dict]]]:
    """Return (image id, COCO detections) of the dataset images at `positions`, appending each to `log`."""
    from torch.utils.data import Subset
    from tqdm import tqdm

    from maskrcnn.data.loader import build_test_loader
    from maskrcnn.tiling import run_model

    loader = build_test_loader(dataset if len(positions) == len(dataset) else Subset(dataset, positions))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    per_image = []
    try:
        with torch.no_grad():
            for images, targets in tqdm(loader, total=len(positions), desc="eval", unit="img", disable=not progress,
                                        dynamic_ncols=True):
                outputs = run_model(model, [im.to(device) for im in images])  # tiled where test.tiling says
                for output, target in zip(outputs, targets):
                    image_id = int(target["image_id"])
                    detections = predictions_to_coco(output, image_id, category_ids)
                    per_image.append((image_id, detections))
                    if log is not None:
                        log.append({"image_id": image_id, "detections": detections})
    finally:
        model.train(was_training)  # periodic evaluation during training must not leave eval mode on
    return per_image


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    out_dir: Path | str | None,
    max_images: int = 0,
    progress: bool = True,
    category_ids: list[int] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run `model` over `dataset`, write predictions.json, and return (and write) COCO metrics.

    `category_ids[label - 1]` names each label's dataset category (default: `dataset.category_ids`).
    With `out_dir`, each image's detections are appended to predictions.jsonl as soon as it is done;
    `resume` skips the images already there (the dataset must list `image_ids`), so the files and
    numbers equal an uninterrupted run's. Box and mask AP count up to the model's
    `detections_per_image` (at least 100) detections per image.
    Under torch.distributed every rank calls this with the same arguments: rank r predicts images
    r, r+W, r+2W, ... of the first `max_images`; rank 0 gathers the detections back into dataset
    order (so predictions.json and the numbers equal a single process's), writes the files and
    scores them once; every rank returns the metrics.
    """
    from maskrcnn import distributed as du

    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    rank, world = du.get_rank(), du.get_world_size()
    log = _open_log(out_dir, resume, world)
    try:
        done = _resumed_detections(log, dataset.image_ids[:n]) if log is not None and log.entries else {}
        if done:
            print(f"resuming: {len(done)} of {n} image(s) already in {log.path}", file=sys.stderr)
        shard = [i for i in range(rank, n, world) if not done or dataset.image_ids[i] not in done]
        category_ids = list(dataset.category_ids if category_ids is None else category_ids)
        per_image = _predict_images(model, dataset, shard, category_ids, log, progress and rank == 0)
    finally:
        if log is not None:
            log.close()
    if world > 1:
        shards = du.gather_object(per_image)
        if rank != 0:
            return du.broadcast_object(None)
        # Interleave the shards back: dataset position i was rank i % W's (i // W)-th image.
        per_image = [shards[i % world][i // world] for i in range(n)]
    elif done:
        position = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
        per_image = sorted([*done.items(), *per_image], key=lambda item: position[item[0]])
    image_ids = [image_id for image_id, _ in per_image]
    results = [r for _, detections in per_image for r in detections]
    if out_dir is not None:
        write_predictions(results, Path(out_dir) / "predictions.json")
    model_cfg = getattr(getattr(model, "cfg", None), "model", None)  # ours and the ONNX Runtime wrapper have one
    keypoint_cfg = getattr(model_cfg, "keypoint_head", None)
    max_dets = getattr(getattr(model_cfg, "box_head", None), "detections_per_image", STANDARD_MAX_DETS)
    metrics = evaluate_results(dataset.coco, results, out_dir, image_ids=image_ids, max_dets=max_dets,
                               kpt_oks_sigmas=list(keypoint_cfg.oks_sigmas) if keypoint_cfg is not None else None)
    return du.broadcast_object(metrics) if world > 1 else metrics
