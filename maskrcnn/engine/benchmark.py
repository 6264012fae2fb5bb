"""Speed and memory of a model: inference split into stages, training steps, peak memory.

Inference runs one random image of a given size through the model's own stage methods
(`preprocess`, `backbone`, `anchors`, `rpn`, `roi_heads`, `postprocess`) with a clock between them;
`timed_forward` returns the same outputs as `MaskRCNN.forward` in eval mode (tests check that).
Inside `roi_heads`, each box stage (RoI pooling, box head, predictor; three for a Cascade R-CNN) is
timed too, by hooks on those modules.
Training times a whole step (forward with random targets, backward, SGD update) on a batch.

Memory is the process's peak resident set size on the CPU (`ru_maxrss`, a high-water mark over the
process's life, so a growth of 0 means an earlier peak was higher) and
`torch.cuda.max_memory_allocated` on a GPU (the CUDA path has not been run on a GPU here).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import Tensor

from maskrcnn.engine.precision import autocast_dtype as trainer_autocast_dtype
from maskrcnn.errors import UserError
from maskrcnn.modeling import MaskRCNN

#: Inference stages, in order: the name reported and what it covers.
STAGES = {
    "preprocess_backbone": "normalise, resize, pad; backbone and FPN",
    "rpn": "anchors; RPN head, proposal decoding and NMS",
    "roi_heads": "box head (every stage of a cascade), box NMS, mask head",
    "postprocess": "box rescale to input pixels, mask pasting",
}
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class BenchmarkOptions:
    """What to measure: image size (H, W), precision, mode, run counts and the training batch."""

    size: tuple[int, int] = (800, 1333)
    precision: str = "fp32"
    mode: str = "inference"  # inference | train | both
    runs: int = 10
    warmup: int = 2
    batch: int = 2
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def parse_size(text: str) -> tuple[int, int]:
    """Return (H, W) from 'HxW' (e.g. '800x1333'); raise UserError on anything else."""
    parts = text.lower().split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--size must be HxW with two positive integers (e.g. 800x1333), got '{text}'") from None
    if h <= 0 or w <= 0:
        raise UserError(f"--size must be HxW with two positive integers (e.g. 800x1333), got '{text}'")
    return h, w


def autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """Return (autocast dtype or None for fp32, a note when the request was changed), as the trainer does."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return trainer_autocast_dtype(precision, device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_kib() -> int:
    """Return this process's peak resident set size so far, in KiB.

    On Linux this is VmHWM: `ru_maxrss` of a child started by a big parent still reports the parent's
    size at fork time (the kernel keeps the pre-exec high-water mark), which hid the child's own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)  # macOS reports bytes


def timed_forward(
    model: MaskRCNN, images: list[Tensor], clock: Callable[[], float] = time.perf_counter
) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
    """Run the eval-mode forward of `model` stage by stage; return (outputs, seconds per stage).

    Calls the model's own stage methods in the order `MaskRCNN.forward` does, so the outputs are
    the same as `model(images)`; `clock` is read between stages (sync CUDA inside it on a GPU).
    """
    if model.training:
        raise ValueError("timed_forward times inference: call model.eval() first")
    t0 = clock()
    original = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    batch, sizes, _ = model.preprocess(images, None)
    features = model.extract_features(batch)
    t1 = clock()
    anchors = model.anchors(features, (batch.shape[-2], batch.shape[-1]))
    proposals, _ = model.rpn(features, anchors, sizes, None)
    t2 = clock()
    detections = model.roi_heads(model.pooling_features(features), proposals, sizes)
    t3 = clock()
    outputs = model.postprocess(detections, sizes, original)
    t4 = clock()
    times = {"preprocess_backbone": t1 - t0, "rpn": t2 - t1, "roi_heads": t3 - t2, "postprocess": t4 - t3}
    return outputs, times


@contextmanager
def box_stage_times(model: MaskRCNN, clock: Callable[[], float]) -> Iterator[list[float]]:
    """Yield a list that receives the seconds of each box stage run meanwhile: from the box pooler's
    call to the stage's predictor output (one stage, or one per cascade stage)."""
    heads = model.roi_heads
    predictors = heads.box_predictor if isinstance(heads.box_predictor, torch.nn.ModuleList) else [heads.box_predictor]
    times: list[float] = []
    start = [0.0]

    def begin(*_: Any) -> None:
        start[0] = clock()

    def end(*_: Any) -> None:
        times.append(clock() - start[0])

    handles = [heads.box_pooler.register_forward_pre_hook(begin)]
    handles += [p.register_forward_hook(end) for p in predictors]
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


