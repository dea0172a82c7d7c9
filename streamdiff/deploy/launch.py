"""Start, run and stop the application on a Ray cluster: what ``streamdiff serve --ray`` does, usable from Python.

::

    handle = deploy(fleet, spec, host="0.0.0.0", port=8765)         # joins (or starts) Ray, runs the app
    ...
    shutdown(fleet.name)                                             # clients hear 1001, then the app is deleted

``address``: ``None`` starts a local Ray cluster in this process (one machine); ``"auto"`` joins the cluster that
``ray start --head`` started on this machine; ``"ray://HOST:10001"`` or ``HOST:6379`` join a remote one
(docs/scaling.md). Ray Serve's HTTP proxy listens on ``host:port`` of every node (``ProxyLocation.EveryNode``).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from ..errors import missing_extra
from .app import build_app
from .config import FleetConfig, ReplicaSpec, new_view_secret
from .control import drained_count, set_draining

__all__ = ["deploy", "drain", "free_port", "shutdown"]

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now: Serve's proxies need the number itself (they cannot be asked for port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def deploy(fleet: FleetConfig, spec: ReplicaSpec, *, host: str = "127.0.0.1", port: int = 8765,
           address: str | None = "auto", ray_init: dict[str, Any] | None = None) -> Any:
    """Connect to Ray (``address``; None: a new local cluster), start Serve's proxies on ``host:port`` and run the
    application; returns once every replica is ready (its model loaded). Next: :func:`shutdown`."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise missing_extra("ray", "ray") from None
    if not ray.is_initialized():
        ray.init(address=address, **(ray_init or {}))
    serve.start(proxy_location="EveryNode", http_options={"host": host, "port": port})
    if not spec.view_secret:
        spec = ReplicaSpec(spec.options, new_view_secret(), spec.torch_threads, spec.shutdown_timeout_s)
    set_draining(fleet.name, False)
    return serve.run(build_app(fleet, spec), name=fleet.name, route_prefix=fleet.route_prefix)


def drain(app_name: str, timeout: float = 15.0, period: float = 0.2) -> bool:
    """Tell every replica of ``app_name`` to end its streams (1001); True once every running replica has, False
    at ``timeout``."""
    from ray import serve

    set_draining(app_name, True)
    status = serve.status().applications.get(app_name)
    replicas = 0 if status is None else sum(
        int(d.replica_states.get("RUNNING", 0)) for d in status.deployments.values())
    deadline = time.monotonic() + timeout
    while drained_count(app_name) < replicas:
        if time.monotonic() >= deadline:
            return False
        time.sleep(period)
    return True


def shutdown(app_name: str = "streamdiff", timeout: float = 15.0) -> None:
    """Drain (every client hears ``shutting_down``, 1001) and delete the application; Ray keeps running."""
    from ray import serve

    drained = drain(app_name, timeout)
    if not drained:
        logger.warning("streams still running after %.0f s; deleting the application anyway", timeout)
    serve.delete(app_name)
    set_draining(app_name, False)
