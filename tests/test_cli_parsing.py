"""The command line's argument parsing: overrides anywhere among the options, and interrupted exit codes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from maskrcnn import cli
from maskrcnn.engine.stopping import TrainingInterrupted


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


# The options several commands share (maskrcnn.commands.options): the same spellings everywhere.
# Each command with the arguments it needs besides the shared ones.
SHARED_OPTION_COMMANDS = {"train": [], "eval": [], "predict": ["a.png"], "serve": [], "benchmark": [],
                          "export": ["--out", "m.onnx"], "show-data": ["--out", "grid.png"]}
SHARED_DESTS = ("config", "weights", "device", "backend", "precision")


def _subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


@pytest.mark.parametrize("spelling", ["--config", "-c", "--preset"])
@pytest.mark.parametrize("command", SHARED_OPTION_COMMANDS)
def test_every_command_takes_each_spelling_of_config(command, spelling):
    assert _parse(command, *SHARED_OPTION_COMMANDS[command], spelling, "shapes").config == "shapes"
    assert _parse(command, *SHARED_OPTION_COMMANDS[command]).config is None


@pytest.mark.parametrize("command", [c for c in SHARED_OPTION_COMMANDS if c != "show-data"])
def test_every_model_command_takes_weights_and_overrides(command):
    args = _parse(command, *SHARED_OPTION_COMMANDS[command], "a=1", "--weights", "w.pth", "b=2")
    assert args.weights == "w.pth"
    positional = {"eval": "opts", "predict": "inputs"}.get(command, "overrides")
    assert [x for x in getattr(args, positional) if "=" in x] == ["a=1", "b=2"]


def test_shared_options_have_one_spelling_and_help_lists_only_the_main_one():
    """A shared option has the same option strings in every command; `--help` shows only `--config`."""
    seen: dict[str, set[tuple[str, ...]]] = {}
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.dest in SHARED_DESTS and action.option_strings:
                seen.setdefault(action.dest, set()).add(tuple(action.option_strings))
        if any(a.dest == "config" for a in sub._actions):
            text = sub.format_help()
            assert "--config" in text and "--preset" not in text and "-c " not in text, name
    assert seen["config"] == {("--config",), ("-c", "--preset")}
    for dest in ("weights", "device", "backend", "precision"):
        assert seen[dest] == {(f"--{dest}",)}, dest


@pytest.mark.parametrize("command", ["predict", "serve", "benchmark"])
def test_device_defaults_to_cpu_where_it_did(command):
    assert _parse(command, *SHARED_OPTION_COMMANDS[command]).device == "cpu"
    assert _parse("eval").device is None  # eval: the config's device


def test_the_default_model_named_in_help_is_the_one_loaded():
    from maskrcnn.commands.options import DEFAULT_MODEL_HELP
    from maskrcnn.zoo import DEFAULT_MODEL

    assert DEFAULT_MODEL_HELP.split(",")[0] == DEFAULT_MODEL
