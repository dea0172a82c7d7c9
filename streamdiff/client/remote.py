"""A remote engine: :class:`~streamdiff.engine.StreamEngine`'s ``open_stream`` over the WebSocket protocol.

``streamdiff run --engine ws://HOST:PORT`` captures locally, stylises on a server and feeds the local sinks: the
runner opens its stream on a :class:`RemoteEngine` instead of a local engine, and the returned
:class:`RemoteStream` has the same ``submit``/``get``/``update``/``end_input``/``close``, ``config``, ``stats``,
``error`` and ``finished`` as a local stream. Each stream is one :class:`~streamdiff.client.StreamClient`
connection, run on the remote engine's event loop thread; handles are used from any thread.

Pacing follows the protocol ("Pipelining and latest-wins"):

- **latest-wins** (real time): a frame is sent when fewer than ``n·F + 1`` frames await their output and the
  server's frame rate allows; a newer frame replaces one still waiting here (counted in ``stats.dropped_inputs``);
- **lossless** (files): a frame is sent only once the engine has taken every frame before it, so the server never
  replaces one. The engine's intake is known from the outputs (an output for the frame at position p means the
  engine took every frame up to p + (n−1)·F) and, while the Stream Batch fills, from the ``stats`` messages the
  server sends for each tick without an output (``frames_taken``).

``end_input()`` runs the frames inside the server's Stream Batch out by sending the last frame again (n−1)·F
times and discarding those outputs — what the engine's own flush computes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from .connection import StreamClient, decode_output, stream_url
from ..config import PromptConfig, StreamConfig
from ..engine.state import StreamStats
from ..engine.stream import StreamOutput, wait_popleft
from ..errors import ConfigError, FrameError, StreamClosed, StreamDiffError
from ..options import TOKEN_ENV
from ..core.image import fit_frame, frame_to_tensor, tensor_to_frame
from ..protocol.client import OutputFrame
from ..protocol.images import encode
from ..protocol.settings import OutputConfig, StreamSettings
from ..protocol.wire import SETTINGS_VERSIONS

__all__ = ["RemoteEngine", "RemoteStream", "settings_json"]

logger = logging.getLogger(__name__)

STALE_S = 3.0  # a frame without an answer after this long was dropped by the server
MAX_TRACKED = 256  # frames remembered for their outputs at most
_PROMPT_FIELDS = ("prompt", "negative_prompt", "guidance_scale", "delta", "seed", "controlnets")


def settings_json(config: StreamConfig, prompt: PromptConfig, output: OutputConfig) -> dict[str, Any]:
    """The protocol settings of an engine configuration; ConfigError for what the protocol cannot express."""
    defaults = StreamConfig()
    for name in ("mode", "use_denoising_batch", "add_noise"):
        if getattr(config, name) != getattr(defaults, name):
            raise ConfigError(f"{name}={getattr(config, name)!r} is not available through a streamdiff server "
                              f"(only {getattr(defaults, name)!r})")
    return StreamSettings(config, prompt, output).to_json()


class RemoteEngine:
    """An engine on a streamdiff server; ``open_stream`` as :class:`~streamdiff.engine.StreamEngine`'s.

    ``url``: ``ws://HOST:PORT`` (or the full ``/ws`` URL). ``token``: the server's token (default: the
    ``STREAMDIFF_TOKEN`` environment variable). ``image_format``/``quality``: how frames travel both ways; WebP at
    quality 100 is lossless, so the remote stream's frames equal the in-process engine's.
    """

    running = True  # the server runs the engine: the runner never starts or stops it

    def __init__(self, url: str, *, token: str | None = None, image_format: str = "jpeg", quality: int = 90,
                 origin: str | None = None, open_timeout: float = 10.0) -> None:
        self.url = stream_url(url)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.output = OutputConfig(image_format, quality)
        self.origin, self.open_timeout = origin, open_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the token
        return f"<RemoteEngine {self.url}>"

    def open_stream(self, config: StreamConfig, prompt: str = "", negative_prompt: str = "",
                    guidance_scale: float = 1.2, delta: float = 1.0, seed: int = 2, *, lossless: bool = False,
                    input_capacity: int | None = None, output_capacity: int = 2,
                    on_output: Callable[[Any, StreamOutput], None] | None = None,
                    name: str | None = None, controlnets: Sequence[Any] = ()) -> RemoteStream:
        """Connect one stream (the server validates it); raises ServerRefused or ConfigError. ``controlnets``: the
        server's ControlNets by the names its operator gave them (Canny only: the wire carries no control images)."""
        settings = settings_json(
            config, PromptConfig(prompt, negative_prompt, guidance_scale, delta, seed, controlnets=tuple(controlnets)),
            self.output)
        loop = self._ensure_loop()
        connect = StreamClient.connect(self.url, settings, token=self.token, origin=self.origin,
                                       open_timeout=self.open_timeout, client="streamdiff-remote/1")
        client = asyncio.run_coroutine_threadsafe(connect, loop).result(2 * self.open_timeout + 5)
        return RemoteStream(self, client, loop, lossless=lossless, output_capacity=output_capacity,
                            on_output=on_output, name=name)

    def stop(self, drain: bool = False, timeout: float = 10.0) -> None:
        """Stop the event loop thread (close the streams first)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=_run_loop, args=(loop,), name="streamdiff-remote",
                                                daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


@dataclass
class _Sent:
    position: int
    user_id: Any
    sent_at: float
    padding: bool = False
    stale: bool = False  # no answer for STALE_S: no longer counted in flight (a late output is still delivered)


class RemoteStream:
    """One stream on a server, with a local :class:`~streamdiff.engine.Stream`'s interface (module docstring)."""

    def __init__(self, engine: RemoteEngine, client: StreamClient, loop: asyncio.AbstractEventLoop, *,
                 lossless: bool, output_capacity: int, on_output: Callable[[Any, StreamOutput], None] | None,
                 name: str | None) -> None:
        self.engine, self.client, self.loop = engine, client, loop
        self.lossless, self.output_capacity, self.on_output = lossless, output_capacity, on_output
        self.name = name or client.ready.stream_id
        self.stats = StreamStats()
        self.dropped_outputs = 0
        self.version = 0
        self.error: BaseException | None = None
        self.finished = False
        self._closing = False
        self._out_cond = threading.Condition()
        self._outputs: collections.deque[tuple[OutputFrame, Any]] = collections.deque()
        self._ids = itertools.count()
        # event loop state
        self._sent: collections.OrderedDict[int, _Sent] = collections.OrderedDict()
        self._next_pid = 0
        self._position = 0
        self._answered = -1
        self._lost_accounted = 0  # frames the server reported lost that a later output already answered
        self._pending: tuple[bytes, Any] | None = None
        self._last_body: bytes | None = None
        self._wake = asyncio.Event()
        limits = client.ready.limits
        self._rate = 0.95 * float(limits.get("max_input_fps", 30.0))
        self._burst = max(1.0, float(limits.get("input_burst_frames", 4)) - 1)
        self._tokens, self._refilled = self._burst, time.monotonic()
        self._pump_timer: asyncio.TimerHandle | None = None
        loop.call_soon_threadsafe(setattr, client, "listener", self._on_message)

    def __repr__(self) -> str:
        return f"<RemoteStream {self.name} {'finished' if self.finished else 'open'}>"

    # -- the local Stream interface -------------------------------------------------------------------------------

    @property
    def config(self) -> StreamConfig:
        return self.client.settings.stream

    @property
    def prompt(self) -> PromptConfig:
        return self.client.settings.prompt

    @property
    def closed(self) -> bool:
        return self._closing or self.finished

    def submit(self, frame: Any, frame_id: Any = None, *, timeout: float | None = None) -> None:
        """Send one frame (uint8 RGB ``[H, W, 3]`` of any size, or float ``[3, H, W]`` in [0, 1]); see the module
        docstring for the pacing. Lossless streams wait for room (TimeoutError after ``timeout`` s)."""
        self._check_open()
        config = self.config
        if not isinstance(frame, np.ndarray):
            if getattr(frame, "ndim", None) != 3:
                raise FrameError(f"frame {type(frame).__name__} is not a uint8 [H, W, 3] array or a [3, H, W] tensor")
            frame = tensor_to_frame(frame[None])[0]
        out = self.engine.output
        body = encode(fit_frame(frame, config.width, config.height), out.format, out.quality)
        user_id = next(self._ids) if frame_id is None else frame_id
        if not self.lossless:
            self.loop.call_soon_threadsafe(self._offer, body, user_id)
            return
        future = asyncio.run_coroutine_threadsafe(self._send_when_room(body, user_id), self.loop)
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise TimeoutError(f"{self.name}: no room on the server within {timeout} s") from None
            future.result()

    def get(self, timeout: float | None = None) -> StreamOutput | None:
        """The oldest output (TimeoutError after ``timeout`` s); None once the stream has ended (see ``error``)."""
        item = wait_popleft(self._out_cond, self._outputs, lambda: self.finished, timeout, self.name)
        if item is None:
            return None
        frame, user_id = item
        self.loop.call_soon_threadsafe(self._poke)  # room again for a lossless stream
        return self._output(frame, user_id)

    def poll(self) -> StreamOutput | None:
        with self._out_cond:
            item = self._outputs.popleft() if self._outputs else None
        return None if item is None else self._output(*item)

    def update(self, **changes: Any) -> int:
        """Change settings live (StreamConfig / PromptConfig names); ConfigError when the server refuses them."""
        self._check_open()
        config, prompt = self.config, self.prompt
        new_config = config.with_changes(**{k: v for k, v in changes.items() if k not in _PROMPT_FIELDS})
        new_prompt = replace(prompt, **{k: v for k, v in changes.items() if k in _PROMPT_FIELDS})
        old = settings_json(config, prompt, self.engine.output)
        new = settings_json(new_config, new_prompt, self.engine.output)
        diff = {k: v for k, v in new.items() if v != old[k]}
        asyncio.run_coroutine_threadsafe(self.client.update(**diff), self.loop).result(30)
        self.version += 1
        return self.version

    def end_input(self) -> None:
        """No more frames: run the frames inside the server's Stream Batch out, then end the stream."""
        self._check_open()
        self._closing = True
        asyncio.run_coroutine_threadsafe(self._drain(), self.loop)

    def close(self) -> None:
        """Close the connection (frames inside are dropped). Idempotent."""
        self._closing = True
        if not self.finished:
            try:
                asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(15)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
            self._finish(None)

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            why = f": {self.error}" if self.error is not None else ""
            raise StreamClosed(f"{self.name} is closed{why}")

    def _output(self, frame: OutputFrame, user_id: Any) -> StreamOutput:
        images = frame_to_tensor(decode_output(frame))  # [1, 3, H, W] in [0, 1]
        # The server counts this stream's updates as update() does, modulo 2**16 on the wire (an output may come
        # before update() has seen its ack: the nearest version, either way)
        ahead = (frame.settings_version - self.version) % SETTINGS_VERSIONS
        version = self.version + (ahead if ahead < SETTINGS_VERSIONS // 2 else ahead - SETTINGS_VERSIONS)
        return StreamOutput(images, False, (user_id,), version, time.perf_counter())

    def _finish(self, error: BaseException | None) -> None:
        with self._out_cond:
            if error is not None and self.error is None:
                self.error = error
            self.finished = True
            self._out_cond.notify_all()

    # -- event loop side ------------------------------------------------------------------------------------------

    def _offset(self) -> int:
        """Frames the engine holds inside the Stream Batch before the oldest one comes out: (n−1)·F."""
        config = self.config
        return (config.denoising_steps - 1) * config.frame_buffer_size

    def _resolved(self) -> int:
        """Frames (by send position) the engine has taken or the server dropped: known from outputs and stats."""
        from_stats = self.client.stats.get("frames_taken", 0) + self.client.frames_lost
        from_outputs = self._answered + 1 + self._offset() if self._answered >= 0 else 0
        return max(from_stats, from_outputs)

    def _room_lossless(self) -> bool:
        unanswered_out = len(self._outputs) < max(1, self.output_capacity)
        return self._position - self._resolved() < self.config.frame_buffer_size and unanswered_out

    def _room_realtime(self) -> bool:
        """Fewer than n·F + 1 frames may still get an output (docs/protocol.md, "Pipelining and latest-wins")."""
        now = time.monotonic()
        for sent in self._sent.values():
            sent.stale = sent.stale or now - sent.sent_at > STALE_S
        while len(self._sent) > MAX_TRACKED:
            self._sent.popitem(last=False)
        lost = self.client.frames_lost
        awaiting = sum(not sent.stale for sent in self._sent.values()) - max(0, lost - self._lost_accounted)
        config = self.config
        return awaiting < config.denoising_steps * config.frame_buffer_size + 1

    def _rate_delay(self) -> float:
        """Seconds until the server's rate limit allows one more frame (0: now, and the token is taken)."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate

    def _offer(self, body: bytes, user_id: Any) -> None:
        if self._pending is not None:
            self.stats.dropped_inputs += 1  # latest wins: replaced before it could be sent
        self._pending = (body, user_id)
        self._pump()

    def _pump(self) -> None:
        self._pump_timer = None
        while self._pending is not None and not self.client.closed.is_set() and self._room_realtime():
            delay = self._rate_delay()
            if delay > 0:
                self._pump_timer = self.loop.call_later(delay, self._pump)
                return
            body, user_id = self._pending
            self._pending = None
            asyncio.ensure_future(self._send(body, user_id))

    async def _send_when_room(self, body: bytes, user_id: Any, padding: bool = False) -> None:
        while not self._room_lossless():
            if self.client.closed.is_set():
                raise StreamClosed(f"{self.name} is closed: {self.error or 'the server closed the connection'}")
            self._wake.clear()
            await self._wake.wait()
        delay = self._rate_delay()
        while delay > 0:
            await asyncio.sleep(delay)  # pacing to the server's max_input_fps, not synchronisation
            delay = self._rate_delay()
        await self._send(body, user_id, padding)

    async def _send(self, body: bytes, user_id: Any, padding: bool = False) -> None:
        pid, self._next_pid = self._next_pid, (self._next_pid + 1) % 2**32
        self._sent[pid] = _Sent(self._position, user_id, time.monotonic(), padding)
        self._position += 1
        self._last_body = body
        if not padding:
            self.stats.frames_in += 1
        try:
            await self.client.send_frame(body, frame_id=pid)
        except Exception:  # noqa: BLE001 - the connection is gone: reported by _on_message
            self._sent.pop(pid, None)

    def _poke(self) -> None:
        self._wake.set()
        self._pump()

    def _on_message(self) -> None:
        """StreamClient listener (event loop): outputs, stats and the close arrive here."""
        client = self.client
        while client.outputs:
            self._answer(client.outputs.popleft())
        self.stats.filter_skips = int(client.stats.get("frames_skipped", self.stats.filter_skips))
        if client.closed.is_set() and not self.finished:
            error = None
            if not self._closing or client.error is not None:
                why = str(client.error) if client.error is not None else client.close_reason or "no reason"
                error = StreamDiffError(f"the server ended the stream ({client.close_code}): {why}")
            self._finish(error)
        self._poke()

    def _answer(self, frame: OutputFrame) -> None:
        sent = self._sent.pop(frame.frame_id, None)
        if sent is None:
            return
        for pid, older in list(self._sent.items()):
            if older.position < sent.position:  # answered later: the server dropped it (latest-wins)
                del self._sent[pid]
                self.stats.dropped_inputs += not older.padding
                self._lost_accounted += 1
        self._answered = max(self._answered, sent.position)
        if sent.padding:
            return
        self.stats.frames_out += 1
        with self._out_cond:
            self._outputs.append((frame, sent.user_id))
            while not self.lossless and len(self._outputs) > self.output_capacity:
                self._outputs.popleft()
                self.dropped_outputs += 1
            self._out_cond.notify_all()
        if self.on_output is not None:
            self.on_output(self, self._output(frame, sent.user_id))

    async def _drain(self) -> None:
        try:
            if self._pending is not None:
                (body, user_id), self._pending = self._pending, None
                await self._send_when_room(body, user_id)
            if self._last_body is not None:
                for _ in range(self._offset()):
                    await self._send_when_room(self._last_body, None, padding=True)
            while any(not s.padding for s in self._sent.values()) and not self.client.closed.is_set():
                self._wake.clear()
                await self._wake.wait()
            await self.client.close()
        except StreamDiffError as error:
            self._finish(error)
        finally:
            self._finish(None)
