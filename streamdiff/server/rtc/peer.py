"""Peer connections of the WebRTC front end: ICE gathering on chosen addresses, the data-channel transport of a
session, and the life cycle of a publisher (WHIP) or viewer (WHEP) peer.

A publishing peer runs the one :class:`~streamdiff.server.session.StreamSession` over a :class:`PeerTransport`:
the WHIP request *is* the hello (built from the server's defaults and the URL's query, with the bearer token), so
the session admits the stream exactly as for a WebSocket (``max_streams``, view tokens, the engine's checks) and
its ``ready`` tells the HTTP handler the outcome. After that the data channel, when the client opened one, carries
the protocol's JSON messages both ways (``ready`` first, then update/ack/error/stats); frames come from the video
track (:func:`~.media.feed_session`) and go out on the peer's own track when it offered ``sendrecv``.

Clean-up, whatever happens first: DELETE on the resource; the client closing (DTLS close); ICE consent failing
(aioice: ~30 s without answers); nothing received for ``ServerLimits.idle_timeout_s`` (the session's idle timeout
counts video frames and data-channel messages); not connected within ``RtcConfig.connect_timeout_s``; the session
ending (engine error, error budget, shutdown) closes the peer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import ipaddress
import json
import logging
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..transport import TransportClosed

if TYPE_CHECKING:
    from ..session import StreamSession
    from .config import RtcConfig

__all__ = ["Peer", "PeerTransport", "gather_on", "new_peer_connection"]

logger = logging.getLogger(__name__)

MAX_PENDING_MESSAGES = 16  # sent before the data channel opened (ready first)
MAX_INCOMING_MESSAGES = 64  # received on the data channel, not read yet: more closes the peer
MAX_CHANNEL_BUFFER_BYTES = 1 << 20  # a data channel whose client stops reading: its messages are dropped beyond
#: binds tried per socket in ``--rtc-port-range`` (from a random port on): an offer costs the event loop at most
#: this many failed binds however large the range and however many of its ports other processes hold
MAX_BIND_TRIES = 64

_HOSTS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("streamdiff_rtc_hosts", default=None)
_PORTS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("streamdiff_rtc_ports", default=None)
_patched = False


class NoFreePort(OSError):
    """Every UDP port of ``--rtc-port-range`` is taken on an address."""


@contextlib.contextmanager
def gather_on(hosts: tuple[str, ...], ports: tuple[int, int] | None = None) -> Iterator[None]:
    """ICE candidates gathered inside this block (``setLocalDescription``) use only ``hosts`` (``--rtc-host``) and,
    with ``ports`` ``(first, last)`` (``--rtc-port-range``), only those UDP ports. An empty ``hosts`` keeps aioice's
    choice (every interface but loopback); None ``ports`` the kernel's ephemeral ports.

    aioice's ``Connection.gather_candidates`` calls the module-level ``aioice.ice.get_host_addresses``, and binds
    each host candidate's socket with ``loop.create_datagram_endpoint(..., local_addr=(address, 0))``: the first is
    wrapped once, the second once per event loop, both to read context variables, so only the peer connections
    gathering inside this block (and the tasks they start) are affected."""
    global _patched
    import aioice.ice as ice

    if not _patched:
        original = ice.get_host_addresses

        def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
            hosts = _HOSTS.get()
            if not hosts:
                return original(use_ipv4, use_ipv6)
            return [h for h in hosts if (use_ipv4 if ipaddress.ip_address(h).version == 4 else use_ipv6)]

        ice.get_host_addresses = get_host_addresses
        _patched = True
    if ports is not None:
        _bind_in_range(asyncio.get_running_loop())
    token, port_token = _HOSTS.set(tuple(hosts) or None), _PORTS.set(ports)
    try:
        yield
    finally:
        _HOSTS.reset(token)
        _PORTS.reset(port_token)


def _bind_in_range(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop``'s datagram endpoints asked for on port 0 bind to a free port of the context's range instead
    (from a random start, so concurrent gatherings spread; EADDRINUSE/EACCES: the next one, at most
    :data:`MAX_BIND_TRIES` in all: a range almost full of other processes' sockets may answer 503 when a port is
    still free, and the client's retry starts elsewhere)."""
    if getattr(loop, "_streamdiff_port_range", False):
        return
    original = loop.create_datagram_endpoint

    async def create_datagram_endpoint(protocol_factory: Any, local_addr: Any = None, **kwargs: Any) -> Any:
        ports = _PORTS.get()
        if ports is None or local_addr is None or local_addr[1] != 0:
            return await original(protocol_factory, local_addr=local_addr, **kwargs)
        first, last = ports
        count = last - first + 1
        start = secrets.randbelow(count)
        for step in range(min(count, MAX_BIND_TRIES)):
            port = first + (start + step) % count
            try:
                return await original(protocol_factory, local_addr=(local_addr[0], port), **kwargs)
            except OSError as error:
                if error.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
        tried = "every port" if count <= MAX_BIND_TRIES else f"{MAX_BIND_TRIES} ports"
        raise NoFreePort(errno.EADDRINUSE, f"no free UDP port on {local_addr[0]} in --rtc-port-range {first}-{last} "
                                           f"({tried} tried)")

    loop.create_datagram_endpoint = create_datagram_endpoint  # type: ignore[method-assign]
    loop._streamdiff_port_range = True  # type: ignore[attr-defined]


