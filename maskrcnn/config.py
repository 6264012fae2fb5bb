"""One typed config for model, data, input, solver, test and output; YAML presets; KEY=VALUE overrides.

A config is a tree of dataclasses. Presets are YAML files holding only the keys they change (plus an
optional `_base_` preset name). Every key is checked: an unknown key or a value of the wrong type is a
`ConfigError` that names the key and the nearest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maskrcnn.fileio import atomic_path, atomic_write_text, read_yaml  # noqa: F401  (atomic_*: re-exported)

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A user's config mistake, phrased as one line that says what to do."""


@dataclass
class BackboneConfig:
    """The ResNet/ResNeXt trunk, its normalisation, and FPN or C4."""

    depth: int = 50  # 18, 34, 50, 101, 152
    groups: int = 1  # ResNeXt cardinality (32 or 64); 1 = plain ResNet
    width_per_group: int = 64  # ResNeXt bottleneck width per group (4 or 8)
    norm: str = "frozen_bn"  # frozen_bn | bn | gn
    gn_groups: int = 32
    trainable_stages: int = 3  # how many of res5, res4, res3, res2, stem train (0..5)
    # fpn | c4 (res2..res4 at stride 16, res5 as the RoI head) | c5 (res5 at stride 32, FPN-style heads:
    # the paper's Table 2d backbone, where the res5 head cannot apply; with res5_dilation 2, Detectron2's DC5)
    kind: str = "fpn"
    # 2 = res5 without its stride 2 and with dilation-2 3x3 convs in every block (stride 16: "DC5", as
    # in R-FCN and the deformable-conv paper); 1 = the plain stage
    res5_dilation: int = 1
    # stages (2..5 = res2..res5) whose bottleneck 3x3 convs are deformable (Dai et al. 2017): each learns
    # per-position sampling offsets from a zero-initialised 3x3 conv (Detectron2's DEFORM_ON_PER_STAGE)
    deform_stages: list[int] = field(default_factory=list)
    deform_modulated: bool = False  # v2 (Zhu et al. 2019): a sigmoid mask weighs each sampled value
    deform_groups: int = 1  # offset groups: channels split in this many groups, each with its own offsets
    fpn_channels: int = 256
    fpn_norm: str = ""  # "" | gn  (torchvision v2 uses BatchNorm in FPN: "bn")
    weights: str = ""  # optional ImageNet state-dict file for the trunk (torchvision layout)
    # frozen BN folded into the preceding conv (W*scale, shift as bias): fewer passes, same function
    fold_frozen_bn: bool = True
    stride_in_1x1: bool = False  # bottlenecks stride in the 1x1 conv (MSRA/Detectron2), not the 3x3
    # res2's output channels (doubling per stage), bottlenecks a quarter as wide: 0 = the standard
    # 64 x block expansion. Smaller = a thin trunk (Detectron2's RES2_OUT_CHANNELS, e.g. 64 for R50).
    res2_channels: int = 0


@dataclass
class AnchorConfig:
    """Anchor sizes per level (one tuple per feature map) and aspect ratios (h/w)."""

    sizes: list[list[float]] = field(default_factory=lambda: [[32], [64], [128], [256], [512]])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    offset: float = 0.0  # anchor centre offset in units of the stride (Detectron2 uses 0.0)
    round_base: bool = False  # round the base anchors to whole pixels (torchvision does)
    stride_from_image: bool = False  # stride = padded image size // grid size (torchvision) or nominal


@dataclass
class RPNConfig:
    """Region Proposal Network: head, proposal selection, matching, sampling and loss."""

    head_convs: int = 1  # torchvision v2 uses 2 conv layers with norm
    head_norm: str = ""  # "" | bn
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    bbox_reg_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    smooth_l1_beta: float = 1.0 / 9  # 0 = L1 loss


