"""Helpers shared by several test modules (fixtures built on them live in conftest.py).

Test modules import from here, never from each other: tiny configs, a stand-in model for the trainer,
the torchvision parity set-up, a server in a thread, and a few file and image helpers.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import io
import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml
from pycocotools import mask as mask_utils
from torch import nn

from maskrcnn.config import load_config
from maskrcnn.engine.torchvision_reference import (  # noqa: F401  (the parity set-up, shared with benchmarks/)
    FAST_PATH, FAST_PATH_MATCHED, PARITY_MAX_SIZE, PARITY_MIN_SIZE, decisive_torchvision_model, ours_with_weights,
    parity_size_overrides)
from maskrcnn.modeling import build_model

# ---- tiny models and runs -------------------------------------------------------------------------

# Thin heads on a preset (e.g. shapes): cheap to build and run on the CPU.
THIN_HEADS = ["model.backbone.fpn_channels=32", "model.box_head.fc_dim=64", "model.mask_head.conv_dim=16"]
# ...with few proposals and detections, every detection kept whatever its score.
TINY = [*THIN_HEADS, "model.rpn.post_nms_top_n_test=50", "model.box_head.detections_per_image=10",
        "model.box_head.score_thresh=0.0"]

# A tiny R18-FPN trained on 64-96 px images; `tiny_train_config` writes it with a test's own solver.
TINY_TRAIN = {
    "model": {
        "backbone": {"depth": 18, "norm": "gn", "fpn_channels": 32, "trainable_stages": 5},
        "anchors": {"sizes": [[8], [16], [32], [64], [128]]},
        "rpn": {"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50, "pre_nms_top_n_test": 50,
                "post_nms_top_n_test": 25, "batch_size_per_image": 32},
        "box_head": {"fc_dim": 64, "batch_size_per_image": 16, "detections_per_image": 10},
        "mask_head": {"conv_dim": 16, "num_convs": 1},
    },
    "input": {"min_size_train": [64], "max_size_train": 96, "min_size_test": 64, "max_size_test": 96},
    "device": "cpu",
}


def merged(base: dict, extra: dict) -> dict:
    """Return `base` with `extra` merged in, nested dicts key by key (neither argument is changed)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_train_config(path: Path, train: tuple[Path, Path], solver: dict, **sections: dict) -> Path:
    """Write TINY_TRAIN on `train` (annotations, images) with `solver` and `sections` merged over it; return `path`."""
    ann, images = train
    config = merged(merged(TINY_TRAIN, {"data": {"train": [f"{ann}:{images}"]}, "solver": solver}), sections)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def quick_run_config(shapes, output_dir, extra: list[str] = ()):
    """A 6-iteration CPU run on `shapes` that checkpoints and logs every 2 iterations."""
    ann, images = shapes["train"]
    return load_config(None, [
        f"data.train=['{ann}:{images}']", f"output_dir={output_dir}", "device=cpu",
        "solver.ims_per_batch=2", "solver.max_iter=6", "solver.checkpoint_period=2",
        "solver.warmup_iters=2", "solver.base_lr=0.01", "solver.log_period=2", *extra,
    ])


class StandInModel(nn.Module):
    """Mask R-CNN's loss dict from two parameters, for fast trainer tests (the `stand_in_model` fixture).

    `StandInModel.hook(call)`, when a test sets it, runs at each forward call (1, 2, ...) and returns None,
    a number that scales every loss (nan, a slow step...), or trouble to inject: "nan-loss" (a NaN head
    loss), "nan-grad" (a finite loss whose gradient is not) or "nan-buffer" (NaN in a BatchNorm-like buffer).
    """

    hook: Callable[[int], Any] | None = None

    def __init__(self):
        super().__init__()
        self.trunk = nn.Parameter(torch.ones(2))
        self.head = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(3))  # as BatchNorm's, updated by the forward pass
        self.calls = 0

    def forward(self, images, targets=None):
        self.calls += 1
        trouble = StandInModel.hook(self.calls) if StandInModel.hook else None
        scale = trouble if isinstance(trouble, (int, float)) else 1.0
        trunk = (self.trunk**2).sum() * scale
        head = (self.head**2).sum() * scale * (float("nan") if trouble in ("nan-loss", "nan-buffer") else 1.0)
        if trouble == "nan-buffer":
            self.running_mean.fill_(float("nan"))
        if trouble == "nan-grad":
            head.register_hook(lambda g: g * float("nan"))
        return {"loss_classifier": head, "loss_box_reg": trunk * 0.5, "loss_mask": trunk * 0.1,
                "loss_objectness": trunk * 0.2, "loss_rpn_box_reg": trunk * 0.3}