def new_peer_connection() -> Any:
    """An ``RTCPeerConnection`` with no STUN/TURN server (aiortc's default asks Google's STUN server): a server
    answers with its host candidates; clients behind NAT reach it through theirs."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class PeerTransport:
    """:class:`~streamdiff.server.transport.Transport` of a session over a peer connection and its data channel.

    :meth:`receive` yields the hello built from the WHIP request first, then the data channel's messages.
    :meth:`send` reads the session's first answer (``ready``, or a fatal ``error``) into :attr:`admitted`, routes
    the answers to HTTP control requests (:meth:`request`) back to them, and sends the rest on the data channel
    (held until it opens; dropped when the client has none). Binary output frames are never sent: frames go out on
    the video track (``wants_frames`` False tells the session not to encode them).
    """

    wants_frames = False

    def __init__(self, hello: str, remote: str, origin: str | None, data_channel: bool) -> None:
        self.remote, self.origin = remote, origin
        self.admitted: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.channel: Any = None
        self.messages_dropped = 0
        self.on_close: Any = None  # async callable: close the peer connection
        self._data_channel = data_channel
        self._incoming: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._incoming.put_nowait(hello)
        self._pending: list[str] = []
        self._closed: asyncio.Future[TransportClosed] = asyncio.get_running_loop().create_future()
        self._requests: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._next_request = 0

    # -- the data channel -------------------------------------------------------------------------------------

    def attach(self, channel: Any) -> None:
        """The client's data channel opened: flush what waited, read its messages."""
        if self.channel is not None:
            channel.close()  # one control channel per peer
            return
        self.channel = channel
        pending, self._pending = self._pending, []
        for message in pending:
            self._channel_send(message)

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            if self._closed.done():
                return
            if self._incoming.qsize() >= MAX_INCOMING_MESSAGES:
                self.lost(TransportClosed(1008, f"more than {MAX_INCOMING_MESSAGES} data-channel messages waiting"))
                return
            self._incoming.put_nowait(message)

    def _channel_send(self, message: str) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER_BYTES:
            self.messages_dropped += 1
            return
        channel.send(message)

    # -- Transport --------------------------------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        if not self._incoming.empty():
            return self._incoming.get_nowait()
        if self._closed.done():
            raise self._closed.result()
        getter = asyncio.ensure_future(self._incoming.get())
        try:
            await asyncio.wait([getter, self._closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        raise self._closed.result()

    async def send(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            return  # output frames travel on the video track
        message = json.loads(data)
        kind = message.get("type")
        if not self.admitted.done() and (kind == "ready" or (kind == "error" and message.get("fatal"))):
            self.admitted.set_result(message)
        request = self._requests.pop(str(message.get("request_id")), None) if kind in ("ack", "error") else None
        if request is not None and isinstance(message.get("request_id"), str):
            if not request.done():
                request.set_result(message)
            return
        if self.channel is not None:
            self._channel_send(data)
        elif self._data_channel and len(self._pending) < MAX_PENDING_MESSAGES:
            self._pending.append(data)

    async def close(self, code: int, reason: str) -> None:
        self.lost(TransportClosed(code, reason, by_server=True))
        if self.on_close is not None:
            await self.on_close()

    def abort(self) -> None:
        self.lost(TransportClosed(None, "aborted", by_server=True))
        if self.on_close is not None:
            asyncio.ensure_future(self.on_close())

    # -- the peer and HTTP ------------------------------------------------------------------------------------

    def lost(self, closed: TransportClosed) -> None:
        """The connection is gone (the peer closed, ICE failed, DELETE): the session's receive ends."""
        if not self._closed.done():
            self._closed.set_result(closed)
        if not self.admitted.done():
            self.admitted.set_result({"type": "error", "fatal": True, "code": "closed", "message": "closed"})
        for request in self._requests.values():
            if not request.done():
                request.cancel()
        self._requests.clear()

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run ``message`` (an ``update``) through the session as if the data channel had carried it; returns its
        ``ack`` or ``error``. Its ``request_id`` is replaced by one of the server's (``http-N``)."""
        if self._incoming.qsize() >= MAX_INCOMING_MESSAGES:
            raise asyncio.TimeoutError("too many messages waiting")
        self._next_request += 1
        request_id = f"http-{self._next_request}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        self._incoming.put_nowait(json.dumps({**message, "request_id": request_id}))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._requests.pop(request_id, None)


class Peer:
    """One peer connection of the front end and what runs for it: a publisher (``session`` set: WHIP) or a
    viewer of ``session`` (WHEP). :meth:`closed` is done once everything of it has stopped."""

    def __init__(self, pc: Any, session: StreamSession, transport: PeerTransport | None, config: RtcConfig) -> None:
        self.pc, self.session, self.transport, self.config = pc, session, transport, config
        self.tasks: list[asyncio.Task[Any]] = []
        self.session_task: asyncio.Task[None] | None = None  # a publisher's session
        self.connected = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None
        self._done = asyncio.get_running_loop().create_future()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                self.connected.set()
            elif state in ("failed", "closed"):
                self.close(f"the peer connection {state}")

    def start(self, work: Any) -> None:
        """Run ``work`` (a coroutine) for this peer; it is cancelled when the peer closes."""
        self.tasks.append(asyncio.ensure_future(work))

    def watch(self, session_task: asyncio.Task[None] | None = None) -> None:
        """After the answer: the connect deadline, and the end of the session (a publisher's own task; for a
        viewer, its track ends with the stream) closes the peer."""
        self.start(self._connect_deadline())
        self.session_task = session_task
        if session_task is not None:
            session_task.add_done_callback(lambda _: self.close("the stream ended"))

    async def _connect_deadline(self) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), self.config.connect_timeout_s)
        except asyncio.TimeoutError:
            logger.info("%s: a peer did not connect within %g s; closing it", self.session.stream_id,
                        self.config.connect_timeout_s)
            self.close(f"not connected within {self.config.connect_timeout_s:g} s")

    def close(self, why: str) -> asyncio.Future[None]:
        """Close the peer (idempotent): the session's transport is lost (a publisher's session ends), tasks stop,
        the peer connection closes. Returns :attr:`done`."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(why))
        return self._done

    @property
    def done(self) -> asyncio.Future[None]:
        return self._done

    async def _close(self, why: str) -> None:
        try:
            if self.transport is not None:
                self.transport.lost(TransportClosed(None, why))
            current = asyncio.current_task()
            for task in self.tasks:
                if task is not current:
                    task.cancel()
            await self.pc.close()
        finally:
            if not self._done.done():
                self._done.set_result(None)
