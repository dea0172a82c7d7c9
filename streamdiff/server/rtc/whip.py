"""WHIP ingest (RFC 9725) and WHEP playback as aiohttp handlers: :func:`add_rtc_routes` (docs/webrtc.md).

::

    POST   /whip                     Authorization: Bearer TOKEN, application/sdp offer → 201, Location, SDP answer
    DELETE /whip/{resource}          Authorization: Bearer TOKEN → 200 (the stream ends, its slot is free)
    POST   /whip/{resource}/update   Authorization: Bearer TOKEN, JSON update message → 200 ack / 400 error
    PATCH  /whip/{resource}          405 (no trickle ICE, no ICE restart: the answer carries every candidate)
    POST   /whep/{view_token}        application/sdp offer (recvonly video) → 201, Location, SDP answer
    DELETE /whep/{view_token}/{resource}

Publishing is admitted by the same :class:`~streamdiff.server.session.StreamSession` as a WebSocket hello (see
:mod:`.peer`), so streams of both kinds count together against ``max_streams`` (503 with ``Retry-After`` when
full). Pure checks live in :mod:`.signaling`; media in :mod:`.media`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from ...errors import ProtocolError
from ...protocol.session import ConnectionState
from ..session import StreamSession
from ..transport import TransportClosed
from ...protocol.wire import PROTOCOL_VERSION, load_json
from .config import RtcConfig
from .media import drain, feed_session, keep_rtp_timestamps, make_output_track
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
    from aiohttp import web

    from ..hub import Hub

__all__ = ["RtcFront", "add_rtc_routes"]

logger = logging.getLogger(__name__)

WHIP_PATH = "/whip"
WHEP_PREFIX = "/whep/"
ADMIT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
_UNAUTHORIZED = (("WWW-Authenticate", 'Bearer realm="streamdiff"'),)
_RETRY = (("Retry-After", "1"),)
# A fatal error answering the WHIP request's hello → HTTP status.
_STATUS = {"server_full": 503, "shutting_down": 503, "unauthorized": 401, "forbidden_origin": 403,
           "view_token_in_use": 409, "closed": 503}


class RtcFront:
    """The WebRTC front end of one server: its resources and peers (build it with :func:`add_rtc_routes`)."""

    def __init__(self, hub: Hub, config: RtcConfig) -> None:
        self.hub, self.config = hub, config
        self.publishers: ResourceTable[Peer] = ResourceTable()
        self.viewers: ResourceTable[Peer] = ResourceTable()

    # -- WHIP -------------------------------------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        hub = self.hub
        token = bearer_token(request.headers.get("Authorization"))
        if not token_matches(token, hub.config.token):
            raise SignalingError(401, "a valid bearer token is needed (Authorization: Bearer TOKEN)", _UNAUTHORIZED)
        if hub.shutting_down:
            raise SignalingError(503, "the server is shutting down", _RETRY)
        text, summary = check_offer(await self._body(request), request.content_type, self.config, publish=True)
        settings, view_token = query_settings(request.query)
        if hub.full:
            raise SignalingError(503, f"the server already serves its {hub.limits.max_streams} streams; try again "
                                      "later", _RETRY)
        hello: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION, "settings": settings, "client": "whip"}
        if hub.config.token is not None:
            hello["token"] = token
        if view_token is not None:
            hello["view_token"] = view_token
        transport = PeerTransport(json.dumps(hello), _remote(request), request.headers.get("Origin"),
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
        except BaseException:
            await asyncio.shield(peer.close("the negotiation failed"))
            raise
        resource = self.publishers.add(peer, token if hub.config.token is not None else None)
        peer.done.add_done_callback(lambda _: self.publishers.remove(resource))
        peer.watch(session_task)
        logger.info("%s: WHIP publisher from %s (%s, data channel: %s)", session.stream_id, _remote(request),
                    "sendrecv" if summary.receives_video() else "sendonly", summary.data_channel)
        return _sdp_answer(sdp, f"{WHIP_PATH}/{resource}",
                           (("X-Streamdiff-View", f"{WHEP_PREFIX}{session.view_token}"),))

    async def unpublish(self, request: web.Request) -> web.Response:
        peer = self._publisher(request)
        ends = [peer.close("DELETE by the client")] + ([peer.session_task] if peer.session_task else [])
        await asyncio.wait(ends, timeout=ADMIT_TIMEOUT_S)  # the session has left the engine: its slot is free
        return _text(200, "ended\n")

    async def update(self, request: web.Request) -> web.Response:
        from aiohttp import web

        peer = self._publisher(request)
        body = await self._body(request, self.hub.limits.max_text_bytes)
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
        return web.json_response(answer, status=200 if answer.get("type") == "ack" else 400)

    def _publisher(self, request: web.Request) -> Peer:
        token = bearer_token(request.headers.get("Authorization"))
        if not token_matches(token, self.hub.config.token):
            raise SignalingError(401, "a valid bearer token is needed (Authorization: Bearer TOKEN)", _UNAUTHORIZED)
        return self.publishers.find(request.match_info["resource"],
                                    token if self.hub.config.token is not None else None)

    # -- WHEP -------------------------------------------------------------------------------------------------

    async def view(self, request: web.Request) -> web.Response:
        hub, view_token = self.hub, request.match_info["view_token"]
        session = None if hub.shutting_down else hub.find_view(view_token)
        if session is None or session.conn.state is ConnectionState.CLOSED or session.stream is None:
            raise SignalingError(404, "no stream has this view token")
        text, summary = check_offer(await self._body(request), request.content_type, self.config, publish=False)
        watching = [p for p in self.viewers.values() if p.session is session]
        if len(watching) + len(session.viewers) >= hub.limits.max_viewers_per_stream:
            raise SignalingError(503, f"this stream has its {hub.limits.max_viewers_per_stream} viewers; try again "
                                      "later", _RETRY)
        peer = Peer(new_peer_connection(), session, None, self.config)
        try:
            sdp = await self._negotiate(peer, text, summary, publish=False)
        except BaseException:
            await asyncio.shield(peer.close("the negotiation failed"))
            raise
        resource = self.viewers.add(peer, view_token)
        peer.done.add_done_callback(lambda _: self.viewers.remove(resource))
        peer.watch()
        logger.info("%s: WHEP viewer from %s", session.stream_id, _remote(request))
        return _sdp_answer(sdp, f"{WHEP_PREFIX}{view_token}/{resource}")

    async def unview(self, request: web.Request) -> web.Response:
        peer = self.viewers.find(request.match_info["resource"], request.match_info["view_token"])
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
        capabilities = RTCRtpReceiver.getCapabilities("video")
        assert capabilities is not None
        preferred = [c for name in self.config.video_codecs for c in capabilities.codecs
                     if c.mimeType.lower() == f"video/{name.lower()}"]
        preferred += [c for c in capabilities.codecs if c.mimeType.lower() == "video/rtx"]
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.setCodecPreferences(preferred)
        if summary.receives_video():
            track = make_output_track(session, self.hub.encode_pool, own=publish)
            keep_rtp_timestamps(pc.addTrack(track))
            track.on("ended", lambda: peer.close("the stream ended"))  # a viewer's peer ends with its stream
        answer = await pc.createAnswer()
        with gather_on(self.config.hosts):
            await pc.setLocalDescription(answer)
        return pc.localDescription.sdp

    async def _body(self, request: web.Request, limit: int | None = None) -> bytes:
        """The request's body, at most ``limit`` bytes (``max_sdp_bytes``): 413 beyond, read no further."""
        limit = limit or self.config.max_sdp_bytes
        if request.content_length is not None and request.content_length > limit:
            raise SignalingError(413, f"the body has {request.content_length} bytes, more than the limit of {limit} "
                                      "bytes")
        body = b""
        while len(body) <= limit:
            chunk = await request.content.read(limit + 1 - len(body))
            if not chunk:
                return body
            body += chunk
        raise SignalingError(413, f"the body has more than the limit of {limit} bytes")

    async def close(self) -> None:
        """Close every peer (the server is stopping)."""
        peers = self.publishers.values() + self.viewers.values()
        if peers:
            await asyncio.wait([p.close("the server is shutting down") for p in peers], timeout=ADMIT_TIMEOUT_S)