@dataclass
class PoolerConfig:
    """Feature pooling for one RoI head: RoIAlign (aligned or not) or RoIPool."""

    type: str = "roialign"  # roialign | roipool
    aligned: bool = False  # half-pixel correction (Detectron2's ROIAlignV2)
    output_size: int = 7
    sampling_ratio: int = 2  # 0 = adaptive, as in the paper's reference code
    canonical_size: int = 224
    canonical_level: int = 4


@dataclass
class CascadeConfig:
    """Cascade R-CNN (Cai & Vasconcelos): box-head stages in a row, each trained at a higher IoU on the
    boxes the previous stage refined; one stage per entry of `ious` (and of the two lists after it)."""

    enabled: bool = False
    ious: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    bbox_reg_weights: list[list[float]] = field(
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]])
    # each stage's classification and box losses are multiplied by its weight (Detectron2: all 1;
    # the paper's code: 1, 0.5, 0.25); the pooled features' gradient is divided by the number of stages
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


@dataclass
class BoxHeadConfig:
    """Box branch: feature head, class-specific (or class-agnostic) regression, sampling, post-processing."""

    type: str = "2fc"  # 2fc | 4conv1fc | res5 (C4)
    fc_dim: int = 1024
    conv_dim: int = 256
    num_convs: int = 4
    norm: str = ""  # "" | bn | gn (for 4conv1fc)
    pooler: PoolerConfig = field(default_factory=PoolerConfig)
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    class_agnostic: bool = False  # one box regression per RoI instead of one per class
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    smooth_l1_beta: float = 1.0 / 9
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    min_size: float = 1e-2  # detections narrower or lower than this (resized px) are dropped before NMS


@dataclass
class MaskHeadConfig:
    """Mask branch: a small FCN over RoIAligned features, per-class sigmoid masks.

    `type`, `loss` and `class_agnostic` switch to the alternatives the paper ablates (Table 2b, 2e).
    """

    enabled: bool = True
    type: str = "fcn"  # fcn (convs + deconvolution) | mlp (fully connected layers, the paper's Table 2e)
    loss: str = "sigmoid"  # sigmoid (per-class binary masks) | softmax (one multinomial across classes)
    num_fcs: int = 2  # mlp: hidden fully connected layers
    fc_dim: int = 1024  # mlp: their width
    num_convs: int = 4
    conv_dim: int = 256
    norm: str = ""  # "" | bn | gn
    class_agnostic: bool = False
    pooler: PoolerConfig = field(default_factory=lambda: PoolerConfig(output_size=14))
    # Training: at most this many positive RoIs per image run the mask head (a random subset of the
    # sampled positives); 0 = all of them, as in the paper. Few objects per image each matched by many
    # proposals make most mask RoIs near-duplicates, and the head's cost grows with their number.
    max_rois_per_image: int = 0
    loss_weight: float = 1.0  # the mask loss's weight in the total (the paper's L = L_cls + L_box + L_mask: 1)
    threshold: float = 0.5
    paste: str = "torchvision"  # torchvision (integer box, padded mask) | detectron2 (grid_sample)


@dataclass
class KeypointHeadConfig:
    """Keypoint branch (Keypoint R-CNN): an FCN predicting one m×m heat-map per keypoint, softmax over m²."""

    enabled: bool = False
    num_keypoints: int = 17
    num_convs: int = 8
    conv_dim: int = 512
    norm: str = ""  # "" | bn | gn
    pooler: PoolerConfig = field(default_factory=lambda: PoolerConfig(output_size=14))
    loss_weight: float = 1.0
    # training images with fewer visible keypoints (all instances together) are skipped (Detectron2: 1)
    min_keypoints_per_image: int = 1
    # names, COCO-style skeleton (1-based index pairs) and OKS sigmas; empty = from the dataset / COCO's
    keypoint_names: list[str] = field(default_factory=list)
    skeleton: list[list[int]] = field(default_factory=list)
    oks_sigmas: list[float] = field(default_factory=list)
    # each keypoint's score: logit (the heat-map logit at the arg-max, torchvision's) | detectron2 (its
    # softmax over the heat-map, normalised over the m×m logits: Detectron2's pred_keypoints score)
    score: str = "logit"


