"""streamdiff.protocol.session: the ServerConnection state machine, every path, then fuzzed with Hypothesis."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import FakeClock, closed_with, frame_message, pattern, save, streaming
from fuzz_messages import (  # noqa: F401 - the generators live there (shared with the live fuzz)
    _BATCH,
    _CHARS,
    _FUZZ,
    _KEYS,
    _POOL,
    _SEED_BODIES,
    _SEED_TEXTS,
    _VALID_FRAMES,
    _binary,
    _binary_batches,
    _json,
    _json_scalars,
    _mutate_bytes,
    _mutate_text,
    _mutated_text,
    _setting_values,
    _settings_objects,
    _structured,
    _text_batches,
    _texts,
)

from streamdiff.config import CfgMode
from streamdiff.errors import ConfigError, ImageError, StreamDiffError
from streamdiff.protocol import session
from streamdiff.protocol.client import ClientConnection
from streamdiff.protocol.images import ImageFormat, decode
from streamdiff.protocol.limits import ServerLimits
from streamdiff.protocol.session import (
    Close,
    ConnectionState,
    Frame,
    Hello,
    Send,
    ServerConnection,
    Update,
)
from streamdiff.protocol.settings import SETTING_FIELDS, StreamSettings, check_caps
from streamdiff.protocol.wire import CloseCode, ErrorCode, ServerTimings, unpack_output_frame

HELLO = {"type": "hello", "version": 1}


def _hello(conn: ServerConnection, **fields: Any) -> list:
    return conn.receive_text(json.dumps({**HELLO, **fields}))


def _error(events: list, code: ErrorCode) -> dict[str, Any]:
    """Assert ``events`` are one non-fatal error message with ``code``; returns it."""
    assert len(events) == 1 and isinstance(events[0], Send), events
    message = json.loads(events[0].data)
    assert (message["type"], message["code"], message["fatal"]) == ("error", code.value, False)
    return message


# -- hello -----------------------------------------------------------------------------------------------------------


def test_hello_then_accept_sends_ready(clock: FakeClock) -> None:
    conn = ServerConnection(clock=clock)
    assert conn.state is ConnectionState.AWAIT_HELLO
    events = _hello(conn, client="test/1", settings={"width": 256, "height": 256, "prompt": "a cat", "strength": 0.6})
    assert len(events) == 1 and isinstance(events[0], Hello)
    hello = events[0]
    assert hello.client == "test/1" and hello.view_token is None
    assert (hello.settings.stream.width, hello.settings.prompt.prompt) == (256, "a cat")
    assert conn.state is ConnectionState.HELLO_RECEIVED and conn.settings == hello.settings
    [send] = conn.accept("s-1", "v" * 22)
    ready = json.loads(send.data)
    assert ready == {"type": "ready", "version": 1, "stream_id": "s-1", "settings": hello.settings.to_json(),
                     "settings_version": 0, "limits": ServerLimits().to_json(),
                     "view": {"token": "v" * 22, "url": "/view.html?view=" + "v" * 22, "socket": "/ws/view/" + "v" * 22}}
    assert conn.state is ConnectionState.STREAMING and conn.stream_id == "s-1"


def test_hello_without_settings_uses_the_servers_defaults() -> None:
    defaults = StreamSettings().__class__(prompt=StreamSettings().prompt.__class__(prompt="house style"))
    conn = ServerConnection(defaults=defaults)
    [hello] = _hello(conn)
    assert hello.settings == defaults


def test_defaults_must_pass_the_limits() -> None:
    with pytest.raises(StreamDiffError, match="defaults.width=512 is not allowed by this server"):
        ServerConnection(ServerLimits(max_width=256))


def test_hello_may_ask_for_a_view_token() -> None:
    [hello] = _hello(ServerConnection(), view_token="A" * 16)
    assert hello.view_token == "A" * 16
    for bad in ("short", "x" * 65, "has space in it!!", 12345678901234567):
        message = closed_with(_hello(ServerConnection(), view_token=bad), ErrorCode.INVALID_VALUE, 1008)
        assert message["field"] == "view_token"


@pytest.mark.parametrize("text,code,close,message", [
    ("not json", ErrorCode.BAD_JSON, 1007, "message is not valid JSON: Expecting value"),
    ("[]", ErrorCode.BAD_JSON, 1007, "message is a JSON array, not an object"),
    ('{"version": 1}', ErrorCode.MISSING_FIELD, 1002, "message has no 'type'"),
    ('{"type": "hello"}', ErrorCode.MISSING_FIELD, 1002, "hello has no 'version'"),
    ('{"type": "hello", "version": "1"}', ErrorCode.INVALID_VALUE, 1008, "hello 'version' must be an integer"),
    ('{"type": "hello", "version": true}', ErrorCode.INVALID_VALUE, 1008, "hello 'version' must be an integer"),
    ('{"type": "hello", "version": 2}', ErrorCode.UNSUPPORTED_VERSION, 1002,
     "protocol version 2 is not supported; this server speaks version 1"),
    ('{"type": "update", "settings": {}}', ErrorCode.HELLO_EXPECTED, 1002,
     "the first message must be a hello, got 'update'"),
    ('{"type": "subscribe"}', ErrorCode.UNKNOWN_TYPE, 1002,
     "message type 'subscribe' is unknown; allowed: hello, update"),
    ('{"type": 7}', ErrorCode.UNKNOWN_TYPE, 1002, "message type '7' is unknown; allowed: hello, update"),
    ('{"type": "hello", "version": 1, "tokn": "x"}', ErrorCode.UNKNOWN_FIELD, 1008,
     "hello message has unknown field 'tokn'; allowed: type, version, token, settings, client, view_token"),
    ('{"type": "hello", "version": 1, "client": 5}', ErrorCode.INVALID_VALUE, 1008,
     "hello 'client' must be a string of at most 100 characters"),
    ('{"type": "hello", "version": 1, "settings": {"width": "big"}}', ErrorCode.INVALID_VALUE, 1008,
     "settings.width must be an integer, got string 'big'"),
    ('{"type": "hello", "version": 1, "settings": {"cfg_type": "full"}}', ErrorCode.NOT_ALLOWED, 1008,
     "settings.cfg_type='full' is not allowed by this server; allowed: none, self, initialize"),
    ('{"type": "hello", "version": 1, "settings": {"colour": 1}}', ErrorCode.UNKNOWN_FIELD, 1008,
     "settings.colour is not a known setting; allowed: width, height"),
])
def test_bad_hello_is_answered_by_an_error_then_close(text: str, code: ErrorCode, close: int, message: str) -> None:
    conn = ServerConnection()
    error = closed_with(conn.receive_text(text), code, close)
    assert error["message"].startswith(message)
    assert conn.state is ConnectionState.CLOSED
    assert conn.receive_text(json.dumps(HELLO)) == [] and conn.receive_bytes(b"x") == []


def test_bad_hello_error_names_field_value_and_allowed() -> None:
    error = closed_with(_hello(ServerConnection(), settings={"width": 2000}), ErrorCode.NOT_ALLOWED, 1008)
    assert (error["field"], error["value"], error["allowed"]) == ("settings.width", 2000, "a multiple of 8 in [8, 1024]")


def test_binary_before_hello_is_fatal() -> None:
    conn = ServerConnection()
    error = closed_with(conn.receive_bytes(frame_message(b"x")), ErrorCode.HELLO_EXPECTED, 1002)
    assert error["message"] == "binary frame before hello: send a hello text message first"


def test_hello_timeout(clock: FakeClock) -> None:
    conn = ServerConnection(clock=clock)
    assert conn.next_deadline() == clock.now + 10.0
    clock.advance(9.99)
    assert conn.check_timeouts() == []
    clock.advance(0.01)
    error = closed_with(conn.check_timeouts(), ErrorCode.HELLO_TIMEOUT, 1008)
    assert error["message"] == "no hello within 10 s"
    assert conn.next_deadline() is None and conn.check_timeouts() == []


def test_late_hello_after_hello_received_has_no_timer(clock: FakeClock) -> None:
    conn = ServerConnection(clock=clock)
    _hello(conn)
    assert conn.next_deadline() is None
    clock.advance(100)
    assert conn.check_timeouts() == []


# -- token -----------------------------------------------------------------------------------------------------------


def test_token_missing_wrong_or_not_a_string_is_unauthorized() -> None:
    for fields, text in [({}, "this server needs a token: put it in the hello's 'token' field"),
                         ({"token": "guess"}, "the token is wrong"),
                         ({"token": ["s3cret-token"]}, "this server needs a token: put it in the hello's 'token' field")]:
        conn = ServerConnection(token="s3cret-token")
        events = _hello(conn, **fields)
        error = closed_with(events, ErrorCode.UNAUTHORIZED, 1008)
        assert error["message"] == text and error["field"] == "token" and "value" not in error
        assert "s3cret" not in repr(events)


def test_right_token_is_accepted_and_never_echoed_or_shown() -> None:
    conn = ServerConnection(token="s3cret-token")
    events = _hello(conn, token="s3cret-token")
    assert isinstance(events[0], Hello)
    events += conn.accept("s", None)
    assert "s3cret" not in repr(events) + repr(conn) + repr(vars(conn.stats))
    assert "s3cret" not in repr(conn.__dict__.get("settings"))


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = session.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(session.hmac, "compare_digest", spy)
    _hello(ServerConnection(token="tok\u00e9n"), token="tok\u00e9n")
    _hello(ServerConnection(token="tok\u00e9n"), token="\ud800")
    assert calls == [("tok\u00e9n".encode(), "tok\u00e9n".encode()), (b"\xed\xa0\x80", "tok\u00e9n".encode())]


def test_server_without_token_ignores_one() -> None:
    assert isinstance(_hello(ServerConnection(), token="anything")[0], Hello)


# -- states ----------------------------------------------------------------------------------------------------------


def test_messages_before_ready_are_not_ready_errors(jpeg: bytes) -> None:
    conn = ServerConnection()
    _hello(conn)
    error = _error(conn.receive_text('{"type": "update", "request_id": 3, "settings": {}}'), ErrorCode.NOT_READY)
    assert error["message"] == "update before ready: wait for the ready message" and error["request_id"] == 3
    error = _error(conn.receive_bytes(frame_message(jpeg, frame_id=9)), ErrorCode.NOT_READY)
    assert error["frame_id"] == 9
    assert conn.state is ConnectionState.HELLO_RECEIVED


def test_second_hello_is_an_error_not_a_reset() -> None:
    conn = streaming()
    error = _error(_hello(conn, settings={"width": 64}), ErrorCode.UNEXPECTED_HELLO)
    assert error["message"] == "hello was already received; send update to change settings"
    assert conn.settings.stream.width == 512 and conn.state is ConnectionState.STREAMING


def test_accept_in_the_wrong_state_is_a_programming_error() -> None:
    with pytest.raises(StreamDiffError, match="accept\\(\\) needs a connection in state hello_received, not await"):
        ServerConnection().accept("s")
    with pytest.raises(StreamDiffError, match="not streaming"):
        streaming().accept("s")


@pytest.mark.parametrize("code,close", [(ErrorCode.SERVER_FULL, 1013), (ErrorCode.SHUTTING_DOWN, 1001),
                                        (ErrorCode.INTERNAL_ERROR, 1011), (ErrorCode.FORBIDDEN_ORIGIN, 1008)])
def test_server_side_close(code: ErrorCode, close: int) -> None:
    conn = ServerConnection()
    _hello(conn)
    error = closed_with(conn.close(code, "4 streams are running; try again later"), code, close)
    assert error["message"] == "4 streams are running; try again later"
    assert conn.state is ConnectionState.CLOSED and conn.close(code, "again") == []


def test_close_reason_is_cut_to_fit_a_close_frame() -> None:
    [_, close] = streaming().close(ErrorCode.INTERNAL_ERROR, "x" * 500)
    assert len(close.reason.encode()) <= 123 and close.reason.endswith("...")


def test_connection_lost() -> None:
    conn = streaming()
    conn.connection_lost()
    assert conn.state is ConnectionState.CLOSED and conn.receive_text("{}") == [] and conn.close(
        ErrorCode.SHUTTING_DOWN, "bye") == []


def test_idle_timeout_and_activity(clock: FakeClock, jpeg: bytes) -> None:
    conn = streaming(clock)
    clock.advance(59)
    conn.receive_bytes(frame_message(jpeg))  # activity moves the deadline
    assert conn.next_deadline() == clock.now + 60
    clock.advance(59.9)
    assert conn.check_timeouts() == []
    clock.advance(0.1)
    error = closed_with(conn.check_timeouts(), ErrorCode.IDLE_TIMEOUT, 1001)
    assert error["message"] == "nothing received for 60 s"


# -- update -------------------------------------------------------------------------------------------------------------


def test_update_yields_engine_changes_and_an_ack() -> None:
    conn = streaming()
    before = conn.settings
    events = conn.receive_text(json.dumps({"type": "update", "request_id": 4,
                                           "settings": {"prompt": "ink", "guidance_scale": 1.5, "seed": 3}}))
    (update,) = events
    assert isinstance(update, Update) and update.request_id == 4 and update.previous == before
    assert dict(update.changes) == {"prompt": "ink", "guidance_scale": 1.5, "seed": 3}
    assert conn.settings == update.settings and conn.stats.updates == 1
    assert json.loads(update.ack) == {"type": "ack", "settings": update.settings.to_json(), "settings_version": 1,
                                      "request_id": 4}


def test_each_ack_counts_the_settings_version_and_a_refusal_takes_it_back() -> None:
    """ready has settings_version 0; each ack one more (modulo 2**16); an update refused, by the protocol or by the
    engine, makes no version: the next ack has the number it would have had."""
    conn = streaming()
    assert conn.settings_version == 0
    acks = [json.loads(conn.receive_text(json.dumps({"type": "update", "settings": s}))[0].ack)["settings_version"]
            for s in ({}, {"seed": 5}, {"output": {"format": "webp"}})]
    assert acks == [1, 2, 3]
    _error(conn.receive_text('{"type": "update", "settings": {"seed": -1}}'), ErrorCode.INVALID_VALUE)
    (update,) = conn.receive_text('{"type": "update", "settings": {"seed": 6}}')
    assert update.settings_version == 4
    conn.update_refused(update, ConfigError("seed 6 is not allowed here", field="seed"))
    (update,) = conn.receive_text('{"type": "update", "settings": {"seed": 7}}')
    assert (update.settings_version, json.loads(update.ack)["settings_version"]) == (4, 4)
    conn.settings_version = 2**16 - 1
    (update,) = conn.receive_text('{"type": "update", "settings": {}}')
    assert json.loads(update.ack)["settings_version"] == 0  # it wraps, as frame ids do


def test_output_frames_carry_their_settings_version() -> None:
    conn = streaming()
    header, _ = unpack_output_frame(conn.output_frame(3, 1.5, b"IMG", ImageFormat.JPEG, settings_version=513))
    assert (header.frame_id, header.settings_version) == (3, 513)
    assert conn.output_frame(3, 1.5, b"", ImageFormat.JPEG, settings_version=513)[6:8] == b"\x02\x01"


def test_update_request_id_may_be_a_string_or_absent() -> None:
    conn = streaming()
    assert json.loads(conn.receive_text('{"type": "update", "request_id": "a-1", "settings": {}}')[0].ack)[
        "request_id"] == "a-1"
    (update,) = conn.receive_text('{"type": "update", "settings": {"delta": 0.5}}')
    assert update.request_id is None and "request_id" not in json.loads(update.ack)


def test_update_refused_by_the_engine_is_undone_and_answered_with_the_field() -> None:
    conn = streaming()
    before = conn.settings
    (update,) = conn.receive_text(json.dumps({"type": "update", "request_id": 9, "settings": {"width": 520}}))
    assert conn.settings.stream.width == 520
    events = conn.update_refused(update, ConfigError("width=520 is not a multiple of the VAE factor 16"))
    error = _error(events, ErrorCode.NOT_ALLOWED)
    assert (error["field"], error["request_id"], error["fatal"]) == ("settings.width", 9, False)
    assert "width=520 is not a multiple of the VAE factor 16" in error["message"]
    assert conn.settings == before and conn.state is ConnectionState.STREAMING


def test_hello_refused_by_the_engine_closes_with_1008_naming_the_field() -> None:
    conn = ServerConnection()
    (hello,) = conn.receive_text(json.dumps({"type": "hello", "version": 1, "settings": {"t_index_list": [1, 2, 3]}}))
    assert isinstance(hello, Hello)
    error = closed_with(conn.refuse(ConfigError("the stream needs 3 U-Net rows per call, more than the engine's "
                                                "max_batch_rows=2; use fewer steps, a smaller frame_buffer_size or "
                                                "another cfg_type")), ErrorCode.NOT_ALLOWED, 1008)
    assert error["field"] == "settings" and "max_batch_rows=2" in error["message"]
    with pytest.raises(StreamDiffError, match="hello_received"):
        conn.refuse(ConfigError("again"))


@pytest.mark.parametrize("request_id", [True, -1, 2**53, 10**40, 1.5, -0.0, "x" * 65, "y" * 5000, None, {"a": [1]},
                                        [], "\ud800"])
def test_bad_request_ids_are_refused_and_echoed_exactly(request_id) -> None:
    """An invalid request_id is an error that carries it as received: the client matches its answer all the same."""
    text = json.dumps({"type": "update", "request_id": request_id, "settings": {}})
    error = _error(streaming().receive_text(text), ErrorCode.INVALID_VALUE)
    assert error["field"] == "request_id" and error["allowed"].startswith("an integer in [0, 2**53)")
    assert "request_id" in error and error["request_id"] == request_id
    assert json.dumps(error["request_id"]) == json.dumps(request_id)  # 1.5 is not 1, -0.0 stays -0.0


def test_any_error_answering_a_text_message_echoes_its_request_id() -> None:
    conn = streaming(limits=ServerLimits(max_control_per_s=0.001, control_burst=2))  # hello, 1 update
    error = _error(conn.receive_text('{"type": "update", "request_id": [7], "settings": {}, "force": 1}'),
                   ErrorCode.UNKNOWN_FIELD)
    assert error["request_id"] == [7]
    error = _error(conn.receive_text('{"type": "update", "request_id": 2.5, "settings": {}}'), ErrorCode.RATE_LIMITED)
    assert error["request_id"] == 2.5
    error = _error(conn.receive_text('{"type": "update", "settings": {}}'), ErrorCode.RATE_LIMITED)
    assert "request_id" not in error


@pytest.mark.parametrize("settings_json,code,field,value", [
    ({"width": 12}, ErrorCode.NOT_ALLOWED, "settings.width", 12),
    ({"width": 4}, ErrorCode.INVALID_VALUE, "settings.width", 4),
    ({"guidance_scale": "high"}, ErrorCode.INVALID_VALUE, "settings.guidance_scale", "high"),
    ({"seed": 1.5}, ErrorCode.INVALID_VALUE, "settings.seed", 1.5),
    ({"t_index_list": [1, [2]]}, ErrorCode.INVALID_VALUE, "settings.t_index_list", "<list of 2 items>"),
    ({"prompt": {"text": "x"}}, ErrorCode.INVALID_VALUE, "settings.prompt", "<object with 1 keys>"),
    ({"prompt": "y" * 5000}, ErrorCode.NOT_ALLOWED, "settings.prompt", "y" * 61 + "..."),
    ({"seed": 10**30}, ErrorCode.INVALID_VALUE, "settings.seed", "<integer of 100 bits>"),
    ({"sharpness": 1}, ErrorCode.UNKNOWN_FIELD, "settings.sharpness", None),
])
def test_invalid_update_names_field_and_value_and_keeps_settings(settings_json, code, field, value) -> None:
    conn = streaming()
    before = conn.settings
    error = _error(conn.receive_text(json.dumps({"type": "update", "request_id": 8, "settings": settings_json})), code)
    assert (error["field"], error["request_id"]) == (field, 8)
    assert error.get("value") == value
    assert conn.settings == before and conn.state is ConnectionState.STREAMING
    assert conn.receive_text('{"type": "update", "settings": {"seed": 5}}')[0].settings.prompt.seed == 5


def test_update_message_fields() -> None:
    conn = streaming()
    error = _error(conn.receive_text('{"type": "update", "request_id": 1}'), ErrorCode.MISSING_FIELD)
    assert (error["message"], error["field"], error["request_id"]) == ("update has no 'settings'", "settings", 1)
    error = _error(conn.receive_text('{"type": "update", "settings": {}, "force": true}'), ErrorCode.UNKNOWN_FIELD)
    assert error["message"] == "update message has unknown field 'force'; allowed: type, request_id, settings"
    error = _error(conn.receive_text('{"type": "update", "settings": 3}'), ErrorCode.INVALID_VALUE)
    assert (error["field"], error["value"]) == ("settings", 3)


def test_bad_json_while_streaming_is_not_fatal() -> None:
    conn = streaming()
    _error(conn.receive_text('{"type": "update", "settings": {"seed": NaN}}'), ErrorCode.BAD_JSON)
    _error(conn.receive_text("\x00\x01"), ErrorCode.BAD_JSON)
    assert conn.state is ConnectionState.STREAMING


def test_oversized_messages_close_with_1009(jpeg: bytes) -> None:
    limits = ServerLimits(max_message_bytes=4096, max_text_bytes=1024)
    error = closed_with(streaming(limits=limits).receive_text(" " * 1025), ErrorCode.MESSAGE_TOO_BIG, 1009)
    assert (error["message"], error["value"]) == ("text message of 1025 bytes is over the limit of 1024 bytes", 1025)
    assert streaming(limits=limits).receive_text("\u00e9" * 512 + "{}")[0].data  # 1026 bytes in UTF-8
    error = closed_with(streaming(limits=limits).receive_bytes(b"\0" * 4097), ErrorCode.MESSAGE_TOO_BIG, 1009)
    assert error["message"] == "binary message of 4097 bytes is over the limit of 4096 bytes"
    closed_with(ServerConnection(limits).receive_text(" " * 2000), ErrorCode.MESSAGE_TOO_BIG, 1009)


# -- frames -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_good_frame_becomes_a_frame_event(clock: FakeClock, fmt: str) -> None:
    conn = streaming(clock)
    body = save(pattern(48, 32), fmt)  # not the stream's 512x512: accepted, the engine resizes
    [frame] = conn.receive_bytes(frame_message(body, frame_id=77, client_ts=1234.25))
    assert isinstance(frame, Frame)
    assert (frame.frame_id, frame.client_ts, frame.body, frame.received_at) == (77, 1234.25, body, clock.now)
    assert decode(frame.body, conn.limits).shape == (32, 48, 3)
    assert "body" not in repr(frame)
    assert conn.stats.frames_received == conn.stats.frames_accepted == 1


@pytest.mark.parametrize("data,message,frame_id", [
    (b"", "binary message of 0 bytes is shorter than the 20-byte frame header", None),
    (b"SDFI\x01\0\0\0\0\0\0", "binary message of 11 bytes is shorter than the 20-byte frame header", None),
    (b"SDFI\x01\0\0\0\0\0\0\x2a\0", "binary message of 13 bytes is shorter than the 20-byte frame header", 42),
    (b"\xff\xd8\xff\xe0" + b"\0" * 40, "frame header magic b'\\xff\\xd8\\xff\\xe0' is not b'SDFI'", None),
    (b"SDFI\x09\0\0\0\0\0\0\x07" + b"\0" * 36, "frame header version 9 is not 1", 7),
    (b"SDFI\x01\0\x01\0\xff\xff\xff\xff" + b"\0" * 36, "frame header reserved bytes 000100 are not zero",
     2**32 - 1),
    (b"SDFI\x01\0\0\0\0\0\0\x05" + struct.pack(">d", float("nan")),
     "frame header client_ts nan is not a finite number", 5),
])
def test_bad_frame_headers_are_errors_with_the_frame_id_once_readable(data: bytes, message: str,
                                                                      frame_id: int | None) -> None:
    """A header readable as far as its frame_id (magic SDFI, 12 bytes) names the frame in its error."""
    conn = streaming()
    error = _error(conn.receive_bytes(data), ErrorCode.BAD_FRAME_HEADER)
    assert error["message"] == message and error.get("frame_id") == frame_id
    assert conn.stats.frames_rejected == 1 and conn.stats.frames_received == 0


def test_an_oversize_frame_and_a_frame_before_hello_carry_the_frame_id(clock: FakeClock) -> None:
    conn = streaming(limits=ServerLimits(max_message_bytes=64 << 10))
    events = conn.receive_bytes(frame_message(b"\0" * (64 << 10), frame_id=31))
    assert closed_with(events, ErrorCode.MESSAGE_TOO_BIG, CloseCode.MESSAGE_TOO_BIG)["frame_id"] == 31
    conn = ServerConnection(clock=clock)
    error = json.loads(conn.receive_bytes(frame_message(b"x", frame_id=8))[0].data)
    assert (error["code"], error["frame_id"]) == ("hello_expected", 8)


def _rejected(conn: ServerConnection, body: bytes, frame_id: int = 5) -> list:
    """Feed a frame with ``body``; the protocol passes it on (headers only), the worker's decode refuses it."""
    [frame] = conn.receive_bytes(frame_message(body, frame_id=frame_id))
    with pytest.raises(ImageError) as info:
        decode(frame.body, conn.limits)
    return conn.frame_rejected(frame, info.value)


