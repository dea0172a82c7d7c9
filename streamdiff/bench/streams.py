"""``streamdiff bench --only streams``: k streams on one model, cross-stream batching against taking turns.

For each k, two engines serve the same k streams (different prompts and seeds, RCFG self, 2 steps):

- ``batched-k``: the engine's own policy — every stream's rows in ONE U-Net call per tick;
- ``turns-k``: what other servers do — the streams take turns on the shared model, one U-Net call per stream
  (the same engine with ``max_batch_rows`` set to one stream's rows, so its scheduler serves one stream per tick).

A round gives every stream a new frame and ticks until each has produced its output. Aggregate frames/s is k frames
per round time; each stream's latency is from the round's start (all frames submitted) to its output. Rounds of all
configurations are interleaved (:func:`~streamdiff.bench.harness.run_interleaved`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..backends.torch_backend import TorchUNet, TorchVae
from ..engine import EngineConfig, Stream, StreamEngine
from ..engine.state import stream_rows
from .harness import Case, Check, Comparison, run_interleaved

COUNTS = (1, 2, 4, 8)
PROMPTS = ("a watercolor portrait", "an oil painting", "a charcoal sketch", "neon city at night",
           "a marble statue", "pixel art", "a stained glass window", "an ink drawing")


class StreamsCase:
    """k streams on one engine; :meth:`step` is one round (a frame each, ticks until every stream has output)."""

    def __init__(
        self, model: Any, config: Any, count: int, batched: bool, frames: list[torch.Tensor], warmup: int = 0
    ) -> None:
        layout = model.dtype == torch.bfloat16  # the fastest eager layout of each precision here
        rows = stream_rows(config)
        self.engine = StreamEngine(
            model, EngineConfig(max_streams=count, max_batch_rows=rows * count if batched else rows),
            unet=TorchUNet(model.unet, channels_last=layout), vae=TorchVae(model.vae, channels_last=layout),
        )
        self.streams: list[Stream] = [
            self.engine.open_stream(config, prompt=PROMPTS[i % len(PROMPTS)], seed=i + 1) for i in range(count)
        ]
        self.frames = [f[0].to(torch.float32) for f in frames]
        self.latencies: dict[int, list[float]] = {s.id: [] for s in self.streams}
        self.ticks = 0
        self.rounds = 0
        self.warmup = warmup  # rounds whose latencies are not kept (model warm-up, Stream Batch filling)

    def step(self) -> None:
        started = time.perf_counter()
        frame = self.frames[self.rounds % len(self.frames)]
        for stream in self.streams:
            stream.submit(frame)
        waiting = set(self.streams)
        while waiting:
            produced = self.engine.step({})
            self.ticks += 1
            now = time.perf_counter()
            for stream in produced:
                if stream in waiting:
                    if self.rounds >= self.warmup:
                        self.latencies[stream.id].append(now - started)
                    waiting.discard(stream)
        self.rounds += 1

    def metrics(self) -> dict[str, float]:
        p50 = [statistics.median(v) for v in self.latencies.values()]
        p95 = [_percentile(v, 95) for v in self.latencies.values()]
        rows = self.engine.stats.recent_rows
        return {
            "latency_p50_ms_max": 1000 * max(p50),
            "latency_p95_ms_min": 1000 * min(p95),
            "latency_p95_ms_max": 1000 * max(p95),
            "p95_spread": max(p95) / min(p95),
            "unet_calls_per_round": self.engine.stats.unet_calls / max(self.rounds, 1),
            "rows_per_call": sum(rows) / max(len(rows), 1),
        }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def compare_streams(
    model: Any, config: Any, frames: list[torch.Tensor], rounds: int, warmup: int, counts: tuple[int, ...] = COUNTS
) -> Comparison:
    """Batched vs taking turns for each k in ``counts``, all interleaved; checks the 4-stream targets."""
    cases = {}
    for count in counts:
        for batched in (True, False):
            name = f"{'batched' if batched else 'turns'}-k{count}"
            cases[name] = StreamsCase(model, config, count, batched, frames, warmup)
    results = run_interleaved(
        [Case(name, case.step, items=len(case.streams)) for name, case in cases.items()], rounds, 1, warmup
    )
    baseline = f"turns-k{counts[0]}"
    comparison = Comparison("streams", results, baseline=baseline,
                            metrics={name: case.metrics() for name, case in cases.items()})
    for count in counts:
        if count > 1:
            gain = comparison.speedup(f"batched-k{count}", over=f"turns-k{count}")
            comparison.metrics[f"batched-k{count}"]["x_turns"] = gain
    if 4 in counts:
        comparison.checks.append(Check("4 streams batched / taking turns, aggregate frames/s",
                                       comparison.speedup("batched-k4", over="turns-k4"), 1.15))
        comparison.checks.append(Check("4 streams batched: highest / lowest per-stream p95 latency",
                                       comparison.metrics["batched-k4"]["p95_spread"], 1.5, higher_is_better=False))
    comparison.note = ("frames/s is aggregate over the k streams; latency from submitting the round's frames to "
                       "each stream's output")
    return comparison