@dataclass
class ModelConfig:
    """The whole network."""

    num_classes: int = 80  # foreground classes; labels 1..num_classes, 0 = background
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)  # dataset category id per label; [] = the label
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # RGB, 0..1
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    input_format: str = "RGB"  # RGB | BGR (channel order the network expects)
    size_divisibility: int = 32
    # Convolutions in NHWC layout: oneDNN's fast path on CPUs (AVX-512/AMX); the results are the same.
    channels_last: bool = True
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint_head: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)


@dataclass
class CropConfig:
    """Random crop of training images, before the model's resize (docs/augmentation.md)."""

    enabled: bool = False
    type: str = "absolute"  # absolute: size = [h, w] pixels | relative_range: size = [lo, hi] of each side
    size: list[float] = field(default_factory=lambda: [512.0, 512.0])
    # instances cut to fewer pixels than this, or to less than this fraction of their pixels, become crowd
    # regions (ignored: neither object nor background); instances with no pixel left are removed
    min_visible_area_px: float = 0.0
    min_visible_fraction: float = 0.0


@dataclass
class ColorJitterConfig:
    """Photometric jitter of training images: each factor is drawn uniformly in [1 - v, 1 + v]; 0 = off."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0


@dataclass
class InputConfig:
    """Resizing and augmentation. Images are resized inside the model (one path for train and test)."""

    min_size_train: list[int] = field(default_factory=lambda: [800])  # several = multi-scale
    # choice: one of min_size_train per image | range: min_size_train = [lo, hi], an integer drawn uniformly
    # in lo..hi (Detectron2's ResizeShortestEdge with sample_style="range": scale jitter)
    min_size_train_sampling: str = "choice"
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    horizontal_flip: float = 0.5  # probability
    vertical_flip: float = 0.0  # probability
    rotate90: float = 0.0  # probability of a quarter turn (90, 180 or 270 degrees, equally likely)
    crop: CropConfig = field(default_factory=CropConfig)
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)
    max_pixels: int = 100_000_000  # larger images are refused with a clear error
    # tensor: bilinear on the float tensor, sizes floored (torchvision); pil: uint8 image resized by
    # PIL bilinear, sizes rounded, normalised afterwards (Detectron2's ResizeShortestEdge)
    resize: str = "tensor"


@dataclass
class DataConfig:
    """COCO-format datasets as `ANN.json:IMAGE_DIR` strings."""

    train: list[str] = field(default_factory=list)
    val: str = ""
    filter_empty: bool = True  # drop training images without usable annotations
    num_workers: int = 0
    aspect_ratio_grouping: bool = True
    max_bad_images: int = 50  # unreadable training images skipped (each replaced) before the run stops
    max_worker_restarts: int = 5  # data-loader worker deaths survived (loader restarted) before it stops
    # A folder for parsed annotation files (numpy arrays keyed by the file's SHA-256): large COCO files
    # load in seconds the second time. "" = off.
    cache_dir: str = ""


@dataclass
class SolverConfig:
    """Optimiser, schedule, precision and checkpointing."""

    optimizer: str = "sgd"  # sgd | adamw
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm_bias: bool = True  # False: no decay on norm layers and biases
    ims_per_batch: int = 16
    max_iter: int = 90000
    max_minutes: float = 0.0  # > 0: stop (and save) after this wall time
    schedule: str = "step"  # step | cosine
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 = off
    nonfinite: str = "stop"  # stop | skip: on a NaN/inf loss or gradient, stop the run or skip the update
    max_nonfinite_skips: int = 10  # with nonfinite=skip: consecutive skipped steps before the run stops
    amp: str = ""  # "" | bf16 | fp16 | auto (bf16 where the device computes it natively, else none)
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0 = only at the end (when data.val is set)
    log_period: int = 20
    seed: int = 0
    # Distributed training (torchrun, docs/distributed.md): ims_per_batch is the total over all processes.
    # > 0: the number of processes this config was written for; another number of processes scales
    # ims_per_batch and base_lr by (processes / reference_world_size) and max_iter, steps, warm-up and
    # the periods inversely (the linear rule; Detectron2's SOLVER.REFERENCE_WORLD_SIZE). 0 = off.
    reference_world_size: int = 0
    sync_bn: bool = False  # several processes: BatchNorm layers (norm=bn) become SyncBatchNorm (CUDA only)
    dist_timeout_minutes: float = 30.0  # a collective operation waiting longer than this fails the job
    dist_heartbeat_timeout: float = 60.0  # seconds without a heartbeat after which a process counts as dead


class Switch(str):
    """The type of a three-way config switch: true, false or auto (YAML's true/false/yes/no/on/off too).

    Stored as the plain string "true", "false" or "auto" (see `_coerce`), so configs stay plain YAML.
    """

    VALUES = ("false", "true", "auto")


@dataclass
class TilingConfig:
    """Tiled inference for large images (maskrcnn.tiling): overlapping windows at the model's own scale.

    Off by default: an image is resized to the test size whole, as ever.
    """

    # false: never tile | true: tile every image larger than one tile | auto: tile images whose longer
    # side exceeds `threshold`
    enabled: Switch = "false"
    # side of a square window in image pixels; each window is then resized like any input (shorter side
    # to input.min_size_test). Pick the size the training images had, so objects appear at the scale the
    # model learned. 0 = input.min_size_test (windows seen at their own resolution).
    tile_size: int = 0
    # share of tile_size that neighbouring windows overlap (0 <= overlap < 1): an object no longer than
    # this band is seen whole by some window, which the merge relies on
    overlap: float = 0.25
    threshold: int = 0  # auto: tile images whose longer side is above this many pixels; 0 = 2 x tile size
    # detections from different windows are duplicates when their masks (or, without masks, boxes) overlap
    # by more than this share of the smaller one (intersection over the smaller area)
    merge_threshold: float = 0.5


@dataclass
class TestConfig:
    """Evaluation options."""

    max_images: int = 0  # 0 = all
    # inference precision: fp32, or bf16/fp16 autocast for the network (box decoding, rescaling and
    # mask pasting stay float32); bf16 is fast on CPUs with AMX/AVX-512-BF16
    precision: str = "fp32"
    tiling: TilingConfig = field(default_factory=TilingConfig)


@dataclass
class Config:
    """The root config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    output_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda

    # ---- conversion -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain nested dicts and lists."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Return the full resolved config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config to `path` atomically."""
        atomic_write_text(Path(path), self.to_yaml())

    def clone(self) -> "Config":
        """Return a deep copy."""
        return copy.deepcopy(self)


# ---- typed merging ------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(annotation: Any) -> str:
    """Return how a config type reads in an error message ('an integer', 'a list of numbers', ...)."""
    if typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        return "a list of " + _plural(item_type)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            Switch: "true, false or auto"}.get(annotation, str(annotation))


