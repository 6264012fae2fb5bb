"""Checkpoints: atomic, checksummed saves; validated loads; weight import for fine-tuning.

File format: an ordinary `torch.save` zip archive followed by one trailer line
`MASKRCNN-SHA256 <hex digest of everything before it>\\n`. Zip readers find their index from the end
and tolerate trailing bytes, so `torch.load` still opens our files directly, while `load_checkpoint`
can tell a complete file from a truncated or corrupted one before unpickling anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskrcnn.errors import CheckpointError  # defined there (bottom layer); importable from here as before

log = logging.getLogger(__name__)

_MAGIC = b"MASKRCNN-SHA256 "
_TRAILER_LEN = len(_MAGIC) + 64 + 1  # magic, hex digest, newline
_CHUNK = 1 << 20
TMP_SUFFIX = ".tmp"


class WeightsMismatchError(CheckpointError):
    """A readable weights file whose keys or shapes do not fit the model it is loaded into."""


_RECOPY = "copy or download it again, or use another checkpoint"


# ---- saving -------------------------------------------------------------------------------------


def _sha256_of(f: Any, length: int) -> str:
    """Return the hex sha256 of the first `length` bytes of the open binary file `f`."""
    h = hashlib.sha256()
    f.seek(0)
    remaining = length
    while remaining > 0:
        chunk = f.read(min(_CHUNK, remaining))
        if not chunk:
            break
        h.update(chunk)
        remaining -= len(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a power cut (best effort; not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temp file, checksum trailer, fsync, rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "w+b") as f:
            torch.save(state, f)
            f.flush()
            size = f.tell()
            # Hash what actually reached the file, not an in-memory copy: it costs one read-back
            # but never doubles peak memory for large optimizer states.
            digest = _sha256_of(f, size)
            f.seek(size)
            f.write(_MAGIC + digest.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


# ---- loading ------------------------------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike) -> bool | None:
    """Return True if the file's checksum trailer matches, False if not, None if it has no trailer."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < _TRAILER_LEN:
            return None
        f.seek(size - _TRAILER_LEN)
        trailer = f.read(_TRAILER_LEN)
        if not trailer.startswith(_MAGIC) or not trailer.endswith(b"\n"):
            return None
        expected = trailer[len(_MAGIC) : -1].decode("ascii", "replace")
        return _sha256_of(f, size - _TRAILER_LEN) == expected


def _torch_load(path: Path) -> Any:
    """torch.load on CPU, restricted to tensors and plain containers (no arbitrary pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, pickle errors, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read '{path}' as a PyTorch file ({first[:200]}): it is cut short or not a checkpoint; {_RECOPY}"
        ) from None


def load_checkpoint(path: str | os.PathLike, require_checksum: bool = True) -> dict[str, Any]:
    """Return the state dict saved by `save_checkpoint`, or raise CheckpointError in one clear line.

    With `require_checksum=False`, plain `torch.save` files (no trailer) are accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    ok = verify_checkpoint(path)
    if ok is False:
        raise CheckpointError(f"checkpoint '{path}' is corrupt (checksum mismatch); {_RECOPY}")
    if ok is None and require_checksum:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or was not written by maskrcnn (no checksum trailer); {_RECOPY}"
        )
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' holds a {type(state).__name__}, not a checkpoint dictionary")
    return state


_CKPT_NAME = re.compile(r"^model_(\d+|final)\.pth$")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Return `model_*.pth` files in `directory`, newest first (by modification time, then name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if p.is_file() and _CKPT_NAME.match(p.name)]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """Return the newest checkpoint in `directory` whose checksum is valid, skipping (with a warning) damaged ones.

    Temp files of interrupted saves (`.model_*.pth.<pid>.tmp`) are never candidates.
    """
    for path in list_checkpoints(directory):
        try:
            ok = verify_checkpoint(path)
        except OSError as e:
            log.warning("skipping checkpoint %s: cannot read it (%s)", path, e.strerror or e)
            continue
        if ok:
            return path
        why = "corrupt (checksum mismatch)" if ok is False else "truncated (no checksum trailer)"
        log.warning("skipping checkpoint %s: %s; trying the next newest", path, why)
    return None


