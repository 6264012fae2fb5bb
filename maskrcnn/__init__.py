"""Mask R-CNN (He, Gkioxari, Dollár, Girshick, 2017) in PyTorch: train, evaluate, predict.

The names below are imported on first use, so that `import maskrcnn.cli` (and `maskrcnn --help`) does
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "Config": "maskrcnn.config",
    "load_config": "maskrcnn.config",
    "MaskRCNN": "maskrcnn.modeling",
    "build_model": "maskrcnn.modeling",
    "load_model": "maskrcnn.api",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
