"""``streamdiff serve``: the server's one application (:class:`~.asgi.ServerApp`) on an aiohttp host, on a
multi-stream engine. Thin glue only.

Routes (:mod:`.asgi`): ``/ws`` (a stream: :class:`~.session.StreamSession`), ``/ws/view/<token>`` (a viewer:
:class:`~.viewing.ViewerSession`), the pages, ``/healthz``, ``/readyz`` and ``/metrics`` (:mod:`.routes`), and with
``rtc`` WHIP/WHEP (:class:`~.rtc.RtcFront`). A Ray Serve replica serves the same application
(:mod:`streamdiff.deploy.replica`). The host (:mod:`.aiohttp_app`) enforces what it can before any of our code
runs: slow headers (``handshake_timeout_s``), ``max_message_bytes`` (a larger message closes with 1009 before it is
read), pings, no compression.

::

    engine = StreamEngine.from_pretrained("tiny", max_streams=4)
    async with StreamServer(engine, ServerConfig(port=8765)) as server:   # starts the engine, listens
        await stop_event.wait()
    # leaving: every client gets error + 1001, the engine is drained and stopped

    with BackgroundServer(engine, ServerConfig(port=0)) as server:        # the same, from synchronous code
        print(server.url)                                                  # ws://127.0.0.1:PORT/ws

    StreamServer(engine, config, rtc=RtcConfig(hosts=("127.0.0.1",)))   # WHIP/WHEP too (docs/webrtc.md)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import missing_extra
from .hub import Hub, ServerConfig
from .routes import StaticFiles
from ..protocol.wire import STREAM_PATH

__all__ = ["BackgroundServer", "StreamServer"]

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")


class StreamServer:
    """The HTTP/WebSocket server of one engine. ``own_engine``: start the engine with the server and drain it on
    stop. ``rtc``: serve WHIP/WHEP with this :class:`~.rtc.RtcConfig` (aiortc needed); None: WebSockets only.
    After :meth:`start`: :attr:`hub` and :attr:`rtc_front` (the :class:`~.rtc.RtcFront`, None without ``rtc``)."""

    def __init__(self, engine: Any, config: ServerConfig | None = None, *, own_engine: bool = True,
                 web_dir: Path = WEB_DIR, rtc: Any = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.own_engine = own_engine
        self.static = StaticFiles(web_dir)
        self.rtc = rtc
        self.hub: Hub | None = None
        self.rtc_front: Any = None
        self._runner: Any = None

    @property
    def port(self) -> int:
        """The port the server listens on (useful with ``port=0``)."""
        assert self._runner is not None, "the server is not started"
        return self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        """The stream socket's URL."""
        return f"ws://{_url_host(self.config.host)}:{self.port}{STREAM_PATH}"

    async def start(self) -> StreamServer:
        """Start the engine (if owned) and listen. Next: :meth:`stop`."""
        try:
            from aiohttp import web
        except ImportError:
            raise missing_extra("aiohttp", "server") from None
        from .aiohttp_app import bound_slow_requests, build_application, runner_options
        from .asgi import ServerApp

        if self.own_engine and not getattr(self.engine, "running", True):
            self.engine.start()
        self.hub = Hub(self.engine, self.config)
        if self.rtc is not None:
            from .rtc import RtcFront

            self.rtc_front = RtcFront(self.hub, self.rtc)
        limits = self.config.limits
        app = build_application(ServerApp(self.hub, self.static, self.rtc_front), limits)
        runner = web.AppRunner(app, **runner_options(limits))
        await runner.setup()
        bound_slow_requests(runner.server, app, limits.handshake_timeout_s)
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except BaseException:
            await runner.cleanup()
            self.hub.close()
            raise
        self._runner = runner
        logger.info("serving on http://%s:%d (streams: %s, max %d; token %s)", _url_host(self.config.host), self.port,
                    STREAM_PATH, limits.max_streams, "required" if self.config.token else "not required")
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: stop listening, error + 1001 to every client, drain and stop the engine."""
        if self._runner is None:
            return
        runner, hub = self._runner, self.hub
        assert hub is not None
        for site in list(runner.sites):
            await site.stop()  # no new connections
        await hub.shutdown(timeout)
        if self.rtc_front is not None:
            await self.rtc_front.close()  # the WebRTC peers
        await runner.cleanup()  # the remaining sockets
        if self.own_engine:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.engine.stop(drain=True,
                                                                                            timeout=timeout))
        hub.close()
        self._runner = None
        logger.info("server stopped")

    async def __aenter__(self) -> StreamServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class BackgroundServer:
    """A :class:`StreamServer` on its own event loop in a thread, for synchronous programs and tests.

    ``start()`` returns once the server listens (errors raise there); ``stop()`` shuts down gracefully.
    """

    def __init__(self, engine: Any, config: ServerConfig | None = None, **kwargs: Any) -> None:
        self.server = StreamServer(engine, config, **kwargs)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.server.config.host)}:{self.port}"

    @property
    def hub(self) -> Hub:
        assert self.server.hub is not None
        return self.server.hub

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name="streamdiff-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def call(self, function: Any, timeout: float = 30.0) -> Any:
        """Run ``function()`` (a coroutine function) on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(function(), self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None or self.loop is None or self._stop is None:
            return
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as error:  # noqa: BLE001 - handed to start()'s caller
                self._error = error
                self._started.set()
                return
            self._started.set()
            await self._stop.wait()
            await self.server.stop()

        asyncio.run(main())


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
