"""A Detectron2 checkpoint through our command line: Detectron2's own outputs, evaluation, fine-tuning.

The fixture (../shared/fixtures/detectron2-r18-fpn, see its README) holds a random-weight R18-FPN
checkpoint in Detectron2's model-zoo format, Detectron2's resolved config and its outputs on three
images. Its boxes are often slivers a fraction of a pixel high, so agreeing masks need agreeing
arithmetic, not just agreeing algorithms. A second fixture (detectron2-cascade-r50thin-fpn) is the
same for Detectron2's Cascade Mask R-CNN (a thin R50-FPN, three box stages); three more cover the
rest of Detectron2's Mask R-CNN / Keypoint R-CNN zoo: DC5 (dilated res5, single-level heads),
deformable convolutions in res3-res5 (random offsets) and Keypoint R-CNN.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from maskrcnn.checkpoint import load_checkpoint
from maskrcnn.cli import main
from maskrcnn.config import load_config
from maskrcnn.engine.compare import Tolerances, detection_differences, mask_ious, match_detections

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "detectron2-r18-fpn"
CASCADE_FIXTURE = FIXTURE.parent / "detectron2-cascade-r50thin-fpn"
DC5_FIXTURE = FIXTURE.parent / "detectron2-r50thin-dc5"
DCONV_FIXTURE = FIXTURE.parent / "detectron2-r50thin-dconv-fpn"
KEYPOINT_FIXTURE = FIXTURE.parent / "detectron2-keypoint-r50thin-fpn"
# Outputs of a model Detectron2 made, run here: every detection paired in order of score.
STRICT = Tolerances(box=0.01, score=1e-4, mask_iou=0.99)
pytestmark = [
    pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"parity fixture not found at {FIXTURE}"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools + numpy 2
]


BOXES = Tolerances(box=0.05, score=1e-4, mask_iou=0.0)  # masks are compared on their own, below


def _detections(boxes: list, scores: list, labels: list, rles: list | None,
                keypoints: list | None = None) -> dict[str, torch.Tensor]:
    """Return one image's detections as the tensors `detection_differences` compares (masks, keypoints if any)."""
    out = {"boxes": torch.tensor(boxes, dtype=torch.float64), "scores": torch.tensor(scores),
           "labels": torch.tensor(labels)}
    if rles is not None:
        out["masks"] = torch.from_numpy(np.stack([mask_util.decode(rle) for rle in rles]).astype(bool))
    if keypoints is not None:
        out["keypoints"] = torch.tensor(keypoints, dtype=torch.float64).reshape(len(boxes), -1, 3)
    return out


def predict_like_detectron2(fixture: Path, out: Path) -> list[tuple[str, dict, dict]]:
    """Run `maskrcnn predict --config config.yaml --weights model.pkl` on a fixture's images.

    Return per image (name, Detectron2's detections, ours), with the same number of each.
    """
    images = sorted((fixture / "images").glob("*.png"))
    code = main(["predict", *map(str, images), "--config", str(fixture / "config.yaml"),
                 "--weights", str(fixture / "model.pkl"), "--score-threshold", "0", "--out", str(out)])
    assert code == 0
    expected = json.loads((fixture / "expected.json").read_text())
    coco_ids = load_config(str(fixture / "config.yaml")).model.category_ids  # contiguous class c -> COCO id
    results = json.loads((out / "predictions.json").read_text())
    pairs = []
    for path in images:
        exp = expected[path.name]
        ours = [r for r in results if Path(r["file_name"]).name == path.name]
        assert len(ours) == len(exp["boxes"]), path.name
        assert all(r["segmentation"]["size"] == [exp["height"], exp["width"]] for r in ours if "masks" in exp), path.name
        theirs = _detections(exp["boxes"], exp["scores"], [coco_ids[c] for c in exp["classes"]], exp.get("masks"),
                             exp.get("keypoints"))
        # predictions.json holds COCO keypoints (x, y less the half pixel, score): back to Detectron2's x, y.
        keypoints = [[v + 0.5 if i % 3 < 2 else v for i, v in enumerate(r["keypoints"])] for r in ours
                     ] if "keypoints" in exp else None
        mine = _detections([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in ours)],
                           [r["score"] for r in ours], [r["category_id"] for r in ours],
                           [r["segmentation"] for r in ours] if "masks" in exp else None, keypoints)
        pairs.append((path.name, theirs, mine))
    return pairs