@pytest.mark.parametrize("body,code,message", [
    (save(pattern(), "PNG"), ErrorCode.UNSUPPORTED_FORMAT, "PNG images are not accepted; send JPEG or WebP"),
    (save(pattern(), "GIF"), ErrorCode.UNSUPPORTED_FORMAT, "GIF images are not accepted; send JPEG or WebP"),
    (b"", ErrorCode.BAD_IMAGE, "the image body is empty; send JPEG or WebP"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", ErrorCode.BAD_IMAGE,
     "jpeg is truncated inside segment 0xe0 at byte 2 (10 bytes)"),
    (b"\xff\xd8\xff\xc0\x00\x11\x08\xea\x60\xea\x60\x03" + b"\x01\x11\x00" * 3 + b"\xff\xda\x00\x02\x00\xff\xd9",
     ErrorCode.IMAGE_TOO_LARGE, "image declares 60000x60000 = 3600000000 pixels, more than the limit of 2073600"),
])
def test_bad_frame_bodies_are_errors_with_the_frame_id(body: bytes, code: ErrorCode, message: str) -> None:
    conn = streaming()
    error = _error(_rejected(conn, body), code)
    assert (error["message"], error["frame_id"]) == (message, 5)
    assert conn.stats.frames_rejected == 1 and conn.stats.errors_by_code == {code.value: 1}


