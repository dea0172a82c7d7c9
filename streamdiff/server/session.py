"""One stream client's session: protocol events ↔ engine stream ↔ output pacing, over any :class:`Transport`.

:class:`StreamSession` is the whole per-connection logic of the stream socket, written against the small
:class:`~.transport.Transport` seam: the server's one application (:mod:`.asgi`, under ``streamdiff serve``'s
aiohttp host and under Ray Serve) runs it over an ASGI WebSocket, WHIP over a WebRTC data channel::

    hub = Hub(engine, ServerConfig(...))                 # once per server
    await StreamSession(hub, transport).run()            # once per WebSocket; returns when it is closed

Inside a session, five small loops share the event loop and never block it:

- **receive**: messages → :class:`~streamdiff.protocol.session.ServerConnection` → events; hello/idle timeouts from its deadlines;
- **decode**: a latest-wins slot of one group of frames (F) → a thread of the hub's decode pool checks and
  decodes the oldest (within the image limits and the client's :class:`~streamdiff.protocol.images.DecodeBudget`), which is handed to
  the engine stream once the engine's input queue has room (newer frames that fill the slot meanwhile replace it);
  at most one decode per client is ever in flight, and it stops at its next chunk once the session ends;
- the engine calls back on its own thread; the output hops to the loop (``call_soon_threadsafe``) into a
  latest-wins slot;
- **send**: a thread of the hub's encode pool encodes the newest output once; the same bytes go to the client
  (with a write timeout: a client that stops reading is dropped) and to its viewers (latest-wins each);
- **housekeeping**: ``stats`` messages, and closing with 1011 when the engine ended the stream with an error.

While a send is stuck (the client reads slower than it sends), new input frames are dropped (``congested``)
instead of costing engine work nobody will see. Every drop is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ConfigError, EngineFull, ImageError, StreamClosed
from ..protocol.images import DecodeBudget, ImageFormat, decode, encode
from .metrics import SyncState
from .pacing import LatestSlot, SendTimeout, send_within, within
from ..protocol.policy import client_address
from ..protocol.session import Close, ConnectionState, Frame, Hello, ReferenceUpload, Send, ServerConnection, Update
from .transport import Transport, TransportClosed
from ..protocol.versions import SettingsVersions
from ..protocol.wire import ErrorCode, ServerTimings, shorten

if TYPE_CHECKING:
    from ..engine import Stream, StreamOutput
    from .hub import Hub
    from .viewing import ViewerSession

__all__ = ["FrameTag", "OutputSink", "StreamSession"]

logger = logging.getLogger(__name__)

CONGESTED_S = 0.25  # a send stuck this long means the client does not keep up: drop its new frames
HOUSEKEEPING_S = 0.25  # how often a session looks at its engine stream (ended? stats due?)
STATS_SPACING_S = 0.05  # at most 20 stats messages a second per client
CLEANUP_S = 5.0  # a closed session's loops must have stopped by then


@dataclass(frozen=True)
class FrameTag:
    """What a frame carries through the engine (echoed in ``StreamOutput.frame_ids``); times are perf_counter."""

    frame_id: int
    client_ts: float
    received: float  # the message arrived
    decode_ms: float
    submitted: float  # handed to the engine stream
    pts: int | None = None  # the RTP timestamp of a frame that came from a video track (WebRTC)


class OutputSink(Protocol):
    """Something that takes a stream's raw outputs besides its transport (a WebRTC output track): called on the
    event loop, it must return at once (keep the newest output, latest-wins)."""

    def on_output(self, output: StreamOutput) -> None: ...

    def ended(self) -> None:
        """The stream ended: no more outputs."""
        ...


@dataclass(frozen=True)
class _Job:
    frame: Frame
    received: float
    image: np.ndarray | None = None  # already decoded (a video track's frame): no image decode
    pts: int | None = None


class StreamSession:
    """The session of one stream socket (see the module docstring). Call :meth:`run` once."""

    def __init__(self, hub: Hub, transport: Transport) -> None:
        config = hub.config
        self.hub, self.transport, self.limits = hub, transport, hub.limits
        self.conn = ServerConnection(self.limits, token=config.token, defaults=config.defaults)
        self.stream: Stream | None = None
        self.stream_id: str | None = None
        self.view_token: str | None = None
        self.viewers: set[ViewerSession] = set()
        self.sinks: set[OutputSink] = set()  # raw outputs (WebRTC tracks), besides the transport and viewers
        self.drops = {"superseded": 0, "congested": 0, "output_superseded": 0}
        self.close_code: int | None = None
        self.close_reason = ""
        self._loop = asyncio.get_running_loop()
        self._inbox: LatestSlot[_Job] = LatestSlot()
        self._outbox: LatestSlot[StreamOutput] = LatestSlot()
        self._stats_due = asyncio.Event()
        self._room = asyncio.Event()  # set when the engine may have taken frames (re-check _untaken)
        self._lost_reported = 0
        self._submitted = 0
        self._sending_since: float | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._sync = SyncState()
        self._finished = False  # the session is over: every loop stops
        self._opened = time.monotonic()
        self._client: str | None = None
        self.address = client_address(transport.remote)
        self._closing: asyncio.Future[None] | None = None  # the closing handshake, once the server started it
        self._decode_budget = DecodeBudget(self.limits.max_decode_share, self.limits.decode_window_s)
        self._versions = SettingsVersions(config.defaults)  # the hello's settings replace these at ready

    def __repr__(self) -> str:
        return f"<StreamSession {self.stream_id or 'pending'} {self.conn.state.value}>"

    @property
    def awaiting_hello(self) -> bool:
        """The socket is open and its hello has not come yet (counted against ``max_awaiting_hello``)."""
        return self.conn.state is ConnectionState.AWAIT_HELLO

    # -- life cycle ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for anything the client does."""
        hub = self.hub
        hub.connections.add(self)
        hub.metrics.connections.labels("stream").inc()
        try:
            if not hub.config.origins.allows(self.transport.origin):
                await self._execute(self.conn.close(ErrorCode.FORBIDDEN_ORIGIN,
                                                    "pages from this origin may not connect to this server"))
            elif hub.shutting_down:
                await self._execute(self.conn.close(ErrorCode.SHUTTING_DOWN, "the server is shutting down"))
            else:
                await self._receive_loop()
        finally:
            await self._cleanup()

    async def end(self, code: ErrorCode, message: str) -> None:
        """End the session for a server-side reason (shutting_down, internal_error…): error message, then close."""
        if self.conn.state is not ConnectionState.CLOSED:
            await self._execute(self.conn.close(code, message))
        if self._closing is not None:
            await asyncio.wait([self._closing])

    async def _receive_loop(self) -> None:
        conn = self.conn
        while conn.state is not ConnectionState.CLOSED:
            deadline = conn.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = await within(self.transport.receive(), timeout)
            except asyncio.TimeoutError:
                await self._execute(conn.check_timeouts())
                continue
            except TransportClosed as closed:
                self._closed_by_peer(closed)
                return
            received = time.perf_counter()
            events = conn.receive_text(message) if isinstance(message, str) else conn.receive_bytes(message)
            await self._execute(events, received)
            # One message per turn, so the socket's backlog never holds the loop; past max_messages_per_s, wait
            # before reading on (the WebSocket library stops reading the socket once its queue is full: TCP pushes back).
            await asyncio.sleep(conn.read_delay())
        await self._drain()

    async def _drain(self) -> None:
        """Read and drop what the client still sends until the closing handshake ends: a flooding client's backlog
        (reading pauses once its queue is full) must not hold its close frame back for ``close_timeout_s``."""
        while self._closing is not None and not self._closing.done():
            try:
                await within(self.transport.receive(), self.limits.close_timeout_s)
            except (TransportClosed, asyncio.TimeoutError):
                return
            await asyncio.sleep(0)  # as in the receive loop: one message per turn

    async def _cleanup(self) -> None:
        self._finished = True
        if self._closing is not None:  # bounded by close_timeout_s in the transport
            await asyncio.wait([self._closing])
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=CLEANUP_S)
            if pending:  # never seen: each loop also checks _finished; logged so that it would be
                logger.warning("%s: %d task(s) still running %.0f s after the close", self.stream_id, len(pending),
                               CLEANUP_S)
        if self.conn.state is not ConnectionState.CLOSED:
            self.conn.connection_lost()
        self._release()
        code = ErrorCode.SHUTTING_DOWN if self.hub.shutting_down else ErrorCode.STREAM_ENDED
        for viewer in list(self.viewers):
            await viewer.end(code, "the stream being watched ended")
        for sink in list(self.sinks):
            sink.ended()
        self._sync_metrics()
        self.hub.metrics.closes.labels(str(int(self.close_code or 1006))).inc()
        if self.stream_id is None:
            logger.info("connection from %s refused: %d %s", self.transport.remote, self.close_code or 1006,
                        self.close_reason)
        else:
            s, stats = self.conn.stats, self.stream.stats if self.stream is not None else None
            logger.info("%s closed: %d %s; %d frames received, %d in, %d out, %d dropped, %d errors, %.1f s",
                        self.stream_id, self.close_code or 1006, self.close_reason, s.frames_received,
                        stats.frames_in if stats else 0, s.frames_out, self._frames_dropped(), s.errors,
                        time.monotonic() - self._opened)
        self.hub.connections.discard(self)  # last: the session is finished

    def _release(self) -> None:
        """Leave the engine and free the stream slot (idempotent)."""
        if self.stream is not None:
            self.stream.close()
        self.hub.unregister(self)

    def _closed_by_peer(self, closed: TransportClosed) -> None:
        self.conn.connection_lost()
        if self.close_code is None:
            self.close_code = closed.code or 1006
            who = "the server's WebSocket layer" if closed.by_server else "the client"
            self.close_reason = f"(by {who}{': ' + repr(shorten(closed.reason, 60)) if closed.reason else ''})"

    # -- events -------------------------------------------------------------------------------------------------

    async def _execute(self, events: list[Any], received: float | None = None) -> None:
        for event in events:
            if isinstance(event, Send):
                await self._send(event.data)
            elif isinstance(event, Frame):
                self._on_frame(event, received if received is not None else time.perf_counter())
            elif isinstance(event, Update):
                await self._update(event)
            elif isinstance(event, ReferenceUpload):
                await self._reference(event)
            elif isinstance(event, Hello):
                await self._admit(event)
            elif isinstance(event, Close):
                if self.close_code is None:
                    self.close_code, self.close_reason = event.code, f"({event.reason})"
                if event.error is ErrorCode.ERROR_BUDGET_EXHAUSTED:  # its address waits before its next stream
                    self.hub.penalize(self.address)
                self._release()  # the slot is free now, whatever the closing handshake takes
                self._closing = asyncio.ensure_future(self.transport.close(event.code, event.reason))
        self._sync_metrics()
        self._report_losses()

    def _report_losses(self) -> None:
        """Frames that will get no output (dropped, rate-limited, rejected) are reported soon in a ``stats``
        message, so that a client counting its frames in flight never waits for an output that will not come."""
        s = self.conn.stats
        lost = self._frames_dropped() + s.frames_rate_limited + s.frames_rejected
        if lost != self._lost_reported:
            self._lost_reported = lost
            self._stats_due.set()

    async def _send(self, data: str | bytes) -> None:
        try:
            await send_within(self.transport, data, self.limits.write_timeout_s)
        except SendTimeout:
            if self.close_code is None:
                self.close_code = 1006
                self.close_reason = (f"(the client stopped reading: nothing left within "
                                     f"{self.limits.write_timeout_s:g} s)")
            self.conn.connection_lost()
            self.transport.abort()
        except TransportClosed:
            pass  # the receive loop sees it too

    async def _admit(self, hello: Hello) -> None:
        hub, settings = self.hub, hello.settings
        self._client = hello.client
        if hub.shutting_down:
            await self._execute(self.conn.close(ErrorCode.SHUTTING_DOWN, "the server is shutting down"))
            return
        try:
            hub.engine.check_settings(settings.stream, settings.prompt)
        except ConfigError as error:
            await self._execute(self.conn.refuse(error))
            return
        if hub.full:
            await self._execute(self.conn.close(ErrorCode.SERVER_FULL, f"the server already serves its "
                                                f"{self.limits.max_streams} streams; try again later"))
            return
        if hello.view_token is not None and hub.find_view(hello.view_token) is not None:
            await self._execute(self.conn.close(ErrorCode.VIEW_TOKEN_IN_USE, (
                "another stream uses this view_token (maybe this client's previous connection, not closed yet); "
                "retry later, or ask for another")))
            return
        self.stream_id, self.view_token = hub.register(self, hello.view_token)
        p = settings.prompt
        try:
            self.stream = hub.engine.open_stream(
                settings.stream, p.prompt, p.negative_prompt, p.guidance_scale, p.delta, p.seed,
                ip_adapter_scale=p.ip_adapter_scale, lossless=False, output_capacity=1,
                on_output=self._on_output_thread, name=self.stream_id,
                **({"controlnets": p.controlnets} if p.controlnets else {}))
        except (EngineFull, ConfigError) as error:
            hub.unregister(self)
            stream_id, self.stream_id = self.stream_id, None
            if isinstance(error, EngineFull):
                events = self.conn.close(ErrorCode.SERVER_FULL, "the engine is full; try again later")
            else:
                events = self.conn.refuse(error)
            logger.info("%s refused by the engine: %s", stream_id, error)
            await self._execute(events)
            return
        s = settings.stream
        logger.info("%s connected from %s: %dx%d, steps %s, F=%d, cfg %s, client %r", self.stream_id,
                    self.transport.remote, s.width, s.height, list(s.t_index_list), s.frame_buffer_size,
                    s.cfg_type.value, shorten(hello.client or "?", 40))
        self._versions = SettingsVersions(settings)
        for work in (self._decode_loop(), self._send_loop(), self._housekeeping()):
            self._tasks.append(asyncio.ensure_future(self._guard(work)))
        await self._execute(self.conn.accept(self.stream_id, self.view_token))

    async def _guard(self, work: Any) -> None:
        """Run one of the session's loops; a bug in it ends this session (1011), never the server."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - reported and contained to this client
            logger.exception("%s: internal error", self.stream_id)
            await self.end(ErrorCode.INTERNAL_ERROR, "internal server error in this stream; other streams are "
                                                     "unaffected")

    async def _update(self, update: Update) -> None:
        if self.stream is not None:
            try:  # an update the engine runs nothing of (output, {}) keeps the engine's version
                engine_version = self.stream.update(**update.changes) if update.changes else self.stream.version
            except ConfigError as error:
                await self._execute(self.conn.update_refused(update, error))
                return
            except StreamClosed:
                return  # the engine ended the stream; housekeeping closes the connection
            self._versions.acked(engine_version, update.settings_version, update.settings)
        await self._send(update.ack)

    async def _reference(self, upload: ReferenceUpload) -> None:
        """A reference image (image prompt): decoded off the event loop under the frames' limits and this client's
        decode budget, then set on the stream like an update (acked, or refused by the engine)."""
        if self.stream is None:
            return
        try:
            self._decode_budget.check()
        except ImageError as error:
            await self._execute(self.conn.reference_rejected(upload, error))
            return
        image, _, cpu_ms = await self._loop.run_in_executor(
            self.hub.decode_pool, _decode, upload.body, self.limits, self._is_finished)
        self._decode_budget.spend(cpu_ms)
        if isinstance(image, ImageError):
            await self._execute(self.conn.reference_rejected(upload, image))
            return
        await self._execute(self.conn.reference_decoded(upload, image))

    # -- frames in ----------------------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame, received: float, image: np.ndarray | None = None,
                  pts: int | None = None) -> None:
        if self.stream is None or self.stream.closed:
            return
        if self._sending_since is not None and received - self._sending_since > CONGESTED_S:
            self.drops["congested"] += 1
            return
        # One group waits at most: F frames, so that a client sending a frame whenever fewer than F of its frames
        # are not taken yet (docs/protocol.md, "Lossless clients") never has one replaced
        if self._inbox.put(_Job(frame, received, image, pts), self.stream.config.frame_buffer_size) is not None:
            self.drops["superseded"] += 1
        self._room.set()  # a decoded frame waiting for room gives way once newer ones fill the slot

    def submit_decoded(self, image: np.ndarray, pts: int | None = None) -> None:
        """A frame that arrived decoded (uint8 RGB ``[H, W, 3]``, already at the stream's size) from another
        transport, e.g. a WebRTC video track, with its RTP timestamp ``pts`` (outputs carry it in their
        :class:`FrameTag`): the same path as a WebSocket frame after its decode — the input rate limit, the
        latest-wins slot, the engine's room. Call on the event loop; returns at once."""
        if self.conn.state is not ConnectionState.STREAMING:
            return
        if not self.conn.receive_decoded():
            self._report_losses()
            return
        frame_id = self.conn.stats.frames_accepted
        received = time.perf_counter()
        self._on_frame(Frame(frame_id, 0.0, b"", time.monotonic()), received, image, pts)

    async def _decode_loop(self) -> None:
        """Decode the oldest waiting frame, wait until the engine's input queue has room for it, hand it over.

        Handing a frame over only when the engine's input queue has room means the engine never replaces a frame
        it did not get a chance to take (a wake-up race, not latest-wins): frames are replaced here instead, and
        only when the engine has no room and newer ones fill the slot meanwhile. So every frame the engine takes is
        answered by an output in order, a client keeping ``n·F + 1`` frames in flight never waits for nothing, and
        one keeping fewer than F frames not taken loses none.
        """
        stream = self.stream
        assert stream is not None
        while not self._finished:
            job = await self._inbox.get()
            if job.image is not None:  # decoded by its transport
                image, decode_ms = job.image, 0.0
            else:
                try:
                    self._decode_budget.check()
                except ImageError as error:  # over its share: refused undecoded
                    await self._execute(self.conn.frame_rejected(job.frame, error))
                    continue
                image, decode_ms, cpu_ms = await self._loop.run_in_executor(
                    self.hub.decode_pool, _decode, job.frame.body, self.limits, self._is_finished)
                self._decode_budget.spend(cpu_ms)
                if isinstance(image, ImageError):
                    await self._execute(self.conn.frame_rejected(job.frame, image))
                    continue
            while self._untaken() >= stream.config.frame_buffer_size and not self._inbox.full:
                self._room.clear()
                await self._room.wait()
            if self._untaken() >= stream.config.frame_buffer_size:  # no room, newer frames arrived: latest wins
                self.drops["superseded"] += 1
                self._report_losses()
                continue
            tag = FrameTag(job.frame.frame_id, job.frame.client_ts, job.received, decode_ms, time.perf_counter(),
                           job.pts)
            self._submitted += 1
            try:
                await self._loop.run_in_executor(self.hub.decode_pool, stream.submit, image, tag)  # resizes there
            except StreamClosed:
                return

    def _is_finished(self) -> bool:
        """Read by the decoding thread between chunks: a client that left stops costing CPU at once."""
        return self._finished

    def _untaken(self) -> int:
        """Frames handed to the engine that it has not taken yet (nor replaced)."""
        assert self.stream is not None
        stats = self.stream.stats
        return self._submitted - stats.frames_in - stats.dropped_inputs

    # -- frames out ---------------------------------------------------------------------------------------------

    def _on_output_thread(self, stream: Stream, output: StreamOutput) -> None:
        """Engine thread: hop to the event loop at once (no work here)."""
        try:
            self._loop.call_soon_threadsafe(self._on_output, output)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _on_output(self, output: StreamOutput) -> None:
        self._room.set()  # the tick that made this took the stream's queued frames
        if self.conn.state is ConnectionState.CLOSED:
            return
        if output.images is None:  # the Stream Batch is filling: tell the client its frames were taken
            self._stats_due.set()
            return
        for sink in list(self.sinks):
            sink.on_output(output)
        if not self.viewers and not getattr(self.transport, "wants_frames", True):
            return  # nobody takes encoded frames (a WebRTC peer gets its frames on a video track)
        replaced = self._outbox.put(output)
        if replaced is not None:
            self.drops["output_superseded"] += len(replaced.frame_ids)

    def output_sent(self, output: StreamOutput, encode_s: float) -> None:
        """A sink sent ``output``'s newest frame to this stream's own client by another way (the publisher's
        WebRTC video track; ``encode_s``: its conversion to a video frame): counted in ``frames_out`` and the
        latency histograms as a WebSocket output frame is."""
        tag = output.frame_ids[-1] if output.frame_ids else None
        if not isinstance(tag, FrameTag) or self.conn.state is ConnectionState.CLOSED:
            return
        self.conn.output_sent()
        self.hub.metrics.observe_latency(
            decode=tag.decode_ms / 1000, queue=max(0.0, output.started - tag.submitted),
            engine=output.finished - output.started, encode=encode_s, server=time.perf_counter() - tag.received)

    async def _send_loop(self) -> None:
        while not self._finished:
            output = await self._outbox.get()
            settings_version, settings = self._versions.of(output.version)  # encoded as that ack's settings say
            fmt, quality = settings.output.format, settings.output.quality
            start = time.perf_counter()
            bodies = await self._loop.run_in_executor(self.hub.encode_pool, _encode_output, output, fmt, quality)
            encode_ms = (time.perf_counter() - start) * 1000 / max(1, len(bodies))
            for tag, body in zip(output.frame_ids, bodies):
                if not isinstance(tag, FrameTag) or self.conn.state is ConnectionState.CLOSED:
                    continue
                now = time.perf_counter()
                timings = ServerTimings(
                    decode_ms=tag.decode_ms, queue_ms=max(0.0, output.started - tag.submitted) * 1000,
                    engine_ms=(output.finished - output.started) * 1000, encode_ms=encode_ms,
                    server_ms=(now - tag.received) * 1000)
                wanted = getattr(self.transport, "wants_frames", True)  # else only viewers get it
                data = self.conn.output_frame(tag.frame_id, tag.client_ts, body, fmt, timings, settings_version,
                                              sent=wanted)
                if wanted:
                    self.hub.metrics.observe_latency(
                        decode=timings.decode_ms / 1000, queue=timings.queue_ms / 1000,
                        engine=timings.engine_ms / 1000, encode=encode_ms / 1000, server=timings.server_ms / 1000)
                for viewer in list(self.viewers):
                    viewer.offer(data)
                self._sending_since = now
                try:
                    await self._send(data)
                finally:
                    self._sending_since = None

    # -- housekeeping -------------------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        interval = self.hub.config.stats_interval_s
        next_stats = time.monotonic() + interval if interval else None
        while self.conn.state is not ConnectionState.CLOSED and not self._finished:
            try:
                await within(self._stats_due.wait(), HOUSEKEEPING_S)
            except asyncio.TimeoutError:
                pass
            if self._finished or self.conn.state is ConnectionState.CLOSED:
                return  # the session closed it (the close is logged once, by _cleanup)
            stream = self.stream
            if stream is not None and stream.finished:
                if not self.hub.shutting_down:
                    why = type(stream.error).__name__ if stream.error is not None else "the engine stopped"
                    logger.error("%s: the engine ended the stream (%s)", self.stream_id, why)
                    await self.end(ErrorCode.INTERNAL_ERROR, f"the engine failed on this stream ({why}); "
                                                             "other streams are unaffected")
                return
            self._room.set()  # a safety net: re-check the engine's queue even if no output came
            now = time.monotonic()
            if self._stats_due.is_set() or (next_stats is not None and now >= next_stats):
                self._stats_due.clear()
                if next_stats is not None:
                    next_stats = now + interval
                await self._send(self.stats_message())
                await asyncio.sleep(STATS_SPACING_S)  # coalesce: a flood of drops is one stats message
            self._sync_metrics()

    def queue_depths(self) -> tuple[int, int]:
        """Frames waiting here for the decoder (at most F) and handed to the engine but not taken yet (at most F)."""
        return len(self._inbox), self._untaken() if self.stream is not None else 0

    def stats_message(self) -> str:
        """The ``stats`` message: the connection's counters, plus the engine's (``frames_taken``, skips, drops)."""
        stats = self.stream.stats if self.stream is not None else None
        return self.conn.stats_message(
            frames_dropped=self._frames_dropped(), frames_taken=stats.frames_in if stats else 0,
            frames_skipped=stats.filter_skips if stats else 0, outputs_dropped=self.drops["output_superseded"],
            frames_congested=self.drops["congested"])

    def _frames_dropped(self) -> int:
        engine = self.stream.stats.dropped_inputs if self.stream is not None else 0
        return self.drops["superseded"] + self.drops["congested"] + engine

    def _sync_metrics(self) -> None:
        self.hub.metrics.sync(self._sync, self.conn, self.stream, self.drops)


def _decode(body: bytes, limits: Any, cancelled: Any) -> tuple[np.ndarray | ImageError, float, float]:
    """Worker thread: the image (checked against the limits before any decoder sees it) or why it was refused,
    the wall time and the CPU time it took (ms; the CPU time counts against the client's budget either way)."""
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        image: np.ndarray | ImageError = decode(body, limits, cancelled)
    except ImageError as error:
        image = error
    return image, (time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000


def _encode_output(output: StreamOutput, fmt: ImageFormat, quality: int) -> list[bytes]:
    """Worker thread: the output's frames (uint8 ``[F, H, W, 3]``) encoded one by one."""
    frames = output.frames()
    assert frames is not None
    return [encode(np.ascontiguousarray(frame), fmt, quality) for frame in frames]
