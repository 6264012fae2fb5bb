"""Setting a training run up from its config: the training data, the classes, the initial weights, the world size."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from maskrcnn.config import Config
from maskrcnn.errors import UserError

log = logging.getLogger(__name__)


def apply_reference_world_size(cfg: Config, world_size: int) -> None:
    """Scale batch, LR and schedule from solver.reference_world_size processes to `world_size` (linear rule).

    As Detectron2's `auto_scale_workers`: the per-process batch stays, so the global batch and the
    LR grow with the number of processes while max_iter, steps, warm-up and the checkpoint and
    evaluation periods shrink; reference_world_size becomes `world_size`, so the saved config.yaml
    describes the run as it ran and resuming it with the same number of processes changes nothing.
    """
    s = cfg.solver
    ref = s.reference_world_size
    if ref <= 0 or ref == world_size:
        return
    if s.ims_per_batch % ref:
        raise UserError(f"solver.ims_per_batch={s.ims_per_batch} does not split over solver.reference_world_size="
                        f"{ref} processes; give a multiple of {ref}")
    scale = world_size / ref
    old = (s.ims_per_batch, s.base_lr, s.max_iter)
    s.ims_per_batch = s.ims_per_batch // ref * world_size
    s.base_lr = s.base_lr * scale
    s.max_iter = max(1, round(s.max_iter / scale))
    s.warmup_iters = round(s.warmup_iters / scale)
    s.steps = [round(x / scale) for x in s.steps]
    s.checkpoint_period = max(1, round(s.checkpoint_period / scale))
    if s.eval_period > 0:
        s.eval_period = max(1, round(s.eval_period / scale))
    s.reference_world_size = world_size
    log.info("solver.reference_world_size=%d, running on %d process(es): ims_per_batch %d -> %d, base_lr %g -> %g, "
             "max_iter %d -> %d (steps, warm-up and periods scaled too)", ref, world_size, old[0], s.ims_per_batch,
             old[1], s.base_lr, old[2], s.max_iter)


def build_train_dataset(cfg: Config) -> Any:
    """Return the (concatenated) training dataset for `cfg.data.train`."""
    if not cfg.data.train:
        raise UserError("no training data: set data.train=ANN.json:IMAGE_DIR (in the config or as an override)")
    from maskrcnn.data.augment import Augmenter
    from maskrcnn.data.coco import build_dataset

    return build_dataset(
        cfg.data.train,
        filter_empty=cfg.data.filter_empty,
        train=True,
        augment=Augmenter.from_config(cfg.input),
        max_pixels=cfg.input.max_pixels,
        min_keypoints=cfg.model.keypoint_head.min_keypoints_per_image if cfg.model.keypoint_head.enabled else 0,
        cache_dir=cfg.data.cache_dir or None,
    )


def set_augmentation(dataset: Any, input_cfg: Any) -> None:
    """Give each dataset (of a concatenation) the augmentation `input_cfg` now describes (after fit_to_data)."""
    from dataclasses import replace

    from maskrcnn.data.augment import Augmenter

    for d in getattr(dataset, "datasets", [dataset]):
        d.augment = replace(Augmenter.from_config(input_cfg), flip_map=d.keypoint_flip_map)


def sync_classes(cfg: Config, class_names: list[str], category_ids: list[int]) -> None:
    """Fill the model's classes (names, count, dataset category ids) from the data, or raise if they disagree."""
    names = list(class_names)
    if not cfg.model.class_names:
        if cfg.model.num_classes != len(names):
            log.info("model.num_classes %d -> %d from the training data", cfg.model.num_classes, len(names))
        cfg.model.class_names = names
        cfg.model.num_classes = len(names)
    elif list(cfg.model.class_names) != names:
        raise UserError(
            f"config model.class_names {cfg.model.class_names} differ from the training data's categories "
            f"{names}; set model.class_names=[] to take them from the data"
        )
    # Predictions must name the dataset's own category ids, whatever the preset said.
    cfg.model.category_ids = [int(i) for i in category_ids]


def load_trunk_weights(model: nn.Module, path: str) -> None:
    """Initialise the backbone trunk from a torchvision ImageNet ResNet/ResNeXt state-dict file."""
    loader = getattr(getattr(model, "backbone", None), "load_trunk_weights", None)
    if loader is None:
        raise UserError("model.backbone.weights is set but this model cannot load trunk weights")
    loader(path)
    log.info("backbone initialised from %s", path)


def convert_sync_bn(model: nn.Module, device_type: str, world_size: int) -> nn.Module:
    """Return the model with its BatchNorm layers as SyncBatchNorm (statistics over all processes' images)."""
    if device_type != "cuda":
        raise UserError("solver.sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); "
                        "train on the CPU with solver.sync_bn=false, or use GroupNorm (model.backbone.norm=gn)")
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if count == 0:
        log.info("solver.sync_bn: the model has no (trainable) BatchNorm layers; nothing to synchronise")
        return model
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info("solver.sync_bn: %d BatchNorm layers synchronised across %d processes", count, world_size)
    return model