def plain_layout_copy(model):
    """The same model and weights without the CPU fast path (NCHW, BN after conv): torchvision's sums."""
    cfg = model.cfg.clone()
    cfg.model.channels_last = False
    cfg.model.backbone.fold_frozen_bn = False
    plain = build_model(cfg).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def decisive(model):
    """Return the model with mask logits far from 0 (random heads give p ≈ 0.5: pixel coin flips)."""
    torch.manual_seed(1)
    predictors = model.roi_heads.box_predictor  # a cascade has one per stage
    with torch.no_grad():
        for predictor in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
            predictor.class_logits.bias.copy_(torch.tensor([-3.0, 3.0, 0.0, 0.0]))
        model.roi_heads.mask_head.predictor.weight.normal_(std=0.05)
        model.roi_heads.mask_head.predictor.bias.fill_(0.3)
    return model.eval()


def run_cli(*args: str) -> "subprocess.CompletedProcess[str]":
    """Run `maskrcnn ARGS...` in a fresh Python process; return it finished (stdout, stderr as text).

    The int8 calibrations and the exported-model benchmark run this way, as a user runs them. That began as
    a precaution while chasing a SIGSEGV that killed the test process at a later, unrelated test (2026-12-03);
    it did not stop it. The cause, found later: OpenVINO Cores destroyed first-in first-out left the main
    thread's alternate signal stack unmapped (tests/test_signal_stack.py); one process-wide Core fixed it.
    """
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "maskrcnn.cli", *args], capture_output=True, text=True, timeout=600)


def benchmark_script(name: str) -> ModuleType:
    """Import benchmarks/NAME.py as the module `name` (the scripts are files, not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


class SigaltstackT(ctypes.Structure):
    """C's stack_t, as sigaltstack(2) reads and writes it."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


SS_DISABLE = 2  # stack_t.ss_flags: no alternate stack


def alternate_stack() -> dict:
    """Return this thread's alternate signal stack: its address, whether it is enabled, and whether all of it is
    mapped (mincore(2) fails with ENOMEM on a range with an unmapped page)."""
    libc = ctypes.CDLL(None, use_errno=True)
    stack = SigaltstackT()
    if libc.sigaltstack(None, ctypes.byref(stack)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack failed")
    address, size = stack.ss_sp or 0, stack.ss_size
    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    pages = (address + max(size, 1) - start + page - 1) // page
    mapped = libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), (ctypes.c_ubyte * pages)()) == 0
    if not mapped and ctypes.get_errno() != errno.ENOMEM:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return {"address": address, "enabled": not stack.ss_flags & SS_DISABLE, "mapped": mapped}


def saved_checkpoint(model, path: Path) -> Path:
    """Write `model` as one of our checkpoints (weights and config) at `path`; return the path."""
    from maskrcnn.checkpoint import save_checkpoint

    save_checkpoint(path, {"model": model.state_dict(), "config": model.cfg.to_dict(), "iteration": 0})
    return path


def tiny_model(extra: list[str] = ()):
    """The seeded, decisive `shapes` model with TINY's thin heads (the export tests' model)."""
    torch.manual_seed(0)
    return decisive(build_model(load_config("shapes", TINY + list(extra))))


