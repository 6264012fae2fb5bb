"""Tiled inference (maskrcnn.tiling): windows, the cross-window merge, RLE masks, predict/eval end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn.api import load_model
from maskrcnn.cli import main
from maskrcnn.config import ConfigError, load_config
from maskrcnn.data.image_io import read_image
from maskrcnn.rle import rle_from_crop
from maskrcnn.serve.records import detection_records
from maskrcnn.structures import RLEMasks
from maskrcnn.tiling import (Detections, merge_detections, should_tile, tile_windows, window_detections,
                             window_starts)
from maskrcnn.visualize import draw_instances

# ---- windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, tile, overlap", [
    (2000, 2000, 208, 0.25), (300, 700, 128, 0.25), (129, 128, 128, 0.5), (1000, 333, 256, 0.0),
    (50, 400, 128, 0.25),  # one side shorter than a tile
])
def test_windows_cover_the_image_with_the_overlap(height: int, width: int, tile: int, overlap: float) -> None:
    windows = tile_windows(height, width, tile, overlap)
    covered = np.zeros((height, width), dtype=int)
    for y0, x0, y1, x1 in windows:
        assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
        assert (y1 - y0, x1 - x0) == (min(tile, height), min(tile, width))  # full windows only, no slivers
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    for length in (height, width):
        starts = window_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length
        shared = [a + tile - b for a, b in zip(starts, starts[1:])]  # pixels neighbours share
        assert all(s >= overlap * tile for s in shared), shared


def test_an_image_no_larger_than_a_tile_is_one_window() -> None:
    assert tile_windows(100, 128, 128, 0.25) == [(0, 0, 100, 128)]
    assert window_starts(128, 128, 0.9) == [0]


@pytest.mark.parametrize("enabled, threshold, size, tiled", [
    ("false", 0, (4000, 4000), False), ("true", 0, (100, 100), False), ("true", 0, (100, 129), True),
    ("auto", 0, (256, 256), False), ("auto", 0, (257, 100), True), ("auto", 1000, (999, 999), False),
])
def test_should_tile(enabled: str, threshold: int, size: tuple[int, int], tiled: bool) -> None:
    cfg = load_config("shapes", ["input.min_size_test=128", f"test.tiling.enabled={enabled}",
                                 f"test.tiling.threshold={threshold}"])
    assert cfg.test.tiling.tile_size == 0 and cfg.input.min_size_test == 128  # 0: tiles of the test size
    assert should_tile(cfg, *size) is tiled


def test_tiling_config_switch_and_bad_values() -> None:
    assert load_config(None).test.tiling.enabled == "false"  # off unless asked
    assert load_config(None, ["test.tiling.enabled=on"]).test.tiling.enabled == "true"  # YAML's booleans
    assert load_config(None, ["test.tiling.enabled=AUTO"]).test.tiling.enabled == "auto"
    for override, words in [("test.tiling.enabled=sometimes", "true, false or auto"),
                            ("test.tiling.overlap=1.0", "0 <= overlap < 1"),
                            ("test.tiling.tile_size=16", "at least 32"),
                            ("test.tiling.merge_threshold=0", "(0, 1]"),
                            ("test.tiling.tile=256", "did you mean 'test.tiling.tile_size'")]:
        with pytest.raises(ConfigError, match=None) as err:
            load_config(None, [override])
        assert words in str(err.value), str(err.value)


# ---- RLE masks ----------------------------------------------------------------------------------


def test_rle_from_crop_equals_encoding_the_whole_image() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = rng.random((h, w)) < rng.random()
        full = np.zeros((height, width), dtype=np.uint8)
        full[y0:y0 + h, x0:x0 + w] = crop
        expected = mask_util.encode(np.asfortranarray(full))["counts"].decode("ascii")
        assert rle_from_crop(crop, y0, x0, height, width) == {"size": [height, width], "counts": expected}


def _rle_masks(*rects: tuple[int, int, int, int], height: int = 60, width: int = 80) -> tuple[RLEMasks, np.ndarray]:
    dense = np.zeros((len(rects), height, width), dtype=bool)
    for m, (x0, y0, x1, y1) in zip(dense, rects):
        m[y0:y1, x0:x1] = True
    rles = [rle_from_crop(m[y0:y1, x0:x1], y0, x0, height, width) for m, (x0, y0, x1, y1) in zip(dense, rects)]
    return RLEMasks(rles, height, width), dense


def test_rle_masks_index_like_a_tensor_and_draw_like_dense_masks() -> None:
    masks, dense = _rle_masks((5, 5, 30, 40), (40, 10, 75, 50), (20, 30, 60, 58))
    assert masks.shape == dense.shape and len(masks[1:]) == 2
    assert np.array_equal(masks[2], dense[2]) and np.array_equal(masks.numpy(), dense)
    assert np.array_equal(masks[torch.tensor([True, False, True])].numpy(), dense[[0, 2]])
    output = {"boxes": torch.tensor([[5.0, 5, 30, 40], [40, 10, 75, 50], [20, 30, 60, 58]]),
              "scores": torch.tensor([0.9, 0.3, 0.8]), "labels": torch.tensor([1, 2, 1])}
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    drawn = np.asarray(draw_instances(image, {**output, "masks": masks}, ["a", "b"]))
    assert np.array_equal(drawn, np.asarray(draw_instances(image, {**output, "masks": torch.from_numpy(dense)}, ["a", "b"])))
    records = detection_records({**output, "masks": masks}, [1, 2])
    assert [r["mask"] for r in records] == masks.rles


# ---- the merge, on hand-made detections ---------------------------------------------------------


def _detections(*items: dict) -> Detections:
    """Detections from dicts: box (xyxy, whole pixels), score, label, window, cut; the mask fills the box
    unless `mask` (a bool array the box's size) is given."""
    masks = []
    for d in items:
        x0, y0, x1, y1 = d["box"]
        masks.append((d.get("mask", np.ones((y1 - y0, x1 - x0), dtype=bool)), y0, x0))
    return Detections(
        boxes=torch.tensor([d["box"] for d in items], dtype=torch.float32),
        scores=torch.tensor([d["score"] for d in items]), labels=torch.tensor([d.get("label", 1) for d in items]),
        cut=torch.tensor([d.get("cut", False) for d in items]), window=torch.tensor([d["window"] for d in items]),
        masks=masks)


def test_an_object_cut_by_a_border_is_reported_once_whole() -> None:
    # A 20x20 square at x 90..110: window 0 ends at x = 100 and sees its left half (cut, and scored
    # higher), window 1 sees it whole. A 2-px sliver of it in a third window has IoU 0.1 with the whole.
    dets = _detections({"box": (90, 40, 100, 60), "score": 0.9, "window": 0, "cut": True},
                       {"box": (90, 40, 110, 60), "score": 0.7, "window": 1},
                       {"box": (108, 40, 110, 60), "score": 0.95, "window": 2, "cut": True})
    assert merge_detections(dets, 0.5).tolist() == [1]


def test_two_nearby_objects_stay_two() -> None:
    # Same class, from neighbouring windows, boxes overlapping (the regression is loose) but the masks
    # (a circle-ish blob each) do not: two objects. The window-1 one is cut by an inner border.
    left = np.zeros((20, 20), dtype=bool)
    left[2:18, 2:16] = True
    right = np.zeros((20, 20), dtype=bool)
    right[2:18, 5:18] = True
    dets = _detections({"box": (80, 40, 100, 60), "score": 0.8, "window": 0, "mask": left},
                       {"box": (94, 40, 114, 60), "score": 0.9, "window": 1, "mask": right, "cut": True})
    assert sorted(merge_detections(dets, 0.5).tolist()) == [0, 1]


def test_merge_leaves_one_windows_detections_and_other_classes_alone() -> None:
    dets = _detections({"box": (10, 10, 30, 30), "score": 0.9, "window": 0},
                       {"box": (10, 10, 30, 30), "score": 0.6, "window": 0},  # the model's own NMS kept both
                       {"box": (10, 10, 30, 30), "score": 0.8, "window": 1, "label": 2},  # another class
                       {"box": (12, 10, 30, 30), "score": 0.7, "window": 1})  # a duplicate from window 1
    assert merge_detections(dets, 0.5).tolist() == [0, 2, 1]  # by score; the window-1 duplicate dropped


def test_merge_of_box_only_detections_compares_boxes() -> None:
    dets = _detections({"box": (90, 40, 100, 60), "score": 0.9, "window": 0, "cut": True},
                       {"box": (90, 40, 110, 60), "score": 0.7, "window": 1},
                       {"box": (111, 40, 130, 60), "score": 0.6, "window": 1})
    dets.masks = None
    assert merge_detections(dets, 0.5).tolist() == [1, 2]


def test_window_detections_move_boxes_masks_and_keypoints_to_the_image() -> None:
    masks = torch.zeros(3, 50, 60, dtype=torch.bool)
    masks[0, 10:20, 5:25] = True
    masks[1, 40:50, 50:60] = True  # reaches the window's bottom-right corner
    masks[2, 45:50, 30:40] = True  # reaches its bottom only
    output = {"boxes": torch.tensor([[5.0, 10, 25, 20], [50, 40, 60, 50], [30, 45, 40, 50]]),
              "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 3, 2]), "masks": masks,
              "keypoints": torch.tensor([[[7.0, 12, 1], [20, 15, 1]], [[55, 45, 1], [59, 49, 0]], [[35, 47, 1]] * 2]),
              "keypoint_scores": torch.ones(3, 2)}
    # The window (y 100..150, x 200..260) in a 150 x 300 image: its bottom border is the image's edge.
    dets = window_detections(output, (100, 200, 150, 260), 3, 150, 300)
    assert dets.boxes.tolist() == [[205, 110, 225, 120], [250, 140, 260, 150], [230, 145, 240, 150]]
    # The second touches the inner border at x = 260; the third only the image's bottom edge: not cut.
    assert dets.cut.tolist() == [False, True, False]
    assert dets.window.tolist() == [3, 3, 3]
    (crop0, y0, x0), (crop1, y1, x1), _ = dets.masks
    assert (y0, x0, crop0.shape, bool(crop0.all())) == (110, 205, (10, 20), True)
    assert (y1, x1, crop1.shape) == (140, 250, (10, 10))
    assert dets.masks[2][1:] == (145, 230)
    assert dets.keypoints[0].tolist() == [[207, 112, 1], [220, 115, 1]]
    assert dets.keypoints[1, 1].tolist() == [259, 149, 0]  # visibility kept


# ---- end to end with the tiny test model ---------------------------------------------------------

TILED = ["test.tiling.enabled=true", "test.tiling.tile_size=128", "test.tiling.overlap=0.25"]


def test_tiled_predict_returns_each_windows_detections_in_image_coordinates(checkpoint) -> None:
    """Every tiled detection is one of some window's own detections (model run on that crop), moved by
    the window's offset: box, score, label and mask."""
    model = load_model(None, checkpoint, TILED)
    image = torch.rand(3, 200, 260, generator=torch.Generator().manual_seed(0))
    out = model.predict(image)[0]
    masks = out["masks"]
    assert isinstance(masks, RLEMasks) and masks.shape == (len(out["boxes"]), 200, 260)
    assert len(out["boxes"]) == model.cfg.model.box_head.detections_per_image  # capped as without tiling
    assert bool((out["scores"][:-1] >= out["scores"][1:]).all())
    windows = tile_windows(200, 260, 128, 0.25)
    assert len(windows) == 6
    with torch.no_grad():
        direct = [model([image[:, y0:y1, x0:x1]])[0] for y0, x0, y1, x1 in windows]
    sources = set()
    for i, box in enumerate(out["boxes"]):
        found = None
        for w, ((y0, x0, y1, x1), d) in enumerate(zip(windows, direct)):
            moved = d["boxes"] + torch.tensor([x0, y0, x0, y0])
            hits = torch.nonzero((moved - box).abs().max(dim=1).values < 1e-3).flatten()
            hits = [j for j in hits.tolist() if float(d["scores"][j]) == float(out["scores"][i])]
            if hits:
                found = (w, hits[0])
                break
        assert found is not None, f"detection {i} ({box.tolist()}) is no window's detection moved to the image"
        w, j = found
        y0, x0, y1, x1 = windows[w]
        assert int(out["labels"][i]) == int(direct[w]["labels"][j])
        expected = np.zeros((200, 260), dtype=bool)
        expected[y0:y1, x0:x1] = direct[w]["masks"][j].numpy()
        assert np.array_equal(masks[i], expected)
        sources.add(w)
    assert len(sources) >= 2 and any(windows[w][:2] != (0, 0) for w in sources)  # offsets were exercised


def test_tiled_predict_and_eval_from_the_command_line(checkpoint, shapes, tmp_path) -> None:
    image = np.random.default_rng(1).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "large.png")
    out = tmp_path / "predict"
    assert main(["predict", str(tmp_path / "large.png"), *TILED, "--weights", str(checkpoint), "--out", str(out),
                 "--score-threshold", "0"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == 10  # the checkpoint's detections_per_image
    for r in results:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 200 + 1e-3 and y + h <= 150 + 1e-3
        assert r["segmentation"]["size"] == [150, 200]
    assert Image.open(out / "large.png").size == (200, 150)
    # eval: 48-px shapes images in 32-px windows (4 each); the files and numbers come out as usual
    ann, images = shapes["val"]
    eval_out = tmp_path / "eval"
    assert main(["eval", "--weights", str(checkpoint), "--data", f"{ann}:{images}", "--out", str(eval_out),
                 "test.tiling.enabled=true", "test.tiling.tile_size=32"]) == 0
    predictions = json.loads((eval_out / "predictions.json").read_text())
    assert predictions and all(p["segmentation"]["size"] == [48, 48] for p in predictions)
    assert "bbox" in json.loads((eval_out / "metrics.json").read_text())
    # the same detections as the Python API's tiled predict on that image
    first = json.loads(ann.read_text())["images"][0]
    expected = load_model(None, checkpoint, ["test.tiling.enabled=true", "test.tiling.tile_size=32"]).predict(
        read_image(images / first["file_name"]))[0]
    scores = [p["score"] for p in predictions if p["image_id"] == first["id"]]
    assert scores == pytest.approx(expected["scores"].tolist(), abs=1e-6)
    assert [p["segmentation"] for p in predictions if p["image_id"] == first["id"]] == expected["masks"].rles


def test_tiled_predict_with_an_exported_model(checkpoint, tmp_path) -> None:
    """ONNX Runtime runs the windows; test.tiling.* overrides apply to an exported model (others do not)."""
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    image = np.random.default_rng(2).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "large.png")
    runs = {}
    for backend, weights in (("pytorch", checkpoint), ("onnxruntime", onnx_path)):
        out = tmp_path / backend
        assert main(["predict", str(tmp_path / "large.png"), *TILED, "--weights", str(weights), "--backend", backend,
                     "--out", str(out), "--score-threshold", "0"]) == 0
        runs[backend] = sorted(json.loads((out / "predictions.json").read_text()), key=lambda r: -r["score"])
    assert len(runs["pytorch"]) == len(runs["onnxruntime"]) == 10
    for a, b in zip(runs["pytorch"], runs["onnxruntime"]):
        assert abs(a["score"] - b["score"]) < 1e-4 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 0.05
    assert main(["predict", str(tmp_path / "large.png"), "model.num_classes=5", "--weights", str(onnx_path),
                 "--backend", "onnxruntime", "--out", str(tmp_path / "x")]) == 2


# ---- tiled eval against hand-made ground truth --------------------------------------------------


class ColourFinder(torch.nn.Module):
    """A stand-in detector that is exact by construction: each connected blob of pure red, green or blue
    (labels 1, 2, 3) in the image it is given, its mask, its pixel box, score 0.5 + area / 1000.

    What it finds in a window is therefore known by hand, so tiled inference through it must give back
    the blobs of the whole image: a window offset, a cut or a merge gone wrong moves, splits or doubles one.
    """

    def __init__(self, overrides: list[str]):
        super().__init__()
        self.cfg = load_config("shapes", overrides)
        self.calls: list[tuple[int, int]] = []

    def forward(self, images):
        from scipy import ndimage

        outputs = []
        for image in images:
            self.calls.append(tuple(image.shape[-2:]))
            boxes, scores, labels, masks = [], [], [], []
            for channel in range(3):
                pure = (image[channel] > 0.5) & (image.sum(0) < 1.5)
                components, count = ndimage.label(pure.numpy())
                for k in range(1, count + 1):
                    mask = torch.from_numpy(components == k)
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
                    scores.append(0.5 + int(mask.sum()) / 1000)
                    labels.append(channel + 1)
                    masks.append(mask)
            h, w = image.shape[-2:]
            outputs.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.tensor(scores),
                            "labels": torch.tensor(labels, dtype=torch.long),
                            "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)})
        return outputs


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2
def test_tiled_eval_finds_hand_placed_objects_across_window_borders(tmp_path) -> None:
    """A 100 x 120 image in 48-px windows with overlap 0.25: by hand, rows start at 0, 26, 52 and columns at
    0, 36, 72 (windows overlap in rows 26..47, 52..73 and columns 36..47, 72..83). Four objects: a disc
    across the column border x = 48, a square lying whole in two rows of windows, a bar across the row
    border y = 48 in the column overlap, and a square in the last window only. Tiled eval must report each
    once, exactly (box and mask), so pycocotools scores AP 100 on the hand-made ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.evaluator import evaluate

    height, width = 100, 120
    yy, xx = np.mgrid[:height, :width]
    objects = [  # (label, mask)
        (1, (yy - 15) ** 2 + (xx - 47) ** 2 <= 25),  # disc: x 42..52, cut by the first column's end at 48
        (2, (yy >= 30) & (yy < 40) & (xx >= 5) & (xx < 15)),  # whole in windows of rows 0 and 26
        (3, (yy >= 44) & (yy < 56) & (xx >= 75) & (xx < 83)),  # across y = 48, in the column overlap
        (1, (yy >= 80) & (yy < 95) & (xx >= 100) & (xx < 115)),  # in the bottom-right window only
    ]
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    annotations = []
    for i, (label, mask) in enumerate(objects):
        pixels[mask, label - 1] = 255
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({"id": i + 1, "image_id": 7, "category_id": label, "iscrowd": 0,
                            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                     int(ys.max() - ys.min() + 1)],
                            "area": int(mask.sum()), "segmentation": {"size": [height, width],
                                                                      "counts": rle["counts"].decode()}})
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "mosaic.png")
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "mosaic.png", "height": height, "width": width}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"}]}))

    finder = ColourFinder(["test.tiling.enabled=true", "test.tiling.tile_size=48", "test.tiling.overlap=0.25"])
    metrics = evaluate(finder, CocoDataset(ann, tmp_path / "images"), tmp_path / "eval", progress=False)
    assert finder.calls == [(48, 48)] * 9  # tiled: nine windows, never the whole image
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    by_box = sorted(predictions, key=lambda p: p["bbox"])
    expected = sorted(annotations, key=lambda a: a["bbox"])
    assert [(p["category_id"], p["bbox"]) for p in by_box] == [(a["category_id"], a["bbox"]) for a in expected]
    for p, a in zip(by_box, expected):
        assert np.array_equal(mask_util.decode(p["segmentation"]), mask_util.decode(a["segmentation"])), a["bbox"]
    # pycocotools itself, on the files: AP 100 for boxes and masks (and the evaluator's numbers say so too).
    gt = COCO(str(ann))
    for iou_type in ("bbox", "segm"):
        cocoeval = COCOeval(gt, gt.loadRes(str(tmp_path / "eval" / "predictions.json")), iou_type)
        cocoeval.evaluate(), cocoeval.accumulate(), cocoeval.summarize()
        assert cocoeval.stats[0] == pytest.approx(1.0) and metrics[iou_type]["AP"] == pytest.approx(100.0)
