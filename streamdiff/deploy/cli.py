"""``streamdiff serve --ray``: the fleet's flags and the run loop the serve command hands its options to.

The serve command resolves its options exactly as for one server, then calls :func:`run`, which deploys the
fleet, waits for SIGINT/SIGTERM and shuts it down (clients hear 1001 first).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from .config import FleetConfig, ReplicaSpec

__all__ = ["add_arguments", "fleet_config", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fleet (--ray: Ray Serve, docs/scaling.md)")
    group.add_argument("--ray", action="store_true", help="serve with a fleet of engines on Ray Serve")
    group.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="Ray cluster to join: 'auto' (ray start on this machine), HOST:6379; default: a new "
                            "local cluster")
    group.add_argument("--replicas", type=int, default=1, help="engines (replicas) when not autoscaling (default 1)")
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    group.add_argument("--target-streams-per-replica", type=float, default=None,
                       help="autoscaling: streams per replica to aim for (default 0.75 × --max-streams)")
    group.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs per replica (1 on GPU nodes)")
    group.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica (default 1)")
    group.add_argument("--torch-threads", type=int, default=0, help="CPU threads per engine (default: torch's)")


def fleet_config(args: argparse.Namespace) -> FleetConfig:
    minimum = args.min_replicas if args.min_replicas is not None else 1
    maximum = args.max_replicas if args.max_replicas is not None else minimum
    return FleetConfig(num_replicas=args.replicas, min_replicas=minimum, max_replicas=max(maximum, minimum),
                       target_streams_per_replica=args.target_streams_per_replica, num_gpus=args.gpus_per_replica,
                       num_cpus=args.cpus_per_replica)


def run(options: dict[str, Any], args: argparse.Namespace) -> int:
    """Deploy, serve until SIGINT/SIGTERM, drain, delete. ``options``: the serve command's resolved options."""
    from .launch import deploy, free_port, shutdown

    fleet = fleet_config(args)
    spec = ReplicaSpec(options, torch_threads=args.torch_threads)
    host = str(options["host"])
    port = int(options["port"]) or free_port(host)
    deploy(fleet, spec, host=host, port=port, address=args.ray_address)
    logger.info("open http://%s:%s/ (fleet %r on Ray Serve, %s)", host, port, fleet.name,
                f"{fleet.min_replicas}-{fleet.max_replicas} replicas" if fleet.autoscaling
                else f"{fleet.num_replicas} replica(s)")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            logger.warning("%s again: the fleet is already shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Wake now and then: Ray's native threads do not block signals, so the kernel may deliver SIGTERM to one of
        # them, and Python runs the handler only when this (main) thread executes again: a wait without a timeout
        # would never return.
        while not stop.wait(0.5):
            pass
    finally:
        try:
            logger.info("shutting down the fleet")
            shutdown(fleet.name)
            from ray import serve  # deploy() has imported it (or said which extra is missing)

            serve.shutdown()
        finally:  # a second signal during the shutdown is logged, not fatal
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0
