"""Pre-annotation for labelling tools, served by `maskrcnn serve` beside its own API.

- **Label Studio** (ML backend protocol) under `/label-studio`: `GET /health`, `POST /setup`,
  `POST /predict`, `POST /webhook` (accepted and ignored), `GET /versions`. A project connects to
  `http://HOST:PORT/label-studio`. Regions are `polygonlabels` (percent of the image) or `brushlabels`
  (Label Studio's brush RLE), whichever control tag the project's labelling config has; the config's
  labels are matched to the model's classes by name.
- **CVAT** (what CVAT's lambda manager sends a nuclio detector function) at `POST /cvat/detect`:
  `{"image": base64, "threshold": t}` → `[{"label", "confidence", "type", "points", "mask"}]`.
  `GET /cvat/function.yaml` writes the nuclio function for the served model (deploy/cvat/ holds its
  handler); `maskrcnn.serve.cvat_function` runs a model inside `cvat-cli task auto-annotate` instead.

The conversions (mask → polygon, brush RLE, CVAT's mask layout) are plain functions, tested against the
tools' own decoders.
"""

import base64
import binascii
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Sequence

import numpy as np

# infer(request, image HxWx3 uint8, score threshold) -> one image's detections on the CPU scoring at least the
# threshold (the model's predict output), run by the server's scheduler as /predict's images are.
Infer = Callable[[Any, np.ndarray, float], Awaitable[dict[str, Any]]]
# read_body(request, limit) -> the body's bytes (413 past the limit); decode(bytes, max pixels) -> HxWx3 uint8 RGB.
ReadBody = Callable[[Any, int], Awaitable[bytes]]
Decode = Callable[[bytes, int], np.ndarray]

CONTROL_TAGS = {"PolygonLabels": "polygonlabels", "BrushLabels": "brushlabels"}
RLE_SIZES = (3, 4, 8, 16)  # bits for a run's length in each of the brush RLE's four size classes
FETCH_TIMEOUT_S = 30.0
_ACCESS_TOKENS: dict[str, tuple[str, float]] = {}  # Label Studio personal access token -> (access token, when)


class LabelingError(ValueError):
    """Bad input from a labelling tool (config, task, image reference): answered 400 with this message."""


# ---- masks in the tools' formats ------------------------------------------------------------------


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Return the mask's pixel bounds (left, top, right, bottom), inclusive, or None if it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def polygon(mask: np.ndarray) -> np.ndarray | None:
    """Return one polygon [P, 2] (x, y pixel-edge coordinates) enclosing exactly the mask's pixels, or None."""
    from maskrcnn.data.convert.geometry import mask_polygon

    return mask_polygon(np.asarray(mask, dtype=bool))


def cvat_mask(mask: np.ndarray) -> list[int]:
    """Return a mask as a CVAT detector function returns it: the pixels (0/1) of its bounding box row by row,
    then the box [left, top, right, bottom] with inclusive corners (CVAT run-length encodes it itself)."""
    bounds = mask_bounds(mask)
    if bounds is None:
        raise ValueError("an empty mask has no CVAT encoding")
    left, top, right, bottom = bounds
    return [*mask[top : bottom + 1, left : right + 1].astype(np.uint8).ravel().tolist(), *bounds]


def brush_rle(mask: np.ndarray) -> list[int]:
    """Return Label Studio's brush RLE of an HxW mask: its RGBA pixels (255 where set) as the bytes of the
    rle-pack bit stream that the Label Studio editor decodes (32-bit value count, word size, four run-size
    classes, then runs; every run here is a repeat run)."""
    pixels = np.asarray(mask, dtype=bool).ravel()
    starts = np.concatenate([[0], np.flatnonzero(pixels[1:] != pixels[:-1]) + 1]) if pixels.size else np.zeros(0, int)
    lengths = np.diff(np.append(starts, pixels.size)) * 4  # four channels per pixel
    fields = [(pixels.size * 4, 32), (8 - 1, 5), *((size - 1, 4) for size in RLE_SIZES)]
    for length, value in zip(lengths.tolist(), np.where(pixels[starts], 255, 0).tolist()):
        while length > 0:
            run = min(length, 1 << RLE_SIZES[-1])
            size_class = next(i for i, size in enumerate(RLE_SIZES) if run - 1 < 1 << size)
            fields += [(1, 1), (size_class, 2), (run - 1, RLE_SIZES[size_class]), (value, 8)]
            length -= run
    bits = "".join(format(value, f"0{width}b") for value, width in fields)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


