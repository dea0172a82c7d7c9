"""Benchmark ``streamdiff serve`` with 1, 2, 4 and 8 loopback clients: frames/s, latency and drops.

The server runs in its own process (``streamdiff serve``, the built-in tiny model unless ``--model``); the clients
run here, on one event loop, each a good client of the protocol (:mod:`streamdiff.bench.clients`), JPEG
pre-encoded once (a moving test pattern). Client counts are interleaved over rounds (1 2 4 8, then
8 4 2 1, …) and every figure is the median over rounds. Per configuration it reports the aggregate and per-client
output frames/s, end-to-end latency (capture → output received, the client's clock) and server-side latency
(input received → output sent, from the output header), p50 and p95, and the frames the server dropped.

    python tools/bench_server.py                       # 1 2 4 8 clients, 256x256, tiny model: table + JSON
    python tools/bench_server.py --clients 1 4 --seconds 5 --rounds 1 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from typing import Any

from streamdiff.bench.clients import client_round, format_table, summarise
from streamdiff.bench.harness import write_json
from streamdiff.io.sources import pattern_frame
from streamdiff.protocol.images import encode
from streamdiff.testing.serve import ServeProcess


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
            result = asyncio.run(client_round(server.url, count, args.size, bodies, args.warmup, args.seconds))
            rounds[count].append(result)
            print(f"{count} client(s): {result['aggregate_fps']:.1f} frames/s, e2e p95 "
                  f"{result['e2e_p95_ms']:.0f} ms", file=sys.stderr)
    rows = [summarise(rounds[n]) for n in args.clients]
    report = {"benchmark": "server", "size": args.size, "model": args.model, "warmup_s": args.warmup,
              "seconds": args.seconds, "python": platform.python_version(), "machine": platform.machine(),
              "elapsed_s": time.monotonic() - started, "results": rows, "rounds": rounds}
    print(format_table(rows))
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
