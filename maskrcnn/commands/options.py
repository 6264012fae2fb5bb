"""The options that several commands share, defined once: one name and one help text each.

`--config`, `--weights`, `--device`, the KEY=VALUE overrides and `--backend`/`--precision` are added here,
and `load_backend` hands them to `maskrcnn.loading`, which loads the model a command runs. Older spellings
(`-c`, `--preset`) are still accepted as hidden aliases, so that scripts written for them keep working without
listing them in `--help`.

Nothing heavy is imported at module level: `maskrcnn COMMAND --help` must stay fast (tests/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import sys
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


def load_backend(args: argparse.Namespace, overrides: list[str], requests: int = 1) -> Any:
    """Return the model to predict with that `--config`/`--weights`/`--backend`/`--precision`/`--device` name:
    `maskrcnn.loading.load_backend` (`requests`: images OpenVINO runs at once, see
    `maskrcnn.onnx_backends.OpenVinoRunner`).

    Given neither --weights nor --config, the default COCO model of the zoo is used (fetched once), and
    `args.weights` names it afterwards.
    """
    from maskrcnn.loading import load_backend as load

    precision = backend_precision(args)
    model = load(args.config, args.weights, overrides, args.backend, precision, getattr(args, "device", None),
                 requests)
    if not args.weights and not args.config:
        from maskrcnn.zoo import DEFAULT_MODEL

        args.weights = DEFAULT_MODEL  # the model loaded: the command may report it (`maskrcnn serve` does)
    return model
