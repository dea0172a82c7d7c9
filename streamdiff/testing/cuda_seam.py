"""A CPU stand-in for :class:`streamdiff.backends.cuda_ops.TorchCuda`, for what runs the CUDA-graph code paths without
a GPU (``tools/gpu_check.py``'s dry run, ``tools/count_tick_ops.py``, the engine's graph tests).

A capture keeps the callable it is given and runs nothing; a replay calls it, so it reads whatever its buffers
hold then (a real graph reads them too, by address). Buffers start as NaN: a program reading one it never wrote
shows in its frames. It counts what it is asked. Tests that must catch values baked in at capture use the stricter
recording fake (``tests/engine/graph_helpers.py``), which replaces :meth:`CallableCuda.record` and
:meth:`CallableCuda.run`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


@dataclass(eq=False)
class CallableGraph:
    """A "graph": the callable a capture was given."""

    enqueue: Callable[[], Any]
    replays: int = 0
    released: bool = False


class CallableCuda:
    """See the module docstring. ``fail_capture``: every capture raises (as one that cannot be captured does);
    ``graphs`` holds every graph captured, ``waits`` counts stream orderings, ``capture_attempts`` the captures
    tried, ``replays`` and ``host_copies`` the rest."""

    def __init__(self, fail_capture: bool = False) -> None:
        self.fail_capture = fail_capture
        self.graphs: list[Any] = []
        self.capture_attempts = self.replays = self.host_copies = self.waits = 0

    def new_stream(self, device: torch.device) -> object:
        return object()

    def current_stream(self, device: torch.device) -> object:
        return "default"

    @contextlib.contextmanager
    def use(self, stream: object) -> Iterator[None]:
        yield

    def wait(self, waiter: object, producer: object) -> None:
        self.waits += 1

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(-1)

    def capture(self, stream: object, enqueue: Callable[[], Any]) -> Any:
        self.capture_attempts += 1
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = self.record(enqueue)
        self.graphs.append(graph)
        return graph

    def record(self, enqueue: Callable[[], Any]) -> Any:
        """The graph of ``enqueue`` (here: the callable itself, not run)."""
        return CallableGraph(enqueue)

    def replay(self, graph: Any) -> None:
        assert not graph.released, "replay of a released graph"
        graph.replays += 1
        self.replays += 1
        self.run(graph)

    def run(self, graph: Any) -> None:
        """What a replay does (here: call the callable again)."""
        graph.enqueue()

    def release(self, graph: Any) -> None:
        graph.released = True

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        self.host_copies += 1
        return tensor.clone()
