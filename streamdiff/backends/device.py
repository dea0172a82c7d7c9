"""Device and dtype resolution: the one place that knows about CUDA."""

from __future__ import annotations

import logging

import torch

from ..config import Precision, to_enum
from ..errors import BackendUnavailable

logger = logging.getLogger(__name__)

_DTYPES = {Precision.FLOAT32: torch.float32, Precision.BFLOAT16: torch.bfloat16, Precision.FLOAT16: torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU. An unavailable device raises BackendUnavailable."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {name!r} requested but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return device


def resolve_dtype(
    precision: Precision | str | None, device: torch.device, cpu_flags: frozenset[str] | None = None
) -> torch.dtype:
    """The compute dtype: ``precision`` when given; otherwise float16 on CUDA, and on the CPU bfloat16 where it is
    native (AVX512-BF16 or AMX in the CPU flags; ``cpu_flags`` overrides the detected ones), float32 elsewhere.

    Measured on an AVX512-BF16 CPU without AMX (docs/PERF.md): bfloat16 runs the SD-2.1-size U-Net ~2.3–3× faster
    than float32 at PSNR ~50 dB; on CPUs without native bfloat16 it is emulated and slower, so float32 stays.
    """
    if precision is None:
        if device.type == "cuda":
            return torch.float16
        from .keys import cpu_has_native_bf16

        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16(cpu_flags) else torch.float32
    precision = to_enum(Precision, precision, "dtype")
    if precision is Precision.FLOAT16 and device.type == "cpu":
        logger.warning("float16 on the CPU is slow and lossy; bfloat16 is the CPU's fast reduced precision")
    return _DTYPES[precision]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing code only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
