"""What the sessions of one server share: configuration, the engine, the worker pool, metrics, and who is streaming.

:class:`ServerConfig` is the server's configuration (limits, token, origins, the streams' default settings).
:class:`Hub` holds the running parts every session needs — the :class:`~streamdiff.engine.StreamEngine`, a thread
pool decoding clients' images and another encoding outputs, the :class:`~.metrics.ServerMetrics` — and the registry of
live streams: admission (``max_streams``), stream ids, view tokens and their viewers, shutdown. No I/O here and no
HTTP library: the server's owner (:class:`~.app.StreamServer`, a Ray Serve replica) builds one Hub and runs a :class:`~.session.StreamSession` per WebSocket on it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ConfigError, ProtocolError, StreamDiffError
from ..protocol.limits import ServerLimits
from ..protocol.policy import AddressRates, HostPolicy, OriginPolicy, new_token
from .routes import HttpReply, route
from ..protocol.settings import StreamSettings, check_caps
from ..protocol.wire import STREAM_PATH

if TYPE_CHECKING:
    from .metrics import ServerMetrics
    from .session import StreamSession

__all__ = ["Hub", "ServerConfig"]

logger = logging.getLogger(__name__)

MAX_DECODE_THREADS = 32  # the decode pool's default size is max_streams, at most this


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of ``streamdiff serve``; every field has a safe default.

    ``host``/``port``: where to listen (``127.0.0.1``: this machine only; port 0 picks a free one). ``token``: the
    secret a hello must carry (None: no token). ``origins``: which browser pages may connect (loopback pages by
    default). ``defaults``: the settings a stream starts from (they must pass ``limits``). ``stats_interval_s``:
    seconds between ``stats`` messages to each client (0: only those the protocol needs). ``workers``: threads of
    each of the two image pools (0: the decode pool has one per stream, ``max_streams``, at most 32 — a client has
    at most one decode in flight, so none waits behind another's; the encode pool one per CPU core, at most 4).
    ``hosts``: which ``Host`` headers the HTTP routes and the WebSocket upgrade answer (every host by default; others
    get 421). ``metrics_token_required``: ``/metrics`` wants ``Authorization: Bearer <token>`` (401 without it;
    needs a ``token``).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    limits: ServerLimits = field(default_factory=ServerLimits)
    token: str | None = field(default=None, repr=False)
    origins: OriginPolicy = field(default_factory=OriginPolicy)
    defaults: StreamSettings = field(default_factory=StreamSettings)
    stats_interval_s: float = 2.0
    workers: int = 0
    hosts: HostPolicy = field(default_factory=HostPolicy)
    metrics_token_required: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port!r} is outside [0, 65535]")
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ConfigError("token must be a non-empty string (or None for no token)")
        if not isinstance(self.stats_interval_s, (int, float)) or not math.isfinite(self.stats_interval_s) \
                or self.stats_interval_s < 0:
            raise ConfigError(f"stats_interval_s={self.stats_interval_s!r} must be a finite number >= 0")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"workers={self.workers!r} must be an integer >= 0 (0: one per core, at most 4)")
        if not isinstance(self.metrics_token_required, bool):
            raise ConfigError(f"metrics_token_required={self.metrics_token_required!r} must be True or False")
        if self.metrics_token_required and self.token is None:
            raise ConfigError("metrics_token_required=True needs a token (the one clients send in their hello)")
        try:
            check_caps(self.defaults, self.limits, path="defaults")
        except ProtocolError as error:  # names the default that breaks a cap
            raise ConfigError(f"the default stream settings break the server's limits: {error}") from None


class Hub:
    """The shared state of one server (see the module docstring). Build it inside the event loop."""

    def __init__(self, engine: Any, config: ServerConfig | None = None, metrics: ServerMetrics | None = None,
                 id_prefix: str = "st-") -> None:
        """``id_prefix`` begins every stream id this hub issues (a fleet's replica puts its name in it)."""
        from .metrics import ServerMetrics

        self.engine = engine
        self.config = config or ServerConfig()
        self.limits = self.config.limits
        self.metrics = metrics or ServerMetrics(engine)
        decoders = self.config.workers or min(MAX_DECODE_THREADS, self.limits.max_streams)
        encoders = self.config.workers or min(4, os.cpu_count() or 1)
        # Clients' decodes (bounded by the image limits) never delay the encoding of outputs, nor each other.
        self.decode_pool = ThreadPoolExecutor(max_workers=decoders, thread_name_prefix="streamdiff-decode")
        self.encode_pool = ThreadPoolExecutor(max_workers=encoders, thread_name_prefix="streamdiff-encode")
        self.connections: set[StreamSession] = set()  # every stream socket, admitted or not
        self.sessions: dict[str, StreamSession] = {}  # admitted streams by stream id
        self.view_tokens: dict[str, StreamSession] = {}
        self.viewers: set[Any] = set()  # view-only sockets
        self.rtc_viewers: set[Any] = set()  # WHEP viewers (peers with a .session), counted with the sockets
        self.shutting_down = False
        self.id_prefix = id_prefix
        self._opening: dict[object, tuple[str, Callable[[], bool]]] = {}  # upgraded, session not started yet
        self._connects = AddressRates(self.limits.max_connects_per_address_per_s,
                                      self.limits.connect_burst_per_address)

    # -- admission ----------------------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return len(self.sessions) >= self.limits.max_streams

    def viewer_count(self, session: Any) -> int:
        """The viewers watching ``session``: its view sockets and its WHEP peers (``max_viewers_per_stream``)."""
        return len(session.viewers) + sum(1 for peer in list(self.rtc_viewers) if peer.session is session)

    def viewers_changed(self) -> None:
        """Update ``streamdiff_viewers_active`` (view sockets and WHEP viewers) after one came or went."""
        self.metrics.viewers.set(len(self.viewers) + len(self.rtc_viewers))

    @property
    def ready(self) -> bool:
        """The engine runs and new streams are admitted (``/readyz``)."""
        return not self.shutting_down and bool(getattr(self.engine, "running", False))

    def admit_connection(self, key: object, address: str, alive: Callable[[], bool]) -> str | None:
        """Before a stream socket's upgrade: hold a place for it among the sockets awaiting hello until its session
        starts (:meth:`connection_started`; ``alive()`` False gives the place back too). Returns None, or why it is
        refused (``max_awaiting_hello``, ``max_awaiting_hello_per_address``)."""
        self._opening = {k: v for k, v in self._opening.items() if v[1]()}
        waiting = [s.address for s in self.connections if s.awaiting_hello]
        waiting += [a for a, _ in self._opening.values()]
        limits = self.limits
        if len(waiting) >= limits.max_awaiting_hello:
            return f"{len(waiting)} stream sockets are waiting for their hello, the most this server allows"
        if waiting.count(address) >= limits.max_awaiting_hello_per_address:
            return (f"{limits.max_awaiting_hello_per_address} stream sockets from this address are waiting for their "
                    "hello, the most this server allows")
        if not self._connects.allow(address):
            return (f"more than {limits.max_connects_per_address_per_s:g} new stream sockets a second from this "
                    f"address (bursts of {limits.connect_burst_per_address})")
        self._opening[key] = (address, alive)
        return None

    def upgrade_reply(self, target: str, static: Any, headers: Any, key: object, address: str,
                      alive: Callable[[], bool]) -> HttpReply | None:
        """What to answer a request for ``target`` instead of upgrading it to a WebSocket (None: upgrade). The one
        decision of every front end: :func:`~.routes.route` (pages, probes, Host, query strings), then, for a
        stream socket, :meth:`admit_connection` (503 with ``Retry-After`` when over a limit)."""
        reply = route(target, static, self, headers)
        if reply is not None or urlsplit(target).path != STREAM_PATH:
            return reply
        refused = self.admit_connection(key, address, alive)
        if refused is None:
            return None
        logger.info("stream socket from %s refused (503): %s", address, refused)
        return HttpReply(503, f"{refused}; try again later\n".encode(), headers=(("Retry-After", "1"),))

    def penalize(self, address: str) -> None:
        """A connection from ``address`` was closed for misbehaving (its error budget): the address's next stream
        socket waits ``abuse_cooldown_s`` (a client that floods, is closed and reconnects at once costs a refused HTTP
        request per try, not a stream)."""
        self._connects.penalize(address, self.limits.abuse_cooldown_s)

    def connection_started(self, key: object) -> None:
        """The socket held by :meth:`admit_connection` has its session now (which counts itself until its hello)."""
        self._opening.pop(key, None)

    def register(self, session: StreamSession, requested_view_token: str | None) -> tuple[str, str]:
        """Admit ``session``: returns its new stream id and view token (the requested one, a new one when None).
        A requested token must not be in use (:meth:`find_view`): the session refuses such a hello first."""
        stream_id = f"{self.id_prefix}{secrets.token_hex(4)}"
        while stream_id in self.sessions:
            stream_id = f"{self.id_prefix}{secrets.token_hex(4)}"
        view_token = requested_view_token or new_token()
        if self.find_view(view_token) is not None:
            raise StreamDiffError("register() was given a view token in use; refuse the hello first")
        self.sessions[stream_id] = session
        self.view_tokens[view_token] = session
        self.metrics.streams.set(len(self.sessions))
        return stream_id, view_token

    def unregister(self, session: StreamSession) -> None:
        if session.stream_id is not None and self.sessions.get(session.stream_id) is session:
            del self.sessions[session.stream_id]
        for token in [t for t, s in self.view_tokens.items() if s is session]:
            del self.view_tokens[token]
        self.metrics.streams.set(len(self.sessions))

    def find_view(self, token: str) -> StreamSession | None:
        """The session whose view token is ``token`` (compared in constant time with every token)."""
        found = None
        given = token.encode("utf-8", "surrogatepass")
        for known, session in list(self.view_tokens.items()):
            if hmac.compare_digest(known.encode("utf-8"), given):
                found = session
        return found

    # -- shutdown -------------------------------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Tell every client the server is going away (1001) and wait for their sessions to end."""
        from ..protocol.wire import ErrorCode

        self.shutting_down = True
        sessions = list(self.connections)
        viewers = list(self.viewers)
        ends = [s.end(ErrorCode.SHUTTING_DOWN, "the server is shutting down") for s in sessions]
        ends += [v.end(ErrorCode.SHUTTING_DOWN, "the server is shutting down") for v in viewers]
        if ends:
            await asyncio.wait([asyncio.ensure_future(e) for e in ends], timeout=timeout)
        logger.info("told %d stream(s) and %d viewer(s) that the server is shutting down", len(sessions),
                    len(viewers))

    def close(self) -> None:
        """Release the worker pools (after every session ended)."""
        for pool in (self.decode_pool, self.encode_pool):
            pool.shutdown(wait=True, cancel_futures=True)
