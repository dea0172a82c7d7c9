"""One Ray Serve replica: a :class:`~streamdiff.engine.StreamEngine` and the server's sessions over FastAPI.

:class:`StreamReplica` is the deployment class (decorated by :func:`~.app.build_app`). Each replica loads the model
once, starts its engine, and serves, through the FastAPI ingress below, exactly what ``streamdiff serve`` serves:
``/ws`` runs a :class:`~streamdiff.server.session.StreamSession`, ``/ws/view/<token>`` a
:class:`~streamdiff.server.viewing.ViewerSession` — the same protocol implementation, over
:class:`~.transport.StarletteTransport` —, ``/whip`` and ``/whep/<token>`` run WHIP/WHEP
(:class:`~streamdiff.server.rtc.RtcFront`, whose resource ids name this replica; media flows to this node), and
the pages, ``/healthz``, ``/readyz`` and ``/metrics`` come from :func:`streamdiff.server.routes.route`. A WebSocket stays on the replica that accepted it; the router
(:mod:`.router`) chose that replica from what :meth:`StreamReplica.record_routing_stats` reports.

Ray Serve calls, besides the routes: ``record_routing_stats`` (streams, capacity, view-token keys: the router's
view), ``record_autoscaling_stats`` (active streams: the autoscaler's metric, :mod:`.autoscale`), ``check_health``
(the engine's worker must be alive, else Serve replaces the replica) and ``__del__`` (clients left hear
``shutting_down``, close 1001; the engine drains and stops). Serve stops a replica only once its requests have
ended (or after ``graceful_shutdown_timeout_s``), and a WebSocket does not end by itself: so
:func:`~.launch.drain` raises a flag in Ray's key-value store first, which every replica reads with its routing
report (each ``routing_stats_period_s``) and answers by ending its sessions with ``shutting_down`` (1001).
"""

# No ``from __future__ import annotations`` here: FastAPI and Serve's class-based views read the route methods'
# annotations at runtime (a string "WebSocket" would make the socket a query parameter and every handshake a 403).

import asyncio
import dataclasses
import logging
from typing import Any
from urllib.parse import unquote

import ray
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from ray import serve
from ray.serve import context as serve_context

from ..server.hub import Hub
from ..server.options import rtc_config
from ..server.routes import StaticFiles, route
from ..server.rtc import RtcFront
from ..server.session import StreamSession
from ..server.viewing import ViewerSession
from ..protocol.wire import STREAM_PATH, SUBPROTOCOL
from .config import ReplicaSpec
from .control import draining, mark_drained
from .routing import resource_prefix, stream_id_prefix, view_key
from .transport import StarletteTransport

__all__ = ["StreamIngress", "StreamReplica", "ingress"]

logger = logging.getLogger(__name__)

ingress = FastAPI(title="streamdiff", docs_url=None, redoc_url=None, openapi_url=None)


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

    # -- routes -----------------------------------------------------------------------------------------------------

    @ingress.websocket(STREAM_PATH)
    async def stream(self, websocket: WebSocket) -> None:
        if not await self._accept(websocket, STREAM_PATH):
            return
        session = StreamSession(self.hub, StarletteTransport(websocket))
        self.hub.connection_started(websocket)  # the session counts itself from here on
        self._requests[session] = serve_context._get_serve_request_context()._internal_request_id
        try:
            await session.run()
        finally:
            del self._requests[session]

    @ingress.websocket("/ws/view/{token}")
    async def view(self, websocket: WebSocket, token: str) -> None:
        if not await self._accept(websocket, f"/ws/view/{token}"):
            return
        await ViewerSession(self.hub, StarletteTransport(websocket), unquote(token)).run()

    @ingress.api_route("/whip", methods=["POST", "DELETE", "PATCH", "OPTIONS"])
    async def whip(self, request: Request) -> Response:
        return await self._signaling(request, "/whip")

    @ingress.api_route("/whip/{rest:path}", methods=["POST", "DELETE", "PATCH", "OPTIONS"])
    async def whip_resource(self, request: Request, rest: str) -> Response:
        return await self._signaling(request, f"/whip/{rest}")

    @ingress.api_route("/whep/{rest:path}", methods=["POST", "DELETE", "PATCH", "OPTIONS"])
    async def whep(self, request: Request, rest: str) -> Response:
        return await self._signaling(request, f"/whep/{rest}")

    async def _signaling(self, request: Request, path: str) -> Response:
        """WHIP/WHEP (:meth:`RtcFront.handle`, the handler ``streamdiff serve`` mounts on aiohttp); the peer
        connection stays on this replica, its media flows between the client and this node (``rtc_host``)."""
        reply = await self.rtc.handle(request.method, path, request.headers, request.query_params.multi_items(),
                                      request.stream(), request.client.host if request.client else "?")
        root = request.scope.get("root_path", "").rstrip("/")  # the application's route prefix, if any
        headers = {name: root + value if name in ("Location", "X-Streamdiff-View") else value
                   for name, value in reply.headers}
        headers["X-Streamdiff-Replica"] = self.tag
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=headers)

    @ingress.get("/{path:path}")
    async def http(self, request: Request, path: str) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        reply = route(target, self.static, self.hub, request.headers)
        if reply is None:  # a WebSocket path asked for over plain HTTP
            return Response(b"this is a WebSocket endpoint\n", status_code=426, media_type="text/plain")
        headers = dict(reply.headers)
        headers["X-Streamdiff-Replica"] = self.tag
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=headers)

    async def _accept(self, websocket: WebSocket, path: str) -> bool:
        """Upgrade, unless the server's one decision (:meth:`Hub.upgrade_reply`: Host, query string, admission
        caps) refuses it: then the handshake is denied (HTTP 403 from the ASGI server; the reason is logged).
        ``path``: the route's own path (the application's route prefix left out)."""
        from starlette.websockets import WebSocketState

        target = path + (f"?{websocket.url.query}" if websocket.url.query else "")
        address = websocket.client.host if websocket.client else "?"
        refused = self.hub.upgrade_reply(target, self.static, websocket.headers, websocket, address,
                                         lambda: websocket.client_state is not WebSocketState.DISCONNECTED)
        if refused is not None:
            await websocket.close(code=1008 if refused.status != 503 else 1013)
            return False
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        return True

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


# The class-based view is made at import time, in every process that imports this module: Serve rewrites the route
# methods' signatures in place, and a replica imports the methods by reference (so a rewrite made only in the driver
# would not reach it: every route would see ``self`` as a missing query parameter).
StreamIngress = serve.ingress(ingress)(StreamReplica)
