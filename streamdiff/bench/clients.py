"""Loopback clients for the server benchmarks (``tools/bench_server.py``, ``tools/bench_ray.py``).

Each client is a good client of the protocol (docs/protocol.md): frames pipelined, at most ``n·F + 1`` awaiting
their output (frames the server reports lost no longer count as awaiting), at most the server's
``max_input_fps``, bodies encoded once beforehand so that the clients cost little. A round opens ``count``
clients, streams for ``warmup + seconds`` and keeps what arrived in the last ``seconds``: per-client output
frames/s, end-to-end latency (capture → output received, the client's clock), server-side latency (input received →
output sent, from the output header) and the frames the server dropped.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Callable

from ..client import StreamClient
from ..protocol.client import OutputFrame

__all__ = ["client_round", "format_table", "quantile", "stream_until", "summarise"]


async def stream_until(client: StreamClient, bodies: list[bytes], end: float,
                       on_output: Callable[[OutputFrame], None], on_sent: Callable[[float], None] | None = None
                       ) -> int:
    """Stream ``bodies`` (round robin) as a good client until ``end`` (perf_counter) or the close; every output
    goes to ``on_output`` as it arrives, every send's time to ``on_sent``. Returns the frames sent."""
    limits, settings = client.ready.limits, client.settings.stream
    window = settings.denoising_steps * settings.frame_buffer_size + 1
    min_interval = 1.0 / float(limits["max_input_fps"])
    waiting: dict[int, float] = {}
    accounted, index, last_sent = 0, 0, 0.0
    while True:
        now = time.perf_counter()
        if now >= end or client.closed.is_set():
            break
        while client.outputs:
            out = client.outputs.popleft()
            answered = [f for f in waiting if f <= out.frame_id]
            for frame_id in answered:
                del waiting[frame_id]
            accounted += max(0, len(answered) - 1)
            on_output(out)
        for frame_id in [f for f, t in waiting.items() if now - t > 3.0]:
            del waiting[frame_id]
        awaiting = len(waiting) - max(0, client.frames_lost - accounted)
        if awaiting >= window or now - last_sent < min_interval:
            client.changed.clear()
            try:
                await asyncio.wait_for(client.changed.wait(), max(0.001, min_interval - (now - last_sent)))
            except asyncio.TimeoutError:
                pass
            continue
        await client.send_frame(bodies[index % len(bodies)], frame_id=index % 2**32)
        waiting[index % 2**32] = last_sent = time.perf_counter()
        if on_sent is not None:
            on_sent(last_sent)
        index += 1
    return index


async def _stream(client: StreamClient, bodies: list[bytes], start: float, end: float) -> dict[str, Any]:
    """Stream until ``end``; keep what arrived in [start, end)."""
    e2e: list[float] = []
    server: list[float] = []
    lost_at_start: list[int] = []

    def on_output(out: OutputFrame) -> None:
        now = time.perf_counter()
        if now >= start and not lost_at_start:
            lost_at_start.append(client.frames_lost)
        if start <= now < end:
            e2e.append(out.latency_ms)
            server.append(out.timings.server_ms)

    sent: list[float] = []
    await stream_until(client, bodies, end, on_output, lambda at: sent.append(at) if start <= at < end else None)
    return {"outputs": len(e2e), "sent": len(sent), "e2e_ms": e2e, "server_ms": server, "dropped": client.frames_lost - (lost_at_start or [0])[0]}


async def client_round(url: str, count: int, size: int, bodies: list[bytes], warmup: float, seconds: float
                       ) -> dict[str, Any]:
    """``count`` clients (own prompt and seed each) on ``url`` at ``size``², measured for ``seconds`` after
    ``warmup``."""
    clients = [await StreamClient.connect(url, {"width": size, "height": size, "prompt": f"client {i}", "seed": i})
               for i in range(count)]
    start = time.perf_counter() + warmup
    end = start + seconds
    try:
        results = await asyncio.gather(*(_stream(c, bodies, start, end) for c in clients))
    finally:
        for client in clients:
            await client.close()
    e2e = [v for r in results for v in r["e2e_ms"]]
    server = [v for r in results for v in r["server_ms"]]
    per_client = [r["outputs"] / seconds for r in results]
    return {
        "clients": count, "aggregate_fps": sum(per_client), "per_client_fps": per_client,
        "e2e_p50_ms": quantile(e2e, 0.5), "e2e_p95_ms": quantile(e2e, 0.95),
        "server_p50_ms": quantile(server, 0.5), "server_p95_ms": quantile(server, 0.95),
        "sent": sum(r["sent"] for r in results), "dropped": sum(r["dropped"] for r in results),
    }


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over the rounds of one configuration (per-client frames/s: mean, min and max over every client
    of every round)."""
    per_client = [fps for r in rounds for fps in r["per_client_fps"]]
    sent, dropped = sum(r["sent"] for r in rounds), sum(r["dropped"] for r in rounds)
    return {
        "clients": rounds[0]["clients"], "rounds": len(rounds),
        "aggregate_fps": statistics.median(r["aggregate_fps"] for r in rounds),
        "per_client_fps_mean": statistics.mean(per_client), "per_client_fps_min": min(per_client),
        "per_client_fps_max": max(per_client),
        **{key: statistics.median(r[key] for r in rounds)
           for key in ("e2e_p50_ms", "e2e_p95_ms", "server_p50_ms", "server_p95_ms")},
        "dropped_percent": 100.0 * dropped / sent if sent else 0.0,
    }


def format_table(rows: list[dict[str, Any]], first: str = "clients") -> str:
    """A Markdown table of :func:`summarise` rows; ``first`` names the column that tells the rows apart."""
    lines = [f"{first} | aggregate fps | per-client fps (min-max) | e2e p50 / p95 ms | server p50 / p95 ms | dropped",
             "---: | ---: | ---: | ---: | ---: | ---:"]
    for r in rows:
        lines.append(f"{r[first]} | {r['aggregate_fps']:.1f} | {r['per_client_fps_mean']:.2f} "
                     f"({r['per_client_fps_min']:.2f}-{r['per_client_fps_max']:.2f}) | "
                     f"{r['e2e_p50_ms']:.0f} / {r['e2e_p95_ms']:.0f} | {r['server_p50_ms']:.0f} / "
                     f"{r['server_p95_ms']:.0f} | {r['dropped_percent']:.1f} %")
    return "\n".join(lines)
