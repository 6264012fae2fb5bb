"""The HTTP service: `create_app(model)` returns a FastAPI app with /predict, /health, /metrics, /model and a page.

A /predict request's body is read within a size limit (413) and a read timeout (408), decoded by the same
reader as `maskrcnn predict` (400 for a file that is no readable image, 415 for a declared non-image type)
in a worker thread, and only then admitted to the scheduler's bounded queue (`maskrcnn.serve.scheduler`:
503 with Retry-After when it is full), which runs it in a batch within its deadline (504 after it).
Everything heavy (multipart parsing, decoding, the model, RLE, drawing, encoding) runs in worker threads,
so the event loop answers /health/live while the model runs.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import tempfile
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from maskrcnn.errors import ImageReadError
from maskrcnn.serve.access import CLIENT_CLOSED, AccessLog
from maskrcnn.serve.metrics import ServeMetrics
from maskrcnn.serve.page import INDEX_HTML
from maskrcnn.serve.records import detection_records
from maskrcnn.serve.scheduler import Dropped, Job, QueueFull, Scheduler
from maskrcnn.serve.uploads import multipart_file, read_body

DEFAULT_MAX_UPLOAD = 20 * 2**20
# Room for the multipart envelope (boundaries, headers) around an image at the size limit.
MULTIPART_OVERHEAD = 64 * 1024
ACCEPTED_TYPES = ("image/", "application/octet-stream")
LOG = logging.getLogger("maskrcnn.serve")
T = TypeVar("T")

UPLOAD_SCHEMA = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


async def upload_bytes(request: Request, max_upload: int, until: float | None = None) -> tuple[bytes, str]:
    """Return the uploaded image's bytes and its declared type (multipart field `file`, or a raw body), read
    by `until` (time.monotonic(); 408 after it)."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, max_upload + MULTIPART_OVERHEAD, until)
    if content_type.startswith("multipart/form-data"):
        data, declared = await run_in_threadpool(multipart_file, body, content_type, "file", max_upload + 1)
    else:
        data, declared = body, content_type
    if len(data) > max_upload:
        raise HTTPException(413, f"image of {len(data)} bytes is over the limit of {max_upload} bytes")
    if not data:
        raise HTTPException(400, "the upload is empty; send an image file")
    declared = declared.split(";")[0].strip().lower()
    if declared and not declared.startswith(ACCEPTED_TYPES):
        raise HTTPException(415, f"'{declared}' is not an image type; send a JPEG, PNG, BMP, TIFF or WebP image")
    return data, declared


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Return HxWx3 uint8 RGB from image bytes, with `maskrcnn predict`'s reader (EXIF, 16-bit, ...)."""
    from maskrcnn.data.image_io import read_image

    fd, name = tempfile.mkstemp(prefix="maskrcnn-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return read_image(name, max_pixels=max_pixels)
        except ImageReadError as e:  # name the upload, not the temporary file
            raise HTTPException(400, str(e).replace(f"'{name}'", "the upload")) from None
    finally:
        os.unlink(name)


def create_app(model: Any, *, max_upload: int = DEFAULT_MAX_UPLOAD, max_concurrent: int = 1, max_queue: int = 8,
               score_threshold: float = 0.5, backend: str = "pytorch", weights: str | None = None,
               max_batch: int = 1, max_delay: float = 0.0, max_queue_bytes: int = 256 * 2**20,
               timeout: float = 60.0, read_timeout: float = 30.0, max_uploads: int = 64,
               labeling: Any = None) -> FastAPI:
    """Return the FastAPI app serving `model` (a MaskRCNN or an OnnxMaskRCNN: anything with `predict`), with the
    labelling tools' routes (maskrcnn.serve.labeling; `labeling`: how it reaches Label Studio's images).

    `max_concurrent` batches of up to `max_batch` images run at once (a batch gathers for up to `max_delay`
    s); `max_queue` images (and `max_queue_bytes` of decoded images) wait; a request has `timeout` s from
    its arrival, of which at most `read_timeout` to send its body; `max_uploads` bodies are read at once.
    """
    from maskrcnn.api import category_ids

    metrics = ServeMetrics()
    scheduler = Scheduler(lambda images: model.predict(images, batch_size=len(images)), metrics,
                          max_batch=max_batch, max_delay=max_delay, workers=max_concurrent, max_queue=max_queue,
                          max_queue_bytes=max_queue_bytes)
    ids = category_ids(model)
    names = list(model.class_names)
    state: dict[str, Any] = {"served": 0, "started": time.time(), "ready": False, "reading": 0}

    async def warm_up() -> None:
        """Run a batch of gray images through the model once; then /health/ready answers 200."""
        try:
            await scheduler.run_now([np.full((64, 64, 3), 128, np.uint8)] * max_batch)
        except Exception:
            LOG.exception("the warm-up inference failed; /health/ready stays 503")
            return
        state["ready"] = True
        metrics.ready.set(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        warming = asyncio.create_task(warm_up())
        yield
        warming.cancel()
        await scheduler.stop()

    app = FastAPI(title="maskrcnn", version="0.1.0", lifespan=lifespan,
                  description="Mask R-CNN instance segmentation: upload an image, get boxes, classes, scores "
                              "and masks (COCO RLE), or an overlay PNG.")
    app.add_middleware(AccessLog, metrics=metrics)
    app.add_exception_handler(NoResult, lambda request, e: e.response)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return INDEX_HTML

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load: images queued and running, the limits, requests served, uptime."""
        return {"status": "ok", "ready": state["ready"], "queued": len(scheduler.queue),
                "queued_bytes": scheduler.queued_bytes, "running": scheduler.running, "reading": state["reading"],
                "max_queue": max_queue, "max_concurrent": max_concurrent, "max_batch": max_batch,
                "served": state["served"], "uptime_s": round(time.time() - state["started"], 1)}

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """200 while the process answers (it does while the model runs)."""
        return {"status": "ok"}

    @app.get("/health/ready", responses={503: {"description": "the model is not loaded and warmed up yet"}})
    async def ready() -> Response:
        """200 once the model is loaded and has run a warm-up batch; 503 before."""
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests, latency, queue wait and depth, batch sizes, inference time."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        """The model's classes (label, COCO category id, name), backend, weights and full config."""
        shown = names or [f"class {i}" for i in range(1, model.cfg.model.num_classes + 1)]
        return {"backend": backend, "weights": weights, "score_threshold": score_threshold,
                "max_upload_bytes": max_upload,
                "classes": [{"label": i, "category_id": c, "name": n} for i, (c, n) in enumerate(zip(ids, shown), 1)],
                "config": model.cfg.to_dict()}

    @app.post("/predict", openapi_extra={"requestBody": UPLOAD_SCHEMA},
              responses={200: {"content": {"image/png": {}}, "description": "detections (JSON) or overlay (PNG)"},
                         400: {"description": "not a readable image"}, 408: {"description": "upload too slow"},
                         413: {"description": "upload too large"}, 415: {"description": "not an image type"},
                         503: {"description": "queue full"}, 504: {"description": "deadline passed"}})
    async def predict(
        request: Request,
        overlay: bool = Query(False, description="return the image with masks drawn (PNG) instead of JSON"),
        score_threshold: float | None = Query(None, ge=0.0, le=1.0,
                                              description="keep detections scoring at least this (default: the server's)"),
    ) -> Response:
        """Detect objects in one uploaded image (multipart field `file`, or the raw image as the body)."""
        arrived = time.monotonic()
        deadline = arrived + timeout
        data, _ = await counted_read(lambda: upload_bytes(request, max_upload, min(arrived + read_timeout, deadline)))
        image = await run_in_threadpool(decode_image, data, model.cfg.input.max_pixels)
        output, job = await run_model(request, image, deadline)
        assert job.started is not None
        elapsed = time.monotonic() - job.started
        request.state.access.update(bytes_in=len(data), queue_ms=round((job.started - job.enqueued) * 1000, 1),
                                    batch=job.batch)
        threshold = score_threshold_or(score_threshold)
        body, media_type = await run_in_threadpool(render, output, image, threshold, overlay, names, ids, elapsed)
        timing = f"queue;dur={(job.started - job.enqueued) * 1000:.1f}, inference;dur={elapsed * 1000:.1f}"
        return Response(body, media_type=media_type, headers={"Server-Timing": timing})

    def score_threshold_or(value: float | None) -> float:
        return score_threshold if value is None else value

    async def counted_read(read: Callable[[], Awaitable[T]]) -> T:
        """Return `read()`'s result, counted among the bodies being read (at most `max_uploads`; NoResult 503)."""
        if state["reading"] >= max_uploads:
            metrics.rejected.labels("uploads").inc()
            raise NoResult(busy(f"{max_uploads} uploads are being read", 1))
        state["reading"] += 1
        metrics.uploads.inc()
        try:
            return await read()
        finally:
            state["reading"] -= 1
            metrics.uploads.dec()

    async def run_model(request: Request, image: np.ndarray, deadline: float) -> tuple[dict[str, Any], Job]:
        """Queue one decoded image with the scheduler and return its output and job, or raise NoResult with the
        answer: 503 (queue full, shutting down), 504 (deadline), 499 (the client left), 500 (the model failed)."""
        job = Job(image, deadline)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise NoResult(busy(f"{len(scheduler.queue)} images queued ({e.reason.replace('_', ' ')} limit)",
                                e.retry_after)) from None
        watcher = asyncio.create_task(withdraw_on_disconnect(request, scheduler, job))
        try:
            output = await scheduler.result(job)
        except Dropped as e:
            if e.reason == "disconnected":
                raise NoResult(Response(status_code=CLIENT_CLOSED)) from None
            if e.reason == "shutdown":
                raise NoResult(busy("the server is shutting down", 5)) from None
            raise NoResult(JSONResponse({"detail": f"no answer within the {timeout:g} s deadline"},
                                        status_code=504)) from None
        except Exception as e:  # the model failed on this batch
            LOG.exception("inference failed")
            raise NoResult(JSONResponse({"detail": f"inference failed: {type(e).__name__}: {e}"},
                                        status_code=500)) from None
        finally:
            watcher.cancel()
        state["served"] += 1
        return output, job

    async def read_tool_body(request: Request, limit: int) -> bytes:
        """Read a labelling tool's request body as /predict reads an upload (counted, within --read-timeout)."""
        until = time.monotonic() + min(read_timeout, timeout)
        return await counted_read(lambda: read_body(request, limit, until))

    async def infer(request: Request, image: np.ndarray, threshold: float) -> dict[str, Any]:
        """Run one image of a labelling tool's request through the scheduler, as /predict does (its own --timeout
        deadline from now); return its detections scoring at least `threshold`, on the CPU."""
        output, _ = await run_model(request, image, time.monotonic() + timeout)
        return await run_in_threadpool(above, output, threshold)

    from maskrcnn.serve.labeling import labeling_router

    app.include_router(labeling_router(model, infer, read_tool_body, decode_image, score_threshold=score_threshold,
                                       max_upload=max_upload, weights=weights, access=labeling))
    return app


class NoResult(Exception):
    """A request that gets no detections: `response` is its answer (503, 504, 499, 500)."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


def busy(why: str, retry_after: int) -> JSONResponse:
    """Return the 503 answer of a full server, with Retry-After."""
    return JSONResponse({"detail": f"busy: {why}; retry after {retry_after} s"}, status_code=503,
                        headers={"Retry-After": str(retry_after)})


async def withdraw_on_disconnect(request: Request, scheduler: Scheduler, job: Job) -> None:
    """Wait for the client to leave (the body is read: the next message is the disconnect); withdraw its job."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scheduler.withdraw(job, "disconnected")
    if job.future is not None and not job.future.done():  # already running: stop waiting for it
        job.future.set_exception(Dropped("disconnected"))


def above(output: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Return one image's detections (on the CPU) that score at least `threshold`."""
    keep = output["scores"].cpu() >= threshold
    kept = {k: (v.cpu() if hasattr(v, "cpu") else v)[keep] for k, v in output.items() if k != "names"}
    if "names" in output:
        kept["names"] = [n for n, k in zip(output["names"], keep.tolist()) if k]
    return kept


def render(output: dict[str, Any], image: np.ndarray, threshold: float, overlay: bool, names: list[str],
           ids: list[int], seconds: float) -> tuple[bytes, str]:
    """Return the /predict answer's body and type: the detections as JSON, or the overlay as PNG."""
    output = above(output, threshold)
    if overlay:
        from maskrcnn.visualize import draw_instances

        buffer = io.BytesIO()
        draw_instances(image, output, names, threshold).save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    return json.dumps(detections_json(output, image.shape[:2], ids, seconds)).encode(), "application/json"


def detections_json(output: dict[str, Any], size: tuple[int, int], ids: list[int], seconds: float) -> dict[str, Any]:
    """Return the /predict JSON: image size, inference time, and one record per detection."""
    return {"width": int(size[1]), "height": int(size[0]), "inference_ms": round(seconds * 1000, 1),
            "box_format": "xyxy pixels", "mask_format": "COCO RLE", "detections": detection_records(output, ids)}
