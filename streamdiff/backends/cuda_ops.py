"""The torch CUDA calls of the GPU backends, behind one small seam.

:class:`TorchCuda` is what the TensorRT runtime, ONNX Runtime's CUDA path and the torch backend's CUDA graphs
(:mod:`.cuda_graphs`) use: streams, ordering between streams, allocation, CUDA-graph capture and replay, the
engine tick's one device→host copy, and the device's name. Tests replace it with a CPU fake
(``tests/backends/fake_cuda.py``) so the runtimes' bookkeeping — which buffers exist, what is bound where, when a
graph is captured, replayed or freed — runs without a GPU. Nothing here is called on the CPU path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


class TorchCuda:
    """The real seam: thin wrappers over ``torch.cuda`` (never run on the machines this was written on)."""

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def handle(self, stream: Any) -> int:
        """The ``cudaStream_t`` of ``stream`` as an integer (what TensorRT and ONNX Runtime take)."""
        return int(stream.cuda_stream)

    @contextlib.contextmanager
    def use(self, stream: Any) -> Iterator[None]:
        """Make ``stream`` torch's current stream (allocations and copies go on it)."""
        with torch.cuda.stream(stream):
            yield

    def wait(self, waiter: Any, producer: Any) -> None:
        """Work queued on ``waiter`` from now on starts after what is queued on ``producer`` (no host sync)."""
        waiter.wait_stream(producer)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def capture(self, stream: Any, enqueue: Callable[[], None]) -> Any:
        """Capture what ``enqueue`` queues on ``stream`` into a CUDA graph (raises RuntimeError if it cannot)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            enqueue()
        return graph

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` copied into pinned host memory, waited for: ONE copy and ONE stream synchronisation."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        return host

    def replay(self, graph: Any) -> None:
        graph.replay()

    def release(self, graph: Any) -> None:
        """Free a captured graph's resources now rather than at garbage collection."""
        graph.reset()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def memory_info(self, device: torch.device | None = None) -> tuple[int, int]:
        """(free, total) bytes of the GPU, device-wide: TensorRT's and ONNX Runtime's allocations count as used."""
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)

    def device_name(self, device: torch.device) -> str:
        return torch.cuda.get_device_name(device)

    def capability(self, device: torch.device) -> tuple[int, int]:
        major, minor = torch.cuda.get_device_capability(device)
        return int(major), int(minor)


DEFAULT_CUDA = TorchCuda()
