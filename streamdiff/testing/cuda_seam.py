"""A CPU stand-in for :class:`streamdiff.backends.cuda_ops.TorchCuda` for tools that run the CUDA-graph code paths
without a GPU (``tools/gpu_check.py``'s dry run, ``tools/count_tick_ops.py``).

A capture keeps the callable it is given and runs nothing; a replay calls it, so it reads whatever its buffers
hold then (a real graph reads them too, by address). Buffers start as NaN: a program reading one it never wrote
shows in its frames. It counts captures, replays and host copies. Tests that must catch values baked in at capture
use the stricter recording fake in ``tests/engine/recording_cuda.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


class CallableCuda:
    """See the module docstring."""

    def __init__(self) -> None:
        self.captures = self.replays = self.host_copies = 0

    def new_stream(self, device: torch.device) -> object:
        return object()

    def current_stream(self, device: torch.device) -> object:
        return object()

    @contextlib.contextmanager
    def use(self, stream: object) -> Iterator[None]:
        yield

    def wait(self, waiter: object, producer: object) -> None:
        pass

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(-1)

    def capture(self, stream: object, enqueue: Callable[[], Any]) -> Callable[[], Any]:
        self.captures += 1
        return enqueue

    def replay(self, graph: Callable[[], Any]) -> None:
        self.replays += 1
        graph()

    def release(self, graph: Any) -> None:
        pass

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        self.host_copies += 1
        return tensor.clone()
