"""The export cache: a model's ONNX export written once and reused while nothing it depends on changes.

An export is named by `export_key`, a digest of the model's weights, config and class names, the package's
source code and torch's version, so a later run with the same model finds the file and any change exports
anew. Stale files are never reused, but never deleted either. The command line keeps them in `export_dir()`,
the `exports/` folder beside the model zoo's weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from maskrcnn.export import OPSET, check_exportable, export_onnx, model_metadata
from maskrcnn.modeling.mask_rcnn import MaskRCNN


def export_dir() -> Path:
    """Return the cache's `exports/` folder, beside the zoo's weights (`maskrcnn.zoo.download.cache_dir`)."""
    from maskrcnn.zoo.download import cache_dir

    return cache_dir() / "exports"


def export_key(model: MaskRCNN) -> str:
    """Return a digest of everything an export of `model` depends on: its weights, config and class names
    (the file's metadata), the package's source code and torch's version (they make the graph)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key, value in sorted(model_metadata(model).items()):
        digest.update(f"{key}={value}".encode())
    package = Path(__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode())
        digest.update(source.read_bytes())
    digest.update(f"torch {torch.__version__}, opset {OPSET}".encode())
    return digest.hexdigest()[:24]


def cached_export(model: MaskRCNN, directory: str | os.PathLike) -> tuple[Path, bool]:
    """Return the ONNX export of `model` in `directory` (written there on first use, named by `export_key`)
    and whether it was there already. Raises ExportError if the model has a part the graph cannot hold."""
    check_exportable(model)  # before the digest: it hashes every weight
    path = Path(directory) / f"maskrcnn-{export_key(model)}.onnx"
    if path.is_file():
        return path, True
    return export_onnx(model, path), False
