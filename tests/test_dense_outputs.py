"""Dense outputs: thousands of detections per image, predicted in bounded chunks and scored at that many.

COCO counts 100 detections per image; with `model.box_head.detections_per_image` above that, the
evaluator sets pycocotools' maxDets to [1, 10, N] and must report what pycocotools itself computes.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from support import TINY
from maskrcnn.cli import main
from maskrcnn.config import load_config
from maskrcnn.engine.coco_results import encode_masks
from maskrcnn.engine.evaluator import evaluate_results, format_metrics, stat_names
from maskrcnn.modeling import build_model
from maskrcnn.modeling import roi_heads as roi_heads_module
from maskrcnn.structures import paste_masks, paste_masks_grid_sample

# A grid of small squares: 50 x 40 = 2000 objects in the top 320 rows, an empty band below for false positives.
H, W = 400, 400
SIDE, PITCH, COLUMNS, ROWS = 6, 8, 50, 40
# 200 objects each. pycocotools applies maxDets per image *and category*, so a category needs over 100
# detections for the dense count to matter; its matching loop is quadratic per category, hence not fewer.
CATEGORIES = list(range(1, 11))


def square_rle(x: int, y: int, side: int) -> dict:
    m = np.zeros((H, W), dtype=np.uint8, order="F")
    m[y : y + side, x : x + side] = 1
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def dense_set(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Write 2000 ground-truth squares; return the file and 2000 detections: matches (shifted by 0..3 px,
    so IoU 1 down to 0.33), plus false positives in the empty band; 10% of the objects are missed."""
    rng = np.random.default_rng(0)
    anns, results = [], []
    for index in range(COLUMNS * ROWS):
        x, y = 1 + PITCH * (index % COLUMNS), 1 + PITCH * (index // COLUMNS)
        cat = CATEGORIES[index % len(CATEGORIES)]
        anns.append({"id": index + 1, "image_id": 1, "category_id": cat, "segmentation": square_rle(x, y, SIDE),
                     "area": float(SIDE * SIDE), "bbox": [x, y, SIDE, SIDE], "iscrowd": 0})
        if rng.random() < 0.1:  # missed: a false positive in the empty band instead
            x, y = int(rng.integers(0, W - SIDE)), int(rng.integers(330, H - SIDE))
        else:
            x += int(rng.integers(0, 4))
        results.append({"image_id": 1, "category_id": cat, "bbox": [float(x), float(y), float(SIDE), float(SIDE)],
                        "score": float(rng.random()), "segmentation": square_rle(x, y, SIDE)})
    gt = {"images": [{"id": 1, "file_name": "grid.png", "height": H, "width": W}],
          "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORIES], "annotations": anns}
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(gt))
    return path, results


def cocoeval_directly(gt_file: Path, results: list[dict], iou_type: str, max_dets: list[int]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        anns = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
        ev = COCOeval(gt, gt.loadRes(anns), iou_type)
        ev.params.maxDets = max_dets
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_2000_detections_scored_as_pycocotools_does(tmp_path: Path) -> None:
    gt_file, results = dense_set(tmp_path)
    assert len(results) == 2000
    metrics = evaluate_results(gt_file, results, None, max_dets=2000)
    standard = evaluate_results(gt_file, results, None, iou_types=("bbox",))  # COCO's 100 detections
    names = stat_names(2000)
    assert names[8] == "AR2000" and "AR100" not in metrics["bbox"]
    for iou_type in ("bbox", "segm"):
        ref = cocoeval_directly(gt_file, results, iou_type, [1, 10, 2000])
        # pycocotools' own summarize() takes AP at a hard-coded maxDets=100: -1 here. AP is the mean of
        # the precision array at maxDets 2000 (index 2), all sizes (index 0), over entries with ground truth.
        assert ref.stats[0] == -1
        precision = ref.eval["precision"][:, :, :, 0, 2]
        assert metrics[iou_type]["AP"] == pytest.approx(precision[precision > -1].mean() * 100, abs=1e-6)
        for name, value in zip(names[1:], ref.stats[1:]):
            if value < 0:
                assert np.isnan(metrics[iou_type][name]), name  # no medium or large objects here
            else:
                assert metrics[iou_type][name] == pytest.approx(value * 100, abs=1e-6), name
        for k, cat in enumerate(ref.params.catIds):
            p = precision[:, :, k]
            assert metrics["per_category"][iou_type][f"c{cat}"] == pytest.approx(p[p > -1].mean() * 100, abs=1e-6)
        assert 25 < metrics[iou_type]["AR2000"] < 50  # shifts of 0..3 px: IoU 1, .71, .5, .33
    # With 100 detections per category only half of the objects can be found: the dense count matters.
    assert metrics["bbox"]["AP"] > 1.5 * standard["bbox"]["AP"] > 0
    assert standard["bbox"]["AR100"] < 0.6 * metrics["bbox"]["AR2000"]
    assert "AR2000" in format_metrics(metrics)


@pytest.mark.parametrize("paste", [paste_masks, paste_masks_grid_sample])
def test_chunked_paste_equals_one_batch(paste) -> None:
    g = torch.Generator().manual_seed(3)
    n, height, width = 300, 90, 120
    probs = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width + 20.0, height + 20.0]) - 10  # some over the border
    wh = 1 + torch.rand(n, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + wh], dim=1)
    whole = paste(probs, boxes, height, width, masks_per_batch=n)
    for chunk in (1, 7, 16):
        assert torch.equal(paste(probs, boxes, height, width, masks_per_batch=chunk), whole)
    assert whole.any() and whole.dtype == torch.bool


