"""Detectron2 compatibility without Detectron2: config translation, refused keys, the name mapping."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.checkpoint import CheckpointError, load_weights
from maskrcnn.config import PRESET_DIR, BackboneConfig, ConfigError, load_config
from maskrcnn.detectron2 import convert_detectron2_state_dict, read_detectron2_weights
from maskrcnn.detectron2.weights import rename_detectron2_key
from maskrcnn.modeling import build_model
from maskrcnn.modeling.backbone import build_trunk
from maskrcnn.modeling.deform import DeformConv2d
from support import our_name_to_detectron2

DATA = Path(__file__).parent / "data" / "detectron2"  # test-only: Detectron2's resolved dump of the R18 fixture
DETECTRON2_CONFIGS = PRESET_DIR / "detectron2"  # Detectron2's model-zoo configs, as the package ships them
ZOO = DETECTRON2_CONFIGS / "COCO-InstanceSegmentation"
MISC = DETECTRON2_CONFIGS / "Misc"
KEYPOINTS = DETECTRON2_CONFIGS / "COCO-Keypoints"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "detectron2-r18-fpn"
CASCADE_FIXTURE = FIXTURE.parent / "detectron2-cascade-r50thin-fpn"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"parity fixture not found at {FIXTURE}")


# ---- configs ------------------------------------------------------------------------------------


def test_resolved_dump_translates_to_the_fixture_model():
    cfg = load_config(str(DATA / "r18-fpn-dump.yaml"))
    m = cfg.model
    assert (m.backbone.depth, m.backbone.kind, m.backbone.norm, m.backbone.trainable_stages) == (18, "fpn", "frozen_bn", 3)
    assert not m.backbone.stride_in_1x1  # basic blocks have no 1x1 conv
    assert m.input_format == "BGR"
    assert m.pixel_mean == pytest.approx([103.53 / 255, 116.28 / 255, 123.675 / 255])
    assert m.pixel_std == pytest.approx([1 / 255] * 3)
    assert m.box_head.fc_dim == 256 and m.box_head.type == "2fc"
    assert (m.box_head.pooler.aligned, m.box_head.pooler.sampling_ratio, m.box_head.pooler.output_size) == (True, 0, 7)
    assert m.mask_head.num_convs == 4 and m.mask_head.pooler.output_size == 14
    assert m.anchors.sizes == [[32], [64], [128], [256], [512]] and m.anchors.offset == 0.0
    assert (m.rpn.pre_nms_top_n_test, m.rpn.post_nms_top_n_test, m.rpn.nms_thresh) == (1000, 1000, 0.7)
    assert m.box_head.bbox_reg_weights == [10.0, 10.0, 5.0, 5.0]
    assert (cfg.input.resize, cfg.input.min_size_test, cfg.input.max_size_test) == ("pil", 800, 1333)
    assert m.mask_head.paste == "detectron2"
    assert m.num_classes == 80 and m.category_ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert cfg.solver.steps == [210000, 250000] and cfg.input.min_size_train == [640, 672, 704, 736, 768, 800]


@pytest.mark.parametrize("name, depth, groups, width, stride_in_1x1, kind", [
    ("mask_rcnn_R_50_FPN_3x", 50, 1, 64, True, "fpn"),
    ("mask_rcnn_R_101_FPN_3x", 101, 1, 64, True, "fpn"),
    ("mask_rcnn_X_101_32x8d_FPN_3x", 101, 32, 8, False, "fpn"),
    ("mask_rcnn_R_50_C4_1x", 50, 1, 64, True, "c4"),
])
def test_model_zoo_configs_with_base_chain(name, depth, groups, width, stride_in_1x1, kind):
    cfg = load_config(str(ZOO / f"{name}.yaml"), ["model.box_head.detections_per_image=50"])
    b = cfg.model.backbone
    assert (b.depth, b.groups, b.width_per_group, b.stride_in_1x1, b.kind) == (depth, groups, width, stride_in_1x1, kind)
    assert cfg.model.box_head.detections_per_image == 50  # overrides still apply after translation
    if kind == "c4":
        assert cfg.model.box_head.type == "res5" and cfg.model.anchors.sizes == [[32, 64, 128, 256, 512]]
        assert (cfg.model.rpn.pre_nms_top_n_test, cfg.model.rpn.post_nms_top_n_test) == (6000, 1000)
    if groups == 32:
        assert cfg.model.pixel_std == pytest.approx([57.375 / 255, 57.12 / 255, 58.395 / 255])


@pytest.mark.parametrize("schedule, steps", [("1x", [60000, 80000]), ("3x", [210000, 250000])])
def test_cascade_model_zoo_configs_translate_to_three_stages(schedule, steps):
    cfg = load_config(str(MISC / f"cascade_mask_rcnn_R_50_FPN_{schedule}.yaml"))
    box = cfg.model.box_head
    assert box.cascade.enabled and box.class_agnostic
    assert box.cascade.ious == [0.5, 0.6, 0.7]
    assert box.cascade.bbox_reg_weights == [[10, 10, 5, 5], [20, 20, 10, 10], [30, 30, 15, 15]]
    assert box.cascade.loss_weights == [1.0, 1.0, 1.0]
    assert cfg.model.rpn.post_nms_top_n_train == 2000 and cfg.solver.steps == steps
    heads = build_model(cfg).roi_heads
    assert len(heads.box_head) == 3 and all(p.box_deltas.out_features == 4 for p in heads.box_predictor)


def test_class_agnostic_model_zoo_config_loads_as_a_plain_model_with_four_box_outputs(tmp_path):
    # The values of Detectron2's Misc/mask_rcnn_R_50_FPN_1x_cls_agnostic.yaml (a config the package does not
    # ship), on the package's Base-RCNN-FPN.yaml.
    path = tmp_path / "mask_rcnn_R_50_FPN_1x_cls_agnostic.yaml"
    path.write_text(f"""_BASE_: "{DETECTRON2_CONFIGS / 'Base-RCNN-FPN.yaml'}"
