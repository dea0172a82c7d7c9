"""A stream that survives losing its connection: :class:`ReconnectingClient` (docs/protocol.md, "Reconnecting").

A fleet of replicas (``streamdiff serve --ray``, docs/scaling.md) loses a connection when the replica behind it
dies or stops. The client reconnects at once, with backoff, and sends:

- the **same settings** — the effective ones of its last ``ready`` or ``ack``, so live changes survive;
- the **same view token**, so viewer URLs (an OBS source) keep working;
- the ``X-Session-Id`` header with the ``stream_id`` of its last stream, so that a fleet routes it back to the
  replica that served it while that replica lives (and to the least-loaded replica with room otherwise; when that
  replica is full, 1013, the next try goes without the header).

The new stream starts empty: its Stream Batch refills, so the first ``n − 1`` frames after a reconnect give no
output. ::

    async with await ReconnectingClient.connect(url, {"prompt": "a watercolor"}) as client:
        await client.send_frame(rgb)           # dropped (None) while reconnecting: real time does not wait
        out = await client.next_output(timeout=5)
        client.stream_ids                       # every stream it had, newest last

What is retried: a close without a fatal ``error`` before it (the connection was lost: 1006, a dead replica),
``shutting_down`` (1001), ``internal_error`` (1011), 1012/1014, ``server_full`` and ``view_token_in_use`` (1013: the
server may still hold the lost connection's stream, and its view token, until its pings time out) — until
``reconnect_timeout`` passes without a stream. Anything else (a bad token, refused settings, a normal close) ends
the client with :class:`~streamdiff.client.ServerRefused`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import Any

from .connection import ServerRefused, StreamClient
from ..protocol.client import Ack, OutputFrame

__all__ = ["RETRY_CODES", "ReconnectingClient"]

logger = logging.getLogger(__name__)

RETRY_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})


class ReconnectingClient:
    """One logical stream over as many connections as it takes. Build with :meth:`connect`."""

    def __init__(self, url: str, settings: dict[str, Any] | None, *, connect_options: dict[str, Any],
                 reconnect_timeout: float = 30.0, max_outputs: int = 64) -> None:
        self.url, self.connect_options = url, connect_options
        self.settings: dict[str, Any] = dict(settings or {})
        self.view_token: str | None = connect_options.pop("view_token", None)
        self.reconnect_timeout = reconnect_timeout
        self.outputs: collections.deque[OutputFrame] = collections.deque(maxlen=max_outputs)
        self.current: StreamClient | None = None
        self.stream_ids: list[str] = []
        self.reconnects = 0
        self.error: ServerRefused | None = None  # why the client gave up
        self.changed = asyncio.Event()
        self.connected = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, settings: dict[str, Any] | None = None, *, reconnect_timeout: float = 30.0,
                      **connect_options: Any) -> ReconnectingClient:
        """Open the first stream (its refusal raises :class:`ServerRefused` at once, 1013 included); the options
        are :meth:`StreamClient.connect`'s (``token``, ``view_token``, ``origin``…)."""
        self = cls(url, settings, connect_options=dict(connect_options), reconnect_timeout=reconnect_timeout)
        await self._open(session=None)
        self._supervisor = asyncio.ensure_future(self._supervise())
        return self

    async def __aenter__(self) -> ReconnectingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def stream_id(self) -> str | None:
        return self.stream_ids[-1] if self.stream_ids else None

    async def send_frame(self, image: Any, **options: Any) -> int | None:
        """Send a frame on the current connection; None (dropped) while there is none."""
        client = self.current
        if client is None or client.closed.is_set():
            return None
        try:
            return await client.send_frame(image, **options)
        except Exception:  # noqa: BLE001 - the connection just went; the supervisor reconnects
            return None

    async def update(self, timeout: float = 10.0, **settings: Any) -> Ack:
        """Change settings live; the ack's effective settings are the ones a reconnect sends."""
        client = self.current
        if client is None:
            raise ServerRefused("not connected (reconnecting)", None)
        ack = await client.update(timeout, **settings)
        self.settings = client.settings.to_json()
        return ack

    async def next_output(self, timeout: float | None = None) -> OutputFrame | None:
        """The oldest unread output of any of its streams; None once the client gave up or was closed."""
        async def wait() -> OutputFrame | None:
            while not self.outputs:
                if self._closing or self.error is not None:
                    return None
                self.changed.clear()
                await self.changed.wait()
            return self.outputs.popleft()

        return await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        self._closing = True
        self.changed.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self.current is not None:
            await self.current.close()

    # -- inside ---------------------------------------------------------------------------------------------------

    async def _open(self, session: str | None) -> None:
        client = await StreamClient.connect(self.url, self.settings, view_token=self.view_token, session=session,
                                            **self.connect_options)
        self.current = client
        self.stream_ids.append(client.ready.stream_id)
        self.settings = client.settings.to_json()
        self.view_token = client.ready.view_token or self.view_token
        client.listener = lambda: self._drain(client)
        self._drain(client)
        self.connected.set()
        self.changed.set()

    def _drain(self, client: StreamClient) -> None:
        while client.outputs:
            self.outputs.append(client.outputs.popleft())
        self.changed.set()

    async def _supervise(self) -> None:
        while not self._closing:
            client = self.current
            assert client is not None
            await client.closed.wait()
            if self._closing:
                return
            self.connected.clear()
            self.changed.set()
            if not _retryable(client):
                self.error = ServerRefused(f"the stream ended ({client.close_code} {client.close_reason})",
                                           client.close_code, client.error)
                self.changed.set()
                return
            logger.info("%s lost (%s %s); reconnecting", client.ready.stream_id, client.close_code,
                        client.close_reason or "no close frame")
            try:
                await self._reconnect(client.ready.stream_id)
            except ServerRefused as refused:
                self.error = refused
                self.changed.set()
                return

    async def _reconnect(self, session: str) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                await self._open(session)
                self.reconnects += 1
                logger.info("reconnected as %s (was %s)", self.stream_id, session)
                return
            except ServerRefused as refused:
                if refused.code not in RETRY_CODES or time.monotonic() + delay > deadline:
                    raise
                if refused.code == 1013:  # its replica is full: any replica with room will do
                    session = None
            except (OSError, asyncio.TimeoutError) as error:  # nothing listens (yet), or the handshake timed out
                if time.monotonic() + delay > deadline:
                    raise ServerRefused(f"could not reconnect within {self.reconnect_timeout:g} s: {error}",
                                        None) from None
            except Exception as error:  # noqa: BLE001 - a handshake refused by a proxy (HTTP 5xx) and the like
                if time.monotonic() + delay > deadline:
                    raise ServerRefused(f"could not reconnect within {self.reconnect_timeout:g} s: {error}",
                                        None) from None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(2.0, delay * 2)


def _retryable(client: StreamClient) -> bool:
    """Lost (no fatal error before the close) or closed with a code worth another try elsewhere."""
    return client.error is None or client.close_code in RETRY_CODES
