"""One Ray Serve replica: a :class:`~streamdiff.engine.StreamEngine` and the server's one application.

:class:`StreamReplica` is the deployment class (decorated by :func:`~.app.build_app`). Each replica loads the model
once, starts its engine, and hands Ray Serve, as its ASGI ingress, the very application ``streamdiff serve`` runs
(:class:`~streamdiff.server.asgi.ServerApp`): ``/ws`` runs a :class:`~streamdiff.server.session.StreamSession`,
``/ws/view/<token>`` a :class:`~streamdiff.server.viewing.ViewerSession`, ``/whip`` and ``/whep/<token>`` run
WHIP/WHEP (:class:`~streamdiff.server.rtc.RtcFront`, whose resource ids name this replica; media flows to this
node), and the pages, ``/healthz``, ``/readyz`` and ``/metrics`` answer the same. Only two things are the
replica's own: every HTTP answer names it (``X-Streamdiff-Replica``), and each stream socket's Serve request id is
recorded for the router. A WebSocket stays on the replica that accepted it; the router (:mod:`.router`) chose that
replica from what :meth:`StreamReplica.record_routing_stats` reports. What ``streamdiff serve``'s aiohttp host
enforces on connections (slow headers, message sizes, pings) is the job of Serve's HTTP proxy here (uvicorn); the
application still checks every message's size and keeps its own hello, idle and body deadlines.

Ray Serve calls, besides the application: ``record_routing_stats`` (streams, capacity, view-token keys: the router's
view), ``record_autoscaling_stats`` (active streams: the autoscaler's metric, :mod:`.autoscale`), ``check_health``
(the engine's worker must be alive, else Serve replaces the replica) and ``__del__`` (clients left hear
``shutting_down``, close 1001; the engine drains and stops). Serve stops a replica only once its requests have
ended (or after ``graceful_shutdown_timeout_s``), and a WebSocket does not end by itself: so
:func:`~.launch.drain` raises a flag in Ray's key-value store first, which every replica reads with its routing
report (each ``routing_stats_period_s``) and answers by ending its sessions with ``shutting_down`` (1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import ray
from ray import serve
from ray.serve import context as serve_context

from ..server.asgi import ServerApp
from ..server.hub import Hub
from ..server.options import rtc_config
from ..server.routes import StaticFiles
from ..server.rtc import RtcFront
from ..server.session import StreamSession
from .config import ReplicaSpec
from .control import draining, mark_drained
from .routing import resource_prefix, stream_id_prefix, view_key

__all__ = ["StreamIngress", "StreamReplica"]

logger = logging.getLogger(__name__)


class StreamReplica:
    """The body of the deployment (see the module docstring); ``spec`` is plain data (:class:`~.config.ReplicaSpec`)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        context = serve.get_replica_context()
        self.tag, self.app_name = context.replica_tag, context.app_name
        self._drain: asyncio.Future[None] | None = None
        self._requests: dict[StreamSession, str] = {}  # the Serve request id of each stream socket
        self._secret = bytes.fromhex(spec.view_secret)
        self.engine, config = spec.build()
        self.engine.start()
        self.hub = Hub(self.engine, config, id_prefix=stream_id_prefix(self.tag))
        self.static = StaticFiles(spec.web_dir())
        rtc = rtc_config(spec.options)
        if not rtc.hosts:  # ICE candidates on this node's address, the one Ray knows it by (not every interface)
            rtc = dataclasses.replace(rtc, hosts=(ray.util.get_node_ip_address(),))
        self.rtc = RtcFront(self.hub, rtc, resource_prefix(self.tag))
        logger.info("replica %s ready: max %d streams; WebRTC media on %s", self.tag, self.hub.limits.max_streams,
                    ", ".join(rtc.hosts))

    def __serve_build_asgi_app__(self) -> ServerApp:
        """The ingress Serve runs for this replica (after ``__init__``): the server's one application."""
        return ServerApp(self.hub, self.static, self.rtc, headers=(("X-Streamdiff-Replica", self.tag),),
                         on_stream=self._track)

    @contextlib.contextmanager
    def _track(self, session: StreamSession) -> Iterator[None]:
        """Record the Serve request that holds ``session``'s socket while it runs (the router's bookkeeping)."""
        self._requests[session] = serve_context._get_serve_request_context()._internal_request_id
        try:
            yield
        finally:
            del self._requests[session]

    # -- what Ray Serve asks --------------------------------------------------------------------------------------

    async def record_routing_stats(self) -> dict[str, Any]:
        """The router's view of this replica: streams running, capacity, the Serve request ids of the admitted
        stream sockets (so a router can tell which of its own sockets a report already counts), keyed hashes of
        the view tokens. Also
        where the replica notices a drain (:func:`~.launch.drain`) and ends its sessions."""
        hub = self.hub
        if not hub.shutting_down and await asyncio.get_running_loop().run_in_executor(None, draining, self.app_name):
            logger.info("replica %s draining: %d stream(s) told to go away", self.tag, len(hub.sessions))
            self._drain = asyncio.ensure_future(self._drain_sessions())
        admitted = [request for session, request in list(self._requests.items()) if session.stream_id is not None]
        # WHIP streams hold no open request: each counts under a name of its own until it ends
        admitted += [f"rtc:{stream_id}" for stream_id, session in list(hub.sessions.items())
                     if session not in self._requests]
        return {"streams": len(hub.sessions), "max_streams": hub.limits.max_streams, "requests": admitted,
                "view_keys": sorted(view_key(self._secret, token) for token in list(hub.view_tokens))}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The autoscaler's metric: streams running on this replica."""
        return {"streams": float(len(self.hub.sessions))}

    async def _drain_sessions(self) -> None:
        await self.hub.shutdown(timeout=self.spec.shutdown_timeout_s)
        await asyncio.get_running_loop().run_in_executor(None, mark_drained, self.app_name, self.tag)

    def check_health(self) -> None:
        """Raise when this replica cannot serve: its engine's worker stopped (Serve then replaces the replica)."""
        if not self.engine.running:
            raise RuntimeError(f"the engine of replica {self.tag} is not running")

    async def __del__(self) -> None:
        """Serve stops this replica: every client hears ``shutting_down`` (1001), then the engine drains."""
        hub = getattr(self, "hub", None)
        if hub is None:
            return
        await self.rtc.close()
        if hub.connections or hub.viewers:
            await hub.shutdown(timeout=self.spec.shutdown_timeout_s)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.engine.stop(drain=True, timeout=self.spec.shutdown_timeout_s))
        hub.close()
        logger.info("replica %s stopped", self.tag)


# The ingress is late-bound: Serve calls ``__serve_build_asgi_app__`` on each replica once its ``__init__`` has run.
StreamIngress = serve.ingress()(StreamReplica)
