"""The GPU memory figure and the strict float32 reference of ``streamdiff/backends/device.py`` (torch.cuda faked)."""

from __future__ import annotations

import pytest
import torch

from streamdiff.backends.device import GpuMemory, gpu_memory, strict_float32
from streamdiff.errors import BackendUnavailable

GIB = 2**30


def test_gpu_memory_is_device_wide_and_counts_what_torch_does_not_see(monkeypatch: pytest.MonkeyPatch) -> None:
    """80 GiB GPU, 30 GiB free: 50 used, of which torch's allocator holds 12 (9 in tensors); the other 38 are
    TensorRT's engines and scratch, ONNX Runtime's arenas and the contexts, which torch.cuda's counters miss."""
    seen = []

    def mem_get_info(device=None):  # noqa: ANN001, ANN202
        seen.append(device)
        return 30 * GIB, 80 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 9 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * GIB)
    memory = gpu_memory("cuda:1")
    assert memory == GpuMemory(used=50 * GIB, total=80 * GIB, torch_allocated=9 * GIB, torch_reserved=12 * GIB)
    assert memory.outside_torch == 38 * GIB and seen == [torch.device("cuda:1")]
    assert memory.as_dict() == {"used": 51200.0, "total": 81920.0, "torch_allocated": 9216.0,
                                "torch_reserved": 12288.0, "outside_torch": 38912.0}
    assert gpu_memory().used == 50 * GIB and seen[-1] == torch.device("cuda")
    with pytest.raises(BackendUnavailable, match="gpu_memory needs a CUDA device, not cpu"):
        gpu_memory("cpu")


def test_strict_float32_turns_tf32_off_inside_and_restores_after() -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("high")  # what a speed-minded caller sets: TF32 matmuls
        cudnn.allow_tf32 = True
        assert matmul.allow_tf32
        with strict_float32():
            assert (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32) == ("highest", False,
                                                                                                  False)
        assert (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32) == ("high", True, True)
        with pytest.raises(RuntimeError, match="inside"), strict_float32():
            raise RuntimeError("inside")
        assert (torch.get_float32_matmul_precision(), cudnn.allow_tf32) == ("high", True)  # restored on errors too
    finally:
        torch.set_float32_matmul_precision(before[0])
        matmul.allow_tf32, cudnn.allow_tf32 = before[1], before[2]
