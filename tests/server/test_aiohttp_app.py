"""streamdiff.server.aiohttp_app on real sockets: mounted routes with request bodies, the guard in front of every route,
and the edges of aiohttp's limits (the message size exactly at the limit, a plain GET of a socket path)."""

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
def mounted(tiny_model):
    """``mounted(**ServerConfig fields)``: a server with one mounted route, ``POST /echo`` (its body back, and the
    number of stream sessions of the hub it was given), and the hubs the route was mounted with."""
    from aiohttp import web

    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig

    servers, hubs = [], []

    def mount(app: web.Application, hub) -> None:
        async def echo(request: web.Request) -> web.Response:
            body = await request.read()
            return web.Response(body=body, headers={"X-Sessions": str(len(hub.sessions))}, status=201)

        hubs.append(hub)
        app.router.add_post("/echo", echo)

    def start(**config) -> BackgroundServer:
        engine = StreamEngine(tiny_model, EngineConfig(max_streams=2))
        server = BackgroundServer(engine, ServerConfig(port=0, **config), mounts=[mount]).start()
        servers.append(server)
        return server

    yield start, hubs
    for server in servers:
        server.stop()


def test_a_mounted_route_gets_its_body_and_shares_the_hub(mounted) -> None:
    start, hubs = mounted
    server = start()
    assert hubs == [server.hub]
    body = b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n" * 20  # an SDP offer's size
    status, headers, echoed = request(server, "POST", "/echo", body, {"Content-Type": "application/sdp"})
    assert (status, echoed, headers["X-Sessions"]) == (201, body, "0")

    async def main() -> None:  # a stream in the hub: the mounted route sees it
        async with await StreamClient.connect(server.url, settings()):
            assert request(server, "POST", "/echo", b"x")[1]["X-Sessions"] == "1"

    run(main())
    assert request(server, "GET", "/healthz")[0] == 200  # the server's own routes are still there
    assert request(server, "GET", "/echo")[0] == 404  # a GET of the mounted path: the page routes say so


def test_the_guard_applies_to_mounted_routes(mounted) -> None:
    start, _ = mounted
    server = start(hosts=HostPolicy.of(["studio.example.com"]), limits=ServerLimits(max_message_bytes=4096,
                                                                                     max_text_bytes=1024,
                                                                                     handshake_timeout_s=1.0))
    assert request(server, "POST", "/echo", b"x", {"Host": "evil.example.com"})[0] == 421
    assert request(server, "POST", "/echo", b"x", {"Host": "studio.example.com"})[0] == 201
    assert request(server, "POST", "/echo", b"x" * 5000, {"Host": "studio.example.com"})[0] == 413
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # a body that never comes whole
    try:
        start_time = time.monotonic()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: studio.example.com\r\nContent-Length: 100\r\n\r\nabc")
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
