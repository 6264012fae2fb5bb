"""The Python entry points: build or load a model in one call."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import torch

from maskrcnn.config import Config, load_config, merge_dict
from maskrcnn.errors import UserError
from maskrcnn.modeling import MaskRCNN, build_model

if TYPE_CHECKING:
    from maskrcnn.zoo import ZooEntry


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


def resolve_config(config: str | os.PathLike | Config | None, weights: str | os.PathLike | None,
                   entry: ZooEntry | None = None, overrides: list[str] | None = None) -> Config | None:
    """Return the config a model runs with, None when nothing names one.

    `config` (a preset, YAML file or Config, which is copied as it is) comes first; without it, the
    zoo `entry`'s config (the entry `weights` was resolved from), else the config saved in the `weights`
    checkpoint. Shared by `load_model` and `maskrcnn eval` (which scores results files without a model).
    """
    if config is None:
        if entry is not None:
            from maskrcnn.zoo import entry_config

            return entry_config(entry, overrides)
        return config_from_checkpoint(weights, overrides) if weights else None
    if isinstance(config, Config):
        return config.clone()
    return load_config(str(config), overrides or [])


def load_model(
    config: str | os.PathLike | Config | None = None,
    weights: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    device: str = "cpu",
) -> MaskRCNN:
    """Return a model in eval mode from a zoo name, preset name, YAML file or Config, with weights loaded if given.

    `load_model("maskrcnn_resnet50_fpn_v2")` (or `weights=` that name) fetches a model-zoo entry
    (`maskrcnn models`) once into the cache and builds the config it comes with. With `config=None`,
    the config saved inside the `weights` checkpoint (one of ours) is used. `weights` may also be one of
    our checkpoints, a torchvision Mask R-CNN state-dict file or a Detectron2 model-zoo file.
    """
    from maskrcnn.checkpoint import WeightsMismatchError, load_weights
    from maskrcnn.zoo import find_entry, resolve_weights

    if weights is None and find_entry(config) is not None:
        config, weights = None, str(config)  # load_model(NAME): the zoo entry brings both
    weights, entry = resolve_weights(weights)
    cfg = resolve_config(config, weights, entry, overrides)
    if cfg is None:
        raise UserError("load_model needs a model zoo name (e.g. 'maskrcnn_resnet50_fpn_v2'), a config "
                        "(preset or YAML) or a checkpoint that carries one")
    model = build_model(cfg)
    if weights:
        try:
            load_weights(model, weights)
        except WeightsMismatchError as e:
            raise WeightsMismatchError(f"{e}; {_mismatch_advice(config, e.saved_config)}", e.saved_config) from None
    return model.to(torch.device(device)).eval()


def random_weights_note(config: object, weights: object) -> None:
    """Say in one line (stderr) that a model built from a config alone has random weights."""
    if config is not None and not weights:
        print("note: a config without --weights: the model has random weights, so its detections mean nothing "
              "(fine for timing; `maskrcnn models` lists pretrained ones)", file=sys.stderr)


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