def test_rle_encoding_in_chunks_equals_one_call() -> None:
    masks = torch.rand(150, 40, 30, generator=torch.Generator().manual_seed(4)) > 0.7
    one_call = mask_util.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    chunked = encode_masks(masks, chunk=16)
    assert [r["counts"] for r in chunked] == [r["counts"].decode("ascii") for r in one_call]
    assert encode_masks(masks[:0]) == []


def test_mask_head_in_chunks_equals_one_call(monkeypatch) -> None:
    """Mask probabilities of 600 RoIs over two images, chunked across the image boundary, equal one batch."""
    torch.manual_seed(0)
    model = build_model(load_config("shapes", TINY)).eval()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 64, generator=g)
    detections = []
    for count in (350, 250):
        xy = torch.rand(count, 2, generator=g) * 50
        detections.append({"boxes": torch.cat([xy, xy + 2 + torch.rand(count, 2, generator=g) * 30], dim=1),
                           "labels": torch.randint(1, 4, (count,), generator=g)})
    with torch.no_grad():
        features = model.pooling_features(model.extract_features(images))

        def probs(chunk: int) -> list[torch.Tensor]:
            monkeypatch.setattr(roi_heads_module, "MASK_ROIS_PER_CHUNK", chunk)
            dets = [dict(d) for d in detections]
            model.roi_heads.predict_masks(features, dets)
            return [d["mask_probs"] for d in dets]

        whole, chunked = probs(10_000), probs(64)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def test_predict_and_eval_keep_a_thousand_detections(checkpoint, shapes, tmp_path: Path) -> None:
    """The tiny model with NMS off returns 1000 detections per image (the mask head runs in chunks); predict
    writes them all, and eval scores at maxDets 1000."""
    dense = ["model.box_head.detections_per_image=1000", "model.rpn.post_nms_top_n_test=1000",
             "model.rpn.pre_nms_top_n_test=2000", "model.rpn.nms_thresh=0.95", "model.box_head.nms_thresh=1.0"]
    ann, image_dir = shapes["val"]
    image = sorted(Path(image_dir).iterdir())[0]
    out = tmp_path / "predict"
    assert main(["predict", str(image), "--weights", str(checkpoint), "--out", str(out),
                 "--score-threshold", "0", *dense]) == 0
    assert len(json.loads((out / "predictions.json").read_text())) == 1000
    status = main(["eval", "--weights", str(checkpoint), "--data", f"{ann}:{image_dir}", "--out",
                   str(tmp_path / "eval"), "--device", "cpu", *dense])
    assert status == 0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "AR1000" in saved["bbox"] and "AR100" not in saved["bbox"]
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())) == 2000  # two images
