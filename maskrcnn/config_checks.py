"""The config's constraints: allowed choices and consistent combinations, each a one-line `ConfigError`."""

from __future__ import annotations

from typing import Any

from maskrcnn.config_schema import BackboneConfig, Config, ConfigError, InputConfig, ModelConfig, TilingConfig


_CHOICES = {
    "model.backbone.norm": ("frozen_bn", "bn", "gn"),
    "model.backbone.kind": ("fpn", "c4", "c5"),
    "model.backbone.depth": (10, 18, 34, 50, 101, 152),
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
    if not 0.0 <= i.scale <= 16.0:
        raise ConfigError(f"config key 'input.scale' is a resize factor in (0, 16] (0 = resize the shorter side to "
                          f"input.min_size_train/test), got {i.scale}")
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
