"""WHIP ingest (RFC 9725) and WHEP playback: :class:`RtcFront`, one handler for every web framework
(:meth:`RtcFront.handle`: method, path, headers, query, body in; a :class:`SignalingReply` out), called by
the server's one application (:class:`streamdiff.server.asgi.ServerApp`, under ``streamdiff serve`` and Ray Serve
alike; docs/webrtc.md).

::

    POST   /whip                     Authorization: Bearer TOKEN, application/sdp offer → 201, Location, SDP answer
    DELETE /whip/{resource}          Authorization: Bearer TOKEN → 200 (the stream ends, its slot is free)
    POST   /whip/{resource}/update   Authorization: Bearer TOKEN, JSON update message → 200 ack / 400 error
    PATCH  /whip/{resource}          405 (no trickle ICE, no ICE restart: the answer carries every candidate)
    POST   /whep/{view_token}        application/sdp offer (recvonly video) → 201, Location, SDP answer
    DELETE /whep/{view_token}/{resource}
    OPTIONS any of them              204 + Allow; CORS headers for an Origin the server's OriginPolicy allows, else 403

Publishing is admitted by the same :class:`~streamdiff.server.session.StreamSession` as a WebSocket hello (see
:mod:`.peer`), so streams of both kinds count together against ``max_streams`` (503 with ``Retry-After`` when
full). Pure checks live in :mod:`.signaling`; media in :mod:`.media`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import ProtocolError
from ...protocol.session import ConnectionState
from ..session import StreamSession
from ..transport import TransportClosed
from ...protocol.wire import PROTOCOL_VERSION, WHEP_PREFIX, WHIP_PATH, load_json
from .config import RtcConfig
from .jitter import use_marker_jitter_buffer
from .media import attach_output, drain, feed_session, make_output_track
from .peer import Peer, PeerTransport, gather_on, new_peer_connection
from .signaling import (
    OfferSummary,
    ResourceTable,
    SignalingError,
    bearer_token,
    check_offer,
    query_settings,
    token_matches,
)

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = ["RtcFront", "SignalingReply"]

logger = logging.getLogger(__name__)

ADMIT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
_UNAUTHORIZED = (("WWW-Authenticate", 'Bearer realm="streamdiff"'),)
_EXPOSED = "Location, X-Streamdiff-View, Retry-After, WWW-Authenticate"  # what a page may read of an answer
_RETRY = (("Retry-After", "1"),)
# A fatal error answering the WHIP request's hello → HTTP status.
_STATUS = {"server_full": 503, "shutting_down": 503, "unauthorized": 401, "forbidden_origin": 403,
           "view_token_in_use": 409, "closed": 503}


@dataclass(frozen=True)
class SignalingReply:
    """The HTTP answer to a WHIP/WHEP request, for any web framework to send."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Request:
    method: str
    parts: tuple[str, ...]  # the path's segments: ("whip",), ("whip", RESOURCE, "update"), ("whep", TOKEN)…
    headers: Mapping[str, str]  # case-insensitive
    query: Sequence[tuple[str, str]]
    body: bytes
    remote: str


