"""The training loop: data, model, SGD/AdamW, schedule, AMP, checkpoints, resume, logging, evaluation.

Layout of a run directory (`cfg.output_dir`):
    config.yaml              the resolved config the run used
    metrics.jsonl            one JSON object per log period (and per evaluation)
    tb/                      TensorBoard events (when tensorboard is installed)
    checkpoints/model_XXXXXXX.pth, model_final.pth
    eval/iter_XXXXXXX/, eval/final/   evaluator outputs (when data.val is set)
    loss_curve.png

Under torchrun (docs/distributed.md) every process runs this loop on its slice of each global batch
(`solver.ims_per_batch` is the total) with DistributedDataParallel averaging the gradients; only
rank 0 logs, draws the progress bar and writes files. Decisions that must be the same everywhere
(stop on a signal, on the time budget, on unreadable data, on a non-finite loss) are taken from
values all-reduced across the processes, so every rank leaves the loop at the same iteration.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from maskrcnn import distributed as du
from maskrcnn.checkpoint import (
    TMP_SUFFIX,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from maskrcnn.config import Config, atomic_write_text
from maskrcnn.engine.solver import WarmupSchedule, build_lr_scheduler, build_optimizer
from maskrcnn.errors import UserError

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3  # periodic checkpoints kept besides model_final.pth


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what to try."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised once the checkpoint a SIGINT/SIGTERM asked for is saved; `exit_status` is 128 + signal number."""

    def __init__(self, signal_name: str, path: Path) -> None:
        super().__init__(f"training stopped by {signal_name}; saved {path}")
        self.signal_name = signal_name
        self.path = path
        self.exit_status = 128 + int(signal.Signals[signal_name])


# ---- small helpers ------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """Return the torch device for `cfg.device` ("auto" picks CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("config device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Return whether `device` computes bfloat16 natively (CUDA with bf16; a CPU with AVX-512/AMX).

    Without it (an AVX2-only CPU) oneDNN emulates bfloat16 convolutions: measured here on a 2-core
    AVX2 EPYC, one 3x3 conv was ~150x slower than in float32, so bf16 autocast would only hurt.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's probe: assume the slow path
        return False


def autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """Return (autocast dtype, or None for full precision; a note when the request had to change).

    `precision` is "" or "fp32" (none), "bf16", "fp16" or "auto" (bf16 where `device` computes it
    natively, else full precision). fp16 autocast needs CUDA: elsewhere bfloat16 is used instead.
    Shared by training (`solver.amp`) and `maskrcnn benchmark`.
    """
    if precision in ("", "fp32"):
        return None, None
    if precision == "auto":
        if native_bf16(device):
            return torch.bfloat16, None
        return None, f"this {device.type} has no native bfloat16 (AVX-512/AMX); training in float32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("bf16 autocast is not supported by this GPU; use fp16")
    notes = []
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        dtype = torch.bfloat16
        notes.append(f"fp16 autocast needs CUDA; using bf16 autocast on {device.type} instead")
    if dtype == torch.bfloat16 and not native_bf16(device):
        notes.append("this CPU has no native bfloat16 (AVX-512/AMX): bf16 is emulated, far slower than "
                     "float32 here; use fp32 or auto")
    return dtype, "; ".join(notes) or None


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for `solver.amp` on `device` (None = full precision)."""
    dtype, note = autocast_dtype(amp, device)
    if note:
        # "auto" choosing float32 is the setting working as meant: information, not a warning.
        (log.info if amp == "auto" else log.warning)("solver.amp=%s: %s", amp, note)
    return dtype


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Return every global RNG state as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by `rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_seed(seed: int, rank: int, iteration: int) -> int:
    """Return the global-RNG seed of a rank > 0 (RoI sampling differs between ranks, reproducibly)."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint32)[0])


