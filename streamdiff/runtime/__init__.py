"""Streaming runtime: bounded latest-wins slots, worker threads, metrics and the runner.

``StreamRunner(engine, source, sinks, RuntimeConfig(...)).run()`` streams until the end of input, a stop or Ctrl-C.
"""

from __future__ import annotations

from .controls import Controls
from .engine_stage import Engine, EngineStage
from .metrics import DropReason, RunMetrics, RunSummary
from .runner import RuntimeConfig, Sink, Source, StreamRunner
from .slots import Closed, FrameSlot, SlotPolicy
from .stages import END, CapturedFrame, OutputFrame

__all__ = [
    "END",
    "CapturedFrame",
    "Closed",
    "Controls",
    "DropReason",
    "Engine",
    "EngineStage",
    "FrameSlot",
    "OutputFrame",
    "RunMetrics",
    "RunSummary",
    "RuntimeConfig",
    "Sink",
    "SlotPolicy",
    "Source",
    "StreamRunner",
]