MODEL:
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  MASK_ON: True
  RESNETS:
    DEPTH: 50
  ROI_BOX_HEAD:
    CLS_AGNOSTIC_BBOX_REG: True
  ROI_MASK_HEAD:
    CLS_AGNOSTIC_MASK: True
""")
    cfg = load_config(str(path))
    assert cfg.model.box_head.class_agnostic and cfg.model.mask_head.class_agnostic
    assert not cfg.model.box_head.cascade.enabled
    heads = build_model(cfg).roi_heads
    assert heads.box_predictor.box_deltas.out_features == 4 and heads.mask_head.predictor.out_channels == 1


@pytest.mark.parametrize("schedule, depth, steps", [("R_50_DC5_1x", 50, [60000, 80000]),
                                                   ("R_50_DC5_3x", 50, [210000, 250000]),
                                                   ("R_101_DC5_3x", 101, [210000, 250000])])
def test_dc5_model_zoo_configs_translate_to_a_dilated_res5_with_single_level_heads(schedule, depth, steps):
    cfg = load_config(str(ZOO / f"mask_rcnn_{schedule}.yaml"))
    m = cfg.model
    assert (m.backbone.kind, m.backbone.res5_dilation, m.backbone.depth, m.backbone.stride_in_1x1) == ("c5", 2, depth, True)
    assert m.anchors.sizes == [[32, 64, 128, 256, 512]] and m.size_divisibility == 1  # one level, no padding
    assert (m.rpn.pre_nms_top_n_test, m.rpn.post_nms_top_n_test) == (6000, 1000)
    assert (m.box_head.type, m.box_head.fc_dim, m.box_head.pooler.output_size) == ("2fc", 1024, 7)
    assert (m.mask_head.num_convs, m.mask_head.pooler.output_size, m.mask_head.paste) == (4, 14, "detectron2")
    assert cfg.solver.steps == steps and m.category_ids[:3] == [1, 2, 3]
    model = build_model(cfg)
    assert model.backbone.strides == [16] and model.backbone.out_channels == 2048
    assert model.rpn.head.objectness.out_channels == 15  # 5 sizes x 3 ratios at each res5 location
    res5 = model.backbone.trunk.layer4
    first = res5[0]
    # Detectron2 drops res5's stride and dilates every block's 3x3 conv, the first one included.
    assert first.conv1.stride == first.conv2.stride == first.downsample[0].stride == (1, 1)
    assert all(block.conv2.dilation == block.conv2.padding == (2, 2) for block in res5)
    assert model.roi_heads.box_head.fcs[0].in_features == 2048 * 7 * 7


@pytest.mark.parametrize("schedule, steps", [("1x", [60000, 80000]), ("3x", [210000, 250000])])
def test_deformable_model_zoo_configs_make_res3_to_res5_deformable(schedule, steps):
    cfg = load_config(str(MISC / f"mask_rcnn_R_50_FPN_{schedule}_dconv_c3-c5.yaml"))
    b = cfg.model.backbone
    assert (b.deform_stages, b.deform_modulated, b.deform_groups, b.kind) == ([3, 4, 5], False, 1, "fpn")
    assert cfg.solver.steps == steps
    trunk = build_model(cfg).backbone.trunk
    assert not any(isinstance(block.conv2, DeformConv2d) for block in trunk.layer1)
    for stage in (trunk.layer2, trunk.layer3, trunk.layer4):
        for i, block in enumerate(stage):
            conv = block.conv2
            assert isinstance(conv, DeformConv2d) and conv.offset.out_channels == 18  # (dy, dx) per 3x3 tap
            assert conv.stride == conv.offset.stride == (1, 1)  # STRIDE_IN_1X1: the stride is in conv1
            assert block.conv1.stride == ((2, 2) if i == 0 else (1, 1))


def test_modulated_deformable_convs_with_offset_groups(tmp_path):
    path = tmp_path / "dcnv2.yaml"
    path.write_text(f"_BASE_: {MISC / 'mask_rcnn_R_50_FPN_1x_dconv_c3-c5.yaml'}\n"
                    "MODEL:\n  RESNETS:\n    DEFORM_MODULATED: True\n    DEFORM_NUM_GROUPS: 2\n"
                    "    DEFORM_ON_PER_STAGE: [False, False, False, True]\n")
    cfg = load_config(str(path))
    assert (cfg.model.backbone.deform_stages, cfg.model.backbone.deform_modulated, cfg.model.backbone.deform_groups) == (
        [5], True, 2)
    conv = build_model(cfg).backbone.trunk.layer4[0].conv2
    assert conv.modulated and conv.offset.out_channels == 2 * 27  # per group: 18 offsets, then 9 mask logits


@pytest.mark.parametrize("name, depth, groups", [("R_50_FPN_1x", 50, 1), ("R_50_FPN_3x", 50, 1),
                                                 ("R_101_FPN_3x", 101, 1), ("X_101_32x8d_FPN_3x", 101, 32)])
def test_keypoint_model_zoo_configs_translate_to_our_keypoint_head(name, depth, groups):
    cfg = load_config(str(KEYPOINTS / f"keypoint_rcnn_{name}.yaml"))
    m = cfg.model
    assert (m.backbone.depth, m.backbone.groups, m.backbone.kind) == (depth, groups, "fpn")
    kp = m.keypoint_head
    assert kp.enabled and not m.mask_head.enabled
    assert (kp.num_keypoints, kp.num_convs, kp.conv_dim, kp.score) == (17, 8, 512, "detectron2")
    assert (kp.pooler.output_size, kp.pooler.sampling_ratio, kp.pooler.aligned) == (14, 0, True)
    assert (m.num_classes, m.class_names, m.category_ids) == (1, ["person"], [1])
    assert kp.keypoint_names[:3] == ["nose", "left_eye", "right_eye"] and len(kp.skeleton) == 19
    assert m.box_head.smooth_l1_beta == 0.5 and m.rpn.post_nms_top_n_train == 1500
    if name == "R_50_FPN_1x":
        heads = build_model(cfg).roi_heads
        assert heads.keypoint_head.deconv.out_channels == 17 and len(heads.keypoint_head.convs) == 8
        assert heads.box_predictor.box_deltas.out_features == 8  # person + background, class-specific


@pytest.mark.parametrize("edit, key", [
    ({"MODEL": {"RESNETS": {"RES5_DILATION": 2}}}, "MODEL.RESNETS.RES5_DILATION"),  # an FPN needs stride 32
    ({"MODEL": {"RESNETS": {"RES5_DILATION": 4}}}, "MODEL.RESNETS.RES5_DILATION"),
    ({"MODEL": {"RESNETS": {"DEFORM_ON_PER_STAGE": [False, True]}}}, "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
    ({"MODEL": {"RESNETS": {"DEPTH": 18, "RES2_OUT_CHANNELS": 64, "DEFORM_ON_PER_STAGE": [False, True, True, True]}}},
     "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
    ({"MODEL": {"KEYPOINT_ON": True, "ROI_KEYPOINT_HEAD": {"CONV_DIMS": [512, 256]}}},
     "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS"),
    ({"MODEL": {"KEYPOINT_ON": True, "ROI_KEYPOINT_HEAD": {"NAME": "MyKeypointHead"}}}, "MODEL.ROI_KEYPOINT_HEAD.NAME"),
    ({"MODEL": {"ROI_HEADS": {"NAME": "HybridTaskCascadeROIHeads"}}}, "MODEL.ROI_HEADS.NAME"),
    ({"MODEL": {"ROI_HEADS": {"NAME": "CascadeROIHeads"}}}, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"),
    ({"MODEL": {"ROI_HEADS": {"NAME": "CascadeROIHeads"}, "ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
                "ROI_BOX_CASCADE_HEAD": {"IOUS": [0.5, 0.6]}}}, "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS"),
    ({"MODEL": {"META_ARCHITECTURE": "PanopticFPN"}}, "MODEL.META_ARCHITECTURE"),
    ({"TEST": {"AUG": {"ENABLED": True}}}, "TEST.AUG.ENABLED"),
    ({"MODEL": {"FPN": {"FUSE_TYPE": "avg"}}}, "MODEL.FPN.FUSE_TYPE"),
    ({"INPUT": {"FORMAT": "L"}}, "INPUT.FORMAT"),
    ({"MODEL": {"RESNETS": {"RES2_OUT_CHANNELS": 100}}}, "MODEL.RESNETS.RES2_OUT_CHANNELS"),
    ({"MODEL": {"ROI_HEADS": {"SOMETHING_NEW": 3}}}, "MODEL.ROI_HEADS.SOMETHING_NEW"),
])
def test_unsupported_keys_are_refused_by_name(tmp_path, edit, key):
    path = tmp_path / "custom.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"_BASE_": str(ZOO / "mask_rcnn_R_50_FPN_3x.yaml"), **edit}))
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(str(path))


def test_keypoints_and_deformable_res5_on_c4_are_refused_by_name(tmp_path):
    """Detectron2's Res5ROIHeads asserts an undeformed res5; our keypoint head runs on FPN models."""
    import yaml

    for edit, key in (({"MODEL": {"KEYPOINT_ON": True}}, "MODEL.KEYPOINT_ON"),
                      ({"MODEL": {"RESNETS": {"DEFORM_ON_PER_STAGE": [False, False, True, True]}}},
                       "MODEL.RESNETS.DEFORM_ON_PER_STAGE")):
        path = tmp_path / "c4.yaml"
        path.write_text(yaml.safe_dump({"_BASE_": str(ZOO / "mask_rcnn_R_50_C4_1x.yaml"), **edit}))
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(str(path))