def _plural(annotation: Any) -> str:
    if typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        return "lists of " + _plural(item_type)
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(annotation, str(annotation))


def _shown(value: Any) -> str:
    """Return a value as an error message shows it, saying what kind of thing it is when not a scalar."""
    if isinstance(value, dict):
        return f"a mapping {value!r}"
    if isinstance(value, list):
        return f"a list {value!r}"
    return repr(value)


def _wrong_type(key: str, annotation: Any, value: Any, finite: bool = False) -> ConfigError:
    expected = "a finite number" if finite else _describe(annotation)
    return ConfigError(f"config key '{key}' expects {expected}, got {_shown(value)}")


def _number_from_text(value: str) -> float | None:
    """Return the number written in `value` (YAML 1.1 reads '1e-4' as text), or None if it is not one."""
    try:
        return float(value.strip())
    except ValueError:
        return None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`, the value and the type."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if value is None or value == "":
            return []  # `KEY=` or `KEY: null` clears a list
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, dict):
            raise _wrong_type(key, annotation, value)
        items = value if isinstance(value, list) else [value]  # a scalar where a list is expected
        try:
            return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(items)]
        except ConfigError:
            raise _wrong_type(key, annotation, value) from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(key, annotation, value)
    if annotation is Switch:
        # YAML 1.1 reads on/off/yes/no as booleans: take them as true/false
        text = ("true" if value else "false") if isinstance(value, bool) else value
        if isinstance(text, str) and text.strip().lower() in Switch.VALUES:
            return text.strip().lower()  # a plain str: yaml.safe_dump cannot write a str subclass
        raise _wrong_type(key, annotation, value)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number_from_text(value) if isinstance(value, str) else value
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise _wrong_type(key, annotation, value)
    if annotation is float:
        number = _number_from_text(value) if isinstance(value, str) else value
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise _wrong_type(key, annotation, value, finite=True)
            return float(number)
        raise _wrong_type(key, annotation, value)
    if annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # output_dir=2024, a class named 7
        raise _wrong_type(key, annotation, value)
    raise ConfigError(f"config key '{key}' has an unsupported type {annotation}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, ann in _field_types(cls).items():
        full = f"{prefix}{name}"
        keys.append(full)
        if dataclasses.is_dataclass(ann):
            keys.extend(_all_keys(ann, full + "."))
    return keys


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.4)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def merge_dict(node: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Merge nested `values` into the dataclass `node` in place, checking keys and types."""
    if values is None and prefix:
        return  # an empty section in a YAML file (`solver:` with every key commented out)
    if not isinstance(values, dict):
        section = prefix.rstrip(".")
        if not section:
            raise ConfigError(f"a config must be a mapping of keys, got {_shown(values)}")
        first = next(iter(_field_types(type(node))))
        raise ConfigError(
            f"config key '{section}' is a section and expects a mapping of its keys "
            f"(e.g. '{section}.{first}'), got {_shown(values)}"
        )
    types = _field_types(type(node))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types:
            raise _unknown_key(key)
        ann = types[name]
        if dataclasses.is_dataclass(ann):
            merge_dict(getattr(node, name), value, key + ".")
        else:
            setattr(node, name, _coerce(value, ann, key))


def _check_key(key: str) -> None:
    """Raise ConfigError (naming the nearest valid key) unless `key` is a dotted path of the config."""
    node: Any = Config
    for part in key.split("."):
        types = _field_types(node) if dataclasses.is_dataclass(node) else {}
        if part not in types:
            raise _unknown_key(key)
        node = types[part]


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b.c=VALUE` strings (VALUE parsed as YAML) to `cfg` in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. solver.base_lr=0.01)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _check_key(key)  # the key's own spelling first; then the value's type, by merge_dict
        merge_dict(cfg, nested)
    validate(cfg)
    return cfg