# ---- parity with torchvision ----------------------------------------------------------------------

def ours_from_torchvision(reference: nn.Module, preset: str, folder: Path):
    """Return our model of `preset` loaded from `reference`'s weights saved as a file (every key used)."""
    path = folder / "torchvision.pth"
    torch.save(reference.state_dict(), path)
    return ours_with_weights(preset, torch.load(path, weights_only=True), parity_size_overrides())


def detect_both(reference: nn.Module, ours: nn.Module, images: list[torch.Tensor]) -> tuple[list[dict], list[dict]]:
    """Return both models' detections of `images` (no gradients)."""
    with torch.no_grad():
        return reference(images), ours(images)


def detect_on_random_image(reference: nn.Module, ours: nn.Module, size: tuple[int, int]) -> tuple[dict, dict]:
    """Return both models' detections of one random image of `size` (seeded by the size)."""
    torch.manual_seed(sum(size))
    expected, actual = detect_both(reference, ours, [torch.rand(3, *size)])
    return expected[0], actual[0]


# ---- Detectron2 names -----------------------------------------------------------------------------


def our_name_to_detectron2(name: str, c4: bool) -> str:
    """The inverse mapping, written independently: how Detectron2 names each of our parameters."""
    trunk = "backbone." if c4 else "backbone.bottom_up."
    stages = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}
    rules = [
        (r"^backbone\.trunk\.(layer\d)\.(\d+)\.conv2\.offset\.", lambda m: f"{trunk}{stages[m[1]]}.{m[2]}.conv2_offset."),
        (r"^backbone\.trunk\.conv1\.", f"{trunk}stem.conv1."),
        (r"^backbone\.trunk\.bn1\.", f"{trunk}stem.conv1.norm."),
        (r"^backbone\.trunk\.(layer\d)\.(\d+)\.conv(\d)\.", lambda m: f"{trunk}{stages[m[1]]}.{m[2]}.conv{m[3]}."),
        (r"^backbone\.trunk\.(layer\d)\.(\d+)\.bn(\d)\.", lambda m: f"{trunk}{stages[m[1]]}.{m[2]}.conv{m[3]}.norm."),
        (r"^backbone\.trunk\.(layer\d)\.(\d+)\.downsample\.0\.", lambda m: f"{trunk}{stages[m[1]]}.{m[2]}.shortcut."),
        (r"^backbone\.trunk\.(layer\d)\.(\d+)\.downsample\.1\.", lambda m: f"{trunk}{stages[m[1]]}.{m[2]}.shortcut.norm."),
        (r"^backbone\.fpn\.(lateral|output)\.(\d)\.conv\.", lambda m: f"backbone.fpn_{m[1]}{int(m[2]) + 2}."),
        (r"^rpn\.head\.convs\.0\.conv\.", "proposal_generator.rpn_head.conv."),
        (r"^rpn\.head\.objectness\.", "proposal_generator.rpn_head.objectness_logits."),
        (r"^rpn\.head\.box_deltas\.", "proposal_generator.rpn_head.anchor_deltas."),
        (r"^roi_heads\.box_head\.(\d\.)?fcs\.(\d)\.", lambda m: f"roi_heads.box_head.{m[1] or ''}fc{int(m[2]) + 1}."),
        (r"^roi_heads\.box_predictor\.(\d\.)?class_logits\.", r"roi_heads.box_predictor.\1cls_score."),
        (r"^roi_heads\.box_predictor\.(\d\.)?box_deltas\.", r"roi_heads.box_predictor.\1bbox_pred."),
        (r"^roi_heads\.mask_head\.convs\.(\d)\.conv\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}."),
        (r"^roi_heads\.mask_head\.", "roi_heads.mask_head."),
        (r"^roi_heads\.keypoint_head\.convs\.(\d)\.conv\.", lambda m: f"roi_heads.keypoint_head.conv_fcn{int(m[1]) + 1}."),
        (r"^roi_heads\.keypoint_head\.deconv\.", "roi_heads.keypoint_head.score_lowres."),
    ]
    for pattern, replacement in rules:
        if re.search(pattern, name):
            out = re.sub(pattern, replacement, name, count=1)
            return out.replace("backbone.res5.", "roi_heads.res5.") if c4 else out
    raise AssertionError(f"no Detectron2 name for {name}")


