"""The WebRTC output encoder: its config, its pure policy, real PyAV encodes decoded back, and real aiortc peers over
loopback telling it their codec, keyframe requests and bandwidth estimate."""

from __future__ import annotations

import asyncio
import contextlib
import time
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from rtc_helpers import LOOPBACK, PTS_STEP, prefer, run, wait_for

from streamdiff.core.image import psnr
from streamdiff.errors import ConfigError
from streamdiff.server.rtc.config import RtcConfig, parse_quality
from streamdiff.server.rtc.encoder import (
    EncoderConfig,
    OutputEncoder,
    SenderFeedback,
    follow_sender,
    keyframe_due,
    next_ceiling,
)
from streamdiff.server.rtc.media import keep_rtp_timestamps
from streamdiff.server.rtc.peer import gather_on

SIZE = 128
FPS = 30
AIORTC_H264_FLOOR = 500_000  # bit/s: aiortc's H.264 encoder never spends less


def smooth_frame(index: int, size: int = SIZE) -> np.ndarray:
    """A smooth picture drifting 1 pixel a frame: uint8 RGB ``[size, size, 3]``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x = x + index
    image = np.stack([128 + 100 * np.sin(x / 17), 128 + 100 * np.cos(y / 23 + x / 41), 128 + 60 * np.sin((x + y) / 29)],
                     axis=-1)
    return image.clip(0, 255).astype(np.uint8)


def noise_frame(index: int, size: int = SIZE) -> np.ndarray:
    """A new random picture every frame: as hard as it gets for an encoder."""
    return np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)


def video_frame(image: np.ndarray, index: int) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    frame.pts = index * PTS_STEP
    return frame


def decoder(mime: str) -> Any:
    return av.CodecContext.create("h264" if mime == "video/H264" else "vp8", "r")


# -- config and policy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"crf": 52}, r"EncoderConfig.crf=52 is outside \[0, 51\]"),
    ({"crf": 20.5}, "EncoderConfig.crf=20.5 must be an integer"),
    ({"min_bitrate": 5000}, r"EncoderConfig.min_bitrate=5000 is outside \[10000, 100000000\]"),
    ({"min_bitrate": 3_000_000, "max_bitrate": 2_000_000}, "min_bitrate=3000000 is more than max_bitrate=2000000"),
    ({"start_bitrate": 50_000}, r"EncoderConfig.start_bitrate=50000 is outside \[300000, 8000000\]"),
    ({"keyframe_interval_s": 0.1}, r"EncoderConfig.keyframe_interval_s=0.1 is outside \[0.5, 600.0\]"),
    ({"reconfigure_factor": 1.0}, r"EncoderConfig.reconfigure_factor=1.0 is outside \(1.0, 10.0\]"),
    ({"preset": "placebo"}, "EncoderConfig.preset='placebo': give one of ultrafast, superfast, veryfast"),
])
def test_config_errors_name_the_value_and_the_limit(kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        EncoderConfig(**kwargs)


def test_rtc_quality_is_a_crf_or_aiortc() -> None:
    assert parse_quality(24) == parse_quality("24") == EncoderConfig(crf=24)
    assert parse_quality("aiortc") is None and parse_quality(" AIORTC ") is None
    for bad in (52, -1, "high", 2.5, True):
        with pytest.raises(ConfigError, match=r"rtc_quality=.* is not a crf in \[0, 51\].*or 'aiortc'"):
            parse_quality(bad)
    assert RtcConfig().encoder == EncoderConfig() and RtcConfig(encoder=None).encoder is None
    with pytest.raises(ConfigError, match="must be an EncoderConfig or None"):
        RtcConfig(encoder=28)  # type: ignore[arg-type]


def test_the_ceiling_follows_the_estimate_only_when_it_moved_enough() -> None:
    config = EncoderConfig(min_bitrate=100_000, max_bitrate=4_000_000, reconfigure_factor=1.5)
    sent = 2_000_000.0  # sending more than any estimate below, which fell: congestion

    def ceiling(current: int, reported: int | None) -> int:
        return next_ceiling(current, reported, True, sent, config)

    assert ceiling(1_000_000, None) == 1_000_000  # no estimate yet
    assert ceiling(1_000_000, 1_400_000) == 1_000_000  # within the factor: no rebuild
    assert ceiling(1_000_000, 700_000) == 1_000_000
    assert ceiling(1_000_000, 1_600_000) == 1_600_000
    assert ceiling(1_000_000, 600_000) == 600_000
    assert ceiling(1_000_000, 50_000_000) == 4_000_000  # kept in [min, max]
    assert ceiling(1_000_000, 1_000) == 100_000
    assert ceiling(4_000_000, 50_000_000) == 4_000_000


def test_only_congestion_lowers_the_ceiling() -> None:
    """The receiver estimates at most ~1.5x what it gets, rising slowly: 150 kbit/s while 100 kbit/s arrive is no
    congestion, nor is a rising estimate under a burst; an estimate cut below what is being sent is."""
    config = EncoderConfig(min_bitrate=100_000, reconfigure_factor=1.5)
    assert next_ceiling(2_000_000, 150_000, False, 100_000.0, config) == 2_000_000
    assert next_ceiling(2_000_000, 150_000, False, 400_000.0, config) == 2_000_000  # rising: application limited
    assert next_ceiling(2_000_000, 150_000, True, 100_000.0, config) == 2_000_000  # cut, but above what is sent
    assert next_ceiling(2_000_000, 150_000, True, 400_000.0, config) == 150_000
    assert next_ceiling(150_000, 3_000_000, False, 140_000.0, config) == 3_000_000  # raising needs no congestion


def test_keyframes_when_asked_first_and_at_the_interval() -> None:
    config = EncoderConfig(keyframe_interval_s=2.0)
    assert keyframe_due(10.0, None, False, config)
    assert not keyframe_due(11.9, 10.0, False, config)
    assert keyframe_due(12.0, 10.0, False, config)
    assert keyframe_due(10.1, 10.0, True, config)


# -- real encodes -----------------------------------------------------------------------------------------------

def encode_clip(encoder: OutputEncoder, make: Any, frames: int, feedback: SenderFeedback | None = None,
                start: int = 0, decode: Any = None) -> list[tuple[int, av.Packet, np.ndarray | None]]:
    """(index, packet, decoded image or None) per frame of ``make(index)``, at 30 frames/s of encoder time."""
    out = []
    for index in range(start, start + frames):
        (packet,) = encoder.encode(video_frame(make(index), index), index / FPS, feedback)
        assert packet.pts == index * PTS_STEP and packet.time_base == Fraction(1, 90000)
        images = [f.to_ndarray(format="rgb24") for f in decode.decode(packet)] if decode is not None else []
        out.append((index, packet, images[-1] if images else None))
    return out


@pytest.mark.parametrize("mime", ["video/H264", "video/VP8"])
def test_a_smooth_clip_decodes_well_in_far_fewer_bytes_than_aiortc_spends(mime: str) -> None:
    encoder = OutputEncoder(mime, EncoderConfig())
    frames = encode_clip(encoder, smooth_frame, 60, decode=decoder(mime))
    assert all(image is not None for _, _, image in frames), "every packet decodes to its frame at once"
    quality = [psnr(image, smooth_frame(i)) for i, _, image in frames]
    assert min(quality) > 30, quality
    bytes_per_frame = np.mean([p.size for _, p, _ in frames])
    floor_per_frame = AIORTC_H264_FLOOR / 8 / FPS  # ~2083 bytes
    assert bytes_per_frame < floor_per_frame / 4, bytes_per_frame
    assert frames[0][1].is_keyframe and not any(p.is_keyframe for _, p, _ in frames[1:])  # interval 5 s > 2 s


@pytest.mark.parametrize("mime", ["video/H264", "video/VP8"])
def test_a_low_ceiling_is_obeyed(mime: str) -> None:
    """Noise at crf 10 would take many Mbit/s. An estimate of 300 kbit/s, below what is being sent, is congestion:
    within a second the encoder is rebuilt at that ceiling, and from then on every 2 s window carries at most 2 s at
    the ceiling (+10 %) plus the encoder's half-second buffer (the new keyframe's burst)."""
    ceiling = 300_000
    unbounded = OutputEncoder(mime, EncoderConfig(crf=10))
    free = sum(p.size for _, p, _ in encode_clip(unbounded, noise_frame, 30)) * 8
    assert free > 3 * ceiling, free  # the ceiling below is what binds
    encoder = OutputEncoder(mime, EncoderConfig(crf=10, min_bitrate=100_000))
    feedback = SenderFeedback()
    decode = decoder(mime)
    feedback.bitrate = 3_000_000
    frames = encode_clip(encoder, noise_frame, 1, feedback, decode=decode)
    feedback.bitrate = ceiling  # cut while ~2 Mbit/s are being sent
    frames += encode_clip(encoder, noise_frame, 119, feedback, start=1, decode=decode)
    assert encoder.ceiling == ceiling and encoder.rebuilds == 2
    rebuilt = next(i for i, p, _ in frames[1:] if p.is_keyframe)
    assert rebuilt <= FPS + 1, rebuilt
    sizes = [p.size for _, p, _ in frames[rebuilt:]]
    windows = [sum(sizes[i:i + 2 * FPS]) * 8 for i in range(0, len(sizes) - 2 * FPS + 1, 5)]
    assert max(windows) <= ceiling * (2 * 1.1 + 0.5), windows  # the keyframe's window included
    assert np.mean(sizes[FPS:]) * 8 * FPS <= ceiling * 1.1  # a second later, the ceiling itself
    assert sum(image is not None for _, _, image in frames) >= 115  # it still decodes (a rate cap may skip one)


@pytest.mark.parametrize("mime", ["video/H264", "video/VP8"])
def test_a_keyframe_request_yields_a_keyframe_next(mime: str) -> None:
    encoder = OutputEncoder(mime, EncoderConfig())
    feedback = SenderFeedback()
    frames = encode_clip(encoder, smooth_frame, 10, feedback)
    assert [p.is_keyframe for _, p, _ in frames] == [True] + [False] * 9
    feedback.keyframe_requests += 1
    after = encode_clip(encoder, smooth_frame, 3, feedback, start=10)
    assert [p.is_keyframe for _, p, _ in after] == [True, False, False]
    # a new decoder joining at that keyframe decodes from it on (what a viewer that sent PLI needs)
    late = decoder(mime)
    assert all(late.decode(p) for _, p, _ in after)


def test_keyframes_come_at_the_interval() -> None:
    encoder = OutputEncoder("video/H264", EncoderConfig(keyframe_interval_s=1.0))
    frames = encode_clip(encoder, smooth_frame, 70)
    assert [i for i, p, _ in frames if p.is_keyframe] == [0, 30, 60]


@pytest.mark.parametrize("mime", ["video/H264", "video/VP8"])
def test_a_new_ceiling_rebuilds_the_encoder_and_decoding_goes_on(mime: str) -> None:
    """Down on congestion (an estimate below the smooth clip's own rate), up again when the estimate recovers; each
    rebuild starts with a keyframe, and one decoder decodes the whole stream."""
    encoder = OutputEncoder(mime, EncoderConfig(start_bitrate=2_000_000, min_bitrate=10_000))
    feedback = SenderFeedback()
    decode = decoder(mime)
    first = encode_clip(encoder, smooth_frame, 40, feedback, decode=decode)
    rate = sum(p.size for _, p, _ in first[-FPS:]) * 8  # bit/s over the last second
    feedback.bitrate = 1_800_000  # within the factor (and above what is sent): no rebuild
    second = encode_clip(encoder, smooth_frame, 10, feedback, start=40, decode=decode)
    assert encoder.rebuilds == 1 and encoder.ceiling == 2_000_000
    feedback.bitrate = rate // 2
    third = encode_clip(encoder, smooth_frame, 20, feedback, start=50, decode=decode)
    assert encoder.rebuilds == 2 and encoder.ceiling == max(10_000, rate // 2)
    feedback.bitrate = 3_000_000
    fourth = encode_clip(encoder, smooth_frame, 20, feedback, start=70, decode=decode)
    assert encoder.rebuilds == 3 and encoder.ceiling == 3_000_000
    assert third[0][1].is_keyframe and fourth[0][1].is_keyframe  # a new context starts with a keyframe
    frames = first + second + third + fourth
    assert all(image is not None for _, _, image in frames)
    assert min(psnr(image, smooth_frame(i)) for i, _, image in first + second + fourth[5:]) > 30


def test_the_negotiated_h264_level_is_used() -> None:
    assert OutputEncoder("video/H264", EncoderConfig(), {"profile-level-id": "42e01f"}).level == "31"
    assert OutputEncoder("video/H264", EncoderConfig(), {"profile-level-id": "42e028"}).level == "40"
    assert OutputEncoder("video/H264", EncoderConfig(), {"profile-level-id": "zz"}).level == "31"
    with pytest.raises(ConfigError, match="no output encoder for 'video/AV1'"):
        OutputEncoder("video/AV1", EncoderConfig())


# -- real peers -------------------------------------------------------------------------------------------------

class EncodedTrack(MediaStreamTrack):
    """The smooth clip at 30 frames/s, encoded by an OutputEncoder for the codec its sender negotiated (as the
    server's output track does): ``av.Packet`` s for aiortc's pass-through path."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.feedback = SenderFeedback()
        self.encoder: OutputEncoder | None = None
        self.index = 0
        self.keyframes: list[int] = []
        self._start: float | None = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        self._start = self._start or time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self.index / FPS - time.monotonic()))
        if self.encoder is None:
            assert self.feedback.mime_type is not None, "the codec is known before the first frame"
            self.encoder = OutputEncoder(self.feedback.mime_type, EncoderConfig(), self.feedback.parameters)
        (packet,) = self.encoder.encode(video_frame(smooth_frame(self.index), self.index), time.monotonic(),
                                        self.feedback)
        if packet.is_keyframe:
            self.keyframes.append(self.index)
        self.index += 1
        return packet


