"""streamdiff.server.asgi: the server's one application, the same under ``streamdiff serve``'s aiohttp host and under
another ASGI server (uvicorn, what Ray Serve's proxy runs): real sockets, the tiny engine, the real client."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from live import frames, run, settings

from streamdiff.protocol.limits import ServerLimits
from streamdiff.testing.serve import LoopbackUrls

uvicorn = pytest.importorskip("uvicorn")


class UvicornServer(LoopbackUrls):
    """:class:`~streamdiff.server.asgi.ServerApp` on a Hub and the tiny engine, served by uvicorn in a thread."""

    def __init__(self, engine: Any, config: Any) -> None:
        self.engine, self.config = engine, config
        self.started = threading.Event()
        self.hub: Any = None
        self.server: Any = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        from streamdiff.server.app import WEB_DIR
        from streamdiff.server.asgi import ServerApp
        from streamdiff.server.hub import Hub
        from streamdiff.server.routes import StaticFiles

        self.hub = Hub(self.engine, self.config)
        app = ServerApp(self.hub, StaticFiles(WEB_DIR))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    ws="websockets-sansio", lifespan="on"))
        task = asyncio.ensure_future(self.server.serve())
        while not self.server.started and not task.done():
            await asyncio.sleep(0.02)
        self.started.set()
        await task
        await self.hub.shutdown(5.0)
        self.hub.close()

    @property
    def port(self) -> int:  # type: ignore[override]
        return self.server.servers[0].sockets[0].getsockname()[1]

    def __enter__(self) -> UvicornServer:
        self.engine.start()
        self.thread.start()
        assert self.started.wait(30) and self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop(drain=False, timeout=10.0)


@pytest.fixture()
def servers(tiny_model, live):
    """(``streamdiff serve``'s server, the same application under uvicorn), each on its own tiny engine."""
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.hub import ServerConfig

    limits = ServerLimits(max_streams=2)
    config = ServerConfig(port=0, token="asgi-token-1234", limits=limits, metrics_token_required=False)
    with UvicornServer(StreamEngine(tiny_model, EngineConfig(max_streams=2)), config) as other:
        yield live(limits=limits, token="asgi-token-1234", metrics_token_required=False), other


def get(server: Any, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(server.http_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def stream(url: str, images: list[np.ndarray]) -> list[np.ndarray]:
    """Every image's output (lossless WebP both ways, the protocol's lossless pacing: nothing dropped)."""
    from streamdiff import StreamConfig
    from streamdiff.client.remote import RemoteEngine

    remote = RemoteEngine(url, token="asgi-token-1234", image_format="webp", quality=100)
    try:
        stream = remote.open_stream(StreamConfig(width=64, height=64, cfg_type="none"), lossless=True,
                                    prompt="a watercolor")
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend(iter(lambda: stream.get(timeout=30), None)))
        reader.start()  # outputs are read as they come
        for k, image in enumerate(images):
            stream.submit(image, frame_id=k, timeout=30)
        stream.end_input()
        reader.join(60)
        assert stream.error is None and stream.stats.dropped_inputs == 0
        outputs = [out.images.numpy() for out in got if out.images is not None]
    finally:
        remote.stop()
    return outputs


def test_both_hosts_give_the_same_outputs_for_the_same_frames(servers) -> None:
    ours, other = servers
    images = frames(6)
    expected = stream(ours.url, images)
    got = stream(other.url, images)
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected):
        assert np.array_equal(a, b)
    assert not np.array_equal(expected[1], expected[5])  # the outputs follow the moving frames


@pytest.mark.parametrize("path, method", [
    ("/healthz", "GET"), ("/readyz", "GET"), ("/", "GET"), ("/view.html", "GET"), ("/nothing-here", "GET"),
    ("/ws", "GET"), ("/ws?x=1", "GET"), ("/healthz", "POST"), ("/whip", "POST"), ("/metrics", "GET"),
])
def test_both_hosts_answer_plain_http_alike(servers, path: str, method: str) -> None:
    ours, other = servers
    status, body = get(ours, path, method)
    assert get(other, path, method) == (status, body) if path != "/metrics" else get(other, path)[0] == status
    assert status == {"/healthz": 200 if method == "GET" else 405, "/readyz": 200, "/": 200, "/view.html": 200,
                      "/nothing-here": 404, "/ws": 400 if "?" in path else 426, "/whip": 404,
                      "/metrics": 200}[path.split("?")[0]]


def test_a_refused_upgrade_is_a_real_http_answer_under_both_hosts(servers) -> None:
    """``/ws`` with a query string: 400 before any upgrade, where the server offers ASGI's
    ``websocket.http.response`` (aiohttp's host and uvicorn both do)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def status_of(url: str) -> int:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url + "?x=1"):
                pass
        return refused.value.response.status_code

    ours, other = servers
    assert run(status_of(ours.url)) == run(status_of(other.url)) == 400


def test_a_head_request_gets_the_get_answers_length_and_no_body_under_both_hosts(servers) -> None:
    for server in servers:
        request = urllib.request.Request(server.http_url + "/", method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200 and reply.read() == b""
            length = int(reply.headers["Content-Length"])
        assert length == len(get(server, "/")[1]) > 1000  # the stream page
