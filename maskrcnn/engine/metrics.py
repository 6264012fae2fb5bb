"""What a training run reports: metrics.jsonl and TensorBoard, the progress bar's text, log lines, the loss curve."""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from maskrcnn.engine.solver import WarmupSchedule
from maskrcnn.fileio import atomic_write_text

log = logging.getLogger(__name__)

# The stats an evaluation's log line shows for each IoU type.
LOGGED_APS = ("AP", "AP50", "AP75", "AP90")


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
            f.write(json.dumps(finite_or_none(record)) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["iter"])

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()

    def write_eval(self, iteration: int, result: dict[str, Any]) -> None:
        """Record an evaluation's metrics at `iteration` and log its AP numbers in one line."""
        numbers = flatten_numbers(result)
        self.write({"iter": iteration, "eval": result}, {f"val/{k}": v for k, v in numbers.items()})
        # Per IoU type (bbox, segm, boundary, keypoints) the headline APs; the rest is in metrics.jsonl.
        summary = ", ".join(f"{k} {v:.1f}" for k, v in numbers.items()
                            if k.count("/") == 1 and k.split("/")[1] in LOGGED_APS)
        log.info("eval at iteration %d: %s", iteration, summary or "done")

    def write_window(self, iteration: int, schedule: WarmupSchedule, window: list[dict[str, float]],
                     sec_per_iter: float, eta: float, say: bool) -> None:
        """Write the window's mean losses to metrics.jsonl/TensorBoard (and stdout when no bar is shown)."""
        keys = [k for k in window[-1] if k != "lr"]
        means = {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}
        record = {"iter": iteration, "lr": window[-1]["lr"], **means, "eta_seconds": round(eta, 1)}
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars["train/lr"] = window[-1]["lr"]
        self.write(record, scalars)
        if say:
            where = (f"{iteration} ({100 * min(1.0, schedule.budget_fraction):.0f}% of the time budget)"
                     if schedule.budget_fraction is not None else f"{iteration}/{schedule.max_iter}")
            losses = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items() if k.startswith("loss_"))
            print(f"iter {where}  loss {means['loss']:.3f} ({losses})  "
                  f"lr {record['lr']:.3g}  {sec_per_iter:.2f} s/it  eta {format_seconds(eta)}", flush=True)


def progress_postfix(window: deque) -> str:
    """Return the progress-bar text: median-smoothed total loss, each loss, and the LR."""
    med = {k: float(np.median([w[k] for w in window])) for k in window[-1] if k.startswith("loss")}
    parts = [f"loss {med.pop('loss'):.3f}"] + [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in med.items()]
    return " ".join(parts) + f" lr {window[-1]['lr']:.2g}"


def plot_loss_curve(out: Path) -> None:
    """Draw out/loss_curve.png from out/metrics.jsonl (skipped, with a note, when plotting is unavailable)."""
    try:
        from maskrcnn.visualize import plot_loss_curve as plot

        plot(out / "metrics.jsonl", out / "loss_curve.png")
    except Exception as e:  # noqa: BLE001 - a missing plot must not fail a finished run
        log.warning("loss curve not drawn: %s", e)


def format_seconds(seconds: float) -> str:
    """Return a duration as H:MM:SS."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def flatten_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Return the numeric leaves of a nested metrics dict as {"a/b": value}."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def finite_or_none(value: Any) -> Any:
    """Return `value` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
