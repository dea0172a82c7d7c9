"""streamdiff.protocol.wire: the byte layout of frame headers, strict JSON, codes."""

from __future__ import annotations

import json
import math
import struct

import pytest

from streamdiff.errors import ProtocolError
from streamdiff.protocol.images import ImageFormat
from streamdiff.protocol.wire import (
    INPUT_HEADER_SIZE,
    OUTPUT_HEADER_SIZE,
    CloseCode,
    ErrorCode,
    OutputHeader,
    ServerTimings,
    close_reason,
    dump_json,
    load_json,
    pack_input_header,
    pack_output_frame,
    unpack_input_header,
    unpack_output_frame,
)


def test_input_header_layout_byte_by_byte() -> None:
    header = pack_input_header(0x01020304, 1234.5)
    assert INPUT_HEADER_SIZE == len(header) == 20
    assert header[0:4] == b"SDFI" and header[4] == 1 and header[5:8] == b"\0\0\0"
    assert header[8:12] == b"\x01\x02\x03\x04"  # big-endian uint32
    assert header[12:20] == struct.pack(">d", 1234.5)  # big-endian float64
    parsed, body = unpack_input_header(header + b"BODY")
    assert (parsed.frame_id, parsed.client_ts, bytes(body)) == (0x01020304, 1234.5, b"BODY")


def test_output_header_layout_byte_by_byte() -> None:
    timings = ServerTimings(1.5, 2.5, 3.5, 4.5, 12.0)
    data = pack_output_frame(OutputHeader(7, 99.25, ImageFormat.WEBP, timings), b"IMG")
    assert OUTPUT_HEADER_SIZE == 40 and len(data) == 43
    assert data[0:4] == b"SDFO" and data[4] == 1 and data[5] == 2 and data[6:8] == b"\0\0"
    assert struct.unpack(">I", data[8:12]) == (7,) and struct.unpack(">d", data[12:20]) == (99.25,)
    assert struct.unpack(">5f", data[20:40]) == (1.5, 2.5, 3.5, 4.5, 12.0)
    header, body = unpack_output_frame(data)
    assert header == OutputHeader(7, 99.25, ImageFormat.WEBP, timings) and body == b"IMG"
    assert pack_output_frame(OutputHeader(0, 0.0, ImageFormat.JPEG, ServerTimings()), b"")[5] == 1


@pytest.mark.parametrize("data,message", [
    (b"", "binary message of 0 bytes is shorter than the 20-byte frame header"),
    (b"SDFI\x01", "binary message of 5 bytes is shorter than the 20-byte frame header"),
    (b"GIF89a" + b"\0" * 30, "frame header magic b'GIF8' is not b'SDFI'"),
    (b"SDFI\x02\0\0\0" + b"\0" * 12, "frame header version 2 is not 1"),
    (b"SDFI\x01\0\0\x01" + b"\0" * 12, "frame header reserved bytes 000001 are not zero"),
    (b"SDFI\x01\0\0\0" + b"\0" * 4 + struct.pack(">d", math.nan), "frame header client_ts nan is not a finite"),
    (b"SDFI\x01\0\0\0" + b"\0" * 4 + struct.pack(">d", -math.inf), "frame header client_ts -inf is not a finite"),
])
def test_bad_input_headers(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=f"^{message}") as info:
        unpack_input_header(data)
    assert info.value.code == ErrorCode.BAD_FRAME_HEADER


def test_packing_checks_its_arguments() -> None:
    with pytest.raises(ProtocolError, match=r"frame_id=4294967296 is outside \[0, 2\*\*32\)"):
        pack_input_header(2**32, 0.0)
    with pytest.raises(ProtocolError, match="frame_id=-1"):
        pack_input_header(-1, 0.0)
    with pytest.raises(ProtocolError, match="client_ts=nan must be a finite number"):
        pack_input_header(0, math.nan)
    with pytest.raises(ProtocolError, match="shorter than the 40-byte output header"):
        unpack_output_frame(b"SDFO")
    with pytest.raises(ProtocolError, match="is not b'SDFO' version 1 with format 1 or 2"):
        unpack_output_frame(b"SDFO\x01\x03" + b"\0" * 40)


@pytest.mark.parametrize("text,message", [
    ("", "message is not valid JSON: Expecting value"),
    ("{", "message is not valid JSON: Expecting property name"),
    ("[1, 2]", "message is a JSON array, not an object"),
    ("null", "message is a JSON null, not an object"),
    ('"hello"', "message is a JSON string, not an object"),
    ('{"a": NaN}', "message is not valid JSON: NaN is not valid JSON"),
    ('{"a": -Infinity}', "message is not valid JSON: -Infinity is not valid JSON"),
    ('{"type": "hello", "type": "update"}', "message is not valid JSON: duplicate key 'type'"),
    ("[" * 100000 + "]" * 100000, "message is not valid JSON: nested too deeply"),
    ('{"a": ' + "1" * 5000 + "}", "message is not valid JSON: Exceeds the limit"),
    ('{"a": "\\ud800"} x', "message is not valid JSON: Extra data"),
])
def test_load_json_is_strict(text: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=f"^{message}") as info:
        load_json(text)
    assert info.value.code == ErrorCode.BAD_JSON


def test_load_json_accepts_objects_and_large_exponents_become_inf() -> None:
    assert load_json('{"type": "hello", "nested": {"a": [1, 2.5, null, true]}}')["nested"]["a"] == [1, 2.5, None, True]
    assert load_json('{"a": 1e999}')["a"] == math.inf  # rejected later as "a finite number"


def test_dump_json_is_ascii_and_rejects_nan() -> None:
    text = dump_json({"prompt": "caf\u00e9 \ud800", "n": 1})
    assert text.isascii() and json.loads(text)["n"] == 1
    with pytest.raises(ValueError):
        dump_json({"x": math.nan})


def test_close_reason_fits_a_control_frame() -> None:
    assert close_reason("short") == "short"
    long = close_reason("\u00e9" * 200)
    assert len(long.encode("utf-8")) <= 123 and long.endswith("...")
    assert close_reason("x\ud800y") == "x?y"


def test_codes() -> None:
    assert ErrorCode.SERVER_FULL.close_code == CloseCode.TRY_AGAIN_LATER == 1013
    assert ErrorCode.UNAUTHORIZED.close_code == 1008 and ErrorCode.FORBIDDEN_ORIGIN.close_code == 1008
    assert ErrorCode.MESSAGE_TOO_BIG.close_code == 1009 and ErrorCode.INTERNAL_ERROR.close_code == 1011
    assert ErrorCode.SHUTTING_DOWN.close_code == 1001 and ErrorCode.BAD_JSON.close_code == 1007
    assert ErrorCode.UNSUPPORTED_VERSION.close_code == 1002 and ErrorCode.VIEW_ONLY.close_code == 1003
    assert ErrorCode.UNAUTHORIZED.always_fatal and not ErrorCode.BAD_IMAGE.always_fatal
    assert len({c.value for c in ErrorCode}) == len(ErrorCode)
