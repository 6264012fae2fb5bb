"""Fetch zoo weights once: a cache shared with torch.hub, a mirror, an offline switch, verified atomic downloads.

Why not `torch.hub.download_url_to_file`: it waits forever on a stalled connection (no timeout), keeps
a file cut short when the publisher gives no SHA-256 (it never compares with Content-Length), checks
SHA-256 prefixes only (Detectron2 names its files by MD5), and cannot tell a dropped connection (worth
a retry) from a wrong file (not worth one). Its cache folder and file naming are used unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from maskrcnn.checkpoint import _fsync_dir
from maskrcnn.errors import UserError
from maskrcnn.zoo.table import ZooEntry

CACHE_ENV = "MASKRCNN_CACHE"
OFFLINE_ENV = "MASKRCNN_OFFLINE"
MIRROR_ENV = "MASKRCNN_WEIGHTS_MIRROR"
ATTEMPTS = 3  # a dropped connection is retried this many times in all, from the start
TIMEOUT_S = 60.0  # no byte for this long counts as a dropped connection
RETRY_PAUSE_S = 1.0
_CHUNK = 1 << 20
PARTIAL_SUFFIX = ".partial"


class DownloadError(UserError):
    """A zoo file that cannot be fetched or verified; the message says where to put a copy by hand."""


class _Dropped(Exception):
    """The transfer broke off (cut connection, timeout, server error): worth another attempt."""


def cache_dir() -> Path:
    """Return the weights cache: $MASKRCNN_CACHE, else torch.hub's checkpoint folder (honours $TORCH_HOME)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_path(entry: ZooEntry) -> Path:
    """Return where the entry's file lives once fetched (torch.hub's name for it: the URL's file name)."""
    return cache_dir() / entry.file_name


def is_cached(entry: ZooEntry) -> bool:
    """Return True when the entry's file is in the cache (not checked here)."""
    return cached_path(entry).is_file()


def offline() -> bool:
    """Return True when MASKRCNN_OFFLINE forbids any network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def source_url(entry: ZooEntry) -> str:
    """Return the URL to fetch from: the publisher's, or the same path on $MASKRCNN_WEIGHTS_MIRROR."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{entry.relative_path}" if mirror else entry.url


def _failure(entry: ZooEntry, url: str, reason: str) -> DownloadError:
    """Return the one-line error: what failed, the URL, the expected file and where a manual copy goes."""
    return DownloadError(
        f"cannot fetch model '{entry.name}' from {url}: {reason}; download {entry.file_name} by hand "
        f"({entry.describe_hash()}) and put it at {cached_path(entry)}")


def file_digest(path: Path, algorithm: str) -> str:
    """Return the hex digest of a file."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_cached(entry: ZooEntry, path: Path) -> None:
    """Raise one line when a cached file's digest does not match the entry (never delete it: it may be a user's copy)."""
    digest = file_digest(path, entry.hash_algorithm)
    if not digest.startswith(entry.hash_prefix):
        raise DownloadError(
            f"cached file {path} for model '{entry.name}' does not match its {entry.describe_hash()} "
            f"(got {digest[:len(entry.hash_prefix)]}): damaged or another version; delete it to download again")


def fetch(entry: ZooEntry, progress: bool = True) -> Path:
    """Return the entry's verified local file, downloading it into the cache first if it is not there."""
    path = cached_path(entry)
    if path.is_file():
        verify_cached(entry, path)
        return path
    url = source_url(entry)
    if offline():
        raise _failure(entry, url, f"not in the cache and {OFFLINE_ENV} is set (no network access)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _failure(entry, url, f"cannot create the cache folder {path.parent}: {e.strerror}") from None
    with _cache_lock(path.parent) as locked:
        if path.is_file():  # another process fetched it while this one waited for the lock
            verify_cached(entry, path)
            return path
        if locked:  # no other download runs here now: temp files left by a killed process are stale
            for stale in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
                stale.unlink(missing_ok=True)
        _download_verified(entry, url, path, progress)
    return path


@contextlib.contextmanager
def _cache_lock(directory: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the cache folder (flock on the folder itself, so no lock file is left).

    Yields whether the lock is held. Without flock (Windows, some network file systems) downloads still
    cannot mix: each writes its own temp file and renames it into place only once verified.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield False  # the download itself will report an unusable folder
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process downloading into {directory} ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False  # flock not supported here: temp files + atomic rename alone
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _download_verified(entry: ZooEntry, url: str, path: Path, progress: bool) -> None:
    """Download to a temp file beside `path`, check its digest, then rename; retry dropped connections."""
    print(f"downloading model '{entry.name}' from {url} to {path}", file=sys.stderr, flush=True)
    for attempt in range(1, ATTEMPTS + 1):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        try:
            digest = _stream(url, tmp, entry, progress)
            if not digest.startswith(entry.hash_prefix):
                raise _failure(entry, url, f"the downloaded file's {entry.hash_algorithm} is "
                                           f"{digest[:len(entry.hash_prefix)]}..., expected {entry.describe_hash()} "
                                           "(the server sent another file; nothing was kept)")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            return
        except _Dropped as e:
            if attempt == ATTEMPTS:
                raise _failure(entry, url, f"the download failed {ATTEMPTS} times (last: {e})") from None
            print(f"download broke off ({e}); retrying (attempt {attempt + 1} of {ATTEMPTS})", file=sys.stderr)
            time.sleep(RETRY_PAUSE_S * attempt)
        except HTTPError as e:
            raise _failure(entry, url, f"HTTP {e.code} {e.reason}") from None
        except URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise _failure(entry, url, f"cannot connect ({reason})") from None
        finally:
            tmp.unlink(missing_ok=True)


def _stream(url: str, tmp: Path, entry: ZooEntry, progress: bool) -> str:
    """Write the response body to `tmp` with a progress bar; return its hex digest.

    A body shorter than its Content-Length, a timeout or a 5xx answer raise _Dropped; a failed
    local write raises DownloadError naming the folder.
    """
    from tqdm import tqdm

    h = hashlib.new(entry.hash_algorithm, usedforsecurity=False)
    try:
        response = urlopen(Request(url, headers={"User-Agent": "maskrcnn"}), timeout=TIMEOUT_S)
    except HTTPError as e:
        if e.code >= 500:
            raise _Dropped(f"HTTP {e.code} {e.reason}") from None
        raise
    except URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _Dropped(f"no answer within {TIMEOUT_S:.0f} s") from None
        raise
    except (TimeoutError, ConnectionResetError) as e:  # e.g. the server hung up before answering
        raise _Dropped(str(e) or type(e).__name__) from None
    received = 0
    with response, open(tmp, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.file_name,
                  disable=not progress, file=sys.stderr, leave=False) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as e:
                    raise _Dropped(f"after {received} bytes: {type(e).__name__}") from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise _write_failure(entry, tmp.parent, e) from None
                h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise _write_failure(entry, tmp.parent, e) from None
    if total is not None and received != total:
        raise _Dropped(f"got {received} of {total} bytes")
    return h.hexdigest()


def _write_failure(entry: ZooEntry, folder: Path, e: OSError) -> DownloadError:
    """Return the one-line error for a cache folder that cannot take the file (full disk, permissions)."""
    why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return _failure(entry, source_url(entry),
                    f"cannot write to {folder} ({why}); free space there or set {CACHE_ENV} to another folder")
