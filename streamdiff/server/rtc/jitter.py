"""A video frame leaves the receiver's jitter buffer as soon as its last packet is in, not one frame later.

aiortc's video ``JitterBuffer`` (1.16) reassembles a frame only when the first packet of the *next* frame arrives
(the change of RTP timestamp is its only end-of-frame sign). Every received frame so waits one frame interval
before it is decoded: ~33 ms for a 30 frames/s camera on the server, ~70 ms for a ~14 frames/s stylised output on
a client. RTP's marker bit says where a video frame ends (RFC 6184 §5.1 for H.264, RFC 7741 §4.1 for VP8; aiortc,
Chromium, Firefox, OBS, ffmpeg and GStreamer set it), so :class:`MarkerJitterBuffer` hands a frame over when the
packet carrying the marker completes it: every sequence number from the frame's first packet to the marked one is
in, all with the frame's timestamp. When a marker is lost, or a sender never sets it, a frame is still handed over
at the next frame's first packet, as aiortc does (its own rule is the fallback), so no frame is held longer than
before.

:func:`use_marker_jitter_buffer` puts one in an aiortc ``RTCRtpReceiver`` before media flows (server and Python
clients alike). aiortc keeps the buffer in a name-mangled attribute; where a version has no such attribute the
receiver keeps its own buffer and a warning says so (the stream works, one frame later).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["MarkerJitterBuffer", "use_marker_jitter_buffer"]

logger = logging.getLogger(__name__)

_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
VIDEO_CAPACITY = 512  # packets, as aiortc's own video buffer (a power of 2)
_warned = False


def MarkerJitterBuffer(capacity: int = VIDEO_CAPACITY) -> Any:  # noqa: N802 - builds an instance of a lazy class
    """A video jitter buffer that completes a frame at its marked packet (see the module docstring)."""
    return _marker_class()(capacity=capacity, is_video=True)


@functools.cache
def _marker_class() -> type:
    """The buffer's class, built once on aiortc's (imported only when a peer connects)."""
    from aiortc.jitterbuffer import JitterBuffer, JitterFrame

    class _MarkerJitterBuffer(JitterBuffer):
        _waiting = False  # a marked packet came in before the rest of its frame (reordered): check on each add

        def add(self, packet: Any) -> tuple[bool, Any]:
            pli, frame = super().add(packet)
            if frame is None and (getattr(packet, "marker", 0) or self._waiting):
                frame = self._complete_at_marker()
            self._waiting = frame is None and (bool(getattr(packet, "marker", 0)) or self._waiting)
            return pli, frame

        def _complete_at_marker(self) -> Any:
            """The oldest frame if it is complete up to a marked packet: removed and returned; else None."""
            capacity = self.capacity
            origin = self._origin
            first = self._packets[origin % capacity]
            if first is None:
                return None
            packets = []
            for count in range(capacity):
                packet = self._packets[(origin + count) % capacity]
                if packet is None or packet.timestamp != first.timestamp:
                    return None  # a gap (a packet still missing) or the next frame before any marker
                packets.append(packet)
                if packet.marker:
                    self.remove(count + 1)
                    return JitterFrame(data=b"".join(p._data for p in packets), timestamp=first.timestamp)
            return None

    return _MarkerJitterBuffer


def use_marker_jitter_buffer(receiver: Any) -> bool:
    """Give ``receiver`` (an aiortc ``RTCRtpReceiver`` of video, before its first packet) a
    :class:`MarkerJitterBuffer`. False, with one warning per process, where this aiortc keeps no such buffer."""
    global _warned
    from aiortc.jitterbuffer import JitterBuffer

    if not isinstance(getattr(receiver, _ATTRIBUTE, None), JitterBuffer):
        if not _warned:
            _warned = True
            logger.warning("this aiortc keeps its jitter buffer elsewhere: received video frames are decoded one "
                           "frame later (at the next frame's first packet)")
        return False
    current = getattr(receiver, _ATTRIBUTE)
    if getattr(current, "_is_video", False) and not isinstance(current, _marker_class()):
        setattr(receiver, _ATTRIBUTE, MarkerJitterBuffer(current.capacity))
    return True
