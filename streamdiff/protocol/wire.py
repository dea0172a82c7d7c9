"""The wire format shared by server and client: codes, binary frame headers and strict JSON.

Binary frames (big-endian, docs/protocol.md "Binary frames")::

    input  (client -> server), 20-byte header then a JPEG or WebP body
      0  4  magic      b"SDFI"
      4  1  version    1
      5  3  reserved   0
      8  4  frame_id   uint32, chosen by the client (e.g. a counter)
     12  8  client_ts  float64, client capture time in ms on the client's monotonic clock (finite)

    output (server -> client and viewers), 40-byte header then a JPEG or WebP body
      0  4  magic      b"SDFO"
      4  1  version    1
      5  1  format     1 = JPEG, 2 = WebP
      6  2  settings_version  uint16: the settings (counted by acks, mod 2**16) the output was made with
      8  4  frame_id   uint32, echoed from the input frame
     12  8  client_ts  float64, echoed unchanged
     20  4  decode_ms  float32, server time decoding the input
     24  4  queue_ms   float32, waiting for the engine
     28  4  engine_ms  float32, the engine's work for this frame
     32  4  encode_ms  float32, encoding the output
     36  4  server_ms  float32, input received -> output sent, all included

Nothing here does I/O. Next: :mod:`.session` (server state machine) and :mod:`.client` use these.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError
from .images import ImageFormat

__all__ = [
    "INPUT_HEADER_SIZE",
    "INPUT_MAGIC",
    "OUTPUT_HEADER_SIZE",
    "OUTPUT_MAGIC",
    "PROTOCOL_VERSION",
    "REFERENCE_MAGIC",
    "STREAM_PATH",
    "SETTINGS_VERSIONS",
    "SUBPROTOCOL",
    "VIEW_PAGE_PATH",
    "VIEW_SOCKET_PREFIX",
    "WHEP_PREFIX",
    "WHIP_PATH",
    "CloseCode",
    "ErrorCode",
    "InputHeader",
    "OutputHeader",
    "ServerTimings",
    "close_reason",
    "dump_json",
    "error_message",
    "is_valid_unicode",
    "load_json",
    "pack_input_header",
    "pack_output_frame",
    "peek_frame_id",
    "shorten",
    "unpack_input_header",
    "unpack_output_frame",
]

PROTOCOL_VERSION = 1
#: URL paths (same host as the page): the stream socket, the viewer socket prefix and the viewer page.
STREAM_PATH = "/ws"
VIEW_SOCKET_PREFIX = "/ws/view/"
VIEW_PAGE_PATH = "/view.html"
#: WebRTC signaling (docs/webrtc.md): WHIP ingest (``POST /whip``, its resources below it) and WHEP playback
#: (``POST /whep/<view token>``).
WHIP_PATH = "/whip"
WHEP_PREFIX = "/whep/"
MAX_ERROR_MESSAGE_CHARS = 300
#: WebSocket subprotocol offered by clients (``Sec-WebSocket-Protocol``); optional, the server accepts it if given.
SUBPROTOCOL = "streamdiff.v1"
# A reconnecting client's previous stream id, as an HTTP header of the opening handshake (a fleet's router routes
# it back to that stream's replica; docs/protocol.md, "Reconnecting"). Header names are case-insensitive.
SESSION_HEADER = "x-session-id"
INPUT_MAGIC = b"SDFI"
REFERENCE_MAGIC = b"SDFR"  # a reference image (image prompt): the input frame's header layout, request_id for frame_id
OUTPUT_MAGIC = b"SDFO"
_INPUT = struct.Struct(">4sB3sId")
_OUTPUT = struct.Struct(">4sBBHIdfffff")
INPUT_HEADER_SIZE = _INPUT.size  # 20
OUTPUT_HEADER_SIZE = _OUTPUT.size  # 40
_FORMAT_IDS = {ImageFormat.JPEG: 1, ImageFormat.WEBP: 2}
_FORMATS_BY_ID = {v: k for k, v in _FORMAT_IDS.items()}
SETTINGS_VERSIONS = 1 << 16  # settings_version counts acked updates modulo this (2 bytes of the output header)
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455 5.5: control frame payload 125 bytes, 2 of them the code


class CloseCode(enum.IntEnum):
    """WebSocket close codes (RFC 6455 section 7.4.1) as this protocol uses them."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down, or the connection idled out
    PROTOCOL_ERROR = 1002  # the message sequence was broken (no hello, wrong version)
    UNSUPPORTED_DATA = 1003  # a view-only connection sent data
    INVALID_PAYLOAD = 1007  # a text message that is not valid JSON
    POLICY_VIOLATION = 1008  # bad token or origin, refused settings, error budget spent, hello too late
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # server full