# ---- the model's detections -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One detection: class name, score and its image-sized boolean mask."""

    name: str
    score: float
    mask: np.ndarray


def class_names(model: Any) -> list[str]:
    """Return the model's class names, label 1 first ("class i" where none were recorded)."""
    return list(model.class_names) or [f"class {i}" for i in range(1, model.cfg.model.num_classes + 1)]


def instances(output: dict[str, Any], names: Sequence[str]) -> Iterator[Instance]:
    """Yield the detections of one image's output (dense or RLE masks) that have a non-empty mask."""
    if output.get("masks") is None:
        raise LabelingError("the model predicts no masks (model.mask_head.enabled=false); pre-annotation needs them")
    for i in range(len(output["boxes"])):
        label = int(output["labels"][i])
        mask = np.asarray(output["masks"][i], dtype=bool)
        if mask.any():
            name = names[label - 1] if 1 <= label <= len(names) else f"class {label}"
            yield Instance(name, float(output["scores"][i]), mask)


# ---- CVAT -----------------------------------------------------------------------------------------


def cvat_detections(found: Sequence[Instance], shape: str = "mask") -> list[dict[str, Any]]:
    """Return CVAT detector-function results: masks (with their outline as `points`, which CVAT uses when
    asked to convert masks to polygons) or polygons."""
    results = []
    for instance in found:
        outline = polygon(instance.mask)
        entry = {"label": instance.name, "confidence": round(instance.score, 5), "type": shape,
                 "points": [round(float(v), 2) for v in outline.ravel()]}
        if shape == "mask":
            entry["mask"] = cvat_mask(instance.mask)
        results.append(entry)
    return results


def cvat_labels(names: Sequence[str]) -> list[dict[str, Any]]:
    """Return the labels a CVAT function declares (its `spec` annotation): one mask label per class."""
    return [{"id": i, "name": name, "type": "mask"} for i, name in enumerate(names, 1)]


def nuclio_function(names: Sequence[str], server_url: str) -> dict[str, Any]:
    """Return the nuclio function.yaml (as a dict) of a CVAT detector that forwards to `server_url`."""
    return {
        "metadata": {
            "name": "maskrcnn",
            "namespace": "cvat",
            "annotations": {"name": "Mask R-CNN (maskrcnn serve)", "type": "detector",
                            "spec": json.dumps(cvat_labels(names))},
        },
        "spec": {
            "description": "Forwards CVAT's detector requests to `maskrcnn serve` (POST /cvat/detect)",
            "runtime": "python:3.11",
            "handler": "main:handler",
            "eventTimeout": "120s",
            "env": [{"name": "MASKRCNN_URL", "value": server_url}],
            "build": {"image": "cvat.maskrcnn", "baseImage": "python:3.11-slim"},
            "triggers": {"myHttpTrigger": {"kind": "http", "maxWorkers": 2,
                                           "workerAvailabilityTimeoutMilliseconds": 10000,
                                           "attributes": {"maxRequestBodySize": 33554432}}},
            "platform": {"attributes": {"restartPolicy": {"name": "always", "maximumRetryCount": 3},
                                        "mountMode": "volume"}},
        },
    }


def decode_cvat_body(body: Any) -> tuple[bytes, float | None]:
    """Return the image bytes and threshold of a CVAT detector request ({"image": base64, "threshold": t})."""
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise LabelingError('send JSON {"image": "<base64 image>", "threshold": 0.5}')
    try:
        data = base64.b64decode(body["image"], validate=True)
    except (binascii.Error, ValueError):
        raise LabelingError("'image' is not valid base64") from None
    threshold = body.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise LabelingError(f"'threshold' must be a number from 0 to 1, not {threshold!r}")
    return data, None if threshold is None else float(threshold)


# ---- Label Studio: the labelling config -----------------------------------------------------------


@dataclass(frozen=True)
class LabelingTarget:
    """Where and how predictions go in a Label Studio project."""

    kind: str  # "polygonlabels" or "brushlabels"
    from_name: str  # the control tag's name
    to_name: str  # the <Image> tag's name
    data_key: str  # the task data field holding the image
    labels: dict[str, str]  # model class name -> the project's label