# ---- importing weights into a model -------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_weights` did: keys it could not fill, keys it ignored, params it left freshly initialised."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a checkpoint: ours ("model"), common wrappers, or a plain one."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"weights file '{path}' holds no model state dict")


def _short_list(names: list[str], limit: int = 5) -> str:
    """Return 'a, b, c (and N more)'."""
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _class_dependent(ckpt_shape: torch.Size, model_shape: torch.Size) -> bool:
    """Return True for a shape change in the output dimension only (class logits, per-class boxes/masks)."""
    return len(ckpt_shape) == len(model_shape) and ckpt_shape[1:] == model_shape[1:]


def _saved_config_note(config: dict[str, Any] | None) -> str:
    """Return ' (it was trained as ...)' from a checkpoint's stored config, or '' when unknown."""
    try:
        m = config["model"]  # type: ignore[index]
        b = m["backbone"]
        width = f" {b['groups']}x{b['width_per_group']}d" if b.get("groups", 1) > 1 else ""
        cascade = m["box_head"].get("cascade", {})
        stages = f", {len(cascade['ious'])} cascade stages" if cascade.get("enabled") else ""
        return (f" (it was trained as a {b['kind'].upper()} model, ResNet depth {b['depth']}{width}, "
                f"{m['num_classes']} classes{stages})")
    except (KeyError, TypeError, AttributeError):
        return ""


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    reinit_mismatched_classes: bool = False,
) -> LoadReport:
    """Load model weights from our checkpoint or a plain state dict (e.g. torchvision's) into `model`.

    `maskrcnn.modeling.import_state_dict(model, state_dict) -> state_dict`, when the model package
    provides it, maps foreign key layouts (torchvision) onto ours. With `reinit_mismatched_classes`,
    parameters whose output dimension differs (another number of classes) keep the model's fresh
    initialisation instead of failing; they are listed in the returned report.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' does not exist")
    if verify_checkpoint(path) is False:
        raise CheckpointError(f"weights file '{path}' is corrupt (checksum mismatch); {_RECOPY}")
    if path.suffix == ".pkl":  # a Detectron2 model-zoo file: a pickle of numpy arrays, read safely
        from maskrcnn.detectron2.weights import read_detectron2_weights

        loaded: Any = {"model": read_detectron2_weights(path)}
    else:
        loaded = _torch_load(path)
    saved_config = loaded.get("config") if isinstance(loaded, dict) and isinstance(loaded.get("config"), dict) else None
    state = _extract_state_dict(loaded, path)

    own = model.state_dict()
    if set(state) != set(own):
        # Lazy lookup: the model package may or may not provide an importer for foreign layouts.
        import maskrcnn.modeling as modeling

        importer = getattr(modeling, "import_state_dict", None)
        if importer is not None:
            state = importer(model, state)

    # BatchNorm's step counter is not a weight: files from BatchNorm models load into FrozenBatchNorm
    # ones (which have no counter) and the other way round.
    counter = "num_batches_tracked"
    report = LoadReport(
        missing=[k for k in own if k not in state and not k.endswith(counter)],
        unexpected=[k for k in state if k not in own and not k.endswith(counter)],
    )
    state = {k: v for k, v in state.items() if k in own or not k.endswith(counter)}
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    fatal = []
    for k in mismatched:
        if reinit_mismatched_classes and _class_dependent(state[k].shape, own[k].shape):
            report.reinitialized.append(k)
            del state[k]
        else:
            fatal.append(k)

    problems = []
    if strict and report.missing:
        problems.append(f"missing keys {_short_list(report.missing)}")
    if strict and report.unexpected:
        problems.append(f"unexpected keys {_short_list(report.unexpected)}")
    if fatal:
        shapes = [f"{k} (checkpoint {list(state[k].shape)} vs model {list(own[k].shape)})" for k in fatal]
        hint = ""
        if any(_class_dependent(state[k].shape, own[k].shape) for k in fatal):
            hint = " - was it trained with another number of classes? (fine-tune with `train --weights`)"
        problems.append(f"shape mismatch {_short_list(shapes, 3)}{hint}")
    if problems:
        raise WeightsMismatchError(
            f"weights file '{path}' does not fit this model: " + "; ".join(problems) + _saved_config_note(saved_config),
            saved_config=saved_config,
        )

    model.load_state_dict(state, strict=False)
    return report