def test_format_allowlist_is_checked_by_the_decode(webp: bytes) -> None:
    conn = streaming(limits=ServerLimits(allowed_input_formats=["jpeg"]))
    error = _error(_rejected(conn, webp), ErrorCode.UNSUPPORTED_FORMAT)
    assert error["message"] == "webp images are not accepted here; allowed: jpeg"


def test_frame_rejected_after_a_failed_decode(jpeg: bytes) -> None:
    conn = streaming()
    error = _error(_rejected(conn, jpeg[: len(jpeg) // 2], frame_id=3), ErrorCode.BAD_IMAGE)
    assert error["frame_id"] == 3 and error["message"].startswith("jpeg is truncated")
    assert (conn.stats.frames_accepted, conn.stats.frames_rejected) == (1, 1)


def test_output_frame_echoes_id_and_timestamp() -> None:
    conn = streaming()
    data = conn.output_frame(12, 99.5, b"JPEGBYTES", ImageFormat.JPEG, ServerTimings(1, 2, 3, 4, 10))
    header, body = unpack_output_frame(data)
    assert (header.frame_id, header.client_ts, header.format, body) == (12, 99.5, ImageFormat.JPEG, b"JPEGBYTES")
    assert header.timings == ServerTimings(1, 2, 3, 4, 10) and conn.stats.frames_out == 1
    stats = json.loads(conn.stats_message(frames_dropped=2))
    assert stats["type"] == "stats" and stats["frames_out"] == 1 and stats["frames_dropped"] == 2


# -- rate limit and error budget ----------------------------------------------------------------------------------


def test_frames_over_the_rate_are_dropped_and_counted(clock: FakeClock, jpeg: bytes) -> None:
    conn = streaming(clock, ServerLimits(max_input_fps=10, input_burst_frames=2))
    events = [conn.receive_bytes(frame_message(jpeg, frame_id=i)) for i in range(5)]
    assert [len(e) for e in events] == [1, 1, 0, 0, 0]  # dropped silently: no error, no budget spent
    assert (conn.stats.frames_received, conn.stats.frames_accepted, conn.stats.frames_rate_limited) == (5, 2, 3)
    accepted = 0
    for i in range(100):  # a client at 20 fps gets 10 fps through
        clock.advance(0.05)
        accepted += len(conn.receive_bytes(frame_message(jpeg, frame_id=i)))
    assert 49 <= accepted <= 51 and conn.state is ConnectionState.STREAMING and conn.stats.errors == 0


def test_decoded_frames_share_the_rate_limit_and_keep_the_connection_alive(clock: FakeClock) -> None:
    """Frames decoded by another transport (a WebRTC video track): counted, rate-limited like binary frames, and
    activity for the idle timeout; none before ready."""
    conn = ServerConnection(ServerLimits(max_input_fps=10, input_burst_frames=2, idle_timeout_s=5), clock=clock)
    assert conn.receive_decoded() is False and conn.stats.frames_received == 0  # awaiting hello
    conn = streaming(clock, ServerLimits(max_input_fps=10, input_burst_frames=2, idle_timeout_s=5))
    assert [conn.receive_decoded() for _ in range(4)] == [True, True, False, False]
    assert (conn.stats.frames_received, conn.stats.frames_accepted, conn.stats.frames_rate_limited) == (4, 2, 2)
    for _ in range(3):
        clock.advance(4)
        conn.receive_decoded()
        assert conn.check_timeouts() == []
    clock.advance(5)
    assert conn.check_timeouts() and conn.state is ConnectionState.CLOSED


def test_the_frame_bucket_is_exactly_as_documented(clock: FakeClock, jpeg: bytes) -> None:
    """docs/protocol.md, "Lossless clients": input_burst_frames tokens, full at ready, max_input_fps refill; each
    frame with a valid header received after ready takes one; bad headers take none (they are errors instead)."""
    conn = streaming(clock, ServerLimits(max_input_fps=4, input_burst_frames=3))
    for _ in range(5):
        _error(conn.receive_bytes(b"SDFI\x09" + b"\0" * 40), ErrorCode.BAD_FRAME_HEADER)
    assert [len(conn.receive_bytes(frame_message(jpeg, frame_id=i))) for i in range(4)] == [1, 1, 1, 0]
    clock.advance(0.24)  # 0.96 of a token
    assert len(conn.receive_bytes(frame_message(jpeg))) == 0
    clock.advance(0.25)  # 0.96 - 0 + 1.0 tokens: the refused frame took none
    assert [len(conn.receive_bytes(frame_message(jpeg))) for _ in range(2)] == [1, 0]
    clock.advance(10.0)  # full again, never above the burst
    assert [len(conn.receive_bytes(frame_message(jpeg))) for _ in range(4)] == [1, 1, 1, 0]


def test_a_steady_client_at_the_limit_is_never_dropped(clock: FakeClock, jpeg: bytes) -> None:
    conn = streaming(clock)
    for i in range(300):
        clock.advance(1 / 30 + (0.01 if i % 2 else -0.01))  # 30 fps with jitter
        assert len(conn.receive_bytes(frame_message(jpeg, frame_id=i))) == 1


def test_error_budget_closes_a_misbehaving_client(clock: FakeClock) -> None:
    conn = streaming(clock)
    for _ in range(10):
        clock.advance(0.1)
        _error(conn.receive_bytes(b"garbage" * 3), ErrorCode.BAD_FRAME_HEADER)
    events = conn.receive_text('{"type": "update", "settings": {"nope": 1}}')
    assert json.loads(events[0].data)["code"] == "unknown_field"
    error = closed_with(events[1:], ErrorCode.ERROR_BUDGET_EXHAUSTED, 1008)
    assert error["message"] == "more than 10 errors within 10 s; closing the connection"
    assert conn.state is ConnectionState.CLOSED and conn.stats.errors == 12


def test_errors_spread_out_stay_within_budget(clock: FakeClock) -> None:
    conn = streaming(clock)
    for _ in range(50):
        clock.advance(1.1)
        _error(conn.receive_bytes(b"x"), ErrorCode.BAD_FRAME_HEADER)
    assert conn.state is ConnectionState.STREAMING


# -- control messages: rate limits ----------------------------------------------------------------------------------


def _update(conn: ServerConnection, request_id: Any = None, **settings: Any) -> list:
    message: dict[str, Any] = {"type": "update", "settings": settings}
    if request_id is not None:
        message["request_id"] = request_id
    return conn.receive_text(json.dumps(message))


def test_control_messages_over_the_rate_are_rate_limited_then_closed(clock: FakeClock) -> None:
    limits = ServerLimits(max_control_per_s=5, control_burst=8)
    conn = streaming(clock, limits)  # the hello took one token
    acks = [_update(conn, i) for i in range(7)]
    assert all(isinstance(events[0], Update) for events in acks)
    error = _error(_update(conn, "r-7", prompt="x"), ErrorCode.RATE_LIMITED)
    assert (error["request_id"], error["allowed"]) == ("r-7", "at most 5 per second")
    assert "field" not in error and conn.settings.prompt.prompt != "x"  # ignored, not applied
    assert conn.stats.updates == 7 and conn.stats.errors_by_code == {"rate_limited": 1}
    for i in range(9):  # the error budget (10) runs out: a flood of valid messages is closed quickly
        _error(_update(conn, i), ErrorCode.RATE_LIMITED)
    closed_with(_update(conn, 99)[1:], ErrorCode.ERROR_BUDGET_EXHAUSTED, 1008)
    assert conn.state is ConnectionState.CLOSED and _update(conn, 100) == []


def test_control_bucket_refills_at_the_rate(clock: FakeClock) -> None:
    conn = streaming(clock, ServerLimits(max_control_per_s=4, control_burst=2))
    _update(conn)
    _error(_update(conn), ErrorCode.RATE_LIMITED)
    clock.advance(0.2)  # 0.8 of a token: still nothing
    _error(_update(conn), ErrorCode.RATE_LIMITED)
    clock.advance(0.05)
    assert isinstance(_update(conn)[0], Update)
    for _ in range(200):  # a steady client at the rate is never limited
        clock.advance(0.25)
        assert isinstance(_update(conn)[0], Update)
    assert conn.stats.errors == 2


def test_every_text_message_counts_even_invalid_ones(clock: FakeClock) -> None:
    conn = streaming(clock, ServerLimits(max_control_per_s=1, control_burst=2))
    _error(conn.receive_text('{"type": "update", "nope": 1}'), ErrorCode.UNKNOWN_FIELD)
    _error(conn.receive_text('{"type": "update", "settings": {}}'), ErrorCode.RATE_LIMITED)


def test_default_rates_fit_the_browser_page(clock: FakeClock) -> None:
    """The page debounces updates by 250 ms (web/app.js UPDATE_DELAY_MS): 4 a second, with bursts of clicks."""
    conn = streaming(clock)
    for i in range(25):  # a burst: the seed button clicked 25 times at once
        assert isinstance(_update(conn, i, seed=i)[0], Update)
    for i in range(600):  # then a minute of typing
        clock.advance(0.25)
        assert isinstance(_update(conn, i, prompt=f"p{i}")[0], Update)
    assert conn.stats.errors == 0


def test_updates_that_rebuild_the_stream_have_their_own_budget(clock: FakeClock) -> None:
    limits = ServerLimits(max_reshape_per_s=0.5, reshape_burst=2, max_steps=4, max_frame_buffer_size=2)
    conn = streaming(clock, limits, width=64, height=64)
    assert isinstance(_update(conn, 1, width=128)[0], Update)
    assert isinstance(_update(conn, 2, t_index_list=[10, 20, 30])[0], Update)
    before = conn.settings
    error = _error(_update(conn, 3, frame_buffer_size=2), ErrorCode.RATE_LIMITED)
    assert (error["field"], error["request_id"]) == ("settings.frame_buffer_size", 3)
    assert conn.settings == before  # all or nothing
    for changes in ({"prompt": "free"}, {"t_index_list": [11, 21, 31]}, {"seed": 3}, {"width": 128}):
        assert isinstance(_update(conn, **changes)[0], Update), changes  # no reshape: not counted
    clock.advance(2.0)
    (update,) = _update(conn, 4, cfg_type="none")
    assert update.changes == {"cfg_type": CfgMode.NONE}
    _error(_update(conn, 5, height=128), ErrorCode.RATE_LIMITED)


# -- errors name the field, safely ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key,shown", [(r"\udfff", r"\udfff"), (r"a\u0000b", r"a\x00b"),
                                       (r"\u00e9t\u00e9", "été")])
def test_unknown_keys_are_echoed_printable(key: str, shown: str) -> None:
    """``key`` as a JSON escape in the message; ``shown`` is the field's text, escaped where it cannot be printed."""
    for text in (f'{{"type": "update", "settings": {{}}, "{key}": 1}}',
                 f'{{"type": "update", "settings": {{"{key}": 1}}}}'):
        error = _error(streaming().receive_text(text), ErrorCode.UNKNOWN_FIELD)
        assert error["field"].endswith(shown) and error["field"].isprintable()
        error["field"].encode("utf-8")  # a strict client can print it


def test_engine_refusal_uses_the_errors_field_value_and_allowed() -> None:
    conn = streaming(width=64, height=64)
    (update,) = _update(conn, 1, width=72)
    error = _error(conn.update_refused(update, ConfigError("width=72 cannot run", field="width", value=72,
                                                           allowed="a multiple of 16")), ErrorCode.NOT_ALLOWED)
    assert (error["field"], error["value"], error["allowed"]) == ("settings.width", 72, "a multiple of 16")
    (update,) = _update(conn, 2, t_index_list=[1, 2])
    error = _error(conn.update_refused(update, ConfigError("t_index_list entry 1 is bad", field="t_index_list entry",
                                                           value=1)), ErrorCode.NOT_ALLOWED)
    assert (error["field"], error["value"], error["allowed"]) == ("settings.t_index_list", 1,
                                                                  "settings this engine runs")


def test_engine_refusal_without_field_falls_back_to_the_message_and_the_settings_value() -> None:
    conn = streaming(width=64, height=64)
    (update,) = _update(conn, 9, width=72)
    error = _error(conn.update_refused(update, ConfigError("width=72 is not a multiple of the VAE factor 16")),
                   ErrorCode.NOT_ALLOWED)
    assert (error["field"], error["value"]) == ("settings.width", 72)


# -- client and server together -----------------------------------------------------------------------------------------------


def test_client_and_server_round_trip(jpeg: bytes) -> None:
    client = ClientConnection({"prompt": "a fox", "strength": 0.4}, token="t" * 10, view_token="V" * 16,
                              clock=lambda: 2.0)
    server = ServerConnection(token="t" * 10)
    [hello] = server.receive_text(client.hello())
    assert hello.view_token == "V" * 16
    ready = client.receive_text(server.accept("s-9", hello.view_token)[0].data)
    assert ready.stream_id == "s-9" and ready.settings == server.settings and ready.view_url.endswith("V" * 16)
    [frame] = server.receive_bytes(client.frame(jpeg))
    assert (frame.frame_id, frame.client_ts) == (0, 2000.0)
    request_id, text = client.update(prompt="a wolf")
    (update,) = server.receive_text(text)
    assert client.receive_text(update.ack).settings.prompt.prompt == "a wolf" and update.request_id == request_id


# -- fuzz --------------------------------------------------------------------------------------------------------------

_SERVER_MESSAGES = {"error", "ready", "ack"}


def _check(conn: ServerConnection, before: ConnectionState, events: list) -> None:
    """The invariants every input must keep, whatever it was."""
    assert isinstance(events, list)
    if before is ConnectionState.CLOSED:
        assert events == []
    closes = [e for e in events if isinstance(e, Close)]
    assert len(closes) <= 1 and (not closes or events[-1] is closes[0])
    if closes:
        assert conn.state is ConnectionState.CLOSED and closes[0].code in set(CloseCode)
        assert len(closes[0].reason.encode("utf-8")) <= 123
    errors = []
    for event in events:
        assert isinstance(event, (Hello, Frame, Update, Send, Close))
        if isinstance(event, Send):
            assert isinstance(event.data, str) and event.data.isascii()
            message = json.loads(event.data)
            assert message["type"] in _SERVER_MESSAGES
            if message["type"] == "error":
                assert ErrorCode(message["code"]) and isinstance(message["message"], str)
                errors.append(message)
        elif isinstance(event, Frame):
            assert conn.state is ConnectionState.STREAMING and before is ConnectionState.STREAMING
            assert isinstance(event.body, bytes)
        elif isinstance(event, Update):
            assert event.settings == conn.settings
            check_caps(event.settings, conn.limits)
        elif isinstance(event, Hello):
            assert before is ConnectionState.AWAIT_HELLO and conn.state is ConnectionState.HELLO_RECEIVED
    if closes:  # a close always comes right after a fatal error message saying why
        assert errors and errors[-1]["fatal"] and isinstance(events[-2], Send)
    else:
        assert not any(m["fatal"] for m in errors)
    if conn.state in (ConnectionState.HELLO_RECEIVED, ConnectionState.STREAMING):
        check_caps(conn.settings, conn.limits)
    assert sum(conn.stats.errors_by_code.values()) == conn.stats.errors


def _feed(conn: ServerConnection, messages: list[str | bytes]) -> None:
    for message in messages:
        before = conn.state
        events = conn.receive_text(message) if isinstance(message, str) else conn.receive_bytes(message)
        _check(conn, before, events)
        if any(isinstance(e, Hello) for e in events):
            conn.accept("fuzz")
        for event in events:
            if isinstance(event, Frame):
                try:
                    decode(event.body, conn.limits)
                except ImageError as exc:
                    _check(conn, conn.state, conn.frame_rejected(event, exc))


def _connection(start_streaming: bool, token: bool) -> ServerConnection:
    if start_streaming:
        return streaming(token="tok" if token else None)
    return ServerConnection(token="tok" if token else None)


def test_fuzz_text_messages() -> None:
    count = 0

    @_FUZZ
    @given(st.booleans(), st.booleans(), _text_batches())
    def run(start_streaming: bool, token: bool, messages: list[str]) -> None:
        nonlocal count
        count += len(messages)
        _feed(_connection(start_streaming, token), messages)

    run()
    assert count >= 10_000


def test_fuzz_binary_messages() -> None:
    count = 0

    @_FUZZ
    @given(st.booleans(), _binary_batches())
    def run(start_streaming: bool, messages: list[bytes]) -> None:
        nonlocal count
        count += len(messages)
        _feed(_connection(start_streaming, False), messages)

    run()
    assert count >= 10_000


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(_texts, _binary(), st.just(json.dumps(HELLO))), min_size=5, max_size=20),
       st.lists(st.floats(0, 30), min_size=20, max_size=20))