def apply_reference_world_size(cfg: Config, world_size: int) -> None:
    """Scale batch, LR and schedule from solver.reference_world_size processes to `world_size` (linear rule).

    As Detectron2's `auto_scale_workers`: the per-process batch stays, so the global batch and the
    LR grow with the number of processes while max_iter, steps, warm-up and the checkpoint and
    evaluation periods shrink; reference_world_size becomes `world_size`, so the saved config.yaml
    describes the run as it ran and resuming it with the same number of processes changes nothing.
    """
    s = cfg.solver
    ref = s.reference_world_size
    if ref <= 0 or ref == world_size:
        return
    if s.ims_per_batch % ref:
        raise UserError(f"solver.ims_per_batch={s.ims_per_batch} does not split over solver.reference_world_size="
                        f"{ref} processes; give a multiple of {ref}")
    scale = world_size / ref
    old = (s.ims_per_batch, s.base_lr, s.max_iter)
    s.ims_per_batch = s.ims_per_batch // ref * world_size
    s.base_lr = s.base_lr * scale
    s.max_iter = max(1, round(s.max_iter / scale))
    s.warmup_iters = round(s.warmup_iters / scale)
    s.steps = [round(x / scale) for x in s.steps]
    s.checkpoint_period = max(1, round(s.checkpoint_period / scale))
    if s.eval_period > 0:
        s.eval_period = max(1, round(s.eval_period / scale))
    s.reference_world_size = world_size
    log.info("solver.reference_world_size=%d, running on %d process(es): ims_per_batch %d -> %d, base_lr %g -> %g, "
             "max_iter %d -> %d (steps, warm-up and periods scaled too)", ref, world_size, old[0], s.ims_per_batch,
             old[1], s.base_lr, old[2], s.max_iter)


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Move the tensors (and InstanceMasks) of each target dict to `device` (other values pass through)."""
    from maskrcnn.instance_masks import InstanceMasks

    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if torch.is_tensor(v) or isinstance(v, InstanceMasks) else v

    return [{k: move(v) for k, v in t.items()} for t in targets]


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks between iterations.

    The handler restores the previous ones, so a second signal stops the process the usual way.
    """
    flag: dict[str, Any] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signal.Signals(signum).name
        for s, h in previous.items():
            signal.signal(s, h)
        log.warning("%s received: finishing this iteration and saving a checkpoint", flag["signal"])

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---- data and model setup -----------------------------------------------------------------------


def build_train_dataset(cfg: Config) -> Any:
    """Return the (concatenated) training dataset for `cfg.data.train`."""
    if not cfg.data.train:
        raise UserError("no training data: set data.train=ANN.json:IMAGE_DIR (in the config or as an override)")
    from maskrcnn.data.augment import Augmenter
    from maskrcnn.data.coco import build_dataset

    return build_dataset(
        cfg.data.train,
        filter_empty=cfg.data.filter_empty,
        train=True,
        augment=Augmenter.from_config(cfg.input),
        max_pixels=cfg.input.max_pixels,
        min_keypoints=cfg.model.keypoint_head.min_keypoints_per_image if cfg.model.keypoint_head.enabled else 0,
        cache_dir=cfg.data.cache_dir or None,
    )


def sync_classes(cfg: Config, class_names: list[str], category_ids: list[int]) -> None:
    """Fill the model's classes (names, count, dataset category ids) from the data, or raise if they disagree."""
    names = list(class_names)
    if not cfg.model.class_names:
        if cfg.model.num_classes != len(names):
            log.info("model.num_classes %d -> %d from the training data", cfg.model.num_classes, len(names))
        cfg.model.class_names = names
        cfg.model.num_classes = len(names)
    elif list(cfg.model.class_names) != names:
        raise UserError(
            f"config model.class_names {cfg.model.class_names} differ from the training data's categories "
            f"{names}; set model.class_names=[] to take them from the data"
        )
    # Predictions must name the dataset's own category ids, whatever the preset said.
    cfg.model.category_ids = [int(i) for i in category_ids]


def _load_trunk_weights(model: nn.Module, path: str) -> None:
    """Initialise the backbone trunk from a torchvision ImageNet ResNet/ResNeXt state-dict file."""
    loader = getattr(getattr(model, "backbone", None), "load_trunk_weights", None)
    if loader is None:
        raise UserError("model.backbone.weights is set but this model cannot load trunk weights")
    loader(path)
    log.info("backbone initialised from %s", path)


