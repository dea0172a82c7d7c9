"""streamdiff.protocol.limits: safe defaults, validation with precise messages, the client-facing JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from streamdiff.config import CfgMode
from streamdiff.errors import ConfigError
from streamdiff.protocol.images import ImageFormat
from streamdiff.protocol.limits import ServerLimits


def test_defaults_are_safe() -> None:
    limits = ServerLimits()
    assert limits.max_message_bytes == 1 << 20 and limits.max_text_bytes == 16 << 10
    assert limits.max_frame_pixels == 1920 * 1080
    assert limits.allowed_input_formats == (ImageFormat.JPEG, ImageFormat.WEBP)
    assert CfgMode.FULL not in limits.allowed_cfg_types
    assert limits.max_frame_buffer_size == 1 and limits.max_steps == 4
    assert 0 < limits.hello_timeout_s <= limits.idle_timeout_s


def test_limits_are_frozen_and_replace_validates_again() -> None:
    limits = ServerLimits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_streams = 100  # type: ignore[misc]
    assert dataclasses.replace(limits, max_width=2048).max_width == 2048
    with pytest.raises(ConfigError, match=r"^ServerLimits.max_width=0 must be an integer >= 1$"):
        dataclasses.replace(limits, max_width=0)


@pytest.mark.parametrize("name,value,message", [
    ("max_streams", 0, "ServerLimits.max_streams=0 must be an integer >= 1"),
    ("max_streams", True, "ServerLimits.max_streams=True must be an integer >= 1"),
    ("max_frame_pixels", 1.5, "ServerLimits.max_frame_pixels=1.5 must be an integer >= 1"),
    ("max_input_fps", 0, "ServerLimits.max_input_fps=0 must be a finite number > 0"),
    ("idle_timeout_s", float("inf"), "ServerLimits.idle_timeout_s=inf must be a finite number > 0"),
    ("error_window_s", "10", "ServerLimits.error_window_s='10' must be a finite number > 0"),
    ("allowed_cfg_types", (), "ServerLimits.allowed_cfg_types is empty; give at least one of 'none', 'full'"),
    ("allowed_cfg_types", "self", "ServerLimits.allowed_cfg_types='self' must be a list of values"),
    ("allowed_input_formats", ("png",), "allowed_input_formats='png' is not one of 'jpeg', 'webp'"),
    ("max_text_bytes", 2 << 20, "ServerLimits.max_text_bytes=2097152 is more than max_message_bytes=1048576"),
    ("max_height", 4, "ServerLimits.max_height=4 is less than size_multiple=8"),
])
def test_invalid_limits_name_value_and_allowed(name: str, value, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerLimits(**{name: value})
    assert str(info.value).startswith(message)


def test_enum_fields_accept_strings_and_deduplicate() -> None:
    limits = ServerLimits(allowed_cfg_types=["SELF", "none", CfgMode.SELF], allowed_input_formats=["jpeg"])
    assert limits.allowed_cfg_types == (CfgMode.SELF, CfgMode.NONE)
    assert limits.allowed_input_formats == (ImageFormat.JPEG,)
    assert ServerLimits(max_input_fps=15).max_input_fps == 15.0


def test_to_json_is_what_a_client_needs() -> None:
    data = ServerLimits().to_json()
    json.dumps(data, allow_nan=False)
    assert "max_streams" not in data and "max_viewers_per_stream" not in data
    assert data["allowed_cfg_types"] == ["none", "self", "initialize"]
    assert data["allowed_input_formats"] == ["jpeg", "webp"]
    assert data["max_input_fps"] == 30.0 and data["max_frame_pixels"] == 2073600


def test_control_and_admission_limits() -> None:
    limits = ServerLimits()
    assert limits.max_reshape_per_s < limits.max_control_per_s and limits.reshape_burst <= limits.control_burst
    assert limits.max_awaiting_hello_per_address <= limits.max_awaiting_hello
    data = limits.to_json()
    assert (data["max_control_per_s"], data["control_burst"]) == (10.0, 30)
    assert (data["max_reshape_per_s"], data["reshape_burst"]) == (0.5, 4)
    assert "max_awaiting_hello" not in data and "max_awaiting_hello_per_address" not in data
    with pytest.raises(ConfigError, match=r"^ServerLimits.max_awaiting_hello_per_address=9 is more than "
                                          r"max_awaiting_hello=8$"):
        ServerLimits(max_awaiting_hello=8, max_awaiting_hello_per_address=9)
    with pytest.raises(ConfigError, match=r"^ServerLimits.max_control_per_s=0 must be a finite number > 0$"):
        ServerLimits(max_control_per_s=0)


def test_controlnets_name_what_the_engine_offers() -> None:
    assert ServerLimits().controlnets == () and ServerLimits().to_json()["controlnets"] == []
    limits = ServerLimits(controlnets=["edges", "depth", "edges"])
    assert limits.controlnets == ("edges", "depth") and limits.to_json()["controlnets"] == ["edges", "depth"]
    for bad in ("edges", [""], [3]):
        with pytest.raises(ConfigError, match=r"^ServerLimits.controlnets=.* must be a list of ControlNet names$"):
            ServerLimits(controlnets=bad)

    class Engine:
        size_multiple, allowed_sizes, size_range = 8, None, (8, 1024)
        controlnets = {"edges": object(), "depth": object()}  # the operator's order

    assert ServerLimits().for_engine(Engine()).controlnets == ("edges", "depth")
    Engine.controlnets = {}
    assert ServerLimits().for_engine(Engine()).controlnets == ()