def test_fuzz_mixed_messages_with_time(messages: list[str | bytes], gaps: list[float]) -> None:
    clock = FakeClock()
    conn = ServerConnection(clock=clock)
    for message, gap in zip(messages, gaps[: len(messages)], strict=True):
        clock.advance(gap)
        before = conn.state
        _check(conn, before, conn.check_timeouts())
        _feed(conn, [message])


def test_fuzz_generates_the_interesting_cases() -> None:
    """The generators reach deep paths: valid hellos, valid updates and valid frames, not only garbage."""
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_text_batches(), _binary_batches())
    def run(texts: list[str], binaries: list[bytes]) -> None:
        for messages in (texts, binaries):
            conn = streaming()
            for message in messages:
                events = conn.receive_text(message) if isinstance(message, str) else conn.receive_bytes(message)
                seen.update(type(e).__name__ for e in events)
                seen.update(json.loads(e.data).get("code", "") for e in events if isinstance(e, Send))

    run()
    assert {"Frame", "Update", "Send", "Close", "invalid_value", "unknown_field", "bad_json", "bad_frame_header",
            "not_allowed", "unexpected_hello",
            "missing_field", "unknown_type", "error_budget_exhausted"} <= seen


def test_frame_header_unpack_is_total() -> None:
    """Every 20-byte prefix either parses or raises the documented error."""
    for data in [struct.pack(">4sB3sId", b"SDFI", 1, b"\0\0\0", 2**32 - 1, -0.0), b"SDFI" + b"\x01" + b"\0" * 15]:
        assert isinstance(streaming().receive_bytes(data + save(pattern(8, 8), "JPEG"))[0], Frame)