def test_predict_cli_reproduces_detectron2(tmp_path):
    for name, theirs, mine in predict_like_detectron2(FIXTURE, tmp_path / "predict"):
        # On the CPU that made the fixture every detection agrees in order to 2e-4 px and every mask is
        # identical. These random weights make sub-pixel slivers, scores tied to ~1e-5 and mask
        # probabilities hovering at the 0.5 threshold, so another CPU's rounding (AVX2 against AVX-512)
        # may swap two tied detections, move a sliver by ~0.05 px and flip a few edge pixels of a small
        # mask (seen: up to 35 of 128). So: boxes and scores paired by value, at most 3 in 100 going
        # either way; masks nearly all the same (median IoU 0.99), none far off (a pixel's shift
        # of a whole mask would be).
        assert detection_differences(theirs, mine, BOXES, min_matched=0.97) == [], name
        partner = match_detections(theirs, mine, BOXES)
        paired = partner >= 0
        ious = mask_ious(theirs["masks"][paired], mine["masks"][partner[paired]])
        assert float(ious.median()) >= 0.99 and float(ious.min()) >= 0.75, (name, ious.sort().values[:5])


@pytest.mark.skipif(not CASCADE_FIXTURE.is_dir(), reason=f"cascade fixture not found at {CASCADE_FIXTURE}")
def test_predict_cli_reproduces_detectron2_cascade(tmp_path):
    """Detectron2's Cascade Mask R-CNN config and .pkl: the same 100 detections per image.

    Measured on an AVX-512 CPU (2026-12-01): boxes within 4e-6 px, scores within 6e-8, every mask
    identical. The thin R50's boxes are not the R18 fixture's sub-pixel slivers, so the strict
    tolerances hold here: every detection paired, box within 0.01 px, score within 1e-4, mask IoU >= 0.99.
    """
    for name, theirs, mine in predict_like_detectron2(CASCADE_FIXTURE, tmp_path / "predict"):
        assert detection_differences(theirs, mine, STRICT) == [], name


def test_serve_answers_with_detectron2s_cascade_detections():
    """`maskrcnn serve`'s answer for the Cascade fixture's smallest image is Detectron2's own: the served
    boxes, scores and COCO ids, and the served RLE masks decoded by pycocotools against Detectron2's RLEs
    (the cascade and serve tests elsewhere compare with our own `model.predict`)."""
    import httpx

    from maskrcnn.api import load_model
    from maskrcnn.serve import create_app
    from support import Running

    assert CASCADE_FIXTURE.is_dir(), f"cascade fixture not found at {CASCADE_FIXTURE}"
    model = load_model(str(CASCADE_FIXTURE / "config.yaml"), CASCADE_FIXTURE / "model.pkl")
    coco_ids = model.cfg.model.category_ids
    name = "chelsea_333x517.png"
    expected = json.loads((CASCADE_FIXTURE / "expected.json").read_text())[name]
    running = Running(create_app(model, score_threshold=0.0))
    try:
        response = httpx.post(f"{running.url}/predict", timeout=120,
                              files={"file": (name, (CASCADE_FIXTURE / "images" / name).read_bytes(), "image/png")})
    finally:
        running.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["height"], body["width"]) == (expected["height"], expected["width"])
    served = body["detections"]
    assert len(served) == len(expected["boxes"]) == 100
    assert all(d["category_id"] == coco_ids[d["label"] - 1] for d in served)
    theirs = _detections(expected["boxes"], expected["scores"], [coco_ids[c] for c in expected["classes"]],
                         expected["masks"])
    mine = _detections([d["box"] for d in served], [d["score"] for d in served], [d["category_id"] for d in served],
                       [d["mask"] for d in served])
    assert detection_differences(theirs, mine, STRICT) == []