def test_training_only_differences_are_warned_not_refused(tmp_path, caplog):
    path = tmp_path / "crop.yaml"
    path.write_text(f"_BASE_: {ZOO / 'mask_rcnn_R_50_FPN_3x.yaml'}\nINPUT:\n  CROP:\n    ENABLED: true\n")
    load_config(str(path))
    assert "INPUT.CROP.ENABLED" in caplog.text


# ---- weights ------------------------------------------------------------------------------------


def test_bottleneck_stride_in_1x1_moves_the_stride_only():
    plain, msra = (build_trunk(BackboneConfig(depth=50, stride_in_1x1=s)) for s in (False, True))
    for stage in ("layer2", "layer3", "layer4"):
        first = getattr(msra, stage)[0]
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
        assert getattr(plain, stage)[0].conv2.stride == (2, 2)
    assert msra.layer1[0].conv1.stride == (1, 1)
    x = torch.randn(1, 64, 64, 64)
    with torch.no_grad():
        assert msra.layer2(msra.layer1(x)).shape == plain.layer2(plain.layer1(x)).shape == (1, 512, 32, 32)


@pytest.mark.parametrize("zoo", ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_C4_1x", "mask_rcnn_X_101_32x8d_FPN_3x",
                                 "../Misc/cascade_mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_DC5_1x",
                                 "../Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5",
                                 "../COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x"])