# -- docs/protocol.md tells the truth -----------------------------------------------------------------------------

DOC = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = DOC.index(f"\n## {title}")
    return DOC[start:DOC.index("\n## ", start + 1)]


def test_doc_error_code_table_matches_the_code() -> None:
    rows = re.findall(r"^\| `(\w+)` \| .* \| (always|before ready|no) \| (\d+|–) \|$", _section("Error codes"), re.M)
    assert {code for code, _, _ in rows} == {c.value for c in ErrorCode}
    for code, ends, close in rows:
        error = ErrorCode(code)
        assert (ends == "always") == error.always_fatal, code
        assert close == ("–" if ends == "no" else str(error.close_code.value)), code


def test_doc_limits_table_names_every_limit() -> None:
    names = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", _section("Limits"), re.M))
    documented = {n for pair in names for n in pair if n}
    assert documented == {f.name for f in dataclasses.fields(ServerLimits)}


def test_doc_settings_table_names_every_setting() -> None:
    names = set(re.findall(r"^\| `([\w.]+)`", _section("Settings"), re.M))
    names |= {"height"}  # shares the width row
    expected = set(SETTING_FIELDS) | {f"filter.{k}" for k in SETTING_FIELDS["filter"]} | {
        f"output.{k}" for k in SETTING_FIELDS["output"]}
    assert names == expected


