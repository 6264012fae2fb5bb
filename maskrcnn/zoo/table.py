"""The model-zoo table: `models.yaml` in this package, plus an optional table of your own (MASKRCNN_ZOO)."""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from maskrcnn.config import PRESET_DIR, Config, apply_overrides, load_config, merge_file
from maskrcnn.errors import UserError
from maskrcnn.fileio import read_yaml

BUILTIN_TABLE = Path(__file__).with_name("models.yaml")
EXTRA_TABLE_ENV = "MASKRCNN_ZOO"  # a YAML file with more entries (private models), same format
# The model `maskrcnn predict photo.jpg` runs when given neither --weights nor --config: the
# torchvision entry with the best reported COCO mask AP (tests check that it still is).
DEFAULT_MODEL = "maskrcnn_resnet50_fpn_v2"
_HASH = re.compile(r"^(sha256|md5):([0-9a-f]{6,64})$")


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained weights file: where it comes from, how to check it, what it runs with and how good it is."""

    name: str
    publisher: str
    architecture: str
    config: str
    classes: str
    url: str
    hash: str
    evaluated_on: str
    source: str
    metrics: dict[str, float] = field(default_factory=dict)
    size_mb: float | None = None

    @property
    def file_name(self) -> str:
        """Return the file's name as the URL gives it (torch.hub caches under the same name)."""
        return PurePosixPath(urlparse(self.url).path).name

    @property
    def relative_path(self) -> str:
        """Return the URL's path on the publisher's host: a mirror serves the file under the same path."""
        return urlparse(self.url).path.lstrip("/")

    @property
    def hash_algorithm(self) -> str:
        """Return 'sha256' or 'md5'."""
        return self.hash.split(":", 1)[0]

    @property
    def hash_prefix(self) -> str:
        """Return the hex digits the file's digest must start with."""
        return self.hash.split(":", 1)[1]

    def describe_hash(self) -> str:
        """Return e.g. 'SHA-256 starting 73cbd019' for messages."""
        kind = {"sha256": "SHA-256", "md5": "MD5"}[self.hash_algorithm]
        return f"{kind} {'=' if len(self.hash_prefix) in (32, 64) else 'starting'} {self.hash_prefix}"


def _parse_entry(item: Any, where: str) -> ZooEntry:
    """Return a checked ZooEntry from one YAML mapping; UserError names the table and the problem."""
    known = {f.name for f in fields(ZooEntry)}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise UserError(f"model zoo table {where}: every entry must be a mapping with a 'name'")
    name = item["name"]
    unknown = sorted(set(item) - known)
    missing = sorted(f.name for f in fields(ZooEntry) if f.name not in item and f.name not in ("metrics", "size_mb"))
    if unknown or missing:
        what = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise UserError(f"model zoo table {where}: entry '{name}' has {what}")
    if not _HASH.match(str(item["hash"])):
        raise UserError(f"model zoo table {where}: entry '{name}' has hash {item['hash']!r}; "
                        "expected sha256:HEX or md5:HEX (at least 6 lowercase hex digits)")
    if urlparse(str(item["url"])).scheme not in ("http", "https", "file"):
        raise UserError(f"model zoo table {where}: entry '{name}' has url {item['url']!r}; expected http(s)://...")
    return ZooEntry(**{**item, "metrics": dict(item.get("metrics") or {})})


def read_table(path: Path) -> list[ZooEntry]:
    """Return the entries of one zoo table file."""
    data = read_yaml(path, "model zoo table", UserError)
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise UserError(f"model zoo table '{path}' must hold 'models:' followed by a list of entries")
    return [_parse_entry(item, f"'{path}'") for item in data["models"]]


@functools.lru_cache(maxsize=1)
def _builtin() -> tuple[ZooEntry, ...]:
    return tuple(read_table(BUILTIN_TABLE))


def entries() -> dict[str, ZooEntry]:
    """Return every zoo entry by name: the built-in table, then those of $MASKRCNN_ZOO (which may not rename)."""
    table = {e.name: e for e in _builtin()}
    extra = os.environ.get(EXTRA_TABLE_ENV)
    if extra:
        for entry in read_table(Path(extra).expanduser()):
            if entry.name in table:
                raise UserError(f"{EXTRA_TABLE_ENV} table '{extra}' redefines the built-in model '{entry.name}'; "
                                "give it another name")
            table[entry.name] = entry
    return table


def find_entry(name: object) -> ZooEntry | None:
    """Return the entry called `name`, or None when `name` is an existing path or not a zoo name."""
    if not isinstance(name, str) or os.path.exists(name):
        return None
    return entries().get(name)


def nearest_hint(name: str) -> str:
    """Return "; did you mean 'X'?" for the closest zoo name, or ''."""
    near = difflib.get_close_matches(name, list(entries()), n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else ""


def get_entry(name: str) -> ZooEntry:
    """Return the entry called `name`, or raise one line naming the closest names."""
    entry = entries().get(name)
    if entry is None:
        raise UserError(f"'{name}' is not a model in the zoo{nearest_hint(name)} (`maskrcnn models` lists them)")
    return entry


def looks_like_name(value: str) -> bool:
    """Return True for a bare word (no folder, no file suffix): meant as a zoo name rather than a path."""
    return not any(sep in value for sep in ("/", os.sep)) and not Path(value).suffix


def entry_config(entry: ZooEntry, overrides: list[str] | None = None) -> Config:
    """Return the config the entry's weights run with: its preset or Detectron2 YAML, its classes, then overrides."""
    source = str(PRESET_DIR / entry.config) if entry.config.endswith((".yaml", ".yml")) else entry.config
    cfg = load_config(source)
    merge_file(cfg, PRESET_DIR / entry.classes)
    return apply_overrides(cfg, list(overrides or []))
