"""streamdiff.server.aiohttp_app (the aiohttp host of the server's one ASGI application) on real sockets: the guards in
front of routes with request bodies, and the edges of aiohttp's limits (the message size exactly at the limit, a
plain GET of a socket path)."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import pytest
from live import run, settings

from streamdiff.client import StreamClient
from streamdiff.protocol.limits import ServerLimits
from streamdiff.protocol.policy import HostPolicy


def request(server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    call = urllib.request.Request(server.http_url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture()
def rtc_server(tiny_model):
    """``rtc_server(**ServerConfig fields)``: ``streamdiff serve``'s server with WHIP/WHEP on (a route that takes a
    request body), on the tiny engine."""
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig
    from streamdiff.server.rtc import RtcConfig

    servers = []

    def start(**config) -> BackgroundServer:
        engine = StreamEngine(tiny_model, EngineConfig(max_streams=2))
        server = BackgroundServer(engine, ServerConfig(port=0, **config), rtc=RtcConfig(hosts=("127.0.0.1",))).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_the_hosts_guards_apply_to_routes_with_bodies(rtc_server) -> None:
    """Host policy (421), a body over ``max_message_bytes`` (413, unread), a body that never arrives whole (408 after
    ``handshake_timeout_s``), all before WHIP looks at the request; a body within the limits reaches WHIP (which
    answers an SDP that is no offer with 400)."""
    server = rtc_server(hosts=HostPolicy.of(["studio.example.com"]),
                        limits=ServerLimits(max_message_bytes=4096, max_text_bytes=1024, handshake_timeout_s=1.0))
    sdp = {"Content-Type": "application/sdp"}
    assert request(server, "POST", "/whip", b"v=0\r\n", {**sdp, "Host": "evil.example.com"})[0] == 421
    status, _, body = request(server, "POST", "/whip", b"x" * 5000, {**sdp, "Host": "studio.example.com"})
    assert status == 413 and b"4096" in body
    status, _, body = request(server, "POST", "/whip", b"v=0\r\n", {**sdp, "Host": "studio.example.com"})
    assert status in (400, 401), body  # WHIP's own answer: no token / not an offer
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # a body that never comes whole
    try:
        start_time = time.monotonic()
        sock.sendall(b"POST /whip HTTP/1.1\r\nHost: studio.example.com\r\nContent-Length: 100\r\n\r\nabc")
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408 ") and 0.9 <= time.monotonic() - start_time <= 5.0, reply
    finally:
        sock.close()


def test_a_message_of_exactly_max_message_bytes_is_read_and_one_more_byte_is_1009(live) -> None:
    server = live(limits=ServerLimits(max_message_bytes=64 << 10, max_text_bytes=8 << 10))

    async def main() -> None:
        client = await StreamClient.connect(server.url, settings())
        await client.ws.send(b"XXXX" + b"\0" * ((64 << 10) - 4))  # read: a bad frame header, not fatal
        await client.wait_for(lambda: client.errors, timeout=10)
        assert (client.errors[0].code, client.errors[0].fatal) == ("bad_frame_header", False)
        await client.ws.send(b"XXXX" + b"\0" * ((64 << 10) - 3))
        await asyncio.wait_for(client.closed.wait(), 10)
        assert (client.close_code, client.close_reason) == (1009, f"message_too_big: frame with {(64 << 10) + 1} "
                                                                  f"bytes exceeds limit of {64 << 10} bytes")

    run(main())


def test_a_plain_get_of_a_socket_path_is_426(live) -> None:
    server = live()
    status, headers, _ = request(server, "GET", "/ws")
    assert status == 426 and headers["Upgrade"] == "websocket" and headers["Server"] == "streamdiff"
    assert request(server, "GET", "/ws?x=1")[0] == 400  # the query check comes first, as before any upgrade
    assert request(server, "POST", "/healthz", b"x")[0] == 405  # the page routes answer GET only