def test_every_detectron2_name_maps_back_onto_ours(zoo):
    cfg = load_config(str(ZOO / f"{zoo}.yaml"))
    own = build_model(cfg).state_dict()
    for name in own:
        d2 = our_name_to_detectron2(name, cfg.model.backbone.kind == "c4")
        assert rename_detectron2_key(d2) == name, (name, d2)


def test_class_layers_put_background_first_and_anchors_ratio_major():
    cfg = load_config(str(ZOO / "mask_rcnn_R_50_C4_1x.yaml")).model
    k, feat = 3, 5
    state = {
        "roi_heads.box_predictor.cls_score.weight": torch.arange(k + 1.0)[:, None].expand(k + 1, feat),
        "roi_heads.box_predictor.cls_score.bias": torch.arange(k + 1.0),
        "roi_heads.box_predictor.bbox_pred.weight": torch.arange(4.0 * k)[:, None].expand(4 * k, feat) + 1,
        "roi_heads.box_predictor.bbox_pred.bias": torch.arange(4.0 * k) + 1,
        "roi_heads.mask_head.predictor.weight": torch.arange(k + 1.0)[1:, None, None, None].expand(k, feat, 1, 1),
        "roi_heads.mask_head.predictor.bias": torch.arange(k + 1.0)[1:],
        "proposal_generator.rpn_head.objectness_logits.bias": torch.arange(15.0),  # 5 sizes x 3 ratios
        "proposal_generator.rpn_head.anchor_deltas.bias": torch.arange(60.0),
    }
    out = convert_detectron2_state_dict(state, cfg)
    assert out["roi_heads.box_predictor.class_logits.bias"].tolist() == [3, 0, 1, 2]  # background (index K) first
    assert out["roi_heads.box_predictor.box_deltas.bias"].tolist() == [0] * 4 + list(range(1, 13))
    assert out["roi_heads.mask_head.predictor.bias"].tolist() == [0, 1, 2, 3]
    # Our anchor r*5 + s (ratio-major) is Detectron2's s*3 + r (size-major).
    objectness = out["rpn.head.objectness.bias"]
    assert objectness.tolist() == [s * 3 + r for r in range(3) for s in range(5)]
    deltas = out["rpn.head.box_deltas.bias"].view(15, 4)
    assert torch.equal(deltas[:, 0], objectness * 4) and torch.equal(deltas[:, 3], objectness * 4 + 3)


