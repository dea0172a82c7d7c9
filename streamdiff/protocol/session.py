"""The server side of the streamdiff WebSocket protocol, sans I/O (docs/protocol.md).

A :class:`ServerConnection` is a state machine fed with the messages of one WebSocket::

    AWAIT_HELLO --hello--> HELLO_RECEIVED --accept()--> STREAMING --error/close()/timeout--> CLOSED

``receive_text(str)`` and ``receive_bytes(bytes)`` return events: :class:`Hello` (admit the stream, then call
:meth:`ServerConnection.accept`, or :meth:`ServerConnection.refuse` when the engine cannot run its settings),
:class:`Frame` (decode ``body`` in a worker with :func:`.images.decode`; put it in the stream's latest-wins input
slot), :class:`Update` (pass ``changes`` to the stream, then send ``ack``, or call
:meth:`ServerConnection.update_refused` when the engine refuses them), :class:`Send` (send the text or bytes as
is) and :class:`Close` (close the WebSocket with that code and reason, then stop reading).
Nothing here touches a socket, a thread, the clock (an injected ``clock`` is read), a device or a logger.

The I/O layer's loop, in short::

    conn = ServerConnection(limits, token=token)
    while conn.state is not ConnectionState.CLOSED:
        message = await recv_with_timeout(conn.next_deadline())   # None on timeout
        events = conn.check_timeouts() if message is None else (
            conn.receive_text(message) if isinstance(message, str) else conn.receive_bytes(message))
        for event in events: ...
"""

from __future__ import annotations

import enum
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import ReferenceImage
from ..errors import ConfigError, ImageError, ProtocolError, StreamDiffError
from .images import ImageFormat
from .limits import ServerLimits
from .policy import ErrorBudget, RateLimiter, ReadPacer
from .settings import (
    SETTING_FIELDS,
    StreamSettings,
    apply_settings,
    check_caps,
    engine_changes,
    engine_refusal,
    reshaped,
)
from .wire import (
    PROTOCOL_VERSION,
    REFERENCE_MAGIC,
    SETTINGS_VERSIONS,
    VIEW_PAGE_PATH,
    VIEW_SOCKET_PREFIX,
    CloseCode,
    ErrorCode,
    OutputHeader,
    ServerTimings,
    close_reason,
    dump_json,
    error_message,
    is_valid_unicode,
    load_json,
    pack_output_frame,
    peek_frame_id,
    shorten,
    unpack_input_header,
    unpack_reference_header,
)

__all__ = [
    "Close",
    "ConnectionState",
    "ConnectionStats",
    "Event",
    "Frame",
    "Hello",
    "ReferenceUpload",
    "Send",
    "ServerConnection",
    "Update",
]

MAX_CLIENT_NAME_CHARS = 100
MAX_REQUEST_ID_CHARS = 64
RequestId = int | str
_VIEW_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")


class ConnectionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    HELLO_RECEIVED = "hello_received"
    STREAMING = "streaming"
    CLOSED = "closed"


@dataclass(frozen=True)
class Hello:
    """A valid hello: admit the stream (or ``close(ErrorCode.SERVER_FULL, …)``), then call ``accept``."""

    settings: StreamSettings
    client: str | None = None
    view_token: str | None = None  # asked for by the client (keeps a viewer URL stable across reconnects)


@dataclass(frozen=True)
class Frame:
    """An input frame whose header passed the checks; ``body`` is checked and decoded later, in a worker thread."""

    frame_id: int
    client_ts: float
    body: bytes = field(repr=False)
    received_at: float  # the connection's clock, seconds


@dataclass(frozen=True)
class ReferenceUpload:
    """A reference image (image prompt) whose header passed the checks: decode ``body`` in a worker with
    :func:`.images.decode` (the frames' limits), then call :meth:`ServerConnection.reference_decoded` (an
    :class:`Update` of ``reference_image``, acked like any) or :meth:`ServerConnection.reference_rejected`."""

    request_id: int
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class Update:
    """A live update the protocol accepted: ``changes`` are ``Stream.update`` keyword arguments.

    The engine has the last word: send ``ack`` (the text of the ``ack`` message) once ``stream.update(**changes)``
    succeeded, or call :meth:`ServerConnection.update_refused` with its ConfigError (the settings go back to
    ``previous`` and the client gets an error naming the field). ``settings_version``: the ack's, which outputs made
    with these settings carry.
    """

    request_id: RequestId | None
    changes: Mapping[str, Any]
    settings: StreamSettings
    previous: StreamSettings
    ack: str = field(default="", repr=False)
    settings_version: int = 0


