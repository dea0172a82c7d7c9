"""Run metrics: counts, rates, percentiles, JSON."""

from __future__ import annotations

import json

import numpy as np

from streamdiff.runtime import DropReason, RunMetrics
from streamdiff.runtime.metrics import percentile_ms, rate


def test_percentiles_and_rates() -> None:
    rng = np.random.default_rng(0)
    samples = list(rng.uniform(0.01, 0.2, 501))
    assert abs(percentile_ms(samples, 50) - 1000 * float(np.median(samples))) < 1e-9
    assert percentile_ms([], 95) is None
    assert rate(11, 1.0, 3.0) == 5.0
    assert rate(1, 1.0, 1.0) is None


def test_summary_counts_per_sink_and_reason() -> None:
    metrics = RunMetrics()
    for i in range(10):
        metrics.record_capture(100.0 + i * 0.1)
    metrics.record_drop(DropReason.SUPERSEDED, 3)
    metrics.record_drop(DropReason.FILTER_SKIP)
    metrics.add_sink("a")
    metrics.add_sink("b")
    for i in range(6):
        metrics.record_output("a", 100.0 + i * 0.1, 100.05 + i * 0.1)
    for i in range(4):
        metrics.record_output("b", 100.0 + i * 0.1, 100.25 + i * 0.1)
    summary = metrics.summary({"source": 1})
    assert summary.frames_in == 10
    assert summary.frames_out == 4  # the sink that wrote least
    assert summary.sinks == {"a": 6, "b": 4}
    assert summary.drops == {"superseded": 3, "filter_skip": 1}
    assert summary.filter_skips == 1
    assert abs(summary.fps_in - 10.0) < 1e-6
    assert abs(summary.latency_max_ms - 250.0) < 1e-6
    data = json.loads(summary.to_json())
    assert data["frames_out"] == 4 and data["queue_max_depth"] == {"source": 1}
    assert "p50" in summary.format() and "in 10" in summary.status_line()
