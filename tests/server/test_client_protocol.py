"""streamdiff.protocol.client: what the Python client sends and how it reads the server."""

from __future__ import annotations

import json

import pytest
from server_helpers import FakeClock

from streamdiff.errors import ProtocolError
from streamdiff.protocol.client import (
    Ack,
    ClientConnection,
    ClientState,
    OutputFrame,
    Ready,
    ServerError,
    Stats,
    UnknownMessage,
    Viewing,
)
from streamdiff.protocol.images import ImageFormat
from streamdiff.protocol.session import ServerConnection
from streamdiff.protocol.settings import StreamSettings
from streamdiff.protocol.wire import ErrorCode, ServerTimings, unpack_input_header


def test_hello_carries_settings_token_client_and_view_token() -> None:
    client = ClientConnection({"prompt": "p", "width": 256}, token="tk", view_token="V" * 16)
    assert json.loads(client.hello()) == {"type": "hello", "version": 1, "client": "streamdiff-python/1",
                                          "settings": {"prompt": "p", "width": 256}, "token": "tk",
                                          "view_token": "V" * 16}
    assert "token" not in json.loads(ClientConnection().hello())
    assert "tk" not in repr(client)


def test_updates_count_request_ids() -> None:
    client = ClientConnection()
    assert client.update(prompt="a") == (1, '{"type":"update","request_id":1,"settings":{"prompt":"a"}}')
    assert client.update(seed=3)[0] == 2


def test_frames_count_ids_and_stamp_the_clock() -> None:
    clock = FakeClock(12.5)
    client = ClientConnection(clock=clock)
    header, body = unpack_input_header(client.frame(b"abc"))
    assert (header.frame_id, header.client_ts, bytes(body)) == (0, 12500.0, b"abc")
    assert unpack_input_header(client.frame(b""))[0].frame_id == 1
    assert unpack_input_header(client.frame(b"", frame_id=2**32 - 1, client_ts=1.0))[0] == type(header)(2**32 - 1, 1.0)


def test_frame_ids_wrap_around() -> None:
    client = ClientConnection()
    client._next_frame_id = 2**32 - 1
    assert unpack_input_header(client.frame(b""))[0].frame_id == 2**32 - 1
    assert unpack_input_header(client.frame(b""))[0].frame_id == 0


def test_reads_ready_ack_error_stats_viewing_and_unknown() -> None:
    server = ServerConnection()
    client = ClientConnection({"seed": 9})
    server.receive_text(client.hello())
    ready = client.receive_text(server.accept("s-1", "W" * 16)[0].data)
    assert isinstance(ready, Ready) and client.state is ClientState.STREAMING and client.ready is ready
    assert ready.settings.prompt.seed == 9 and ready.limits["max_input_fps"] == 30.0
    assert (ready.view_token, ready.view_url) == ("W" * 16, "/view.html?view=" + "W" * 16)
    _, text = client.update(seed=10)
    ack = client.receive_text(server.receive_text(text)[0].ack)
    assert isinstance(ack, Ack) and ack.request_id == 1 and client.settings.prompt.seed == 10
    _, text = client.update(seed=-1)
    error = client.receive_text(server.receive_text(text)[0].data)
    assert isinstance(error, ServerError) and not error.fatal and client.state is ClientState.STREAMING
    assert (error.code, error.field, error.value, error.request_id) == ("invalid_value", "settings.seed", -1, 2)
    assert str(error) == "invalid_value: seed=-1 is outside [0, 9223372036854775807]"
    assert isinstance(client.receive_text(server.stats_message()), Stats)
    assert client.receive_text('{"type": "viewing", "stream_id": "s-1"}') == Viewing("s-1")
    assert isinstance(client.receive_text('{"type": "future", "x": 1}'), UnknownMessage)
    fatal = client.receive_text(server.close(ErrorCode.SHUTTING_DOWN, "bye")[0].data)
    assert fatal.fatal and client.state is ClientState.CLOSED


def test_output_frames_give_latency_on_the_clients_clock() -> None:
    clock = FakeClock(10.0)
    client = ClientConnection(clock=clock)
    server = ServerConnection()
    data = server.output_frame(4, 9950.0, b"body", ImageFormat.WEBP, ServerTimings(server_ms=20.0))
    out = client.receive_bytes(data)
    assert out == OutputFrame(4, 9950.0, ImageFormat.WEBP, ServerTimings(server_ms=20.0), b"body", 50.0)


def test_a_server_breaking_the_protocol_raises() -> None:
    client = ClientConnection()
    with pytest.raises(ProtocolError, match="not valid JSON"):
        client.receive_text("nope")
    with pytest.raises(ProtocolError, match="server sent invalid settings: settings.width must be an integer"):
        client.receive_text('{"type": "ready", "stream_id": "s", "settings": {"width": "x"}}')
    with pytest.raises(ProtocolError, match="ready message has no valid stream_id"):
        client.receive_text('{"type": "ready", "settings": {}}')
    with pytest.raises(ProtocolError, match="shorter than the 40-byte output header"):
        client.receive_bytes(b"SDFO")
    assert client.receive_text('{"type": "ack", "settings": {}}').settings == StreamSettings()
