"""`maskrcnn serve`: an HTTP service (FastAPI + uvicorn) around a model, with a web page at `/`."""

from maskrcnn.serve.app import create_app

__all__ = ["create_app"]