@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_an_aiortc_receiver_decodes_asks_for_keyframes_and_estimates(codec: str) -> None:
    async def main() -> None:
        sender_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        receiver_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = EncodedTrack()
        transceiver = sender_pc.addTransceiver(track, direction="sendonly")
        prefer(transceiver, codec)
        keep_rtp_timestamps(transceiver.sender)
        assert follow_sender(transceiver.sender, track.feedback)
        received: list[tuple[int, np.ndarray]] = []
        tasks: list[asyncio.Task[Any]] = []

        async def collect(remote: Any) -> None:
            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await remote.recv()
                    received.append((frame.pts, frame.to_ndarray(format="rgb24")))

        receiver_pc.on("track", lambda remote: tasks.append(asyncio.ensure_future(collect(remote))))
        try:
            with gather_on(LOOPBACK):
                await sender_pc.setLocalDescription(await sender_pc.createOffer())
                await receiver_pc.setRemoteDescription(sender_pc.localDescription)
                await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
            await sender_pc.setRemoteDescription(RTCSessionDescription(receiver_pc.localDescription.sdp, "answer"))
            await wait_for(lambda: len(received) >= 20, 30, "20 decoded frames")
            assert track.feedback.mime_type.lower() == f"video/{codec}"
            for pts, image in received[-5:]:
                assert pts % PTS_STEP == 0, "the RTP timestamp is the frame's pts"
                assert psnr(image, smooth_frame(pts // PTS_STEP)) > 30
            await wait_for(lambda: track.feedback.bitrate is not None, 30, "a REMB estimate")
            assert track.feedback.bitrate > 0
            # a PLI from the receiver: the sender's next frame is a keyframe
            requests, sent = track.feedback.keyframe_requests, track.index
            receiver = receiver_pc.getReceivers()[0]
            await receiver._send_rtcp_pli(transceiver.sender._ssrc)  # what aiortc sends on a decode error
            await wait_for(lambda: track.feedback.keyframe_requests > requests, 10, "the keyframe request")
            await wait_for(lambda: track.index > sent + 3, 10, "frames after the request")
            assert any(sent <= k <= sent + 3 for k in track.keyframes), (sent, track.keyframes)
        finally:
            await sender_pc.close()
            await receiver_pc.close()
            for task in tasks:
                task.cancel()

    run(main(), timeout=90)


def test_follow_sender_degrades_when_aiortc_changes() -> None:
    class Parameters:
        codecs = [type("Codec", (), {"mimeType": "video/H264", "parameters": {"packetization-mode": "1"}})()]

    class OldSender:  # a sender without the private RTCP handler
        async def send(self, parameters: Any) -> None:
            self.sent = parameters

    sender, feedback = OldSender(), SenderFeedback()
    assert follow_sender(sender, feedback) is False
    asyncio.run(sender.send(Parameters()))
    assert feedback.mime_type == "video/H264" and feedback.parameters == {"packetization-mode": "1"}
    assert sender.sent.codecs[0].mimeType == "video/H264"
    assert feedback.bitrate is None and feedback.keyframe_requests == 0  # the encoder keeps start_bitrate


def test_the_server_encodes_each_peer_with_its_own_encoder(tiny_model) -> None:
    """A sendrecv publisher and two WHEP viewers: three output tracks, each with its own OutputEncoder for the
    negotiated codec; a PLI from one viewer reaches that viewer's encoder (its keyframe), and the frames decode."""
    import re

    from aiohttp import ClientSession
    from rtc_helpers import publish, serve, watch

    from streamdiff.protocol.limits import ServerLimits
    from streamdiff.server.hub import ServerConfig

    async def main() -> None:
        config = ServerConfig(port=0, token="t0ken", limits=ServerLimits(max_streams=1))
        rtc = RtcConfig(hosts=LOOPBACK, encoder=EncoderConfig(keyframe_interval_s=600))  # keyframes when asked
        async with serve(tiny_model, config, rtc) as served, ClientSession() as http:
            publisher = await publish(http, served.url, "t0ken", query="?width=128&height=128&prompt=a", sendrecv=True)
            assert publisher.status == 201, publisher.body
            (session,) = served.hub.sessions.values()
            viewers = [await watch(http, served.url, f"/whep/{session.view_token}", codec=codec)
                       for codec in ("h264", "vp8")]
            clients = [publisher, *viewers]
            try:
                await wait_for(lambda: all(len(c.received.frames) >= 5 for c in clients), 90, "frames at all peers")
                tracks = [sink for sink in session.sinks if hasattr(sink, "feedback")]
                assert len(tracks) == 3 and all(t.encoder is not None for t in tracks)
                assert sorted(t.encoder.codec for t in tracks) == ["h264", "h264", "vp8"]
                by_ssrc = {t.feedback.ssrc: t for t in tracks}
                ssrc = int(re.search(r"a=ssrc:(\d+) ", viewers[1].body).group(1))  # the server's sender's
                mine = by_ssrc[ssrc]
                requests, keyframe_at = mine.feedback.keyframe_requests, mine.encoder.last_keyframe
                await viewers[1].pc.getReceivers()[0]._send_rtcp_pli(ssrc)
                await wait_for(lambda: mine.feedback.keyframe_requests > requests, 10, "the viewer's PLI")
                await wait_for(lambda: mine.encoder.last_keyframe > keyframe_at, 30, "its encoder's keyframe")
                frames = len(viewers[1].received.frames)
                await wait_for(lambda: len(viewers[1].received.frames) > frames + 2, 30, "frames after the PLI")
            finally:
                for client in clients:
                    await client.close()

    run(main(), timeout=180)
