"""The GPU path checked in one command: correctness, speed, memory, AMP training and torchrun, each a guarded step.

Written to run the day a GPU is lent for a few minutes (issue 37): it must work the first time, so the
same code runs on a CPU with `--device cpu --quick` (small sizes) in `make test` (tests/test_gpu_check.py);
only the device calls differ. Steps, in order (`--steps` picks some):

- environment: device name and memory, driver / CUDA / cuDNN, torch / torchvision versions;
- parity: our model against torchvision's with the same fixed random weights, both on the device
  (the set-up and tolerances of tests/test_torchvision_parity.py; TF32 off, so FP32 is FP32);
- cpu_vs_device: our model on the CPU against the same model on the device, within CPU_VS_DEVICE;
- inference: images/s and latency of ours and torchvision's R50-FPN at --size (800x1333), FP32 and
  autocast (FP16 and BF16 on CUDA; BF16 on a CPU), batch 1 up to the best batch that fits;
- training: images/s of a whole SGD step, ours and torchvision's (frozen BN, res3..res5 trainable, as
  benchmarks/compare_torchvision.py), FP32 and AMP (FP16 with loss scaling on CUDA; BF16 on a CPU);
- largest_batch: the largest training batch that fits, FP32 and AMP, ours and torchvision's: doubling,
  then bisection, every out-of-memory caught and its memory freed;
- shapes: the `shapes` demo recipe (`maskrcnn demo`'s preset) for a fixed number of iterations with
  `solver.amp=fp16`: the loss goes down and no step is non-finite (loss scaling on CUDA);
- torchrun: `torchrun --nproc-per-node 1` joins an NCCL process group (gloo on a CPU), runs a collective,
  then trains the shapes recipe for a few iterations in that process group.

A step that raises, or whose checks find problems, is reported as failed and the next one runs. The
report goes to --out DIR: report.json (everything) and report.md (the tables); exit status 1 when a
step failed.

    .venv/bin/python benchmarks/gpu_check.py --out runs/gpu-check                      # a GPU: < 8 minutes
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out runs/gpu-check-cpu
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torchvision

from maskrcnn.engine.benchmark import alternate, autocast_dtype, environment, random_targets, training_step
from maskrcnn.engine.compare import Tolerances, agreement_summary, detection_differences
from maskrcnn.engine.precision import resolve_device
from maskrcnn.engine.torchvision_reference import (FAST_PATH, FAST_PATH_MATCHED, decisive_torchvision_model,
                                                   PARITY_MAX_SIZE, PARITY_MIN_SIZE, fine_tuning_torchvision_model,
                                                   ours_with_weights, set_torchvision_input_size)

STEPS = ("environment", "parity", "cpu_vs_device", "inference", "training", "largest_batch", "shapes", "torchrun")
PRESET = "torchvision-r50-fpn"  # ours, as torchvision's maskrcnn_resnet50_fpn
# Our model on the CPU against itself on the device, both FP32 (TF32 off): the same sums in another order,
# so a little looser than the CPU fast path against torchvision (FAST_PATH), and 95% of detections matched
# (an NMS or top-k near-tie may go either way).
CPU_VS_DEVICE = Tolerances(box=0.1, score=1e-3, mask_iou=0.95)
CPU_VS_DEVICE_MATCHED = 0.95
GRAD_SCALER_INIT_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale, which the trainer keeps


@dataclass(frozen=True)
class Sizes:
    """How much a run measures: the full GPU run, or the quick CPU one of `make test`."""

    image: tuple[int, int]  # inference and training images (H, W); the models resize to it
    parity_images: tuple[tuple[tuple[int, int], ...], ...]  # batches of image sizes for the parity steps
    parity_input: tuple[int, int]  # ... which both models resize to this (shorter side, longest side)
    runs: int  # timed runs per variant, after `warmup` untimed ones
    warmup: int
    infer_batches: tuple[int, ...]  # inference batches tried, up to the first that does not fit
    train_batches: tuple[int, ...]
    max_batch: int  # the largest-batch search stops here
    resolution: float  # ... and stops bisecting when the gap is under this share of the batch
    probe_steps: int  # training steps a batch must survive to count as fitting
    shapes_iters: int
    shapes_images: int
    shapes_batch: int
    torchrun_iters: int
    # Fewer test proposals and detections, fewer sampled RoIs in training, in both implementations alike
    # (on the CPU the heads' work on 1000 proposals and 100 masks outweighs the backbone on small images)
    heads: dict[str, int] | None = None


FULL = Sizes(image=(800, 1333), parity_images=(((300, 400),), ((257, 189),), ((480, 360),), ((240, 320), (350, 200))),
             parity_input=(PARITY_MIN_SIZE, PARITY_MAX_SIZE),
             runs=5, warmup=2, infer_batches=(1, 2, 4, 8, 16), train_batches=(2, 4, 8), max_batch=64,
             resolution=0.125, probe_steps=2, shapes_iters=300, shapes_images=200, shapes_batch=8, torchrun_iters=10)
QUICK = Sizes(image=(96, 128), parity_images=(((257, 189),),), parity_input=(160, 256), runs=1, warmup=0, infer_batches=(1, 2),
              train_batches=(1, 2), max_batch=2, resolution=0.0, probe_steps=1, shapes_iters=8, shapes_images=8,
              shapes_batch=2, torchrun_iters=2,
              heads={"proposals": 100, "detections": 20, "rois_per_image": 64})


class CheckFailed(Exception):
    """A step ran but its checks found problems."""


# ---- running guarded steps ------------------------------------------------------------------------------


def run_steps(steps: dict[str, Callable[[], dict[str, Any]]], fail_step: str | None = None,
              after_each: Callable[[], None] = lambda: None) -> dict[str, dict[str, Any]]:
    """Run each step in turn; return per step its status ("ok" or "failed"), seconds, and result or error.

    A step fails when it raises; one whose result lists `problems` fails too (its result is kept). The
    step named `fail_step` raises at its start (to test the reporting). `after_each` runs after every step.
    """
    records: dict[str, dict[str, Any]] = {}
    for name, step in steps.items():
        print(f"[gpu_check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            if name == fail_step:
                raise RuntimeError(f"injected failure (--fail-step {name})")
            result = step()
            problems = result.get("problems", [])
            record = {"status": "failed" if problems else "ok", "result": result}
            if problems:
                record["error"] = "; ".join(problems)
        except Exception as e:  # noqa: BLE001 - any failure is reported and the next step runs
            record = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        finally:
            after_each()
        record["seconds"] = round(time.perf_counter() - start, 2)
        records[name] = record
        print(f"[gpu_check] {name}: {record['status']} ({record['seconds']} s)"
              + (f": {record['error']}" if "error" in record else ""), flush=True)
    return records


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on CUDA, return cached blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def strict_fp32() -> Iterator[None]:
    """FP32 matmuls and convolutions on CUDA, not TF32 (for the correctness comparisons); no-op elsewhere."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this batch does not fit" (CUDA's; a CPU process is killed instead)."""
    return (torch.cuda.OutOfMemoryError,)


# ---- the largest batch ----------------------------------------------------------------------------------


def largest_batch(fits: Callable[[int], bool], start: int, limit: int, resolution: float = 0.0) -> dict[str, Any]:
    """Return the largest batch b <= `limit` for which `fits(b)`: doubling from `start` up to the first
    batch that does not fit, then bisection until the gap is at most max(1, resolution * b).

    Returns {"largest": b (0 when not even 1 fits), "first_failure": the smallest batch seen not to fit
    (None when `limit` fitted), "tried": [{"batch", "fits"}, ...] in order}.
    """
    tried: list[dict[str, Any]] = []

    def probe(batch: int) -> bool:
        ok = fits(batch)
        tried.append({"batch": batch, "fits": ok})
        return ok

    good, bad = 0, None
    batch = max(1, min(start, limit))
    while True:
        if not probe(batch):
            bad = batch
            break
        good = batch
        if batch >= limit:
            break
        batch = min(2 * batch, limit)
    while bad is not None and bad - good > max(1, int(resolution * good)):
        mid = (good + bad) // 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    return {"largest": good, "first_failure": bad, "tried": tried}


def training_fits(model: torch.nn.Module, batch: int, size: tuple[int, int], dtype: torch.dtype | None,
                  device: torch.device, steps: int) -> bool:
    """Return whether `steps` SGD steps of `model` on a random batch of `batch` images fit in memory.

    An out-of-memory error is caught, and its tensors (the batch, the optimizer, partial gradients) freed.
    """
    try:
        _train_steps(model, batch, size, dtype, device, steps)
        fits = True
    except out_of_memory_errors():
        fits = False
    # Here, after the handler, the error's traceback (and the frames holding the batch) is gone.
    model.zero_grad(set_to_none=True)
    free_memory(device)
    return fits


def _train_steps(model: torch.nn.Module, batch: int, size: tuple[int, int], dtype: torch.dtype | None,
                 device: torch.device, steps: int) -> None:
    step = training_step(model, *random_batch(batch, size, device, seed=batch), dtype)
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(batch: int, size: tuple[int, int], device: torch.device,
                 seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Return `batch` random images of `size` and random targets for torchvision's 90 COCO labels, on `device`."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, *size, generator=generator).to(device) for _ in range(batch)]
    targets = random_targets(batch, size, 90, generator)
    return images, [{k: v.to(device) for k, v in t.items()} for t in targets]


# ---- the steps ------------------------------------------------------------------------------------------


class Check:
    """The steps of one run, sharing the device, the sizes, an output folder and models built once."""

    def __init__(self, device: torch.device, sizes: Sizes, out: Path) -> None:
        self.device, self.sizes, self.out = device, sizes, out
        self.results: dict[str, dict[str, Any]] = {}

    def steps(self, names: list[str]) -> dict[str, Callable[[], dict[str, Any]]]:
        """Return the named steps as callables, in STEPS' order."""
        return {name: getattr(self, f"step_{name}") for name in STEPS if name in names}

    # -- shared pieces --

    def precisions(self, training: bool) -> list[str]:
        """FP32 and the autocast precisions this device runs: on CUDA FP16 (with loss scaling when
        training) and, for inference, BF16 where supported; on a CPU BF16 (FP16 autocast needs CUDA)."""
        if self.device.type != "cuda":
            return ["fp32", "bf16"]
        if training or not torch.cuda.is_bf16_supported():
            return ["fp32", "fp16"]
        return ["fp32", "fp16", "bf16"]

    def dtype(self, precision: str) -> torch.dtype | None:
        return autocast_dtype(precision, self.device)[0]

    @cached_property
    def parity_pair(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """torchvision's maskrcnn_resnet50_fpn with decisive random weights and ours with the same, on the CPU."""
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        reference = set_torchvision_input_size(decisive_torchvision_model(maskrcnn_resnet50_fpn), *self.sizes.parity_input)
        overrides = input_size_overrides(*self.sizes.parity_input) + limit_heads(reference, self.sizes.heads)
        return reference, ours_with_weights(PRESET, reference.state_dict(), overrides)

    @cached_property
    def speed_pair(self) -> dict[str, torch.nn.Module]:
        """The fine-tuning R50-FPN pair (frozen BN), both resizing to --size, on the device."""
        sides = min(self.sizes.image), max(self.sizes.image)
        reference = set_torchvision_input_size(fine_tuning_torchvision_model(), *sides)
        overrides = input_size_overrides(*sides) + limit_heads(reference, self.sizes.heads)
        ours = ours_with_weights(PRESET, reference.state_dict(), overrides)
        return {"torchvision": reference.to(self.device), "maskrcnn": ours.to(self.device)}

    def parity_batches(self) -> Iterator[list[torch.Tensor]]:
        """The parity tests' random images (seeded by their sizes), batch by batch, on the CPU."""
        for sizes in self.sizes.parity_images:
            torch.manual_seed(sum(sum(s) for s in sizes))
            yield [torch.rand(3, *s) for s in sizes]

    def to_cpu(self, outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return [{k: v.cpu() for k, v in o.items()} for o in outputs]

    # -- environment --

    def step_environment(self) -> dict[str, Any]:
        env = {**environment(self.device), "torchvision": torchvision.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env.update(memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                       capability=".".join(map(str, torch.cuda.get_device_capability(self.device))),
                       driver=nvidia_driver())
        else:
            env.update(device_name=env["processor"], cpus=os.cpu_count(),
                       memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1))
        return env

    # -- correctness --

    def step_parity(self) -> dict[str, Any]:
        reference, ours = (copy.deepcopy(m).to(self.device) for m in self.parity_pair)
        images, problems = [], []
        with torch.no_grad(), strict_fp32():
            for batch in self.parity_batches():
                batch = [im.to(self.device) for im in batch]
                expected, actual = self.to_cpu(reference(batch)), self.to_cpu(ours(batch))
                for image, e, a in zip(batch, expected, actual):
                    size = list(image.shape[-2:])
                    found = detection_differences(e, a, FAST_PATH, FAST_PATH_MATCHED)
                    if len(e["boxes"]) == 0:
                        found.append("torchvision found no detections: the comparison shows nothing")
                    problems += [f"{size[0]}x{size[1]}: {p}" for p in found]
                    images.append({"size": size, **agreement_summary(e, a, FAST_PATH)})
        return {"tolerances": asdict(FAST_PATH), "min_matched": FAST_PATH_MATCHED, "images": images,
                "problems": problems}

    def step_cpu_vs_device(self) -> dict[str, Any]:
        ours_cpu = self.parity_pair[1]
        ours_device = copy.deepcopy(ours_cpu).to(self.device)
        images, problems = [], []
        with torch.no_grad(), strict_fp32():
            for batch in self.parity_batches():
                expected = ours_cpu(batch)
                actual = self.to_cpu(ours_device([im.to(self.device) for im in batch]))
                for image, e, a in zip(batch, expected, actual):
                    size = list(image.shape[-2:])
                    problems += [f"{size[0]}x{size[1]}: {p}"
                                 for p in detection_differences(e, a, CPU_VS_DEVICE, CPU_VS_DEVICE_MATCHED)]
                    images.append({"size": size, **agreement_summary(e, a, CPU_VS_DEVICE)})
        return {"tolerances": asdict(CPU_VS_DEVICE), "min_matched": CPU_VS_DEVICE_MATCHED, "images": images,
                "problems": problems}

    # -- speed --

    def step_inference(self) -> dict[str, Any]:
        models, rows = self.speed_pair, []
        for precision in self.precisions(training=False):
            dtype = self.dtype(precision)
            for batch in self.sizes.infer_batches:
                images = random_batch(batch, self.sizes.image, self.device, seed=batch)[0]

                def infer(model: torch.nn.Module, images: list[torch.Tensor] = images) -> None:
                    with torch.inference_mode(), autocast(self.device, dtype):
                        model(images)
                try:
                    times = alternate({name: (lambda m=m: infer(m)) for name, m in models.items()},
                                      self.sizes.runs, self.sizes.warmup, self.device)
                except out_of_memory_errors():
                    rows.append({"precision": precision, "batch": batch, "error": "out of memory"})
                    break
                finally:
                    free_memory(self.device)
                for name, seconds in times.items():
                    median = statistics.median(seconds)
                    rows.append({"implementation": name, "precision": precision, "batch": batch,
                                 "seconds": median, "images_per_s": batch / median, "latency_ms": 1000 * median})
        return {"size": list(self.sizes.image), "runs": self.sizes.runs, "rows": rows, "best": best_rows(rows)}

    def step_training(self) -> dict[str, Any]:
        models, rows = self.speed_pair, []
        for precision in self.precisions(training=True):
            dtype = self.dtype(precision)
            for batch in self.sizes.train_batches:
                try:
                    images, targets = random_batch(batch, self.sizes.image, self.device, seed=batch)
                    steps = {name: training_step(m, images, targets, dtype) for name, m in models.items()}
                    times = alternate(steps, self.sizes.runs, self.sizes.warmup, self.device)
                except out_of_memory_errors():
                    rows.append({"precision": precision, "batch": batch, "error": "out of memory"})
                    break
                finally:
                    images = targets = steps = None
                    for m in models.values():
                        m.zero_grad(set_to_none=True)
                    free_memory(self.device)
                for name, seconds in times.items():
                    median = statistics.median(seconds)
                    rows.append({"implementation": name, "precision": precision, "batch": batch,
                                 "seconds_per_step": median, "images_per_s": batch / median})
        return {"size": list(self.sizes.image), "runs": self.sizes.runs, "rows": rows}

    def step_largest_batch(self) -> dict[str, Any]:
        s, rows = self.sizes, []
        for precision in self.precisions(training=True):
            dtype = self.dtype(precision)
            for name, model in self.speed_pair.items():
                found = largest_batch(
                    lambda b: training_fits(model, b, s.image, dtype, self.device, s.probe_steps),
                    start=max(s.train_batches), limit=s.max_batch, resolution=s.resolution)
                rows.append({"implementation": name, "precision": precision, **found})
        return {"size": list(s.image), "limit": s.max_batch, "probe_steps": s.probe_steps, "rows": rows}

    # -- the shapes recipe, alone and under torchrun --

    @cached_property
    def shapes_data(self) -> tuple[Path, Path]:
        """A small synthetic shapes training set (annotations, images) in the output folder."""
        from maskrcnn.data.shapes import make_shapes

        return make_shapes(self.out / "shapes-data", num_train=self.sizes.shapes_images, num_val=0, seed=0)["train"]

    def shapes_overrides(self, run_dir: Path, iterations: int) -> list[str]:
        """The `shapes` preset for `iterations` iterations in FP16 autocast, logging every one, skipping
        (and counting) non-finite steps instead of stopping."""
        ann, images = self.shapes_data
        return [f"data.train=['{ann}:{images}']", f"output_dir={run_dir}", f"device={self.device.type}",
                f"solver.max_iter={iterations}", f"solver.warmup_iters={max(1, iterations // 10)}",
                f"solver.ims_per_batch={self.sizes.shapes_batch}", "solver.amp=fp16", "solver.nonfinite=skip",
                "solver.log_period=1", f"solver.checkpoint_period={iterations + 1}",
                f"data.num_workers={2 if self.device.type == 'cuda' else 0}"]

    def step_shapes(self) -> dict[str, Any]:
        from maskrcnn.config import load_config
        from maskrcnn.engine.trainer import train

        iterations = self.sizes.shapes_iters
        start = time.perf_counter()
        run_dir = train(load_config("shapes", self.shapes_overrides(self.out / "shapes-run", iterations)))
        result = {"seconds_per_iter": (time.perf_counter() - start) / iterations, **training_run_summary(run_dir)}
        problems = shapes_problems(result, iterations)  # adds first_loss and last_loss to result
        return {**result, "problems": problems}

    def step_torchrun(self) -> dict[str, Any]:
        iterations = self.sizes.torchrun_iters
        result_file = self.out / "torchrun-result.json"
        result_file.unlink(missing_ok=True)
        spec = {"device": self.device.type, "result": str(result_file),
                "overrides": self.shapes_overrides(self.out / "torchrun-run", iterations)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(Path(__file__).resolve()), "--torchrun-worker", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not result_file.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"torchrun exited with status {proc.returncode}: " + " | ".join(tail))
        result = json.loads(result_file.read_text())
        expected_backend = "nccl" if self.device.type == "cuda" else "gloo"
        problems = [] if result["backend"] == expected_backend else [f"backend {result['backend']}, not {expected_backend}"]
        if result["all_reduce"] != 1.0:
            problems.append(f"all_reduce of 1 over 1 process gave {result['all_reduce']}")
        if result["iterations"] != iterations or not all(map(math.isfinite, result["losses"])):
            problems.append(f"{result['iterations']} of {iterations} iterations, losses {result['losses']}")
        return {**result, "problems": problems}


def input_size_overrides(min_size: int, max_size: int) -> list[str]:
    """Config overrides that make ours resize images as `set_torchvision_input_size` makes torchvision's, both modes."""
    return [f"input.min_size_test={min_size}", f"input.max_size_test={max_size}",
            f"input.min_size_train=[{min_size}]", f"input.max_size_train={max_size}"]


def limit_heads(reference: torch.nn.Module, heads: dict[str, int] | None) -> list[str]:
    """Set torchvision's `reference` to `heads`' test proposals, detections and training RoIs per image;
    return the config overrides that do the same to ours ([] and no change when `heads` is None)."""
    if heads is None:
        return []
    reference.rpn._post_nms_top_n["testing"] = heads["proposals"]
    reference.roi_heads.detections_per_img = heads["detections"]
    reference.roi_heads.fg_bg_sampler.batch_size_per_image = heads["rois_per_image"]
    return [f"model.rpn.post_nms_top_n_test={heads['proposals']}",
            f"model.box_head.detections_per_image={heads['detections']}",
            f"model.box_head.batch_size_per_image={heads['rois_per_image']}"]


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to `dtype` on `device`'s type; FP32 when None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return, per implementation and precision, the row with the most images/s."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row.get("implementation", ""), row["precision"])
        if "images_per_s" in row and (key not in best or row["images_per_s"] > best[key]["images_per_s"]):
            best[key] = row
    return list(best.values())


def training_run_summary(run_dir: Path) -> dict[str, Any]:
    """Return a finished run's per-iteration losses, non-finite skips, and its GradScaler's final state."""
    from maskrcnn.checkpoint import load_checkpoint

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    scaler = load_checkpoint(run_dir / "checkpoints" / "model_final.pth").get("scaler") or {}
    summary: dict[str, Any] = {
        "iterations": train_records[-1]["iter"] if train_records else 0,
        "losses": [r["loss"] for r in train_records],
        "nonfinite_skipped": int(max((r.get("nonfinite_skipped", 0) for r in train_records), default=0)),
        "loss_scaling": bool(scaler),
    }
    if scaler:
        # The scale starts at init_scale and halves at every step the scaler skips (inf/NaN gradients); it
        # only grows after growth_interval clean steps in a row, so below that many the halvings are the skips.
        summary["scaler_scale"] = scaler["scale"]
        if summary["iterations"] < scaler["growth_interval"]:
            summary["scaler_skipped_steps"] = round(math.log2(GRAD_SCALER_INIT_SCALE / scaler["scale"]))
    return summary


def shapes_problems(result: dict[str, Any], iterations: int) -> list[str]:
    """What is wrong with a short shapes run: too few iterations, a non-finite loss, a loss that did not go down."""
    losses = result["losses"]
    if result["iterations"] != iterations or len(losses) != iterations:
        return [f"{result['iterations']} of {iterations} iterations logged ({len(losses)} losses)"]
    problems = []
    if not all(map(math.isfinite, losses)) or result["nonfinite_skipped"]:
        problems.append(f"non-finite steps: {result['nonfinite_skipped']} skipped, losses {losses}")
    quarter = max(1, iterations // 4)
    first, last = statistics.mean(losses[:quarter]), statistics.mean(losses[-quarter:])
    result["first_loss"], result["last_loss"] = first, last
    if not last < first:
        problems.append(f"the loss did not go down: {first:.3f} over the first {quarter} iterations, "
                        f"{last:.3f} over the last {quarter}")
    return problems


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvidia_driver() -> str:
    """Return the NVIDIA driver version from nvidia-smi ("unknown" without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def torchrun_worker(spec: dict[str, Any]) -> int:
    """Under torchrun: join the process group (NCCL on CUDA, gloo on a CPU), all-reduce a 1, train the shapes
    recipe in that group (the trainer finds it initialised), and write what happened to spec['result']."""
    import torch.distributed as dist

    from maskrcnn import distributed as du
    from maskrcnn.config import load_config
    from maskrcnn.engine.trainer import train

    device = torch.device(spec["device"])
    if device.type == "cuda":
        device = torch.device("cuda", du.local_rank())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        one = torch.ones(1, device=device)
        dist.all_reduce(one)
        backend, world = dist.get_backend(), dist.get_world_size()
        run_dir = train(load_config("shapes", spec["overrides"]))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    summary = training_run_summary(run_dir)
    Path(spec["result"]).write_text(json.dumps({"backend": backend, "world_size": world, "all_reduce": one.item(),
                                                **summary}))
    return 0


# ---- the report -----------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """Return the report as Markdown: a status table of the steps, then each step's table."""
    steps = report["steps"]
    env = steps.get("environment", {}).get("result", {})
    lines = [f"# GPU check on {env.get('device_name', report['device'])}, {report['started']}", "",
             f"`{report['command']}`", ""]
    if env:
        lines += ["| " + " | ".join(env) + " |", "|" + "---|" * len(env), "| " + " | ".join(map(str, env.values())) + " |", ""]
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, record in steps.items():
        detail = record.get("error", "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {record['status']} | {record['seconds']} | {detail[:300]} |")
    for name, render in RENDERERS.items():
        result = steps.get(name, {}).get("result")
        if result:
            lines += ["", *render(result)]
    return "\n".join(lines) + "\n"


def _agreement_table(title: str, result: dict[str, Any]) -> list[str]:
    tol = result["tolerances"]
    lines = [f"## {title} (box {tol['box']} px, score {tol['score']}, mask IoU {tol['mask_iou']}; "
             f"{result['min_matched']:.0%} must match)", "", "| image | expected | actual | matched |", "|---|---|---|---|"]
    return lines + [f"| {i['size'][0]}x{i['size'][1]} | {i['expected']} | {i['actual']} | {i['matched']} |"
                    for i in result["images"]]


def _speed_table(title: str, result: dict[str, Any], value: str, extra: str | None) -> list[str]:
    h, w = result["size"]
    lines = [f"## {title}, {h}x{w}, median of {result['runs']} runs", "",
             f"| precision | batch | torchvision images/s | maskrcnn images/s | maskrcnn / torchvision |"
             + (f" {extra} torchvision | {extra} maskrcnn |" if extra else ""),
             "|---|---|---|---|---|" + ("---|---|" if extra else "")]
    cells: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in result["rows"]:
        cells.setdefault((row["precision"], row["batch"]), {})[row.get("implementation", "error")] = row
    for (precision, batch), by_impl in cells.items():
        if "error" in by_impl:
            lines.append(f"| {precision} | {batch} | {by_impl['error']['error']} | | |" + (" | |" if extra else ""))
            continue
        tv, ours = by_impl["torchvision"], by_impl["maskrcnn"]
        line = (f"| {precision} | {batch} | {tv['images_per_s']:.2f} | {ours['images_per_s']:.2f} | "
                f"{ours['images_per_s'] / tv['images_per_s']:.2f} |")
        lines.append(line + (f" {tv[value]:.1f} | {ours[value]:.1f} |" if extra else ""))
    return lines


def _largest_table(result: dict[str, Any]) -> list[str]:
    h, w = result["size"]
    lines = [f"## Largest training batch, {h}x{w} (limit {result['limit']}, {result['probe_steps']} steps each)", "",
             "| implementation | precision | largest | first that failed | tried |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        tried = ", ".join(f"{t['batch']}{'' if t['fits'] else ' (OOM)'}" for t in row["tried"])
        failed = row["first_failure"] if row["first_failure"] is not None else "none (limit fits)"
        lines.append(f"| {row['implementation']} | {row['precision']} | {row['largest']} | {failed} | {tried} |")
    return lines


def _run_lines(title: str, result: dict[str, Any]) -> list[str]:
    losses = result["losses"]
    line = (f"{result['iterations']} iterations, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"{result['nonfinite_skipped']} non-finite steps skipped, loss scaling "
            f"{'on' if result['loss_scaling'] else 'off (FP16 autocast needs CUDA; BF16 here)'}")
    if "scaler_skipped_steps" in result:
        line += f" (final scale {result['scaler_scale']:g}, {result['scaler_skipped_steps']} overflow steps skipped)"
    if "seconds_per_iter" in result:
        line += f", {result['seconds_per_iter']:.3f} s/iteration"
    if "backend" in result:
        line = f"backend {result['backend']}, world size {result['world_size']}, all_reduce {result['all_reduce']:g}; " + line
    return [f"## {title}", "", line]


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "parity": lambda r: _agreement_table("Parity: ours vs torchvision on the device, same weights", r),
    "cpu_vs_device": lambda r: _agreement_table("Ours on the CPU vs ours on the device", r),
    "inference": lambda r: _speed_table("Inference", r, "latency_ms", "latency ms"),
    "training": lambda r: _speed_table("Training (forward, backward, SGD step)", r, "seconds_per_step", None),
    "largest_batch": _largest_table,
    "shapes": lambda r: _run_lines("The shapes recipe, solver.amp=fp16", r),
    "torchrun": lambda r: _run_lines("torchrun --nproc-per-node 1", r),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="report folder (report.json, report.md, the training runs)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cpu or auto")
    parser.add_argument("--quick", action="store_true", help="small sizes: the CPU run of make test")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--max-batch", type=int, help="largest training batch tried (default 64; quick 3)")
    parser.add_argument("--fail-step", choices=STEPS, help="make this step raise (tests the reporting)")
    parser.add_argument("--torchrun-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torchrun_worker:
        return torchrun_worker(json.loads(args.torchrun_worker))
    if not args.out:
        parser.error("--out DIR is required")
    names = [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; the steps are {', '.join(STEPS)}")
    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    if args.max_batch:
        sizes = replace(sizes, max_batch=args.max_batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(device, sizes, out)
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "device": str(device), "quick": args.quick, "sizes": asdict(sizes),
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    report["steps"] = run_steps(check.steps(names), args.fail_step, lambda: free_memory(device))
    report["failed"] = [name for name, r in report["steps"].items() if r["status"] != "ok"]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
