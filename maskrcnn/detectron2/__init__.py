"""Detectron2 compatibility: its config YAML files and model-zoo checkpoints, without Detectron2.

- `translate_detectron2_config(path) -> Config`: a resolved `cfg.dump()` or a model-zoo config with
  its `_BASE_` chain, checked key by key (what we cannot reproduce is a `ConfigError` naming the key).
- `read_detectron2_weights(path)`: the tensors of a model-zoo `.pkl` or a Detectron2 `.pth` file.
- `convert_detectron2_state_dict(state, model_cfg)`: Detectron2's parameter names and class layouts
  mapped onto ours (background first, per-location anchor order).

The names are imported on first use (PEP 562), so that `maskrcnn.config`, which reads Detectron2 YAMLs
through `maskrcnn.detectron2.config`, does not load the weights side (torch) with it.
"""

from __future__ import annotations

from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "is_detectron2_config": "config",
    "translate_detectron2_config": "config",
    "convert_detectron2_state_dict": "weights",
    "is_detectron2_state_dict": "weights",
    "read_detectron2_weights": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access."""
    if _EXPORTS.get(name) == "config":
        from maskrcnn.detectron2 import config as module
    elif _EXPORTS.get(name) == "weights":
        from maskrcnn.detectron2 import weights as module
    else:
        raise AttributeError(f"module 'maskrcnn.detectron2' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value
