"""WHIP/WHEP signalling, sans I/O: offer checks, WHIP URL query → settings, bearer tokens, the resource table.

Nothing here touches a socket, aiortc or the engine; every refusal is a :class:`SignalingError` carrying the HTTP
status and a message that names the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ...errors import ProtocolError, StreamDiffError
from ...protocol.settings import SETTING_FIELDS
from .config import RtcConfig

__all__ = ["QUERY_FIELDS", "OfferSummary", "ResourceTable", "SignalingError", "bearer_token", "check_offer",
           "query_settings", "token_matches"]

T = TypeVar("T")

#: The WHIP URL's query parameters: stream settings (docs/protocol.md, "Settings"; same validation as a hello's)
#: and ``view_token`` (the stream's view token, as in a hello: a stable WHEP / viewer URL).
QUERY_FIELDS = ("prompt", "negative_prompt", "width", "height", "seed", "guidance_scale", "delta", "strength", "steps",
                "t_index_list", "num_inference_steps", "cfg_type", "frame_buffer_size", "view_token")
_INT = re.compile(r"-?[0-9]{1,18}")
_NUMBER = re.compile(r"-?([0-9]{1,18}(\.[0-9]{0,18})?|\.[0-9]{1,18})([eE][-+]?[0-9]{1,3})?")
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class SignalingError(StreamDiffError):
    """A WHIP/WHEP request refused: answer ``status`` with the message (``headers`` too)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


@dataclass(frozen=True)
class MediaSection:
    kind: str  # "video", "audio", "application"
    direction: str  # as the offerer states it
    codecs: tuple[str, ...]  # rtpmap encoding names, upper case (RTX, RED, ULPFEC included)


@dataclass(frozen=True)
class OfferSummary:
    """What an offer asks for: its media sections, in order."""

    sections: tuple[MediaSection, ...]

    @property
    def video(self) -> tuple[MediaSection, ...]:
        return tuple(s for s in self.sections if s.kind == "video")

    @property
    def data_channel(self) -> bool:
        return any(s.kind == "application" for s in self.sections)

    def sends_video(self) -> bool:
        return any(s.direction in ("sendrecv", "sendonly") for s in self.video)

    def receives_video(self) -> bool:
        return any(s.direction in ("sendrecv", "recvonly") for s in self.video)


