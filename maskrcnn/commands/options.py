"""The options that several commands share, defined once: one name and one help text each.

`--config`, `--weights`, `--device`, the KEY=VALUE overrides and `--backend`/`--precision` are added here,
and `load_backend` turns them into the model a command runs. Older spellings (`-c`, `--preset`) are still
accepted as hidden aliases, so that scripts written for them keep working without listing them in `--help`.

Nothing heavy is imported at module level: `maskrcnn COMMAND --help` must stay fast (tests/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from maskrcnn.errors import UserError

CONFIG_ALIASES = ("-c", "--preset")  # earlier spellings of --config, accepted but not shown
WEIGHTS_SOURCES = ("a model name from `maskrcnn models` (fetched once)", "our checkpoint",
                   "a torchvision / Detectron2 weights file")
# What load_backend uses without --weights and --config: zoo.DEFAULT_MODEL, named here so --help imports no zoo.
DEFAULT_MODEL_HELP = "maskrcnn_resnet50_fpn_v2, COCO, unless --config is given"
DEFAULT_CONFIG_FROM_WEIGHTS = "the config of the --weights zoo model or checkpoint"


def add_config_option(p: argparse.ArgumentParser, default: str = DEFAULT_CONFIG_FROM_WEIGHTS) -> None:
    """Add `--config PRESET_OR_YAML` (hidden aliases `-c`, `--preset`); `default` says what is used without it."""
    p.add_argument("--config", default=None, help=f"preset name or YAML file (default: {default})")
    p.add_argument(*CONFIG_ALIASES, dest="config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_weights_option(p: argparse.ArgumentParser, *, onnx: bool = False, default: str | None = None,
                       help: str | None = None) -> None:
    """Add `--weights NAME_OR_FILE`: what to load (`onnx`: an exported file too); `help` replaces the text."""
    sources = [*WEIGHTS_SOURCES, *(["a .onnx file from `maskrcnn export` (or its int8 .xml from `maskrcnn quantize`)"]
                                   if onnx else [])]
    text = ", ".join(sources[:-1]) + f" or {sources[-1]}"
    p.add_argument("--weights", default=None, metavar="NAME_OR_FILE",
                   help=help or (text + (f" (default: {default})" if default else "")))


def add_model_options(p: argparse.ArgumentParser, *, onnx: bool = False, default_weights: str | None = None) -> None:
    """Add `--config` and `--weights`, the pair that names the model a command loads (see `load_backend`)."""
    add_config_option(p)
    add_weights_option(p, onnx=onnx, default=default_weights)


def add_device_option(p: argparse.ArgumentParser, default: str | None = "cpu", note: str = "") -> None:
    """Add `--device`: `default` None means the config's `device` (which may be auto)."""
    if default is None:
        text = "auto, cpu or cuda (default: the config's device)"
    else:
        text = f"cpu or cuda (default: {default})"
    p.add_argument("--device", default=default, help=text + (f"; {note}" if note else ""))


def add_overrides(p: argparse.ArgumentParser, dest: str = "overrides", example: str = "solver.max_iter=1000",
                  note: str = "") -> None:
    """Add the positional KEY=VALUE config overrides (items after options join them too, see maskrcnn.cli)."""
    p.add_argument(dest, nargs="*", metavar="KEY=VALUE",
                   help=f"config overrides, e.g. {example}" + (f" ({note})" if note else ""))


def add_backend_option(p: argparse.ArgumentParser) -> None:
    """Add `--backend auto|pytorch|onnxruntime|openvino` and OpenVINO's `--precision` (predict, eval, serve)."""
    from maskrcnn.onnx_backends import BACKENDS, PRECISIONS

    p.add_argument("--backend", choices=["auto", "pytorch", *BACKENDS], default="auto",
                   help="auto (default): PyTorch for a checkpoint, the fastest installed runtime (openvino, "
                        "then onnxruntime) for --weights MODEL.onnx from `maskrcnn export --format onnx`, "
                        "openvino for the int8 MODEL.xml from `maskrcnn quantize`; "
                        "or name one (onnxruntime and openvino also take a checkpoint or a zoo name: exported "
                        "once into the weights cache and reused while the model is unchanged)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="openvino only: its inference precision (default: fp32, int8 for a file from `maskrcnn "
                        "quantize`); bf16 needs a CPU with native bfloat16 (AVX-512/AMX). For PyTorch use the "
                        "override test.precision=bf16")


def resolve_backend(args: argparse.Namespace) -> str:
    """Replace `--backend auto` in `args` by the backend it means for `--weights` (and say so for a file)."""
    from maskrcnn.onnx_backends import RUNNERS, choose_backend

    if getattr(args, "backend", "auto") == "auto":
        args.backend = choose_backend(getattr(args, "weights", None))
        if args.backend in RUNNERS:
            print(f"--backend auto: running '{args.weights}' with {RUNNERS[args.backend].name}", file=sys.stderr)
    return args.backend


def backend_precision(args: argparse.Namespace) -> str | None:
    """Return the --precision to run an exported file with (None: the file's own, fp32 or int8); refuse it where it
    does not apply."""
    backend, precision = resolve_backend(args), getattr(args, "precision", None)
    if precision is not None and backend != "openvino":
        hint = "set test.precision=bf16 for PyTorch" if backend == "pytorch" else "ONNX Runtime runs float32"
        raise UserError(f"--precision applies to --backend openvino only ({hint})")
    return precision


