"""Kill a real `maskrcnn train` process with SIGKILL mid-run, resume it, and check it ends where it should."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskrcnn.checkpoint import latest_checkpoint, load_checkpoint
from maskrcnn.data.shapes import make_shapes
from support import tiny_train_config

MAX_ITER = 16
PERIOD = 3


def _config(path: Path, train: tuple[Path, Path], max_iter: int, period: int) -> Path:
    solver = {"optimizer": "adamw", "base_lr": 0.0005, "ims_per_batch": 2, "max_iter": max_iter,
              "checkpoint_period": period, "warmup_iters": 2, "log_period": 2, "clip_grad_norm": 5.0}
    return tiny_train_config(path, train, solver)


def _train(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # cores are shared in CI
    cmd = [sys.executable, "-m", "maskrcnn.cli", "train", "--config", str(config), "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _periodic(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("model_*.pth") if p.stem[6:].isdigit())


def test_sigkill_then_resume_reaches_max_iter(tmp_path):
    ann, images = make_shapes(tmp_path / "data", num_train=8, num_val=0, seed=0, image_size=64,
                              max_shapes=2, shape_size=(12, 32))["train"]
    config = _config(tmp_path / "tiny.yaml", (ann, images), MAX_ITER, PERIOD)
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"

    proc = _train(config, out)
    deadline = time.monotonic() + 120
    try:
        while len(_periodic(ckpt_dir)) < 2:  # a published name means a complete file (atomic rename)
            if proc.poll() is not None:
                pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no second checkpoint within 120 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(latest_checkpoint(ckpt_dir))["iteration"]
    assert PERIOD * 2 <= killed_at < MAX_ITER
    assert not (ckpt_dir / "model_final.pth").exists()
    # What a kill during a save leaves behind (the kill above may or may not have hit one).
    (ckpt_dir / f".model_{MAX_ITER:07d}.pth.99999.tmp").write_bytes(b"partial")

    resumed = _train(config, out, "--resume")
    log, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, log
    assert "resumed from" in log and f"at iteration {killed_at}" in log

    final = load_checkpoint(ckpt_dir / "model_final.pth")
    assert final["iteration"] == MAX_ITER
    assert final["scheduler"]["last_epoch"] == MAX_ITER
    assert not list(ckpt_dir.glob("*.tmp")) and not list(out.glob("*.tmp"))
    iters = [json.loads(l)["iter"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert iters == sorted(set(iters)) and iters[-1] == MAX_ITER  # killed run's extra lines dropped
    assert (out / "config.yaml").exists()


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """Resuming from a mid-run checkpoint gives bit-identical weights (data order, RNG, schedule)."""
    import shutil

    from maskrcnn.config import load_config
    from maskrcnn.engine.trainer import train

    ann, images = make_shapes(tmp_path / "data", num_train=6, num_val=0, seed=1, image_size=64,
                              max_shapes=2, shape_size=(12, 32))["train"]
    config = _config(tmp_path / "tiny.yaml", (ann, images), 6, 3)
    first = train(load_config(str(config), [f"output_dir={tmp_path / 'a'}"]))
    shutil.copytree(first, tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "model_final.pth").unlink()  # as if killed after iteration 3
    second = train(load_config(str(config), [f"output_dir={tmp_path / 'b'}"]), resume=True)

    a = load_checkpoint(first / "checkpoints" / "model_final.pth")["model"]
    b = load_checkpoint(second / "checkpoints" / "model_final.pth")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