def test_one_class_box_deltas_are_padded_unless_the_config_says_class_agnostic():
    """Keypoint R-CNN's person: 4 box outputs are the class-specific layout for one class."""
    state = {"roi_heads.box_predictor.cls_score.weight": torch.ones(2, 3),
             "roi_heads.box_predictor.cls_score.bias": torch.tensor([5.0, 7.0]),
             "roi_heads.box_predictor.bbox_pred.weight": torch.ones(4, 3),
             "roi_heads.box_predictor.bbox_pred.bias": torch.arange(4.0) + 1}
    cfg = load_config(str(KEYPOINTS / "keypoint_rcnn_R_50_FPN_1x.yaml")).model
    out = convert_detectron2_state_dict(state, cfg)
    assert out["roi_heads.box_predictor.class_logits.bias"].tolist() == [7, 5]
    assert out["roi_heads.box_predictor.box_deltas.bias"].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    cfg.box_head.class_agnostic = True
    assert convert_detectron2_state_dict(state, cfg)["roi_heads.box_predictor.box_deltas.bias"].tolist() == [1, 2, 3, 4]


def test_class_agnostic_box_deltas_keep_their_four_rows_in_every_cascade_stage():
    cfg = load_config(str(MISC / "cascade_mask_rcnn_R_50_FPN_1x.yaml")).model
    k, feat = 3, 5
    state = {}
    for stage in range(3):
        state[f"roi_heads.box_predictor.{stage}.cls_score.weight"] = torch.ones(k + 1, feat)
        state[f"roi_heads.box_predictor.{stage}.cls_score.bias"] = torch.arange(k + 1.0) + 10 * stage
        state[f"roi_heads.box_predictor.{stage}.bbox_pred.weight"] = torch.ones(4, feat) * stage
        state[f"roi_heads.box_predictor.{stage}.bbox_pred.bias"] = torch.arange(4.0)
    out = convert_detectron2_state_dict(state, cfg)
    for stage in range(3):
        logits = out[f"roi_heads.box_predictor.{stage}.class_logits.bias"]
        assert logits.tolist() == [v + 10 * stage for v in (3, 0, 1, 2)]  # background first, in each stage
        assert out[f"roi_heads.box_predictor.{stage}.box_deltas.bias"].tolist() == [0, 1, 2, 3]  # no padding
        assert out[f"roi_heads.box_predictor.{stage}.box_deltas.weight"].shape == (4, feat)