def list_presets() -> list[str]:
    """Return the names of the built-in presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "config file", ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def _resolve_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file '{path}' does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    near = difflib.get_close_matches(name_or_path, list_presets(), n=1, cutoff=0.3)
    hint = f"; did you mean '{near[0]}'?" if near else f"; presets: {', '.join(list_presets())}"
    raise ConfigError(f"unknown preset or config file '{name_or_path}'{hint}")


def merge_file(cfg: Config, path: Path, seen: tuple[Path, ...] = ()) -> None:
    """Merge one of our YAML files (after its `_base_` chain) into `cfg`, unvalidated: also for partial files."""
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' includes itself through _base_")
    data = _read_yaml(path)
    base = data.pop("_base_", None)
    if base:
        base_path = (path.parent / base) if (path.parent / base).exists() else _resolve_path(base)
        merge_file(cfg, base_path, seen + (path.resolve(),))
    try:
        merge_dict(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Return a Config from a preset name or YAML file (or the defaults), with overrides applied."""
    cfg = Config()
    if name_or_path:
        path = _resolve_path(str(name_or_path))
        from maskrcnn.detectron2.config import is_detectron2_config, translate_detectron2_config

        if is_detectron2_config(path):  # a Detectron2 YAML (MODEL:, _BASE_: ...): translated
            cfg = translate_detectron2_config(path)
        else:
            merge_file(cfg, path)
    apply_overrides(cfg, overrides or [])
    return cfg