def load_pytorch_model(args: argparse.Namespace, overrides: list[str], *, default_model: bool = False,
                       device: str | None = None) -> Any:
    """Return the PyTorch model that `--config`/`--weights` name, in eval mode on `device` (default: --device).

    With `default_model` and neither option, the zoo's default COCO model is used (fetched once).
    A config without weights gets a one-line note: its detections mean nothing.
    """
    from maskrcnn.api import load_model, random_weights_note

    if default_model and not args.weights and not args.config:
        from maskrcnn.zoo import DEFAULT_MODEL

        print(f"no --weights or --config: using the default COCO model '{DEFAULT_MODEL}' "
              "(`maskrcnn models` lists the others)", file=sys.stderr)
        args.weights = DEFAULT_MODEL
    random_weights_note(args.config, args.weights)
    return load_model(args.config, args.weights, overrides, device=device or getattr(args, "device", None) or "cpu")


def _is_tiling(override: str) -> bool:
    return override.split("=", 1)[0].strip().startswith("test.tiling.")


def cached_checkpoint_export(args: argparse.Namespace, overrides: list[str], runtime: str) -> Path:
    """Return the ONNX export of the checkpoint (or zoo model) `--weights`/`--config`/overrides name, for `runtime`.

    The export goes into the cache's `exports/` folder (beside the zoo's weights), named by a digest of the
    weights, config and code, so a later run with the same model reuses the file and any change exports anew.
    """
    from maskrcnn.export_cache import cached_export
    from maskrcnn.zoo.download import cache_dir

    model = load_pytorch_model(args, overrides, default_model=True, device="cpu")
    source, start = args.weights, time.perf_counter()
    path, reused = cached_export(model, cache_dir() / "exports")
    if reused:
        print(f"running the export of '{source}' cached in {path}", file=sys.stderr)
    else:
        print(f"exported '{source}' for {runtime} in {time.perf_counter() - start:.1f} s to {path} (reused while "
              "the model is unchanged)", file=sys.stderr)
    return path


def exported_checkpoint(args: argparse.Namespace, overrides: list[str], backend: str, precision: str | None,
                        requests: int = 1) -> Any:
    """Return the PyTorch model `--config`/`--weights`/overrides name, exported to ONNX and loaded by `backend`:
    through the cache (`cached_checkpoint_export`), or, for a config without weights, whose random weights
    differ every run, through a temporary file."""
    from maskrcnn.export import export_onnx
    from maskrcnn.onnx_model import OnnxMaskRCNN
    from maskrcnn.onnx_backends import RUNNERS

    runtime = RUNNERS[backend].name
    if args.weights or not args.config:
        return OnnxMaskRCNN(cached_checkpoint_export(args, overrides, runtime), backend=backend, precision=precision,
                            requests=requests)
    model = load_pytorch_model(args, overrides, device="cpu")
    start = time.perf_counter()
    folder = tempfile.TemporaryDirectory(prefix="maskrcnn-export-")
    exported = OnnxMaskRCNN(export_onnx(model, Path(folder.name) / "model.onnx"), backend=backend, precision=precision,
                            requests=requests)
    # OpenVINO may map the file rather than copy it: keep it for the model's lifetime (deleted with it).
    exported.temporary_folder = folder
    print(f"exported '{args.config}' for {runtime} in {time.perf_counter() - start:.1f} s (not cached: random "
          "weights)", file=sys.stderr)
    return exported


def load_backend(args: argparse.Namespace, overrides: list[str], requests: int = 1) -> Any:
    """Return the model to predict with: a PyTorch MaskRCNN, or an exported file run by ONNX Runtime or OpenVINO
    (`requests`: images OpenVINO runs at once, see `maskrcnn.onnx_backends.OpenVinoRunner`).

    Given neither --weights nor --config, the default COCO model of the zoo is used (fetched once).
    """
    from maskrcnn.onnx_backends import BACKENDS, IR_SUFFIX, is_exported_file

    precision = backend_precision(args)
    backend = args.backend
    if backend not in BACKENDS:
        return load_pytorch_model(args, overrides, default_model=True)
    from maskrcnn.config import apply_overrides
    from maskrcnn.onnx_model import OnnxMaskRCNN

    if args.device != "cpu":
        raise UserError(f"--backend {backend} runs on the CPU only; drop --device")
    # Tiling happens outside the graph (windows in, detections merged): its keys apply to any exported model
    # and are no part of the export (a checkpoint's cached export does not change with them).
    tiling = [item for item in overrides if _is_tiling(item)]
    if not is_exported_file(args.weights):
        graph = [item for item in overrides if not _is_tiling(item)]
        model = exported_checkpoint(args, graph, backend, precision, requests)
        apply_overrides(model.cfg, tiling)
        return model
    if backend != "openvino" and str(args.weights).lower().endswith(IR_SUFFIX):
        raise UserError(f"'{args.weights}' is an OpenVINO IR (from `maskrcnn quantize`); run it with --backend openvino")
    if args.config or len(tiling) < len(overrides):
        raise UserError(f"--backend {backend} uses the config stored in the .onnx file; "
                        "drop --config and KEY=VALUE overrides other than test.tiling.* "
                        "(export again to change the model)")
    model = OnnxMaskRCNN(args.weights, backend=backend, precision=precision, requests=requests)
    if model.runner.precision == "int8":  # said once, as --backend auto says which runtime
        print(f"{model.runner.name} runs '{args.weights}' in int8 (quantized by `maskrcnn quantize`)", file=sys.stderr)
    apply_overrides(model.cfg, tiling)
    return model
