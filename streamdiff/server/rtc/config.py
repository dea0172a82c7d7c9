"""The WebRTC options of ``streamdiff serve``: one frozen, validated :class:`RtcConfig` (data only, no I/O)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from ...errors import ConfigError
from .encoder import EncoderConfig

__all__ = ["SUPPORTED_VIDEO_CODECS", "RtcConfig", "parse_port_range", "parse_quality"]

#: The video codecs aiortc decodes and encodes (mime subtype, as in SDP ``rtpmap`` lines).
SUPPORTED_VIDEO_CODECS = ("H264", "VP8")


@dataclass(frozen=True)
class RtcConfig:
    """WHIP ingest and WHEP playback (docs/webrtc.md); every field has a safe default.

    ``hosts``: the local addresses whose UDP sockets become ICE host candidates (``--rtc-host``, repeatable; empty:
    every address of every interface except loopback, aioice's default; ``127.0.0.1`` for this machine only).
    ``max_sdp_bytes``: the largest SDP offer read (413 above it). ``video_codecs``: the codecs a peer may send or
    receive, in the server's order of preference (offers with none of them: 406). ``connect_timeout_s``: ICE and
    DTLS must have connected within this long after the answer, or the peer is closed and its stream slot freed.
    ``ports``: the UDP ports ``(first, last)`` the peers' sockets bind to (``--rtc-port-range 50000-50100``, for a
    firewall; each peer connection takes one port per ``hosts`` address; an offer arriving when none is free gets
    503 with Retry-After); None: the kernel's ephemeral ports. ``encoder``: how the server encodes the video it
    sends (:class:`~.encoder.EncoderConfig`: constant quality, the peer's bandwidth estimate as a ceiling;
    ``rtc_quality`` in the options); None: aiortc's own encoder (a bitrate from the estimate, at least 500 kbit/s).

    Not configurable: DTLS (always on: aiortc has no way to turn it off).
    """

    hosts: tuple[str, ...] = ()
    max_sdp_bytes: int = 16 << 10
    video_codecs: tuple[str, ...] = SUPPORTED_VIDEO_CODECS
    connect_timeout_s: float = 10.0
    ports: tuple[int, int] | None = None
    encoder: EncoderConfig | None = EncoderConfig()

    def __post_init__(self) -> None:
        if isinstance(self.hosts, (str, bytes)) or not hasattr(self.hosts, "__iter__"):
            raise ConfigError(f"RtcConfig.hosts={self.hosts!r} must be a list of IP addresses")
        hosts = []
        for host in self.hosts:
            try:
                hosts.append(str(ipaddress.ip_address(str(host).strip("[]"))))
            except ValueError:
                raise ConfigError(f"--rtc-host {host!r} is not an IP address (give an address of this machine, "
                                  "e.g. 127.0.0.1 or 192.168.1.20)") from None
        object.__setattr__(self, "hosts", tuple(dict.fromkeys(hosts)))
        if isinstance(self.max_sdp_bytes, bool) or not isinstance(self.max_sdp_bytes, int) \
                or not 1024 <= self.max_sdp_bytes <= 1 << 20:
            raise ConfigError(f"RtcConfig.max_sdp_bytes={self.max_sdp_bytes!r} is outside [1024, 1048576]")
        if isinstance(self.video_codecs, (str, bytes)) or not hasattr(self.video_codecs, "__iter__"):
            raise ConfigError(f"RtcConfig.video_codecs={self.video_codecs!r} must be a list of codec names")
        codecs = tuple(dict.fromkeys(str(c).upper() for c in self.video_codecs))
        unknown = [c for c in codecs if c not in SUPPORTED_VIDEO_CODECS]
        if unknown or not codecs:
            raise ConfigError(f"RtcConfig.video_codecs={list(self.video_codecs)!r}: give one or more of "
                              f"{', '.join(SUPPORTED_VIDEO_CODECS)}")
        object.__setattr__(self, "video_codecs", codecs)
        value = self.connect_timeout_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"RtcConfig.connect_timeout_s={value!r} must be a finite number > 0")
        object.__setattr__(self, "connect_timeout_s", float(value))
        if self.ports is not None:
            object.__setattr__(self, "ports", parse_port_range(self.ports))
        if self.encoder is not None and not isinstance(self.encoder, EncoderConfig):
            raise ConfigError(f"RtcConfig.encoder={self.encoder!r} must be an EncoderConfig or None (aiortc's encoder)")


def parse_port_range(value: object) -> tuple[int, int]:
    """``"50000-50100"``, ``"50000"`` or a pair of ints → ``(first, last)``, both in [1024, 65535], first ≤ last."""
    text = value if isinstance(value, str) else "-".join(str(v) for v in value) \
        if isinstance(value, (tuple, list)) and len(value) == 2 else None
    parts = text.strip().split("-") if text is not None else []
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (-1, -1)
    except ValueError:
        first = last = -1
    if not 1024 <= first <= last <= 65535:
        raise ConfigError(f"--rtc-port-range {value!r} is not a UDP port range FIRST-LAST with 1024 <= FIRST <= LAST "
                          "<= 65535 (e.g. 50000-50100)")
    return first, last


def parse_quality(value: object) -> EncoderConfig | None:
    """``rtc_quality`` → the :class:`RtcConfig` ``encoder``: a crf (``28``, ``"28"``) → an
    :class:`~.encoder.EncoderConfig` at that quality; ``"aiortc"`` → None (aiortc's own bitrate-driven encoder)."""
    if isinstance(value, str) and value.strip().lower() == "aiortc":
        return None
    try:
        crf = int(value) if isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool) else -1
    except ValueError:
        crf = -1
    if not 0 <= crf <= 51:
        raise ConfigError(f"rtc_quality={value!r} is not a crf in [0, 51] (lower: better and bigger; 26 by default) "
                          "or 'aiortc' (aiortc's own encoder)", field="rtc_quality", value=value,
                          allowed="[0, 51] or 'aiortc'")
    return EncoderConfig(crf=crf)
