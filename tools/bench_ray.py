"""Benchmark of the Ray Serve fleet: aggregate frames/s for 1 and 2 replicas with 4 clients, and the latency the
Ray ingress adds over ``streamdiff serve`` for one client. Prints a table and JSON.

    python tools/bench_ray.py --size 128 --seconds 15 --json bench-ray.json

Needs the ``ray`` and ``server`` extras. Starts a local Ray cluster in this process (small object store), runs
each configuration in turn on the built-in tiny model, shuts everything down. Each replica's engine gets
``--threads`` torch threads; on a machine with fewer cores than replicas × threads the replicas share the cores
and the 2-replica figure shows the fleet's overhead, not its scaling (see docs/PERF.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import time
from typing import Any

import numpy as np

from streamdiff.client import StreamClient


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _frame(i: int, size: int, offset: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([(xx + 4 * i + offset) % 256, (yy * 2) % 256, (xx + yy + 7 * i) % 256], -1).astype(np.uint8)


async def _client_loop(url: str, size: int, seconds: float, warmup: float, offset: int,
                       lockstep: bool) -> dict[str, Any]:
    """One client: pipelined (at most n+1 frames awaiting output) or lock-step; outputs and latencies counted after
    ``warmup`` seconds, for ``seconds``."""
    client = await StreamClient.connect(url, {"width": size, "height": size})
    steps = len(client.settings.stream.t_index_list)
    window = steps if lockstep else steps + 1  # lock-step: the Stream Batch full, nothing queued
    bodies = [_frame(i, size, offset) for i in range(8)]
    sent = 0
    waiting: list[int] = []  # frame ids without an answer yet
    latencies: list[float] = []
    outputs = 0
    start = time.monotonic()
    measure_from, measure_to = start + warmup, start + warmup + seconds
    try:
        while time.monotonic() < measure_to:
            while len(waiting) < window:
                waiting.append(await client.send_frame(bodies[sent % len(bodies)], client_ts=time.monotonic() * 1000))
                sent += 1
            try:
                out = await client.next_output(timeout=5)
            except asyncio.TimeoutError:
                waiting.clear()  # dropped by latest-wins: send more
                continue
            if out is None:
                break
            waiting = [i for i in waiting if i > out.frame_id]  # an output answers every earlier frame
            now = time.monotonic()
            if measure_from <= now < measure_to:
                outputs += 1
                latencies.append(out.latency_ms)
    finally:
        await client.close()
    return {"outputs": outputs, "latencies": latencies}


async def _run_clients(url: str, clients: int, size: int, seconds: float, warmup: float,
                       lockstep: bool = False) -> dict[str, Any]:
    results = await asyncio.gather(*(_client_loop(url, size, seconds, warmup, 97 * i, lockstep)
                                     for i in range(clients)))
    latencies = sorted(x for r in results for x in r["latencies"])
    return {
        "clients": clients, "fps": sum(r["outputs"] for r in results) / seconds,
        "per_client_fps": [r["outputs"] / seconds for r in results],
        "latency_p50_ms": statistics.median(latencies) if latencies else None,
        "latency_p95_ms": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
    }


def bench_fleet(replicas: int, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from streamdiff.deploy.app import serve_options
    from streamdiff.deploy.config import FleetConfig, ReplicaSpec
    from streamdiff.deploy.launch import deploy, shutdown

    port = _free_port()
    spec = ReplicaSpec(serve_options({"model": "tiny", "size": args.size, "max_streams": max(4, clients),
                                      "max_input_fps": 120}), torch_threads=args.threads)
    deploy(FleetConfig(num_replicas=replicas, num_cpus=0.5, name="bench"), spec, port=port)
    try:
        result = asyncio.run(_run_clients(f"ws://127.0.0.1:{port}/ws", clients, args.size, args.seconds,
                                          args.warmup, lockstep=args.lockstep_fleet))
    finally:
        shutdown("bench", timeout=10)
        serve.shutdown()
    return {"replicas": replicas, **result}


def bench_single_server(args: argparse.Namespace) -> dict[str, Any]:
    """``streamdiff serve`` (the websockets server) in this process, one client, lock-step."""
    import torch

    from streamdiff.deploy.app import serve_options
    from streamdiff.deploy.config import ReplicaSpec
    from streamdiff.server.app import BackgroundServer

    torch.set_num_threads(args.threads)
    spec = ReplicaSpec(serve_options({"model": "tiny", "size": args.size, "max_input_fps": 120, "port": 0}),
                       torch_threads=args.threads)
    engine, config = spec.build()
    with BackgroundServer(engine, config) as server:
        return asyncio.run(_run_clients(server.url, 1, args.size, args.seconds, args.warmup, lockstep=True))


def bench_ray_single(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from streamdiff.deploy.app import serve_options
    from streamdiff.deploy.config import FleetConfig, ReplicaSpec
    from streamdiff.deploy.launch import deploy, shutdown

    port = _free_port()
    spec = ReplicaSpec(serve_options({"model": "tiny", "size": args.size, "max_input_fps": 120}),
                       torch_threads=args.threads)
    deploy(FleetConfig(num_replicas=1, num_cpus=0.5, name="bench"), spec, port=port)
    try:
        return asyncio.run(_run_clients(f"ws://127.0.0.1:{port}/ws", 1, args.size, args.seconds, args.warmup,
                                        lockstep=True))
    finally:
        shutdown("bench", timeout=10)
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--lockstep-fleet", action="store_true", help="fleet clients send one frame at a time")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    ray.init(num_cpus=4, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    results: dict[str, Any] = {"size": args.size, "seconds": args.seconds, "threads": args.threads,
                               "cpu_count": os.cpu_count()}
    try:
        results["fleet"] = [bench_fleet(n, args.clients, args) for n in (1, 2)]
        single = bench_single_server(args)
        ray_single = bench_ray_single(args)
        results["one_client"] = {"streamdiff_serve": single, "ray_ingress": ray_single}
    finally:
        ray.shutdown()
    print(f"tiny model, {args.size}x{args.size}, {args.threads} torch thread(s) per engine, {os.cpu_count()} CPU(s)")
    print(f"{'configuration':<34}{'frames/s':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for row in results["fleet"]:
        print(f"{row['replicas']} replica(s), {row['clients']} clients{'':<12}{row['fps']:>10.1f}"
              f"{row['latency_p50_ms']:>10.1f}{row['latency_p95_ms']:>10.1f}")
    for name, row in results["one_client"].items():
        print(f"1 client, lock-step, {name:<13}{row['fps']:>10.1f}{row['latency_p50_ms']:>10.1f}"
              f"{row['latency_p95_ms']:>10.1f}")
    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
