"""The scheduling policy, alone: row cap, buckets, least-recently-served fairness, admission of a stream's rows."""

from __future__ import annotations

import math

import pytest

from streamdiff import ConfigError
from streamdiff.engine import Demand, Scheduler


def run_ticks(scheduler: Scheduler, demands: list[Demand], ticks: int) -> list[tuple[int, ...]]:
    served = []
    for _ in range(ticks):
        plan = scheduler.schedule(demands)
        served.append(plan.stream_ids)
        scheduler.served(plan.stream_ids)
    return served


def test_one_call_per_bucket_under_the_cap() -> None:
    scheduler = Scheduler(max_batch_rows=16)
    plan = scheduler.schedule([Demand(1, "64", 2), Demand(2, "64", 6), Demand(3, "96", 4), Demand(4, "64", 4)])
    calls = {call.bucket: call for call in plan.calls}
    assert set(calls) == {"64", "96"}
    assert calls["64"].stream_ids == (1, 2, 4) and calls["64"].rows == 12
    assert calls["96"].stream_ids == (3,) and plan.waiting == ()


@pytest.mark.parametrize("streams, rows, cap", [(5, 2, 4), (7, 2, 6), (4, 3, 3), (9, 1, 4), (6, 4, 16)])
def test_every_stream_is_served_at_least_once_every_ceil_streams_over_fit_ticks(streams: int, rows: int, cap: int) -> None:
    scheduler = Scheduler(max_batch_rows=cap)
    demands = [Demand(i, "b", rows) for i in range(streams)]
    fit = cap // rows
    period = math.ceil(streams / fit)
    served = run_ticks(scheduler, demands, 5 * period)
    for tick in served:
        assert sum(rows for _ in tick) <= cap and len(tick) == min(fit, streams)
    for sid in range(streams):
        ticks = [t for t, ids in enumerate(served) if sid in ids]
        gaps = [b - a for a, b in zip([-1] + ticks, ticks + [len(served)])]
        assert max(gaps) <= period, (sid, ticks)


def test_a_large_stream_is_not_starved_by_small_ones() -> None:
    """A 6-row stream among 2-row streams under a cap of 8: least recently served first means it still runs."""
    scheduler = Scheduler(max_batch_rows=8)
    demands = [Demand(0, "b", 6)] + [Demand(i, "b", 2) for i in range(1, 6)]
    served = run_ticks(scheduler, demands, 30)
    big = [t for t, ids in enumerate(served) if 0 in ids]
    assert len(big) >= 6 and max(b - a for a, b in zip(big, big[1:])) <= 5


def test_rows_above_the_cap_are_refused_with_the_numbers() -> None:
    scheduler = Scheduler(max_batch_rows=8)
    with pytest.raises(ConfigError, match=r"needs 12 U-Net rows per call, more than the engine's max_batch_rows=8"):
        scheduler.check_rows(12)
    with pytest.raises(ConfigError, match="max_batch_rows=0 must be an integer >= 1"):
        Scheduler(0)


def test_forgotten_streams_lose_their_place() -> None:
    scheduler = Scheduler(max_batch_rows=2)
    demands = [Demand(1, "b", 2), Demand(2, "b", 2)]
    assert run_ticks(scheduler, demands, 2) == [(1,), (2,)]
    scheduler.forget(1)
    scheduler.forget(2)
    # Both are new again: the order they are first seen in decides.
    assert scheduler.schedule([Demand(2, "b", 2), Demand(1, "b", 2)]).stream_ids == (2,)