def _flatten_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Return the numeric leaves of a nested metrics dict as {"a/b": value}."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flatten_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def _finite_or_none(value: Any) -> Any:
    """Return `value` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- logging sinks ------------------------------------------------------------------------------


class MetricsWriter:
    """metrics.jsonl plus TensorBoard scalars; on resume, drops records past the resumed iteration."""

    def __init__(self, out_dir: Path, start_iter: int) -> None:
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            # Records written after the checkpoint we resume from describe iterations that will be
            # run again; keeping them would draw the loss curve twice over that stretch.
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("iter", 0) <= start_iter:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
            atomic_write_text(self.path, "".join(l + "\n" for l in kept))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_iter or None)
        except Exception as e:  # noqa: BLE001 - tensorboard missing or broken: the run goes on
            log.info("TensorBoard logging off (%s)", e)

    def write(self, record: dict[str, Any], scalars: dict[str, float]) -> None:
        """Append one JSON line and its scalars at step `record['iter']`."""
        with open(self.path, "a") as f:
            f.write(json.dumps(_finite_or_none(record)) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["iter"])

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()


# ---- the trainer --------------------------------------------------------------------------------


class Trainer:
    """One training run; `run()` trains from scratch or from the latest checkpoint to the end."""

    def __init__(self, cfg: Config, resume: bool = False, weights: str | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        s = cfg.solver
        # Joins torchrun's process group when launched by it (a no-op otherwise, or when joined already).
        self.device = du.setup(resolve_device(cfg.device), s.dist_timeout_minutes, s.dist_heartbeat_timeout)
        self.rank, self.world_size = du.get_rank(), du.get_world_size()
        self.main = self.rank == 0
        self.dtype = amp_dtype(cfg.solver.amp, self.device)
        if cfg.solver.nonfinite not in ("stop", "skip"):
            raise UserError(f"config key 'solver.nonfinite' = {cfg.solver.nonfinite!r} is not one of ['stop', 'skip']")
        apply_reference_world_size(cfg, self.world_size)
        if s.ims_per_batch % self.world_size:
            raise UserError(f"solver.ims_per_batch={s.ims_per_batch} is the total batch of all {self.world_size} "
                            f"processes and must be a multiple of {self.world_size}")

        resume_from = self._agreed_resume_path(resume)
        seed_all(cfg.solver.seed)
        self.dataset = build_train_dataset(cfg)
        sync_classes(cfg, self.dataset.class_names, self.dataset.category_ids)

        from maskrcnn.modeling import build_model

        self.model = build_model(cfg).to(self.device)
        if resume_from is None:
            if cfg.model.backbone.weights:
                _load_trunk_weights(self.model, cfg.model.backbone.weights)
            if weights:
                from maskrcnn.zoo import resolve_weights

                weights = str(resolve_weights(weights)[0])  # a zoo name: its fetched file
                report = load_weights(self.model, weights, strict=True, reinit_mismatched_classes=True)
                note = f"; re-initialised {', '.join(report.reinitialized)}" if report.reinitialized else ""
                log.info("model initialised from %s%s", weights, note)
        elif weights:
            log.info("--weights ignored: resuming from %s", resume_from)
        if s.sync_bn and self.world_size > 1:
            self._convert_sync_bn()

        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.solver)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.iteration = 0
        self.train_seconds = 0.0  # summed over resumed runs, for solver.max_minutes
        self.last_checkpoint: Path | None = None
        self.saved_iteration = 0  # the iteration last_checkpoint holds
        self.nonfinite_in_a_row = 0  # solver.nonfinite=skip: consecutive skipped updates
        self.nonfinite_skipped = 0  # ... and all of them in this session
        self.val_dataset: Any = None  # built at the first evaluation
        rank_rng_restored = False
        if resume_from is not None:
            rank_rng_restored = self._restore(resume_from)
        self.train_model: nn.Module = self.model  # what the loop calls: the model, or DDP around it
        if self.world_size > 1:
            if not rank_rng_restored and self.rank > 0:
                seed_all(_rank_seed(s.seed, self.rank, self.iteration))
            from torch.nn.parallel import DistributedDataParallel

            # Broadcasts rank 0's parameters and buffers, then averages gradients during backward.
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.main:
            cfg.save(self.out / "config.yaml")

    # -- setup --

    def _agreed_resume_path(self, resume: bool) -> Path | None:
        """Return the checkpoint to resume from: rank 0 prepares the run directory and decides for all."""
        if self.world_size == 1:
            return self._prepare_output_dir(resume)
        outcome: tuple[Path | None, Exception | None] = (None, None)
        if self.main:
            try:
                outcome = (self._prepare_output_dir(resume), None)
            except UserError as e:
                outcome = (None, e)
        path, error = du.broadcast_object(outcome)
        if error is not None:
            raise du.on_all_ranks(error)
        return path

    def _convert_sync_bn(self) -> None:
        """Turn the model's BatchNorm layers into SyncBatchNorm (statistics over all processes' images)."""
        if self.device.type != "cuda":
            raise UserError("solver.sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); "
                            "train on the CPU with solver.sync_bn=false, or use GroupNorm (model.backbone.norm=gn)")
        count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if count == 0:
            log.info("solver.sync_bn: the model has no (trainable) BatchNorm layers; nothing to synchronise")
            return
        self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        log.info("solver.sync_bn: %d BatchNorm layers synchronised across %d processes", count, self.world_size)

    def _prepare_output_dir(self, resume: bool) -> Path | None:
        """Create the run directory, clear temp files of killed saves; return the checkpoint to resume."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.ckpt_dir.glob(f".*{TMP_SUFFIX}"):
            log.info("removing %s left by an interrupted save", tmp.name)
            tmp.unlink(missing_ok=True)
        existing = list_checkpoints(self.ckpt_dir)
        if not resume:
            if existing:
                raise UserError(
                    f"'{self.out}' already holds checkpoints; pass --resume to continue that run, "
                    "or choose another output directory (--out)"
                )
            return None
        path = latest_checkpoint(self.ckpt_dir)
        if path is None and existing:
            raise TrainingError(
                f"--resume: none of the {len(existing)} checkpoints in '{self.ckpt_dir}' is complete "
                f"({', '.join(p.name for p in existing[:5])}: truncated or corrupt); move them away to start "
                "from scratch, or copy an intact checkpoint there"
            )
        if path is None:
            log.warning("--resume: no checkpoint in %s yet; starting from scratch", self.ckpt_dir)
        return path

    def _restore(self, path: Path) -> bool:
        """Load model, optimizer, scheduler, scaler, RNG and progress counters from `path`.

        Returns True when the checkpoint held this rank's own RNG state (a distributed run with
        the same number of processes); every rank loads the same file, the one rank 0 chose.
        """
        if not path.is_file():
            raise TrainingError(
                f"rank {self.rank} cannot read '{path}', the checkpoint rank 0 resumes from; with several "
                "machines, output_dir must be on a filesystem they all share")
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
            first = lines[1] if len(lines) > 1 else lines[0]  # skip torch's "Error(s) in loading..." header
            raise UserError(
                f"checkpoint '{path}' does not fit the configured model ({first[:200]}); resume with the "
                f"config the run started with (saved as {self.out / 'config.yaml'})"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        rank_states = state.get("rng_ranks") or []
        own = len(rank_states) == self.world_size
        set_rng_state(rank_states[self.rank] if own else state["rng"])
        self.last_checkpoint = path
        self.saved_iteration = self.iteration
        if self.scheduler.lr_lambdas[0].base_max_iter != self.cfg.solver.max_iter:
            # solver.max_iter changed on resume (e.g. to extend a run): follow the new config.
            self.scheduler.lr_lambdas[0] = WarmupSchedule(self.cfg.solver)
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return own

    # -- checkpoints --

    def _state(self, rank_rngs: list[Any] | None = None) -> dict[str, Any]:
        extra = {"rng_ranks": rank_rngs, "world_size": self.world_size} if rank_rngs else {}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            **extra,
        }

    def _last_good(self) -> str:
        """Return where the user's progress is safe, for error messages."""
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.last_checkpoint} (iteration {self.saved_iteration})"

    def save(self, final: bool = False) -> Path:
        """Write model_final.pth or model_<iter>.pth, and prune old periodic checkpoints.

        A failed write (disk full, quota, I/O error) leaves no temp file and no damaged checkpoint
        behind and stops the run with a TrainingError: continuing would only pile up unsaved work.
        """
        name = "model_final.pth" if final else f"model_{self.iteration:07d}.pth"
        # Distributed: every rank gets here at the same iteration; rank 0 writes, with every rank's RNG.
        rank_rngs = du.gather_object(rng_state()) if self.world_size > 1 else None
        if not self.main:
            self.last_checkpoint, self.saved_iteration = self.ckpt_dir / name, self.iteration
            return self.ckpt_dir / name
        try:
            path = save_checkpoint(self.ckpt_dir / name, self._state(rank_rngs))
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            hint = "free some disk space" if e.errno in full else "check the output directory"
            raise TrainingError(
                f"cannot write checkpoint '{self.ckpt_dir / name}': {reason}; training stopped at iteration "
                f"{self.iteration} and {self._last_good()}; {hint}, then continue with --resume"
            ) from None
        self.last_checkpoint = path
        self.saved_iteration = self.iteration
        periodic = sorted(p for p in self.ckpt_dir.glob("model_*.pth") if p.stem[6:].isdigit())
        for old in periodic[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    # -- evaluation --

    def evaluate(self, tag: str, metrics: MetricsWriter | None) -> dict[str, Any] | None:
        """Evaluate on `cfg.data.val` into eval/<tag>/ and log the metrics (None without a val set).

        Distributed: every rank predicts its share of the images; rank 0 scores and writes them.
        """
        if not self.cfg.data.val:
            return None
        try:
            from maskrcnn.engine.evaluator import evaluate
        except ImportError as e:
            log.warning("evaluation skipped: %s", e)
            return None
        if self.val_dataset is None:
            from maskrcnn.data.coco import CocoDataset, parse_data_spec

            ann, image_dir = parse_data_spec(self.cfg.data.val)
            self.val_dataset = CocoDataset(ann, image_dir, filter_empty=False, train=False,
                                           max_pixels=self.cfg.input.max_pixels,
                                           cache_dir=self.cfg.data.cache_dir or None)
        # Full precision: evaluation numbers should not depend on the training-time AMP setting.
        result = evaluate(self.model, self.val_dataset, self.out / "eval" / tag,
                          max_images=self.cfg.test.max_images, progress=sys.stderr.isatty() and self.main)
        self.model.train()
        if metrics is None:  # ranks > 0: rank 0 logs
            return result
        numbers = _flatten_numbers(result)
        metrics.write({"iter": self.iteration, "eval": result}, {f"val/{k}": v for k, v in numbers.items()})
        summary = ", ".join(f"{k} {v:.1f}" for k, v in numbers.items() if k.count("/") <= 1 and "AP" in k)
        log.info("eval at iteration %d: %s", self.iteration, summary[:300] or "done")
        return result

    # -- the loop --

    def _nonfinite(self, what: str, detail: str) -> None:
        """Handle a non-finite loss or gradient: raise TrainingError, or count a skipped update (solver.nonfinite)."""
        s = self.cfg.solver
        iteration = self.iteration + 1
        advice = ("Try a lower solver.base_lr, a longer solver.warmup_iters or solver.clip_grad_norm"
                  + ("" if s.nonfinite == "skip" else ", or solver.nonfinite=skip to skip such updates"))
        if s.nonfinite == "skip":
            self.nonfinite_in_a_row += 1
            self.nonfinite_skipped += 1
            if self.nonfinite_in_a_row <= s.max_nonfinite_skips:
                log.warning("%s at iteration %d: %s; update skipped (%d in a row, at most "
                            "solver.max_nonfinite_skips=%d; %d in this run)", what, iteration, detail,
                            self.nonfinite_in_a_row, s.max_nonfinite_skips, self.nonfinite_skipped)
                return
            raise du.on_all_ranks(TrainingError(
                f"{what} at iteration {iteration}: {detail}; {self.nonfinite_in_a_row} updates in a row skipped, more "
                f"than solver.max_nonfinite_skips={s.max_nonfinite_skips}; training stopped and {self._last_good()}. "
                + advice
            ))
        raise du.on_all_ranks(TrainingError(f"{what} at iteration {iteration}: {detail}; training stopped and "
                                            f"{self._last_good()}. {advice}"))

    def _first_nonfinite_grad(self) -> str:
        """Return the name of the first parameter whose gradient holds a NaN or inf."""
        for name, p in self.model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return name
        return "?"

    def _step(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, float]:
        """Run one forward/backward/update; return the loss values.

        A non-finite loss (checked before backward) or gradient (checked before clipping and the
        update) raises TrainingError naming the loss term or parameter, or, with
        solver.nonfinite=skip, leaves the weights and optimizer state as they were (the schedule
        and the data stream still advance). Under fp16 the GradScaler deals with overflowing
        gradients itself, as usual.
        """
        s = self.cfg.solver
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = _to_device(targets, self.device)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            losses = self.train_model(images, targets)
        total = sum(losses.values())
        loss_values = torch.stack([v.detach().float() for v in losses.values()])
        if self.world_size > 1:
            # The mean over ranks (what DDP's averaged gradients descend): every rank logs and checks
            # the same numbers, so a non-finite loss anywhere stops or skips the step everywhere.
            loss_values = du.all_reduce_sum(loss_values) / self.world_size
        values = dict(zip(losses, loss_values.tolist()))
        values["loss"] = sum(values.values())
        if s.nonfinite == "skip":
            values["nonfinite_skipped"] = float(self.nonfinite_skipped)
        self.optimizer.zero_grad(set_to_none=True)
        bad = [f"{k}={v:.4g}" for k, v in values.items() if k != "loss" and not math.isfinite(v)]
        if bad:
            self._nonfinite("non-finite loss", ", ".join(bad))
            return self._skipped(values)
        self.scaler.scale(total).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler.is_enabled():  # fp16: inf gradients are expected; the scaler skips those steps
            if s.clip_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm))
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
            values["grad_norm"] = float(norm)
            if not math.isfinite(values["grad_norm"]):
                name = self._first_nonfinite_grad()
                self._nonfinite("non-finite gradient", f"parameter '{name}' (loss {values['loss']:.4g})")
                self.optimizer.zero_grad(set_to_none=True)
                return self._skipped(values)
            if s.clip_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, s.clip_grad_norm, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.nonfinite_in_a_row = 0
        return values

    def _skipped(self, values: dict[str, float]) -> dict[str, float]:
        """Finish an iteration whose update was skipped: the schedule still advances with the data."""
        # The forward pass itself may have written NaNs into buffers (BatchNorm running statistics);
        # skipping the update cannot undo that, so such a step cannot be skipped safely.
        for name, buf in self.model.named_buffers():
            if buf.is_floating_point() and not torch.isfinite(buf).all():
                raise TrainingError(
                    f"non-finite values reached buffer '{name}' at iteration {self.iteration + 1}, so the step "
                    f"cannot be skipped; training stopped and {self._last_good()}. Try a lower solver.base_lr, "
                    "a longer solver.warmup_iters or solver.clip_grad_norm"
                )
        self.scheduler.step()
        values["nonfinite_skipped"] = float(self.nonfinite_skipped)
        return values

    def run(self) -> Path:
        """Train to the end (or budget/signal), checkpointing and evaluating on the way; return the run dir."""
        from tqdm import tqdm

        from maskrcnn.data.loader import DataError, build_train_loader

        cfg, s = self.cfg, self.cfg.solver
        schedule: WarmupSchedule = self.scheduler.lr_lambdas[0]
        metrics = MetricsWriter(self.out, self.iteration) if self.main else None
        loader = build_train_loader(
            self.dataset,
            batch_size=s.ims_per_batch,
            num_workers=cfg.data.num_workers,
            aspect_ratio_grouping=cfg.data.aspect_ratio_grouping,
            seed=s.seed,
            start_iter=self.iteration,
            max_bad_images=cfg.data.max_bad_images,
            max_worker_restarts=cfg.data.max_worker_restarts,
            rank=self.rank,
            world_size=self.world_size,
        )
        where = str(self.device)
        if self.world_size > 1:
            where = (f"{self.world_size} processes ({torch.distributed.get_backend()}, {self.device.type}), "
                     f"{s.ims_per_batch // self.world_size} of the {s.ims_per_batch} images of a batch each")
        precision = f"{str(self.dtype).removeprefix('torch.')} autocast" if self.dtype else "float32"
        budget = s.max_minutes * 60
        length = f"{schedule.max_iter} iterations"
        if budget > 0:
            # The learning rate follows the elapsed share of the budget (see WarmupSchedule), and the run
            # stops when the budget is spent, so no speed estimate is needed and none can go wrong.
            schedule.budget_fraction = self.train_seconds / budget
            length = (f"{s.max_minutes:g} minutes (solver.max_minutes; schedule on the elapsed share of the "
                      f"budget, at most {schedule.max_iter} iterations)")
        log.info("training %s on %s (%s) for %s (from iteration %d), output %s",
                 type(self.model).__name__, where, precision, length, self.iteration, self.out)
        self.train_model.train()
        interactive = sys.stderr.isatty() and self.main
        bar = tqdm(total=schedule.max_iter, initial=self.iteration, desc="train", unit="it",
                   dynamic_ncols=True, disable=not interactive)
        smooth: deque[dict[str, float]] = deque(maxlen=20)  # progress-bar medians
        window: list[dict[str, float]] = []  # everything since the last log line
        start_iter, session_start = self.iteration, time.perf_counter()
        seconds_before = self.train_seconds
        stopped_by = None
        try:
            with _stop_on_signals() as stop:
                while self.iteration < schedule.max_iter:
                    t0 = time.perf_counter()
                    data_error = None
                    try:
                        images, targets = next(loader)
                    except DataError as e:
                        if self.world_size == 1:
                            self._stop_for_data(e)
                        data_error = e
                    if self.world_size > 1:
                        signum, agreed_seconds = self._agree(stop["signal"], data_error,
                                                             seconds_before + time.perf_counter() - session_start)
                        if signum:
                            stopped_by = signal.Signals(signum).name
                            break
                    data_time = time.perf_counter() - t0
                    if budget > 0:  # the LR of the next iteration is set at the end of this step
                        elapsed = (agreed_seconds if self.world_size > 1
                                   else seconds_before + time.perf_counter() - session_start)
                        schedule.budget_fraction = elapsed / budget
                    values = self._step(images, targets)
                    self.iteration += 1
                    now = time.perf_counter()
                    # Distributed: rank 0's clock, as of this iteration's start, so all ranks decide alike.
                    self.train_seconds = (agreed_seconds if self.world_size > 1
                                          else seconds_before + (now - session_start))
                    values.update(time=now - t0, data_time=data_time, lr=self.optimizer.param_groups[0]["lr"])
                    smooth.append(values)
                    window.append(values)

                    done_here = self.iteration - start_iter
                    sec_per_iter = (now - session_start) / done_here
                    if budget > 0:
                        eta = max(0.0, budget - self.train_seconds)
                        bar.total = self.iteration + round(eta / sec_per_iter)
                    else:
                        eta = sec_per_iter * (schedule.max_iter - self.iteration)
                    bar.set_postfix_str(_postfix(smooth), refresh=False)
                    bar.update(1)

                    if self.iteration % s.log_period == 0 or self.iteration in (1, schedule.max_iter):
                        if metrics is not None:
                            self._log(metrics, window, sec_per_iter, eta, say=not interactive)
                        window = []
                    finished = self.iteration >= schedule.max_iter
                    if not finished and budget > 0 and self.train_seconds >= budget:
                        schedule.rescale(self.iteration)  # the run, as saved, is complete
                        break
                    if stop["signal"] and self.world_size == 1:  # distributed: agreed on at the next start
                        stopped_by = stop["signal"]
                        break
                    if not finished and self.iteration % s.checkpoint_period == 0:
                        self.save()
                    if not finished and s.eval_period > 0 and self.iteration % s.eval_period == 0:
                        self.evaluate(f"iter_{self.iteration:07d}", metrics)
            bar.close()
            if window and metrics is not None:  # stopped between log periods: the last iterations still count
                self._log(metrics, window, sec_per_iter, 0.0, say=not interactive)
            if stopped_by:
                loader.close()
                path = self.save()
                log.warning("stopped by %s at iteration %d; saved %s; continue with --resume",
                            stopped_by, self.iteration, path)
                raise du.on_all_ranks(TrainingInterrupted(stopped_by, path))
            path = self.save(final=True)
            log.info("saved %s (iteration %d, %s of training)", path, self.iteration,
                     _format_seconds(self.train_seconds))
            if budget > 0:
                log.info("time budget: %s of solver.max_minutes=%g spent (%.0f%%), %d iterations at %.2f s each",
                         _format_seconds(self.train_seconds), s.max_minutes, 100 * self.train_seconds / budget,
                         self.iteration, self.train_seconds / max(1, self.iteration))
            self.evaluate("final", metrics)
        finally:
            loader.close()
            bar.close()
            if metrics is not None:
                metrics.close()
                self._plot()
        return self.out

    def _agree(self, signal_name: str | None, data_error: Exception | None, seconds: float) -> tuple[int, float]:
        """Return (signal number or 0, rank 0's training seconds), the same on every rank.

        One small all-reduce (max) before each step: a SIGINT/SIGTERM that reached any rank stops
        all of them before this step, and an unreadable batch on any rank stops them all with a
        checkpoint and every failing rank's message (DataError), instead of leaving the others
        waiting in the gradient all-reduce.
        """
        flags = torch.tensor([float(signal.Signals[signal_name]) if signal_name else 0.0,
                              1.0 if data_error is not None else 0.0,
                              seconds if self.main else 0.0], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signum, data_failed, agreed_seconds = flags.tolist()
        if data_failed:
            messages = du.all_gather_object(str(data_error) if data_error is not None else None)
            text = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
            from maskrcnn.data.loader import DataError

            self._stop_for_data(DataError(text))
        return int(signum), agreed_seconds

    def _stop_for_data(self, error: Exception) -> None:
        """Save the (healthy) model and raise TrainingError: the data cannot be loaded any further."""
        where = self._last_good()
        if self.iteration > self.saved_iteration:
            where = f"saved {self.save()} (iteration {self.iteration})"
        raise du.on_all_ranks(TrainingError(
            f"{error}; training stopped at iteration {self.iteration} and {where}; continue with --resume "
            "once the data is fixed"
        ))

    def _log(self, metrics: MetricsWriter, window: list, sec_per_iter: float, eta: float, say: bool) -> None:
        """Write the window's mean losses to metrics.jsonl/TensorBoard (and stdout when no bar is shown)."""
        keys = [k for k in window[-1] if k != "lr"]
        means = {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}
        record = {"iter": self.iteration, "lr": window[-1]["lr"], **means, "eta_seconds": round(eta, 1)}
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars["train/lr"] = window[-1]["lr"]
        metrics.write(record, scalars)
        if say:
            schedule: WarmupSchedule = self.scheduler.lr_lambdas[0]
            where = (f"{self.iteration} ({100 * min(1.0, schedule.budget_fraction):.0f}% of the time budget)"
                     if schedule.budget_fraction is not None else f"{self.iteration}/{schedule.max_iter}")
            losses = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items() if k.startswith("loss_"))
            print(f"iter {where}  loss {means['loss']:.3f} ({losses})  "
                  f"lr {record['lr']:.3g}  {sec_per_iter:.2f} s/it  eta {_format_seconds(eta)}", flush=True)

    def _plot(self) -> None:
        """Draw loss_curve.png from metrics.jsonl (skipped, with a note, when plotting is unavailable)."""
        try:
            from maskrcnn.visualize import plot_loss_curve

            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        except Exception as e:  # noqa: BLE001 - a missing plot must not fail a finished run
            log.warning("loss curve not drawn: %s", e)


def _postfix(window: deque) -> str:
    """Return the progress-bar text: median-smoothed total loss, each loss, and the LR."""
    med = {k: float(np.median([w[k] for w in window])) for k in window[-1] if k.startswith("loss")}
    parts = [f"loss {med.pop('loss'):.3f}"] + [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in med.items()]
    return " ".join(parts) + f" lr {window[-1]['lr']:.2g}"


def train(cfg: Config, resume: bool = False, weights: str | None = None) -> Path:
    """Train the model described by `cfg`; return the output directory.

    `resume` continues from the newest valid checkpoint in `cfg.output_dir/checkpoints`;
    `weights` initialises the whole model from a zoo model name, a checkpoint or a state dict for
    fine-tuning (class-dependent layers are re-initialised when the number of classes differs).
    """
    s = cfg.solver
    # Under torchrun: join the process group, and make a failure here end the other ranks too.
    with du.session(resolve_device(cfg.device), s.dist_timeout_minutes, s.dist_heartbeat_timeout):
        return Trainer(cfg, resume=resume, weights=weights).run()