# ---- a server, images and plots -------------------------------------------------------------------


class Running:
    """A uvicorn server in a thread on a free port; `url` is its base address."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class GatedModel:
    """The tiny model, but while the test holds the gate (`hold()`) each predict call waits for `release()`;
    `batches` records how many images each call got."""

    def __init__(self, model):
        self.model, self.gate, self.batches = model, threading.Event(), []
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hold(self):
        self.gate.clear()

    def release(self):
        self.gate.set()

    def predict(self, images, *args, **kwargs):
        self.batches.append(len(images) if isinstance(images, list) else 1)
        assert self.gate.wait(timeout=30)
        return self.model.predict(images, *args, **kwargs)


@contextmanager
def gated_server(model, **app_options: Any) -> Iterator[tuple[GatedModel, Running]]:
    """Serve `model` behind a gate (`GatedModel`) with `create_app(**app_options)`, warmed up and with the
    warm-up's batch forgotten; on leaving, the gate is opened and the server stopped, whatever the test did."""
    from maskrcnn.serve import create_app

    gated = GatedModel(model)
    running = Running(create_app(gated, **app_options))
    try:
        ready(running.url)
        gated.batches.clear()
        yield gated, running
    finally:
        gated.release()
        running.stop()


def wait_for(condition, what: str, seconds: float = 20):
    """Poll `condition()` until it is true; fail naming `what` after `seconds`."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def ready(url: str) -> None:
    """Wait until the server at `url` has warmed up (/health/ready answers 200)."""
    import httpx

    wait_for(lambda: httpx.get(f"{url}/health/ready").status_code == 200, "/health/ready")


def metric(url: str, line_start: str) -> float:
    """Return the value of the /metrics sample whose line starts with `line_start`, 0 when there is none."""
    import httpx

    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def masks_to_test() -> list[np.ndarray]:
    """Masks for the labelling tools' encodings: noise, a ring, a full one (a run past the brush RLE's 65536-value
    class), an empty one, a diagonal."""
    rng = np.random.default_rng(0)
    ring = np.zeros((40, 50), bool)
    ring[5:30, 8:40] = True
    ring[12:20, 15:30] = False
    return [rng.random((23, 31)) > 0.5, ring, np.ones((300, 250), bool), np.zeros((7, 9), bool),
            np.eye(12, 17, dtype=bool)]


def png_bytes(size=(96, 128), seed=0) -> bytes:
    """Return a PNG file's bytes: random RGB noise of `size` (H, W)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_in(png: Path, colour: str, rows: tuple[float, float] = (0.0, 1.0), tolerance: int = 40) -> np.ndarray:
    """Return the [H,W] mask of a plot's pixels in a matplotlib colour ('C0' is the first line's), within a
    band of rows given as fractions of the height (0 = top); pixels outside the band are False."""
    from matplotlib.colors import to_rgb
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    target = np.round(np.array(to_rgb(colour)) * 255).astype(np.int16)
    mask = np.abs(pixels - target).max(axis=-1) <= tolerance
    height = mask.shape[0]
    mask[: int(rows[0] * height)] = False
    mask[int(rows[1] * height):] = False
    return mask


# ---- a hand-written COCO file: every segmentation form, crowd, empties, degenerates --------------

# Image 10 is 20 wide x 16 high; image 11 is portrait, 12 x 24.
RLE_MASK = np.zeros((16, 20), np.uint8)
RLE_MASK[2:6, 10:18] = 1  # rows 2..5, cols 10..17 -> bbox x=10, y=2, w=8, h=4


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros, as COCO's uncompressed RLE."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