def parse_label_config(config: str, names: Sequence[str]) -> LabelingTarget:
    """Return the first <PolygonLabels> or <BrushLabels> of a labelling config, its image, and its labels
    matched to the model's classes by name (case-insensitive; a label's `predicted_values` may list more)."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError as e:
        raise LabelingError(f"the labelling config is not valid XML: {e}") from None
    control = next((el for el in root.iter() if el.tag in CONTROL_TAGS), None)
    if control is None:
        raise LabelingError("the labelling config has no <PolygonLabels> or <BrushLabels> tag to pre-annotate")
    to_name = control.get("toName", "")
    image = next((el for el in root.iter("Image") if el.get("name") == to_name), None)
    if image is None or not image.get("value", "").startswith("$"):
        raise LabelingError(f"<{control.tag} name=\"{control.get('name')}\"> has toName=\"{to_name}\", "
                            "which names no <Image value=\"$field\"> tag")
    by_name = {name.lower(): name for name in names}
    labels: dict[str, str] = {}
    offered = []
    for label in control.iter("Label"):
        value = label.get("value", "")
        offered.append(value)
        for alias in [value, *label.get("predicted_values", "").split(",")]:
            model_name = by_name.get(alias.strip().lower())
            if model_name is not None:
                labels.setdefault(model_name, value)
    if not labels:
        raise LabelingError(f"none of the project's labels ({', '.join(offered) or 'none'}) is a class of the model "
                            f"({', '.join(names)}); name them alike or list classes in a label's predicted_values")
    return LabelingTarget(CONTROL_TAGS[control.tag], control.get("name", ""), to_name, image.get("value")[1:], labels)


def label_studio_regions(found: Sequence[Instance], target: LabelingTarget, size: tuple[int, int]) -> list[dict]:
    """Return Label Studio result regions for the detections whose class the project labels."""
    height, width = size
    regions = []
    for n, instance in enumerate(found):
        label = target.labels.get(instance.name)
        if label is None:
            continue
        if target.kind == "polygonlabels":
            points = polygon(instance.mask) / [width, height] * 100
            value = {"points": np.round(points, 4).tolist(), "closed": True, "polygonlabels": [label]}
        else:
            value = {"format": "rle", "rle": brush_rle(instance.mask), "brushlabels": [label]}
        regions.append({"id": f"maskrcnn-{n}", "from_name": target.from_name, "to_name": target.to_name,
                        "type": target.kind, "original_width": width, "original_height": height,
                        "image_rotation": 0, "value": value, "score": round(instance.score, 5)})
    return regions


# ---- Label Studio: task images --------------------------------------------------------------------


@dataclass
class LabelStudioAccess:
    """How task images are reached: Label Studio's address and token (for /data/... URLs), local files."""

    url: str | None = None
    token: str | None = None
    local_root: Path | None = None
    from_setup: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # project -> (url, token)

    def for_project(self, project: str | None) -> tuple[str | None, str | None]:
        """Return (Label Studio URL, token): the server's options first, then what /setup told."""
        setup_url, setup_token = self.from_setup.get(str(project).split(".")[0], (None, None))
        return self.url or setup_url, self.token or setup_token


def _local_file(path: str, root: Path | None) -> Path:
    """Return `path` resolved inside `root`; refuse it when there is no root or it lies outside."""
    if root is None:
        raise LabelingError(f"'{path}' is a local path; start `maskrcnn serve` with --local-files-root DIR to read one")
    resolved = (root / path.lstrip("/")).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise LabelingError(f"'{path}' is outside --local-files-root {root}")
    if not resolved.is_file():
        raise LabelingError(f"'{path}' is no file under --local-files-root {root}")
    return resolved


