"""Detectron2 config YAML (a resolved `cfg.dump()` or a model-zoo file with `_BASE_`) -> our Config.

Every key of the file is accounted for: translated, checked against the values we can reproduce
(anything else is a `ConfigError` naming the key), known to be irrelevant to a Mask R-CNN
(RetinaNet and panoptic sections, data-loader threads, ...), or a training-only option we do
not reproduce, which is logged as a warning when it differs from Detectron2's default. A key we do not
know at all is an error: it might change the model.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from maskrcnn.config_checks import validate
from maskrcnn.config_merge import PRESET_DIR, merge_file
from maskrcnn.config_schema import Config, ConfigError
from maskrcnn.fileio import read_yaml

log = logging.getLogger(__name__)

# Detectron2's defaults (detectron2/config/defaults.py) for every key read or checked here.
DEFAULTS: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 2,
    "MODEL.FPN.IN_FEATURES": [],
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.FPN.NORM": "",
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": 0,
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.RPN.IN_FEATURES": ["res4"],
    "MODEL.RPN.BOUNDARY_THRESH": -1,
    "MODEL.RPN.IOU_THRESHOLDS": [0.3, 0.7],
    "MODEL.RPN.IOU_LABELS": [0, -1, 1],
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256,
    "MODEL.RPN.POSITIVE_FRACTION": 0.5,
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT": 1.0,
    "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
    "MODEL.RPN.SMOOTH_L1_BETA": 0.0,
    "MODEL.RPN.LOSS_WEIGHT": 1.0,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.CONV_DIMS": [-1],
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": [0.5],
    "MODEL.ROI_HEADS.IOU_LABELS": [0, 1],
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,
    "MODEL.ROI_BOX_HEAD.NAME": "",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 1.0,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 0,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
    "MODEL.ROI_BOX_HEAD.NORM": "",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False,
    "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS": [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0],
                                                    [30.0, 30.0, 15.0, 15.0]],
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS": [0.5, 0.6, 0.7],
    "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": False,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": False,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": 0.5,
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": 50,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 0,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
    "MODEL.ROI_MASK_HEAD.NORM": "",
    "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": False,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.OUT_FEATURES": ["res4"],
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.RESNETS.DEFORM_MODULATED": False,
    "MODEL.RESNETS.DEFORM_NUM_GROUPS": 1,
    "MODEL.ROI_KEYPOINT_HEAD.NAME": "KRCNNConvDeconvUpsampleHead",
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS": [512] * 8,
    "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS": 17,
    "MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE": 1,
    "MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS": True,
    "MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT": 1.0,
    "TEST.KEYPOINT_OKS_SIGMAS": [],
    "INPUT.MIN_SIZE_TRAIN": [800],
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
    "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.RANDOM_FLIP": "horizontal",
    "INPUT.CROP.ENABLED": False,
    "INPUT.FORMAT": "BGR",
    "DATASETS.TRAIN": [],
    "DATASETS.TEST": [],
    "DATALOADER.ASPECT_RATIO_GROUPING": True,
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
    "DATALOADER.SAMPLER_TRAIN": "TrainingSampler",
    "TEST.DETECTIONS_PER_IMAGE": 100,
    "TEST.AUG.ENABLED": False,
    "TEST.PRECISE_BN.ENABLED": False,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.MAX_ITER": 40000,
    "SOLVER.BASE_LR": 0.001,
    "SOLVER.BASE_LR_END": 0.0,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.NESTEROV": False,
    "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.WEIGHT_DECAY_BIAS": None,
    "SOLVER.BIAS_LR_FACTOR": 1.0,
    "SOLVER.GAMMA": 0.1,
    "SOLVER.STEPS": [30000],
    "SOLVER.NUM_DECAYS": 3,
    "SOLVER.WARMUP_FACTOR": 0.001,
    "SOLVER.WARMUP_ITERS": 1000,
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.RESCALE_INTERVAL": False,
    "SOLVER.CHECKPOINT_PERIOD": 5000,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.REFERENCE_WORLD_SIZE": 0,
    "SOLVER.CLIP_GRADIENTS.ENABLED": False,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "value",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0,
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": 2.0,
    "SOLVER.AMP.ENABLED": False,
    "SEED": -1,
}

# Options that change only how Detectron2 trains, which our trainer does not reproduce: a value other
# than Detectron2's default is logged as a warning (the model and its outputs are unaffected).
TRAIN_ONLY = {
    "MODEL.RPN.BOUNDARY_THRESH", "MODEL.RPN.IOU_LABELS", "MODEL.RPN.BBOX_REG_LOSS_TYPE",
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", "MODEL.RPN.LOSS_WEIGHT", "MODEL.ROI_HEADS.IOU_LABELS",
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES",
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", "INPUT.CROP.ENABLED", "DATALOADER.SAMPLER_TRAIN",
    "TEST.PRECISE_BN.ENABLED", "SOLVER.BASE_LR_END", "SOLVER.NESTEROV", "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.WEIGHT_DECAY_BIAS", "SOLVER.BIAS_LR_FACTOR", "SOLVER.NUM_DECAYS", "SOLVER.WARMUP_METHOD",
    "SOLVER.RESCALE_INTERVAL", "SOLVER.REFERENCE_WORLD_SIZE", "SOLVER.AMP.ENABLED",
    "MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS",
}

# Sections and keys with no bearing on a GeneralizedRCNN Mask R-CNN as translated here (the switches
# that would bring them into play, e.g. META_ARCHITECTURE, are refused). The cascade section is read
# when ROI_HEADS.NAME is CascadeROIHeads, the keypoint section when KEYPOINT_ON, the deformable options
# when DEFORM_ON_PER_STAGE has a stage on: otherwise they have no effect, in Detectron2 too.
IGNORED = (
    "MODEL.RETINANET", "MODEL.SEM_SEG_HEAD", "MODEL.PANOPTIC_FPN", "MODEL.ROI_BOX_CASCADE_HEAD",
    "MODEL.ROI_KEYPOINT_HEAD", "MODEL.ANCHOR_GENERATOR.ANGLES", "MODEL.DEVICE", "MODEL.WEIGHTS",
    "MODEL.RESNETS.DEFORM_MODULATED", "MODEL.RESNETS.DEFORM_NUM_GROUPS", "INPUT.CROP", "INPUT.MASK_FORMAT",
    "DATALOADER", "DATASETS", "TEST.AUG", "TEST.PRECISE_BN", "TEST.EXPECTED_RESULTS", "TEST.EVAL_PERIOD",
    "TEST.KEYPOINT_OKS_SIGMAS", "OUTPUT_DIR", "CUDNN_BENCHMARK", "VIS_PERIOD", "VERSION", "GLOBAL",
    "FLOAT32_PRECISION",
)

_NORMS = {"FrozenBN": "frozen_bn", "BN": "bn", "SyncBN": "bn", "naiveSyncBN": "bn", "GN": "gn"}
_HEAD_NORMS = {"": "", "BN": "bn", "SyncBN": "bn", "naiveSyncBN": "bn", "GN": "gn"}
_POOLERS = {"ROIAlignV2": ("roialign", True), "ROIAlign": ("roialign", False), "ROIPool": ("roipool", False)}
_FPN_LEVELS = ["res2", "res3", "res4", "res5"]
# Smallest normal float32: `width >= this` is Detectron2's `width > 0` for proposals (MIN_SIZE 0).
_POSITIVE = 1.1754943508222875e-38


# ---- reading ------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "Detectron2 config", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"Detectron2 config '{path}' must hold a mapping of keys")
    return data


def is_detectron2_config(path: str | os.PathLike) -> bool:
    """Return True when the YAML file looks like Detectron2's (top-level MODEL or _BASE_ keys)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # our own loader reports the problem
    return isinstance(data, dict) and ("MODEL" in data or "_BASE_" in data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Return the YAML merged over its `_BASE_` files (paths relative to the including file)."""
    if path.resolve() in seen:
        raise ConfigError(f"Detectron2 config '{path}' includes itself through _BASE_")
    data = _read_yaml(path)
    base = data.pop("_BASE_", None)
    if not base:
        return data
    base_path = Path(os.path.expanduser(str(base)))
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"Detectron2 config '{path}': its _BASE_ '{base}' does not exist ({base_path})")
    return _merge(read_chain(base_path, seen + (path.resolve(),)), data)


def _plain(value: Any) -> Any:
    """Return a value as yacs reads it: strings holding Python literals decoded, tuples as lists."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) if isinstance(v, (list, tuple)) else v for v in value]
    return value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


class _Keys:
    """The flattened Detectron2 config; remembers which keys the translation read."""

    def __init__(self, flat: dict[str, Any], path: Path):
        self.flat = flat
        self.path = path
        self.used: set[str] = set()

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.flat[key] if key in self.flat else DEFAULTS[key]

    def skip(self, *keys: str) -> None:
        """Mark keys that do not apply to the architecture being built (e.g. FPN keys for C4)."""
        self.used.update(keys)

    def refuse(self, key: str, why: str) -> ConfigError:
        return ConfigError(
            f"Detectron2 config '{self.path}': {key} = {self.get(key)!r} is not supported ({why})"
        )

    def require(self, key: str, allowed: list[Any], why: str) -> Any:
        value = self.get(key)
        if value not in allowed:
            raise self.refuse(key, why)
        return value


# ---- translation --------------------------------------------------------------------------------


def translate_detectron2_config(path: str | os.PathLike) -> Config:
    """Return our Config for a Detectron2 config file; ConfigError names any key we cannot honour."""
    path = Path(path)
    keys = _Keys(_flatten(read_chain(path)), path)
    cfg = Config()
    _check_architecture(keys)
    _translate_backbone(keys, cfg)
    _translate_heads(keys, cfg)
    _translate_keypoints(keys, cfg)
    _translate_input(keys, cfg)
    _translate_solver(keys, cfg)
    _translate_classes(keys, cfg)
    _check_leftovers(keys)
    validate(cfg)
    return cfg


def _check_architecture(k: _Keys) -> None:
    k.require("MODEL.META_ARCHITECTURE", ["GeneralizedRCNN"], "only Mask R-CNN / Faster R-CNN is implemented")
    k.require("MODEL.LOAD_PROPOSALS", [False], "precomputed proposals are not supported")
    k.require("MODEL.PROPOSAL_GENERATOR.NAME", ["RPN"], "only the standard RPN is implemented")
    k.require("MODEL.ANCHOR_GENERATOR.NAME", ["DefaultAnchorGenerator"], "only axis-aligned anchors")
    k.require("MODEL.RPN.HEAD_NAME", ["StandardRPNHead"], "only the standard RPN head is implemented")
    k.require("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", [False], "sigmoid class scores are not implemented")
    k.require("TEST.AUG.ENABLED", [False], "test-time augmentation is not implemented")
    k.require("MODEL.RESNETS.STEM_OUT_CHANNELS", [64], "the stem has 64 channels here")


def _translate_backbone(k: _Keys, cfg: Config) -> None:
    b = cfg.model.backbone
    b.depth = k.require("MODEL.RESNETS.DEPTH", [18, 34, 50, 101, 152], "ResNet depth 18/34/50/101/152")
    b.groups = k.get("MODEL.RESNETS.NUM_GROUPS")
    b.width_per_group = k.get("MODEL.RESNETS.WIDTH_PER_GROUP")
    if b.depth < 50 and (b.groups, b.width_per_group) != (1, 64):
        raise k.refuse("MODEL.RESNETS.NUM_GROUPS", f"ResNet-{b.depth} has basic blocks, no groups/width")
    if b.depth < 50:
        k.require("MODEL.RESNETS.RES2_OUT_CHANNELS", [64], f"ResNet-{b.depth} has 64 res2 channels")
    else:  # a thinner (or wider) bottleneck trunk than the standard 256 res2 channels
        res2 = k.get("MODEL.RESNETS.RES2_OUT_CHANNELS")
        if res2 <= 0 or res2 % 4 or (b.width_per_group * 256) % res2:
            raise k.refuse("MODEL.RESNETS.RES2_OUT_CHANNELS", "a multiple of 4 dividing 256 x WIDTH_PER_GROUP")
        b.res2_channels = 0 if res2 == 256 else res2
    norm = k.require("MODEL.RESNETS.NORM", list(_NORMS), "FrozenBN, BN, SyncBN or GN")
    b.norm = _NORMS[norm]
    b.stride_in_1x1 = bool(k.get("MODEL.RESNETS.STRIDE_IN_1X1")) and b.depth >= 50
    b.trainable_stages = 5 - k.require("MODEL.BACKBONE.FREEZE_AT", [0, 1, 2, 3, 4, 5], "0..5")
    name = k.require("MODEL.BACKBONE.NAME", ["build_resnet_fpn_backbone", "build_resnet_backbone"],
                     "ResNet + FPN or ResNet C4")
    out_features = k.get("MODEL.RESNETS.OUT_FEATURES")
    if name == "build_resnet_fpn_backbone":
        b.kind = "fpn"
        k.require("MODEL.FPN.IN_FEATURES", [_FPN_LEVELS], "FPN over res2..res5")
        if not set(_FPN_LEVELS) <= set(out_features):
            raise k.refuse("MODEL.RESNETS.OUT_FEATURES", "FPN needs res2..res5")
        k.require("MODEL.FPN.FUSE_TYPE", ["sum"], "FPN sums lateral and top-down features")
        b.fpn_channels = k.get("MODEL.FPN.OUT_CHANNELS")
        b.fpn_norm = _HEAD_NORMS[k.require("MODEL.FPN.NORM", list(_HEAD_NORMS), "'', BN or GN")]
        k.require("MODEL.RPN.IN_FEATURES", [["p2", "p3", "p4", "p5", "p6"]], "the RPN runs on P2..P6")
        k.require("MODEL.ROI_HEADS.IN_FEATURES", [["p2", "p3", "p4", "p5"]], "RoIs pool from P2..P5")
        k.require("MODEL.ROI_HEADS.NAME", ["StandardROIHeads", "CascadeROIHeads"],
                  "FPN models use StandardROIHeads or CascadeROIHeads")
    elif out_features == ["res5"]:  # DC5 (res5 dilated, stride 16) or plain C5: one map, FPN-style heads
        b.kind = "c5"
        k.require("MODEL.RPN.IN_FEATURES", [["res5"]], "the DC5 / C5 RPN runs on res5")
        k.require("MODEL.ROI_HEADS.IN_FEATURES", [["res5"]], "DC5 / C5 RoIs pool from res5")
        k.require("MODEL.ROI_HEADS.NAME", ["StandardROIHeads", "CascadeROIHeads"],
                  "DC5 / C5 models use StandardROIHeads or CascadeROIHeads")
        k.skip("MODEL.FPN.IN_FEATURES", "MODEL.FPN.OUT_CHANNELS", "MODEL.FPN.NORM", "MODEL.FPN.FUSE_TYPE")
    else:
        b.kind = "c4"
        k.require("MODEL.RESNETS.OUT_FEATURES", [["res4"]], "a C4 backbone outputs res4 (DC5: res5)")
        k.require("MODEL.RPN.IN_FEATURES", [["res4"]], "the C4 RPN runs on res4")
        k.require("MODEL.ROI_HEADS.IN_FEATURES", [["res4"]], "C4 RoIs pool from res4")
        k.require("MODEL.ROI_HEADS.NAME", ["Res5ROIHeads"], "C4 models use Res5ROIHeads")
        k.skip("MODEL.FPN.IN_FEATURES", "MODEL.FPN.OUT_CHANNELS", "MODEL.FPN.NORM", "MODEL.FPN.FUSE_TYPE")
    _translate_trunk_options(k, cfg)


def _translate_trunk_options(k: _Keys, cfg: Config) -> None:
    """RES5_DILATION (DC5) and the deformable 3x3 convs (DEFORM_ON_PER_STAGE and its two options)."""
    b = cfg.model.backbone
    dilation = k.require("MODEL.RESNETS.RES5_DILATION", [1, 2], "1 or 2, as Detectron2 asserts")
    if dilation == 2 and b.kind == "fpn":
        raise k.refuse("MODEL.RESNETS.RES5_DILATION", "an FPN needs res5 at stride 32; dilation is for DC5")
    if dilation == 2 and b.depth < 50:
        raise k.refuse("MODEL.RESNETS.RES5_DILATION", f"ResNet-{b.depth} has basic blocks, as Detectron2 asserts")
    # C4: Detectron2's backbone stops at res4 and Res5ROIHeads builds res5 undilated: the key has no effect.
    b.res5_dilation = dilation if b.kind == "c5" else 1
    per_stage = k.get("MODEL.RESNETS.DEFORM_ON_PER_STAGE")
    if len(per_stage) != 4:
        raise k.refuse("MODEL.RESNETS.DEFORM_ON_PER_STAGE", "one flag per stage res2..res5")
    b.deform_stages = [stage for stage, on in zip((2, 3, 4, 5), per_stage) if on]
    if not b.deform_stages:
        k.skip("MODEL.RESNETS.DEFORM_MODULATED", "MODEL.RESNETS.DEFORM_NUM_GROUPS")
        return
    if b.depth < 50:
        raise k.refuse("MODEL.RESNETS.DEFORM_ON_PER_STAGE", f"ResNet-{b.depth} has basic blocks, no deformable convs")
    if b.kind == "c4" and 5 in b.deform_stages:
        raise k.refuse("MODEL.RESNETS.DEFORM_ON_PER_STAGE", "the C4 res5 head is not deformable, as Detectron2 asserts")
    b.deform_modulated = bool(k.get("MODEL.RESNETS.DEFORM_MODULATED"))
    b.deform_groups = k.get("MODEL.RESNETS.DEFORM_NUM_GROUPS")
    if b.deform_groups < 1:
        raise k.refuse("MODEL.RESNETS.DEFORM_NUM_GROUPS", "at least 1")


def _translate_heads(k: _Keys, cfg: Config) -> None:
    m = cfg.model
    fpn = m.backbone.kind == "fpn"
    c4 = m.backbone.kind == "c4"
    levels = 5 if fpn else 1
    # Anchors: one list of sizes per level (a single list is used on every level), shared ratios.
    sizes = k.get("MODEL.ANCHOR_GENERATOR.SIZES")
    sizes = sizes * levels if len(sizes) == 1 else sizes
    if len(sizes) != levels or len({len(s) for s in sizes}) != 1:
        raise k.refuse("MODEL.ANCHOR_GENERATOR.SIZES", f"one list per level ({levels}), equally long")
    ratios = k.get("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    if any(list(r) != list(ratios[0]) for r in ratios):
        raise k.refuse("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "the same ratios on every level")
    m.anchors.sizes = [[float(s) for s in level] for level in sizes]
    m.anchors.aspect_ratios = [float(r) for r in ratios[0]]
    m.anchors.offset = float(k.get("MODEL.ANCHOR_GENERATOR.OFFSET"))
    m.anchors.round_base = False
    m.anchors.stride_from_image = False
    m.size_divisibility = 32 if fpn else 1  # Detectron2 pads to the FPN's coarsest input stride only
    # Detectron2's arithmetic, so outputs agree to float32 rounding: NCHW convolutions, each frozen BN
    # applied after its conv. (Folding / channels-last are faster and differ by ~1e-3 px on boxes.)
    m.channels_last = False
    m.backbone.fold_frozen_bn = False

    rpn = m.rpn
    channels = m.backbone.fpn_channels if fpn else _trunk_channels(m.backbone.depth, m.backbone.res2_channels,
                                                                   5 if m.backbone.kind == "c5" else 4)
    conv_dims = k.get("MODEL.RPN.CONV_DIMS")
    if len(conv_dims) != 1 or conv_dims[0] not in (-1, channels):
        raise k.refuse("MODEL.RPN.CONV_DIMS", "one 3x3 conv as wide as its input")
    rpn.head_convs, rpn.head_norm = 1, ""
    rpn.pre_nms_top_n_train = k.get("MODEL.RPN.PRE_NMS_TOPK_TRAIN")
    rpn.pre_nms_top_n_test = k.get("MODEL.RPN.PRE_NMS_TOPK_TEST")
    rpn.post_nms_top_n_train = k.get("MODEL.RPN.POST_NMS_TOPK_TRAIN")
    rpn.post_nms_top_n_test = k.get("MODEL.RPN.POST_NMS_TOPK_TEST")
    rpn.nms_thresh = float(k.get("MODEL.RPN.NMS_THRESH"))
    rpn.min_size = float(k.get("MODEL.PROPOSAL_GENERATOR.MIN_SIZE")) or _POSITIVE
    rpn.score_thresh = 0.0
    bg, fg = _two_thresholds(k, "MODEL.RPN.IOU_THRESHOLDS")
    rpn.bg_iou_thresh, rpn.fg_iou_thresh = bg, fg
    rpn.batch_size_per_image = k.get("MODEL.RPN.BATCH_SIZE_PER_IMAGE")
    rpn.positive_fraction = float(k.get("MODEL.RPN.POSITIVE_FRACTION"))
    rpn.bbox_reg_weights = [float(w) for w in k.get("MODEL.RPN.BBOX_REG_WEIGHTS")]
    rpn.smooth_l1_beta = float(k.get("MODEL.RPN.SMOOTH_L1_BETA"))

    box = m.box_head
    box.pooler.type, box.pooler.aligned = _pooler(k, "MODEL.ROI_BOX_HEAD")
    box.pooler.output_size = k.get("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION")
    box.pooler.sampling_ratio = k.get("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")
    box_keys = ["NAME", "NUM_FC", "NUM_CONV", "FC_DIM", "CONV_DIM", "NORM"]
    if not c4:
        k.require("MODEL.ROI_BOX_HEAD.NAME", ["FastRCNNConvFCHead"], "the conv/fc box head")
        num_fc, num_conv = k.get("MODEL.ROI_BOX_HEAD.NUM_FC"), k.get("MODEL.ROI_BOX_HEAD.NUM_CONV")
        if (num_conv, num_fc) == (0, 2):
            box.type = "2fc"
        elif num_fc == 1 and num_conv > 0:
            box.type, box.num_convs = "4conv1fc", num_conv
        else:
            raise k.refuse("MODEL.ROI_BOX_HEAD.NUM_FC", f"box heads are 2 fc, or convs + 1 fc (NUM_CONV={num_conv})")
        box.fc_dim = k.get("MODEL.ROI_BOX_HEAD.FC_DIM")
        box.conv_dim = k.get("MODEL.ROI_BOX_HEAD.CONV_DIM")
        box.norm = _HEAD_NORMS[k.require("MODEL.ROI_BOX_HEAD.NORM", list(_HEAD_NORMS), "'', BN or GN")]
    else:
        box.type = "res5"
        k.skip(*(f"MODEL.ROI_BOX_HEAD.{name}" for name in box_keys))
    box.fg_iou_thresh = box.bg_iou_thresh = float(k.get("MODEL.ROI_HEADS.IOU_THRESHOLDS")[-1])
    if len(k.get("MODEL.ROI_HEADS.IOU_THRESHOLDS")) == 2:
        box.bg_iou_thresh = float(k.get("MODEL.ROI_HEADS.IOU_THRESHOLDS")[0])
    box.class_agnostic = bool(k.get("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"))
    if k.get("MODEL.ROI_HEADS.NAME") == "CascadeROIHeads":
        _translate_cascade(k, cfg)
    box.batch_size_per_image = k.get("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    box.positive_fraction = float(k.get("MODEL.ROI_HEADS.POSITIVE_FRACTION"))
    box.bbox_reg_weights = [float(w) for w in k.get("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS")]
    box.smooth_l1_beta = float(k.get("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA"))
    box.score_thresh = float(k.get("MODEL.ROI_HEADS.SCORE_THRESH_TEST"))
    box.nms_thresh = float(k.get("MODEL.ROI_HEADS.NMS_THRESH_TEST"))
    box.detections_per_image = k.get("TEST.DETECTIONS_PER_IMAGE")
    box.min_size = 0.0  # Detectron2 keeps empty boxes through NMS; they are dropped after resizing back
    m.num_classes = k.get("MODEL.ROI_HEADS.NUM_CLASSES")

    mask = m.mask_head
    mask.enabled = bool(k.get("MODEL.MASK_ON"))
    mask_keys = ["NAME", "POOLER_RESOLUTION", "POOLER_SAMPLING_RATIO", "POOLER_TYPE", "NUM_CONV", "CONV_DIM",
                 "NORM", "CLS_AGNOSTIC_MASK"]
    if not mask.enabled:
        k.skip(*(f"MODEL.ROI_MASK_HEAD.{name}" for name in mask_keys))
        return
    k.require("MODEL.ROI_MASK_HEAD.NAME", ["MaskRCNNConvUpsampleHead"], "the conv + deconv mask head")
    mask.conv_dim = k.get("MODEL.ROI_MASK_HEAD.CONV_DIM")
    mask.class_agnostic = bool(k.get("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK"))
    mask.threshold = 0.5
    mask.paste = "detectron2"
    if not c4:
        mask.num_convs = k.get("MODEL.ROI_MASK_HEAD.NUM_CONV")
        mask.norm = _HEAD_NORMS[k.require("MODEL.ROI_MASK_HEAD.NORM", list(_HEAD_NORMS), "'', BN or GN")]
        mask.pooler.type, mask.pooler.aligned = _pooler(k, "MODEL.ROI_MASK_HEAD")
        mask.pooler.output_size = k.get("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION")
        mask.pooler.sampling_ratio = k.get("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO")
    else:  # C4: the mask head runs on the box branch's res5 features, with no convs of its own
        k.require("MODEL.ROI_MASK_HEAD.NUM_CONV", [0], "the C4 mask head has no convs before its deconv")
        k.require("MODEL.ROI_MASK_HEAD.NORM", [""], "the C4 mask head has no norm")
        k.skip(*(f"MODEL.ROI_MASK_HEAD.{name}" for name in mask_keys))


def _trunk_channels(depth: int, res2_channels: int, stage: int) -> int:
    """Return the output channels of res`stage` (4 or 5): res2's (256, thin: RES2_OUT_CHANNELS; basic
    blocks: 64) doubled per stage after it."""
    res2 = (res2_channels or 256) if depth >= 50 else 64
    return res2 * 2 ** (stage - 2)


def _translate_keypoints(k: _Keys, cfg: Config) -> None:
    """KEYPOINT_ON: Detectron2's KRCNNConvDeconvUpsampleHead (3x3 convs, 2x deconv, bilinear 2x) and its decoding."""
    kp = cfg.model.keypoint_head
    kp.enabled = bool(k.get("MODEL.KEYPOINT_ON"))
    if not kp.enabled:
        return
    k.require("MODEL.ROI_KEYPOINT_HEAD.NAME", ["KRCNNConvDeconvUpsampleHead"], "the conv + deconv keypoint head")
    if cfg.model.backbone.kind != "fpn":
        raise k.refuse("MODEL.KEYPOINT_ON", "keypoint heads run on FPN models here")
    dims = k.get("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS")
    if len(set(dims)) > 1:
        raise k.refuse("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "convs of one width")
    kp.num_convs = len(dims)
    kp.conv_dim = dims[0] if dims else kp.conv_dim
    kp.norm = ""
    kp.num_keypoints = k.get("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS")
    kp.pooler.type, kp.pooler.aligned = _pooler(k, "MODEL.ROI_KEYPOINT_HEAD")
    kp.pooler.output_size = k.get("MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION")
    kp.pooler.sampling_ratio = k.get("MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO")
    kp.loss_weight = float(k.get("MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT"))
    kp.min_keypoints_per_image = k.get("MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE")
    kp.oks_sigmas = [float(v) for v in k.get("TEST.KEYPOINT_OKS_SIGMAS")]
    kp.score = "detectron2"


def _translate_cascade(k: _Keys, cfg: Config) -> None:
    """CascadeROIHeads: one stage per IoU of ROI_BOX_CASCADE_HEAD, each with its box-coder weights."""
    cascade = cfg.model.box_head.cascade
    cascade.enabled = True
    k.require("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", [True], "Detectron2's cascade needs class-agnostic boxes")
    cascade.ious = [float(iou) for iou in k.get("MODEL.ROI_BOX_CASCADE_HEAD.IOUS")]
    weights = k.get("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS")
    if len(weights) != len(cascade.ious) or any(len(w) != 4 for w in weights):
        raise k.refuse("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", "4 weights per stage, one stage per IoU")
    cascade.bbox_reg_weights = [[float(v) for v in w] for w in weights]
    cascade.loss_weights = [1.0] * len(cascade.ious)  # Detectron2 sums the stages' losses
    if cascade.ious[0] != k.get("MODEL.ROI_HEADS.IOU_THRESHOLDS")[0]:  # Detectron2 asserts the same
        raise k.refuse("MODEL.ROI_HEADS.IOU_THRESHOLDS", "the first cascade stage's IoU must be the RoI heads' threshold")


def _pooler(k: _Keys, section: str) -> tuple[str, bool]:
    kind = k.require(f"{section}.POOLER_TYPE", list(_POOLERS), "ROIAlignV2, ROIAlign or ROIPool")
    return _POOLERS[kind]


def _two_thresholds(k: _Keys, key: str) -> tuple[float, float]:
    values = k.get(key)
    if len(values) != 2:
        raise k.refuse(key, "two thresholds [background, foreground]")
    return float(values[0]), float(values[1])


def _translate_input(k: _Keys, cfg: Config) -> None:
    m, i = cfg.model, cfg.input
    m.input_format = k.require("INPUT.FORMAT", ["BGR", "RGB"], "BGR or RGB images")
    mean, std = k.get("MODEL.PIXEL_MEAN"), k.get("MODEL.PIXEL_STD")
    if len(mean) != 3 or len(std) != 3:
        raise k.refuse("MODEL.PIXEL_MEAN", "3 channels")
    m.pixel_mean = [float(v) / 255 for v in mean]  # ours are on the 0..1 scale
    m.pixel_std = [float(v) / 255 for v in std]
    i.resize = "pil"
    i.min_size_test = k.get("INPUT.MIN_SIZE_TEST")
    if i.min_size_test <= 0:
        raise k.refuse("INPUT.MIN_SIZE_TEST", "inference without resizing is not implemented")
    i.max_size_test = k.get("INPUT.MAX_SIZE_TEST")
    i.max_size_train = k.get("INPUT.MAX_SIZE_TRAIN")
    sizes = k.get("INPUT.MIN_SIZE_TRAIN")
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    sampling = k.get("INPUT.MIN_SIZE_TRAIN_SAMPLING")
    if sampling == "range" and len(sizes) == 2:
        sizes = list(range(sizes[0], sizes[1] + 1))  # a uniform integer draw = a choice among them all
    elif sampling != "choice":
        _train_only(k, "INPUT.MIN_SIZE_TRAIN_SAMPLING", sampling, "each listed size is drawn with equal chance")
    i.min_size_train = sizes
    flip = k.get("INPUT.RANDOM_FLIP")
    i.horizontal_flip = 0.5 if flip == "horizontal" else 0.0
    if flip not in ("horizontal", "none"):
        _train_only(k, "INPUT.RANDOM_FLIP", flip, "no flip is used")
    cfg.data.aspect_ratio_grouping = bool(k.get("DATALOADER.ASPECT_RATIO_GROUPING"))
    cfg.data.filter_empty = bool(k.get("DATALOADER.FILTER_EMPTY_ANNOTATIONS"))


def _translate_solver(k: _Keys, cfg: Config) -> None:
    s = cfg.solver
    s.optimizer = "sgd"
    s.base_lr = float(k.get("SOLVER.BASE_LR"))
    s.momentum = float(k.get("SOLVER.MOMENTUM"))
    s.weight_decay = float(k.get("SOLVER.WEIGHT_DECAY"))
    s.ims_per_batch = k.get("SOLVER.IMS_PER_BATCH")
    s.max_iter = k.get("SOLVER.MAX_ITER")
    s.steps = list(k.get("SOLVER.STEPS"))
    s.gamma = float(k.get("SOLVER.GAMMA"))
    s.warmup_iters = k.get("SOLVER.WARMUP_ITERS")
    s.warmup_factor = float(k.get("SOLVER.WARMUP_FACTOR"))
    s.checkpoint_period = k.get("SOLVER.CHECKPOINT_PERIOD")
    schedule = k.get("SOLVER.LR_SCHEDULER_NAME")
    s.schedule = {"WarmupMultiStepLR": "step", "WarmupCosineLR": "cosine"}.get(schedule, "step")
    if schedule not in ("WarmupMultiStepLR", "WarmupCosineLR"):
        _train_only(k, "SOLVER.LR_SCHEDULER_NAME", schedule, "a step schedule is used")
    clip = k.get("SOLVER.CLIP_GRADIENTS.ENABLED")
    clip_type, value = k.get("SOLVER.CLIP_GRADIENTS.CLIP_TYPE"), k.get("SOLVER.CLIP_GRADIENTS.CLIP_VALUE")
    norm_type = k.get("SOLVER.CLIP_GRADIENTS.NORM_TYPE")
    if clip and clip_type == "norm" and norm_type == 2.0:
        s.clip_grad_norm = float(value)
    elif clip:
        _train_only(k, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type, "gradients are not clipped")
    seed = k.get("SEED")
    s.seed = seed if seed >= 0 else 0


def _translate_classes(k: _Keys, cfg: Config) -> None:
    """COCO models get COCO's class names and official category ids (predictions.json uses them)."""
    datasets = [str(d) for d in (k.get("DATASETS.TRAIN") or []) + (k.get("DATASETS.TEST") or [])]
    coco = datasets and all(d.startswith("coco_") and "panoptic" not in d and "keypoint" not in d for d in datasets)
    person = datasets and all(d.startswith("keypoints_coco_") for d in datasets)
    if coco and cfg.model.num_classes == 80:
        classes = Config()
        merge_file(classes, PRESET_DIR / "_coco-classes.yaml")
        cfg.model.class_names = classes.model.class_names
        cfg.model.category_ids = classes.model.category_ids
    elif person and cfg.model.num_classes == 1:  # COCO person keypoints: names and skeleton of the 17
        classes = Config()
        merge_file(classes, PRESET_DIR / "_coco-person-keypoints.yaml")
        cfg.model.class_names = classes.model.class_names
        cfg.model.category_ids = classes.model.category_ids
        if cfg.model.keypoint_head.num_keypoints == len(classes.model.keypoint_head.keypoint_names):
            cfg.model.keypoint_head.keypoint_names = classes.model.keypoint_head.keypoint_names
            cfg.model.keypoint_head.skeleton = classes.model.keypoint_head.skeleton


def _train_only(k: _Keys, key: str, value: Any, instead: str) -> None:
    log.warning("Detectron2 config %s: %s = %r only affects training and is not reproduced here (%s)",
                k.path, key, value, instead)


def _check_leftovers(k: _Keys) -> None:
    """Every key not translated must be ignorable; training-only differences are warned about."""
    for key, value in k.flat.items():
        if key in TRAIN_ONLY:
            if value != DEFAULTS[key]:
                _train_only(k, key, value, f"Detectron2's default {DEFAULTS[key]!r} behaviour is used")
            continue
        if key in k.used or any(key == p or key.startswith(p + ".") for p in IGNORED):
            continue
        if key in DEFAULTS and value == DEFAULTS[key]:
            continue
        raise ConfigError(
            f"Detectron2 config '{k.path}': {key} = {value!r} is not supported "
            f"(maskrcnn does not know this key, so it cannot reproduce it)"
        )
