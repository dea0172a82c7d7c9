"""``streamdiff serve``: the asyncio WebSocket server (``websockets``) on a multi-stream engine. Thin glue only.

Routes: ``/ws`` (a stream: :class:`~.session.StreamSession`), ``/ws/view/<token>`` (a viewer:
:class:`~.viewing.ViewerSession`), and over plain HTTP the pages, ``/healthz``, ``/readyz`` and ``/metrics``
(:mod:`.routes`, through ``process_request``). The library enforces what it can before any of our code runs:
``max_size`` (a larger message closes with 1009 before it is read), ``open_timeout`` (slowloris handshakes),
pings, ``max_queue`` and no compression (``compression=None``: a client offering permessage-deflate gets none).

::

    engine = StreamEngine.from_pretrained("tiny", max_streams=4)
    async with StreamServer(engine, ServerConfig(port=8765)) as server:   # starts the engine, listens
        await stop_event.wait()
    # leaving: every client gets error + 1001, the engine is drained and stopped

    with BackgroundServer(engine, ServerConfig(port=0)) as server:        # the same, from synchronous code
        print(server.url)                                                  # ws://127.0.0.1:PORT/ws
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import missing_extra
from .hub import Hub, ServerConfig
from .routes import HttpReply, StaticFiles
from .session import StreamSession
from .transport import WebsocketsTransport, create_connection
from .viewing import ViewerSession
from ..protocol.wire import STREAM_PATH, SUBPROTOCOL, VIEW_SOCKET_PREFIX

__all__ = ["BackgroundServer", "StreamServer"]

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")


class StreamServer:
    """The WebSocket server of one engine. ``own_engine``: start the engine with the server and drain it on stop."""

    def __init__(self, engine: Any, config: ServerConfig | None = None, *, own_engine: bool = True,
                 web_dir: Path = WEB_DIR) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.own_engine = own_engine
        self.static = StaticFiles(web_dir)
        self.hub: Hub | None = None
        self._server: Any = None

    @property
    def port(self) -> int:
        """The port the server listens on (useful with ``port=0``)."""
        assert self._server is not None, "the server is not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The stream socket's URL."""
        return f"ws://{_url_host(self.config.host)}:{self.port}{STREAM_PATH}"

    async def start(self) -> StreamServer:
        """Start the engine (if owned) and listen. Next: :meth:`stop`."""
        try:
            from websockets.asyncio.server import serve
        except ImportError:
            raise missing_extra("websockets", "server") from None
        if self.own_engine and not getattr(self.engine, "running", True):
            self.engine.start()
        self.hub = Hub(self.engine, self.config)
        limits = self.config.limits
        self._server = await serve(
            self._handler, self.config.host, self.config.port,
            compression=None, process_request=self._process_request, server_header=None,
            subprotocols=[SUBPROTOCOL], select_subprotocol=_select_subprotocol,
            open_timeout=limits.handshake_timeout_s, ping_interval=limits.ping_interval_s,
            ping_timeout=limits.ping_timeout_s, close_timeout=limits.close_timeout_s,
            max_size=limits.max_message_bytes, max_queue=limits.max_queued_messages,
            create_connection=create_connection,  # the library's own 1009 and 1007 closes say "<error code>: …"
            logger=_LibraryLog(logging.getLogger("streamdiff.server.websockets"), {}),
        )
        logger.info("serving on http://%s:%d (streams: %s, max %d; token %s)", _url_host(self.config.host), self.port,
                    STREAM_PATH, limits.max_streams, "required" if self.config.token else "not required")
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: stop listening, error + 1001 to every client, drain and stop the engine."""
        if self._server is None:
            return
        server, hub = self._server, self.hub
        assert hub is not None
        server.close(close_connections=False)
        await hub.shutdown(timeout)
        server.close(close_connections=True)  # sockets that never became sessions
        await server.wait_closed()
        if self.own_engine:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.engine.stop(drain=True,
                                                                                            timeout=timeout))
        hub.close()
        self._server = None
        logger.info("server stopped")

    async def __aenter__(self) -> StreamServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- websockets glue ------------------------------------------------------------------------------------------

    def _process_request(self, connection: Any, request: Any) -> Any:
        from websockets.protocol import State

        assert self.hub is not None
        remote = connection.remote_address
        address = str(remote[0]) if isinstance(remote, tuple) and remote else "?"
        reply = self.hub.upgrade_reply(request.path, self.static, request.headers, connection, address,
                                       lambda: connection.state is not State.CLOSED)
        return None if reply is None else _response(reply)

    async def _handler(self, connection: Any) -> None:
        assert self.hub is not None
        path = urlsplit(connection.request.path).path
        transport = WebsocketsTransport(connection, self.config.limits.send_buffer_bytes)
        if path.startswith(VIEW_SOCKET_PREFIX):
            await ViewerSession(self.hub, transport, unquote(path[len(VIEW_SOCKET_PREFIX):])).run()
        else:
            session = StreamSession(self.hub, transport)
            self.hub.connection_started(connection)  # the session counts itself from here on
            await session.run()


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


class _LibraryLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The library's own log lines, one level down (its per-connection INFO lines become DEBUG: the sessions log
    one line per stream with more to say), without its traffic dumps: ``< GET /ws/view/<token>``, headers and
    message contents (a hello carries the token) never reach a log."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level <= logging.DEBUG and isinstance(msg, str) and msg[:1] in "<>":
            return
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


def _response(reply: HttpReply) -> Any:
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    headers = Headers([("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
                       ("Connection", "close"), *reply.headers])
    phrases = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 421: "Misdirected Request",
               503: "Service Unavailable"}
    return Response(reply.status, phrases.get(reply.status, "OK"), headers, reply.body)


def _select_subprotocol(connection: Any, offered: Any) -> Any:
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
