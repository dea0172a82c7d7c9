"""Benchmark the Ray Serve fleet against ``streamdiff serve``: the ingress's cost for one client, and 1 vs 2
replicas with 4 clients. Prints a table and JSON.

    python tools/bench_ray.py --size 128 --rounds 3 --seconds 8 --json bench-ray.json

Four configurations, all up at once and measured in interleaved rounds (A B C D, then D C B A, …; medians over
rounds): ``serve-1`` one client on ``streamdiff serve`` (its own process); ``ray1-1`` one client through Ray
Serve's proxy to a fleet of 1 replica; ``ray1-4`` four clients on that fleet; ``ray2-4`` four clients on a fleet of 2
replicas (a second Serve application). Every engine is the built-in tiny model with ``--threads`` CPU threads
(``streamdiff serve`` gets them through ``OMP_NUM_THREADS``); an engine without streams waits and costs nothing.
The clients are :mod:`streamdiff.bench.clients`' (pipelined, reported losses not awaited). Needs the ``ray``
extra. On a machine with fewer cores than busy engines × threads the engines share the cores: then the 2-replica
row shows the fleet's overhead and that replicas run side by side, not scaling across GPUs (docs/PERF.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from typing import Any

from streamdiff.bench.clients import client_round, format_table, summarise
from streamdiff.bench.harness import write_json
from streamdiff.deploy.launch import free_port
from streamdiff.io.sources import pattern_frame
from streamdiff.protocol.images import encode
from streamdiff.testing.serve import ServeProcess

CONFIGS = ("serve-1", "ray1-1", "ray1-4", "ray2-4")



def _fleets(port: int, args: argparse.Namespace) -> dict[str, str]:
    """Deploy the 1- and 2-replica applications on one Serve instance; their stream URLs by name."""
    from streamdiff.deploy.app import serve_options
    from streamdiff.deploy.config import FleetConfig, ReplicaSpec
    from streamdiff.deploy.launch import deploy

    spec = ReplicaSpec(serve_options({"model": args.model, "size": args.size, "max_streams": 4,
                                      "max_input_fps": 120, "backend": args.backend}), torch_threads=args.threads)
    urls = {}
    for replicas in (1, 2):
        name = f"bench{replicas}"
        deploy(FleetConfig(num_replicas=replicas, num_cpus=0.25, name=name, route_prefix=f"/{name}"), spec,
               port=port)
        urls[f"ray{replicas}"] = f"ws://127.0.0.1:{port}/{name}/ws"
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds measured per round and configuration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per round")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per engine (default 1)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--backend", default="auto", help="every engine's backend (default auto)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from streamdiff.deploy.launch import shutdown

    bodies = [encode(pattern_frame(i, args.size, args.size), "jpeg", 85) for i in range(30)]
    started = time.monotonic()
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    serve_args = ["--model", args.model, "--backend", args.backend, "--size", f"{args.size}x{args.size}",
                  "--max-streams", "4", "--max-input-fps", "120", "--stats-interval", "1"]
    ray.init(num_cpus=4, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        urls = _fleets(free_port(), args)
        with ServeProcess(*serve_args, env={"OMP_NUM_THREADS": str(args.threads)}) as server:
            urls["serve"] = server.url
            for r in range(args.rounds):
                for name in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
                    target, clients = name.split("-")
                    result = asyncio.run(client_round(urls[target], int(clients), args.size, bodies, args.warmup,
                                                      args.seconds))
                    rounds[name].append(result)
                    print(f"round {r + 1} {name}: {result['aggregate_fps']:.1f} frames/s, per client "
                          f"{', '.join(f'{x:.1f}' for x in result['per_client_fps'])}; e2e p95 "
                          f"{result['e2e_p95_ms']:.0f} ms", file=sys.stderr)
        for name in ("bench1", "bench2"):
            shutdown(name, timeout=10)
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = [{"configuration": name, **summarise(rounds[name])} for name in CONFIGS]
    report = {"benchmark": "ray", "size": args.size, "model": args.model, "backend": args.backend,
              "threads_per_engine": args.threads, "cpu_count": os.cpu_count(), "warmup_s": args.warmup,
              "seconds": args.seconds, "python": platform.python_version(), "elapsed_s": time.monotonic() - started,
              "results": rows, "rounds": rounds}
    print(f"{args.model} model, {args.size}x{args.size}, {args.threads} thread(s) per engine, "
          f"{os.cpu_count()} CPU(s), {args.rounds} interleaved rounds of {args.seconds:g} s")
    print(format_table(rows, "configuration"))
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
