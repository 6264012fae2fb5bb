"""`maskrcnn --help` and `maskrcnn COMMAND --help` answer without importing torch or other heavy modules.

Each check runs in a fresh interpreter: this test process has long imported torch itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskrcnn.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
# Top-level packages (and our own modules) that cost seconds to import; none may load for --help.
HEAVY = ("torch", "torchvision", "numpy", "PIL", "pycocotools", "matplotlib", "onnx", "onnxruntime", "openvino",
         "nncf", "av", "fastapi", "uvicorn", "maskrcnn.api", "maskrcnn.modeling", "maskrcnn.engine", "maskrcnn.data")

# Prints which of HEAVY `maskrcnn ARGS...` imported before exiting (its stdout muted meanwhile).
PROBE = """
import contextlib, io, json, sys
from maskrcnn import cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        status = cli.main(sys.argv[1:])
    except SystemExit as e:
        status = e.code
heavy = json.loads(%r)
print(json.dumps({"status": status,
                  "heavy": [h for h in heavy if any(m == h or m.startswith(h + ".") for m in sys.modules)]}))
""" % json.dumps(HEAVY)


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("argv", [["--help"]] + [[name.replace("_", "-"), "--help"] for name in COMMANDS])
def test_help_imports_nothing_heavy(argv):
    done = _python("-c", PROBE, *argv)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == 0
    assert report["heavy"] == [], f"maskrcnn {' '.join(argv)} imported {report['heavy']}"


def test_help_of_the_real_entry_point():
    done = _python("-m", "maskrcnn.cli", "train", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: maskrcnn train") and "--resume" in done.stdout


def test_public_names_still_import_on_first_use():
    import maskrcnn
    from maskrcnn.api import load_model

    assert maskrcnn.load_model is load_model
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        maskrcnn.nonexistent  # noqa: B018
