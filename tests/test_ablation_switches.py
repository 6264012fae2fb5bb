"""Each switch of the paper's ablations (Table 2) changes the computation it names, and nothing else.

No training here: benchmarks/ablations.py trains the variants; these tests pin what each one computes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import ConfigError, PoolerConfig, load_config
from maskrcnn.modeling import build_model
from maskrcnn.modeling.backbone import Backbone
from maskrcnn.modeling.poolers import RoIPooler
from maskrcnn.modeling.roi_heads import MaskHead, MLPMaskHead, mask_loss, mask_probabilities
from support import benchmark_script

STRIDE = 16


def pool(kind: str, aligned: bool, feature: torch.Tensor, box: list[float]) -> torch.Tensor:
    pooler = RoIPooler(PoolerConfig(type=kind, aligned=aligned, output_size=4, sampling_ratio=2), [STRIDE])
    return pooler([feature], [torch.tensor([box])])[0]


# ---- pooling: RoIPool quantises, RoIAlign does not; "aligned" is a half-pixel shift -----------------


def test_roipool_quantises_box_edges_roialign_does_not():
    torch.manual_seed(0)
    feature = torch.randn(1, 3, 12, 12)
    box = [33.0, 40.0, 97.0, 120.0]
    nudged = [v + 0.3 * STRIDE for v in box]  # under a feature cell: rounds to the same cells
    assert torch.equal(pool("roipool", False, feature, box), pool("roipool", False, feature, nudged))
    moved = (pool("roialign", True, feature, box) - pool("roialign", True, feature, nudged)).abs().max()
    assert moved > 1e-2


def test_roialign_follows_a_linear_ramp_exactly_roipool_does_not():
    # On f(x, y) = x, bilinear sampling is exact: each bin's mean is its centre's x in feature units.
    ramp = torch.arange(12.0).repeat(12, 1)[None, None]
    box = [37.0, 37.0, 101.0, 101.0]  # 4 feature cells wide, starting at x = 2.3125 cells
    bin_centres = (box[0] / STRIDE - 0.5) + (torch.arange(4) + 0.5) * (box[2] - box[0]) / STRIDE / 4
    aligned = pool("roialign", True, ramp, box)[0]
    assert torch.allclose(aligned, bin_centres.expand(4, 4), atol=1e-5)
    pooled = pool("roipool", False, ramp, box)[0]
    assert torch.equal(pooled, pooled.round())  # a max over whole cells: integer positions only
    assert (pooled - bin_centres).abs().max() > 0.25


def test_aligned_roialign_is_unaligned_shifted_by_half_a_cell():
    torch.manual_seed(1)
    feature = torch.randn(1, 2, 12, 12)
    box = [30.0, 22.0, 110.0, 90.0]
    shifted = [v - 0.5 * STRIDE for v in box]
    assert torch.allclose(pool("roialign", True, feature, box), pool("roialign", False, feature, shifted), atol=1e-5)
    assert not torch.allclose(pool("roialign", True, feature, box), pool("roialign", False, feature, box), atol=1e-3)


# ---- mask loss: the sigmoid keeps classes apart, the softmax couples them -------------------------------


def _mask_problem(classes: int = 4, rois: int = 3, size: int = 6):
    torch.manual_seed(2)
    logits = torch.randn(rois, classes, size, size, requires_grad=True)
    labels = torch.tensor([1, 3, 2])
    targets = (torch.rand(rois, size, size) > 0.5).float()
    return logits, labels, targets


def test_sigmoid_loss_only_touches_the_gt_class_channel():
    logits, labels, targets = _mask_problem()
    mask_loss(logits, labels, targets, "sigmoid").backward()
    touched = logits.grad.abs().sum(dim=(2, 3)) > 0
    assert touched.tolist() == [[c == int(label) for c in range(4)] for label in labels]
    expected = F.binary_cross_entropy_with_logits(logits[torch.arange(3), labels], targets)
    assert torch.allclose(mask_loss(logits, labels, targets, "sigmoid"), expected)


def test_softmax_loss_couples_every_class_channel():
    logits, labels, targets = _mask_problem()
    loss = mask_loss(logits, labels, targets, "softmax")
    loss.backward()
    assert (logits.grad.abs().sum(dim=(2, 3)) > 0).all()  # other classes' logits are pushed down too
    # Raising another class's logits raises the softmax loss and leaves the sigmoid loss unchanged.
    other = torch.zeros_like(logits)
    other[:, 0] = 3.0  # the background channel, never any RoI's GT class here
    with torch.no_grad():
        assert mask_loss(logits + other, labels, targets, "softmax") > loss
        assert torch.allclose(mask_loss(logits + other, labels, targets, "sigmoid"),
                              mask_loss(logits, labels, targets, "sigmoid"))
    # It is the per-pixel multinomial: GT class inside the mask, background (0) outside.
    pixel_classes = torch.where(targets > 0.5, labels[:, None, None], torch.zeros_like(labels[:, None, None]))
    assert torch.allclose(loss, F.cross_entropy(logits, pixel_classes))


def test_mask_probabilities_follow_the_loss():
    logits, labels, _ = _mask_problem()
    logits = logits.detach()
    sigmoid = mask_probabilities(logits, labels, "sigmoid")
    softmax = mask_probabilities(logits, labels, "softmax")
    assert torch.allclose(sigmoid, logits[torch.arange(3), labels].sigmoid())
    assert torch.allclose(softmax, logits.softmax(dim=1)[torch.arange(3), labels])
    assert not torch.allclose(sigmoid, softmax)


# ---- class-agnostic masks: one channel, whatever the class --------------------------------------------


def test_class_agnostic_model_predicts_one_mask_channel_for_every_class():
    specific = build_model(load_config("shapes"))
    agnostic = build_model(load_config("shapes", ["model.mask_head.class_agnostic=true"]))
    assert specific.roi_heads.mask_head.predictor.out_channels == 4  # K + 1 (background)
    assert agnostic.roi_heads.mask_head.predictor.out_channels == 1
    logits = torch.randn(2, 1, 5, 5)
    for label in (1, 2, 3):
        probs = mask_probabilities(logits, torch.tensor([label, label]), "sigmoid")
        assert torch.allclose(probs, logits[:, 0].sigmoid())


# ---- mask head: the FCN is local, the MLP sees (and weighs) every pixel of the RoI ----------------------


def _response_to_one_corner(head: torch.nn.Module, channels: int, size: int) -> torch.Tensor:
    """Return which output pixels change when one input pixel (the top-left corner) changes."""
    torch.manual_seed(3)
    x = torch.randn(1, channels, size, size)
    bumped = x.clone()
    bumped[0, :, 0, 0] += 5.0
    with torch.no_grad():
        return (head(bumped) - head(x)).abs().amax(dim=(0, 1)) > 1e-7


def test_fcn_mask_head_is_local_and_mlp_mask_head_is_global():
    fcn = MaskHead(in_channels=8, num_convs=2, conv_dim=8, num_outputs=3)
    mlp = MLPMaskHead(in_channels=8, in_size=7, num_fcs=2, fc_dim=32, num_outputs=3, mask_size=14)
    torch.nn.init.normal_(mlp.predictor.weight)  # its small initial weights would hide the response
    torch.nn.init.normal_(fcn.predictor.weight)
    fcn_changed = _response_to_one_corner(fcn, 8, 7)
    mlp_changed = _response_to_one_corner(mlp, 8, 7)
    assert fcn_changed.shape == mlp_changed.shape == (14, 14)
    # Two 3x3 convs reach 2 cells; the deconvolution doubles: only the top-left 6x6 of 14x14 can move.
    assert fcn_changed[:6, :6].any() and not fcn_changed[6:, :].any() and not fcn_changed[:, 6:].any()
    assert mlp_changed.all()


def test_mlp_mask_head_from_config_gives_28x28_masks_per_class():
    cfg = load_config("shapes", ["model.mask_head.type=mlp", "model.mask_head.fc_dim=64"])
    head = build_model(cfg).roi_heads.mask_head
    assert isinstance(head, MLPMaskHead)
    assert [fc.out_features for fc in head.hidden.fcs] == [64, 64]
    assert head(torch.randn(2, cfg.model.backbone.fpn_channels, 14, 14)).shape == (2, 4, 28, 28)


# ---- C4 (stride 16) vs C5 (stride 32) --------------------------------------------------------------


def test_c5_backbone_is_res5_at_stride_32_c4_is_res4_at_stride_16():
    image = torch.randn(1, 3, 128, 160)
    cfg = load_config("shapes").model.backbone
    cfg.kind = "c4"
    c4 = Backbone(cfg).eval()
    cfg.kind = "c5"
    c5 = Backbone(cfg).eval()
    with torch.no_grad():
        (f4,), (f5,) = c4(image), c5(image)
    assert (c4.strides, c5.strides) == ([16], [32])
    assert f4.shape == (1, 256, 8, 10) and f5.shape == (1, 512, 4, 5)
    c5.load_state_dict(c4.state_dict())  # the same trunk: C5 only runs one stage more
    with torch.no_grad():
        assert torch.allclose(c5(image)[0], c4.res5(f4), atol=1e-5)


# ---- config checks, and every variant of the benchmark builds ----------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.mask_head.loss=softmax", "model.mask_head.class_agnostic=true"], "class-specific"),
    (["model.backbone.kind=c5", "model.box_head.type=res5"], "needs model.backbone.kind=c4"),
    (["model.mask_head.type=deep"], "model.mask_head.type"),
    (["model.mask_head.loss=focal"], "model.mask_head.loss"),
])
def test_inconsistent_ablation_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("shapes", overrides)


def test_every_ablation_variant_builds_and_runs_a_training_step():
    ablations = benchmark_script("ablations")
    image = [torch.rand(3, 64, 64) * 255]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:44] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10, 44, 40]]), "labels": torch.tensor([2]), "masks": masks}]
    built = {}
    for variant in ablations.VARIANTS:
        overrides = ablations.variant_overrides(variant, "shapes", ["model.mask_head.fc_dim=32"])
        torch.manual_seed(0)
        model = build_model(load_config("shapes", overrides)).train()
        losses = model(image, targets)
        assert torch.isfinite(sum(losses.values())), variant.name
        built[variant.name] = model
    assert built["c4/roipool"].backbone.strides == [16] and built["c5/roipool"].backbone.strides == [32]
    assert built["c4/roialign"].cfg.model.anchors.sizes == [[16, 32, 64, 128, 256]]
    doubled, base = built["c5x2/roipool"].cfg.input, built["c5/roipool"].cfg.input
    assert doubled.min_size_train == [256] == [2 * base.min_size_train[0]]
    assert (doubled.min_size_test, doubled.max_size_test) == (2 * base.min_size_test, 2 * base.max_size_test)
    assert built["fpn/roipool"].roi_heads.mask_pooler.type == "roipool"
    assert built["fpn/roialign-unaligned"].roi_heads.box_pooler.aligned is False
    assert built["fpn/baseline"].roi_heads.box_pooler.aligned is True
    assert built["cascade/cascade"].roi_heads.num_stages == 3 and len(built["cascade/cascade"].backbone.strides) == 5
    assert built["cascade/agnostic-boxes"].roi_heads.box_predictor.box_deltas.out_features == 4


# ---- the benchmark's bookkeeping: a failed run is reported and the rest go on; the table from the runs --


def _fake_run(ablations, out: Path, variant: str, seed: int, mask_ap: float) -> None:
    path = ablations.metrics_file(out, variant, seed)
    path.parent.mkdir(parents=True)
    segm = {"AP": mask_ap, "AP50": mask_ap + 20, "AP75": mask_ap - 5}
    path.write_text(json.dumps({"segm": segm, "bbox": {"AP": mask_ap + 3}}))


def test_report_table_gives_mean_and_spread_of_the_finished_seeds(tmp_path):
    ablations = benchmark_script("ablations")
    _fake_run(ablations, tmp_path, "fpn/baseline", 0, 40.0)
    _fake_run(ablations, tmp_path, "fpn/baseline", 2, 44.0)
    _fake_run(ablations, tmp_path, "fpn/mlp", 0, 39.0)
    _fake_run(ablations, tmp_path, "fpn/mlp", 1, 30.0)  # baseline has no seed 1: left out of the Δ
    _fake_run(ablations, tmp_path, "c4/roipool", 1, 30.0)
    variants = [ablations.BY_NAME[n] for n in ("fpn/baseline", "fpn/softmax", "fpn/mlp", "c4/roipool")]
    results = ablations.collect(tmp_path, variants, [0, 1, 2])
    assert list(results) == ["fpn/baseline", "fpn/mlp", "c4/roipool"]  # softmax has no finished run
    table = ablations.markdown_table(results).splitlines()
    assert table[2].startswith("| fpn/baseline | 2 | 42.0 ± 2.0 | 62.0 ± 2.0 | 37.0 ± 2.0 | 45.0 ± 2.0 |  |")
    assert table[3].startswith("| fpn/mlp | 2 | 34.5 ± 4.5 | 54.5 ± 4.5 | 29.5 ± 4.5 | 37.5 ± 4.5 | "
                               "-1.0 / -1.0 vs baseline (mask AP per seed: -1.0) | R-50-FPN MLP")
    # c4/roialign, its reference, has not run: no difference to show
    assert table[4].startswith("| c4/roipool | 1 | 30.0 | 50.0 | 25.0 | 33.0 |  | R-50-C4 RoIPool")

    page = tmp_path / "ABLATIONS.md"
    page.write_text(f"intro\n{ablations.MARK_START}\nold table\n{ablations.MARK_END}\nreading\n")
    ablations.write_markdown(page, "NEW TABLE", "python benchmarks/ablations.py --report")
    text = page.read_text()
    assert "old table" not in text and "NEW TABLE" in text
    assert text.startswith("intro\n") and text.endswith("reading\n")
    page.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        ablations.write_markdown(page, "NEW TABLE", "")


def test_cascade_table_compares_box_ap_and_reports_the_cost(tmp_path):
    ablations = benchmark_script("ablations")
    for variant, box, step, image in (("cascade/plain", (50.0, 80.0, 55.0), 1.0, 0.05),
                                      ("cascade/cascade", (53.0, 80.5, 60.0), 1.5, 0.07)):
        for seed in (0, 1):
            path = ablations.metrics_file(tmp_path, variant, seed)
            path.parent.mkdir(parents=True)
            bbox = dict(zip(("AP", "AP50", "AP75"), (v + seed for v in box)))
            path.write_text(json.dumps({"bbox": bbox, "segm": {"AP": 30.0, "AP50": 50.0, "AP75": 25.0}}))
            run = ablations.run_dir(tmp_path, variant, seed)
            records = [{"iter": 1, "time": 9.0}, {"iter": 20, "time": step + seed}]  # the first: warm-up
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            inference = {"inference": {"seconds_per_image": {"median": image}}}
            ablations.benchmark_file(tmp_path, variant, seed).write_text(json.dumps(inference))
    variants = [ablations.BY_NAME[n] for n in ("fpn/baseline", "cascade/plain", "cascade/cascade")]
    results = ablations.collect(tmp_path, variants, [0, 1])
    table = ablations.markdown_table(results, "cascade").splitlines()
    assert table[0].startswith("| variant | seeds | box AP | box AP50 | box AP75 | mask AP | mask AP75 | s / step | "
                               "s / image | Δ box AP / box AP75, paired by seed |")
    assert table[2].startswith("| cascade/plain | 2 | 50.5 ± 0.5 | 80.5 ± 0.5 | 55.5 ± 0.5 | 30.0 ± 0.0 | 25.0 ± 0.0 | "
                               "1.50 ± 0.50 | 0.050 ± 0.000 |  |")
    assert "| +3.0 / +5.0 vs plain (box AP per seed: +3.0, +3.0) |" in table[3]
    assert len(table) == 4  # only the cascade group's rows
    page = tmp_path / "ABLATIONS.md"
    start, end = ablations.MARKERS["cascade"]
    page.write_text(f"{ablations.MARK_START}\nTable 2\n{ablations.MARK_END}\n{start}\nold\n{end}\n")
    ablations.write_markdown(page, "CASCADE TABLE", "python benchmarks/ablations.py --report", "cascade")
    text = page.read_text()
    assert "Table 2" in text and "CASCADE TABLE" in text and "old" not in text


def test_a_failing_run_is_reported_and_the_batch_goes_on(tmp_path, monkeypatch, capsys):
    ablations = benchmark_script("ablations")
    data = f"{tmp_path}/missing.json:{tmp_path}"
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--out", str(tmp_path), "--variants", "fpn/baseline",
                                      "fpn/softmax", "--seeds", "0", "--data", data, data, "--jobs", "2"])
    assert ablations.main() == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum("FAILED (exit 2)" in line for line in lines) == 2
    assert lines[-1].startswith("0 of 2 runs finished")
    log = (ablations.run_dir(tmp_path, "fpn/softmax", 0) / "log.txt").read_text()
    assert "model.mask_head.loss=softmax" in log and "missing.json" in log


def test_an_override_after_variants_is_named_with_where_it_goes(monkeypatch, capsys):
    ablations = benchmark_script("ablations")
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--variants", "fpn/mlp", "solver.ims_per_batch=4"])
    with pytest.raises(SystemExit):
        ablations.main()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown variant 'solver.ims_per_batch=4'" in error and "go before --variants" in error
