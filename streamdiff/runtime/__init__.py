"""Streaming runtime: bounded latest-wins slots, worker threads, metrics and the runner.

``StreamRunner(engine, source, sinks, RuntimeConfig(...), stream_config=...).run()`` streams until the end of input, a stop or Ctrl-C.
"""

from __future__ import annotations

from .controls import Controls
from .metrics import DropReason, RunMetrics, RunSummary
from .runner import CaptureId, RuntimeConfig, Sink, Source, StreamEngineLike, StreamRunner
from .slots import Closed, FrameSlot, SlotPolicy
from .stages import END, OutputFrame

__all__ = [
    "END",
    "CaptureId",
    "Closed",
    "Controls",
    "DropReason",
    "FrameSlot",
    "OutputFrame",
    "RunMetrics",
    "RunSummary",
    "RuntimeConfig",
    "Sink",
    "SlotPolicy",
    "Source",
    "StreamEngineLike",
    "StreamRunner",
]
