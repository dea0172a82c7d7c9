"""Execution backends: where the U-Net and the VAE run.

Every backend offers the same two engines (see :mod:`streamdiff.backends.base`): a U-Net callable and a VAE with
``encode``/``decode``. The core never knows which one it drives. Optional backends import their dependencies lazily.
"""

from __future__ import annotations

from .base import UNetEngine, VaeEngine
from .device import GpuMemory, gpu_memory, resolve_device, resolve_dtype, strict_float32
from .keys import Component, EngineOptions

__all__ = ["Component", "EngineOptions", "GpuMemory", "UNetEngine", "VaeEngine", "gpu_memory", "resolve_device",
           "resolve_dtype", "strict_float32"]
