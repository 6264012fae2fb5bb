"""`maskrcnn serve`: an HTTP service (FastAPI + uvicorn) around a model, with a web page at `/`."""

from __future__ import annotations

from typing import Any


def create_app(model: Any, **kwargs: Any):
    """Return the FastAPI app serving `model` (see `maskrcnn.serve.app.create_app`)."""
    from maskrcnn.serve.app import create_app as create

    return create(model, **kwargs)


__all__ = ["create_app"]
