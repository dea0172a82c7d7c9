"""The multi-stream engine: one model, one worker thread, many streams, every stream's rows in one U-Net call.

::

    engine = StreamEngine.from_pretrained("tiny", max_streams=8)
    a = engine.open_stream(StreamConfig(width=256, height=256, t_index_list=[32, 45]), prompt="watercolor", seed=1)
    b = engine.open_stream(StreamConfig(width=256, height=256, t_index_list=[20, 30, 40], cfg_type="full"),
                           prompt="an oil painting", negative_prompt="blurry", guidance_scale=1.6, seed=2)
    outputs = engine.step({a: frame_a, b: frame_b})   # one tick, synchronously: {stream: StreamOutput}

    engine.start()                                     # or threaded: ticks run whenever a stream has work
    a.submit(frame, frame_id=7); out = a.get(timeout=1)
    a.update(prompt="charcoal sketch")                 # validated now, applied between ticks
    a.close(); engine.stop()

Modules: ``engine`` (StreamEngine: the worker that owns the model), ``stream`` (Stream handles), ``inbox`` (the
one input queue: a handle's operations as typed messages), ``records`` (the engine's own per-stream records),
``outputs`` (StreamOutput and the queue the engine writes them to), ``scheduler`` (pure batching policy),
``batch`` (assembling and splitting a call), ``state`` (per-stream numerics), ``execute`` (the execute phase of a
tick), ``changes`` (applying settings to states), ``limits`` (EngineConfig, EngineStats), ``shapes`` (the
frame sizes an engine runs: SizeRule).
"""

from __future__ import annotations

from .engine import StreamEngine
from .limits import SINGLE_STREAM, EngineConfig, EngineStats
from .scheduler import Call, Demand, Scheduler, TickPlan
from .shapes import SizeRule
from .state import StreamStats
from .outputs import StreamOutput
from .stream import Stream

__all__ = [
    "SINGLE_STREAM",
    "Call",
    "Demand",
    "EngineConfig",
    "EngineStats",
    "Scheduler",
    "SizeRule",
    "Stream",
    "StreamEngine",
    "StreamOutput",
    "StreamStats",
    "TickPlan",
]