def test_eval_cli_scores_detectron2s_cascade_detections_like_pycocotools(tmp_path):
    """Ground truth = all of Detectron2's Cascade detections on one image: `maskrcnn eval` of its weights
    scores what pycocotools scores Detectron2's own detections: box AP 100 (every box found at every IoU
    threshold); mask AP just under 100 (an empty mask matches nothing, even itself). The cascade eval
    elsewhere runs a 3-iteration shapes model, whose numbers say nothing."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    assert CASCADE_FIXTURE.is_dir(), f"cascade fixture not found at {CASCADE_FIXTURE}"
    cfg = load_config(str(CASCADE_FIXTURE / "config.yaml"))
    name = "chelsea_333x517.png"
    exp = json.loads((CASCADE_FIXTURE / "expected.json").read_text())[name]
    anns, theirs = [], []
    for box, score, cls, rle in zip(exp["boxes"], exp["scores"], exp["classes"], exp["masks"]):
        x0, y0, x1, y1 = box
        category = cfg.model.category_ids[cls]
        anns.append({"id": len(anns) + 1, "image_id": 3, "category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": float(mask_util.area(rle)), "segmentation": rle, "iscrowd": 0})
        theirs.append({"image_id": 3, "category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score,
                       "segmentation": rle})
    categories = [{"id": i, "name": n} for i, n in zip(cfg.model.category_ids, cfg.model.class_names)]
    gt = {"images": [{"id": 3, "file_name": name, "height": exp["height"], "width": exp["width"]}],
          "categories": categories, "annotations": anns}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    expected = {}
    for iou_type in ("bbox", "segm"):
        cocoeval = COCOeval(coco, coco.loadRes(theirs), iou_type)
        cocoeval.evaluate(), cocoeval.accumulate(), cocoeval.summarize()
        expected[iou_type] = 100 * cocoeval.stats[0]
    assert expected["bbox"] == pytest.approx(100.0) and 98 < expected["segm"] < 100
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(CASCADE_FIXTURE / "config.yaml"), "--weights", str(CASCADE_FIXTURE / "model.pkl"),
                 "--data", f"{tmp_path / 'gt.json'}:{CASCADE_FIXTURE / 'images'}", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # Equal to 1e-6 here (every mask identical, as in the CLI test above); 0.1 leaves room for another CPU's
    # rounding to flip a mask pixel or two (one match at IoU 0.95 is ~0.2 of AP), not for a real change
    # (intermediate stage boxes left unclipped: mask AP 98.92 against 99.21).
    assert {k: metrics[k]["AP"] for k in expected} == pytest.approx(expected, abs=0.1)


@pytest.mark.skipif(not DC5_FIXTURE.is_dir(), reason=f"DC5 fixture not found at {DC5_FIXTURE}")
def test_predict_cli_reproduces_detectron2_dc5(tmp_path):
    """Detectron2's R50-DC5 (thin): res5 dilated at stride 16, RPN and both RoI heads on that one map.

    Run on two threads, as Detectron2 ran (2026-12-02, AVX-512): boxes within 1.5e-5 px, scores within
    1e-8, every mask identical. On one thread PyTorch's CPU convolutions (oneDNN) sum some res4 convs in
    another order (activations 5e-5 apart at ~100); this model amplifies that to boxes 2e-3 px apart
    and one pixel of a 3-pixel mask (IoU 0.75): the arithmetic's, not the model's, difference.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pairs = predict_like_detectron2(DC5_FIXTURE, tmp_path / "predict")
    finally:
        torch.set_num_threads(threads)
    for name, theirs, mine in pairs:
        assert detection_differences(theirs, mine, STRICT) == [], name


@pytest.mark.skipif(not DCONV_FIXTURE.is_dir(), reason=f"deformable fixture not found at {DCONV_FIXTURE}")
def test_predict_cli_reproduces_detectron2_deformable_convs(tmp_path):
    """Detectron2's R50-FPN with deformable 3x3 convs in res3-res5, offsets random (so they move the samples)."""
    for name, theirs, mine in predict_like_detectron2(DCONV_FIXTURE, tmp_path / "predict"):
        assert detection_differences(theirs, mine, STRICT) == [], name


@pytest.mark.skipif(not KEYPOINT_FIXTURE.is_dir(), reason=f"keypoint fixture not found at {KEYPOINT_FIXTURE}")
def test_predict_cli_reproduces_detectron2_keypoints(tmp_path):
    """Detectron2's Keypoint R-CNN R50-FPN (thin): the same person boxes, each of the 17 keypoints within
    0.05 px, and Detectron2's keypoint score (a softmax over the heat-map, not the logit).

    Measured (2026-12-02, AVX-512, one thread): boxes and keypoints within 1e-4 px, keypoint scores
    (0.5 to ~1500) within 4.4e-4 relative: exp() of heat-map logits that differ by float32 rounding.
    """
    for name, theirs, mine in predict_like_detectron2(KEYPOINT_FIXTURE, tmp_path / "predict"):
        assert detection_differences(theirs, mine, STRICT) == [], name
        partner = match_detections(theirs, mine, STRICT)
        ours = mine["keypoints"][partner]
        assert float((ours[..., :2] - theirs["keypoints"][..., :2]).abs().max()) <= 0.05, name
        assert torch.allclose(ours[..., 2], theirs["keypoints"][..., 2], rtol=2e-3), name