def summarize(values: list[float]) -> dict[str, float]:
    """Return the median, min and max of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _memory_start(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return peak_rss_kib() * 1024


def _memory_report(device: torch.device, before: int) -> dict[str, Any]:
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        return {"kind": "cuda_max_memory_allocated", "peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20}
    peak = peak_rss_kib() * 1024
    return {"kind": "cpu_peak_rss", "peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20}


def benchmark_inference(model: MaskRCNN, opts: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    """Time `opts.runs` single-image forwards (after `opts.warmup`); seconds per image by stage."""
    dtype, _ = autocast_dtype(opts.precision, device)
    generator = torch.Generator().manual_seed(opts.seed)
    image = torch.rand(3, *opts.size, generator=generator).to(device)
    model.eval()

    def clock() -> float:
        _sync(device)
        return time.perf_counter()

    before = _memory_start(device)
    runs: list[dict[str, float]] = []
    box_runs: list[list[float]] = []
    detections: list[int] = []
    with torch.inference_mode(), _autocast(device, dtype):
        for i in range(opts.warmup + opts.runs):
            with box_stage_times(model, clock) as box_times:
                outputs, times = timed_forward(model, [image], clock)
            if i >= opts.warmup:
                runs.append(times)
                box_runs.append(box_times)
                detections.append(int(len(outputs[0]["boxes"])))
    stages = {name: summarize([r[name] for r in runs]) for name in STAGES}
    total = summarize([sum(r.values()) for r in runs])
    return {
        "seconds_per_image": total,
        "stages": stages,
        # within roi_heads: pooling + head + predictor of each box stage (three for a cascade)
        "box_stages": [summarize(list(stage)) for stage in zip(*box_runs)],
        "detections_per_image": statistics.median(detections),
        "runs": opts.runs,
        "warmup": opts.warmup,
        "memory": _memory_report(device, before),
    }


def benchmark_exported(model: Any, opts: BenchmarkOptions) -> dict[str, Any]:
    """Time `opts.runs` single-image runs (after `opts.warmup`) of an exported model (`OnnxMaskRCNN`: ONNX Runtime
    or OpenVINO), input tensor to pasted masks. The runtime runs the graph as one call, so there are no stages."""
    device = torch.device("cpu")
    image = torch.rand(3, *opts.size, generator=torch.Generator().manual_seed(opts.seed))
    before = _memory_start(device)
    seconds: list[float] = []
    detections: list[int] = []
    for i in range(opts.warmup + opts.runs):
        start = time.perf_counter()
        outputs = model([image])
        if i >= opts.warmup:
            seconds.append(time.perf_counter() - start)
            detections.append(int(len(outputs[0]["boxes"])))
    return {"seconds_per_image": summarize(seconds), "stages": {}, "box_stages": [],
            "detections_per_image": statistics.median(detections), "runs": opts.runs, "warmup": opts.warmup,
            "memory": _memory_report(device, before)}


def random_targets(
    num_images: int, size: tuple[int, int], num_classes: int, generator: torch.Generator, max_objects: int = 3
) -> list[dict[str, Tensor]]:
    """Return per image a few random boxes (xyxy px) with filled-rectangle masks and labels 1..K."""
    h, w = size
    targets = []
    for _ in range(num_images):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=generator))
        x0 = torch.rand(n, generator=generator) * w * 0.6
        y0 = torch.rand(n, generator=generator) * h * 0.6
        bw = (0.15 + torch.rand(n, generator=generator) * 0.25) * w
        bh = (0.15 + torch.rand(n, generator=generator) * 0.25) * h
        boxes = torch.stack([x0, y0, (x0 + bw).clamp(max=w), (y0 + bh).clamp(max=h)], dim=1).floor()
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for m, (a, b, c, d) in zip(masks, boxes.long().tolist()):
            m[b:d, a:c] = 1
        labels = torch.randint(1, num_classes + 1, (n,), generator=generator, dtype=torch.int64)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return targets


def training_step(
    model: torch.nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]], dtype: torch.dtype | None,
    lr: float = 1e-4,
) -> Callable[[], None]:
    """Return a function doing one SGD step of `model` on this batch: forward under `dtype` autocast (None: FP32)
    on the images' device, backward (loss-scaled by a GradScaler for float16), update.

    Works for ours and torchvision's models alike; the model is in train mode only inside the step.
    """
    device = images[0].device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters (are all stages frozen?)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        model.train()
        try:
            with _autocast(device, dtype):
                losses = model(images, [dict(t) for t in targets])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()
        finally:
            model.eval()
    return step


def alternate(
    variants: dict[str, Callable[[], Any]], runs: int, warmup: int = 1, device: torch.device = torch.device("cpu")
) -> dict[str, list[float]]:
    """Time each variant `runs` times, interleaved so that machine noise hits all alike, after `warmup`
    untimed calls each; return the seconds of each run by variant (CUDA is synchronised around each call)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def benchmark_training(model: MaskRCNN, opts: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    """Time training steps (forward, backward, SGD update) on a random batch of `opts.batch` images.

    The model's weights change (an SGD step with a small learning rate); use a fresh model afterwards.
    """
    dtype, _ = autocast_dtype(opts.precision, device)
    generator = torch.Generator().manual_seed(opts.seed + 1)
    images = [torch.rand(3, *opts.size, generator=generator).to(device) for _ in range(opts.batch)]
    targets = random_targets(opts.batch, opts.size, model.cfg.model.num_classes, generator)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    step = training_step(model, images, targets, dtype)
    before = _memory_start(device)
    seconds = alternate({"step": step}, opts.runs, opts.warmup, device)["step"]
    return {
        "batch": opts.batch,
        "seconds_per_step": summarize(seconds),
        "images_per_s": summarize([opts.batch / s for s in seconds]),
        "runs": opts.runs,
        "warmup": opts.warmup,
        "memory": _memory_report(device, before),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Return what the numbers depend on: torch version, threads, processor, device name."""
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "device": device.type,
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def run_benchmark(model: MaskRCNN, opts: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    """Return the report: options, environment, and an `inference` and/or `training` section."""
    if opts.mode not in ("inference", "train", "both"):
        raise UserError(f"--mode must be inference, train or both, got '{opts.mode}'")
    if opts.runs < 1 or opts.warmup < 0 or opts.batch < 1:
        raise UserError("--runs and --batch must be at least 1 and --warmup at least 0")
    _, note = autocast_dtype(opts.precision, device)
    torch.manual_seed(opts.seed)
    report: dict[str, Any] = {
        "size": list(opts.size),
        "precision": opts.precision,
        "autocast": str(autocast_dtype(opts.precision, device)[0] or "none").replace("torch.", ""),
        "mode": opts.mode,
        "environment": environment(device),
        **opts.extra,
    }
    if note:
        report["note"] = note
    if opts.mode in ("inference", "both"):
        report["inference"] = benchmark_inference(model, opts, device)
    if opts.mode in ("train", "both"):
        report["training"] = benchmark_training(model, opts, device)
    return report


def run_exported_benchmark(model: Any, opts: BenchmarkOptions) -> dict[str, Any]:
    """Return the inference report of an exported model (`OnnxMaskRCNN`), as `run_benchmark`'s for PyTorch."""
    if opts.runs < 1 or opts.warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")
    runner = model.runner
    return {"size": list(opts.size), "precision": runner.precision, "autocast": "none", "mode": "inference",
            "backend": runner.backend, "environment": {**environment(torch.device("cpu")), "runtime": runner.name},
            **opts.extra, "inference": benchmark_exported(model, opts)}


def find_max_batch(
    argv: list[str], budget_mb: float, limit: int = 256, runner: Callable[[list[str]], dict] | None = None
) -> dict[str, Any]:
    """Return the largest training batch (1, 2, 4, ...) whose step's peak memory growth fits `budget_mb`.

    Each batch size is measured by `maskrcnn benchmark --mode train` in a fresh Python process
    (`argv` are its other arguments), so one size's peak does not hide the next one's. Doubling
    stops at the first size over the budget, one that fails (e.g. out of memory), or at `limit`.
    """
    runner = runner or _benchmark_subprocess
    tried: list[dict[str, Any]] = []
    best: int | None = None
    batch = 1
    while batch <= limit:
        result = runner([*argv, "--mode", "train", "--batch", str(batch)])
        if "error" in result:
            tried.append({"batch": batch, "error": result["error"]})
            break
        growth = float(result["training"]["memory"]["growth_mb"])
        fits = growth <= budget_mb
        tried.append({"batch": batch, "growth_mb": growth, "fits": fits,
                      "images_per_s": result["training"]["images_per_s"]["median"]})
        if not fits:
            break
        best = batch
        batch *= 2
    return {"budget_mb": budget_mb, "max_batch": best, "tried": tried}


def _benchmark_subprocess(argv: list[str]) -> dict[str, Any]:
    """Run `maskrcnn benchmark ARGV --json TMP` in a new interpreter; return its report or {'error'}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "maskrcnn.cli", "benchmark", *argv, "--json", str(out), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0 or not out.exists():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
        return json.loads(out.read_text())


def format_report(report: dict[str, Any]) -> str:
    """Return the report as a readable table."""
    env = report["environment"]
    h, w = report["size"]
    runtime = f"{env['runtime']}, precision {report['precision']}" if "runtime" in env else \
        f"precision {report['precision']} (autocast {report['autocast']})"
    lines = [
        f"image {h}x{w}, {runtime}, torch {env['torch']}, {env['threads']} threads, "
        f"{env.get('device_name', env['processor'])}"
    ]
    if "note" in report:
        lines.append(f"note: {report['note']}")
    if "inference" in report:
        inf = report["inference"]
        lines += [
            "",
            f"inference, 1 image, {inf['runs']} runs after {inf['warmup']} warm-up, "
            f"{inf['detections_per_image']:g} detections per image",
            f"{'stage':<22} {'median s':>9} {'min s':>9} {'max s':>9} {'share':>6}",
        ]
        total = inf["seconds_per_image"]["median"]
        for name, s in inf["stages"].items():
            share = s["median"] / total if total > 0 else 0.0
            lines.append(f"{name:<22} {s['median']:9.4f} {s['min']:9.4f} {s['max']:9.4f} {share:6.0%}")
            if name == "roi_heads":
                for k, b in enumerate(inf.get("box_stages", []), 1):
                    share = b["median"] / total if total > 0 else 0.0
                    label = f"  box stage {k}"
                    lines.append(f"{label:<22} {b['median']:9.4f} {b['min']:9.4f} {b['max']:9.4f} {share:6.0%}")
        t = inf["seconds_per_image"]
        lines.append(f"{'whole forward':<22} {t['median']:9.4f} {t['min']:9.4f} {t['max']:9.4f}")
        lines.append(_memory_line(inf["memory"]))
    if "training" in report:
        tr = report["training"]
        s, ips = tr["seconds_per_step"], tr["images_per_s"]
        lines += [
            "",
            f"training, batch {tr['batch']}, {tr['runs']} steps after {tr['warmup']} warm-up (forward, backward, SGD)",
            f"{'':<22} {'median':>9} {'min':>9} {'max':>9}",
            f"{'seconds per step':<22} {s['median']:9.4f} {s['min']:9.4f} {s['max']:9.4f}",
            f"{'images per second':<22} {ips['median']:9.2f} {ips['min']:9.2f} {ips['max']:9.2f}",
            _memory_line(tr["memory"]),
        ]
    if "max_memory" in report:
        mm = report["max_memory"]
        lines += ["", f"largest training batch within {mm['budget_mb']:g} MB: {mm['max_batch']}"]
        for t in mm["tried"]:
            detail = t["error"] if "error" in t else f"{t['growth_mb']:.0f} MB, {t['images_per_s']:.2f} images/s"
            lines.append(f"  batch {t['batch']}: {detail}")
    return "\n".join(lines)


def _memory_line(memory: dict[str, Any]) -> str:
    what = "peak RSS" if memory["kind"] == "cpu_peak_rss" else "peak CUDA memory allocated"
    return f"{what}: {memory['peak_mb']:.0f} MB (grew {memory['growth_mb']:.0f} MB during these runs)"