CROWD_MASK = np.zeros((16, 20), np.uint8)
CROWD_MASK[10:16, 0:20] = 1
PORTRAIT_MASK = np.zeros((24, 12), np.uint8)
PORTRAIT_MASK[4:20, 2:8] = 1


def write_coco_dataset(root: Path, **overrides) -> tuple[Path, Path]:
    """Write four images and a COCO file exercising all supported and degenerate annotations."""
    from PIL import Image

    image_dir = root / "images"
    image_dir.mkdir(exist_ok=True)
    images = [
        {"id": 10, "file_name": "a.png", "width": 20, "height": 16},
        {"id": 11, "file_name": "b.png", "width": 12, "height": 24},
        {"id": 12, "file_name": "c.png", "width": 8, "height": 8},  # no annotations
        {"id": 13, "file_name": "d.png", "width": 8, "height": 8},  # only a crowd region
    ]
    for img in images:
        a = np.zeros((img["height"], img["width"], 3), np.uint8)
        a[:, : img["width"] // 2] = 255  # left half white, so flips are visible
        Image.fromarray(a).save(image_dir / img["file_name"])
    compressed = mask_utils.encode(np.asfortranarray(RLE_MASK))
    anns = [
        # image 10: polygon (cat 3), compressed RLE (cat 7), crowd uncompressed RLE (cat 90)
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 1, 4, 6], "iscrowd": 0,
         "segmentation": [[1, 1, 5, 1, 5, 7, 1, 7]], "area": 24},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [10, 2, 8, 4], "iscrowd": 0,
         "segmentation": {"size": [16, 20], "counts": compressed["counts"].decode("ascii")}, "area": 32},
        {"id": 3, "image_id": 10, "category_id": 90, "bbox": [0, 10, 20, 6], "iscrowd": 1,
         "segmentation": uncompressed_rle(CROWD_MASK), "area": 120},
        # image 11: uncompressed RLE without a bbox (derived from the mask), plus degenerates
        {"id": 4, "image_id": 11, "category_id": 90, "iscrowd": 0, "segmentation": uncompressed_rle(PORTRAIT_MASK)},
        {"id": 5, "image_id": 11, "category_id": 3, "bbox": [2, 2, 0, 5], "iscrowd": 0,
         "segmentation": [[2, 2, 4, 2, 4, 7]]},  # zero-area box
        {"id": 6, "image_id": 11, "category_id": 3, "bbox": [2, 2, 3, 3], "iscrowd": 0,
         "segmentation": [[2, 2, 5, 5]]},  # polygon with two points
        {"id": 7, "image_id": 11, "category_id": 7, "bbox": [50, 50, 5, 5], "iscrowd": 0,
         "segmentation": [[50, 50, 55, 50, 55, 55, 50, 55]]},  # entirely outside the image
        {"id": 8, "image_id": 11, "category_id": 7, "bbox": [1, 1, 2, 2], "iscrowd": 0,
         "segmentation": uncompressed_rle(np.zeros((24, 12), np.uint8))},  # empty mask
        # image 13: only a crowd region
        {"id": 9, "image_id": 13, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1,
         "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
    ]
    categories = [{"id": 90, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    data = {"images": images, "annotations": anns, "categories": categories}
    data.update(overrides)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir


def label_studio_token(url: str, email: str, password: str) -> str:
    """Log in to the Label Studio at `url` and create a personal access token, as its Account page does
    (tests/test_label_studio.py and docs/images/label_studio_preannotation.py)."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as session:
        session.get("/user/login/")
        session.post("/user/login/", data={"email": email, "password": password,
                                           "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                     headers={"Referer": f"{url}/user/login/"})
        reply = session.post("/api/token/", headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": url})
        reply.raise_for_status()
        return reply.json()["token"]
