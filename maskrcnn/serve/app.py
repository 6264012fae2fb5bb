"""The HTTP service: `create_app(model)` returns a FastAPI app with /predict, /health, /model and a web page.

Uploads are read with a size limit (413), decoded by the same reader as `maskrcnn predict` (400 for a
file that is no readable image, 415 for a declared non-image type), and run by at most
`max_concurrent` inferences at a time in worker threads; up to `max_queue` more requests wait, and
any beyond that get 503 at once (with Retry-After) rather than piling up.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from maskrcnn.errors import ImageReadError
from maskrcnn.serve.page import INDEX_HTML
from maskrcnn.serve.records import detection_records

DEFAULT_MAX_UPLOAD = 20 * 2**20
# Room for the multipart envelope (boundaries, headers) around an image at the size limit.
MULTIPART_OVERHEAD = 64 * 1024
ACCEPTED_TYPES = ("image/", "application/octet-stream")

UPLOAD_SCHEMA = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


class Gate:
    """At most `running` inferences at once and `waiting` more queued; `None` from `enter` means full."""

    def __init__(self, running: int, waiting: int):
        self.running, self.waiting = running, waiting
        self.slots = asyncio.Semaphore(running)
        self.admitted = 0

    @property
    def capacity(self) -> int:
        """Return how many requests may be admitted at once (running plus queued)."""
        return self.running + self.waiting

    def try_admit(self) -> bool:
        """Admit one request if there is room; the caller must call `leave` afterwards."""
        if self.admitted >= self.capacity:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        """Release an admitted request's place."""
        self.admitted -= 1


async def read_body(request: Request, limit: int) -> bytes:
    """Return the request body, refusing (413) once it grows past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"upload is over the limit of {limit} bytes")
    return bytes(body)


async def upload_bytes(request: Request, max_upload: int) -> tuple[bytes, str]:
    """Return the uploaded image's bytes and its declared type (multipart field `file`, or a raw body)."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, max_upload + MULTIPART_OVERHEAD)
    if content_type.startswith("multipart/form-data"):
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=8,
                                                          max_part_size=max_upload + 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "send the image as a multipart file field named 'file'")
        data = await upload.read()
        declared = upload.content_type or ""
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
               labeling: Any = None) -> FastAPI:
    """Return the FastAPI app serving `model` (a MaskRCNN or an OnnxMaskRCNN: anything with `predict`), with the
    labelling tools' routes (maskrcnn.serve.labeling; `labeling`: how it reaches Label Studio's images)."""
    from maskrcnn.api import category_ids
    from maskrcnn.structures import detections_to_cpu

    app = FastAPI(title="maskrcnn", version="0.1.0",
                  description="Mask R-CNN instance segmentation: upload an image, get boxes, classes, scores "
                              "and masks (COCO RLE), or an overlay PNG.")
    gate = Gate(max_concurrent, max_queue)
    ids = category_ids(model)
    state = {"served": 0, "started": time.time()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return INDEX_HTML

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load: requests running or queued, the limit, requests served."""
        return {"status": "ok", "admitted": gate.admitted, "capacity": gate.capacity,
                "max_concurrent": gate.running, "served": state["served"],
                "uptime_s": round(time.time() - state["started"], 1)}

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        """The model's classes (label, COCO category id, name), backend, weights and full config."""
        names = list(model.class_names) or [f"class {i}" for i in range(1, model.cfg.model.num_classes + 1)]
        return {"backend": backend, "weights": weights, "score_threshold": score_threshold,
                "max_upload_bytes": max_upload,
                "classes": [{"label": i, "category_id": c, "name": n} for i, (c, n) in enumerate(zip(ids, names), 1)],
                "config": model.cfg.to_dict()}

    @app.post("/predict", openapi_extra={"requestBody": UPLOAD_SCHEMA},
              responses={200: {"content": {"image/png": {}}, "description": "detections (JSON) or overlay (PNG)"},
                         400: {"description": "not a readable image"}, 413: {"description": "upload too large"},
                         415: {"description": "not an image type"}, 503: {"description": "queue full"}})
    async def predict(
        request: Request,
        overlay: bool = Query(False, description="return the image with masks drawn (PNG) instead of JSON"),
        score_threshold: float | None = Query(None, ge=0.0, le=1.0,
                                              description="keep detections scoring at least this (default: the server's)"),
    ) -> Response:
        """Detect objects in one uploaded image (multipart field `file`, or the raw image as the body)."""
        if not gate.try_admit():
            return JSONResponse({"detail": f"busy: {gate.capacity} requests already running or queued; retry later"},
                                status_code=503, headers={"Retry-After": "1"})
        try:
            data, _ = await upload_bytes(request, max_upload)
            image = await run_in_threadpool(decode_image, data, model.cfg.input.max_pixels)
            threshold = score_threshold_or(score_threshold)
            async with gate.slots:
                start = time.perf_counter()
                output = await run_in_threadpool(lambda: model.predict(image, score_threshold=threshold)[0])
                elapsed = time.perf_counter() - start
            state["served"] += 1
        finally:
            gate.leave()
        output = detections_to_cpu(output)
        if overlay:
            from maskrcnn.visualize import draw_instances

            picture = draw_instances(image, output, list(model.class_names), threshold)
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            return Response(buffer.getvalue(), media_type="image/png")
        return JSONResponse(detections_json(output, image.shape[:2], ids, elapsed))

    def score_threshold_or(value: float | None) -> float:
        return score_threshold if value is None else value

    async def infer(image: np.ndarray, threshold: float) -> dict[str, Any]:
        """Run one image through the model (for the labelling tools' routes), sharing /predict's slots."""
        async with gate.slots:
            return await run_in_threadpool(lambda: detections_to_cpu(model.predict(image, score_threshold=threshold)[0]))

    from maskrcnn.serve.labeling import labeling_router

    app.include_router(labeling_router(model, infer, read_body, decode_image, score_threshold=score_threshold,
                                       max_upload=max_upload, weights=weights, access=labeling))
    return app


def detections_json(output: dict[str, Any], size: tuple[int, int], ids: list[int], seconds: float) -> dict[str, Any]:
    """Return the /predict JSON: image size, inference time, and one record per detection."""
    return {"width": int(size[1]), "height": int(size[0]), "inference_ms": round(seconds * 1000, 1),
            "box_format": "xyxy pixels", "mask_format": "COCO RLE", "detections": detection_records(output, ids)}
