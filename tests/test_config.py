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


# -- types: every bool, int and float field of every config dataclass ---------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

from streamdiff import LoraSpec  # noqa: E402
from streamdiff.backends.keys import EngineOptions  # noqa: E402
from streamdiff.config import check_bool, check_int, check_number, parse_size  # noqa: E402
from streamdiff.runtime import RuntimeConfig  # noqa: E402

CONFIG_CLASSES = {
    FilterConfig: {}, StreamConfig: {}, PromptConfig: {}, RuntimeConfig: {}, EngineOptions: {}, LoraSpec: {"source": "x"},
}
BAD_VALUES = {
    "bool": ["no", "False", 1, 0, 1.0, np.bool_(True)],
    "int": [1.5, 64.0, "3", True, math.nan, [1]],
    "float": [True, False, "0.5", math.nan, math.inf, -math.inf, [0.5]],
}
ALLOWED_TEXT = {"bool": "must be True or False", "int": "must be an integer", "float": "number"}


def _typed_fields() -> list[tuple[type, str, str, bool]]:
    """(class, field, kind, optional) for every field annotated bool / int / float (optionally ``| None``)."""
    found = []
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            kind, _, rest = str(f.type).partition(" | ")
            if kind in BAD_VALUES and rest in ("", "None"):
                found.append((cls, f.name, kind, rest == "None"))
    return found


TYPED_FIELDS = _typed_fields()
BAD_CASES = [
    pytest.param(cls, name, kind, value, id=f"{cls.__name__}.{name}={value!r}")
    for cls, name, kind, optional in TYPED_FIELDS
    for value in BAD_VALUES[kind] + ([] if optional else [None])
]


def test_every_typed_field_is_covered() -> None:
    names = {f"{cls.__name__}.{name}" for cls, name, _, _ in TYPED_FIELDS}
    assert {
        "FilterConfig.enabled", "FilterConfig.threshold", "FilterConfig.max_skip_frames", "StreamConfig.width",
        "StreamConfig.use_denoising_batch", "StreamConfig.add_noise", "PromptConfig.guidance_scale",
        "PromptConfig.seed", "RuntimeConfig.realtime", "RuntimeConfig.flush", "RuntimeConfig.fps",
        "RuntimeConfig.join_timeout", "RuntimeConfig.max_frames", "EngineOptions.compile", "EngineOptions.verify",
        "EngineOptions.channels_last", "EngineOptions.opset", "EngineOptions.min_resolution", "LoraSpec.scale",
    } <= names


@pytest.mark.parametrize("cls, name, kind, value", BAD_CASES)
def test_a_wrong_type_fails_at_construction_naming_field_value_and_what_is_allowed(
    cls: type, name: str, kind: str, value: object
) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**{**CONFIG_CLASSES[cls], name: value})
    message = str(info.value)
    assert f"{name}={value!r}" in message or f"scale={value!r}" in message, message
    assert ALLOWED_TEXT[kind] in message, message


