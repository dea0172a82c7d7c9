"""Counters and latency statistics of a streaming run, shared by the stages (thread-safe).

Latency is end to end: from a frame's capture timestamp (taken right after the source returned it) to the moment a
sink finished writing the output made from it. Times come from ``time.perf_counter``.
"""

from __future__ import annotations

import enum
from itertools import islice
import json
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Latency samples kept for percentiles (the newest ones); the maximum is tracked over the whole run.
LATENCY_WINDOW = 100_000


class DropReason(str, enum.Enum):
    """Why a captured frame produced no output."""

    SUPERSEDED = "superseded"  # a newer frame replaced it in a latest-wins queue
    FILTER_SKIP = "filter_skip"  # the similarity filter skipped it (StreamOutput.skipped)
    RECONFIGURE = "reconfigure"  # it was inside the Stream Batch when a shape change restarted the batch


def percentile_ms(samples: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``samples`` (seconds) in milliseconds, None when empty."""
    if not samples:
        return None
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q) * 1000.0)


def rate(count: int, first: float | None, last: float | None) -> float | None:
    """Events per second from ``count`` events between ``first`` and ``last`` (count−1 intervals)."""
    if count < 2 or first is None or last is None or last <= first:
        return None
    return (count - 1) / (last - first)


@dataclass(frozen=True)
class RunSummary:
    """What a run did: counts, rates, drops and latency. ``to_json()`` for machines, ``format()`` for people."""

    frames_in: int
    frames_out: int
    fps_in: float | None
    fps_out: float | None
    drops: dict[str, int]
    filter_skips: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_max_ms: float | None
    duration_s: float
    sinks: dict[str, int] = field(default_factory=dict)
    queue_max_depth: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    interrupted: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def status_line(self) -> str:
        """One short line for periodic progress output."""
        return (
            f"in {self.frames_in} ({_num(self.fps_in)} fps) | out {self.frames_out} ({_num(self.fps_out)} fps) | "
            f"latency p50 {_num(self.latency_p50_ms)} ms | drops {sum(self.drops.values())}"
        )

    def format(self) -> str:
        """A few lines for the end of a run."""
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.drops.items())) or "none"
        lines = [
            f"frames   in {self.frames_in}, out {self.frames_out} in {self.duration_s:.2f} s",
            f"fps      in {_num(self.fps_in)}, out {_num(self.fps_out)}",
            f"drops    {drops} (filter skips {self.filter_skips})",
            f"latency  p50 {_num(self.latency_p50_ms)} ms, p95 {_num(self.latency_p95_ms)} ms, "
            f"max {_num(self.latency_max_ms)} ms",
        ]
        if len(self.sinks) > 1:
            lines.append("sinks    " + ", ".join(f"{k} {v}" for k, v in self.sinks.items()))
        if self.error:
            lines.append(f"error    {self.error}")
        return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


class RunMetrics:
    """Thread-safe counters fed by the stages; :meth:`summary` freezes them into a :class:`RunSummary`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.perf_counter()
        self.frames_in = 0
        self._first_in: float | None = None
        self._last_in: float | None = None
        self.drops: Counter[str] = Counter()
        self._sink_counts: dict[str, int] = {}
        self._out_times: dict[str, tuple[float, float]] = {}
        # (write time, latency) pairs, newest last.
        self.latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW)
        self._max_latency: float | None = None

    def record_capture(self, captured: float) -> None:
        with self._lock:
            self.frames_in += 1
            if self._first_in is None:
                self._first_in = captured
            self._last_in = captured

    def record_drop(self, reason: DropReason, count: int = 1) -> None:
        if count:
            with self._lock:
                self.drops[reason.value] += count

    def add_sink(self, name: str) -> None:
        with self._lock:
            self._sink_counts.setdefault(name, 0)

    def record_output(self, sink: str, captured: float, written: float) -> None:
        latency = written - captured
        with self._lock:
            self._sink_counts[sink] = self._sink_counts.get(sink, 0) + 1
            first, _ = self._out_times.get(sink, (written, written))
            self._out_times[sink] = (first, written)
            self.latencies.append((written, latency))
            if self._max_latency is None or latency > self._max_latency:
                self._max_latency = latency

    def summary(
        self,
        queue_max_depth: dict[str, int] | None = None,
        error: str | None = None,
        interrupted: bool = False,
        extra_drops: dict[DropReason, int] | None = None,
    ) -> RunSummary:
        """The run so far; ``extra_drops`` adds drops counted elsewhere (by the engine: superseded inputs,
        frames inside the Stream Batch at a change of shape)."""
        with self._lock:
            samples = [lat for _, lat in self.latencies]
            drops = Counter(self.drops)
            for reason, count in (extra_drops or {}).items():
                if count:
                    drops[reason.value] += count
            counts = dict(self._sink_counts)
            # The output rate and count of the sink that wrote the least (all of them in lossless mode).
            slowest = min(counts, key=lambda k: counts[k]) if counts else None
            frames_out = counts[slowest] if slowest else 0
            first_out, last_out = self._out_times.get(slowest, (None, None)) if slowest else (None, None)
            return RunSummary(
                frames_in=self.frames_in,
                frames_out=frames_out,
                fps_in=rate(self.frames_in, self._first_in, self._last_in),
                fps_out=rate(frames_out, first_out, last_out),
                drops=dict(drops),
                filter_skips=drops.get(DropReason.FILTER_SKIP.value, 0),
                latency_p50_ms=percentile_ms(samples, 50),
                latency_p95_ms=percentile_ms(samples, 95),
                latency_max_ms=None if self._max_latency is None else self._max_latency * 1000.0,
                duration_s=time.perf_counter() - self.started,
                sinks=counts,
                queue_max_depth=dict(queue_max_depth or {}),
                error=error,
                interrupted=interrupted,
            )

    def recent(self, count: int = 30) -> tuple[float | None, float | None, int]:
        """(output fps, median latency ms) over the last ``count`` writes, and total drops: for overlays."""
        with self._lock:
            last = list(islice(reversed(self.latencies), count))[::-1]
            drops = sum(self.drops.values())
        if not last:
            return None, None, drops
        fps = rate(len(last), last[0][0], last[-1][0])
        return fps, percentile_ms([lat for _, lat in last], 50), drops

    def latency_series(self) -> list[tuple[float, float]]:
        """(write time, latency seconds) pairs in order, for tests and plots."""
        with self._lock:
            return list(self.latencies)


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    """The summary as a plain dict (what ``--stats-json`` writes)."""
    return asdict(summary)
