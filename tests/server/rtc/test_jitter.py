"""The marker-bit jitter buffer: a frame leaves when its marked packet completes it, not at the next frame."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("aiortc")

from aiortc.jitterbuffer import JitterBuffer  # noqa: E402
from aiortc.rtp import RtpPacket  # noqa: E402

from streamdiff.server.rtc.jitter import MarkerJitterBuffer, use_marker_jitter_buffer  # noqa: E402


def packet(seq: int, timestamp: int, data: bytes, marker: bool = False) -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq % 65536, timestamp=timestamp)
    p._data = data  # what the receiver's depayloader leaves on a packet
    return p


def frames_of(buffer, packets):
    """(index of the packet whose arrival handed the frame over, data, timestamp) for each frame."""
    out = []
    for i, p in enumerate(packets):
        _, frame = buffer.add(p)
        if frame is not None:
            out.append((i, frame.data, frame.timestamp))
    return out


def two_frames(start: int = 100):
    return [packet(start, 3000, b"a1"), packet(start + 1, 3000, b"a2"), packet(start + 2, 3000, b"a3", True),
            packet(start + 3, 6000, b"b1"), packet(start + 4, 6000, b"b2", True), packet(start + 5, 9000, b"c1")]


def test_a_frame_leaves_with_its_marked_packet_where_aiortc_waits_for_the_next_frame() -> None:
    packets = two_frames()
    assert frames_of(MarkerJitterBuffer(), packets) == [(2, b"a1a2a3", 3000), (4, b"b1b2", 6000)]
    # aiortc's own buffer hands each frame over one frame later: at the next frame's first packet
    assert frames_of(JitterBuffer(capacity=512, is_video=True), packets) == [(3, b"a1a2a3", 3000),
                                                                              (5, b"b1b2", 6000)]


def test_a_marked_packet_before_the_rest_of_its_frame_waits_for_the_missing_packet() -> None:
    p = two_frames()
    reordered = [p[0], p[2], p[1], p[3], p[4]]  # the marked packet overtakes the middle one
    assert frames_of(MarkerJitterBuffer(), reordered) == [(2, b"a1a2a3", 3000), (4, b"b1b2", 6000)]


def test_a_lost_marker_falls_back_to_the_next_frames_first_packet() -> None:
    p = two_frames()
    p[2] = packet(102, 3000, b"a3")  # the sender set no marker
    assert frames_of(MarkerJitterBuffer(), p) == [(3, b"a1a2a3", 3000), (4, b"b1b2", 6000)]


def test_single_packet_frames_and_sequence_wraparound() -> None:
    packets = [packet(65534 + i, 3000 * (i + 1), bytes([i]), True) for i in range(5)]  # 65534, 65535, 0, 1, 2
    assert frames_of(MarkerJitterBuffer(), packets) == [(i, bytes([i]), 3000 * (i + 1)) for i in range(5)]


def test_a_late_packet_of_a_frame_already_handed_over_is_dropped() -> None:
    p = two_frames()
    buffer = MarkerJitterBuffer()
    assert frames_of(buffer, p[:3]) == [(2, b"a1a2a3", 3000)]
    assert buffer.add(packet(101, 3000, b"a2"))[1] is None  # a duplicate, after its frame left
    assert frames_of(buffer, p[3:5]) == [(1, b"b1b2", 6000)]


def test_a_video_receiver_gets_the_buffer_and_an_audio_receiver_keeps_its_own() -> None:
    from aiortc import RTCPeerConnection

    async def check() -> None:
        pc = RTCPeerConnection()
        try:
            video = pc.addTransceiver("video", direction="recvonly").receiver
            audio = pc.addTransceiver("audio", direction="recvonly").receiver
            assert use_marker_jitter_buffer(video) and use_marker_jitter_buffer(audio)
            assert type(video._RTCRtpReceiver__jitter_buffer).__name__ == "_MarkerJitterBuffer"
            assert type(audio._RTCRtpReceiver__jitter_buffer) is JitterBuffer
        finally:
            await pc.close()

    asyncio.run(check())
