"""Prometheus metrics of ``streamdiff serve`` (``/metrics``), on a registry of their own.

Counters mirror what the sans-I/O connection and the engine already count (one owner per number): a session hands
its :class:`~streamdiff.protocol.session.ConnectionStats` and its stream's :class:`~streamdiff.engine.StreamStats` to
:meth:`ServerMetrics.sync`, which adds what changed since the last call. Engine-wide figures (ticks, U-Net calls
and rows per call) are read from ``engine.stats`` when ``/metrics`` is scraped.

Metric names (counters carry the ``_total`` suffix on the wire)::

    streamdiff_streams_active, streamdiff_viewers_active            gauges
    streamdiff_connections_total{route}                             stream, view, refused
    streamdiff_frames_received_total                                binary frames with a valid header
    streamdiff_frames_in_total                                      frames the engine took
    streamdiff_frames_out_total                                     output frames sent to stream clients
    streamdiff_frames_dropped_total{reason}                         rate_limited, rejected, superseded, congested,
                                                                    output_superseded
    streamdiff_filter_skips_total                                   frames the similarity filter skipped
    streamdiff_errors_total{code}                                   error messages sent, by error code
    streamdiff_closes_total{code}                                   stream connections ended, by close code
    streamdiff_latency_seconds{stage}                               histograms: decode, queue, engine, encode,
                                                                    server (input received → output sent)
    streamdiff_unet_batch_rows                                      histogram: U-Net rows per call
    streamdiff_engine_ticks_total, streamdiff_engine_unet_calls_total, streamdiff_engine_unet_rows_total
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import missing_extra

__all__ = ["DROP_REASONS", "SyncState", "ServerMetrics"]

DROP_REASONS = ("rate_limited", "rejected", "superseded", "congested", "output_superseded")
LATENCY_STAGES = ("decode", "queue", "engine", "encode", "server")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class SyncState:
    """What :meth:`ServerMetrics.sync` has already counted for one session."""

    counted: dict[str, int] = field(default_factory=dict)


class ServerMetrics:
    """The metrics of one server; ``engine`` (optional) is read at scrape time."""

    def __init__(self, engine: Any = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise missing_extra("prometheus_client", "server") from None
        self.engine = engine
        self.registry = registry = CollectorRegistry()
        self.streams = Gauge("streamdiff_streams_active", "Streams being served", registry=registry)
        self.viewers = Gauge("streamdiff_viewers_active", "View-only sockets open", registry=registry)
        self.connections = Counter("streamdiff_connections", "WebSocket connections opened, by route",
                                   ["route"], registry=registry)
        self.frames_received = Counter("streamdiff_frames_received", "Binary frames received with a valid header",
                                       registry=registry)
        self.frames_in = Counter("streamdiff_frames_in", "Frames the engine took", registry=registry)
        self.frames_out = Counter("streamdiff_frames_out", "Output frames sent to stream clients", registry=registry)
        self.frames_dropped = Counter("streamdiff_frames_dropped", "Frames dropped, by reason", ["reason"],
                                      registry=registry)
        self.filter_skips = Counter("streamdiff_filter_skips", "Frames skipped by the similarity filter",
                                    registry=registry)
        self.errors = Counter("streamdiff_errors", "Error messages sent, by error code", ["code"], registry=registry)
        self.closes = Counter("streamdiff_closes", "Stream connections ended, by close code", ["code"],
                              registry=registry)
        self.latency = Histogram("streamdiff_latency_seconds", "Server-side time per output frame, by stage",
                                 ["stage"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_rows = Histogram("streamdiff_unet_batch_rows", "U-Net rows per call (all streams batched)",
                                    buckets=_ROW_BUCKETS, registry=registry)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason)
        for stage in LATENCY_STAGES:
            self.latency.labels(stage)
        self._lock = threading.Lock()
        self._calls_seen = 0
        if engine is not None:
            registry.register(_EngineCollector(self))

    def sync(self, state: SyncState, connection: Any, stream: Any = None, drops: dict[str, int] | None = None) -> None:
        """Add what ``connection.stats`` (ConnectionStats), ``stream.stats`` (StreamStats) and the session's own
        ``drops`` counted since the last call for this ``state``."""
        c = connection.stats
        values = {"received": c.frames_received, "rate_limited": c.frames_rate_limited,
                  "rejected": c.frames_rejected, "out": c.frames_out}
        values.update({f"error:{code}": n for code, n in c.errors_by_code.items()})
        if stream is not None:
            s = stream.stats
            values.update({"in": s.frames_in, "skips": s.filter_skips, "engine_superseded": s.dropped_inputs})
        for reason, n in (drops or {}).items():
            values[f"drop:{reason}"] = n
        for key, value in values.items():
            delta = value - state.counted.get(key, 0)
            if delta <= 0:
                continue
            state.counted[key] = value
            self._counter(key).inc(delta)

    def _counter(self, key: str) -> Any:
        if key.startswith("error:"):
            return self.errors.labels(key[6:])
        if key.startswith("drop:"):
            return self.frames_dropped.labels(key[5:])
        return {"received": self.frames_received, "in": self.frames_in, "out": self.frames_out,
                "skips": self.filter_skips, "rate_limited": self.frames_dropped.labels("rate_limited"),
                "rejected": self.frames_dropped.labels("rejected"),
                "engine_superseded": self.frames_dropped.labels("superseded")}[key]

    def observe_latency(self, **seconds: float) -> None:
        """One output frame's server-side times, in seconds, by stage."""
        for stage, value in seconds.items():
            self.latency.labels(stage).observe(max(0.0, value))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._collect_batch_rows()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _collect_batch_rows(self) -> None:
        """Feed the rows of the U-Net calls made since the last scrape into the histogram.

        The engine keeps the rows of its last 1000 calls; calls beyond that between two scrapes are left out of
        the histogram (the counters stay exact)."""
        if self.engine is None:
            return
        with self._lock:
            stats = self.engine.stats
            calls, recent = stats.unet_calls, list(stats.recent_rows)
            new = min(calls - self._calls_seen, len(recent))
            self._calls_seen = calls
            for rows in recent[len(recent) - new:] if new > 0 else ():
                self.batch_rows.observe(rows)


class _EngineCollector:
    """Engine-wide counters, read from ``engine.stats`` at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        stats = self.metrics.engine.stats
        for name, text, value in (("ticks", "Engine ticks", stats.ticks),
                                  ("unet_calls", "U-Net calls", stats.unet_calls),
                                  ("unet_rows", "U-Net rows computed (all streams)", stats.unet_rows),
                                  ("streams_failed", "Streams ended by an error in their work",
                                   stats.streams_failed)):
            yield CounterMetricFamily(f"streamdiff_engine_{name}", text, value=value)
