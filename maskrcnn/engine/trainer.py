"""The training loop: one `Trainer` runs data, model, optimizer and schedule to the end, checkpointing and
evaluating on the way. The policies it follows live beside it, one file each: `precision` (device and
autocast), `train_setup` (data, classes, initial weights, world size), `checkpointing` (resume, saves,
rotation), `rng`, `nonfinite` (NaN/inf losses), `budget` (solver.max_minutes), `stopping` (SIGINT/SIGTERM,
agreeing across ranks) and `metrics` (metrics.jsonl, TensorBoard, log lines, the loss curve).

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

import logging
import math
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from maskrcnn import distributed as du
from maskrcnn.checkpoint import load_weights
from maskrcnn.config import Config
from maskrcnn.engine.budget import TimeBudget
from maskrcnn.engine.checkpointing import RunCheckpoints, load_training_state
from maskrcnn.engine.fit_to_data import fit_to_data
from maskrcnn.engine.metrics import MetricsWriter, format_seconds, plot_loss_curve, progress_postfix
from maskrcnn.engine.nonfinite import NonFinitePolicy, check_buffers, first_nonfinite_grad
from maskrcnn.engine.precision import amp_dtype, resolve_device
from maskrcnn.engine.rng import rank_seed, rng_state, seed_all, set_rng_state
from maskrcnn.engine.stopping import TrainingInterrupted, agree_across_ranks, stop_on_signals
from maskrcnn.engine.solver import WarmupSchedule, build_lr_scheduler, build_optimizer
from maskrcnn.engine.train_setup import (
    apply_reference_world_size,
    build_train_dataset,
    set_augmentation,
    convert_sync_bn,
    load_trunk_weights,
    sync_classes,
)
from maskrcnn.errors import TrainingError, UserError

log = logging.getLogger(__name__)


class Trainer:
    """One training run; `run()` trains from scratch or from the latest checkpoint to the end."""

    def __init__(self, cfg: Config, resume: bool = False, weights: str | None = None,
                 keep: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.checkpoints = RunCheckpoints(self.out)
        s = cfg.solver
        # Joins torchrun's process group when launched by it (a no-op otherwise, or when joined already).
        self.device = du.setup(resolve_device(cfg.device), s.dist_timeout_minutes, s.dist_heartbeat_timeout)
        self.rank, self.world_size = du.get_rank(), du.get_world_size()
        self.main = self.rank == 0
        self.dtype = amp_dtype(cfg.solver.amp, self.device)
        self.nonfinite = NonFinitePolicy(cfg.solver)
        apply_reference_world_size(cfg, self.world_size)
        if s.ims_per_batch % self.world_size:
            raise UserError(f"solver.ims_per_batch={s.ims_per_batch} is the total batch of all {self.world_size} "
                            f"processes and must be a multiple of {self.world_size}")

        resume_from = self.checkpoints.agreed_resume_path(resume, self.world_size)
        seed_all(cfg.solver.seed)
        self.dataset = build_train_dataset(cfg)
        sync_classes(cfg, self.dataset.class_names, self.dataset.category_ids)
        if cfg.data.fit_to_data:  # scale, crop, anchors and counts from the data, before the model is built
            fit_to_data(cfg, self.dataset, keep)
            set_augmentation(self.dataset, cfg.input)

        from maskrcnn.modeling import build_model

        self.model = build_model(cfg).to(self.device)
        if resume_from is None:
            if cfg.model.backbone.weights:
                load_trunk_weights(self.model, cfg.model.backbone.weights)
            if weights:
                from maskrcnn.zoo import resolve_weights

                weights = str(resolve_weights(weights)[0])  # a zoo name: its fetched file
                report = load_weights(self.model, weights, strict=True, reinit_mismatched_classes=True)
                note = f"; re-initialised {', '.join(report.reinitialized)}" if report.reinitialized else ""
                log.info("model initialised from %s%s", weights, note)
        elif weights:
            log.info("--weights ignored: resuming from %s", resume_from)
        if s.sync_bn and self.world_size > 1:
            self.model = convert_sync_bn(self.model, self.device.type, self.world_size)

        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.solver)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.iteration = 0
        self.train_seconds = 0.0  # summed over resumed runs, for solver.max_minutes
        self.val_dataset: Any = None  # built at the first evaluation
        rank_rng_restored = False
        if resume_from is not None:
            rank_rng_restored = self._restore(resume_from)
        self.train_model: nn.Module = self.model  # what the loop calls: the model, or DDP around it
        if self.world_size > 1:
            if not rank_rng_restored and self.rank > 0:
                seed_all(rank_seed(s.seed, self.rank, self.iteration))
            from torch.nn.parallel import DistributedDataParallel

            # Broadcasts rank 0's parameters and buffers, then averages gradients during backward.
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.main:
            cfg.save(self.out / "config.yaml")

    # -- checkpoints --

    def _restore(self, path: Path) -> bool:
        """Load model, optimizer, scheduler, scaler, RNG and progress counters from `path`.

        Returns True when the checkpoint held this rank's own RNG state (a distributed run with
        the same number of processes); every rank loads the same file, the one rank 0 chose.
        """
        state = load_training_state(path, self.model, self.optimizer, self.scheduler, self.scaler, self.rank,
                                    self.out / "config.yaml")
        self.iteration = int(state["iteration"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        rank_states = state.get("rng_ranks") or []
        own = len(rank_states) == self.world_size
        set_rng_state(rank_states[self.rank] if own else state["rng"])
        self.checkpoints.mark_saved(path, self.iteration)
        if self.scheduler.lr_lambdas[0].base_max_iter != self.cfg.solver.max_iter:
            # solver.max_iter changed on resume (e.g. to extend a run): follow the new config.
            self.scheduler.lr_lambdas[0] = WarmupSchedule(self.cfg.solver)
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return own

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

    def save(self, final: bool = False) -> Path:
        """Write model_final.pth or model_<iter>.pth (old periodic ones pruned); a failed write raises TrainingError."""
        name = "model_final.pth" if final else f"model_{self.iteration:07d}.pth"
        # Distributed: every rank gets here at the same iteration; rank 0 writes, with every rank's RNG.
        rank_rngs = du.gather_object(rng_state()) if self.world_size > 1 else None
        if not self.main:
            return self.checkpoints.mark_saved(self.checkpoints.dir / name, self.iteration)
        return self.checkpoints.write(name, self._state(rank_rngs), self.iteration)

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
        metrics.write_eval(self.iteration, result)
        return result

    # -- the loop --

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
        targets = to_device(targets, self.device)
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
        if self.nonfinite.skip:
            values["nonfinite_skipped"] = float(self.nonfinite.skipped)
        self.optimizer.zero_grad(set_to_none=True)
        bad = [f"{k}={v:.4g}" for k, v in values.items() if k != "loss" and not math.isfinite(v)]
        if bad:
            self.nonfinite.handle("non-finite loss", ", ".join(bad), self.iteration + 1, self.checkpoints.last_good())
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
                name = first_nonfinite_grad(self.model)
                self.nonfinite.handle("non-finite gradient", f"parameter '{name}' (loss {values['loss']:.4g})",
                                      self.iteration + 1, self.checkpoints.last_good())
                self.optimizer.zero_grad(set_to_none=True)
                return self._skipped(values)
            if s.clip_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, s.clip_grad_norm, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.nonfinite.stepped()
        return values

    def _skipped(self, values: dict[str, float]) -> dict[str, float]:
        """Finish an iteration whose update was skipped: the schedule still advances with the data."""
        check_buffers(self.model, self.iteration + 1, self.checkpoints.last_good())
        self.scheduler.step()
        values["nonfinite_skipped"] = float(self.nonfinite.skipped)
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
        budget = TimeBudget(s.max_minutes, schedule, self.train_seconds)
        log.info("training %s on %s (%s) for %s (from iteration %d), output %s",
                 type(self.model).__name__, where, precision, budget.describe(), self.iteration, self.out)
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
            with stop_on_signals() as stop:
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
                        signum, failure, agreed_seconds = agree_across_ranks(
                            stop["signal"], data_error, seconds_before + time.perf_counter() - session_start,
                            self.device)
                        if failure:
                            self._stop_for_data(DataError(failure))
                        if signum:
                            stopped_by = signal.Signals(signum).name
                            break
                    data_time = time.perf_counter() - t0
                    if budget.on:  # the LR of the next iteration is set at the end of this step
                        budget.advance(agreed_seconds if self.world_size > 1
                                       else seconds_before + time.perf_counter() - session_start)
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
                    eta = budget.eta(self.iteration, self.train_seconds, sec_per_iter)
                    if budget.on:
                        bar.total = self.iteration + round(eta / sec_per_iter)
                    bar.set_postfix_str(progress_postfix(smooth), refresh=False)
                    bar.update(1)

                    if self.iteration % s.log_period == 0 or self.iteration in (1, schedule.max_iter):
                        if metrics is not None:
                            metrics.write_window(self.iteration, schedule, window, sec_per_iter, eta,
                                                 say=not interactive)
                        window = []
                    finished = self.iteration >= schedule.max_iter
                    if not finished and budget.spent(self.train_seconds):
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
                metrics.write_window(self.iteration, schedule, window, sec_per_iter, 0.0, say=not interactive)
            if stopped_by:
                loader.close()
                path = self.save()
                log.warning("stopped by %s at iteration %d; saved %s; continue with --resume",
                            stopped_by, self.iteration, path)
                raise du.on_all_ranks(TrainingInterrupted(stopped_by, path))
            path = self.save(final=True)
            log.info("saved %s (iteration %d, %s of training)", path, self.iteration,
                     format_seconds(self.train_seconds))
            budget.report(self.train_seconds, self.iteration)
            self.evaluate("final", metrics)
        finally:
            loader.close()
            bar.close()
            if metrics is not None:
                metrics.close()
                plot_loss_curve(self.out)
        return self.out

    def _stop_for_data(self, error: Exception) -> None:
        """Save the (healthy) model and raise TrainingError: the data cannot be loaded any further."""
        where = self.checkpoints.last_good()
        if self.iteration > self.checkpoints.saved_iteration:
            where = f"saved {self.save()} (iteration {self.iteration})"
        raise du.on_all_ranks(TrainingError(
            f"{error}; training stopped at iteration {self.iteration} and {where}; continue with --resume "
            "once the data is fixed"
        ))


def train(cfg: Config, resume: bool = False, weights: str | None = None, keep: Iterable[str] = ()) -> Path:
    """Train the model described by `cfg`; return the output directory.

    `resume` continues from the newest valid checkpoint in `cfg.output_dir/checkpoints`;
    `weights` initialises the whole model from a zoo model name, a checkpoint or a state dict for
    fine-tuning (class-dependent layers are re-initialised when the number of classes differs).
    `keep`: config keys the user set (KEY=VALUE overrides) that `data.fit_to_data` must not change.
    """
    s = cfg.solver
    # Under torchrun: join the process group, and make a failure here end the other ranks too.
    with du.session(resolve_device(cfg.device), s.dist_timeout_minutes, s.dist_heartbeat_timeout):
        return Trainer(cfg, resume=resume, weights=weights, keep=keep).run()


def to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Move the tensors (and InstanceMasks) of each target dict to `device` (other values pass through)."""
    from maskrcnn.instance_masks import InstanceMasks

    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if torch.is_tensor(v) or isinstance(v, InstanceMasks) else v

    return [{k: move(v) for k, v in t.items()} for t in targets]
