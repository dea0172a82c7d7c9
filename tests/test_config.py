from __future__ import annotations

import pytest

from streamdiff import CfgMode, ConfigError, FilterConfig, PromptConfig, StreamConfig, StreamMode
from streamdiff.config import t_index_list_for_strength


def test_defaults_and_enum_conversion() -> None:
    config = StreamConfig(cfg_type="initialize", mode="txt2img", t_index_list=[0])
    assert config.cfg_type is CfgMode.INITIALIZE
    assert config.mode is StreamMode.TXT2IMG
    assert config.t_index_list == (0,)
    assert config.batch_size == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"t_index_list": [57]}, "t_index_list entry 57 is outside [0, 50)"),
        ({"t_index_list": [45, 32]}, "strictly increasing"),
        ({"t_index_list": [32, 32]}, "strictly increasing"),
        ({"t_index_list": []}, "t_index_list is empty"),
        ({"t_index_list": [-1]}, "outside [0, 50)"),
        ({"t_index_list": [1.5]}, "not an integer"),
        ({"frame_buffer_size": 0}, "frame_buffer_size=0 must be >= 1"),
        ({"cfg_type": "half"}, "cfg_type='half' is not one of 'none', 'full', 'self', 'initialize'"),
        ({"mode": "video"}, "mode='video' is not one of"),
        ({"width": 4}, "width=4 is outside [8, 4096]"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
    ],
)
def test_invalid_stream_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        StreamConfig(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 1.0}, "threshold=1.0 is outside [0, 1)"),
        ({"max_skip_frames": -1}, "max_skip_frames=-1"),
    ],
)
def test_invalid_filter_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        FilterConfig(**kwargs)


def test_invalid_prompt_config() -> None:
    with pytest.raises(ConfigError, match="guidance_scale=-1"):
        PromptConfig("x", guidance_scale=-1)
    with pytest.raises(ConfigError, match="seed"):
        PromptConfig("x", seed=-5)
    with pytest.raises(ConfigError, match="prompt=None"):
        PromptConfig(None)  # type: ignore[arg-type]


def test_with_changes_validates_again() -> None:
    config = StreamConfig()
    assert config.with_changes(t_index_list=[10, 20, 30]).denoising_steps == 3
    with pytest.raises(ConfigError, match="unknown StreamConfig field"):
        config.with_changes(bogus=1)
    with pytest.raises(ConfigError, match="entry 50"):
        config.with_changes(t_index_list=[50])


def test_strength_to_t_index_list() -> None:
    assert t_index_list_for_strength(1.0, 1) == (0,)
    assert t_index_list_for_strength(0.5, 2) == (25, 37)
    steps = t_index_list_for_strength(0.3, 4)
    assert len(steps) == 4 and steps[0] == 35
    with pytest.raises(ConfigError, match="strength=0"):
        t_index_list_for_strength(0, 2)
