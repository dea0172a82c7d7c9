"""The engine's scheduling policy: which ready streams run this tick, in which U-Net call. Pure bookkeeping.

Every tick the engine lists the streams that have work (:class:`Demand`: a new frame group, or frames to flush) and
asks :meth:`Scheduler.schedule` for a :class:`TickPlan`. Streams whose latents have the same shape share a *bucket*
and ONE U-Net call per tick; a call holds at most ``max_batch_rows`` rows. When the cap is hit, streams are taken in
least-recently-served order (ties: the order they were opened), so the stream served longest ago always runs and
none starves: with k streams of equal rows and ``fit = max_batch_rows // rows`` of them per call, each is served at
least once every ⌈k / fit⌉ ticks. Streams left out wait for the next tick with their newest frame.

Nothing here touches a device, a tensor or a clock.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Demand:
    """A stream that has work this tick: its bucket (latent shape), the U-Net rows it needs per call."""

    stream_id: int
    bucket: Hashable
    rows: int


@dataclass(frozen=True)
class Call:
    """One U-Net call of a tick: the streams whose rows it concatenates, in this order."""

    bucket: Hashable
    stream_ids: tuple[int, ...]
    rows: int


@dataclass(frozen=True)
class TickPlan:
    """What runs this tick: one call per bucket; ``waiting`` are ready streams left for a later tick."""

    calls: tuple[Call, ...]
    waiting: tuple[int, ...]

    @property
    def stream_ids(self) -> tuple[int, ...]:
        return tuple(sid for call in self.calls for sid in call.stream_ids)


class Scheduler:
    """Least-recently-served, row-capped batching of streams into one U-Net call per bucket.

    Call :meth:`schedule` with the tick's demands, run the plan, then :meth:`served` with the streams that ran.
    :meth:`forget` a stream that closed.
    """

    def __init__(self, max_batch_rows: int) -> None:
        if isinstance(max_batch_rows, bool) or not isinstance(max_batch_rows, int) or max_batch_rows < 1:
            raise ConfigError(f"max_batch_rows={max_batch_rows!r} must be an integer >= 1")
        self.max_batch_rows = max_batch_rows
        self._last_served: dict[int, int] = {}
        self._order: dict[int, int] = {}
        self._tick = 0
        self._opened = 0

    def check_rows(self, rows: int) -> None:
        """Raise ConfigError when a stream needing ``rows`` rows per call could never be scheduled."""
        if rows > self.max_batch_rows:
            raise ConfigError(
                f"the stream needs {rows} U-Net rows per call, more than the engine's max_batch_rows="
                f"{self.max_batch_rows}; use fewer steps, a smaller frame_buffer_size or another cfg_type"
            )

    def _priority(self, demand: Demand) -> tuple[int, int]:
        sid = demand.stream_id
        if sid not in self._order:
            self._order[sid] = self._opened
            self._opened += 1
        return self._last_served.get(sid, -1), self._order[sid]

    def schedule(self, demands: Sequence[Demand]) -> TickPlan:
        """Pack ``demands`` into at most one call per bucket, least recently served first, ≤ ``max_batch_rows``."""
        members: dict[Hashable, list[int]] = {}
        used: dict[Hashable, int] = {}
        waiting = []
        for demand in sorted(demands, key=self._priority):
            self.check_rows(demand.rows)
            taken = used.get(demand.bucket, 0)
            if taken + demand.rows > self.max_batch_rows:
                waiting.append(demand.stream_id)
                continue
            used[demand.bucket] = taken + demand.rows
            members.setdefault(demand.bucket, []).append(demand.stream_id)
        calls = tuple(Call(bucket, tuple(ids), used[bucket]) for bucket, ids in members.items())
        return TickPlan(calls, tuple(waiting))

    def served(self, stream_ids: Sequence[int]) -> None:
        """Record that ``stream_ids`` ran in this tick, and end the tick."""
        for sid in stream_ids:
            self._last_served[sid] = self._tick
        self._tick += 1

    def forget(self, stream_id: int) -> None:
        """Drop the bookkeeping of a closed stream."""
        self._last_served.pop(stream_id, None)
        self._order.pop(stream_id, None)
