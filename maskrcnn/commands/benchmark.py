"""`maskrcnn benchmark`: inference time by stage, training images/s and peak memory on random inputs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from maskrcnn.commands.options import add_config_option, add_device_option, add_overrides, add_weights_option
from maskrcnn.errors import UserError

HELP = ("Time inference (split by stage) and training steps on random images; report peak memory "
        "(CPU: peak RSS; CUDA: max_memory_allocated, untested on a GPU here).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the benchmark command's arguments."""
    add_overrides(p, example="model.backbone.depth=101")
    add_config_option(p)
    add_weights_option(p, default="random weights, which time the same")
    p.add_argument("--size", default="800x1333", help="HxW of the random input image (default: 800x1333)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32, or bf16/fp16 autocast (fp16 needs CUDA: bf16 is used on the CPU, with a note)")
    p.add_argument("--mode", choices=["inference", "train", "both"], default="inference",
                   help="what to time (default: inference)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default: 2)")
    p.add_argument("--batch", type=int, default=2, help="training batch size (inference uses 1 image)")
    p.add_argument("--max-memory", type=float, default=None, metavar="MB",
                   help="training: find the largest batch 1, 2, 4, ... whose step's peak memory growth "
                        "stays within MB, each measured in a fresh process")
    from maskrcnn.onnx_backends import BACKENDS

    p.add_argument("--backend", choices=["pytorch", *BACKENDS], default="pytorch",
                   help="pytorch (default), or time inference in an ONNX runtime: --weights MODEL.onnx (or "
                        "openvino's int8 MODEL.xml), or a checkpoint/config exported once into the cache; "
                        "--precision bf16 is OpenVINO's bf16; no stage split (the graph is one call)")
    add_device_option(p, note="the CUDA path is untested here")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")
    p.add_argument("--quiet", action="store_true", help="print no table")


def exported_model(args: argparse.Namespace) -> Any:
    """Return the exported model `--backend onnxruntime|openvino` times: `--weights` as a file, or the
    checkpoint/config exported once into the cache (`options.load_backend`, as `predict` loads it)."""
    from maskrcnn.commands.options import load_backend

    if args.mode != "inference" or args.max_memory is not None:
        raise UserError(f"--backend {args.backend} times inference only: drop --mode {args.mode} / --max-memory")
    if args.precision == "fp16":
        raise UserError(f"--backend {args.backend} runs fp32 (and openvino bf16); fp16 is CUDA autocast")
    # The runtimes' precision: None runs the file as it is (fp32, or int8 for `maskrcnn quantize`'s IR).
    runtime_args = argparse.Namespace(**{**vars(args), "precision": None if args.precision == "fp32" else args.precision})
    return load_backend(runtime_args, args.overrides)


def run(args: argparse.Namespace) -> int:
    """Build the model, measure, print a table and optionally write JSON."""
    from maskrcnn.engine.benchmark import (BenchmarkOptions, find_max_batch, format_report, parse_size,
                                           run_benchmark, run_exported_benchmark)
    from maskrcnn.engine.precision import resolve_device
    from maskrcnn.fileio import atomic_write_text
    from maskrcnn.loading import load_pytorch_model

    if args.config is None and args.weights is None:
        raise UserError("benchmark needs --config (a preset or YAML file) or --weights (a zoo model name "
                        "or a checkpoint with a stored config)")
    for item in args.overrides:
        if "=" not in item:
            raise UserError(f"unexpected argument '{item}': overrides are KEY=VALUE")
    size = parse_size(args.size)
    device = resolve_device(args.device)
    if args.max_memory is not None and args.max_memory <= 0:
        raise UserError("--max-memory must be a positive number of MB")
    opts = BenchmarkOptions(
        size=size, precision=args.precision, mode=args.mode, runs=args.runs, warmup=args.warmup,
        batch=args.batch, extra={"config": args.config, "weights": args.weights, "overrides": args.overrides},
    )
    if args.backend != "pytorch":
        report = run_exported_benchmark(exported_model(args), opts)
    elif args.max_memory is not None:
        # Only the search: each batch size runs in its own process.
        argv = [*args.overrides, "--size", args.size, "--precision", args.precision, "--runs", str(args.runs),
                "--warmup", str(args.warmup), "--device", args.device]
        if args.config:
            argv += ["--config", args.config]
        if args.weights:
            argv += ["--weights", args.weights]
        from maskrcnn.engine.benchmark import autocast_dtype, environment

        dtype, _ = autocast_dtype(args.precision, device)
        report = {"size": list(size), "precision": args.precision,
                  "autocast": str(dtype or "none").replace("torch.", ""),
                  "mode": "train", "environment": environment(device), **opts.extra,
                  "max_memory": find_max_batch(argv, args.max_memory)}
    else:
        model = load_pytorch_model(args.config, args.weights, args.overrides, device=str(device))
        report = run_benchmark(model, opts, device)
    if not args.quiet:
        print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        if not args.quiet:
            print(f"report written to {args.json}")
    return 0