def check_offer(body: bytes, content_type: str | None, config: RtcConfig, *, publish: bool) -> tuple[str,
                                                                                                     OfferSummary]:
    """The offer's text and summary, or SignalingError: 415 (not ``application/sdp``), 413 (over
    ``max_sdp_bytes``), 400 (not an SDP offer, no video, a publisher that sends none or a viewer that receives
    none), 406 (none of ``config.video_codecs`` offered)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind != "application/sdp":
        raise SignalingError(415, f"Content-Type {shorten(content_type or 'none')!r} is not allowed; send the SDP "
                                  "offer as application/sdp")
    if len(body) > config.max_sdp_bytes:
        raise SignalingError(413, f"the SDP offer has {len(body)} bytes, more than the limit of "
                                  f"{config.max_sdp_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignalingError(400, "the SDP offer is not UTF-8 text") from None
    summary = summarize(text)
    if not summary.video:
        raise SignalingError(400, "the SDP offer has no video section (m=video); send one video track")
    if publish and not summary.sends_video():
        raise SignalingError(400, "the WHIP offer sends no video (its m=video is recvonly or inactive); publish with "
                                  "a sendonly or sendrecv video track")
    if not publish and not summary.receives_video():
        raise SignalingError(400, "the WHEP offer receives no video (its m=video is sendonly or inactive); offer a "
                                  "recvonly video track")
    allowed = set(config.video_codecs)
    for section in summary.video:
        if not allowed & set(section.codecs):
            offered = [c for c in dict.fromkeys(section.codecs) if c not in ("RTX", "RED", "ULPFEC", "FLEXFEC-03")]
            raise SignalingError(406, f"the offer's video codecs ({', '.join(offered) or 'none'}) are not allowed; "
                                      f"allowed: {', '.join(config.video_codecs)}")
    return text, summary


def summarize(text: str) -> OfferSummary:
    """The media sections of an SDP offer (SignalingError 400 when it is not one)."""
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or not lines[0].startswith("v=0"):
        raise SignalingError(400, "the body is not an SDP offer (it must start with v=0)")
    session_direction = "sendrecv"
    sections: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith("m="):
            parts = line[2:].split()
            if len(parts) < 3:
                raise SignalingError(400, f"malformed media line {shorten(line)!r}")
            sections.append({"kind": parts[0], "direction": None, "codecs": []})
        elif line.startswith("a=") and line[2:] in _DIRECTIONS:
            if sections:
                sections[-1]["direction"] = line[2:]
            else:
                session_direction = line[2:]
        elif line.startswith("a=rtpmap:") and sections:
            match = re.match(r"a=rtpmap:\d+\s+([^/\s]+)", line)
            if match:
                sections[-1]["codecs"].append(match.group(1).upper())
    return OfferSummary(tuple(MediaSection(s["kind"], s["direction"] or session_direction, tuple(s["codecs"]))
                              for s in sections))


def query_settings(query: Mapping[str, str] | Any) -> tuple[dict[str, Any], str | None]:
    """The WHIP URL's query parameters as the JSON settings of a hello (checked by
    :func:`~streamdiff.protocol.settings.apply_settings` next), and the ``view_token`` asked for. Raises
    SignalingError(400) for an unknown or repeated parameter or a value of the wrong type."""
    settings: dict[str, Any] = {}
    view_token = None
    keys = list(query.keys())
    for name in dict.fromkeys(keys):
        if name not in QUERY_FIELDS:
            raise SignalingError(400, f"query parameter {shorten(name)!r} is not known; allowed: "
                                      f"{', '.join(QUERY_FIELDS)}")
        if keys.count(name) > 1:
            raise SignalingError(400, f"query parameter {name!r} is given {keys.count(name)} times; give it once")
        value = query[name]
        if name == "view_token":
            view_token = value
            continue
        kind = SETTING_FIELDS[name]
        if kind == "int":
            if not _INT.fullmatch(value):
                raise SignalingError(400, f"query parameter {name}={shorten(value)!r} must be an integer")
            settings[name] = int(value)
        elif kind == "number":
            if not _NUMBER.fullmatch(value):
                raise SignalingError(400, f"query parameter {name}={shorten(value)!r} must be a number")
            settings[name] = float(value)
        elif kind == "int_list":
            items = value.split(",")
            if not all(_INT.fullmatch(item) for item in items):
                raise SignalingError(400, f"query parameter {name}={shorten(value)!r} must be integers separated by "
                                          "commas (e.g. 32,45)")
            settings[name] = [int(item) for item in items]
        else:
            settings[name] = value
    return settings, view_token


def refusal(error: ProtocolError) -> SignalingError:
    """A hello refused by the protocol (bad settings, 400) as an HTTP answer naming the query parameter."""
    text = str(error).replace("settings.", "query parameter ")
    return SignalingError(400, text)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (None when absent or another scheme)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def token_matches(given: str | None, expected: str | None) -> bool:
    """True when no token is expected, or ``given`` equals it (constant time)."""
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                     expected.encode("utf-8"))


def _digest(token: str | None) -> bytes:
    return b"" if token is None else hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass
class _Entry(Generic[T]):
    value: T
    token_digest: bytes = field(repr=False)


class ResourceTable(Generic[T]):
    """WHIP/WHEP resources by id: ids are unguessable (``secrets.token_urlsafe``), and each is bound to the bearer
    token that created it (:meth:`find` wants the same token; a resource made without a token wants none)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # begins every id (a fleet's replica: ``r-<tag>-``)
        self._entries: dict[str, _Entry[T]] = {}

    def add(self, value: T, token: str | None) -> str:
        resource_id = self.prefix + secrets.token_urlsafe(24)
        while resource_id in self._entries:
            resource_id = self.prefix + secrets.token_urlsafe(24)
        self._entries[resource_id] = _Entry(value, _digest(token))
        return resource_id

    def find(self, resource_id: str, token: str | None) -> T:
        """The resource; SignalingError 404 (no such resource) or 401 (another token)."""
        entry = self._entries.get(resource_id)
        if entry is None:
            raise SignalingError(404, "no such resource (it ended, or never existed)")
        if not hmac.compare_digest(entry.token_digest, _digest(token)):
            raise SignalingError(401, "this resource belongs to another token",
                                 (("WWW-Authenticate", 'Bearer realm="streamdiff"'),))
        return entry.value

    def remove(self, resource_id: str) -> T | None:
        entry = self._entries.pop(resource_id, None)
        return None if entry is None else entry.value

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        return [e.value for e in self._entries.values()]


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
