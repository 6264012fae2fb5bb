"""Boundary IoU and boundary AP (maskrcnn.engine.boundary), and AP90 beside COCO's stats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from maskrcnn.engine.boundary import BoundaryCOCOeval, band_width, boundary_band, boundary_iou, boundary_rle
from maskrcnn.engine.evaluator import evaluate_results, format_metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2


def square(h: int, w: int, y: int, x: int, size: int, size_x: int | None = None) -> np.ndarray:
    """A boolean [h,w] image holding one size x size_x rectangle with its top-left corner at (y, x)."""
    m = np.zeros((h, w), bool)
    m[y : y + size, x : x + (size_x or size)] = True
    return m


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def band_by_definition(mask: np.ndarray, d: int) -> np.ndarray:
    """The band pixel by pixel: a mask pixel with a background or off-image pixel within chessboard distance d."""
    h, w = mask.shape
    band = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask)):
        window = mask[max(0, y - d) : y + d + 1, max(0, x - d) : x + d + 1]
        off_image = y - d < 0 or x - d < 0 or y + d >= h or x + d >= w
        band[y, x] = off_image or not window.all()
    return band


def rle(mask: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def decode(r: dict) -> np.ndarray:
    return mask_util.decode({"size": r["size"], "counts": r["counts"].encode()}).astype(bool)


def test_band_width_is_two_percent_of_the_diagonal_at_least_one():
    assert band_width(256, 256) == 7  # 0.02 * 362.0 = 7.24
    assert band_width(1040, 1388) == 35  # 0.02 * 1734.4 = 34.7
    assert band_width(50, 50) == 1 and band_width(10, 10) == 1  # 1.41 and 0.28 (at least 1)
    assert band_width(100, 100, ratio=0.05) == 7


def test_hand_computed_bands_and_ious():
    # A 4x4 square far from the border, d = 1: the band is its 12-pixel ring.
    a = square(50, 50, 10, 10, 4)
    ring = a.copy()
    ring[11:13, 11:13] = False
    assert (boundary_band(a, 1) == ring).all()
    # Shifted one pixel right: the rings share 3 pixels in the top and bottom rows, none in the middle
    # rows: boundary IoU 6 / (12 + 12 - 6) = 1/3, while the masks share 12 of 20 pixels (0.6).
    b = square(50, 50, 10, 11, 4)
    assert boundary_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, b) == pytest.approx(0.6)
    # The image border counts as outside: a mask filling a 10x10 image has a band along the border.
    full = np.ones((10, 10), bool)
    assert np.count_nonzero(boundary_band(full, 1)) == 100 - 64
    # A mask thinner than the band is all band; an empty mask has none.
    assert (boundary_band(square(50, 50, 5, 5, 2, 30), 3) == square(50, 50, 5, 5, 2, 30)).all()
    assert not boundary_band(np.zeros((8, 8), bool), 2).any()


def test_perfect_mask_scores_one_and_a_shift_costs_more_on_the_boundary():
    big = square(200, 200, 40, 40, 100)  # d = 6
    assert boundary_iou(big, big) == 1.0
    shifted = square(200, 200, 40, 41, 100)
    assert mask_iou(big, shifted) == pytest.approx(99 / 101)
    # The bands are 6-pixel frames of 2256 pixels; shifted, they share 12 rows x 99 at top and bottom
    # and 2 x 5 pixels in each of the 88 rows between: 2068 of a union of 2 x 2256 - 2068.
    assert boundary_iou(big, shifted) == pytest.approx(2068 / 2444)
    assert boundary_iou(big, shifted) < 0.9 < mask_iou(big, shifted)


def test_band_and_rle_match_the_definition_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        mask = rng.random((h, w)) < rng.uniform(0.3, 0.95)
        d = int(rng.integers(1, 5))
        expected = band_by_definition(mask, d)
        assert (boundary_band(mask, d) == expected).all()
        if d == band_width(h, w):  # d = 1 on these small images
            assert (decode(boundary_rle(rle(mask))) == expected).all()
    # Through RLE with the image's own band width (one large image, so d > 1).
    mask = rng.random((300, 200)) < 0.7
    out = boundary_rle(rle(mask))
    assert out["size"] == [300, 200] and band_width(300, 200) == 7
    assert (decode(out) == band_by_definition(mask, 7)).all()
    assert boundary_rle(rle(np.zeros((5, 6), bool)))["counts"] == rle(np.zeros((5, 6), bool))["counts"]


def write_coco(path: Path, masks: list[np.ndarray], crowd: tuple[int, ...] = ()) -> Path:
    """A one-image COCO file whose objects are `masks` (indices in `crowd` are crowd regions)."""
    h, w = masks[0].shape
    anns = []
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": rle(m), "area": int(m.sum()),
                     "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                     "iscrowd": int(i in crowd)})
    data = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}], "annotations": anns,
            "categories": [{"id": 1, "name": "cell"}]}
    path.write_text(json.dumps(data))
    return path


def detections(masks: list[np.ndarray]) -> list[dict]:
    out = []
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        out.append({"image_id": 1, "category_id": 1, "score": 1.0 - i / 100, "segmentation": rle(m),
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})
    return out


def test_boundary_cocoeval_overlap_is_min_of_mask_and_boundary_iou_crowd_keeps_mask_iou(tmp_path):
    gts = [square(120, 120, 10, 10, 40), square(120, 120, 60, 60, 30), square(120, 120, 0, 80, 30)]
    dts = [square(120, 120, 10, 12, 40), square(120, 120, 62, 60, 30), square(120, 120, 2, 82, 20)]
    gt = COCO(str(write_coco(tmp_path / "gt.json", gts, crowd=(2,))))
    ev = BoundaryCOCOeval(gt, gt.loadRes(detections(dts)))
    ev.evaluate()
    ious = ev.ious[1, 1]
    assert ious.shape == (3, 3)
    for i, d in enumerate(dts):
        for j, g in enumerate(gts):
            if j == 2:  # crowd: intersection over the detection's area, as COCOeval's mask IoU
                expected = np.count_nonzero(d & g) / np.count_nonzero(d)
            else:
                expected = min(mask_iou(d, g), boundary_iou(d, g))
            assert ious[i, j] == pytest.approx(expected), (i, j)
    assert 0 < ious[0, 0] < mask_iou(dts[0], gts[0])  # the boundary is the smaller of the two here


def test_evaluate_reports_boundary_ap_and_ap90(tmp_path):
    # Large squares, each detection off by one pixel: masks match at IoU >= 0.9, boundaries do not.
    gts = [square(200, 200, 10 + 60 * k, 10, 50) for k in range(3)]
    gt_file = write_coco(tmp_path / "gt.json", gts)
    shifted = [square(200, 200, 10 + 60 * k, 11, 50) for k in range(3)]
    metrics = evaluate_results(gt_file, detections(shifted), tmp_path / "out")
    assert metrics["segm"]["AP90"] == pytest.approx(100.0)  # mask IoU 49/51 = 0.96
    assert metrics["boundary"]["AP50"] == pytest.approx(100.0)
    assert metrics["boundary"]["AP90"] == pytest.approx(0.0) and metrics["boundary"]["AP"] < metrics["segm"]["AP"]
    # AP90 separates a 0.88 mask overlap from a 0.94 one, where AP75 (or an AP85) does not.
    cut = [square(200, 200, 10 + 60 * k, 10, 50, 50 - (6 if k else 3)) for k in range(3)]  # IoU 0.94, 0.88, 0.88
    metrics = evaluate_results(gt_file, detections(cut), None, iou_types=("segm",))
    assert metrics["segm"]["AP75"] == pytest.approx(100.0)
    assert 0 < metrics["segm"]["AP90"] < 50
    perfect = evaluate_results(gt_file, detections(gts), None)
    assert all(perfect[t][k] == pytest.approx(100.0) for t in ("segm", "boundary") for k in ("AP", "AP90"))
    table = format_metrics(perfect)
    assert "boundary" in table.splitlines()[0] and any(line.startswith("AP90") for line in table.splitlines())
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["boundary"]["AP90"] == 0.0


def test_box_only_results_have_no_boundary_ap(tmp_path):
    gt_file = write_coco(tmp_path / "gt.json", [square(60, 60, 5, 5, 20)])
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in detections([square(60, 60, 5, 5, 20)])]
    metrics = evaluate_results(gt_file, boxes, None)
    assert "boundary" not in metrics and "segm" not in metrics and metrics["bbox"]["AP90"] == pytest.approx(100.0)


def test_training_log_line_shows_ap90_and_boundary_ap(tmp_path, caplog):
    from maskrcnn.engine.metrics import MetricsWriter

    gts = [square(200, 200, 10, 10, 50)]
    metrics = evaluate_results(write_coco(tmp_path / "gt.json", gts), detections(gts), None)
    writer = MetricsWriter(tmp_path, 0)
    with caplog.at_level("INFO", logger="maskrcnn.engine.metrics"):
        writer.write_eval(10, metrics)
    writer.close()
    line = caplog.records[-1].getMessage()
    for t in ("bbox", "segm", "boundary"):
        assert f"{t}/AP 100.0, {t}/AP50 100.0, {t}/AP75 100.0, {t}/AP90 100.0" in line, line
    assert "APs" not in line and "per_category" not in line
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["eval"]["boundary"]["AP90"] == pytest.approx(100.0)