@pytest.mark.skipif(not CASCADE_FIXTURE.is_dir(), reason=f"cascade fixture not found at {CASCADE_FIXTURE}")
def test_cascade_fixture_thin_trunk_and_stages_take_every_key():
    cfg = load_config(str(CASCADE_FIXTURE / "config.yaml"))
    assert (cfg.model.backbone.depth, cfg.model.backbone.width_per_group, cfg.model.backbone.res2_channels) == (50, 16, 64)
    model = build_model(cfg)
    assert model.backbone.trunk.layer1[0].conv1.out_channels == 16 and model.backbone.trunk.layer4[-1].conv3.out_channels == 512
    report = load_weights(model, CASCADE_FIXTURE / "model.pkl")
    assert not report.missing and not report.unexpected and not report.reinitialized


@needs_fixture
def test_fixture_checkpoint_every_key_is_used():
    state = read_detectron2_weights(FIXTURE / "model.pkl")
    assert all(v.dtype == torch.float32 for v in state.values())  # float16 arrays upcast
    model = build_model(load_config(str(FIXTURE / "config.yaml")))
    converted = convert_detectron2_state_dict(state, model.cfg.model)
    assert len(converted) == len(state) == 142
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(converted) == own
    report = load_weights(model, FIXTURE / "model.pkl")
    assert not report.missing and not report.unexpected and not report.reinitialized
    fp16 = pickle.loads((FIXTURE / "model.pkl").read_bytes())["model"]["backbone.bottom_up.res3.0.shortcut.weight"]
    assert torch.equal(model.backbone.trunk.layer2[0].downsample[0].weight, torch.from_numpy(fp16.astype(np.float32)))


def _write_pkl(path: Path, arrays: dict) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f)
    return path


@needs_fixture
def test_extra_and_missing_keys_are_reported_by_name(tmp_path):
    arrays = pickle.loads((FIXTURE / "model.pkl").read_bytes())["model"]
    model = build_model(load_config(str(FIXTURE / "config.yaml")))
    extra = dict(arrays, **{"roi_heads.semantic_head.conv1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=re.escape("roi_heads.semantic_head.conv1.weight")):
        load_weights(model, _write_pkl(tmp_path / "extra.pkl", extra))
    missing = {k: v for k, v in arrays.items() if k != "roi_heads.mask_head.deconv.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys roi_heads\.mask_head\.deconv\.weight"):
        load_weights(model, _write_pkl(tmp_path / "missing.pkl", missing))


@needs_fixture
def test_detectron2_pth_checkpoint_loads(tmp_path):
    arrays = pickle.loads((FIXTURE / "model.pkl").read_bytes())["model"]
    pth = tmp_path / "model_final.pth"  # what Detectron2's checkpointer writes
    torch.save({"model": {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}, "iteration": 9}, pth)
    model = build_model(load_config(str(FIXTURE / "config.yaml")))
    report = load_weights(model, pth)
    assert not report.missing and not report.unexpected


def test_pickles_with_foreign_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": np.zeros(2)}, "__author__": "x", "hook": print}, f)
    with pytest.raises(CheckpointError, match="refusing to load builtins.print"):
        read_detectron2_weights(path)
    caffe2 = tmp_path / "R-50.pkl"
    with open(caffe2, "wb") as f:
        pickle.dump({"blobs": {"res2_0_branch2a_w": np.zeros(2)}}, f)
    with pytest.raises(CheckpointError, match="Caffe2"):
        read_detectron2_weights(caffe2)
