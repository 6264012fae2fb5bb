"""Checkpoint files: atomic writes, corruption detection, newest-valid lookup, weight import errors."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from maskrcnn.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from maskrcnn.errors import UserError


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((4, 3), value)}, "iteration": 7, "config": {"a": [1, 2]}}


def test_save_and_load_round_trip_leaves_no_temp_file(tmp_path):
    path = save_checkpoint(tmp_path / "model_0000007.pth", _state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000007.pth"]
    state = load_checkpoint(path)
    assert state["iteration"] == 7 and torch.equal(state["model"]["w"], torch.ones(4, 3))
    # The checksum trailer does not stop plain torch.load from reading the file.
    assert torch.load(path, weights_only=True)["iteration"] == 7


def test_failed_save_removes_temp_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "x.pth", {"bad": Unpicklable()})
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_corrupt_files_give_one_line_errors(tmp_path):
    path = save_checkpoint(tmp_path / "model_final.pth", _state())
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)

    flipped = bytearray(data)
    flipped[100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_latest_checkpoint_skips_corrupt(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    good = save_checkpoint(tmp_path / "model_0000010.pth", _state())
    time.sleep(0.01)
    bad = save_checkpoint(tmp_path / "model_0000020.pth", _state())
    bad.write_bytes(bad.read_bytes()[:-200])
    (tmp_path / "notes.txt").write_text("ignored")
    assert latest_checkpoint(tmp_path) == good
    time.sleep(0.01)
    newer = save_checkpoint(tmp_path / "model_final.pth", _state())
    assert latest_checkpoint(tmp_path) == newer


class _Net(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.cls_score = nn.Linear(16, num_classes + 1)


def test_load_weights_accepts_checkpoint_and_plain_state_dict(tmp_path):
    src = _Net(3)
    save_checkpoint(tmp_path / "ours.pth", {"model": src.state_dict(), "iteration": 1})
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    for name in ("ours.pth", "plain.pth"):
        dst = _Net(3)
        report = load_weights(dst, tmp_path / name)
        assert not report.missing and not report.reinitialized
        assert torch.equal(dst.trunk.weight, src.trunk.weight)


def test_load_weights_mismatch_names_keys_and_shapes(tmp_path):
    state = _Net(80).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["trunk.bias"]
    torch.save(state, tmp_path / "coco.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(_Net(3), tmp_path / "coco.pth")
    msg = str(e.value)
    assert "missing keys trunk.bias" in msg
    assert "unexpected keys extra.weight" in msg
    assert "cls_score.weight (checkpoint [81, 16] vs model [4, 16])" in msg
    assert "another number of classes" in msg


def test_load_weights_reinitialises_class_layers_for_fine_tuning(tmp_path):
    src = _Net(80)
    torch.save(src.state_dict(), tmp_path / "coco.pth")
    dst = _Net(3)
    fresh = dst.cls_score.weight.detach().clone()
    report = load_weights(dst, tmp_path / "coco.pth", reinit_mismatched_classes=True)
    assert sorted(report.reinitialized) == ["cls_score.bias", "cls_score.weight"]
    assert torch.equal(dst.trunk.weight, src.trunk.weight)
    assert torch.equal(dst.cls_score.weight, fresh)


def test_load_weights_rejects_non_weights_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(_Net(3), tmp_path / "junk.pth")


def test_load_weights_ignores_batchnorm_step_counters(tmp_path):
    src = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    torch.save(src.state_dict(), tmp_path / "bn.pth")  # has `1.num_batches_tracked`
    dst = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=True))
    del dst[1].num_batches_tracked  # frozen-BN style model without the counter
    dst[1].register_buffer("num_batches_tracked", None)
    report = load_weights(dst, tmp_path / "bn.pth")
    assert not report.missing and not report.unexpected
