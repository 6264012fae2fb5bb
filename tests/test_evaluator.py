"""The evaluator's numbers must be pycocotools' own, on a hand-made set with every kind of mistake."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from support import drawn_in
from maskrcnn.engine.coco_results import predictions_to_coco
from maskrcnn.engine.evaluator import (
    STAT_NAMES,
    evaluate,
    evaluate_results,
    format_metrics,
)
from maskrcnn.errors import UserError

H, W = 160, 160
CAT_IDS = [3, 7, 11]  # non-contiguous on purpose: labels 1..3 map to these
CAT_NAMES = ["square", "disc", "unseen"]  # "unseen" has ground truth but never any detection


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def disc(cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def gt_ann(ann_id: int, image_id: int, cat: int, m: np.ndarray, iscrowd: int = 0) -> dict:
    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    x, y, w, h = mask_util.toBbox(rle).tolist()
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": rle,
            "area": float(mask_util.area(rle)), "bbox": [x, y, w, h], "iscrowd": iscrowd}


# Ground-truth instances: (image_id, label 1..3, mask, iscrowd). Small, medium and large objects.
GT = [
    (1, 1, rect(10, 10, 30, 30), 0),  # small square
    (1, 2, disc(100, 100, 30), 0),  # large-ish disc
    (1, 3, rect(60, 5, 100, 45), 0),  # "unseen": never detected
    (2, 1, rect(20, 20, 70, 70), 0),  # medium square, missed entirely
    (2, 2, disc(120, 40, 12), 0),  # medium disc
    (2, 1, rect(90, 90, 150, 150), 1),  # crowd region: detections inside are ignored, not FPs
    (3, 1, rect(5, 5, 125, 125), 0),  # large square
    (3, 2, disc(140, 140, 10), 0),
]


def write_gt(path: Path) -> Path:
    """Write the hand-made COCO ground truth to `path`."""
    anns = [gt_ann(i + 1, img, CAT_IDS[lab - 1], m, crowd) for i, (img, lab, m, crowd) in enumerate(GT)]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3)],
        "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, CAT_NAMES)],
        "annotations": anns,
    }
    path.write_text(json.dumps(data))
    return path


def output_from(dets: list[tuple[int, float, np.ndarray]]) -> dict:
    """A model output dict from (label, score, mask) triples; boxes are the masks' tight xyxy boxes."""
    if not dets:
        return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, H, W, dtype=torch.bool)}
    masks = torch.from_numpy(np.stack([m for _, _, m in dets]))
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor([s for _, s, _ in dets]),
            "labels": torch.tensor([lab for lab, _, _ in dets]), "masks": masks}


def shift(m: np.ndarray, dx: int, dy: int) -> np.ndarray:
    return np.roll(np.roll(m, dy, axis=0), dx, axis=1)


# Detections per image: perfect, shifted, duplicated, false positive, inside the crowd, missing.
DETS = {
    1: [(1, 0.90, rect(10, 10, 30, 30)),  # perfect
        (1, 0.70, rect(11, 10, 31, 30)),  # duplicate of the same square: a false positive
        (2, 0.80, shift(disc(100, 100, 30), 6, 4))],  # shifted: IoU ~0.75, fails the strict IoUs
    2: [(2, 0.85, disc(120, 40, 12)),  # perfect
        (1, 0.95, rect(0, 120, 20, 150)),  # false positive on background, highest score
        (1, 0.60, rect(95, 95, 140, 140))],  # inside the crowd region: ignored
    3: [(1, 0.99, disc(65, 65, 60)),  # right box, round mask: scores differently for boxes and masks
        (2, 0.50, disc(140, 140, 10)),
        (2, 0.40, disc(140, 140, 10))],  # exact duplicate at lower score
}


def make_results() -> list[dict]:
    results = []
    for image_id, dets in DETS.items():
        results += predictions_to_coco(output_from(dets), image_id, CAT_IDS)
    return results