class ErrorCode(str, enum.Enum):
    """Stable error codes of ``error`` messages. ``close_code`` is used when the error ends the connection."""

    BAD_JSON = "bad_json"
    MISSING_FIELD = "missing_field"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_VALUE = "invalid_value"
    NOT_ALLOWED = "not_allowed"
    HELLO_EXPECTED = "hello_expected"
    UNEXPECTED_HELLO = "unexpected_hello"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    NOT_READY = "not_ready"
    BAD_FRAME_HEADER = "bad_frame_header"
    UNSUPPORTED_FORMAT = "unsupported_format"
    BAD_IMAGE = "bad_image"
    IMAGE_TOO_LARGE = "image_too_large"
    MESSAGE_TOO_BIG = "message_too_big"
    ERROR_BUDGET_EXHAUSTED = "error_budget_exhausted"
    HELLO_TIMEOUT = "hello_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    SERVER_FULL = "server_full"
    SHUTTING_DOWN = "shutting_down"
    VIEW_ONLY = "view_only"
    UNKNOWN_VIEW_TOKEN = "unknown_view_token"
    STREAM_ENDED = "stream_ended"
    INTERNAL_ERROR = "internal_error"
    RATE_LIMITED = "rate_limited"
    HOSTILE_IMAGE = "hostile_image"
    DECODE_TOO_SLOW = "decode_too_slow"
    VIEW_TOKEN_IN_USE = "view_token_in_use"

    @property
    def close_code(self) -> CloseCode:
        return _CLOSE_CODES.get(self, CloseCode.POLICY_VIOLATION)

    @property
    def always_fatal(self) -> bool:
        """True when this error always ends the connection (others do only before ``ready``)."""
        return self in _ALWAYS_FATAL


_CLOSE_CODES = {
    ErrorCode.BAD_JSON: CloseCode.INVALID_PAYLOAD,
    ErrorCode.MISSING_FIELD: CloseCode.PROTOCOL_ERROR,
    ErrorCode.UNKNOWN_TYPE: CloseCode.PROTOCOL_ERROR,
    ErrorCode.HELLO_EXPECTED: CloseCode.PROTOCOL_ERROR,
    ErrorCode.UNEXPECTED_HELLO: CloseCode.PROTOCOL_ERROR,
    ErrorCode.UNSUPPORTED_VERSION: CloseCode.PROTOCOL_ERROR,
    ErrorCode.NOT_READY: CloseCode.PROTOCOL_ERROR,
    ErrorCode.BAD_FRAME_HEADER: CloseCode.PROTOCOL_ERROR,
    ErrorCode.MESSAGE_TOO_BIG: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.IDLE_TIMEOUT: CloseCode.GOING_AWAY,
    ErrorCode.SHUTTING_DOWN: CloseCode.GOING_AWAY,
    ErrorCode.SERVER_FULL: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.VIEW_TOKEN_IN_USE: CloseCode.TRY_AGAIN_LATER,  # it may be this client's own closing connection
    ErrorCode.VIEW_ONLY: CloseCode.UNSUPPORTED_DATA,
    ErrorCode.STREAM_ENDED: CloseCode.NORMAL,
    ErrorCode.INTERNAL_ERROR: CloseCode.INTERNAL_ERROR,
}
_ALWAYS_FATAL = frozenset({
    ErrorCode.HELLO_EXPECTED, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.UNAUTHORIZED, ErrorCode.FORBIDDEN_ORIGIN,
    ErrorCode.MESSAGE_TOO_BIG, ErrorCode.ERROR_BUDGET_EXHAUSTED, ErrorCode.HELLO_TIMEOUT, ErrorCode.IDLE_TIMEOUT,
    ErrorCode.SERVER_FULL, ErrorCode.SHUTTING_DOWN, ErrorCode.VIEW_ONLY, ErrorCode.UNKNOWN_VIEW_TOKEN,
    ErrorCode.STREAM_ENDED, ErrorCode.INTERNAL_ERROR, ErrorCode.VIEW_TOKEN_IN_USE,
})


