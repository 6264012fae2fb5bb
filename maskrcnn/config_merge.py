"""Typed merging into the config tree: nested dicts, KEY=VALUE overrides, our YAML files and presets.

Every key is checked: an unknown key or a value of the wrong type is a `ConfigError` that names the
key and the nearest valid one. Presets are YAML files in `maskrcnn/configs/` holding only the keys
they change (plus an optional `_base_` preset name).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from maskrcnn.config_checks import validate
from maskrcnn.config_schema import Config, ConfigError, Switch
from maskrcnn.fileio import read_yaml

PRESET_DIR = Path(__file__).parent / "configs"


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


def resolve_path(name_or_path: str) -> Path:
    """Return the YAML file of a preset name or path, or raise ConfigError naming the nearest preset."""
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
        base_path = (path.parent / base) if (path.parent / base).exists() else resolve_path(base)
        merge_file(cfg, base_path, seen + (path.resolve(),))
    try:
        merge_dict(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
