"""Media between aiortc and a stream session: a video track's frames into the engine, the engine's outputs out.

- :func:`feed_session` reads a received video track: one task takes every decoded frame aiortc hands over (aiortc
  decodes on its own thread) and keeps only the newest; another converts it (RGB, the stream's size with
  :func:`~streamdiff.core.image.fit_frame`, in the hub's decode pool) and hands it to
  :meth:`StreamSession.submit_decoded` with its RTP timestamp. No jitter buffer grows between decoder and engine.
- :func:`make_output_track`: a session's output as a video track (one per peer connection that sends it): latest-wins,
  each frame converted off the event loop, its ``pts`` the RTP timestamp of the input it came from, and encoded
  there by its own :class:`~.encoder.OutputEncoder` (constant quality under the peer's bandwidth estimate) into
  packets that aiortc's sender only packetizes; without an encoder config, frames go to aiortc's own encoder.
- :func:`attach_output`: an output track's sender: RTP timestamps kept, the peer's feedback to the track's encoder.
- :func:`keep_rtp_timestamps`: aiortc starts each sender's RTP timestamps at a random origin; for an
  output track's sender it is 0, so an output's RTP timestamp *is* its input's (a receiver matches them).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.image import fit_frame
from ..pacing import LatestSlot
from ...protocol.wire import ErrorCode
from .encoder import EncoderConfig, OutputEncoder, SenderFeedback, follow_sender

if TYPE_CHECKING:
    from ...engine import StreamOutput
    from ..session import StreamSession

__all__ = ["VIDEO_TIME_BASE", "attach_output", "drain", "feed_session", "keep_rtp_timestamps", "make_output_track",
           "to_rgb"]

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = Fraction(1, 90000)  # RTP video clock
_ZERO_ORIGIN: contextvars.ContextVar[bool] = contextvars.ContextVar("streamdiff_rtp_zero_origin", default=False)
_patched = False


async def feed_session(track: Any, session: StreamSession) -> None:
    """Read ``track`` until it ends, handing its newest frames to ``session`` (see the module docstring). A frame
    over the server's ``max_frame_pixels`` ends the session (``image_too_large``): the decoder already paid for it,
    and the next ones would cost the same."""
    from aiortc.mediastreams import MediaStreamError

    slot: LatestSlot[Any] = LatestSlot()
    done = asyncio.Event()

    async def read() -> None:
        try:
            while True:
                slot.put(await track.recv())
        except MediaStreamError:
            pass
        finally:
            done.set()
            slot.put(None)

    reader = asyncio.ensure_future(read())
    loop = asyncio.get_running_loop()
    limit = session.limits.max_frame_pixels
    try:
        while True:
            frame = await slot.get()
            if frame is None:
                return
            if frame.width * frame.height > limit:
                message = (f"the video is {frame.width}x{frame.height} = {frame.width * frame.height} pixels, more "
                           f"than the limit of {limit}")
                logger.info("%s: %s; ending it", session.stream_id, message)
                await session.end(ErrorCode.IMAGE_TOO_LARGE, message)
                return
            stream = session.stream
            if stream is None or stream.closed:
                return  # the session ended
            config = stream.config
            image = await loop.run_in_executor(session.hub.decode_pool, to_rgb, frame, config.width, config.height)
            session.submit_decoded(image, frame.pts)
    finally:
        reader.cancel()


def to_rgb(frame: Any, width: int, height: int) -> np.ndarray:
    """Worker thread: an ``av.VideoFrame`` as uint8 RGB ``[height, width, 3]`` (center crop to the aspect ratio).

    A larger frame is first scaled by swscale (area) straight from YUV to the smallest size that covers
    ``width``×``height`` keeping its aspect ratio, then cropped by :func:`fit_frame`: 1920×1080 → 512×512 in ~18 ms
    instead of ~45 ms through a full-size RGB array."""
    scale = max(width / frame.width, height / frame.height)
    if scale < 1:
        covering_w = max(width, math.ceil(frame.width * scale - 1e-6))
        covering_h = max(height, math.ceil(frame.height * scale - 1e-6))
        image = frame.to_ndarray(format="rgb24", width=covering_w, height=covering_h, interpolation="AREA")
    else:
        image = frame.to_ndarray(format="rgb24")
    return fit_frame(image, width, height)


async def drain(track: Any) -> None:
    """Read and drop a track's frames (received audio: accepted and ignored, without growing a queue)."""
    from aiortc.mediastreams import MediaStreamError

    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass


