"""The output video encoder of a WebRTC peer: constant quality, with the receiver's bandwidth estimate as a ceiling.

aiortc's own encoders aim at a *bitrate*, the receiver's REMB estimate clamped to [500 kbit/s, 3 Mbit/s] (H.264) or
[250 kbit/s, 1.5 Mbit/s] (VP8): on a good link they spend ~1 Mbit/s whatever the picture. :class:`OutputEncoder`
aims at a *quality* instead (libx264 ``crf``, libvpx constrained quality) and caps the rate at the receiver's
estimate (x264 VBV ``maxrate``/``bufsize``; libvpx's target bitrate, which is a maximum in CQ mode), so a still or
smooth picture costs a few kbit/s and a congested link still gets what it can carry.

The parts, in the order a frame meets them:

- :class:`EncoderConfig`: frozen, validated (``RtcConfig.encoder``; ``rtc_quality`` in a server's options).
- :class:`SenderFeedback`: what the peer told its sender (negotiated codec, REMB bitrate, keyframe requests),
  filled by :func:`follow_sender`, the one place that touches aiortc's private sender methods.
- :func:`next_ceiling`, :func:`keyframe_due`: pure policy, no clock of their own.
- :class:`OutputEncoder`: one per output track (so one per peer: each WHEP viewer's keyframe requests reach its own
  encoder), called in a worker thread; it returns ``av.Packet`` s that aiortc's sender packetizes without encoding
  (its pass-through path: a track's ``recv()`` returning a packet).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ...config import check_int, check_number
from ...errors import ConfigError

__all__ = ["EncoderConfig", "OutputEncoder", "SenderFeedback", "follow_sender", "keyframe_due", "next_ceiling",
           "vp8_cq_level"]

logger = logging.getLogger(__name__)

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
RTP_TIME_BASE = Fraction(1, 90000)
_ENCODER_TIME_BASE = Fraction(1, 1000)  # the encoder's own clock: milliseconds of wall time between frames
_GOP_SIZE = 1 << 16  # keyframes come from keyframe_due, not from the encoder's own interval


@dataclass(frozen=True)
class EncoderConfig:
    """How :class:`OutputEncoder` spends bits.

    ``crf``: the quality, on x264's constant-rate-factor scale (lower is better and bigger; 23 is x264's default,
    ~18 visually lossless); VP8 uses the same number mapped onto its quantizer range (:func:`vp8_cq_level`).
    ``min_bitrate``/``max_bitrate`` (bit/s): the range the ceiling is kept in whatever the receiver reports (the
    floor is also the guard against a receiver's estimate that only follows the encoder's own low rate).
    ``start_bitrate``: the ceiling before the receiver's first estimate (and for good, if it sends none).
    ``keyframe_interval_s``: a keyframe at least this often (a viewer that lost one recovers without asking), besides
    one whenever the receiver asks (PLI/FIR). ``reconfigure_factor``: the encoder is rebuilt at a new ceiling only when
    the estimate moved by more than this factor from the current one (each rebuild starts with a keyframe), and
    lowered only on congestion (:func:`next_ceiling`).
    ``preset``: x264's speed/size trade-off; ``medium`` is x264's default and aiortc's (its encoder sets none), ~1.4
    dB better than ``veryfast`` at equal bytes on the bench's 256² outputs; faster presets for large frames on a
    busy CPU.
    """

    crf: int = 26
    min_bitrate: int = 300_000
    max_bitrate: int = 8_000_000
    start_bitrate: int = 2_000_000
    keyframe_interval_s: float = 5.0
    reconfigure_factor: float = 1.4
    preset: str = "medium"

    def __post_init__(self) -> None:
        check_int("EncoderConfig.crf", self.crf, 0, 51)
        check_int("EncoderConfig.min_bitrate", self.min_bitrate, 10_000, 100_000_000)
        check_int("EncoderConfig.max_bitrate", self.max_bitrate, 10_000, 100_000_000)
        if self.min_bitrate > self.max_bitrate:
            raise ConfigError(f"EncoderConfig.min_bitrate={self.min_bitrate} is more than "
                              f"max_bitrate={self.max_bitrate}", field="min_bitrate", value=self.min_bitrate,
                              allowed=f"<= {self.max_bitrate}")
        check_int("EncoderConfig.start_bitrate", self.start_bitrate, self.min_bitrate, self.max_bitrate)
        object.__setattr__(self, "keyframe_interval_s",
                           check_number("EncoderConfig.keyframe_interval_s", self.keyframe_interval_s, 0.5, 600.0))
        object.__setattr__(self, "reconfigure_factor",
                           check_number("EncoderConfig.reconfigure_factor", self.reconfigure_factor, 1.0, 10.0,
                                        min_open=True))
        if self.preset not in X264_PRESETS:
            raise ConfigError(f"EncoderConfig.preset={self.preset!r}: give one of {', '.join(X264_PRESETS)}",
                              field="preset", value=self.preset, allowed=X264_PRESETS)


def vp8_cq_level(crf: int) -> int:
    """x264's crf scale [0, 51] onto libvpx's quantizer range [0, 63] (VP8 has no crf of its own; its CQ level
    plays the part)."""
    return round(crf * 63 / 51)


def next_ceiling(current: int, reported: int | None, fell: bool, sent_rate: float, config: EncoderConfig) -> int:
    """The bitrate ceiling to encode at, given the receiver's newest estimate ``reported`` (None: none yet), whether
    it ``fell`` from the one before, and what the encoder sent over the last second (``sent_rate``, bit/s):
    ``current`` itself, unless the estimate kept in ``[min_bitrate, max_bitrate]`` moved by more than
    ``reconfigure_factor``; and lowered only on congestion: an estimate that fell, to below ``sent_rate``.

    Why that last rule: a receiver's estimate (REMB; aiortc's and libwebrtc's AIMD) rises to at most ~1.5× what it
    receives, so a constant-quality encoder sending little sees a low, slowly rising estimate that says nothing
    about the link ("application limited"); taken as a ceiling it would pin the encoder down for good. The
    estimator cuts its estimate (to ~0.85× the incoming rate) only when it sees overuse: that is the congestion."""
    if reported is None:
        return current
    wanted = max(config.min_bitrate, min(int(reported), config.max_bitrate))
    if wanted < current and not (fell and reported < sent_rate):
        return current  # application limited, not congested
    ratio = wanted / current
    return wanted if ratio > config.reconfigure_factor or ratio < 1 / config.reconfigure_factor else current


def keyframe_due(now: float, last_keyframe: float | None, requested: bool, config: EncoderConfig) -> bool:
    """Whether the frame at ``now`` (seconds, any monotonic clock) is to be a keyframe: asked for, the first, or
    ``keyframe_interval_s`` after the last."""
    return requested or last_keyframe is None or now - last_keyframe >= config.keyframe_interval_s


class SenderFeedback:
    """What an RTP sender's peer told it, written on the event loop (:func:`follow_sender`), read by the encoder's
    thread. ``mime_type``/``parameters``: the negotiated codec (``video/H264``, its fmtp); ``bitrate``: the newest
    REMB estimate (bit/s), None before one; ``keyframe_requests``: PLI and FIR messages so far (a count, so that a
    request arriving while a frame is being encoded is never lost); ``ssrc``: the sender's, once followed."""

    def __init__(self) -> None:
        self.ssrc: int | None = None
        self.mime_type: str | None = None
        self.parameters: dict[str, Any] = {}
        self.bitrate: int | None = None
        self.keyframe_requests = 0


