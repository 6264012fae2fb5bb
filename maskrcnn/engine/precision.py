"""Device and precision policy: which device `cfg.device` means, and which autocast dtype to use there.

Shared by training (`solver.amp`), `maskrcnn benchmark`, `maskrcnn eval` and the ONNX backends (which
ask `native_bf16` before compiling in bfloat16).
"""

from __future__ import annotations

import logging

import torch

from maskrcnn.errors import UserError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """Return the torch device for `cfg.device` ("auto" picks CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("config device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Return whether `device` computes bfloat16 natively (CUDA with bf16; a CPU with AVX-512/AMX).

    Without it (an AVX2-only CPU) oneDNN emulates bfloat16 convolutions: measured here on a 2-core
    AVX2 EPYC, one 3x3 conv was ~150x slower than in float32, so bf16 autocast would only hurt.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's probe: assume the slow path
        return False


def autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """Return (autocast dtype, or None for full precision; a note when the request had to change).

    `precision` is "" or "fp32" (none), "bf16", "fp16" or "auto" (bf16 where `device` computes it
    natively, else full precision). fp16 autocast needs CUDA: elsewhere bfloat16 is used instead.
    Shared by training (`solver.amp`) and `maskrcnn benchmark`.
    """
    if precision in ("", "fp32"):
        return None, None
    if precision == "auto":
        if native_bf16(device):
            return torch.bfloat16, None
        return None, f"this {device.type} has no native bfloat16 (AVX-512/AMX); training in float32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("bf16 autocast is not supported by this GPU; use fp16")
    notes = []
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        dtype = torch.bfloat16
        notes.append(f"fp16 autocast needs CUDA; using bf16 autocast on {device.type} instead")
    if dtype == torch.bfloat16 and not native_bf16(device):
        notes.append("this CPU has no native bfloat16 (AVX-512/AMX): bf16 is emulated, far slower than "
                     "float32 here; use fp32 or auto")
    return dtype, "; ".join(notes) or None


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for `solver.amp` on `device` (None = full precision)."""
    dtype, note = autocast_dtype(amp, device)
    if note:
        # "auto" choosing float32 is the setting working as meant: information, not a warning.
        (log.info if amp == "auto" else log.warning)("solver.amp=%s: %s", amp, note)
    return dtype
