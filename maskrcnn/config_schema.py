"""The config schema: one typed tree of dataclasses for model, data, input, solver, test and output.

Every field has its default here; how values get in (YAML files, presets, KEY=VALUE overrides) is
`config_merge`, what combinations are allowed is `config_checks`, and `config.load_config` puts them
together. Does not import torch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maskrcnn.fileio import atomic_write_text


class ConfigError(ValueError):
    """A user's config mistake, phrased as one line that says what to do."""


@dataclass
class BackboneConfig:
    """The ResNet/ResNeXt trunk, its normalisation, and FPN or C4."""

    depth: int = 50  # 10, 18, 34, 50, 101, 152
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
    # > 0: every image is resized by this one factor, in training and at test (capped by max_size_train /
    # max_size_test), so an object keeps its size in pixels whatever the size of its image (microscopy,
    # aerial or document images, where a pixel is a fixed length); min_size_train/min_size_test are then
    # unused. 0: the shorter side goes to min_size (the COCO rule).
    scale: float = 0.0
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

    # choose the input scale, training crop, anchor sizes and proposal/detection counts from the training
    # set's object and image sizes when training starts (maskrcnn/engine/fit_to_data.py); the keys given
    # as KEY=VALUE overrides keep their value. On in the `own-data` preset (`maskrcnn train` without --config).
    fit_to_data: bool = False

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