def follow_sender(sender: Any, feedback: SenderFeedback) -> bool:
    """Make ``sender`` (an aiortc ``RTCRtpSender``, before it starts) report to ``feedback``: the codec it was told
    to send (wrapping its public ``send``) and, from each RTCP packet addressed to it (wrapping the private
    ``_handle_rtcp_packet``, which aiortc's DTLS transport calls), PLI/FIR keyframe requests and REMB estimates.
    aiortc still handles every packet itself afterwards.

    The only use of aiortc's private sender API for the encoder (aiortc 1.16). If it changes, this logs a warning and
    returns False; the encoder then works without it: no estimate (the ceiling stays ``start_bitrate``), keyframes
    at ``keyframe_interval_s`` only."""
    send = sender.send

    async def send_and_note(parameters: Any) -> None:
        codec = parameters.codecs[0]
        feedback.mime_type, feedback.parameters = codec.mimeType, dict(codec.parameters)
        await send(parameters)

    sender.send = send_and_note
    try:
        from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket, unpack_remb_fci

        handle = sender._handle_rtcp_packet
        ssrc = sender._ssrc
    except (ImportError, AttributeError) as error:
        logger.warning("aiortc's sender has changed (%s): the output encoder gets no keyframe requests and no "
                       "bandwidth estimate", error)
        return False
    feedback.ssrc = ssrc

    async def note_and_handle(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket):
            if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                feedback.keyframe_requests += 1
            elif packet.fmt == RTCP_PSFB_APP:
                try:
                    bitrate, ssrcs = unpack_remb_fci(packet.fci)
                except ValueError:
                    pass  # an APP message that is not REMB
                else:
                    if ssrc in ssrcs:
                        feedback.bitrate = bitrate
        await handle(packet)

    sender._handle_rtcp_packet = note_and_handle
    return True