_CHOICES = {
    "model.backbone.norm": ("frozen_bn", "bn", "gn"),
    "model.backbone.kind": ("fpn", "c4", "c5"),
    "model.backbone.depth": (18, 34, 50, 101, 152),
    "model.box_head.type": ("2fc", "4conv1fc", "res5"),
    "model.box_head.pooler.type": ("roialign", "roipool"),
    "model.mask_head.pooler.type": ("roialign", "roipool"),
    "model.keypoint_head.pooler.type": ("roialign", "roipool"),
    "model.keypoint_head.norm": ("", "bn", "gn"),
    "model.keypoint_head.score": ("logit", "detectron2"),
    "model.backbone.res5_dilation": (1, 2),
    "model.input_format": ("RGB", "BGR"),
    "model.mask_head.paste": ("torchvision", "detectron2"),
    "model.mask_head.type": ("fcn", "mlp"),
    "model.mask_head.loss": ("sigmoid", "softmax"),
    "input.resize": ("tensor", "pil"),
    "input.min_size_train_sampling": ("choice", "range"),
    "input.crop.type": ("absolute", "relative_range"),
    "solver.optimizer": ("sgd", "adamw"),
    "solver.schedule": ("step", "cosine"),
    "solver.amp": ("", "bf16", "fp16", "auto"),
    "test.precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
}


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _validate_cascade(m: ModelConfig) -> None:
    """Raise ConfigError unless the cascade settings (when enabled) describe the same number of stages."""
    cascade = m.box_head.cascade
    if not cascade.enabled:
        return
    key = "model.box_head.cascade"
    if not cascade.ious:
        raise ConfigError(f"config key '{key}.ious' needs one IoU threshold per stage, got none")
    if any(not 0 < iou < 1 for iou in cascade.ious):
        raise ConfigError(f"config key '{key}.ious' needs thresholds between 0 and 1, got {cascade.ious}")
    for name in ("bbox_reg_weights", "loss_weights"):
        if len(getattr(cascade, name)) != len(cascade.ious):
            raise ConfigError(f"config key '{key}.{name}' has {len(getattr(cascade, name))} entries but "
                              f"{key}.ious has {len(cascade.ious)} (one per stage)")
    if any(len(w) != 4 for w in cascade.bbox_reg_weights):
        raise ConfigError(f"config key '{key}.bbox_reg_weights' needs 4 weights (x, y, w, h) per stage, "
                          f"got {cascade.bbox_reg_weights}")
    if not m.box_head.class_agnostic:
        raise ConfigError(f"config: {key}.enabled=true needs model.box_head.class_agnostic=true (each stage "
                          "refines one box per RoI, which the next stage reads)")
    if m.box_head.type == "res5":
        raise ConfigError(f"config: {key}.enabled=true needs an FPN-style box head (model.box_head.type=2fc "
                          "or 4conv1fc): the C4 res5 head belongs to the backbone and cannot be repeated")


def _validate_trunk_options(b: BackboneConfig) -> None:
    """Raise ConfigError unless dilation and deformable convolutions fit the trunk and its outputs."""
    if b.res5_dilation != 1 and b.kind != "c5":
        raise ConfigError(f"config: model.backbone.res5_dilation={b.res5_dilation} needs model.backbone.kind=c5 "
                          "(FPN needs res5 at stride 32; C4 runs res5 as the RoI head)")
    if b.res5_dilation != 1 and b.depth < 50:
        raise ConfigError(f"config: model.backbone.res5_dilation={b.res5_dilation} needs a bottleneck ResNet "
                          f"(depth >= 50), got depth {b.depth}")
    if any(stage not in (2, 3, 4, 5) for stage in b.deform_stages):
        raise ConfigError(f"config key 'model.backbone.deform_stages' lists stages 2..5 (res2..res5), got {b.deform_stages}")
    if b.deform_stages and b.depth < 50:
        raise ConfigError(f"config key 'model.backbone.deform_stages' needs a bottleneck ResNet (depth >= 50), "
                          f"got depth {b.depth}")
    if b.deform_groups < 1:
        raise ConfigError(f"config key 'model.backbone.deform_groups' must be >= 1, got {b.deform_groups}")