class _Query:
    """The query's pairs as :func:`~.signaling.query_settings` reads them (``keys()`` keeps repeated names)."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = list(pairs)

    def keys(self) -> list[str]:
        return [name for name, _ in self.pairs]

    def __getitem__(self, name: str) -> str:
        return next(value for key, value in self.pairs if key == name)


class RtcFront:
    """The WebRTC front end of one server: its resources and peers (:class:`~streamdiff.server.asgi.ServerApp`
    calls :meth:`handle`; the server's owner calls :meth:`close` when it stops). ``resource_prefix`` begins every
    resource id (a fleet's replica puts its tag in it, so that the router sends a resource's DELETE to the replica
    that holds it)."""

    def __init__(self, hub: Hub, config: RtcConfig, resource_prefix: str = "") -> None:
        self.hub, self.config = hub, config
        self.publishers: ResourceTable[Peer] = ResourceTable(resource_prefix)
        self.viewers: ResourceTable[Peer] = ResourceTable(resource_prefix)

    async def handle(self, method: str, path: str, headers: Mapping[str, str], query: Sequence[tuple[str, str]],
                     body: bytes, remote: str) -> SignalingReply:
        """Answer one request: ``path`` from ``/whip`` or ``/whep`` on (a mount prefix left out), ``headers``
        case-insensitive, ``query`` its (name, value) pairs in order, ``body`` the request's whole body (read by the
        application within its own time and size limits), ``remote`` the client's address (for logs)."""
        parts = tuple(path.strip("/").split("/"))
        request = _Request(method.upper(), parts, headers, query, body, remote)
        origin = headers.get("Origin")
        cors: tuple[tuple[str, str], ...] = ()
        try:
            if origin is not None:
                if not self.hub.config.origins.allows(origin):
                    raise SignalingError(403, "pages from this origin may not use this server (allowed: "
                                              "--allowed-origin)")
                cors = (("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", _EXPOSED),
                        ("Vary", "Origin"))
            if request.method == "OPTIONS":
                return self._options(request, cors)
            reply = await self._route(request)
        except SignalingError as error:
            logger.info("%s %s from %s refused (%d): %s", request.method, _route_name(path), remote, error.status,
                        error)
            reply = _text(error.status, f"{error}\n", error.headers)
        return SignalingReply(reply.status, reply.body, reply.content_type, reply.headers + cors)

    def _options(self, request: _Request, cors: tuple[tuple[str, str], ...]) -> SignalingReply:
        """``OPTIONS`` (RFC 9725 allows it; a browser's CORS preflight): 204 with the route's methods, and for an
        allowed ``Origin`` the CORS headers a page needs to POST an offer with a bearer token and read ``Location``
        (a refused origin is 403 before this)."""
        kind, n = request.parts[0], len(request.parts)
        methods = {("whip", 1): "POST", ("whip", 2): "DELETE, PATCH", ("whip", 3): "POST", ("whep", 2): "POST",
                   ("whep", 3): "DELETE, PATCH"}.get((kind, n))
        if methods is None:
            raise SignalingError(404, "not found")
        headers = (("Allow", f"{methods}, OPTIONS"),)
        if cors:
            headers += (("Access-Control-Allow-Methods", f"{methods}, OPTIONS"),
                        ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                        ("Access-Control-Max-Age", "600"))
        return SignalingReply(204, b"", headers=headers + cors)

    async def _route(self, request: _Request) -> SignalingReply:
        method, parts = request.method, request.parts
        kind, n = parts[0], len(parts)
        routes = {("whip", 1, "POST"): self.publish, ("whip", 2, "DELETE"): self.unpublish,
                  ("whep", 2, "POST"): self.view, ("whep", 3, "DELETE"): self.unview}
        if kind == "whip" and n == 3 and parts[2] == "update" and method == "POST":
            return await self.update(request)
        handler = routes.get((kind, n, method))
        if handler is not None:
            return await handler(request)
        if (kind, n) in (("whip", 2), ("whep", 3)) and method == "PATCH":
            raise SignalingError(405, "trickle ICE and ICE restarts are not supported: the answer carries every "
                                      "candidate", (("Allow", "DELETE"),))
        known = {("whip", 1): "POST", ("whip", 2): "DELETE", ("whip", 3): "POST", ("whep", 2): "POST",
                 ("whep", 3): "DELETE"}
        if (kind, n) in known:
            raise SignalingError(405, f"{method} is not allowed here", (("Allow", known[kind, n]),))
        raise SignalingError(404, "not found")

    # -- WHIP -------------------------------------------------------------------------------------------------

    async def publish(self, request: _Request) -> SignalingReply:
        hub = self.hub
        token = bearer_token(request.headers.get("Authorization"))
        if not token_matches(token, hub.config.token):
            raise SignalingError(401, "a valid bearer token is needed (Authorization: Bearer TOKEN)", _UNAUTHORIZED)
        if hub.shutting_down:
            raise SignalingError(503, "the server is shutting down", _RETRY)
        text, summary = check_offer(self._body(request), request.headers.get("Content-Type"), self.config,
                                    publish=True)
        settings, view_token = query_settings(_Query(request.query))
        if hub.full:
            raise SignalingError(503, f"the server already serves its {hub.limits.max_streams} streams; try again "
                                      "later", _RETRY)
        hello: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION, "settings": settings, "client": "whip"}
        if hub.config.token is not None:
            hello["token"] = token
        if view_token is not None:
            hello["view_token"] = view_token
        transport = PeerTransport(json.dumps(hello), request.remote, request.headers.get("Origin"),
                                  summary.data_channel)
        session = StreamSession(hub, transport)
        session_task = asyncio.ensure_future(session.run())
        try:
            answer = await asyncio.wait_for(asyncio.shield(transport.admitted), ADMIT_TIMEOUT_S)
        except asyncio.TimeoutError:  # never seen: the hello is there at once; the engine may be stuck
            transport.lost(TransportClosed(None, "not admitted in time"))
            raise SignalingError(503, f"the stream was not admitted within {ADMIT_TIMEOUT_S:g} s", _RETRY) from None
        if answer.get("type") != "ready":
            await asyncio.wait([session_task], timeout=ADMIT_TIMEOUT_S)
            status = _STATUS.get(str(answer.get("code")), 400)
            message = str(answer.get("message", "refused")).replace("settings.", "query parameter ")
            raise SignalingError(status, message, _RETRY if status == 503 else ())
        peer = Peer(new_peer_connection(), session, transport, self.config)
        transport.on_close = lambda: peer.close("the session ended")
        try:
            sdp = await self._negotiate(peer, text, summary, publish=True)
        except BaseException as error:
            await asyncio.shield(peer.close("the negotiation failed"))
            if transport.closed and isinstance(error, Exception) and not isinstance(error, SignalingError):
                # the session ended meanwhile (idle timeout, shutdown) and closed the peer connection under aiortc
                raise SignalingError(503, f"the stream ended before it was answered {session.close_reason}".strip(),
                                     _RETRY) from None
            raise
        resource = self.publishers.add(peer, token if hub.config.token is not None else None)
        peer.done.add_done_callback(lambda _: self.publishers.remove(resource))
        peer.watch(session_task)
        logger.info("%s: WHIP publisher from %s (%s, data channel: %s)", session.stream_id, request.remote,
                    "sendrecv" if summary.receives_video() else "sendonly", summary.data_channel)
        return _sdp_answer(sdp, f"{WHIP_PATH}/{resource}",
                           (("X-Streamdiff-View", f"{WHEP_PREFIX}{session.view_token}"),))

    async def unpublish(self, request: _Request) -> SignalingReply:
        peer = self._publisher(request)
        ends = [peer.close("DELETE by the client")] + ([peer.session_task] if peer.session_task else [])
        await asyncio.wait(ends, timeout=ADMIT_TIMEOUT_S)  # the session has left the engine: its slot is free
        return _text(200, "ended\n")

    async def update(self, request: _Request) -> SignalingReply:
        peer = self._publisher(request)
        body = self._body(request, self.hub.limits.max_text_bytes)
        try:
            message = load_json(body.decode("utf-8"))
        except (ProtocolError, UnicodeDecodeError) as error:
            raise SignalingError(400, f"the body must be a JSON update message: {error}") from None
        message.setdefault("type", "update")
        assert peer.transport is not None
        try:
            answer = await peer.transport.request(message, REQUEST_TIMEOUT_S)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            raise SignalingError(503, "the stream did not answer (it ended, or too many updates wait)",
                                 _RETRY) from None
        return SignalingReply(200 if answer.get("type") == "ack" else 400, json.dumps(answer).encode(),
                              "application/json")

    def _publisher(self, request: _Request) -> Peer:
        token = bearer_token(request.headers.get("Authorization"))
        if not token_matches(token, self.hub.config.token):
            raise SignalingError(401, "a valid bearer token is needed (Authorization: Bearer TOKEN)", _UNAUTHORIZED)
        return self.publishers.find(request.parts[1],
                                    token if self.hub.config.token is not None else None)

    # -- WHEP -------------------------------------------------------------------------------------------------

    async def view(self, request: _Request) -> SignalingReply:
        hub, view_token = self.hub, request.parts[1]
        session = None if hub.shutting_down else hub.find_view(view_token)
        if session is None or session.conn.state is ConnectionState.CLOSED or session.stream is None:
            raise SignalingError(404, "no stream has this view token")
        text, summary = check_offer(self._body(request), request.headers.get("Content-Type"), self.config,
                                    publish=False)
        if hub.viewer_count(session) >= hub.limits.max_viewers_per_stream:
            raise SignalingError(503, f"this stream has its {hub.limits.max_viewers_per_stream} viewers; try again "
                                      "later", _RETRY)
        peer = Peer(new_peer_connection(), session, None, self.config)
        hub.rtc_viewers.add(peer)  # counted from here on: concurrent offers cannot pass the cap together
        hub.viewers_changed()

        def gone(_: object) -> None:
            hub.rtc_viewers.discard(peer)
            hub.viewers_changed()

        peer.done.add_done_callback(gone)
        try:
            sdp = await self._negotiate(peer, text, summary, publish=False)
        except BaseException as error:
            await asyncio.shield(peer.close("the negotiation failed"))
            if session.conn.state is ConnectionState.CLOSED and isinstance(error, Exception) \
                    and not isinstance(error, SignalingError):  # the stream ended meanwhile, closing this peer
                raise SignalingError(404, "the stream ended before the viewer was answered") from None
            raise
        resource = self.viewers.add(peer, view_token)
        hub.metrics.connections.labels("view").inc()  # a viewer, as a /ws/view socket counts
        peer.done.add_done_callback(lambda _: self.viewers.remove(resource))
        peer.watch()
        logger.info("%s: WHEP viewer from %s", session.stream_id, request.remote)
        return _sdp_answer(sdp, f"{WHEP_PREFIX}{view_token}/{resource}")

    async def unview(self, request: _Request) -> SignalingReply:
        peer = self.viewers.find(request.parts[2], request.parts[1])
        await asyncio.wait([peer.close("DELETE by the client")], timeout=ADMIT_TIMEOUT_S)
        return _text(200, "ended\n")

    # -- both -------------------------------------------------------------------------------------------------

    async def _negotiate(self, peer: Peer, text: str, summary: OfferSummary, *, publish: bool) -> str:
        """Set the offer, wire the tracks, gather every candidate: the complete (non-trickle) answer's SDP."""
        from aiortc import RTCRtpReceiver, RTCSessionDescription

        pc, session, transport = peer.pc, peer.session, peer.transport

        @pc.on("track")
        def on_track(track: Any) -> None:
            if not publish:
                peer.start(drain(track))
            elif track.kind == "video":
                peer.start(feed_session(track, session))
            else:
                peer.start(drain(track))  # audio: accepted and ignored

        if transport is not None:
            @pc.on("datachannel")
            def on_datachannel(channel: Any) -> None:
                transport.attach(channel)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(text, "offer"))
        except ValueError as error:  # aiortc's SDP parser
            raise SignalingError(400, f"the SDP offer could not be used: {str(error)[:200]}") from None
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                use_marker_jitter_buffer(transceiver.receiver)  # a frame is decoded when its last packet is in
        capabilities = RTCRtpReceiver.getCapabilities("video")
        assert capabilities is not None
        preferred = [c for name in self.config.video_codecs for c in capabilities.codecs
                     if c.mimeType.lower() == f"video/{name.lower()}"]
        preferred += [c for c in capabilities.codecs if c.mimeType.lower() == "video/rtx"]
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.setCodecPreferences(preferred)
        if summary.receives_video():
            track = make_output_track(session, self.hub.encode_pool, own=publish, encoder=self.config.encoder)
            attach_output(pc.addTrack(track), track)
            track.on("ended", lambda: peer.close("the stream ended"))  # a viewer's peer ends with its stream
        answer = await pc.createAnswer()
        with gather_on(self.config.hosts, self.config.ports):
            await pc.setLocalDescription(answer)
        sdp = pc.localDescription.sdp
        if self.config.ports is not None and "a=candidate:" not in sdp:
            first, last = self.config.ports
            raise SignalingError(503, f"no free UDP port in --rtc-port-range {first}-{last} for this peer's media; "
                                      "try again later", _RETRY)
        return sdp

    def _body(self, request: _Request, limit: int | None = None) -> bytes:
        """The request's body, at most ``limit`` bytes (``max_sdp_bytes``): 413 beyond."""
        limit = limit or self.config.max_sdp_bytes
        if len(request.body) > limit:
            raise SignalingError(413, f"the body has {len(request.body)} bytes, more than the limit of {limit} bytes")
        return request.body

    async def close(self) -> None:
        """Close every peer (the server is stopping)."""
        peers = self.publishers.values() + self.viewers.values()
        if peers:
            await asyncio.wait([p.close("the server is shutting down") for p in peers], timeout=ADMIT_TIMEOUT_S)


def _sdp_answer(sdp: str, location: str, headers: tuple[tuple[str, str], ...] = ()) -> SignalingReply:
    return SignalingReply(201, sdp.encode(), "application/sdp", (("Location", location), *headers))


def _text(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> SignalingReply:
    return SignalingReply(status, text.encode(), "text/plain; charset=utf-8", headers)


def _route_name(path: str) -> str:
    """The route without its secrets (view tokens, resource ids never reach a log)."""
    return WHIP_PATH if path.lstrip("/").startswith("whip") else WHEP_PREFIX + "…"
