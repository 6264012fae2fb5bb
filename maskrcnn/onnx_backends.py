"""Runtimes that execute the file `maskrcnn export --format onnx` writes: ONNX Runtime and OpenVINO.

Both read the same .onnx file; OpenVINO also runs the int8 IR (.xml) that `maskrcnn quantize` makes of it. A runner only loads it and maps one image array to the graph's output
arrays; everything else (checks, metadata, mask pasting, `predict`) is `maskrcnn.onnx_model.OnnxMaskRCNN`'s,
shared by every runtime. This module imports nothing heavy at the top, so the command line can list
the backends without loading numpy or a runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
import queue
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from maskrcnn.errors import UserError

if TYPE_CHECKING:
    import numpy as np

OUTPUT_NAMES = ["boxes", "scores", "labels", "mask_probs"]
PRECISIONS = ("fp32", "bf16", "int8")
IR_SUFFIX = ".xml"  # an OpenVINO IR, as `maskrcnn quantize` writes it (OpenVINO only)


def first_line(error: BaseException) -> str:
    """Return the first non-empty line of an exception's message (runtimes raise pages of C++ context)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class OnnxRunner(ABC):
    """One exported file loaded by one runtime: a float32 [3, H, W] image in, the OUTPUT_NAMES arrays out.

    `precision` None runs the file as it is: float32, or int8 for a quantized IR; `self.precision` says which.
    """

    backend: ClassVar[str]  # the --backend name
    name: ClassVar[str]  # the runtime's name in messages
    package: ClassVar[str]  # the Python package it needs
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(self, path: Path, threads: int | None = None, precision: str | None = None, requests: int = 1):
        self.requests = max(1, requests)
        if precision is not None and precision not in self.precisions:
            raise UserError(f"--backend {self.backend} runs the file in {' or '.join(self.precisions)}, "
                            f"not {precision}")
        runtime = self._import_runtime()
        try:
            self.precision = self._load(runtime, path, threads, precision)
        except UserError:
            raise
        except Exception as e:  # runtimes raise their own classes for every kind of bad file
            raise UserError(f"{self.name} cannot load '{path}': {first_line(e)}") from None

    def _import_runtime(self) -> ModuleType:
        try:
            return importlib.import_module(self.package)
        except ImportError:
            raise UserError(f"--backend {self.backend} needs the {self.package} package, which is not installed: "
                            f"pip install {self.package} (or the deploy extra: pip install 'maskrcnn[deploy]')"
                            ) from None

    @abstractmethod
    def _load(self, runtime: ModuleType, path: Path, threads: int | None, precision: str | None) -> str:
        """Read and prepare the file with `runtime` (the imported package); return the precision it runs in."""

    @abstractmethod
    def metadata(self, key: str) -> str | None:
        """Return the file's metadata entry `key` (written by `maskrcnn export`), or None."""

    @abstractmethod
    def run(self, image: np.ndarray) -> list[np.ndarray]:
        """Return the outputs, in OUTPUT_NAMES order, for one contiguous float32 [3, H, W] image.

        Safe to call from several threads at once."""

    def run_many(self, images: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Return `run`'s outputs for each image (one after another; OpenVINO overlaps them on its streams)."""
        return [self.run(image) for image in images]


class OnnxRuntimeRunner(OnnxRunner):
    """ONNX Runtime's CPU execution provider (float32)."""

    backend, name, package = "onnxruntime", "ONNX Runtime", "onnxruntime"

    def _load(self, runtime: ModuleType, path: Path, threads: int | None, precision: str | None) -> str:
        if path.suffix.lower() == IR_SUFFIX:
            raise UserError(f"'{path}' is an OpenVINO IR (from `maskrcnn quantize`); run it with --backend openvino")
        options = runtime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._metadata = self.session.get_modelmeta().custom_metadata_map
        return "fp32"

    def metadata(self, key: str) -> str | None:
        return self._metadata.get(key)

    def run(self, image: np.ndarray) -> list[np.ndarray]:
        return self.session.run(OUTPUT_NAMES, {"image": image})


class OpenVinoRunner(OnnxRunner):
    """OpenVINO's CPU plugin: the .onnx file directly (no conversion step) in FP32 or BF16, or the int8 IR.

    It keeps `requests` infer requests (what an `AsyncInferQueue` keeps): each call takes an idle one, so
    several threads may run images at once (one request shared by two threads fails: "Infer Request is
    busy"), and `run_many` starts several images asynchronously. More than one request compiles the model with
    the THROUGHPUT hint (as many CPU streams as requests); one, with the LATENCY hint (one image at a time).
    An error in an inference is raised in the calling thread.
    """

    backend, name, package = "openvino", "OpenVINO", "openvino"
    precisions = PRECISIONS

    def _load(self, runtime: ModuleType, path: Path, threads: int | None, precision: str | None) -> str:
        core = openvino_core()
        self.model = core.read_model(str(path))
        precision = file_precision(path, is_quantized(self.model), precision)
        if precision == "bf16":
            require_native_bf16()
        # The hint is always set: on a CPU with native bfloat16 OpenVINO otherwise picks bf16 by itself
        # (2026.4 does here), which would silently break parity with PyTorch's float32. An int8 file's
        # layers left unquantized (prediction layers, post-processing) run in float32 too.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if self.requests > 1:  # several images at once, each on its own CPU stream
            config.update(PERFORMANCE_HINT="THROUGHPUT", PERFORMANCE_HINT_NUM_REQUESTS=self.requests)
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"  # one image at a time, on every core
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(self.model, "CPU", config)
        self.idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.requests):
            self.idle.put(self.compiled.create_infer_request())
        return precision

    def metadata(self, key: str) -> str | None:
        # OpenVINO keeps an ONNX file's metadata_props under the model's "framework" runtime info.
        if not self.model.has_rt_info(["framework", key]):
            return None
        return self.model.get_rt_info(["framework", key]).astype(str)

    def run(self, image: np.ndarray) -> list[np.ndarray]:
        return self.run_many([image])[0]

    def run_many(self, images: list[np.ndarray]) -> list[list[np.ndarray]]:
        results: list[list[np.ndarray]] = []
        while len(results) < len(images):
            taken = [self.idle.get()]  # waits for one idle request; never holds one while waiting for another
            while len(taken) < min(self.requests, len(images) - len(results)):
                try:
                    taken.append(self.idle.get_nowait())
                except queue.Empty:
                    break
            try:
                for request, image in zip(taken, images[len(results):]):
                    request.start_async({"image": image})
                for request in taken:
                    request.wait()
                    results.append([request.get_tensor(name).data.copy() for name in OUTPUT_NAMES])
            finally:
                for request in taken:
                    request.wait()  # after an error the others may still run: let them finish first
                    self.idle.put(request)
        return results


