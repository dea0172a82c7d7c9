"""A CPU stand-in for :class:`streamdiff.backends.cuda_ops.TorchCuda`: streams, waits, buffers and CUDA graphs.

Buffers are CPU tensors filled with NaN (a kernel reading an unwritten buffer shows up in the values) and registered
by address, so the fake ``tensorrt`` can read and write the memory a context was bound to. A "graph" records the
enqueues made while capturing and runs them again on replay, with the addresses they were captured with — as a real
CUDA graph does — so a runtime that rebinds buffers without recapturing computes stale values here too.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch


@dataclass(eq=False)
class FakeStream:
    handle: int


@dataclass(eq=False)
class FakeGraph:
    ops: list[Callable[[], None]]
    replays: int = 0
    released: bool = False


@dataclass
class FakeCuda:
    """Records what the runtime asks of the device; ``fail_capture`` makes the next captures raise."""

    fail_capture: bool = False
    events: list[tuple[Any, ...]] = field(default_factory=list)
    graphs: list[FakeGraph] = field(default_factory=list)
    capturing: list[Callable[[], None]] | None = None
    active: FakeStream | None = None
    allocated: int = 0
    free_bytes: int = 60 << 30
    total_bytes: int = 80 << 30

    def __post_init__(self) -> None:
        self._handles = itertools.count(0x1000, 0x10)
        self.default = FakeStream(0)
        self.memory: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    # the seam -------------------------------------------------------------------------------------------------------

    def new_stream(self, device: torch.device) -> FakeStream:
        return FakeStream(next(self._handles))

    def current_stream(self, device: torch.device) -> FakeStream:
        return self.active or self.default

    def handle(self, stream: FakeStream) -> int:
        return stream.handle

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    def wait(self, waiter: FakeStream, producer: FakeStream) -> None:
        self.events.append(("wait", waiter.handle, producer.handle))

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        if tensor.numel():
            self.memory[tensor.data_ptr()] = tensor
        self.allocated += 1
        self.events.append(("alloc", tuple(shape), (self.active or self.default).handle))
        return tensor

    def capture(self, stream: FakeStream, enqueue: Callable[[], None]) -> FakeGraph:
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.capturing = []
        try:
            enqueue()
            graph = FakeGraph(self.capturing)
        finally:
            self.capturing = None
        self.graphs.append(graph)
        self.events.append(("capture", stream.handle))
        return graph

    def replay(self, graph: FakeGraph) -> None:
        assert not graph.released, "replay of a released graph"
        graph.replays += 1
        for op in graph.ops:
            op()

    def release(self, graph: FakeGraph) -> None:
        graph.released = True

    def empty_cache(self) -> None:
        self.events.append(("empty_cache",))

    def memory_info(self, device: torch.device | None = None) -> tuple[int, int]:
        return self.free_bytes, self.total_bytes

    def device_name(self, device: torch.device) -> str:
        return "NVIDIA H100 80GB HBM3"

    def capability(self, device: torch.device) -> tuple[int, int]:
        return (9, 0)

    # for the fake tensorrt -------------------------------------------------------------------------------------------

    def tensor_at(self, address: int) -> torch.Tensor:
        """The buffer allocated at ``address`` (KeyError if it was freed or never allocated here)."""
        return self.memory[address]
