"""OpenVINO models loaded and dropped in any order leave the main thread a usable alternate signal stack.

Each instance of OpenVINO's CPU plugin (one per `openvino.Core` that compiles a model) gives the thread
that creates it a new alternate signal stack; its destructor unmaps that stack and puts the previous one
back only if its own is still the current one. Two Cores destroyed in the order they were made therefore
left the main thread's alternate stack pointing at unmapped memory, and the next signal Python handles
(its handlers are installed with SA_ONSTACK; torch's DataLoader leaves one for SIGCHLD) made the kernel
kill the process with SIGSEGV (si_code SI_KERNEL). `maskrcnn.onnx_backends.openvino_core` is one Core for
the process, so loading a model no longer makes or destroys a plugin instance.

The probe runs in a fresh process: a broken stack there kills that process, not the test run.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import SigaltstackT, alternate_stack

pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino (the deploy extra), not installed")

HERE = Path(__file__).resolve().parent


def probe(onnx_path: str) -> None:
    """Load two OpenVINO models and drop them, in both orders, printing the main thread's alternate stack
    (JSON) after each; then have child processes exit while a Python SIGCHLD handler is installed, which
    kills this process if that stack is unmapped. (NNCF's calibration runs in the test process: the
    `alternate_stack_stays_mapped` fixture of conftest.py checks it there.)"""
    from maskrcnn.onnx_model import OnnxMaskRCNN

    def report(step: str) -> None:
        print(json.dumps({"step": step, **alternate_stack()}), flush=True)

    for order in itertools.permutations(range(2)):
        models = [OnnxMaskRCNN(onnx_path, backend="openvino") for _ in range(2)]
        for index in order:
            models[index] = None
            gc.collect()
        report(f"two models dropped in the order {order}")
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for _ in range(3):  # the child exits while this process sleeps, as DataLoader workers and servers do
        child = subprocess.Popen(["sleep", "0.05"])
        time.sleep(0.2)
        child.wait()
    print("survived SIGCHLD", flush=True)


def test_models_dropped_in_any_order_leave_a_mapped_alternate_stack(tmp_path):
    from maskrcnn.export import export_onnx
    from support import tiny_model

    onnx_path = export_onnx(tiny_model(), tmp_path / "tiny.onnx")
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_signal_stack as t; t.probe(*sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, str(onnx_path)],
                          capture_output=True, text=True, timeout=600)
    steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    unmapped = [step["step"] for step in steps if step["enabled"] and not step["mapped"]]
    assert unmapped == [], f"the main thread's alternate signal stack is unmapped after: {unmapped}"
    assert len(steps) == 2 and done.returncode == 0 and "survived SIGCHLD" in done.stdout, \
        (done.returncode, done.stdout[-1000:], done.stderr[-2000:])


def test_alternate_stack_tells_a_mapped_stack_from_an_unmapped_one():
    """The reader the tests rely on sees a stack that this thread installs, mapped and then unmapped (with
    every signal blocked meanwhile, so that none is delivered on the unmapped stack)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = 4 * os.sysconf("SC_PAGE_SIZE")
    memory = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert memory not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    previous = SigaltstackT()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        assert libc.sigaltstack(ctypes.byref(SigaltstackT(memory, 0, size)), ctypes.byref(previous)) == 0
        mapped = alternate_stack()
        assert libc.munmap(ctypes.c_void_p(memory), ctypes.c_size_t(size)) == 0
        unmapped = alternate_stack()
        assert libc.sigaltstack(ctypes.byref(previous), None) == 0
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert mapped == {"address": memory, "enabled": True, "mapped": True}
    assert unmapped == {"address": memory, "enabled": True, "mapped": False}
