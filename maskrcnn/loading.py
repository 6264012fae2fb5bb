"""Loading the model a run predicts with: PyTorch, or an exported file run by ONNX Runtime or OpenVINO.

`load_backend(config, weights, overrides, backend)` returns a model with `predict` for any backend: the PyTorch
model (`maskrcnn.api.load_model`), an exported .onnx file (or its int8 IR from `maskrcnn quantize`) in
`maskrcnn.onnx_model.OnnxMaskRCNN`, or a checkpoint or zoo model exported once into the export cache
(`maskrcnn.export_cache`) and run from there. The command line's `--config`, `--weights`, `--backend`,
`--precision` and `--device` end up here (`maskrcnn.commands.options` turns them into these arguments);
nothing here parses arguments, so any other code can load models the same way.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from maskrcnn.errors import UserError


def default_weights(config: str | os.PathLike | None, weights: str | os.PathLike | None) -> Any:
    """Return `weights`, or, when neither `config` nor `weights` names a model, the zoo's default COCO model
    (said in one line on stderr; fetched once when loaded)."""
    if weights or config:
        return weights
    from maskrcnn.zoo import DEFAULT_MODEL

    print(f"no --weights or --config: using the default COCO model '{DEFAULT_MODEL}' "
          "(`maskrcnn models` lists the others)", file=sys.stderr)
    return DEFAULT_MODEL


def load_pytorch_model(config: Any, weights: Any, overrides: list[str], device: str = "cpu", *,
                       default_model: bool = False) -> Any:
    """Return the PyTorch model `config`/`weights`/`overrides` name, in eval mode on `device`.

    With `default_model` and neither `config` nor `weights`, the zoo's default COCO model is used (fetched once).
    A config without weights gets a one-line note: its detections mean nothing.
    """
    from maskrcnn.api import load_model, random_weights_note

    if default_model:
        weights = default_weights(config, weights)
    random_weights_note(config, weights)
    return load_model(config, weights, overrides, device=device)


def _is_tiling(override: str) -> bool:
    return override.split("=", 1)[0].strip().startswith("test.tiling.")


def cached_checkpoint_export(config: Any, weights: Any, overrides: list[str], runtime: str) -> Path:
    """Return the ONNX export of the checkpoint (or zoo model) `weights`/`config`/`overrides` name, for `runtime`
    (its name, for the message): neither names the zoo's default COCO model.

    The export goes into the export cache (`maskrcnn.export_cache.export_dir()`, beside the zoo's weights), named
    by a digest of the weights, config and code, so a later run with the same model reuses the file and any change
    exports anew.
    """
    from maskrcnn.export_cache import cached_export, export_dir

    weights = default_weights(config, weights)
    model = load_pytorch_model(config, weights, overrides, device="cpu")
    start = time.perf_counter()
    path, reused = cached_export(model, export_dir())
    if reused:
        print(f"running the export of '{weights}' cached in {path}", file=sys.stderr)
    else:
        print(f"exported '{weights}' for {runtime} in {time.perf_counter() - start:.1f} s to {path} (reused while "
              "the model is unchanged)", file=sys.stderr)
    return path


def exported_checkpoint(config: Any, weights: Any, overrides: list[str], backend: str, precision: str | None,
                        requests: int = 1) -> Any:
    """Return the PyTorch model `config`/`weights`/`overrides` name, exported to ONNX and loaded by `backend`:
    through the cache (`cached_checkpoint_export`), or, for a config without weights, whose random weights
    differ every run, through a temporary file."""
    from maskrcnn.export import export_onnx
    from maskrcnn.onnx_backends import RUNNERS
    from maskrcnn.onnx_model import OnnxMaskRCNN

    runtime = RUNNERS[backend].name
    if weights or not config:
        return OnnxMaskRCNN(cached_checkpoint_export(config, weights, overrides, runtime), backend=backend,
                            precision=precision, requests=requests)
    model = load_pytorch_model(config, weights, overrides, device="cpu")
    start = time.perf_counter()
    folder = tempfile.TemporaryDirectory(prefix="maskrcnn-export-")
    exported = OnnxMaskRCNN(export_onnx(model, Path(folder.name) / "model.onnx"), backend=backend, precision=precision,
                            requests=requests)
    # OpenVINO may map the file rather than copy it: keep it for the model's lifetime (deleted with it).
    exported.temporary_folder = folder
    print(f"exported '{config}' for {runtime} in {time.perf_counter() - start:.1f} s (not cached: random "
          "weights)", file=sys.stderr)
    return exported


def load_backend(config: Any, weights: Any, overrides: list[str], backend: str = "pytorch",
                 precision: str | None = None, device: str | None = "cpu", requests: int = 1) -> Any:
    """Return the model to predict with: a PyTorch MaskRCNN, or an exported file run by ONNX Runtime or OpenVINO
    (`backend`, one of `maskrcnn.onnx_backends.BACKENDS`; `precision` and `requests`, images OpenVINO runs at
    once, as `maskrcnn.onnx_model.OnnxMaskRCNN` takes them).

    Given neither `weights` nor `config`, the default COCO model of the zoo is used (fetched once). For a runtime,
    `weights` may be an exported file (which carries its config: only `test.tiling.*` overrides apply), or a
    checkpoint or zoo name, exported once into the cache (`exported_checkpoint`); it runs on the CPU only.
    """
    from maskrcnn.onnx_backends import BACKENDS, IR_SUFFIX, is_exported_file

    if backend not in BACKENDS:
        return load_pytorch_model(config, weights, overrides, device=device or "cpu", default_model=True)
    from maskrcnn.config import apply_overrides
    from maskrcnn.onnx_model import OnnxMaskRCNN

    if device != "cpu":
        raise UserError(f"--backend {backend} runs on the CPU only; drop --device")
    # Tiling happens outside the graph (windows in, detections merged): its keys apply to any exported model
    # and are no part of the export (a checkpoint's cached export does not change with them).
    tiling = [item for item in overrides if _is_tiling(item)]
    if not is_exported_file(weights):
        graph = [item for item in overrides if not _is_tiling(item)]
        model = exported_checkpoint(config, weights, graph, backend, precision, requests)
        apply_overrides(model.cfg, tiling)
        return model
    if backend != "openvino" and str(weights).lower().endswith(IR_SUFFIX):
        raise UserError(f"'{weights}' is an OpenVINO IR (from `maskrcnn quantize`); run it with --backend openvino")
    if config or len(tiling) < len(overrides):
        raise UserError(f"--backend {backend} uses the config stored in the .onnx file; "
                        "drop --config and KEY=VALUE overrides other than test.tiling.* "
                        "(export again to change the model)")
    model = OnnxMaskRCNN(weights, backend=backend, precision=precision, requests=requests)
    if model.runner.precision == "int8":  # said once, as --backend auto says which runtime
        print(f"{model.runner.name} runs '{weights}' in int8 (quantized by `maskrcnn quantize`)", file=sys.stderr)
    apply_overrides(model.cfg, tiling)
    return model