@dataclass(frozen=True)
class InputHeader:
    """The fixed header of a client's binary frame."""

    frame_id: int
    client_ts: float


@dataclass(frozen=True)
class ServerTimings:
    """Server-side time spent on one frame, in milliseconds (carried in the output header)."""

    decode_ms: float = 0.0
    queue_ms: float = 0.0
    engine_ms: float = 0.0
    encode_ms: float = 0.0
    server_ms: float = 0.0


@dataclass(frozen=True)
class OutputHeader:
    """The fixed header of a server's binary frame (``body`` follows it on the wire). ``settings_version``: that of
    the ``ready`` or ``ack`` whose settings made the output (docs/protocol.md, "Settings versions")."""

    frame_id: int
    client_ts: float
    format: ImageFormat
    timings: ServerTimings
    settings_version: int = 0


def pack_input_header(frame_id: int, client_ts: float) -> bytes:
    """The 20-byte header of an input frame; send ``header + jpeg_or_webp_bytes`` as one binary message."""
    _check_frame_id(frame_id)
    if not math.isfinite(client_ts):
        raise ProtocolError(f"client_ts={client_ts!r} must be a finite number of milliseconds",
                            code=ErrorCode.BAD_FRAME_HEADER, field="client_ts")
    return _INPUT.pack(INPUT_MAGIC, PROTOCOL_VERSION, b"\0\0\0", frame_id, client_ts)


def unpack_input_header(data: bytes | bytearray | memoryview) -> tuple[InputHeader, memoryview]:
    """Split a client's binary message into its header and body; raise ProtocolError(``bad_frame_header``)."""
    if len(data) < INPUT_HEADER_SIZE:
        raise ProtocolError(f"binary message of {len(data)} bytes is shorter than the {INPUT_HEADER_SIZE}-byte "
                            "frame header", code=ErrorCode.BAD_FRAME_HEADER)
    magic, version, reserved, frame_id, client_ts = _INPUT.unpack_from(data)
    if magic != INPUT_MAGIC:
        raise ProtocolError(f"frame header magic {bytes(magic)!r} is not {INPUT_MAGIC!r}",
                            code=ErrorCode.BAD_FRAME_HEADER, field="magic", allowed=repr(INPUT_MAGIC))
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"frame header version {version} is not {PROTOCOL_VERSION}",
                            code=ErrorCode.BAD_FRAME_HEADER, field="version", value=version,
                            allowed=str(PROTOCOL_VERSION))
    if reserved != b"\0\0\0":
        raise ProtocolError(f"frame header reserved bytes {reserved.hex()} are not zero",
                            code=ErrorCode.BAD_FRAME_HEADER, field="reserved")
    if not math.isfinite(client_ts):
        raise ProtocolError(f"frame header client_ts {client_ts!r} is not a finite number",
                            code=ErrorCode.BAD_FRAME_HEADER, field="client_ts")
    return InputHeader(frame_id, client_ts), memoryview(data)[INPUT_HEADER_SIZE:]


