"""`maskrcnn serve`: an HTTP service for a model (FastAPI + uvicorn), with a web page at `/`."""

from __future__ import annotations

import argparse

from maskrcnn.commands.options import (DEFAULT_MODEL_HELP, add_backend_option, add_device_option, add_model_options,
                                      add_overrides)
from maskrcnn.errors import UserError
from maskrcnn.serve import labeling

HELP = ("Serve a model over HTTP: POST /predict (image → JSON or ?overlay=1 PNG), GET /health, GET /model, "
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
                   help="inferences run at once (default: 1; each already uses every core)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests waiting beyond those running; more get 503 (default: 8)")
    labeling.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    import uvicorn

    from maskrcnn.commands.options import load_backend
    from maskrcnn.serve import create_app

    if args.max_concurrent < 1 or args.max_queue < 0:
        raise UserError("--max-concurrent must be at least 1 and --max-queue at least 0")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port (1..65535)")
    model = load_backend(args, list(args.overrides))
    app = create_app(model, max_upload=int(args.max_upload_mb * 2**20), max_concurrent=args.max_concurrent,
                     max_queue=args.max_queue, score_threshold=args.score_threshold, backend=args.backend,
                     weights=args.weights, labeling=labeling.access_from_args(args))
    print(f"serving on http://{args.host}:{args.port}/ (API docs: /docs); Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0
