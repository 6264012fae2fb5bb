"""The Python entry points: build or load a model in one call."""

from __future__ import annotations

import os

import torch

from maskrcnn.config import Config, load_config, merge_dict
from maskrcnn.errors import UserError
from maskrcnn.modeling import MaskRCNN, build_model


def config_from_checkpoint(weights: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Return the training config stored in one of our checkpoints (with overrides applied)."""
    from maskrcnn.checkpoint import load_checkpoint
    from maskrcnn.config import apply_overrides

    state = load_checkpoint(weights, require_checksum=False)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise UserError(f"weights file '{weights}' carries no config; pass --config (a preset or YAML file)")
    cfg = Config()
    merge_dict(cfg, state["config"])
    return apply_overrides(cfg, overrides or [])


def load_model(
    config: str | os.PathLike | Config | None = "torchvision-r50-fpn",
    weights: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    device: str = "cpu",
) -> MaskRCNN:
    """Return a model in eval mode from a preset name, YAML file or Config, with weights loaded if given.

    With `config=None`, the config saved inside the `weights` checkpoint (one of ours) is used.
    `weights` may be one of our checkpoints or a torchvision Mask R-CNN state-dict file.
    """
    from maskrcnn.checkpoint import WeightsMismatchError, load_weights

    if config is None:
        if not weights:
            raise UserError("load_model needs a config (preset or YAML) or a checkpoint that carries one")
        cfg = config_from_checkpoint(weights, overrides)
    elif isinstance(config, Config):
        cfg = config.clone()
    else:
        cfg = load_config(str(config), overrides or [])
    model = build_model(cfg)
    if weights:
        try:
            load_weights(model, weights)
        except WeightsMismatchError as e:
            raise WeightsMismatchError(f"{e}; {_mismatch_advice(config, e.saved_config)}", e.saved_config) from None
    return model.to(torch.device(device)).eval()


def _mismatch_advice(config: object, saved_config: dict | None) -> str:
    """Return what to do when weights do not fit the model built from `config`."""
    if config is None:
        return "leave out the overrides that change the model (the config saved in the file is used otherwise)"
    if saved_config is not None:
        return ("leave out the config (no --config; load_model(None, weights=...)) to use the one saved in the file, "
                "or pass the config it was trained with")
    return ("pass the config the weights were trained with (--config PRESET_OR_YAML, plus overrides such as "
            "model.num_classes=N)")


def category_ids(model: MaskRCNN) -> list[int]:
    """Return the dataset category id of each label 1..K (the label itself when none were recorded)."""
    ids = list(model.cfg.model.category_ids)
    return ids if ids else list(range(1, model.cfg.model.num_classes + 1))
