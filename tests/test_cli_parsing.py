"""The command line's argument parsing: overrides anywhere among the options, and interrupted exit codes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from maskrcnn import cli
from maskrcnn.engine.trainer import TrainingInterrupted


def _parse(*argv: str):
    return cli.parse_args(cli.build_parser(), list(argv))


def test_overrides_before_between_and_after_options():
    args = _parse("train", "--config", "shapes", "a=1", "--out", "run", "b=2", "--resume", "c=3")
    assert args.config == "shapes" and args.out == "run" and args.resume
    assert args.overrides == ["a=1", "b=2", "c=3"]
    assert _parse("train", "a=1", "--out", "run").overrides == ["a=1"]
    assert _parse("train", "--out", "run", "a=1").overrides == ["a=1"]
    assert _parse("train").overrides == []


def test_every_command_with_a_list_positional_takes_items_after_options():
    assert _parse("eval", "x=1", "--weights", "w.pth", "y=2").opts == ["x=1", "y=2"]
    assert _parse("benchmark", "x=1", "--runs", "3", "y=2").overrides == ["x=1", "y=2"]
    assert _parse("demo", "x=1", "--minutes", "1", "y=2").overrides == ["x=1", "y=2"]
    args = _parse("predict", "a.png", "--out", "o", "b.png", "k=v", "--weights", "w.pth")
    assert args.inputs == ["a.png", "b.png", "k=v"] and args.out == "o" and args.weights == "w.pth"
    args = _parse("check-dataset", "ann.json:img", "--decode")
    assert args.data == "ann.json:img" and args.decode


@pytest.mark.parametrize("argv", [
    ["train", "a=1", "--out", "run", "--bogus"],
    ["make-shapes", "--out", "o", "stray"],
    ["check-dataset", "ann.json:img", "other"],
])
def test_unknown_options_and_stray_items_still_fail(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def _interrupting(exc: BaseException):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc, status", [
    (TrainingInterrupted("SIGTERM", Path("model_0000001.pth")), 128 + signal.SIGTERM),
    (TrainingInterrupted("SIGINT", Path("model_0000001.pth")), 128 + signal.SIGINT),
    (KeyboardInterrupt(), 130),
])
def test_interrupted_exit_status(monkeypatch, capsys, exc, status):
    import maskrcnn.commands.train as train_cmd

    monkeypatch.setattr(train_cmd, "run", _interrupting(exc))
    assert cli.main(["train"]) == status
    assert "interrupted" in capsys.readouterr().err
