"""Device and dtype resolution: the one place that knows about CUDA."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

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


@dataclass(frozen=True)
class GpuMemory:
    """GPU memory in bytes. ``used`` is device-wide (``total − free`` from the driver): every allocation on the GPU
    counts — torch's, TensorRT's engines and scratch, ONNX Runtime's arenas, the CUDA contexts (and other processes'
    on a shared GPU). ``torch_reserved`` is what torch's caching allocator holds (its ``memory_reserved``), of which
    ``torch_allocated`` is in tensors; ``outside_torch`` is the rest of ``used``.
    """

    used: int
    total: int
    torch_allocated: int
    torch_reserved: int

    @property
    def outside_torch(self) -> int:
        return max(0, self.used - self.torch_reserved)

    def as_dict(self, unit: int = 2**20) -> dict[str, float]:
        """JSON-ready figures in ``unit`` (MiB by default), rounded to 0.1."""
        return {name: round(value / unit, 1) for name, value in (
            ("used", self.used), ("total", self.total), ("torch_allocated", self.torch_allocated),
            ("torch_reserved", self.torch_reserved), ("outside_torch", self.outside_torch))}


def gpu_memory(device: torch.device | str | None = None) -> GpuMemory:
    """The GPU's memory now, device-wide (see :class:`GpuMemory`); torch.cuda's own counters miss what TensorRT and
    ONNX Runtime allocate, so a figure for a compiled backend must be :attr:`GpuMemory.used`. Needs a CUDA device.

    For a peak, call it at the moments of interest (after the engines load, after warm-up, during a run): the driver
    keeps no device-wide peak.
    """
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise BackendUnavailable(f"gpu_memory needs a CUDA device, not {device}")
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemory(used=int(total) - int(free), total=int(total),
                     torch_allocated=int(torch.cuda.memory_allocated(device)),
                     torch_reserved=int(torch.cuda.memory_reserved(device)))


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """Inside: float32 matmuls and convolutions in true float32 — TF32 off for cuBLAS and cuDNN, matmul precision
    ``highest`` — for a float32 reference to compare reduced-precision backends with. Restores the settings after.

    TF32 keeps 10 mantissa bits: a "float32" reference computed with it on an Ampere or newer GPU is about as
    precise as float16, so comparisons against it understate the errors.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    matmul.allow_tf32 = False
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.allow_tf32, cudnn.allow_tf32 = saved[1], saved[2]