@dataclass(frozen=True)
class Send:
    """Send ``data`` (str: a text message, bytes: a binary message)."""

    data: str | bytes


@dataclass(frozen=True)
class Close:
    """Close the WebSocket with ``code`` and ``reason``; ``error`` is why, when the server ends it."""

    code: CloseCode
    reason: str
    error: ErrorCode | None = None


Event = Hello | Frame | ReferenceUpload | Update | Send | Close


@dataclass
class ConnectionStats:
    """Counters of one connection (read them for metrics; they only ever grow)."""

    messages: int = 0
    frames_received: int = 0  # binary messages with a valid header
    frames_accepted: int = 0  # Frame events
    frames_rate_limited: int = 0  # over max_input_fps: dropped silently
    frames_rejected: int = 0  # bad header, format or size, or failed to decode (frame_rejected)
    frames_out: int = 0
    updates: int = 0
    errors: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)


class ServerConnection:
    """One stream's WebSocket, sans I/O. ``token``: the secret a hello must carry (None: no token needed).

    ``defaults`` are the settings a hello starts from (they must pass ``limits``); ``clock`` is monotonic seconds.
    """

    def __init__(self, limits: ServerLimits | None = None, *, token: str | None = None,
                 defaults: StreamSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or ServerLimits()
        self.defaults = defaults or StreamSettings()
        check_caps(self.defaults, self.limits, path="defaults")
        self._token = None if token is None else token.encode("utf-8")
        self._clock = clock
        self.state = ConnectionState.AWAIT_HELLO
        self.settings: StreamSettings | None = None
        self.settings_version = 0  # of ``settings``: 0 in ready, one more (mod 2**16) in each ack
        self.stream_id: str | None = None
        self.stats = ConnectionStats()
        self._opened_at = self._last_activity = clock()
        self._rate = RateLimiter(self.limits.max_input_fps, self.limits.input_burst_frames, clock)
        self._budget = ErrorBudget(self.limits.max_errors, self.limits.error_window_s, clock)
        self._control = RateLimiter(self.limits.max_control_per_s, self.limits.control_burst, clock)
        self._reshape = RateLimiter(self.limits.max_reshape_per_s, self.limits.reshape_burst, clock)
        self._reads = ReadPacer(self.limits.max_messages_per_s, self.limits.message_burst, clock)
        self._read_delay = 0.0

    def __repr__(self) -> str:  # never shows the token
        return f"<ServerConnection {self.state.value} stream_id={self.stream_id!r}>"

    # -- input ------------------------------------------------------------------------------------------------

    def read_delay(self) -> float:
        """Seconds the I/O layer should wait before reading this connection's next message: 0 while the client
        stays within ``max_messages_per_s``; beyond, reading slows to that rate (the sender is pushed back by TCP)."""
        return self._read_delay

    def receive_text(self, text: str) -> list[Event]:
        """Handle one text message (hello or update); returns the events it causes."""
        if self.state is ConnectionState.CLOSED:
            return []
        self._read_delay = self._reads.read()
        self._received()
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_text_bytes:
            return self._error(ProtocolError(
                f"text message of {size} bytes is over the limit of {self.limits.max_text_bytes} bytes",
                code=ErrorCode.MESSAGE_TOO_BIG, value=size, allowed=f"at most {self.limits.max_text_bytes} bytes"))
        answers: dict[str, Any] = {}  # the message's request_id as received, echoed by any error answering it
        try:
            message = load_json(text)
            if "request_id" in message:
                answers["request_id"] = message["request_id"]
            if not self._control.allow():  # before any other work: a flood costs a parse and an error each
                raise ProtocolError(
                    f"more than {self.limits.max_control_per_s:g} text messages per second (bursts of "
                    f"{self.limits.control_burst}); this one was ignored", code=ErrorCode.RATE_LIMITED,
                    allowed=f"at most {self.limits.max_control_per_s:g} per second")
            kind = message.get("type")
            if kind is None:
                raise ProtocolError("message has no 'type'", code=ErrorCode.MISSING_FIELD, field="type",
                                    allowed="hello, update")
            if kind not in ("hello", "update"):
                raise ProtocolError(f"message type {shorten(str(kind), 40)!r} is unknown; allowed: hello, update",
                                    code=ErrorCode.UNKNOWN_TYPE, field="type", value=kind, allowed="hello, update")
            if self.state is ConnectionState.AWAIT_HELLO:
                if kind != "hello":
                    raise ProtocolError(f"the first message must be a hello, got {kind!r}",
                                        code=ErrorCode.HELLO_EXPECTED, field="type", value=kind, allowed="hello")
                return self._on_hello(message)
            if kind == "hello":
                raise ProtocolError("hello was already received; send update to change settings",
                                    code=ErrorCode.UNEXPECTED_HELLO, field="type", value=kind, allowed="update")
            if self.state is ConnectionState.HELLO_RECEIVED:
                raise ProtocolError("update before ready: wait for the ready message", code=ErrorCode.NOT_READY)
            return self._on_update(message)
        except ProtocolError as exc:
            return self._error(exc, **answers)

    def receive_bytes(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Handle one binary message (an input frame); returns ``[Frame]``, ``[]`` (rate-limited) or errors."""
        if self.state is ConnectionState.CLOSED:
            return []
        self._read_delay = self._reads.read()
        self._received()
        frame_id = peek_frame_id(data)  # every error about this message names the frame, when it can be read
        if len(data) > self.limits.max_message_bytes:
            return self._error(ProtocolError(
                f"binary message of {len(data)} bytes is over the limit of {self.limits.max_message_bytes} bytes",
                code=ErrorCode.MESSAGE_TOO_BIG, value=len(data),
                allowed=f"at most {self.limits.max_message_bytes} bytes"), frame_id=frame_id)
        if self.state is ConnectionState.AWAIT_HELLO:
            return self._error(ProtocolError("binary frame before hello: send a hello text message first",
                                             code=ErrorCode.HELLO_EXPECTED), frame_id=frame_id)
        if bytes(data[:4]) == REFERENCE_MAGIC:
            return self._on_reference(data)
        try:
            header, body = unpack_input_header(data)
            if self.state is ConnectionState.HELLO_RECEIVED:
                raise ProtocolError("frame before ready: wait for the ready message", code=ErrorCode.NOT_READY)
            self.stats.frames_received += 1
            if not self._rate.allow():
                self.stats.frames_rate_limited += 1
                return []
        except ProtocolError as exc:
            self.stats.frames_rejected += 1
            return self._error(exc, frame_id=frame_id)
        self.stats.frames_accepted += 1
        return [Frame(header.frame_id, header.client_ts, bytes(body), self._clock())]

    def receive_decoded(self) -> bool:
        """Count one frame that arrived already decoded by another transport (a WebRTC video track): activity for
        the idle timeout and a received frame; False when it is over ``max_input_fps`` (dropped, counted as
        rate-limited) or the stream is not streaming."""
        if self.state is not ConnectionState.STREAMING:
            return False
        self._received()
        self.stats.frames_received += 1
        if not self._rate.allow():
            self.stats.frames_rate_limited += 1
            return False
        self.stats.frames_accepted += 1
        return True

    def _on_reference(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """A reference image: counted as a control message (its rate and burst); needs ``settings.ip_adapter``."""
        answers: dict[str, Any] = {}
        try:
            request_id, body = unpack_reference_header(data)
            answers["request_id"] = request_id
            if not self._control.allow():
                raise ProtocolError(
                    f"more than {self.limits.max_control_per_s:g} control messages per second (bursts of "
                    f"{self.limits.control_burst}); this reference image was ignored", code=ErrorCode.RATE_LIMITED,
                    allowed=f"at most {self.limits.max_control_per_s:g} per second")
            if self.state is ConnectionState.HELLO_RECEIVED:
                raise ProtocolError("reference image before ready: wait for the ready message",
                                    code=ErrorCode.NOT_READY)
            assert self.settings is not None
            if not self.settings.ip_adapter:
                allowed = f'"{self.limits.ip_adapter}"' if self.limits.ip_adapter else \
                    "nothing: this server offers no IP-Adapter"
                raise ProtocolError("a reference image needs settings.ip_adapter (an update choosing the server's "
                                    "IP-Adapter) first", code=ErrorCode.NOT_ALLOWED, field="settings.ip_adapter",
                                    value="", allowed=allowed)
        except ProtocolError as exc:
            return self._error(exc, **answers)
        return [ReferenceUpload(request_id, bytes(body))]

    def reference_decoded(self, upload: ReferenceUpload, pixels: Any) -> list[Event]:
        """``upload`` decoded to uint8 ``[H, W, 3]``: the :class:`Update` that sets it as the reference image."""
        if self.state is ConnectionState.CLOSED or self.settings is None:
            return []
        previous = self.settings
        try:
            image = ReferenceImage.from_pixels(pixels)
        except ConfigError as error:
            return self._error(ProtocolError(str(error), code=ErrorCode.INVALID_VALUE, field="reference_image"),
                               request_id=upload.request_id)
        self.settings = StreamSettings(previous.stream, replace(previous.prompt, reference_image=image),
                                       previous.output, previous.ip_adapter)
        self.settings_version = (self.settings_version + 1) % SETTINGS_VERSIONS
        self.stats.updates += 1
        ack = {"type": "ack", "settings": self.settings.to_json(), "settings_version": self.settings_version,
               "request_id": upload.request_id}
        return [Update(upload.request_id, {"reference_image": image}, self.settings, previous, dump_json(ack),
                       self.settings_version)]

    def reference_rejected(self, upload: ReferenceUpload, error: ImageError | ProtocolError) -> list[Event]:
        """``upload`` failed to decode in the worker (counts against the error budget)."""
        if self.state is ConnectionState.CLOSED:
            return []
        return self._error(error, request_id=upload.request_id)

    def check_timeouts(self) -> list[Event]:
        """Close when the hello is late or the connection idle; call when :meth:`next_deadline` has passed."""
        now = self._clock()
        if self.state is ConnectionState.AWAIT_HELLO and now - self._opened_at >= self.limits.hello_timeout_s:
            return self.close(ErrorCode.HELLO_TIMEOUT, f"no hello within {self.limits.hello_timeout_s:g} s")
        if self.state is ConnectionState.STREAMING and now - self._last_activity >= self.limits.idle_timeout_s:
            return self.close(ErrorCode.IDLE_TIMEOUT, f"nothing received for {self.limits.idle_timeout_s:g} s")
        return []

    def next_deadline(self) -> float | None:
        """When (on ``clock``) :meth:`check_timeouts` may close the connection; None when no timer runs."""
        if self.state is ConnectionState.AWAIT_HELLO:
            return self._opened_at + self.limits.hello_timeout_s
        if self.state is ConnectionState.STREAMING:
            return self._last_activity + self.limits.idle_timeout_s
        return None

    # -- decisions of the server ------------------------------------------------------------------------------

    def accept(self, stream_id: str, view_token: str | None = None) -> list[Event]:
        """Admit the stream announced by :class:`Hello`: returns ``[Send(ready)]``; frames may flow from now on."""
        if self.state is not ConnectionState.HELLO_RECEIVED or self.settings is None:
            raise StreamDiffError(f"accept() needs a connection in state hello_received, not {self.state.value}")
        self.state, self.stream_id = ConnectionState.STREAMING, stream_id
        self._last_activity = self._clock()
        ready: dict[str, Any] = {"type": "ready", "version": PROTOCOL_VERSION, "stream_id": stream_id,
                                 "settings": self.settings.to_json(), "settings_version": self.settings_version,
                                 "limits": self.limits.to_json()}
        if view_token is not None:
            ready["view"] = {"token": view_token, "url": f"{VIEW_PAGE_PATH}?view={view_token}",
                             "socket": f"{VIEW_SOCKET_PREFIX}{view_token}"}
        return [Send(dump_json(ready))]

    def close(self, code: ErrorCode, message: str) -> list[Event]:
        """End the connection for a server-side reason (server_full, shutting_down, internal_error,
        forbidden_origin…): ``[Send(error), Close]``; ``[]`` if already closed."""
        if self.state is ConnectionState.CLOSED:
            return []
        return self._error(ProtocolError(message, code=code), fatal=True)

    def refuse(self, error: ConfigError) -> list[Event]:
        """The engine cannot run the hello's settings (``engine.check_settings`` raised): ``[Send(error), Close]``."""
        if self.state is not ConnectionState.HELLO_RECEIVED or self.settings is None:
            raise StreamDiffError(f"refuse() needs a connection in state hello_received, not {self.state.value}")
        return self._error(engine_refusal(error, SETTING_FIELDS, self.settings), fatal=True)

    def update_refused(self, update: Update, error: ConfigError) -> list[Event]:
        """The engine refused ``update`` (``stream.update`` raised): its settings are undone; returns the error
        (naming the field) that answers the update, which costs one unit of the error budget."""
        if self.state is ConnectionState.CLOSED:
            return []
        self.settings = update.previous
        self.settings_version = (update.settings_version - 1) % SETTINGS_VERSIONS
        answers = {} if update.request_id is None else {"request_id": update.request_id}
        return self._error(engine_refusal(error, tuple(update.changes) or SETTING_FIELDS, update.settings),
                           **answers)

    def frame_rejected(self, frame: Frame, error: ImageError | ProtocolError) -> list[Event]:
        """Report that ``frame`` failed to decode in the worker (counts against the error budget)."""
        if self.state is ConnectionState.CLOSED:
            return []
        self.stats.frames_rejected += 1
        return self._error(error, frame_id=frame.frame_id)

    def connection_lost(self) -> None:
        """The socket is gone (closed by the peer or the network): nothing more will be sent."""
        self.state = ConnectionState.CLOSED

    # -- output -------------------------------------------------------------------------------------------------

    def output_frame(self, frame_id: int, client_ts: float, body: bytes, format: ImageFormat,
                     timings: ServerTimings | None = None, settings_version: int = 0, *, sent: bool = True) -> bytes:
        """The binary message carrying an encoded output frame for input ``frame_id`` (same bytes for viewers);
        ``settings_version``: that of the ready or ack whose settings made it. ``sent``: it goes to this
        connection's client (counted in ``frames_out``); False when only viewers get it."""
        if sent:
            self.output_sent()
        header = OutputHeader(frame_id, client_ts, format, timings or ServerTimings(), settings_version)
        return pack_output_frame(header, body)

    def output_sent(self) -> None:
        """Count one output frame sent to this connection's client by another way than :meth:`output_frame`
        (a WebRTC video track)."""
        self.stats.frames_out += 1

    def stats_message(self, **extra: int) -> str:
        """A ``stats`` text message with this connection's counters and the server's ``extra`` ones."""
        s = self.stats
        counters = {"frames_received": s.frames_received, "frames_accepted": s.frames_accepted,
                    "frames_rate_limited": s.frames_rate_limited, "frames_rejected": s.frames_rejected,
                    "frames_out": s.frames_out, "errors": s.errors, **extra}
        return dump_json({"type": "stats", **counters})

    # -- internals ----------------------------------------------------------------------------------------------

    def _received(self) -> None:
        self.stats.messages += 1
        self._last_activity = self._clock()

    def _on_hello(self, message: dict[str, Any]) -> list[Event]:
        _known_fields(message, ("type", "version", "token", "settings", "client", "view_token"))
        if "version" not in message:
            raise ProtocolError("hello has no 'version'", code=ErrorCode.MISSING_FIELD, field="version",
                                allowed=str(PROTOCOL_VERSION))
        version = message["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ProtocolError("hello 'version' must be an integer", code=ErrorCode.INVALID_VALUE, field="version",
                                value=version, allowed=str(PROTOCOL_VERSION))
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {shorten(str(version), 20)} is not supported; this server speaks "
                                f"version {PROTOCOL_VERSION}", code=ErrorCode.UNSUPPORTED_VERSION, field="version",
                                value=version, allowed=str(PROTOCOL_VERSION))
        if self._token is not None:  # the token's value is never echoed, logged or kept
            token = message.get("token")
            if not isinstance(token, str):
                raise ProtocolError("this server needs a token: put it in the hello's 'token' field",
                                    code=ErrorCode.UNAUTHORIZED, field="token")
            if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token):
                raise ProtocolError("the token is wrong", code=ErrorCode.UNAUTHORIZED, field="token")
        client = message.get("client")
        if client is not None and (not isinstance(client, str) or len(client) > MAX_CLIENT_NAME_CHARS):
            raise ProtocolError(f"hello 'client' must be a string of at most {MAX_CLIENT_NAME_CHARS} characters",
                                code=ErrorCode.INVALID_VALUE, field="client", value=client,
                                allowed=f"a string of at most {MAX_CLIENT_NAME_CHARS} characters")
        view_token = message.get("view_token")
        if view_token is not None and not (isinstance(view_token, str) and _VIEW_TOKEN.fullmatch(view_token)):
            raise ProtocolError("hello 'view_token' must be 16 to 64 characters from A-Z a-z 0-9 _ -",
                                code=ErrorCode.INVALID_VALUE, field="view_token", allowed="[A-Za-z0-9_-]{16,64}")
        settings = apply_settings(self.defaults, message.get("settings", {}), self.limits)
        self.settings = settings
        self.state = ConnectionState.HELLO_RECEIVED
        return [Hello(settings, client, view_token)]

    def _on_update(self, message: dict[str, Any]) -> list[Event]:
        _known_fields(message, ("type", "request_id", "settings"))
        request_id = _request_id(message.get("request_id"))
        if "request_id" in message and request_id is None:  # the error still echoes it as received: matchable
            raise ProtocolError(f"request_id must be an integer in [0, 2**53) or a string of at most "
                                f"{MAX_REQUEST_ID_CHARS} characters", code=ErrorCode.INVALID_VALUE,
                                field="request_id", value=message["request_id"],
                                allowed=f"an integer in [0, 2**53) or a string of at most {MAX_REQUEST_ID_CHARS} "
                                        "characters")
        if "settings" not in message:
            raise ProtocolError("update has no 'settings'", code=ErrorCode.MISSING_FIELD, field="settings")
        assert self.settings is not None
        previous = self.settings
        settings = apply_settings(previous, message["settings"], self.limits)
        rebuilt = reshaped(previous, settings)
        if rebuilt and not self._reshape.allow():
            raise ProtocolError(
                f"more than {self.limits.max_reshape_per_s:g} updates per second rebuild the stream (bursts of "
                f"{self.limits.reshape_burst}); this one changed {rebuilt} and was ignored",
                code=ErrorCode.RATE_LIMITED, field=f"settings.{rebuilt}",
                allowed=f"at most {self.limits.max_reshape_per_s:g} per second")
        self.settings = settings
        self.settings_version = (self.settings_version + 1) % SETTINGS_VERSIONS
        self.stats.updates += 1
        ack: dict[str, Any] = {"type": "ack", "settings": self.settings.to_json(),
                               "settings_version": self.settings_version}
        if request_id is not None:
            ack["request_id"] = request_id
        changes = engine_changes(previous, self.settings)
        return [Update(request_id, changes, self.settings, previous, dump_json(ack), self.settings_version)]

    def _error(self, exc: ProtocolError, *, fatal: bool = False, frame_id: int | None = None,
               **answers: Any) -> list[Event]:
        """The error message answering ``exc`` (``answers``: the ``request_id`` of the text message it answers, as
        received, when it had one), then the close when fatal or when it spends the last of the error budget."""
        code = _error_code(exc)
        self.stats.errors += 1
        self.stats.errors_by_code[code.value] = self.stats.errors_by_code.get(code.value, 0) + 1
        fatal = fatal or code.always_fatal or self.state is ConnectionState.AWAIT_HELLO
        events: list[Event] = [Send(error_message(
            code, str(exc), fatal=fatal, field=exc.field, value=exc.value, has_value=exc.has_value,
            allowed=exc.allowed, frame_id=frame_id, **answers))]
        if fatal:
            return events + self._closed(code, str(exc))
        if not self._budget.spend():
            code = ErrorCode.ERROR_BUDGET_EXHAUSTED
            text = (f"more than {self.limits.max_errors} errors within {self.limits.error_window_s:g} s; "
                    "closing the connection")
            self.stats.errors += 1
            self.stats.errors_by_code[code.value] = self.stats.errors_by_code.get(code.value, 0) + 1
            events.append(Send(error_message(code, text, fatal=True)))
            events += self._closed(code, text)
        return events

    def _closed(self, code: ErrorCode, text: str) -> list[Event]:
        self.state = ConnectionState.CLOSED
        return [Close(code.close_code, close_reason(f"{code.value}: {text}"), code)]


def _known_fields(message: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in message:
        if key not in known:
            raise ProtocolError(f"{message['type']} message has unknown field {shorten(key, 40)!r}; allowed: "
                                f"{', '.join(known)}", code=ErrorCode.UNKNOWN_FIELD, field=shorten(key, 40),
                                allowed=", ".join(known))


def _request_id(value: Any) -> RequestId | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53:
        return value
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS and is_valid_unicode(value):
        return value
    return None


def _error_code(exc: ProtocolError) -> ErrorCode:
    try:
        return ErrorCode(exc.code)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR
