"""Benchmark ``streamdiff serve`` with 1, 2, 4 and 8 loopback clients: frames/s, latency and drops.

The server runs in its own process (``streamdiff serve``, the built-in tiny model unless ``--model``); the clients
run here, on one event loop, each a good client of the protocol: frames pipelined (at most ``n·F + 1`` awaiting
their output, reported losses not counted), at most the server's ``max_input_fps``, JPEG pre-encoded once (a
moving test pattern) so that the clients cost little. Client counts are interleaved over rounds (1 2 4 8, then
8 4 2 1, …) and every figure is the median over rounds. Per configuration it reports the aggregate and per-client
output frames/s, end-to-end latency (capture → output received, the client's clock) and server-side latency
(input received → output sent, from the output header), p50 and p95, and the frames the server dropped.

    python tools/bench_server.py                       # 1 2 4 8 clients, 256x256, tiny model: table + JSON
    python tools/bench_server.py --clients 1 4 --seconds 5 --rounds 1 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from typing import Any

from streamdiff.client import StreamClient
from streamdiff.io.sources import pattern_frame
from streamdiff.server.images import encode
from streamdiff.testing.serve import ServeProcess


def _lost(client: StreamClient) -> int:
    s = client.stats
    return s.get("frames_dropped", 0) + s.get("frames_rate_limited", 0) + s.get("frames_rejected", 0)


async def _client(client: StreamClient, bodies: list[bytes], start: float, end: float) -> dict[str, Any]:
    """Stream until ``end``; keep what arrived in [start, end)."""
    limits, settings = client.ready.limits, client.settings.stream
    window = settings.denoising_steps * settings.frame_buffer_size + 1
    min_interval = 1.0 / float(limits["max_input_fps"])
    waiting: dict[int, float] = {}
    accounted, index, last_sent = 0, 0, 0.0
    e2e, server, outputs = [], [], 0
    sent_in, lost_at_start = 0, None
    while True:
        now = time.perf_counter()
        if now >= end or client.closed.is_set():
            break
        if lost_at_start is None and now >= start:
            lost_at_start = _lost(client)
        while client.outputs:
            out = client.outputs.popleft()
            answered = [f for f in waiting if f <= out.frame_id]
            for frame_id in answered:
                del waiting[frame_id]
            accounted += max(0, len(answered) - 1)
            if start <= time.perf_counter() < end:
                outputs += 1
                e2e.append(out.latency_ms)
                server.append(out.timings.server_ms)
        for frame_id in [f for f, t in waiting.items() if now - t > 3.0]:
            del waiting[frame_id]
        awaiting = len(waiting) - max(0, _lost(client) - accounted)
        if awaiting >= window or now - last_sent < min_interval:
            client.changed.clear()
            try:
                await asyncio.wait_for(client.changed.wait(), max(0.001, min_interval - (now - last_sent)))
            except asyncio.TimeoutError:
                pass
            continue
        await client.send_frame(bodies[index % len(bodies)], frame_id=index % 2**32)
        waiting[index % 2**32] = last_sent = time.perf_counter()
        sent_in += start <= last_sent < end
        index += 1
    return {"outputs": outputs, "sent": sent_in, "e2e_ms": e2e, "server_ms": server,
            "dropped": _lost(client) - (lost_at_start or 0)}


async def _round(url: str, count: int, size: int, bodies: list[bytes], warmup: float, seconds: float
                 ) -> dict[str, Any]:
    clients = [await StreamClient.connect(url, {"width": size, "height": size, "prompt": f"client {i}", "seed": i})
               for i in range(count)]
    start = time.perf_counter() + warmup
    end = start + seconds
    try:
        results = await asyncio.gather(*(_client(c, bodies, start, end) for c in clients))
    finally:
        for client in clients:
            await client.close()
    e2e = [v for r in results for v in r["e2e_ms"]]
    server = [v for r in results for v in r["server_ms"]]
    per_client = [r["outputs"] / seconds for r in results]
    sent = sum(r["sent"] for r in results)
    return {
        "clients": count, "aggregate_fps": sum(per_client), "per_client_fps": per_client,
        "e2e_p50_ms": _quantile(e2e, 0.5), "e2e_p95_ms": _quantile(e2e, 0.95),
        "server_p50_ms": _quantile(server, 0.5), "server_p95_ms": _quantile(server, 0.95),
        "sent": sent, "dropped": sum(r["dropped"] for r in results),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of one client count."""
    per_client = [fps for r in rounds for fps in r["per_client_fps"]]
    sent, dropped = sum(r["sent"] for r in rounds), sum(r["dropped"] for r in rounds)
    return {
        "clients": rounds[0]["clients"], "rounds": len(rounds),
        "aggregate_fps": _median(rounds, "aggregate_fps"),
        "per_client_fps_mean": statistics.mean(per_client), "per_client_fps_min": min(per_client),
        "per_client_fps_max": max(per_client),
        **{key: _median(rounds, key) for key in ("e2e_p50_ms", "e2e_p95_ms", "server_p50_ms", "server_p95_ms")},
        "dropped_percent": 100.0 * dropped / sent if sent else 0.0,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["clients | aggregate fps | per-client fps (min-max) | e2e p50 / p95 ms | server p50 / p95 ms | dropped",
             "---: | ---: | ---: | ---: | ---: | ---:"]
    for r in rows:
        lines.append(f"{r['clients']} | {r['aggregate_fps']:.1f} | {r['per_client_fps_mean']:.2f} "
                     f"({r['per_client_fps_min']:.2f}-{r['per_client_fps_max']:.2f}) | "
                     f"{r['e2e_p50_ms']:.0f} / {r['e2e_p95_ms']:.0f} | {r['server_p50_ms']:.0f} / "
                     f"{r['server_p95_ms']:.0f} | {r['dropped_percent']:.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per client count (default 2)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per round")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured per round")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for streamdiff serve (repeatable), e.g. --serve-arg=--dtype=bfloat16")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    most = max(args.clients)
    bodies = [encode(pattern_frame(i, args.size, args.size), "jpeg", 85) for i in range(30)]
    serve_args = ["--model", args.model, "--size", f"{args.size}x{args.size}", "--max-streams", str(most),
                  "--max-batch-rows", str(max(16, 2 * most)), "--stats-interval", "1", *args.serve_arg]
    order = []
    for r in range(args.rounds):
        order += args.clients if r % 2 == 0 else args.clients[::-1]
    rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in args.clients}
    started = time.monotonic()
    with ServeProcess(*serve_args) as server:
        for count in order:
            result = asyncio.run(_round(server.url, count, args.size, bodies, args.warmup, args.seconds))
            rounds[count].append(result)
            print(f"{count} client(s): {result['aggregate_fps']:.1f} frames/s, e2e p95 "
                  f"{result['e2e_p95_ms']:.0f} ms", file=sys.stderr)
    rows = [summarise(rounds[n]) for n in args.clients]
    report = {"benchmark": "server", "size": args.size, "model": args.model, "warmup_s": args.warmup,
              "seconds": args.seconds, "python": platform.python_version(), "machine": platform.machine(),
              "elapsed_s": time.monotonic() - started, "results": rows, "rounds": rounds}
    print(format_table(rows))
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as out:
                out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