def test_doc_worked_example_is_what_the_code_sends() -> None:
    example = _section("Worked example")
    replay = example[: example.index("A frame with a PNG body")]
    conn = ServerConnection(token="s3cret")
    sent, expected = [], []
    for line in replay.splitlines():
        if line.startswith("C> {"):
            for event in conn.receive_text(line[3:]):
                if isinstance(event, Hello):
                    sent += [json.loads(e.data) for e in conn.accept("st-7f3a", event.view_token)]
                elif isinstance(event, Update):
                    sent.append(json.loads(event.ack))
                elif isinstance(event, Send):
                    sent.append(json.loads(event.data))
        elif line.startswith("S> {"):
            expected.append(json.loads(line[3:]))
    assert sent == expected and len(expected) == 4
    png = example[example.index("A frame with a PNG body"):]
    events = _rejected(streaming(), save(pattern(), "PNG"), frame_id=41)
    assert json.loads(events[0].data) == json.loads(re.search(r"^S> (\{.*\})$", png, re.M).group(1))
    wrong = example[example.index("With a wrong token"):]
    events = ServerConnection(token="s3cret").receive_text(re.search(r"^C> (\{.*\})$", wrong, re.M).group(1))
    assert json.loads(events[0].data) == json.loads(re.search(r"^S> (\{.*\})$", wrong, re.M).group(1))
    assert f'S> close {events[1].code.value} "{events[1].reason}"' in wrong


