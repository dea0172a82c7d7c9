"""A local Ray Serve fleet of ``streamdiff`` replicas, for tests: start Ray, deploy, always shut down.

::

    with local_fleet({"model": "tiny", "size": 64, "max_streams": 2}, name="streamdiff-test") as port:
        ...  # ws://127.0.0.1:{port}/ws, http://127.0.0.1:{port}/whip
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["local_fleet"]


@contextlib.contextmanager
def local_fleet(options: dict[str, Any], name: str, replicas: int = 2) -> Iterator[int]:
    """Ray on this machine (4 logical CPUs, a 300 MB object store, no dashboard) and Serve on a free port with
    ``replicas`` replicas of ``streamdiff serve`` ``options`` (half a CPU and one torch thread each, a 5 s graceful
    shutdown, health checks every second); yields the port. Serve and Ray are shut down on the way out, also when
    the body (a test) fails."""
    import ray
    from ray import serve

    from ..deploy.app import serve_options
    from ..deploy.config import FleetConfig, ReplicaSpec
    from ..deploy.launch import deploy, free_port

    port = free_port()
    ray.init(num_cpus=4, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        spec = ReplicaSpec(serve_options(options), torch_threads=1)
        deploy(FleetConfig(num_replicas=replicas, num_cpus=0.5, name=name, graceful_shutdown_timeout_s=5.0,
                           health_check_period_s=1.0), spec, port=port)
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
