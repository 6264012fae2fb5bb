"""`maskrcnn serve`: an HTTP service for a model (FastAPI + uvicorn), with a web page at `/`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from maskrcnn.commands.options import (DEFAULT_MODEL_HELP, add_backend_option, add_device_option, add_model_options,
                                      add_overrides)
from maskrcnn.errors import UserError

HELP = ("Serve a model over HTTP: POST /predict (image → JSON or ?overlay=1 PNG), GET /health/live, "
        "/health/ready, /metrics, /model, "
        "OpenAPI docs at /docs, a web page at /; pre-annotation for Label Studio (/label-studio) and CVAT (/cvat)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the serve command's arguments."""
    add_overrides(p, example="test.precision=bf16", note="PyTorch backend")
    add_model_options(p, onnx=True, default_weights=DEFAULT_MODEL_HELP)
    add_backend_option(p)
    add_device_option(p, note="PyTorch backend")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="default for /predict's score_threshold (default: 0.5)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: 20 MB)")
    p.add_argument("--max-concurrent", type=int, default=1,
                   help="batches run at once, each in its own thread (default: 1; each already uses every core)")
    p.add_argument("--max-batch", type=int, default=1,
                   help="images given to the model together: one padded batch for PyTorch, as many OpenVINO "
                        "infer requests at once (default: 1)")
    p.add_argument("--max-delay-ms", type=float, default=0.0,
                   help="how long the oldest queued image may wait for others to fill a batch (default: 0)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="images waiting beyond those running; more get 503 with Retry-After (default: 8)")
    p.add_argument("--max-queue-mb", type=float, default=256.0,
                   help="decoded images waiting, in MB; more get 503 (default: 256)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds from a request's arrival to its answer; a queued request past it is dropped, "
                        "and answered 504 (default: 60)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send its upload; 408 after (default: 30)")
    p.add_argument("--max-uploads", type=int, default=64,
                   help="uploads read at once, each up to --max-upload-mb in memory; more get 503 (default: 64)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one JSON line per request on stderr (default: on)")
    add_labeling_arguments(p)


def add_labeling_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options for reaching Label Studio's task images (maskrcnn/serve/labeling.py; kept here, where
    `maskrcnn serve --help` imports nothing heavy)."""
    group = p.add_argument_group("labelling tools (Label Studio at /label-studio, CVAT at /cvat)")
    group.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                       help="Label Studio's address, for task images under /data/... (default: $LABEL_STUDIO_URL, "
                            "else the address Label Studio sends when a project connects)")
    group.add_argument("--label-studio-token", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                       help="Label Studio API token for those images (default: $LABEL_STUDIO_API_KEY, else the one "
                            "Label Studio sends when a project connects)")
    group.add_argument("--local-files-root", type=Path,
                       default=os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"),
                       help="folder of task images given as local paths or /data/local-files/?d=... (default: "
                            "$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; without it local paths are refused)")


def check_limits(args: argparse.Namespace) -> None:
    """Raise a UserError naming the first limit out of range."""
    if args.max_concurrent < 1 or args.max_batch < 1 or args.max_uploads < 1:
        raise UserError("--max-concurrent, --max-batch and --max-uploads must be at least 1")
    if args.max_queue < 0 or args.max_delay_ms < 0 or args.max_queue_mb <= 0:
        raise UserError("--max-queue and --max-delay-ms must be at least 0, and --max-queue-mb above 0")
    if args.timeout <= 0 or args.read_timeout <= 0:
        raise UserError("--timeout and --read-timeout must be above 0 seconds")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port (1..65535)")


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    import logging

    import uvicorn

    from maskrcnn.commands.options import load_backend
    from maskrcnn.serve import create_app
    from maskrcnn.serve.labeling import access_from_args

    check_limits(args)
    labeling_access = access_from_args(args)  # a bad --local-files-root fails before the model loads
    # OpenVINO: an infer request (and a CPU stream) for every image that may run at once.
    model = load_backend(args, list(args.overrides), requests=args.max_concurrent * args.max_batch)
    app = create_app(model, max_upload=int(args.max_upload_mb * 2**20), max_concurrent=args.max_concurrent,
                     max_queue=args.max_queue, score_threshold=args.score_threshold, backend=args.backend,
                     weights=args.weights, max_batch=args.max_batch, max_delay=args.max_delay_ms / 1000,
                     max_queue_bytes=int(args.max_queue_mb * 2**20), timeout=args.timeout,
                     read_timeout=args.read_timeout, max_uploads=args.max_uploads,
                     labeling=labeling_access)
    access = logging.getLogger("maskrcnn.serve.access")
    access.setLevel(logging.INFO if args.access_log else logging.WARNING)
    access.addHandler(logging.StreamHandler())
    access.propagate = False
    print(f"serving on http://{args.host}:{args.port}/ (API docs: /docs); Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0