def test_reading_slows_to_max_messages_per_s_after_a_burst() -> None:
    clock = FakeClock()
    conn = ServerConnection(ServerLimits(max_messages_per_s=100.0, message_burst=4), clock=clock)
    _hello(conn)
    delays = []
    for _ in range(6):  # five more messages at the same instant: the burst (4 with the hello) is spent
        conn.receive_bytes(b"\x00")
        delays.append(conn.read_delay())
    assert delays == pytest.approx([0.0, 0.0, 0.0, 0.01, 0.02, 0.03])
    clock.advance(0.03)  # the client waited as told: reading is back within the budget
    conn.receive_bytes(b"\x00")
    assert conn.read_delay() == pytest.approx(0.01)
    clock.advance(1.0)
    conn.receive_bytes(b"\x00")
    assert conn.read_delay() == 0.0


def test_a_reference_image_is_an_update_of_the_stream_that_chose_the_ip_adapter() -> None:
    from streamdiff.protocol.session import ReferenceUpload, Update
    from streamdiff.protocol.wire import pack_reference_header

    limits = dataclasses.replace(ServerLimits(), ip_adapter="style")
    body = save(pattern(), "JPEG")
    conn = streaming(limits=limits, width=64, height=64)
    error = json.loads(conn.receive_bytes(pack_reference_header(3) + body)[0].data)
    assert (error["code"], error["field"], error["request_id"], error["allowed"]) == (
        "not_allowed", "settings.ip_adapter", 3, '"style"')
    conn.receive_text(json.dumps({"type": "update", "settings": {"ip_adapter": "style", "ip_adapter_scale": 0.5}}))
    [upload] = conn.receive_bytes(pack_reference_header(4) + body)
    assert isinstance(upload, ReferenceUpload) and upload.request_id == 4 and upload.body == body
    [update] = conn.reference_decoded(upload, decode(upload.body, limits))
    assert isinstance(update, Update) and set(update.changes) == {"reference_image"}
    ack = json.loads(update.ack)
    assert (ack["type"], ack["request_id"], ack["settings_version"]) == ("ack", 4, 2)
    assert conn.settings.prompt.reference_image == update.changes["reference_image"]
    conn.update_refused(update, ConfigError("no", field="reference_image"))  # the engine said no: undone
    assert conn.settings.prompt.reference_image is None and conn.settings_version == 1
    bad = conn.receive_bytes(b"SDFR\x02" + bytes(15) + body)
    assert json.loads(bad[0].data)["code"] == "bad_frame_header"
    rejected = conn.reference_rejected(upload, ImageError("broken", code=ErrorCode.BAD_IMAGE))
    assert json.loads(rejected[0].data)["request_id"] == 4
