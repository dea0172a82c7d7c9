"""Helpers of the WebRTC tests: a real server (``StreamServer`` + the tiny engine) on 127.0.0.1, and real aiortc clients
that gather on loopback only (the traffic of these tests never leaves 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from aiohttp import ClientSession
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from multidict import CIMultiDict

from streamdiff.io.sources import pattern_frame
from streamdiff.server.hub import Hub, ServerConfig
from streamdiff.server.rtc import RtcConfig
from streamdiff.server.rtc.media import keep_rtp_timestamps
from streamdiff.server.rtc.peer import gather_on

LOOPBACK = ("127.0.0.1",)
PTS_STEP = 3000  # 30 frames/s in the 90 kHz RTP clock


@dataclass
class Served:
    hub: Hub
    url: str  # http://127.0.0.1:PORT
    front: Any
    ws_url: str = ""  # ws://127.0.0.1:PORT/ws


@contextlib.asynccontextmanager
async def serve(model: Any, config: ServerConfig, rtc: RtcConfig | None = None,
                max_batch_rows: int = 8) -> AsyncIterator[Served]:
    """``streamdiff serve``'s server (:class:`StreamServer`: the one application on its aiohttp host) with
    WHIP/WHEP on 127.0.0.1, on its own tiny engine (stopped without draining at the end)."""
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import StreamServer

    engine = StreamEngine(model, EngineConfig(max_streams=config.limits.max_streams, max_batch_rows=max_batch_rows))
    engine.start()
    server = StreamServer(engine, config, own_engine=False, rtc=rtc or RtcConfig(hosts=LOOPBACK))
    await server.start()
    try:
        assert server.hub is not None
        yield Served(server.hub, f"http://127.0.0.1:{server.port}", server.rtc_front, server.url)
    finally:
        await server.stop(5.0)
        await asyncio.get_running_loop().run_in_executor(None, lambda: engine.stop(drain=False, timeout=10.0))


class PatternTrack(VideoStreamTrack):
    """The moving test pattern at ``fps`` (``still``: always frame 0), pts = index × 3000 (90 kHz); ``sent`` maps
    each pts to when it was handed to the encoder (perf_counter) and ``frames`` to the image."""

    def __init__(self, size: int = 256, fps: float = 30.0, still: bool = False) -> None:
        super().__init__()
        self.size, self.fps, self.still = size, fps, still
        self.index = 0
        self.sent: dict[int, float] = {}
        self.images: dict[int, np.ndarray] = {}
        self._start: float | None = None

    def image(self, index: int) -> np.ndarray:
        """Frame ``index`` as uint8 RGB ``[size, size, 3]`` (subclasses send something else)."""
        return pattern_frame(index, self.size, self.size)

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.perf_counter()
        due = self._start + self.index / self.fps
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        image = self.image(0 if self.still else self.index)
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = self.index * PTS_STEP, Fraction(1, 90000)
        self.sent[frame.pts] = time.perf_counter()
        self.images[frame.pts] = image
        self.index += 1
        return frame


@dataclass
class Received:
    """Frames a client got: (arrival perf_counter, pts, uint8 RGB image)."""

    frames: list[tuple[float, int, np.ndarray]] = field(default_factory=list)
    task: asyncio.Task[Any] | None = None


def collect(track: Any, received: Received) -> None:
    async def run() -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                received.frames.append((time.perf_counter(), frame.pts, frame.to_ndarray(format="rgb24")))

    received.task = asyncio.ensure_future(run())


def prefer(transceiver: Any, codec: str) -> None:
    capabilities = RTCRtpSender.getCapabilities("video")
    transceiver.setCodecPreferences([c for c in capabilities.codecs if c.mimeType.lower() == f"video/{codec}"])


async def offer(pc: RTCPeerConnection) -> str:
    """Create the offer and wait until every candidate is gathered (non-trickle, as OBS sends it), on loopback."""
    with gather_on(LOOPBACK):
        await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp


async def post_sdp(http: ClientSession, url: str, sdp: str, token: str | None = None,
                   origin: str | None = None) -> tuple[int, dict, str]:
    headers = {"Content-Type": "application/sdp"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if origin is not None:
        headers["Origin"] = origin
    async with http.post(url, data=sdp.encode(), headers=headers) as response:
        return response.status, CIMultiDict(response.headers), await response.text()


@dataclass
class Client:
    pc: RTCPeerConnection
    status: int
    headers: dict
    body: str
    track: PatternTrack | None = None
    received: Received = field(default_factory=Received)
    channel: Any = None
    messages: list[Any] = field(default_factory=list)

    @property
    def location(self) -> str:
        return self.headers["Location"]

    async def close(self) -> None:
        await self.pc.close()
        if self.received.task is not None:
            self.received.task.cancel()


async def publish(http: ClientSession, base: str, token: str | None, *, query: str = "", codec: str = "h264",
                  sendrecv: bool = False, data_channel: bool = False, still: bool = False,
                  size: int = 256, track: PatternTrack | None = None, origin: str | None = None) -> Client:
    """A WHIP publisher. The defaults behave like OBS 30+: a sendonly H.264 video track, no data channel, the
    offer sent once gathering is complete, a bearer token. The sender's RTP timestamps start at 0 (pts matching).
    ``track``: what it sends (default: the moving test pattern, ``size``², ``still``)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = track or PatternTrack(size, still=still)
    transceiver = pc.addTransceiver(track, direction="sendrecv" if sendrecv else "sendonly")
    prefer(transceiver, codec)
    keep_rtp_timestamps(transceiver.sender)
    client = Client(pc, 0, {}, "", track)
    if data_channel:
        client.channel = pc.createDataChannel("streamdiff")
        client.channel.on("message", client.messages.append)
    if sendrecv:
        pc.on("track", lambda t: collect(t, client.received))
    client.status, client.headers, client.body = await post_sdp(http, f"{base}/whip{query}", await offer(pc), token,
                                                                origin)
    if client.status == 201:
        await pc.setRemoteDescription(RTCSessionDescription(client.body, "answer"))
    else:
        await pc.close()
    return client


async def watch(http: ClientSession, base: str, view_path: str, codec: str = "h264") -> Client:
    """A WHEP viewer of ``view_path`` (``/whep/VIEW_TOKEN``): a recvonly video transceiver."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver("video", direction="recvonly")
    prefer(transceiver, codec)
    client = Client(pc, 0, {}, "")
    pc.on("track", lambda t: collect(t, client.received))
    client.status, client.headers, client.body = await post_sdp(http, f"{base}{view_path}", await offer(pc))
    if client.status == 201:
        await pc.setRemoteDescription(RTCSessionDescription(client.body, "answer"))
    else:
        await pc.close()
    return client


def run(coro: Any, timeout: float = 120.0) -> Any:
    """Run a test's coroutine on a fresh event loop, at most ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
