"""The model zoo: pretrained weights by name (`--weights NAME`, `load_model(NAME)`), fetched once and verified.

- `entries()`, `get_entry(name)`, `find_entry(name)`: the table (`models.yaml`, plus $MASKRCNN_ZOO).
- `entry_config(entry, overrides)`: the config an entry's weights run with.
- `fetch(entry)`: the verified local file (downloaded into the cache on first use).
- `resolve_weights(value)`: a zoo name becomes its fetched file; a path stays a path.
"""

from __future__ import annotations

import os

from maskrcnn.errors import UserError
from maskrcnn.zoo.download import (CACHE_ENV, MIRROR_ENV, OFFLINE_ENV, DownloadError, cache_dir, cached_path,
                                   fetch, is_cached, offline, source_url)
from maskrcnn.zoo.table import (DEFAULT_MODEL, EXTRA_TABLE_ENV, ZooEntry, entries, entry_config, find_entry,
                                get_entry, looks_like_name, nearest_hint)

__all__ = [
    "CACHE_ENV", "DEFAULT_MODEL", "EXTRA_TABLE_ENV", "MIRROR_ENV", "OFFLINE_ENV", "DownloadError", "ZooEntry",
    "cache_dir", "cached_path", "entries", "entry_config", "fetch", "find_entry", "get_entry", "is_cached",
    "offline", "resolve_weights", "source_url",
]


def resolve_weights(weights: str | os.PathLike | None) -> tuple[str | os.PathLike | None, ZooEntry | None]:
    """Return (local weights file, zoo entry or None): a zoo name is fetched; a path (or None) is returned as is.

    A bare word that is neither a file nor a zoo name is refused in one line naming the closest names.
    """
    if isinstance(weights, str) and not os.path.exists(weights) and (weights in entries() or looks_like_name(weights)):
        entry = entries().get(weights)
        if entry is None:  # a bare word: meant as a zoo name (or a file that is not there)
            raise UserError(f"weights '{weights}' is neither a file nor a model in the zoo{nearest_hint(weights)} "
                            "(`maskrcnn models` lists them)")
        return fetch(entry), entry
    return weights, None