def _validate_input(i: InputConfig) -> None:
    """Raise ConfigError unless sizes, probabilities, the crop and the colour jitter make sense."""
    if not i.min_size_train or any(v < 1 for v in i.min_size_train):
        raise ConfigError(f"config key 'input.min_size_train' needs one or more sizes >= 1, got {i.min_size_train}")
    sizes = i.min_size_train
    if i.min_size_train_sampling == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
        raise ConfigError("config key 'input.min_size_train' needs [lo, hi] with lo <= hi when "
                          f"input.min_size_train_sampling=range, got {i.min_size_train}")
    for key in ("horizontal_flip", "vertical_flip", "rotate90"):
        if not 0.0 <= getattr(i, key) <= 1.0:
            raise ConfigError(f"config key 'input.{key}' is a probability in 0..1, got {getattr(i, key)}")
    for key in ("brightness", "contrast", "saturation"):
        value = getattr(i.color_jitter, key)
        if not 0.0 <= value <= 1.0:  # a factor 1 - value below 0 would invert the image
            raise ConfigError(f"config key 'input.color_jitter.{key}' must be in 0..1 (0 = off), got {value}")
    c = i.crop
    if not c.enabled:
        return
    if len(c.size) != 2:
        raise ConfigError(f"config key 'input.crop.size' needs 2 values ([h, w] or [lo, hi]), got {c.size}")
    if c.type == "absolute" and not all(v >= 1 and float(v).is_integer() for v in c.size):
        raise ConfigError(f"config key 'input.crop.size' needs whole pixel sizes [h, w] >= 1 with "
                          f"input.crop.type=absolute, got {c.size}")
    if c.type == "relative_range" and not 0 < c.size[0] <= c.size[1] <= 1:
        raise ConfigError(f"config key 'input.crop.size' needs fractions [lo, hi] with 0 < lo <= hi <= 1 with "
                          f"input.crop.type=relative_range, got {c.size}")
    if c.min_visible_area_px < 0:
        raise ConfigError(f"config key 'input.crop.min_visible_area_px' must be >= 0, got {c.min_visible_area_px}")
    if not 0.0 <= c.min_visible_fraction <= 1.0:
        raise ConfigError(f"config key 'input.crop.min_visible_fraction' must be in 0..1, got {c.min_visible_fraction}")


def _validate_tiling(t: TilingConfig) -> None:
    """Raise ConfigError unless the tiling sizes and fractions are usable."""
    key = "test.tiling"
    if t.tile_size < 0 or 0 < t.tile_size < 32:
        raise ConfigError(f"config key '{key}.tile_size' must be 0 (input.min_size_test) or at least 32 pixels, "
                          f"got {t.tile_size}")
    if not 0 <= t.overlap < 1:
        raise ConfigError(f"config key '{key}.overlap' is a share of the tile, 0 <= overlap < 1 (e.g. 0.25), "
                          f"got {t.overlap}")
    if t.threshold < 0:
        raise ConfigError(f"config key '{key}.threshold' must be >= 0 pixels (0 = twice the tile size), "
                          f"got {t.threshold}")
    if not 0 < t.merge_threshold <= 1:
        raise ConfigError(f"config key '{key}.merge_threshold' must be in (0, 1], got {t.merge_threshold}")