def add_rtc_routes(app: web.Application, hub: Hub, rtc_config: RtcConfig | None = None) -> RtcFront:
    """Mount WHIP and WHEP on ``app`` (an aiohttp application serving ``hub``'s server); returns the front end.
    Its peers are closed when the app shuts down."""
    from aiohttp import web

    front = RtcFront(hub, rtc_config or RtcConfig())

    def handler(method: Any) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await method(request)
            except SignalingError as error:
                logger.info("%s %s from %s refused (%d): %s", request.method, _route_name(request), _remote(request),
                            error.status, error)
                return _text(error.status, f"{error}\n", error.headers)
        return handle

    async def not_allowed(request: web.Request) -> web.Response:
        return _text(405, "trickle ICE and ICE restarts are not supported: the answer carries every candidate\n",
                     (("Allow", "DELETE"),))

    async def on_shutdown(app: web.Application) -> None:
        await front.close()

    app.router.add_post(WHIP_PATH, handler(front.publish))
    app.router.add_delete(WHIP_PATH + "/{resource}", handler(front.unpublish))
    app.router.add_patch(WHIP_PATH + "/{resource}", not_allowed)
    app.router.add_post(WHIP_PATH + "/{resource}/update", handler(front.update))
    app.router.add_post(WHEP_PREFIX + "{view_token}", handler(front.view))
    app.router.add_delete(WHEP_PREFIX + "{view_token}/{resource}", handler(front.unview))
    app.router.add_patch(WHEP_PREFIX + "{view_token}/{resource}", not_allowed)
    app.on_shutdown.append(on_shutdown)
    return front


def _sdp_answer(sdp: str, location: str, headers: tuple[tuple[str, str], ...] = ()) -> web.Response:
    from aiohttp import web

    return web.Response(status=201, body=sdp.encode(), content_type="application/sdp",
                        headers={"Location": location, **dict(headers)})


def _text(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> web.Response:
    from aiohttp import web

    return web.Response(status=status, text=text, headers=dict(headers))


def _remote(request: web.Request) -> str:
    return request.remote or "?"


def _route_name(request: web.Request) -> str:
    """The route without its secrets (view tokens, resource ids never reach a log)."""
    return WHIP_PATH if request.path.startswith(WHIP_PATH) else WHEP_PREFIX + "…"