@pytest.mark.parametrize("cls, name, kind, optional", TYPED_FIELDS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_good_values_of_every_typed_field_are_kept(cls: type, name: str, kind: str, optional: bool) -> None:
    default = next(f for f in dataclasses.fields(cls) if f.name == name).default
    good = {"bool": [True, False], "int": [default if default is not None else 256], "float": [0.5]}[kind]
    for value in good + ([None] if optional else []):
        assert getattr(cls(**{**CONFIG_CLASSES[cls], name: value}), name) == value


def test_numpy_numbers_are_accepted_as_plain_python_numbers() -> None:
    config = StreamConfig(width=np.int64(64), height=np.int32(64), filter=FilterConfig(threshold=np.float32(0.5)))
    assert type(config.width) is int and config.width == 64 and type(config.filter.threshold) is float
    assert PromptConfig(guidance_scale=2).guidance_scale == 2.0 and type(LoraSpec("x", 1).scale) is float


def test_the_shared_checks_word_their_intervals() -> None:
    assert check_bool("flag", False) is False
    assert check_int("n", 3, 1, 3) == 3 and check_number("x", 1, 0, 1) == 1.0
    with pytest.raises(ConfigError, match=r"^n=0 must be >= 1$"):
        check_int("n", 0, 1)
    with pytest.raises(ConfigError, match=r"^n=9 must be <= 8$"):
        check_int("n", 9, None, 8)
    with pytest.raises(ConfigError, match=r"^n='9' must be an integer in \[1, 8\], not str$"):
        check_int("n", "9", 1, 8)
    with pytest.raises(ConfigError, match=r"^x=0 is outside \(0, 1\]$"):
        check_number("x", 0, 0, 1, min_open=True)
    with pytest.raises(ConfigError, match=r"^x=1.0 is outside \[0, 1\)$"):
        check_number("x", 1.0, 0, 1, max_open=True)
    with pytest.raises(ConfigError, match=r"^x=0.0 must be > 0$"):
        check_number("x", 0.0, 0, min_open=True)
    with pytest.raises(ConfigError, match=r"^x=inf must be a finite number$"):
        check_number("x", math.inf)
    with pytest.raises(ConfigError, match=r"^flag='no' must be True or False, not str$"):
        check_bool("flag", "no")


def test_filter_given_as_text_no_longer_switches_it_on() -> None:
    with pytest.raises(ConfigError, match="enabled='no'"):
        FilterConfig(enabled="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="use_denoising_batch='no'"):
        StreamConfig(use_denoising_batch="no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value, size",
    [("640x480", (640, 480)), ("640X480", (640, 480)), (" 640 x 480 ", (640, 480)), ("640*480", (640, 480)),
     ("512", (512, 512)), (512, (512, 512)), ([96, 64], (96, 64)), ((96, 64), (96, 64))],
)
def test_parse_size(value: object, size: tuple[int, int]) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value, message",
    [("big", "size='big' is not WIDTHxHEIGHT or a single N for NxN"), ("64by64", "is not WIDTHxHEIGHT"),
     ("0x64", "size='0x64' must have positive sides"), ("-64", "is not WIDTHxHEIGHT"), ("64x", "is not WIDTHxHEIGHT"),
     ("64x64x3", "is not WIDTHxHEIGHT"), ("６４", "is not WIDTHxHEIGHT"), (64.0, "is not WIDTHxHEIGHT"),
     (True, "is not WIDTHxHEIGHT"), (0, "size=0 must be >= 1"), ([64], "must be [width, height]"),
     ([64, 6.5], "size height=6.5 must be an integer >= 1")],
)
def test_parse_size_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value)
    assert message in str(info.value)


def test_config_errors_carry_the_field_the_value_and_what_is_allowed():
    from streamdiff.config import check_bool, check_int, check_number, to_enum, CfgMode

    cases = [
        (lambda: check_int("width", 5000, 8, 4096), "width", 5000, "[8, 4096]"),
        (lambda: check_int("steps", 1.5, 1), "steps", 1.5, "an integer >= 1"),
        (lambda: check_number("delta", float("nan")), "delta", None, "a finite number"),
        (lambda: check_bool("filter", "no"), "filter", "no", "true or false"),
        (lambda: to_enum(CfgMode, "half", "cfg_type"), "cfg_type", "half", "none, full, self, initialize"),
    ]
    for call, field, value, allowed in cases:
        with pytest.raises(ConfigError) as caught:
            call()
        error = caught.value
        assert (error.field, error.allowed, error.has_value) == (field, allowed, True)
        if value is not None:
            assert error.value == value
    bare = ConfigError("a message alone")
    assert (bare.field, bare.has_value, bare.allowed) == (None, False, None)


# -- ControlNet settings ----------------------------------------------------------------------------------------------


def test_controlnet_specs_are_validated_and_converted() -> None:
    from streamdiff import ControlNetSpec, PromptConfig

    prompt = PromptConfig(controlnets=["canny", {"name": "depth", "scale": 0.5, "preprocessor": "passthrough"}])
    assert prompt.controlnets == (ControlNetSpec("canny"), ControlNetSpec("depth", 0.5, preprocessor="passthrough"))
    with pytest.raises(ConfigError, match=r"scale=11 is outside \[0, 10\]"):
        ControlNetSpec("a", scale=11)
    with pytest.raises(ConfigError, match=r"start=0.6 must be below end=0.5"):
        ControlNetSpec("a", start=0.6, end=0.5)
    with pytest.raises(ConfigError, match=r"high_threshold=50 is outside \[100, 255\]"):
        ControlNetSpec("a", high_threshold=50)
    with pytest.raises(ConfigError, match="name a ControlNet twice"):
        PromptConfig(controlnets=["a", "a"])
    with pytest.raises(ConfigError, match=r"unknown controlnet setting\(s\) \['weight'\]"):
        PromptConfig(controlnets=[{"name": "a", "weight": 1}])
    with pytest.raises(ConfigError, match="must be a list"):
        PromptConfig(controlnets="canny")
