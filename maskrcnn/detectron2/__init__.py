"""Detectron2 compatibility: its config YAML files and model-zoo checkpoints, without Detectron2.

- `translate_detectron2_config(path) -> Config`: a resolved `cfg.dump()` or a model-zoo config with
  its `_BASE_` chain, checked key by key (what we cannot reproduce is a `ConfigError` naming the key).
- `read_detectron2_weights(path)`: the tensors of a model-zoo `.pkl` or a Detectron2 `.pth` file.
- `convert_detectron2_state_dict(state, model_cfg)`: Detectron2's parameter names and class layouts
  mapped onto ours (background first, per-location anchor order).
"""

from maskrcnn.detectron2.config import is_detectron2_config, translate_detectron2_config
from maskrcnn.detectron2.weights import (
    convert_detectron2_state_dict,
    is_detectron2_state_dict,
    read_detectron2_weights,
)

__all__ = [
    "convert_detectron2_state_dict",
    "is_detectron2_config",
    "is_detectron2_state_dict",
    "read_detectron2_weights",
    "translate_detectron2_config",
]