def reference(gt_file: Path, res_file: Path, iou_type: str) -> COCOeval:
    """COCOeval run directly on the files, the way torchvision's and Detectron2's references do."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        anns = json.loads(res_file.read_text())
        if iou_type == "segm":
            for a in anns:
                a.pop("bbox")  # mask results carry only the mask, so areas are mask areas
        ev = COCOeval(gt, gt.loadRes(anns), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    gt = write_gt(tmp_path / "gt.json")
    res = tmp_path / "results.json"
    res.write_text(json.dumps(make_results()))
    return gt, res


def assert_stats_equal(ours: dict, stats: np.ndarray) -> None:
    for name, ref in zip(STAT_NAMES, stats):
        if ref < 0:
            assert math.isnan(ours[name]), name
        else:
            assert abs(ours[name] - ref * 100) < 1e-9, (name, ours[name], ref * 100)


def test_equals_cocoeval_on_hand_made_set(files: tuple[Path, Path], tmp_path: Path) -> None:
    gt_file, res_file = files
    out = tmp_path / "out"
    metrics = evaluate_results(str(gt_file), str(res_file), out)
    for iou_type in ("bbox", "segm"):
        ref = reference(gt_file, res_file, iou_type)
        assert_stats_equal(metrics[iou_type], ref.stats)
        # Per-category AP from the same precision array.
        for k, cat_id in enumerate(ref.params.catIds):
            p = ref.eval["precision"][:, :, k, 0, -1]
            name = CAT_NAMES[CAT_IDS.index(cat_id)]
            assert abs(metrics["per_category"][iou_type][name] - p[p > -1].mean() * 100) < 1e-9
        assert metrics["per_category"][iou_type]["unseen"] == 0.0
        # The set is built so that the numbers are informative, neither 0 nor 100.
        assert 0 < metrics[iou_type]["AP"] < 100
        # AP90: the IoU 0.90 slice of the same precision array (all sizes, most detections).
        p = ref.eval["precision"][list(np.round(ref.params.iouThrs, 2)).index(0.9), :, :, 0, -1]
        assert abs(metrics[iou_type]["AP90"] - p[p > -1].mean() * 100) < 1e-9
        assert list(metrics[iou_type])[:5] == ["AP", "AP50", "AP75", "AP90", "APs"]
    assert metrics["bbox"]["AP"] != metrics["segm"]["AP"]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"bbox", "segm", "boundary", "per_category"}
    for colour in ("C0", "C1", "C2"):  # IoU .5, .75, .5:.95: each curve runs between precision 0.3 and 0.7, never 1
        assert drawn_in(out / "pr_curve.png", colour, rows=(0.25, 0.65)).sum() > 300
        assert not drawn_in(out / "pr_curve.png", colour, rows=(0.0, 0.2)).any()
    table = format_metrics(metrics)
    assert "AP50" in table and "unseen" in table and "segm" in table


def test_accepts_loaded_objects_and_does_not_mutate(files: tuple[Path, Path]) -> None:
    gt_file, res_file = files
    results = json.loads(res_file.read_text())
    before = json.dumps(results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
    metrics = evaluate_results(gt, results, None)
    assert json.dumps(results) == before
    assert_stats_equal(metrics["bbox"], reference(gt_file, res_file, "bbox").stats)


def test_image_subset_matches_cocoeval_img_ids(files: tuple[Path, Path]) -> None:
    gt_file, res_file = files
    results = [r for r in json.loads(res_file.read_text()) if r["image_id"] in (1, 3)]
    metrics = evaluate_results(gt_file, results, None, iou_types=("bbox",), image_ids=[3, 1])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = [1, 3]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert_stats_equal(metrics["bbox"], ev.stats)
    assert "segm" not in metrics


def test_perfect_results_give_100(tmp_path: Path) -> None:
    gt_file = write_gt(tmp_path / "gt.json")
    results = []
    for img in (1, 2, 3):
        dets = [(lab, 1.0, m) for i, lab, m, crowd in GT if i == img and not crowd]
        results += predictions_to_coco(output_from(dets), img, CAT_IDS)
    metrics = evaluate_results(gt_file, results, None)
    for t in ("bbox", "segm"):
        assert metrics[t]["AP"] == pytest.approx(100.0)
        assert metrics[t]["AR100"] == pytest.approx(100.0)


def test_empty_results_give_zero(tmp_path: Path) -> None:
    gt_file = write_gt(tmp_path / "gt.json")
    metrics = evaluate_results(gt_file, [], tmp_path / "out")
    for t in ("bbox", "segm"):
        assert metrics[t]["AP"] == 0.0 and metrics[t]["AR100"] == 0.0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox"]["AP"] == 0.0


def test_box_only_results_skip_segm(files: tuple[Path, Path]) -> None:
    gt_file, res_file = files
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in json.loads(res_file.read_text())]
    metrics = evaluate_results(gt_file, results, None)
    assert "segm" not in metrics and "bbox" in metrics


def test_bad_inputs_are_user_errors(files: tuple[Path, Path], tmp_path: Path) -> None:
    gt_file, res_file = files
    with pytest.raises(UserError, match="does not exist"):
        evaluate_results(tmp_path / "missing.json", res_file, None)
    with pytest.raises(UserError, match="image ids"):
        evaluate_results(gt_file, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}], None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        evaluate_results(gt_file, bad, None)


def test_predictions_to_coco_round_trip() -> None:
    m0, m1 = rect(10, 20, 40, 60), disc(80, 80, 15)
    out = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [65.0, 65.0, 96.0, 96.0]]),
           "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([3, 1]),
           "masks": torch.from_numpy(np.stack([m0, m1]))}
    res = predictions_to_coco(out, 42, CAT_IDS)
    assert [r["category_id"] for r in res] == [11, 3]
    assert res[0]["bbox"] == [10.0, 20.0, 30.0, 40.0]
    assert res[0]["image_id"] == 42 and res[1]["score"] == pytest.approx(0.3)
    json.dumps(res)  # counts are str, so this is serialisable
    for r, m in zip(res, (m0, m1)):
        decoded = mask_util.decode({"size": r["segmentation"]["size"],
                                    "counts": r["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), m)
    # torchvision-style soft masks [D,1,H,W] give the same RLE as their 0.5 threshold.
    soft = dict(out, masks=out["masks"].float().unsqueeze(1) * 0.8)
    assert [r["segmentation"] for r in predictions_to_coco(soft, 42, CAT_IDS)] == [r["segmentation"] for r in res]
    assert predictions_to_coco(output_from([]), 1, CAT_IDS) == []
    no_masks = {k: v for k, v in out.items() if k != "masks"}
    assert "segmentation" not in predictions_to_coco(no_masks, 1, CAT_IDS)[0]


class OracleModel(torch.nn.Module):
    """Returns the ground truth of the image it is given (looked up by the image's first pixel)."""

    def __init__(self, outputs: list[dict]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.outputs = outputs

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        assert not self.training and not torch.is_grad_enabled()
        return [self.outputs[int(img[0, 0, 0].item())] for img in images]


class TinyDataset:
    def __init__(self, gt_file: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(gt_file))
        self.category_ids = CAT_IDS
        self.image_ids = [1, 2, 3]

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image = torch.full((3, H, W), float(i))
        return image, {"image_id": self.image_ids[i]}


def test_evaluate_runs_model_and_restores_training_mode(tmp_path: Path) -> None:
    gt_file = write_gt(tmp_path / "gt.json")
    outputs = [output_from([(lab, 1.0, m) for img, lab, m, crowd in GT if img == i and not crowd])
               for i in (1, 2, 3)]
    model = OracleModel(outputs).train()
    metrics = evaluate(model, TinyDataset(gt_file), tmp_path / "out", progress=False)
    assert model.training
    assert metrics["bbox"]["AP"] == pytest.approx(100.0) and metrics["segm"]["AP"] == pytest.approx(100.0)
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(preds) == sum(1 for *_, crowd in GT if not crowd)
    # max_images evaluates only the images that were run: image 1 alone is still perfect.
    metrics = evaluate(model, TinyDataset(gt_file), None, max_images=1, progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)


class InterruptedModel(OracleModel):
    """The oracle, stopped by Ctrl-C at its call number `stop` (never, by default); counts its calls."""

    def __init__(self, outputs: list[dict], stop: int = 0) -> None:
        super().__init__(outputs)
        self.calls, self.stop = 0, stop

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return super().forward(images)


def test_evaluate_streams_detections_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt_file = write_gt(tmp_path / "gt.json")
    outputs = [output_from(DETS[i]) for i in (1, 2, 3)]  # imperfect: the numbers tell runs apart
    whole = evaluate(InterruptedModel(outputs), TinyDataset(gt_file), tmp_path / "whole", progress=False)
    lines = (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_id"] for line in lines] == [1, 2, 3]

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the third image: two are on disk
        evaluate(InterruptedModel(outputs, stop=3), TinyDataset(gt_file), out, progress=False)
    log = out / "predictions.jsonl"
    assert log.read_text().splitlines() == lines[:2] and not (out / "predictions.json").exists()
    log.write_bytes(log.read_bytes()[:-10])  # ... and the second line was cut short by a crash

    model = InterruptedModel(outputs)
    metrics = evaluate(model, TinyDataset(gt_file), out, progress=False, resume=True)
    assert model.calls == 2  # images 2 and 3 only
    assert "incomplete last line" in capsys.readouterr().err
    assert metrics == whole
    assert (out / "predictions.json").read_bytes() == (tmp_path / "whole" / "predictions.json").read_bytes()
    assert log.read_text().splitlines() == lines

    # All done already: nothing runs, same numbers.
    model = InterruptedModel(outputs)
    assert evaluate(model, TinyDataset(gt_file), out, progress=False, resume=True) == whole and model.calls == 0
    # A log from other images (here: evaluated on the first image only, resumed on none) is refused.
    with pytest.raises(UserError, match="not among the images evaluated"):
        evaluate(InterruptedModel(outputs), TinyDataset(gt_file), out, max_images=1, progress=False, resume=True)
    with pytest.raises(UserError, match="--resume"):
        evaluate(InterruptedModel(outputs), TinyDataset(gt_file), None, progress=False, resume=True)