def validate(cfg: Config) -> None:
    """Raise ConfigError when a value is outside its allowed choices or inconsistent."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r} is not one of {list(choices)}")
    m = cfg.model
    if m.num_classes < 1:
        raise ConfigError(f"config key 'model.num_classes' must be >= 1, got {m.num_classes}")
    if m.class_names and len(m.class_names) != m.num_classes:
        raise ConfigError(
            f"config key 'model.class_names' has {len(m.class_names)} names but "
            f"model.num_classes = {m.num_classes}"
        )
    if m.mask_head.loss_weight < 0:
        raise ConfigError(f"config key 'model.mask_head.loss_weight' must be >= 0, got {m.mask_head.loss_weight}")
    if m.mask_head.max_rois_per_image < 0:
        raise ConfigError(f"config key 'model.mask_head.max_rois_per_image' must be >= 0 (0 = every positive RoI), "
                          f"got {m.mask_head.max_rois_per_image}")
    if m.backbone.kind == "c4" and m.box_head.type != "res5":
        raise ConfigError("config: model.backbone.kind=c4 needs model.box_head.type=res5")
    if m.backbone.kind != "c4" and m.box_head.type == "res5":
        raise ConfigError("config: model.box_head.type=res5 needs model.backbone.kind=c4")
    if m.mask_head.loss == "softmax" and m.mask_head.class_agnostic:
        raise ConfigError("config: model.mask_head.loss=softmax needs class-specific masks "
                          "(model.mask_head.class_agnostic=false): a softmax needs classes to compete")
    _validate_cascade(m)
    res2, width = m.backbone.res2_channels, m.backbone.width_per_group
    # torchvision sizes a bottleneck as planes x base_width / 64 with planes = res2 / 4: keep it whole.
    if res2 and (res2 < 4 or res2 % 4 or m.backbone.depth < 50 or (width * 256) % res2):
        raise ConfigError(f"config key 'model.backbone.res2_channels' must be 0 (standard) or, with a bottleneck "
                          f"ResNet (depth >= 50), a multiple of 4 dividing 256 x width_per_group; got {res2} at "
                          f"depth {m.backbone.depth}, width_per_group {width}")
    _validate_trunk_options(m.backbone)
    if not 0 <= m.backbone.trainable_stages <= 5:
        raise ConfigError("config key 'model.backbone.trainable_stages' must be in 0..5")
    if m.category_ids and len(m.category_ids) != m.num_classes:
        raise ConfigError(
            f"config key 'model.category_ids' has {len(m.category_ids)} ids but model.num_classes = {m.num_classes}"
        )
    if len(m.pixel_mean) != 3 or len(m.pixel_std) != 3:
        raise ConfigError("config keys 'model.pixel_mean'/'model.pixel_std' need 3 values each")
    kp = m.keypoint_head
    if kp.enabled:
        if kp.num_keypoints < 1:
            raise ConfigError(f"config key 'model.keypoint_head.num_keypoints' must be >= 1, got {kp.num_keypoints}")
        if m.backbone.kind != "fpn":
            raise ConfigError("config: model.keypoint_head needs model.backbone.kind=fpn (no C4/C5 keypoint head)")
        for key, values in (("keypoint_names", kp.keypoint_names), ("oks_sigmas", kp.oks_sigmas)):
            if values and len(values) != kp.num_keypoints:
                raise ConfigError(f"config key 'model.keypoint_head.{key}' has {len(values)} entries but "
                                  f"model.keypoint_head.num_keypoints = {kp.num_keypoints}")
        if any(len(e) != 2 or not all(1 <= i <= kp.num_keypoints for i in e) for e in kp.skeleton):
            raise ConfigError("config key 'model.keypoint_head.skeleton' needs [a, b] pairs of keypoint "
                              f"numbers in 1..{kp.num_keypoints} (COCO's 1-based convention)")
    if m.backbone.kind == "fpn" and len(m.anchors.sizes) != 5:
        raise ConfigError("config key 'model.anchors.sizes' needs 5 lists (P2..P6) for FPN")
    _validate_input(cfg.input)
    _validate_tiling(cfg.test.tiling)
    s = cfg.solver
    if s.reference_world_size < 0:
        raise ConfigError(f"config key 'solver.reference_world_size' must be >= 0 (0 = off), got {s.reference_world_size}")
    for key in ("dist_timeout_minutes", "dist_heartbeat_timeout"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"config key 'solver.{key}' must be > 0, got {getattr(s, key)}")
