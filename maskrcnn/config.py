"""The config: `load_config` reads a preset, one of our YAML files or a Detectron2 YAML, then applies overrides.

This module is the file-format dispatch, above both readers: our YAML files and presets are merged by
`config_merge`, Detectron2's are translated by `maskrcnn.detectron2.config`; both fill the typed tree of
`config_schema`, checked by `config_checks`. The names of those modules are re-exported here, so that
`from maskrcnn.config import Config, load_config, ...` is the one import outside code needs (the package's
own lower layers import the schema modules themselves). Does not import torch.
"""

from __future__ import annotations

from maskrcnn.config_checks import validate
from maskrcnn.config_merge import PRESET_DIR, resolve_path, apply_overrides, list_presets, merge_dict, merge_file
from maskrcnn.config_schema import (
    AnchorConfig,
    BackboneConfig,
    BoxHeadConfig,
    CascadeConfig,
    ColorJitterConfig,
    Config,
    ConfigError,
    CropConfig,
    DataConfig,
    InputConfig,
    KeypointHeadConfig,
    MaskHeadConfig,
    ModelConfig,
    PoolerConfig,
    RPNConfig,
    SolverConfig,
    Switch,
    TestConfig,
    TilingConfig,
)
from maskrcnn.fileio import atomic_path, atomic_write_text

__all__ = [
    "PRESET_DIR", "AnchorConfig", "BackboneConfig", "BoxHeadConfig", "CascadeConfig", "ColorJitterConfig",
    "Config", "ConfigError", "CropConfig", "DataConfig", "InputConfig", "KeypointHeadConfig", "MaskHeadConfig",
    "ModelConfig", "PoolerConfig", "RPNConfig", "SolverConfig", "Switch", "TestConfig", "TilingConfig",
    "apply_overrides", "atomic_path", "atomic_write_text", "list_presets", "load_config", "merge_dict",
    "merge_file", "validate",
]


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Return a Config from a preset name or YAML file (or the defaults), with overrides applied."""
    cfg = Config()
    if name_or_path:
        path = resolve_path(str(name_or_path))
        # Imported on first use: most callers never read a Detectron2 YAML.
        from maskrcnn.detectron2.config import is_detectron2_config, translate_detectron2_config

        if is_detectron2_config(path):  # a Detectron2 YAML (MODEL:, _BASE_: ...): translated
            cfg = translate_detectron2_config(path)
        else:
            merge_file(cfg, path)
    apply_overrides(cfg, overrides or [])
    return cfg