def _label_studio_auth(ls_url: str | None, token: str) -> dict[str, str]:
    """Return the Authorization header for Label Studio: a legacy token as is; a personal access token (a JWT)
    exchanged for a short-lived access token at /api/token/refresh (kept for a minute)."""
    if token.count(".") != 2:
        return {"Authorization": f"Token {token}"}
    cached = _ACCESS_TOKENS.get(token)
    if cached is None or time.monotonic() - cached[1] > 60:
        if not ls_url:
            raise LabelingError("a personal access token needs Label Studio's address: pass --label-studio-url")
        url = urllib.parse.urljoin(ls_url.rstrip("/") + "/", "api/token/refresh")
        request = urllib.request.Request(url, data=json.dumps({"refresh": token}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as reply:
                cached = json.load(reply)["access"], time.monotonic()
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            raise LabelingError(f"Label Studio refused the personal access token at {url}: {e}") from None
        _ACCESS_TOKENS[token] = cached
    return {"Authorization": f"Bearer {cached[0]}"}


def _download(url: str, auth: dict[str, str], max_bytes: int) -> bytes:
    """Return the body of GET `url` (with the `auth` headers), at most `max_bytes` long."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=FETCH_TIMEOUT_S) as reply:
            data = reply.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        hint = " (check --label-studio-token)" if e.code in (401, 403) else ""
        raise LabelingError(f"cannot fetch '{url}': HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise LabelingError(f"cannot fetch '{url}': {getattr(e, 'reason', e)}") from None
    if len(data) > max_bytes:
        raise LabelingError(f"'{url}' is over the upload limit of {max_bytes} bytes")
    return data


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def fetch_task_image(ref: str, access: LabelStudioAccess, project: str | None, max_bytes: int) -> bytes:
    """Return the bytes of a task's image: an http(s) URL, a Label Studio path (/data/upload/...,
    /data/local-files/?d=...), or a local path under --local-files-root."""
    ls_url, token = access.for_project(project)
    if ref.startswith(("http://", "https://")):
        to_label_studio = token and ls_url and _same_origin(ref, ls_url)
        return _download(ref, _label_studio_auth(ls_url, token) if to_label_studio else {}, max_bytes)
    if ref.startswith("/data/local-files/") and access.local_root is not None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(ref).query)
        return _local_file(query.get("d", [""])[0], access.local_root).read_bytes()
    if ref.startswith("/data/"):
        if not ls_url:
            raise LabelingError(f"'{ref}' is a Label Studio path, and Label Studio's address is unknown; "
                                "connect the backend from Label Studio or pass --label-studio-url")
        auth = _label_studio_auth(ls_url, token) if token else {}
        return _download(urllib.parse.urljoin(ls_url.rstrip("/") + "/", ref.lstrip("/")), auth, max_bytes)
    if ref.startswith("file://"):
        ref = urllib.parse.unquote(urllib.parse.urlsplit(ref).path)
    if ref.startswith("/"):
        return _local_file(ref, access.local_root).read_bytes()
    raise LabelingError(f"cannot read image '{ref[:200]}': use an http(s) URL, a Label Studio /data/ path "
                        "or a local path (cloud storage URIs are not supported)")


def model_version(weights: str | None, model: Any) -> str:
    """Return a version naming the weights file and its content (a hash), so a retrained model is new."""
    if weights and os.path.isfile(weights):
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return f"maskrcnn-{Path(weights).stem}-{digest.hexdigest()[:12]}"
    return f"maskrcnn-{Path(weights).name if weights else 'untrained'}-{len(class_names(model))}classes"


# ---- the routes -----------------------------------------------------------------------------------


def labeling_router(model: Any, infer: Infer, read_body: ReadBody, decode: Decode, *, score_threshold: float,
                    max_upload: int, weights: str | None, access: LabelStudioAccess | None = None):
    """Return a FastAPI APIRouter with the Label Studio routes (/label-studio/...) and CVAT's (/cvat/...), which
    read bodies, decode images and run the model with the server's own `read_body`, `decode` and `infer`."""
    import yaml
    from fastapi import APIRouter, HTTPException, Query, Request
    from fastapi.responses import PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()
    names = class_names(model)
    version = model_version(weights, model)
    access = access or LabelStudioAccess()
    max_pixels = model.cfg.input.max_pixels

    async def json_body(request: Request, limit: int) -> dict[str, Any]:
        try:
            body = json.loads(await read_body(request, limit))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise HTTPException(400, "the request body is not a JSON object")
        return body

    async def detect(request: Request, data: bytes, threshold: float) -> tuple[tuple[int, int], list[Instance]]:
        image = await run_in_threadpool(decode, data, max_pixels)
        output = await infer(request, image, threshold)
        return image.shape[:2], await run_in_threadpool(lambda: list(instances(output, names)))

    @router.get("/label-studio/health", tags=["Label Studio"])
    async def label_studio_health() -> dict[str, Any]:
        """Label Studio's check that the ML backend is up."""
        return {"status": "UP", "model_class": "maskrcnn", "model_version": version}

    @router.post("/label-studio/setup", tags=["Label Studio"])
    async def label_studio_setup(request: Request) -> dict[str, Any]:
        """Called when a project connects: checks its labelling config, keeps Label Studio's address and token."""
        body = await json_body(request, max_upload)
        try:
            parse_label_config(str(body.get("schema", "")), names)
        except LabelingError as e:
            raise HTTPException(400, str(e)) from None
        project = str(body.get("project", "")).split(".")[0]
        access.from_setup[project] = (body.get("hostname"), body.get("access_token"))
        return {"model_version": version}

    @router.post("/label-studio/predict", tags=["Label Studio"])
    async def label_studio_predict(request: Request) -> dict[str, Any]:
        """Pre-annotate Label Studio tasks: one prediction (regions, score, model_version) per task."""
        body = await json_body(request, max_upload)
        tasks, project = body.get("tasks"), body.get("project")
        if not isinstance(tasks, list):
            raise HTTPException(400, "send {\"tasks\": [...], \"label_config\": ...} as Label Studio does")
        try:
            target = parse_label_config(str(body.get("label_config", "")), names)
            results = []
            for task in tasks:
                task_id = task.get("id") if isinstance(task, dict) else None
                ref = (task.get("data") or {}).get(target.data_key) if isinstance(task, dict) else None
                if not isinstance(ref, str):
                    raise LabelingError(f"task {task_id}: no '{target.data_key}' image in its data")
                try:
                    data = await run_in_threadpool(fetch_task_image, ref, access, project, max_upload)
                    size, found = await detect(request, data, score_threshold)
                except (LabelingError, HTTPException) as e:  # name the task in the one-line answer
                    raise HTTPException(getattr(e, "status_code", 400), f"task {task_id}: {getattr(e, 'detail', e)}") \
                        from None
                regions = await run_in_threadpool(label_studio_regions, found, target, size)
                score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
                results.append({"result": regions, "score": round(score, 5), "model_version": version})
        except LabelingError as e:
            raise HTTPException(400, str(e)) from None
        return {"results": results, "model_version": version}

    @router.post("/label-studio/webhook", tags=["Label Studio"])
    async def label_studio_webhook() -> dict[str, str]:
        """Label Studio's events (annotation created, start training...): accepted; this backend does not train."""
        return {"status": "ok"}

    @router.get("/label-studio/versions", tags=["Label Studio"])
    async def label_studio_versions() -> dict[str, Any]:
        """The model versions this backend offers (one)."""
        return {"versions": [version], "model_version": version}

    @router.post("/cvat/detect", tags=["CVAT"])
    async def cvat_detect(request: Request, shape: str = Query("mask", pattern="^(mask|polygon)$",
                                                                 description="return masks or polygons")) -> list:
        """CVAT's detector-function call: {"image": base64, "threshold": t} → labelled masks or polygons."""
        body = await json_body(request, max_upload * 4 // 3 + 4096)  # base64 is 4/3 the image
        try:
            data, threshold = decode_cvat_body(body)
            _, found = await detect(request, data, score_threshold if threshold is None else threshold)
        except LabelingError as e:
            raise HTTPException(400, str(e)) from None
        return await run_in_threadpool(cvat_detections, found, shape)

    @router.get("/cvat/function.yaml", tags=["CVAT"], response_class=PlainTextResponse)
    async def cvat_function_yaml(request: Request) -> str:
        """The nuclio function.yaml of a CVAT detector forwarding to this server (deploy/cvat/main.py: its handler)."""
        return yaml.safe_dump(nuclio_function(names, str(request.base_url).rstrip("/")), sort_keys=False)

    return router


def access_from_args(args: Any) -> LabelStudioAccess:
    """Return the LabelStudioAccess of `maskrcnn serve`'s options; a missing --local-files-root is an error."""
    from maskrcnn.errors import UserError

    root = Path(args.local_files_root) if args.local_files_root else None
    if root is not None and not root.is_dir():
        raise UserError(f"--local-files-root {root} is not a folder")
    return LabelStudioAccess(url=args.label_studio_url, token=args.label_studio_token, local_root=root)
