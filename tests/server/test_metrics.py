"""streamdiff.server.metrics: counters mirror the connection's and the stream's, engine figures read at scrape."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from streamdiff.engine import EngineStats, StreamStats
from streamdiff.server.metrics import ServerMetrics, SyncState
from streamdiff.protocol.session import ConnectionStats


def _samples(metrics: ServerMetrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_sync_adds_only_what_changed_and_engine_figures_are_read_at_scrape() -> None:
    engine = SimpleNamespace(stats=EngineStats())
    metrics = ServerMetrics(engine)
    conn = SimpleNamespace(stats=ConnectionStats(frames_received=5, frames_rejected=1, frames_out=3,
                                                 errors_by_code={"bad_image": 1}))
    stream = SimpleNamespace(stats=StreamStats(frames_in=4, filter_skips=1, dropped_inputs=2))
    a, b = SyncState(), SyncState()
    metrics.sync(a, conn, stream, {"congested": 2})
    metrics.sync(a, conn, stream, {"congested": 2})  # nothing new
    metrics.sync(b, conn, None)
    conn.stats.frames_received = 7
    metrics.sync(a, conn, stream, {"congested": 3})
    for rows in (2, 4, 4):
        engine.stats.record_call(rows, 0)
    engine.stats.ticks = 3
    m = _samples(metrics)
    assert m[("streamdiff_frames_received_total", ())] == 7 + 5
    assert m[("streamdiff_frames_dropped_total", (("reason", "rejected"),))] == 2
    assert m[("streamdiff_frames_dropped_total", (("reason", "congested"),))] == 3
    assert m[("streamdiff_frames_dropped_total", (("reason", "superseded"),))] == 2
    assert m[("streamdiff_errors_total", (("code", "bad_image"),))] == 2
    assert m[("streamdiff_frames_in_total", ())] == 4 and m[("streamdiff_filter_skips_total", ())] == 1
    assert m[("streamdiff_engine_unet_calls_total", ())] == 3 and m[("streamdiff_engine_unet_rows_total", ())] == 10
    assert m[("streamdiff_unet_batch_rows_count", ())] == 3 and m[("streamdiff_unet_batch_rows_sum", ())] == 10
    assert m[("streamdiff_engine_ticks_total", ())] == 3
    engine.stats.record_call(8, 0)
    m = _samples(metrics)  # the histogram takes only the calls since the last scrape
    assert m[("streamdiff_unet_batch_rows_count", ())] == 4 and m[("streamdiff_unet_batch_rows_sum", ())] == 18
