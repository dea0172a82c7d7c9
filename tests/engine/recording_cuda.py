"""A CPU stand-in for the CUDA seam whose graphs behave like CUDA graphs: a capture records the tensor operations the
program queues (torch's dispatcher sees each one) with their arguments, and a replay runs those operations again —
not the Python that queued them.

So, as on a GPU: a Python value read while capturing is baked into the recorded operations; a tensor attribute
replaced after the capture is not seen by the replay (it reads the old tensor); host bookkeeping inside the program
does not happen at a replay; and reading a number back to the host inside a capture (``.item()``, ``float()``,
``bool()`` of a tensor) raises, as ``cudaStreamSynchronize`` inside a capture does.

Each recorded operation writes its result into the tensor it produced while capturing (the graph's memory pool), so
later operations that read it see the replay's values; views and in-place operations need no copy (they alias).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class HostSyncInCapture(RuntimeError):
    """A program read a device value back while it was being captured."""


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            raise HostSyncInCapture(f"{func} reads a device value back while capturing (operation not permitted "
                                    "when stream is capturing)")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _storages(values: Any) -> set[int]:
    found: set[int] = set()
    for value in values:
        if isinstance(value, torch.Tensor):
            found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, (tuple, list)):
            found |= _storages(value)
    return found


def _rerun(ops: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]]) -> None:
    """Each recorded operation again; a result that was fresh memory at capture gets the new values copied in (a
    result that shares an argument's memory — a view, an in-place or out= operation — already has them)."""
    for func, args, kwargs, captured in ops:
        fresh = func(*args, **kwargs)
        olds = captured if isinstance(captured, (tuple, list)) else (captured,)
        news = fresh if isinstance(fresh, (tuple, list)) else (fresh,)
        inputs = _storages((*args, *kwargs.values()))
        for old, new in zip(olds, news):
            if isinstance(old, torch.Tensor) and old.untyped_storage().data_ptr() not in inputs:
                old.copy_(new)


@dataclass(eq=False)
class RecordedGraph:
    ops: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]]
    replays: int = 0
    released: bool = False


@dataclass
class RecordingCuda:
    """Streams, NaN-filled buffers, recorded graphs and a counted host copy; see the module docstring."""

    graphs: list[RecordedGraph] = field(default_factory=list)
    capture_attempts: int = 0
    host_copies: int = 0
    replays: int = 0

    def new_stream(self, device: torch.device) -> object:
        return object()

    def current_stream(self, device: torch.device) -> str:
        return "default"

    @contextlib.contextmanager
    def use(self, stream: object) -> Iterator[None]:
        yield

    def wait(self, waiter: object, producer: object) -> None:
        pass

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(-1)

    def capture(self, stream: object, enqueue: Callable[[], Any]) -> RecordedGraph:
        self.capture_attempts += 1
        recorder = _Recorder()
        with recorder:
            enqueue()
        graph = RecordedGraph(recorder.ops)
        self.graphs.append(graph)
        return graph

    def replay(self, graph: RecordedGraph) -> None:
        assert not graph.released, "replay of a released graph"
        graph.replays += 1
        self.replays += 1
        with torch.inference_mode():
            _rerun(graph.ops)

    def release(self, graph: RecordedGraph) -> None:
        graph.released = True

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        self.host_copies += 1
        return tensor.clone()
