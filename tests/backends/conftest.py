"""Backend tests: GPU-marked tests skip without CUDA + TensorRT; helpers for a private engine folder."""

from __future__ import annotations

import pytest
import torch


def _gpu_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (OSError for a missing library…) is "no TensorRT" too
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_ready():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT 10.1+ or 11")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["10.8.0", "11.4.0"], ids=["trt10", "trt11"])
def fake_trt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """A fake ``tensorrt`` of each tested major version (fake_tensorrt.py) installed as ``sys.modules['tensorrt']``."""
    import sys

    from fake_tensorrt import make_fake_tensorrt

    module = make_fake_tensorrt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module
