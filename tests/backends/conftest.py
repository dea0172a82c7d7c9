"""Backend tests: GPU-marked tests skip without CUDA + TensorRT; helpers for a private engine folder."""

from __future__ import annotations

import pytest
import torch


def _gpu_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_ready():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT 10")
    for item in items:
        if "gpu" in item.keywords and "tests/backends" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
