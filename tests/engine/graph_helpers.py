"""What the engine's CUDA-graph tests share: a CPU stand-in for the CUDA seam whose graphs behave like CUDA graphs,
and the frame comparison.

The stand-in's graphs: a capture records the tensor operations the
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

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streamdiff.testing.cuda_seam import CallableCuda

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


class RecordingCuda(CallableCuda):
    """The CPU seam whose graphs are recorded operations; see the module docstring."""

    def record(self, enqueue: Callable[[], Any]) -> RecordedGraph:
        recorder = _Recorder()
        with recorder:
            enqueue()
        return RecordedGraph(recorder.ops)

    def run(self, graph: RecordedGraph) -> None:
        with torch.inference_mode():
            _rerun(graph.ops)


def assert_same(got: list[dict], expected: list[dict], at_least: int) -> None:
    """Two runs' outputs by tick and stream name ((frame ids, images)) are the same, bit for bit, and there are
    ``at_least`` of them."""
    assert [sorted(t) for t in got] == [sorted(t) for t in expected]
    assert sum(len(t) for t in expected) >= at_least
    for tick, (g, e) in enumerate(zip(got, expected)):
        for name in e:
            assert g[name][0] == e[name][0]
            assert torch.equal(g[name][1], e[name][1]), (tick, name, float((g[name][1] - e[name][1]).abs().max()))


def tick_outputs(engine: Any, streams: dict[str, Any], inputs: dict[Any, Any], cuda: CallableCuda | None) -> dict:
    """One ``engine.step(inputs)``: each named stream's (frame ids, images) where it produced frames; with ``cuda``,
    checks that the tick made ONE host copy when anything was produced (none otherwise)."""
    copies = cuda.host_copies if cuda else 0
    outputs = engine.step(inputs)
    produced = {name: (out.frame_ids, out.images) for name, s in streams.items()
                if (out := outputs.get(s)) is not None and out.images is not None and not out.skipped}
    if cuda is not None:
        assert cuda.host_copies - copies == (1 if produced else 0), produced.keys()
    return produced