def test_eval_cli_scores_a_detectron2_checkpoint(tmp_path):
    """Ground truth = Detectron2's confident detections on one image: our run of its weights finds them all.

    (Several of those detections are slivers with empty masks: the mask AP cannot reach 100.)
    """
    cfg = load_config(str(FIXTURE / "config.yaml"))
    exp = json.loads((FIXTURE / "expected.json").read_text())["astronaut.png"]
    anns = []
    for box, score, cls, rle in zip(exp["boxes"], exp["scores"], exp["classes"], exp["masks"]):
        x0, y0, x1, y1 = box
        if score >= 0.3:
            anns.append({"id": len(anns) + 1, "image_id": 7, "category_id": cfg.model.category_ids[cls],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask_util.area(rle)),
                         "segmentation": rle, "iscrowd": 0})
    assert len(anns) >= 5
    categories = [{"id": i, "name": n} for i, n in zip(cfg.model.category_ids, cfg.model.class_names)]
    gt = {"images": [{"id": 7, "file_name": "astronaut.png", "height": 512, "width": 512}],
          "categories": categories, "annotations": anns}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "eval"
    code = main(["eval", "--config", str(FIXTURE / "config.yaml"), "--weights", str(FIXTURE / "model.pkl"),
                 "--data", f"{tmp_path / 'gt.json'}:{FIXTURE / 'images'}", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)  # every box found, at every IoU threshold
    assert metrics["segm"]["AP"] > 50


def _finetune_on_shapes(fixture, tmp_path, solver: list[str]):
    """Fine-tune the fixture's Detectron2 .pkl on two 3-class shapes images through `maskrcnn train`; return the run dir."""
    from maskrcnn.data.shapes import make_shapes

    ann, images = make_shapes(tmp_path / "data", num_train=2, num_val=0, seed=1, image_size=96,
                              max_shapes=3, shape_size=(24, 48))["train"]
    out = tmp_path / "run"
    code = main([
        "train", "--config", str(fixture / "config.yaml"), "--weights", str(fixture / "model.pkl"),
        "--out", str(out), "model.class_names=[]", "model.category_ids=[]", f"data.train=['{ann}:{images}']",
        "input.min_size_train=[128]", "input.max_size_train=128", "solver.ims_per_batch=2",
        "solver.warmup_iters=1", "solver.checkpoint_period=100", *solver,
        "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=100", "device=cpu",
    ])
    assert code == 0
    return out


def test_finetune_from_detectron2_pkl_reinitialises_class_layers(tmp_path):
    out = _finetune_on_shapes(FIXTURE, tmp_path, ["solver.max_iter=2", "solver.base_lr=0.001", "solver.log_period=1"])
    final = load_checkpoint(out / "checkpoints" / "model_final.pth")
    assert final["config"]["model"]["class_names"] == ["square", "circle", "triangle"]
    state = final["model"]
    assert state["roi_heads.box_predictor.class_logits.weight"].shape == (4, 256)
    assert state["roi_heads.mask_head.predictor.weight"].shape[0] == 4
    # The frozen stem came from the Detectron2 file unchanged.
    import pickle

    stem = pickle.loads((FIXTURE / "model.pkl").read_bytes())["model"]["backbone.bottom_up.stem.conv1.weight"]
    assert torch.equal(state["backbone.trunk.conv1.weight"], torch.from_numpy(stem.astype(np.float32)))
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x) for x in losses if x is not None)


@pytest.mark.skipif(not CASCADE_FIXTURE.is_dir(), reason=f"cascade fixture not found at {CASCADE_FIXTURE}")
def test_finetune_from_detectron2_cascade_pkl_keeps_the_class_agnostic_box_deltas(tmp_path):
    """Another class count re-initialises each stage's classifier; its 4 box deltas load from the file."""
    import pickle

    out = _finetune_on_shapes(CASCADE_FIXTURE, tmp_path, ["solver.max_iter=1", "solver.base_lr=0.0"])
    state = load_checkpoint(out / "checkpoints" / "model_final.pth")["model"]
    arrays = pickle.loads((CASCADE_FIXTURE / "model.pkl").read_bytes())["model"]
    for stage in range(3):
        assert state[f"roi_heads.box_predictor.{stage}.class_logits.weight"].shape == (4, 256)
        deltas = torch.from_numpy(arrays[f"roi_heads.box_predictor.{stage}.bbox_pred.weight"].astype(np.float32))
        assert torch.equal(state[f"roi_heads.box_predictor.{stage}.box_deltas.weight"], deltas)  # lr 0: unchanged