class OutputEncoder:
    """Encodes one track's frames for one peer (H.264 with libx264, VP8 with libvpx). Call :meth:`encode` from one
    thread at a time; it reads ``feedback`` without a lock (ints written whole on the event loop)."""

    def __init__(self, mime_type: str, config: EncoderConfig, parameters: dict[str, Any] | None = None) -> None:
        codec = mime_type.lower().removeprefix("video/")
        if codec not in ("h264", "vp8"):
            raise ConfigError(f"no output encoder for {mime_type!r}: give video/H264 or video/VP8")
        self.codec, self.config = codec, config
        self.level = _h264_level((parameters or {}).get("profile-level-id"))
        self.ceiling = config.start_bitrate
        self.rebuilds = 0  # encoder contexts made so far
        self._context: Any = None
        self._keyframe_requests = 0
        self.last_keyframe: float | None = None  # when (the `now` of encode) the last keyframe was made
        self._sent: deque[tuple[float, int]] = deque()  # (now, bits) of the last second's packets
        self._estimates: tuple[int | None, int | None] = (None, None)  # the last two distinct estimates
        self._last_ms = -1

    def encode(self, frame: Any, now: float, feedback: SenderFeedback | None = None) -> list[Any]:
        """``frame`` (an ``av.VideoFrame`` whose ``pts`` is its RTP timestamp in the 90 kHz clock) encoded at
        ``now`` (seconds, monotonic: the encoder's rate control follows real time): its packets (normally one), each
        with the frame's ``pts`` and ``time_base`` 1/90000, for aiortc's ``pack``."""
        import av

        requested = feedback is not None and feedback.keyframe_requests != self._keyframe_requests
        if feedback is not None:
            self._keyframe_requests = feedback.keyframe_requests
        while self._sent and now - self._sent[0][0] >= 1.0:
            self._sent.popleft()
        reported = feedback.bitrate if feedback is not None else None
        if reported != self._estimates[-1]:
            self._estimates = (self._estimates[-1], reported)
        previous = self._estimates[0]
        ceiling = next_ceiling(self.ceiling, reported, previous is not None and reported is not None
                               and reported < previous, sum(bits for _, bits in self._sent), self.config)
        context = self._context
        if context is None or ceiling != self.ceiling or (context.width, context.height) != (frame.width,
                                                                                             frame.height):
            self.ceiling = ceiling
            context = self._context = self._open(frame.width, frame.height)
            self.rebuilds += 1
            requested = True  # a new context starts with one anyway; keep the interval's clock right
        keyframe = keyframe_due(now, self.last_keyframe, requested, self.config)
        image = frame.reformat(format="yuv420p") if frame.format.name != "yuv420p" else frame
        pts = frame.pts
        ms = max(self._last_ms + 1, round(now * 1000))  # strictly increasing, whatever the RTP timestamps do
        self._last_ms = ms
        image.pts, image.time_base = ms, _ENCODER_TIME_BASE
        image.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        packets = context.encode(image)
        for packet in packets:
            packet.pts, packet.dts, packet.time_base = pts, pts, RTP_TIME_BASE
            self._sent.append((now, packet.size * 8))
            if packet.is_keyframe:
                self.last_keyframe = now
        return packets

    @property
    def _buffer_bits(self) -> int:
        """The rate-control buffer: half a second at the ceiling (any window of T seconds carries at most
        ``ceiling × T`` plus this; short, as a real-time link has no room for long bursts)."""
        return self.ceiling // 2

    def _open(self, width: int, height: int) -> Any:
        import av

        if self.codec == "h264":
            context = av.CodecContext.create("libx264", "w")
            context.options = {
                "preset": self.config.preset, "tune": "zerolatency", "crf": str(self.config.crf),
                "maxrate": str(self.ceiling), "bufsize": str(self._buffer_bits),  # VBV
                "level": self.level, "forced-idr": "1",
            }
            context.profile = "Baseline"  # x264 marks it constrained (constraint_set1): 42e0xx, as negotiated
        else:
            context = av.CodecContext.create("libvpx", "w")
            context.bit_rate = self.ceiling  # in CQ mode, the most it may spend
            context.qmin, context.qmax = 4, 63  # the whole range: at a low ceiling, even noise fits
            context.options = {
                "crf": str(vp8_cq_level(self.config.crf)), "deadline": "realtime", "cpu-used": "8",
                "lag-in-frames": "0", "auto-alt-ref": "0", "bufsize": str(self._buffer_bits), "undershoot-pct": "100",
                "overshoot-pct": "15", "static-thresh": "1", "partitions": "0",
            }
        context.width, context.height, context.pix_fmt = width, height, "yuv420p"
        context.time_base, context.framerate = _ENCODER_TIME_BASE, Fraction(30, 1)
        context.gop_size = _GOP_SIZE
        context.thread_count = 1  # one per peer; the pool's threads are the parallelism
        context.open()
        return context


def _h264_level(profile_level_id: Any) -> str:
    """The x264 ``level`` of a negotiated ``profile-level-id`` (``42e01f`` → ``"31"``); 3.1, aiortc's, otherwise."""
    try:
        level_idc = int(str(profile_level_id)[4:6], 16)
    except ValueError:
        return "31"
    return str(level_idc) if 10 <= level_idc <= 52 else "31"
