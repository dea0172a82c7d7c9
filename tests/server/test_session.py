"""streamdiff.server.session and .viewing over a transport that is not ``websockets``: the seam a FastAPI/Starlette
WebSocket (or Ray Serve) front end will use. The real engine and the real protocol; only the socket differs."""

from __future__ import annotations

import asyncio
import json

import pytest
from live import bodies, frames

from streamdiff.engine import EngineConfig, StreamEngine
from streamdiff.protocol.client import ClientConnection, OutputFrame
from streamdiff.server.hub import Hub, ServerConfig
from streamdiff.server.session import StreamSession
from streamdiff.server.transport import TransportClosed
from streamdiff.server.viewing import ViewerSession


class QueueTransport:
    """An in-memory :class:`~streamdiff.server.transport.Transport`: what the session sends lands in ``sent``."""

    def __init__(self, origin: str | None = None) -> None:
        self.remote, self.origin = "memory:1", origin
        self.incoming: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.sent: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.closed: tuple[int, str] | None = None

    async def receive(self) -> str | bytes:
        message = await self.incoming.get()
        if message is None or self.closed is not None:
            raise TransportClosed(1000 if message is None else self.closed[0])
        return message

    async def send(self, data: str | bytes) -> None:
        if self.closed is not None:
            raise TransportClosed(self.closed[0])
        await self.sent.put(data)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.incoming.put_nowait(None)

    def abort(self) -> None:
        self.closed = (1006, "")
        self.incoming.put_nowait(None)


async def _next(transport: QueueTransport, kind: type, timeout: float = 20.0):
    while True:
        message = await asyncio.wait_for(transport.sent.get(), timeout)
        if isinstance(message, kind):
            return message


def test_a_session_and_a_viewer_run_on_any_transport(tiny_model) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2)).start()
    body = bodies(frames(1))[0]

    async def main() -> None:
        hub = Hub(engine, ServerConfig(stats_interval_s=0))
        transport, client = QueueTransport(), ClientConnection({"width": 64, "height": 64}, view_token="Q" * 16)
        session = asyncio.ensure_future(StreamSession(hub, transport).run())
        await transport.incoming.put(client.hello())
        ready = client.receive_text(await _next(transport, str))
        assert ready.stream_id in hub.sessions and ready.view_token == "Q" * 16
        viewer_transport = QueueTransport()
        viewer = asyncio.ensure_future(ViewerSession(hub, viewer_transport, "Q" * 16).run())
        assert json.loads(await _next(viewer_transport, str))["type"] == "viewing"
        for i in range(4):
            await transport.incoming.put(client.frame(body, frame_id=i))
            await asyncio.sleep(0.05)  # a camera's pace
        out = client.receive_bytes(await _next(transport, bytes))
        assert isinstance(out, OutputFrame) and out.frame_id in range(4)
        seen = client.receive_bytes(await _next(viewer_transport, bytes))
        assert seen.frame_id in range(4)
        request_id, text = client.update(prompt="ink")
        await transport.incoming.put(text)
        while True:  # stats may come in between
            message = json.loads(await _next(transport, str))
            if message["type"] == "ack":
                break
        assert message["request_id"] == request_id and message["settings"]["prompt"] == "ink"
        await transport.incoming.put(None)  # the client goes away
        await asyncio.wait_for(session, 20)
        await asyncio.wait_for(viewer, 20)
        assert viewer_transport.closed[0] == 1000 and not hub.sessions and not hub.viewers
        hub.close()

    try:
        asyncio.run(main())
    finally:
        engine.stop()


@pytest.mark.parametrize("origin,code", [("https://evil.example", 1008), (None, None)])
def test_origin_is_checked_before_anything_else(tiny_model, origin, code) -> None:
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1))

    async def main() -> tuple | None:
        hub = Hub(engine, ServerConfig())
        transport = QueueTransport(origin)
        session = asyncio.ensure_future(StreamSession(hub, transport).run())
        await asyncio.sleep(0)
        await transport.incoming.put(None)
        await asyncio.wait_for(session, 10)
        hub.close()
        return transport.closed

    closed = asyncio.run(main())
    assert (closed[0] if closed else None) == code


def test_a_reference_image_upload_sets_the_streams_image_prompt(cache_dir) -> None:
    from streamdiff import load_model
    from streamdiff.protocol.limits import ServerLimits
    from streamdiff.protocol.wire import pack_reference_header

    model = load_model("tiny-random", device="cpu", ip_adapter="tiny")
    model.ip_adapter.name = "style"
    engine = StreamEngine(model, EngineConfig(max_streams=1)).start()
    body = bodies(frames(1))[0]
    reference = bodies(frames(1, offset=9))[0]

    async def answer(transport: QueueTransport) -> dict:
        while True:  # stats may come in between
            message = json.loads(await _next(transport, str))
            if message["type"] != "stats":
                return message

    async def main() -> None:
        limits = ServerLimits().for_engine(engine)
        hub = Hub(engine, ServerConfig(stats_interval_s=0, limits=limits))
        transport = QueueTransport()
        client = ClientConnection({"width": 64, "height": 64, "ip_adapter_scale": 1.5})
        session = asyncio.ensure_future(StreamSession(hub, transport).run())
        await transport.incoming.put(client.hello())
        ready = json.loads(await _next(transport, str))
        assert ready["limits"]["ip_adapter"] == "style" and ready["settings"]["ip_adapter"] == ""
        await transport.incoming.put(pack_reference_header(5) + reference)  # no IP-Adapter chosen yet
        refused = await answer(transport)
        assert (refused["code"], refused["field"], refused["request_id"]) == ("not_allowed", "settings.ip_adapter", 5)
        await transport.incoming.put(json.dumps({"type": "update", "request_id": 1,
                                                 "settings": {"ip_adapter": "style"}}))
        assert (await answer(transport))["settings"]["ip_adapter"] == "style"
        await transport.incoming.put(pack_reference_header(6) + b"not an image")
        assert (await answer(transport))["request_id"] == 6
        request_id, message = client.reference_image(reference)
        await transport.incoming.put(message)
        ack = await answer(transport)
        assert (ack["type"], ack["request_id"], ack["settings_version"]) == ("ack", request_id, 2)
        stream = next(iter(hub.sessions.values())).stream
        assert stream.prompt.reference_image is not None and stream.prompt.ip_adapter_scale == 1.5
        for i in range(3):
            await transport.incoming.put(client.frame(body, frame_id=i))
            await asyncio.sleep(0.05)
        await _next(transport, bytes)
        assert engine.images.encoder_calls == 1 and float(stream.state.extras.batch["ip_scale"][0]) == 1.5
        await transport.incoming.put(None)
        await asyncio.wait_for(session, 20)
        hub.close()

    try:
        asyncio.run(main())
    finally:
        engine.stop()
