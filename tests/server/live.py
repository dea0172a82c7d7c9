"""Helpers of the live-server tests: run a coroutine, make frames, drive a client the way a good client does."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from streamdiff.client import StreamClient
from streamdiff.io.sources import pattern_frame
from streamdiff.protocol.client import OutputFrame
from streamdiff.protocol.images import encode

SIZE = 64


def run(coro: Any, timeout: float = 120.0) -> Any:
    """Run ``coro`` on a fresh event loop (the test's clients; the server has its own loop and thread)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def settings(size: int = SIZE, **changes: Any) -> dict[str, Any]:
    return {"width": size, "height": size, **changes}


def frames(count: int, size: int = SIZE, offset: int = 0) -> list[np.ndarray]:
    """``count`` frames of the moving test pattern (``offset`` shifts it: different clients, different frames)."""
    return [pattern_frame(offset + i, size, size) for i in range(count)]


def bodies(images: list[np.ndarray], fmt: str = "jpeg", quality: int = 90) -> list[bytes]:
    return [encode(image, fmt, quality) for image in images]


@dataclass
class Drive:
    """What one client saw: outputs (with arrival times, perf_counter), frames sent."""

    outputs: list[tuple[float, OutputFrame]] = field(default_factory=list)
    sent: int = 0
    skipped: int = 0  # paced frames not sent because the window was full

    def rate(self, start: float, end: float) -> float:
        """Output frames per second between ``start`` and ``end`` (perf_counter)."""
        return sum(start <= t < end for t, _ in self.outputs) / (end - start)


async def drive(client: StreamClient, body: Callable[[int], bytes], *, until: float, window: int = 3,
                fps: float | None = None, stop_after: int | None = None, stop_when: Callable[[], bool] | None = None,
                result: Drive | None = None) -> Drive:
    """Send frames like the protocol's good client until ``until`` (perf_counter), ``stop_after`` outputs or
    ``stop_when()``: at most ``window`` frames await their output (an output answers every earlier frame; a frame
    is forgotten after 3 s; frames the server reports lost do not count), at most ``max_input_fps``, and, with
    ``fps``, at that rate (a paced source: a frame captured while the window is full is skipped)."""
    result = result or Drive()
    waiting: dict[int, float] = {}
    index = 0
    next_capture = time.perf_counter()
    accounted = lost(client)

    def collect() -> None:
        nonlocal accounted
        while client.outputs:
            out = client.outputs.popleft()
            result.outputs.append((time.perf_counter(), out))
            answered = [f for f in waiting if f <= out.frame_id]
            for frame_id in answered:
                del waiting[frame_id]
            accounted += max(0, len(answered) - 1)  # answered by a later output: those were lost
        now = time.perf_counter()
        for frame_id in [f for f, t in waiting.items() if now - t > 3.0]:
            del waiting[frame_id]

    def in_flight() -> int:  # frames that may still get an output (the server reports what it lost)
        return len(waiting) - max(0, lost(client) - accounted)

    def done() -> bool:
        return time.perf_counter() >= until or client.closed.is_set() or (
            stop_after is not None and len(result.outputs) >= stop_after) or (stop_when is not None and stop_when())

    min_interval = 1.0 / float(client.ready.limits.get("max_input_fps", 30.0))
    last_sent = -1.0

    while not done():
        collect()
        if done():
            break
        wait = last_sent + min_interval - time.perf_counter()
        if wait > 0:  # at most max_input_fps, as the protocol asks
            await asyncio.sleep(wait)
            continue
        if fps is not None:
            delay = next_capture - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the source's pace, not synchronisation
                continue
            next_capture += 1.0 / fps
            if in_flight() >= window:
                result.skipped += 1
                index += 1
                continue
        elif in_flight() >= window:
            client.changed.clear()
            try:
                await asyncio.wait_for(client.changed.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            continue
        await client.send_frame(body(index), frame_id=index % 2**32)
        waiting[index % 2**32] = last_sent = time.perf_counter()
        result.sent += 1
        index += 1
    collect()
    return result


def lost(client: StreamClient) -> int:
    """Frames the server reported it will not answer (dropped, rate-limited, rejected)."""
    s = client.stats
    return s.get("frames_dropped", 0) + s.get("frames_rate_limited", 0) + s.get("frames_rejected", 0)