def keep_rtp_timestamps(sender: Any) -> None:
    """Make ``sender`` (an ``RTCRtpSender``, before it starts) use RTP timestamp origin 0: the RTP timestamp of
    every packet is the frame's ``pts`` in the 90 kHz clock. aiortc draws the origin with the module-level
    ``random32`` when the sender's RTP task starts; a context variable set in that task alone makes the draw 0
    there, and every other sender of the process keeps its random origin."""
    global _patched
    import aiortc.rtcrtpsender as module

    if not _patched:
        random32 = module.random32
        module.random32 = lambda: 0 if _ZERO_ORIGIN.get() else random32()
        _patched = True
    run_rtp = sender._run_rtp

    async def zero_origin(*args: Any, **kwargs: Any) -> Any:
        _ZERO_ORIGIN.set(True)  # this task's context only
        return await run_rtp(*args, **kwargs)

    sender._run_rtp = zero_origin


def make_output_track(session: StreamSession, pool: Any, *, own: bool = False,
                      encoder: EncoderConfig | None = None) -> Any:
    """A new output track of ``session``'s outputs (an aiortc ``MediaStreamTrack`` and a session
    :class:`~streamdiff.server.session.OutputSink`), subscribed to them; it unsubscribes when stopped. Frames are
    made, and encoded with ``encoder`` (None: aiortc's own encoder does it), in ``pool``'s threads; then give its
    sender to :func:`attach_output`. ``own``: the track goes back to the stream's publisher (sendrecv), and each
    frame it hands to aiortc counts as sent (:meth:`StreamSession.output_sent`: ``frames_out``, latency); a WHEP
    viewer's does not, as a WebSocket viewer's frames do not. (The class is built here: aiortc is imported only
    when a peer connects.)"""
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class _OutputTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.frames_sent = 0
            self.frames_dropped = 0
            self.feedback = SenderFeedback()  # filled by attach_output's hooks
            self.encoder: OutputEncoder | None = None
            self._slot: LatestSlot[StreamOutput | None] = LatestSlot()
            self._last_pts: int | None = None
            self._pending: list[Any] = []  # packets of the last frame beyond its first (normally none)

        def on_output(self, output: StreamOutput) -> None:
            if self._slot.put(output) is not None:
                self.frames_dropped += 1

        def ended(self) -> None:
            self._slot.put(None)

        async def recv(self) -> Any:
            if self._pending:
                return self._pending.pop(0)
            while True:
                if self.readyState != "live":
                    raise MediaStreamError
                output = await self._slot.get()
                if output is None:
                    self.stop()
                    raise MediaStreamError
                start = time.perf_counter()
                media = await asyncio.get_running_loop().run_in_executor(pool, self._make, output)
                if media is None or isinstance(media, list) and not media:
                    continue  # skipped, or the encoder had no packet for it
                self.frames_sent += 1
                if own:
                    session.output_sent(output, time.perf_counter() - start)
                if isinstance(media, list):
                    self._pending = media[1:]
                    return media[0]
                return media

        def _make(self, output: StreamOutput) -> Any:
            """Worker thread (one call at a time per track): the frame, or its packets, or None to skip it."""
            frame = _to_video_frame(output)
            if frame is None:
                return None
            if self._last_pts is not None and not 0 < (frame.pts - self._last_pts) % (1 << 32) < 1 << 31:
                return None  # never an older pts after a newer one (RTP timestamps are 32-bit and wrap)
            self._last_pts = frame.pts
            if encoder is None or self.feedback.mime_type is None:
                return frame  # aiortc encodes it (no encoder asked for, or the codec is unknown)
            if self.encoder is None:
                self.encoder = OutputEncoder(self.feedback.mime_type, encoder, self.feedback.parameters)
            return self.encoder.encode(frame, time.monotonic(), self.feedback)

        def stop(self) -> None:
            session.sinks.discard(self)
            super().stop()

    track = _OutputTrack()
    session.sinks.add(track)
    return track


def attach_output(sender: Any, track: Any) -> None:
    """Wire ``sender`` (the aiortc ``RTCRtpSender`` of a :func:`make_output_track` track, before it starts): its RTP
    timestamps are the outputs' input timestamps (:func:`keep_rtp_timestamps`), and the peer's codec, keyframe
    requests and bandwidth estimate reach the track's encoder (:func:`~.encoder.follow_sender`)."""
    keep_rtp_timestamps(sender)
    follow_sender(sender, track.feedback)


def _to_video_frame(output: StreamOutput) -> Any:
    """Worker thread: the newest frame of ``output`` as an ``av.VideoFrame`` carrying its input's RTP timestamp."""
    import av

    frames = output.frames()
    if frames is None or not len(frames):
        return None
    tag = output.frame_ids[-1]
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[-1]), format="rgb24")
    pts = getattr(tag, "pts", None)
    frame.pts = int(pts) if pts is not None else int(output.finished * 90000) % (1 << 32)
    frame.time_base = VIDEO_TIME_BASE
    return frame