_core: Any = None
_core_lock = threading.Lock()


def openvino_core() -> Any:
    """Return the process's one `openvino.Core`, made on first use with its CPU plugin loaded.

    One Core, never destroyed, because every CPU-plugin instance (one per Core) gives the thread that makes
    it a new alternate signal stack and, when destroyed, unmaps it but puts the previous one back only if
    its own is still current. Cores destroyed in the order they were made (two models loaded and dropped)
    left the main thread's alternate stack unmapped, and the next Python signal handler to run (SIGCHLD,
    SIGINT: Python installs them with SA_ONSTACK) killed the process with SIGSEGV (tests/test_signal_stack.py).
    The plugin is loaded at once, so that its stack is in place before any Core that NNCF makes for itself
    (NNCF 3.4 takes no Core) and stays the bottom one.
    """
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            core = openvino.Core()
            core.get_property("CPU", "FULL_DEVICE_NAME")  # creates the CPU plugin instance
            _core = core
        return _core


def is_quantized(model: Any) -> bool:
    """Whether an OpenVINO model holds int8 quantization (FakeQuantize operations, as NNCF inserts them)."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def file_precision(path: Path, quantized: bool, precision: str | None) -> str:
    """Return the precision OpenVINO runs `path` in: int8 for a quantized file, else `precision` (default fp32).

    An int8 file has no float32 weights for most layers, so fp32/bf16 are refused for it; int8 needs one.
    """
    if quantized:
        if precision not in (None, "int8"):
            raise UserError(f"'{path}' is quantized to int8; run it without --precision (or with --precision int8), "
                            f"or run the .onnx file it was made from for {precision}")
        return "int8"
    if precision == "int8":
        raise UserError(f"--precision int8 needs a file quantized by `maskrcnn quantize`, and '{path}' is not one: "
                        f"maskrcnn quantize --onnx MODEL.onnx --calibration IMAGES --out {path.stem}-int8.xml, "
                        "then --weights that .xml")
    return precision or "fp32"


def require_native_bf16() -> None:
    """Raise unless this CPU computes bfloat16 natively, by the rule `solver.amp=auto` uses (AVX-512/AMX).

    Elsewhere bfloat16 is emulated, far slower than float32 (maskrcnn.engine.precision.native_bf16).
    """
    import torch

    from maskrcnn.engine.precision import native_bf16

    if not native_bf16(torch.device("cpu")):
        raise UserError("--precision bf16 needs a CPU with native bfloat16 (AVX-512 or AMX), which this one lacks; "
                        "use --precision fp32")


RUNNERS: dict[str, type[OnnxRunner]] = {r.backend: r for r in (OnnxRuntimeRunner, OpenVinoRunner)}
BACKENDS = tuple(RUNNERS)


# `--backend auto`'s order for an exported file, fastest first: measured side by side on R50-FPN (BENCHMARKS.md,
# "OpenVINO and ONNX Runtime against PyTorch"): OpenVINO FP32 1.26x, ONNX Runtime 1.18x PyTorch FP32 (2026-12-03).
PREFERENCE = ("openvino", "onnxruntime")


def installed_backends() -> list[str]:
    """Return the ONNX runtimes whose Python package is installed, fastest first (imports none of them)."""
    return [b for b in PREFERENCE if importlib.util.find_spec(RUNNERS[b].package) is not None]


def is_exported_file(weights: str | Path | None) -> bool:
    """Whether `weights` names a file for the ONNX runtimes: an exported .onnx, or an OpenVINO IR (.xml)."""
    return bool(weights) and str(weights).lower().endswith((".onnx", IR_SUFFIX))


def choose_backend(weights: str | Path | None) -> str:
    """Return what `--backend auto` runs `weights` with: PyTorch for a checkpoint or a zoo name, the fastest
    installed runtime for an exported `.onnx` file, OpenVINO for its IR (`maskrcnn quantize`'s .xml)."""
    if not is_exported_file(weights):
        return "pytorch"
    if str(weights).lower().endswith(IR_SUFFIX):
        if importlib.util.find_spec(RUNNERS["openvino"].package) is None:
            raise UserError(f"'{weights}' is an OpenVINO IR, which runs with OpenVINO, and it is not installed: "
                            "pip install openvino (or the deploy extra: pip install 'maskrcnn[deploy]')")
        return "openvino"
    installed = installed_backends()
    if not installed:
        raise UserError(f"'{weights}' is an exported ONNX file, which runs with OpenVINO or ONNX Runtime, and "
                        "neither is installed: pip install openvino (or the deploy extra: pip install "
                        "'maskrcnn[deploy]')")
    return installed[0]


def open_runner(backend: str, path: Path, threads: int | None = None, precision: str | None = None,
                requests: int = 1) -> OnnxRunner:
    """Return `path` loaded by the runtime named `backend` (one of BACKENDS); `precision` None: the file's own;
    `requests`: images OpenVINO runs at once (ONNX Runtime's session runs any number of threads' calls)."""
    if backend not in RUNNERS:
        raise UserError(f"unknown ONNX backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    return RUNNERS[backend](path, threads, precision, requests)
