"""Small file helpers at the bottom of the package (no maskrcnn imports): atomic writes, YAML reading.

The package imports them from here; `maskrcnn.config` still re-exports the atomic writers for code
outside it that imported them from there.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it onto `path`, on failure delete it.

    Readers never see half a file, and an existing file survives a failed write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to `path` through a temp file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """Return the YAML document in `path`; an unreadable file or invalid YAML raises `error`, naming `what`."""
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"cannot read {what} '{path}': {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
