"""Training under faults: signals, kills, damaged checkpoints, bad data, dead workers, full disks,
non-finite numbers, degenerate targets, and weights that do not fit.

Most runs use a stand-in model (one call per iteration, microseconds) over real shapes data so each
case takes a fraction of a second; the signal cases run a real `maskrcnn train` process.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import maskrcnn
from support import TINY, StandInModel, quick_run_config, tiny_train_config
from maskrcnn import cli
from maskrcnn.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from maskrcnn.config import load_config
from maskrcnn.data.loader import DataError, build_train_loader
from maskrcnn.engine import trainer as trainer_module
from maskrcnn.engine.trainer import train
from maskrcnn.errors import TrainingError

# ---- a stand-in model and a tiny run ------------------------------------------------------------


@pytest.fixture
def fake_cfg(shapes, tmp_path, stand_in_model):
    return quick_run_config(shapes, tmp_path / "run")


def _ckpts(cfg) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---- 1. SIGINT / SIGTERM through the command line -----------------------------------------------

# TINY_TRAIN (support.py) narrower still, on 48-64 px images; training runs until a signal stops it.
NARROW = {"model": {"backbone": {"fpn_channels": 16}, "rpn": {"pre_nms_top_n_train": 50, "post_nms_top_n_train": 25},
                    "box_head": {"fc_dim": 32}, "mask_head": {"conv_dim": 8}},
          "input": {"min_size_train": [48], "max_size_train": 64, "min_size_test": 48, "max_size_test": 64}}
ENDLESS = {"optimizer": "adamw", "base_lr": 0.0005, "ims_per_batch": 2, "max_iter": 100000,
           "checkpoint_period": 100000, "warmup_iters": 2, "log_period": 1}


def _start_train(tmp_path: Path, shapes, name: str, workers: int) -> tuple[subprocess.Popen, Path]:
    config = tiny_train_config(tmp_path / f"{name}.yaml", shapes["train"], ENDLESS, **NARROW,
                               data={"num_workers": workers})
    out = tmp_path / name
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "maskrcnn.cli", "train", "--config", str(config), "--out", str(out)]
    # A session of its own, so a signal can go to the whole process group as Ctrl-C's does.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, out


def test_sigint_and_sigterm_save_a_checkpoint_and_exit_cleanly(tmp_path, shapes):
    # Ctrl-C signals the whole process group, data-loader workers included; `kill` the main process only.
    runs = {
        "SIGINT": (*_start_train(tmp_path, shapes, "int", workers=1), lambda p: os.killpg(p.pid, signal.SIGINT)),
        "SIGTERM": (*_start_train(tmp_path, shapes, "term", workers=0), lambda p: p.send_signal(signal.SIGTERM)),
    }
    try:
        pending = dict(runs)
        deadline = time.monotonic() + 120
        while pending:  # signal each run once it has trained a few iterations
            for name, (proc, out, send) in list(pending.items()):
                metrics = out / "metrics.jsonl"
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                    send(proc)
                    del pending[name]
                elif proc.poll() is not None:
                    pytest.fail(f"{name} run exited early ({proc.returncode}):\n{proc.stdout.read()}")
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.05)
        for name, (proc, out, _) in runs.items():
            log, _ = proc.communicate(timeout=60)
            signum = int(getattr(signal, name))
            assert proc.returncode in (130, 128 + signum), log  # the shell's code for an interrupted program
            assert "Traceback" not in log, log
            found = re.search(rf"stopped by {name} at iteration (\d+); saved (\S+); continue with --resume", log)
            assert found, log
            iteration, path = int(found.group(1)), Path(found.group(2))
            assert path.parent == out / "checkpoints" and path.name == f"model_{iteration:07d}.pth"
            assert load_checkpoint(path)["iteration"] == iteration >= 2
            assert not list(path.parent.glob("*.tmp"))
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ---- 2. a kill during a save ----------------------------------------------------------------------


def test_kill_during_save_leaves_the_previous_checkpoint_for_resume(fake_cfg, caplog):
    cfg = fake_cfg
    train(cfg)
    ckpts = _ckpts(cfg)
    # As if killed while writing model_final.pth: a temp file cut short is all that save left behind.
    final = ckpts / "model_final.pth"
    whole = final.read_bytes()
    final.unlink()
    (ckpts / f".model_final.pth.{os.getpid()}.tmp").write_bytes(whole[: len(whole) // 3])
    assert latest_checkpoint(ckpts) == ckpts / "model_0000004.pth"

    caplog.set_level(logging.INFO)
    train(cfg, resume=True)
    assert "resumed from" in caplog.text and "at iteration 4" in caplog.text
    assert not list(ckpts.glob("*.tmp"))
    assert load_checkpoint(ckpts / "model_final.pth")["iteration"] == 6


# ---- 3. --resume skips damaged checkpoints --------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _wrong_checksum(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-65] + b"0" * 64 + b"\n")  # a well-formed trailer with another digest


@pytest.mark.parametrize("damage,why", [(_truncate, "truncated"), (_flip_bytes, "corrupt"),
                                        (_wrong_checksum, "corrupt")])
def test_resume_picks_the_newest_valid_checkpoint(fake_cfg, caplog, damage, why):
    cfg = fake_cfg
    train(cfg)
    ckpts = _ckpts(cfg)
    assert sorted(p.name for p in ckpts.iterdir()) == ["model_0000002.pth", "model_0000004.pth", "model_final.pth"]
    damage(ckpts / "model_final.pth")
    damage(ckpts / "model_0000004.pth")

    caplog.set_level(logging.INFO)
    train(cfg, resume=True)
    warned = _warnings(caplog)
    for name in ("model_final.pth", "model_0000004.pth"):
        assert any(str(ckpts / name) in w and why in w for w in warned), warned
    assert f"resumed from {ckpts / 'model_0000002.pth'} at iteration 2" in caplog.text
    assert load_checkpoint(ckpts / "model_final.pth")["iteration"] == 6
    assert load_checkpoint(ckpts / "model_0000004.pth")["iteration"] == 4  # rewritten whole


def test_resume_refuses_when_every_checkpoint_is_damaged(fake_cfg):
    cfg = fake_cfg
    train(cfg)
    for path in _ckpts(cfg).iterdir():
        _truncate(path)
    with pytest.raises(TrainingError, match="none of the 3 checkpoints .* is complete") as e:
        train(cfg, resume=True)
    assert "\n" not in str(e.value) and "move them away" in str(e.value)


# ---- 4. unreadable images and dead data-loader workers --------------------------------------------


@pytest.fixture
def broken_data(shapes, tmp_path):
    """A copy of the shapes training set whose second image is a truncated PNG."""
    ann, images = shapes["train"]
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    names = [img["file_name"] for img in json.loads(Path(ann).read_text())["images"]]
    bad = copy / names[1]
    bad.write_bytes(bad.read_bytes()[:60])
    return f"{ann}:{copy}", bad


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_reported_once_and_replaced(fake_cfg, broken_data, caplog, workers):
    cfg = fake_cfg
    cfg.data.train, bad = [broken_data[0]], broken_data[1]
    cfg.data.num_workers = workers
    cfg.solver.max_iter = 9  # three epochs: the bad image comes up three times
    seen = []
    StandInModel.hook = lambda call: None
    original = StandInModel.forward

    def record(self, images, targets=None):
        seen.append(len(images))
        return original(self, images, targets)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StandInModel, "forward", record)
        train(cfg)
    assert seen == [2] * 9  # every batch full: another image took the bad one's place
    warned = [w for w in _warnings(caplog) if str(bad) in w]
    assert len(warned) == 1 and "1 of at most data.max_bad_images=50" in warned[0]
    assert load_checkpoint(_ckpts(cfg) / "model_final.pth")["iteration"] == 9


def test_too_many_unreadable_images_stop_the_run_and_save(fake_cfg, broken_data):
    cfg = fake_cfg
    cfg.data.train, bad = [broken_data[0]], broken_data[1]
    cfg.data.max_bad_images = 0
    with pytest.raises(TrainingError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "data.max_bad_images=0" in msg and "--resume" in msg
    stopped = int(re.search(r"training stopped at iteration (\d+)", msg).group(1))
    if stopped > 0:  # the healthy model's progress is kept
        assert load_checkpoint(_ckpts(cfg) / f"model_{stopped:07d}.pth")["iteration"] == stopped


class _Dying(Dataset):
    """Images that kill their worker process the first time (or every time) index `die_at` is read."""

    def __init__(self, marker: Path, n: int = 12, die_at: int = 5, always: bool = False, inner=None):
        self.marker, self.n, self.die_at, self.always, self.inner = marker, n, die_at, always, inner
        if inner is not None:
            self.class_names, self.category_ids = inner.class_names, inner.category_ids
            self.image_sizes, self.n = inner.image_sizes, len(inner)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        in_worker = torch.utils.data.get_worker_info() is not None
        if i == self.die_at and in_worker and (self.always or not self.marker.exists()):
            self.marker.touch()
            os._exit(3)  # no exception, no cleanup: as the kernel's OOM killer would leave it
        if self.inner is not None:
            return self.inner[i]
        return torch.zeros(3, 4, 4), {"index": i, "draw": torch.rand(()).item()}


def _indices(stream, n, pause=0.0):
    out = []
    for _, targets in itertools.islice(stream, n):
        out.append([(t["index"], t["draw"]) for t in targets])
        time.sleep(pause)  # time for a worker to die while "training"
    return out


@pytest.mark.parametrize("pause", [0.0, 0.2])
def test_dead_worker_restarts_the_loader_at_the_same_batch(tmp_path, caplog, pause):
    ds = _Dying(tmp_path / "died")
    expected = _indices(build_train_loader(ds, 2, seed=1, aspect_ratio_grouping=False), 8)
    stream = build_train_loader(ds, 2, num_workers=2, seed=1, aspect_ratio_grouping=False)
    try:
        assert _indices(stream, 8, pause) == expected
    finally:
        stream.close()
    assert (tmp_path / "died").exists() and stream.worker_restarts == 1
    assert any("data-loader worker died" in w and "restarting the loader" in w for w in _warnings(caplog))


def test_worker_that_always_dies_stops_after_the_limit(tmp_path):
    stream = build_train_loader(_Dying(tmp_path / "died", always=True), 2, num_workers=1, seed=1,
                                aspect_ratio_grouping=False, max_worker_restarts=2)
    try:
        with pytest.raises(DataError, match=r"died 3 times \(more than data.max_worker_restarts=2") as e:
            _indices(stream, 12)
    finally:
        stream.close()
    assert "data.num_workers=0" in str(e.value) and "\n" not in str(e.value)


def test_training_survives_a_dead_worker(fake_cfg, tmp_path, monkeypatch, caplog):
    cfg = fake_cfg
    cfg.data.num_workers = 1
    real = trainer_module.build_train_dataset
    monkeypatch.setattr(trainer_module, "build_train_dataset",
                        lambda cfg: _Dying(tmp_path / "died", die_at=3, inner=real(cfg)))
    out = train(cfg)
    assert (tmp_path / "died").exists()
    assert any("restarting the loader" in w for w in _warnings(caplog))
    assert load_checkpoint(out / "checkpoints" / "model_final.pth")["iteration"] == 6


# ---- 5. a full disk while saving ------------------------------------------------------------------


def test_disk_full_during_a_save_stops_in_one_line_and_keeps_the_previous_checkpoint(fake_cfg, monkeypatch):
    cfg = fake_cfg
    real_save = torch.save
    calls = []

    def save_until_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + b"\0" * 4096)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_disk_fills)
    with pytest.raises(TrainingError) as e:
        train(cfg)
    msg = str(e.value)
    ckpts = _ckpts(cfg)
    assert "\n" not in msg
    assert f"cannot write checkpoint '{ckpts / 'model_0000004.pth'}': No space left on device" in msg
    assert f"last good checkpoint is {ckpts / 'model_0000002.pth'} (iteration 2)" in msg
    assert "free some disk space, then continue with --resume" in msg
    assert sorted(p.name for p in ckpts.iterdir()) == ["model_0000002.pth"]  # no temp file, nothing half-written
    assert load_checkpoint(ckpts / "model_0000002.pth")["iteration"] == 2


# ---- 6. non-finite losses and gradients -----------------------------------------------------------


def test_non_finite_gradient_stops_naming_the_parameter(fake_cfg):
    cfg = fake_cfg
    StandInModel.hook = lambda call: "nan-grad" if call == 3 else None
    with pytest.raises(TrainingError) as e:
        train(cfg)
    msg = str(e.value)
    assert "non-finite gradient at iteration 3: parameter 'head'" in msg
    assert "model_0000002.pth" in msg and "solver.nonfinite=skip" in msg and "\n" not in msg
    assert torch.isfinite(load_checkpoint(_ckpts(cfg) / "model_0000002.pth")["model"]["head"]).all()


def test_non_finite_loss_names_only_the_bad_term(fake_cfg):
    StandInModel.hook = lambda call: "nan-loss" if call == 2 else None
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration 2: loss_classifier=nan; training stopped"):
        train(fake_cfg)


def test_skip_mode_skips_updates_and_counts_them(fake_cfg, caplog):
    cfg = fake_cfg
    cfg.solver.nonfinite = "skip"
    cfg.solver.optimizer = "adamw"
    StandInModel.hook = lambda call: {3: "nan-loss", 4: "nan-grad"}.get(call)
    out = train(cfg)
    state = load_checkpoint(out / "checkpoints" / "model_final.pth")
    assert state["iteration"] == 6 and state["scheduler"]["last_epoch"] == 6
    assert all(s["step"] == 4 for s in state["optimizer"]["state"].values())  # two updates skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    warned = [w for w in _warnings(caplog) if "update skipped" in w]
    assert len(warned) == 2
    assert "non-finite loss at iteration 3: loss_classifier=nan" in warned[0] and "1 in a row" in warned[0]
    assert "non-finite gradient at iteration 4: parameter 'head'" in warned[1] and "2 in a row" in warned[1]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["nonfinite_skipped"] == 2


def test_skip_mode_stops_after_too_many_in_a_row(fake_cfg):
    cfg = fake_cfg
    cfg.solver.nonfinite = "skip"
    cfg.solver.max_nonfinite_skips = 2
    StandInModel.hook = lambda call: "nan-loss" if call >= 2 else None
    with pytest.raises(TrainingError, match=r"at iteration 4: loss_classifier=nan; 3 updates in a row skipped, "
                                            r"more than solver.max_nonfinite_skips=2"):
        train(cfg)


def test_skip_mode_cannot_skip_a_step_that_poisoned_a_buffer(fake_cfg):
    cfg = fake_cfg
    cfg.solver.nonfinite = "skip"
    StandInModel.hook = lambda call: "nan-buffer" if call == 3 else None
    with pytest.raises(TrainingError, match="non-finite values reached buffer 'running_mean' at iteration 3"):
        train(cfg)


def test_unknown_nonfinite_mode_is_a_user_error(fake_cfg):
    fake_cfg.solver.nonfinite = "ignore"
    with pytest.raises(maskrcnn.errors.UserError, match="solver.nonfinite"):
        train(fake_cfg)


# ---- 7. degenerate targets train without NaNs -----------------------------------------------------

MODEL = [
    "model.num_classes=3", "model.class_names=[a,b,c]", "model.backbone.depth=18",
    "model.backbone.trainable_stages=1", "model.backbone.fpn_channels=16", "model.box_head.fc_dim=32",
    "model.mask_head.conv_dim=8", "model.mask_head.num_convs=1", "model.box_head.batch_size_per_image=32",
    "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50",
    "input.min_size_train=[72]", "input.max_size_train=96",
]


def _target(boxes, labels, crowd, h=72, w=96):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.round().long().tolist()):
        m[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] = 1  # a degenerate box still marks a pixel
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1), "masks": masks,
            "iscrowd": torch.tensor(crowd, dtype=torch.int64).reshape(-1)}


def _train_steps(targets: list[dict], steps: int = 3) -> None:
    torch.manual_seed(0)
    model = maskrcnn.build_model(load_config(None, MODEL)).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    images = [torch.rand(3, 72, 96) for _ in targets]
    for step in range(steps):
        losses = model(images, targets)
        bad = {k: v.item() for k, v in losses.items() if not torch.isfinite(v)}
        assert not bad, f"step {step}: {bad}"
        optimizer.zero_grad()
        sum(losses.values()).backward()
        grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not grads, f"step {step}: non-finite gradients in {grads[:3]}"
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


NORMAL = ([[20, 10, 80, 50]], [1], [0])  # x1 y1 x2 y2 in a 96x72 image
EMPTY = ([], [], [])
CROWD_ONLY = ([[20, 10, 80, 50], [5, 5, 40, 40], [30, 30, 30, 60]], [1, 2, 3], [1, 1, 1])  # one of zero width


def test_empty_and_crowd_only_images_train_without_nans():
    # Beside a normal image, and as a whole batch with no positive anywhere.
    _train_steps([_target(*EMPTY), _target(*CROWD_ONLY), _target(*NORMAL)])
    _train_steps([_target(*EMPTY), _target(*CROWD_ONLY)])


def test_zero_area_gt_boxes_train_without_nans():
    _train_steps([_target([[30, 30, 30, 60], [10, 40, 90, 40], [40, 40, 40, 40]], [1, 2, 3], [0, 0, 0]),
                  _target(*NORMAL)])


# ---- 8. weights that are cut short or do not fit ---------------------------------------------------


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def _predict(capsys, *args) -> tuple[int, str]:
    rc = cli.main(["predict", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_truncated_weights_give_one_line(checkpoint, tmp_path, image, capsys):
    cut = tmp_path / "cut.pth"
    data = checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for config in ([], ["--config", "shapes"]):
        rc, err = _predict(capsys, image, "--weights", cut, *config, "--out", tmp_path / "p")
        assert rc == 2 and "\n" not in err and "Traceback" not in err, err
        assert str(cut) in err and "cut short" in err and "copy or download it again" in err, err
    with pytest.raises(CheckpointError, match="cut short") as e:
        maskrcnn.load_model(None, weights=cut)
    assert "\n" not in str(e.value)


def test_weights_of_another_architecture_or_class_count_give_one_line(checkpoint, tmp_path, image, capsys):
    # fpn_channels 256 (the preset's) instead of the checkpoint's 32: another architecture.
    rc, err = _predict(capsys, image, "--weights", checkpoint, "--config", "shapes", "--out", tmp_path / "p")
    assert rc == 2 and "\n" not in err, err
    assert f"weights file '{checkpoint}' does not fit this model" in err and "shape mismatch" in err
    assert "it was trained as a FPN model, ResNet depth 10, 3 classes" in err  # the shapes-trained fixture
    assert "leave out the config" in err

    five = [*TINY, "model.num_classes=5", "model.class_names=[a,b,c,d,e]", "model.category_ids=[]"]
    rc, err = _predict(capsys, image, *five, "--weights", checkpoint, "--config", "shapes", "--out", tmp_path / "p")
    assert rc == 2 and "\n" not in err, err
    assert "another number of classes" in err and "leave out the config" in err

    # A plain state dict (no config inside): say which config to pass instead.
    plain = tmp_path / "plain.pth"
    torch.save(load_checkpoint(checkpoint)["model"], plain)
    with pytest.raises(CheckpointError) as e:
        maskrcnn.load_model("shapes", weights=plain, overrides=five)
    assert "\n" not in str(e.value) and "pass the config the weights were trained with" in str(e.value)
    # ... and the right config loads it.
    assert maskrcnn.load_model(None, weights=checkpoint).cfg.model.num_classes == 3
