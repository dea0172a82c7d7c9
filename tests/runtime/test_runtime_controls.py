"""Text commands for live control (``streamdiff run --control-stdin``): parsing and errors."""

from __future__ import annotations

import pytest

from streamdiff import ConfigError, FilterConfig, StreamConfig
from streamdiff.runtime.controls import parse_command

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40))


@pytest.mark.parametrize("text, expected", [
    ("prompt=an oil painting, soft light", ("update", {"prompt": "an oil painting, soft light"})),
    ("size=96x80", ("update", {"width": 96, "height": 80})),
    ("frame-buffer-size=2", ("update", {"frame_buffer_size": 2})),
    ("t_index_list=10, 30", ("update", {"t_index_list": (10, 30)})),
    ("strength=0.5", ("update", {"t_index_list": (25, 37)})),
    ("guidance_scale=1.4", ("update", {"guidance_scale": 1.4})),
    ("use_denoising_batch=off", ("update", {"use_denoising_batch": False})),
    ("filter=on", ("update", {"filter": FilterConfig(enabled=True)})),
    ("  quit ", ("quit", {})),
    ("pause", ("pause", {})),
    ("", ("none", {})),
])
def test_commands_parse_to_changes(text: str, expected: tuple) -> None:
    assert parse_command(text, CONFIG) == expected


@pytest.mark.parametrize("text, message", [
    ("colour=red", r"unknown setting 'colour'; one per line: KEY=VALUE"),
    ("seed=seven", r"seed='seven' is not a valid value for seed"),
    ("filter=maybe", r"filter='maybe' must be one of on, off, true, false"),
    ("size=big", r"size='big' is not WIDTHxHEIGHT"),
    ("strength=2", r"strength=2.0 is outside \(0, 1\]"),
    ("hello", r"'hello' is not a command"),
])
def test_bad_commands_name_the_key_and_value(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_command(text, CONFIG)


def test_image_prompt_commands(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.fromarray(np.full((4, 6, 3), 7, np.uint8)).save(path)
    kind, changes = parse_command(f"ip_adapter_image={path}", CONFIG)
    assert kind == "update" and changes["reference_image"].shape == (4, 6, 3)
    assert parse_command("ip_adapter_image=none", CONFIG) == ("update", {"reference_image": None})
    assert parse_command("ip-adapter-scale=0.5", CONFIG) == ("update", {"ip_adapter_scale": 0.5})
    with pytest.raises(ConfigError, match="cannot be read"):
        parse_command(f"ip_adapter_image={tmp_path / 'missing.png'}", CONFIG)