def pack_reference_header(request_id: int) -> bytes:
    """The 20-byte header of a reference image (image prompt); send ``header + jpeg_or_webp_bytes`` as one binary
    message. ``request_id`` (uint32) comes back in the ``ack`` (or the error) that answers it."""
    _check_frame_id(request_id)
    return _INPUT.pack(REFERENCE_MAGIC, PROTOCOL_VERSION, b"\0\0\0", request_id, 0.0)


def unpack_reference_header(data: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """Split a reference-image message into its ``request_id`` and body; raise ProtocolError(``bad_frame_header``)."""
    if len(data) < INPUT_HEADER_SIZE:
        raise ProtocolError(f"binary message of {len(data)} bytes is shorter than the {INPUT_HEADER_SIZE}-byte "
                            "reference image header", code=ErrorCode.BAD_FRAME_HEADER)
    magic, version, reserved, request_id, _ = _INPUT.unpack_from(data)
    if magic != REFERENCE_MAGIC or version != PROTOCOL_VERSION or reserved != b"\0\0\0":
        raise ProtocolError(f"reference image header {bytes(data[:8]).hex(' ')} is not {REFERENCE_MAGIC!r} version "
                            f"{PROTOCOL_VERSION} with zero reserved bytes", code=ErrorCode.BAD_FRAME_HEADER,
                            field="magic", allowed=repr(REFERENCE_MAGIC))
    return request_id, memoryview(data)[INPUT_HEADER_SIZE:]


def peek_frame_id(data: bytes | bytearray | memoryview) -> int | None:
    """The ``frame_id`` of a client's binary message whose header is readable that far (the magic is ``SDFI`` and
    the message has its first 12 bytes), else None: errors about the frame carry it, even when the rest of the
    header, the body or the message's size is refused."""
    if len(data) < 12 or bytes(data[:4]) != INPUT_MAGIC:
        return None
    return int.from_bytes(data[8:12], "big")


def pack_output_frame(header: OutputHeader, body: bytes) -> bytes:
    """One binary output message: the 40-byte header followed by ``body`` (JPEG or WebP)."""
    _check_frame_id(header.frame_id)
    if not 0 <= header.settings_version < SETTINGS_VERSIONS:
        raise ProtocolError(f"settings_version={header.settings_version!r} is outside [0, {SETTINGS_VERSIONS})",
                            code=ErrorCode.BAD_FRAME_HEADER, field="settings_version")
    t = header.timings
    return _OUTPUT.pack(OUTPUT_MAGIC, PROTOCOL_VERSION, _FORMAT_IDS[header.format], header.settings_version,
                        header.frame_id, header.client_ts, t.decode_ms, t.queue_ms, t.engine_ms, t.encode_ms,
                        t.server_ms) + body


def unpack_output_frame(data: bytes | bytearray | memoryview) -> tuple[OutputHeader, bytes]:
    """Split a server's binary message into header and body; raise ProtocolError(``bad_frame_header``)."""
    if len(data) < OUTPUT_HEADER_SIZE:
        raise ProtocolError(f"binary message of {len(data)} bytes is shorter than the {OUTPUT_HEADER_SIZE}-byte "
                            "output header", code=ErrorCode.BAD_FRAME_HEADER)
    magic, version, format_id, settings_version, frame_id, client_ts, *timings = _OUTPUT.unpack_from(data)
    if magic != OUTPUT_MAGIC or version != PROTOCOL_VERSION or format_id not in _FORMATS_BY_ID:
        raise ProtocolError(f"output header {bytes(data[:6]).hex(' ')} is not {OUTPUT_MAGIC!r} version "
                            f"{PROTOCOL_VERSION} with format 1 or 2", code=ErrorCode.BAD_FRAME_HEADER)
    header = OutputHeader(frame_id, client_ts, _FORMATS_BY_ID[format_id], ServerTimings(*timings), settings_version)
    return header, bytes(data[OUTPUT_HEADER_SIZE:])


def _check_frame_id(frame_id: int) -> None:
    if isinstance(frame_id, bool) or not isinstance(frame_id, int) or not 0 <= frame_id < 2**32:
        raise ProtocolError(f"frame_id={frame_id!r} is outside [0, 2**32)", code=ErrorCode.BAD_FRAME_HEADER,
                            field="frame_id", value=frame_id, allowed="[0, 4294967295]")


# -- JSON ---------------------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def load_json(text: str) -> dict[str, Any]:
    """Parse one JSON text message strictly: an object, no NaN/Infinity, no duplicate keys, bounded nesting.

    Raises ProtocolError(``bad_json``) with the parser's reason; never any other exception.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except RecursionError:
        raise ProtocolError("message is not valid JSON: nested too deeply", code=ErrorCode.BAD_JSON) from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError; so is a 5000-digit integer
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ProtocolError(f"message is not valid JSON: {reason}", code=ErrorCode.BAD_JSON) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"message is a JSON {_json_type(value)}, not an object", code=ErrorCode.BAD_JSON)
    return value


def dump_json(message: dict[str, Any]) -> str:
    """Serialise an outgoing message compactly (ASCII only, so no lone surrogate can break the socket)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame (123 UTF-8 bytes)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return data.decode("utf-8")
    return data[:MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# -- error messages ---------------------------------------------------------------------------------------------


_ABSENT: Any = object()


def error_message(code: ErrorCode, message: str, *, fatal: bool, field: str | None = None, value: Any = None,
                  has_value: bool = False, allowed: str | None = None, request_id: Any = _ABSENT,
                  frame_id: int | None = None) -> str:
    """The JSON text of an ``error`` message (docs/protocol.md, "error"). ``request_id``: that of the message the
    error answers, as received (also an invalid one, so the client can match the answer); omitted: it had none."""
    out: dict[str, Any] = {"type": "error", "code": code.value, "message": shorten(message, MAX_ERROR_MESSAGE_CHARS),
                           "fatal": fatal}
    if field is not None:
        out["field"] = _printable(shorten(field, 100))
    if has_value:
        out["value"] = _echo(value)
    if allowed is not None:
        out["allowed"] = shorten(allowed, 200)
    if request_id is not _ABSENT:
        out["request_id"] = _echo_exactly(request_id)
    if frame_id is not None:
        out["frame_id"] = frame_id
    return dump_json(out)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _printable(text: str) -> str:
    """``text`` with what a strict client cannot print or decode (lone surrogates, control characters) escaped."""
    if text.isprintable() and is_valid_unicode(text):
        return text
    return "".join(c if c.isprintable() and is_valid_unicode(c) else c.encode("unicode_escape", "backslashreplace")
                   .decode("ascii") for c in text)


def _echo_exactly(value: Any) -> Any:
    """``value`` (parsed from a client's message) as it was, for the client to compare with what it sent; only a
    value nested too deeply to encode again (no client sends one) is summarised as :func:`_echo` does."""
    try:
        json.dumps(value, allow_nan=False)
    except (RecursionError, ValueError):
        return _echo(value)
    return value


def _echo(value: Any) -> Any:
    """A short JSON-safe echo of a received value (long strings, big numbers and containers are summarised)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return shorten(value, 64) if is_valid_unicode(value) else "<invalid unicode>"
    if isinstance(value, (list, tuple)):
        return [_echo(v) for v in value[:8]] + (["..."] if len(value) > 8 else []) if _flat(value) else \
            f"<list of {len(value)} items>"
    if isinstance(value, dict):
        return f"<object with {len(value)} keys>"
    return shorten(repr(value), 64)


def _flat(values: Any) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values[:8])


def is_valid_unicode(text: str) -> bool:
    """False for strings that cannot be UTF-8 encoded (lone surrogates, as JSON escapes can make)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
