"""streamdiff.protocol.settings: JSON settings <-> StreamConfig / PromptConfig / OutputConfig, types, caps."""

from __future__ import annotations

import json
import math

import pytest

from streamdiff.config import CfgMode, FilterConfig, StreamConfig, t_index_list_for_strength
from streamdiff.errors import ConfigError, ProtocolError
from streamdiff.protocol.images import ImageFormat
from streamdiff.protocol.limits import ServerLimits
from streamdiff.protocol.settings import (
    SETTING_FIELDS,
    OutputConfig,
    StreamSettings,
    apply_settings,
    check_caps,
    engine_changes,
)

BASE = StreamSettings()
LIMITS = ServerLimits()


def _error(changes, limits: ServerLimits | None = LIMITS, current: StreamSettings = BASE) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        apply_settings(current, changes, limits)
    return info.value


def test_every_setting_maps_onto_streamdiff_config() -> None:
    s = apply_settings(BASE, {
        "width": 256, "height": 384, "t_index_list": [20, 30, 40], "num_inference_steps": 50,
        "frame_buffer_size": 1, "cfg_type": "initialize", "prompt": "a cat", "negative_prompt": "blurry",
        "guidance_scale": 2, "delta": 0.5, "seed": 7, "filter": {"enabled": True, "threshold": 0.9},
        "output": {"format": "webp", "quality": 60},
    }, LIMITS)
    assert s.stream == StreamConfig(width=256, height=384, t_index_list=(20, 30, 40), cfg_type=CfgMode.INITIALIZE,
                                    filter=FilterConfig(True, 0.9, 10))
    assert (s.prompt.prompt, s.prompt.negative_prompt, s.prompt.guidance_scale, s.prompt.delta, s.prompt.seed) == (
        "a cat", "blurry", 2.0, 0.5, 7)
    assert isinstance(s.prompt.guidance_scale, float)
    assert s.output == OutputConfig(ImageFormat.WEBP, 60)
    assert apply_settings(BASE, s.to_json(), LIMITS) == s  # the JSON form round-trips
    json.dumps(s.to_json(), allow_nan=False)


def test_partial_changes_keep_everything_else() -> None:
    s = apply_settings(BASE, {"prompt": "x"}, LIMITS)
    assert s.stream == BASE.stream and s.output == BASE.output and s.prompt.prompt == "x"
    assert apply_settings(s, {}, LIMITS) == s
    f = apply_settings(s, {"filter": {"threshold": 0.5}}, LIMITS).stream.filter
    assert f == FilterConfig(False, 0.5, 10)


def test_strength_and_steps_become_a_t_index_list() -> None:
    s = apply_settings(BASE, {"strength": 0.5, "steps": 3}, LIMITS)
    assert s.stream.t_index_list == t_index_list_for_strength(0.5, 3, 50)
    assert s.strength == pytest.approx(0.5)
    # steps alone keep the current strength; strength alone keeps the number of steps
    assert apply_settings(s, {"steps": 2}, LIMITS).stream.t_index_list == t_index_list_for_strength(0.5, 2, 50)
    assert apply_settings(s, {"strength": 0.8}, LIMITS).stream.t_index_list == t_index_list_for_strength(0.8, 3, 50)
    n100 = apply_settings(s, {"num_inference_steps": 100, "strength": 0.5}, LIMITS).stream
    assert n100.num_inference_steps == 100 and n100.t_index_list == t_index_list_for_strength(0.5, 3, 100)


def test_t_index_list_and_num_inference_steps_change_together() -> None:
    s = apply_settings(BASE, {"num_inference_steps": 100, "t_index_list": [60, 90]}, LIMITS)
    assert s.stream.t_index_list == (60, 90) and s.stream.num_inference_steps == 100
    e = _error({"num_inference_steps": 20})  # the current list (32, 45) does not fit 20 steps
    assert (e.code, e.field, str(e)) == ("invalid_value", "settings.num_inference_steps",
                                         "t_index_list entry 32 is outside [0, 20)")


@pytest.mark.parametrize("changes,field,message", [
    ({"width": 7}, "settings.width", "width=7 is outside [8, 4096]"),
    ({"frame_buffer_size": 0}, "settings.frame_buffer_size", "frame_buffer_size=0 must be >= 1"),
    ({"cfg_type": "strong"}, "settings.cfg_type", "cfg_type='strong' is not one of 'none', 'full', 'self', "
                                                  "'initialize'"),
    ({"t_index_list": []}, "settings.t_index_list", "t_index_list is empty; give at least one timestep index, "
                                                 "e.g. [32, 45]"),
    ({"t_index_list": [45, 32]}, "settings.t_index_list", "t_index_list [45, 32] must be strictly increasing"),
    ({"t_index_list": [32, 57]}, "settings.t_index_list", "t_index_list entry 57 is outside [0, 50)"),
    ({"num_inference_steps": 0}, "settings.num_inference_steps", "num_inference_steps=0 is outside [1, 1000]"),
    ({"strength": 0}, "settings.strength", "strength=0.0 is outside (0, 1]"),
    ({"strength": 1.5, "steps": 2}, "settings.strength", "strength=1.5 is outside (0, 1]"),
    ({"steps": 0}, "settings.steps", "steps=0 is outside [1, 50]"),
    ({"guidance_scale": 51}, "settings.guidance_scale", "guidance_scale=51.0 is outside [0, 50]"),
    ({"delta": -1}, "settings.delta", "delta=-1.0 is outside [0, 10]"),
    ({"seed": -1}, "settings.seed", "seed=-1 is outside [0, 9223372036854775807]"),
    ({"seed": 2**63}, "settings.seed", "seed=9223372036854775808 is outside [0, 9223372036854775807]"),
    ({"filter": {"threshold": 1.0}}, "settings.filter.threshold", "threshold=1.0 is outside [0, 1)"),
    ({"filter": {"max_skip_frames": -2}}, "settings.filter.max_skip_frames", "max_skip_frames=-2 must be >= 0"),
    ({"output": {"quality": 0}}, "settings.output.quality", "output quality=0 is outside [1, 100]"),
    ({"output": {"format": "png"}}, "settings.output.format", "output format='png' is not one of 'jpeg', 'webp'"),
])
def test_invalid_values_are_judged_by_streamdiffs_own_validation(changes, field: str, message: str) -> None:
    e = _error(changes)
    assert (e.code, e.field, str(e)) == ("invalid_value", field, message)
    assert e.has_value


def test_error_text_is_the_configs_own() -> None:
    for make, changes in [(lambda: StreamConfig(width=7), {"width": 7}),
                          (lambda: FilterConfig(threshold=1.0), {"filter": {"threshold": 1.0}}),
                          (lambda: OutputConfig(quality=0), {"output": {"quality": 0}})]:
        with pytest.raises(ConfigError) as info:
            make()
        assert str(_error(changes)) == str(info.value)


@pytest.mark.parametrize("changes,field,message,allowed", [
    ({"width": "512"}, "settings.width", "settings.width must be an integer, got string '512'", "an integer"),
    ({"width": 512.0}, "settings.width", "settings.width must be an integer, got number 512.0", "an integer"),
    ({"height": True}, "settings.height", "settings.height must be an integer, got true", "an integer"),
    ({"seed": None}, "settings.seed", "settings.seed must be an integer, got null", "an integer"),
    ({"guidance_scale": "1.2"}, "settings.guidance_scale", "settings.guidance_scale must be a finite number, "
                                                           "got string '1.2'", "a finite number"),
    ({"guidance_scale": math.inf}, "settings.guidance_scale", "settings.guidance_scale must be a finite number, "
                                                              "got inf", "a finite number"),
    ({"delta": 10**400}, "settings.delta", "settings.delta must be a finite number, got a number of 401 digits",
     "a finite number"),
    ({"strength": False}, "settings.strength", "settings.strength must be a finite number, got false",
     "a finite number"),
    ({"prompt": 5}, "settings.prompt", "settings.prompt must be a string, got number 5", "a string"),
    ({"prompt": ["a"]}, "settings.prompt", "settings.prompt must be a string, got a list of 1 items", "a string"),
    ({"prompt": "\ud800"}, "settings.prompt", "settings.prompt must be a string, got string '\\ud800'", "a string"),
    ({"t_index_list": [1, "2"]}, "settings.t_index_list", "settings.t_index_list must be a list of integers, got "
                                                          "a list of 2 items", "a list of integers"),
    ({"t_index_list": 32}, "settings.t_index_list", "settings.t_index_list must be a list of integers, got "
                                                    "number 32", "a list of integers"),
    ({"filter": True}, "settings.filter", "settings.filter must be a JSON object", "an object"),
    ({"filter": {"enabled": 1}}, "settings.filter.enabled", "settings.filter.enabled must be true or false, got "
                                                            "number 1", "true or false"),
    ({"output": {"quality": {"a": 1}}}, "settings.output.quality", "settings.output.quality must be an integer, "
                                                                   "got an object", "an integer"),
])
def test_json_type_errors_name_field_value_and_allowed(changes, field, message, allowed) -> None:
    e = _error(changes)
    assert (e.code, e.field, str(e), e.allowed) == ("invalid_value", field, message, allowed)


def test_settings_must_be_an_object() -> None:
    e = _error([1, 2])
    assert (e.code, e.field, str(e)) == ("invalid_value", "settings", "settings must be a JSON object")


@pytest.mark.parametrize("changes,field", [
    ({"widht": 512}, "settings.widht"), ({"mode": "txt2img"}, "settings.mode"),
    ({"filter": {"enable": True}}, "settings.filter.enable"), ({"output": {"fmt": "jpeg"}}, "settings.output.fmt"),
])
def test_unknown_fields_are_errors_that_list_the_known_ones(changes, field: str) -> None:
    e = _error(changes)
    assert e.code == "unknown_field" and e.field == field
    assert str(e).startswith(f"{field} is not a known setting; allowed: ")


def test_t_index_list_with_strength_is_refused() -> None:
    e = _error({"t_index_list": [10, 20], "strength": 0.5})
    assert (e.field, str(e)) == ("settings.t_index_list", "settings: give t_index_list or strength/steps, not both")


@pytest.mark.parametrize("changes,field,allowed", [
    ({"width": 2048}, "settings.width", "a multiple of 8 in [8, 1024]"),
    ({"height": 100}, "settings.height", "a multiple of 8 in [8, 1024]"),
    ({"t_index_list": [1, 2, 3, 4, 5]}, "settings.t_index_list", "at most 4 denoising steps"),
    ({"steps": 5}, "settings.steps", "at most 4 denoising steps"),
    ({"frame_buffer_size": 2}, "settings.frame_buffer_size", "[1, 1]"),
    ({"cfg_type": "full"}, "settings.cfg_type", "none, self, initialize"),
    ({"prompt": "x" * 1001}, "settings.prompt", "at most 1000 characters"),
    ({"negative_prompt": "x" * 1001}, "settings.negative_prompt", "at most 1000 characters"),
])
def test_server_caps(changes, field: str, allowed: str) -> None:
    e = _error(changes)
    assert (e.code, e.field, e.allowed) == ("not_allowed", field, allowed)
    apply_settings(BASE, changes, None)  # valid for streamdiff itself: only the server's caps refuse it


def test_cap_messages() -> None:
    assert str(_error({"width": 2048})) == ("settings.width=2048 is not allowed by this server; allowed: a multiple "
                                            "of 8 in [8, 1024]")
    assert str(_error({"steps": 5})) == "5 denoising steps are more than this server's 4"
    assert str(_error({"prompt": "x" * 1001})) == "settings.prompt has 1001 characters, more than 1000"
    loose = ServerLimits(max_frame_buffer_size=4, allowed_cfg_types=["full"], size_multiple=64, max_width=2048)
    assert apply_settings(BASE, {"frame_buffer_size": 4, "cfg_type": "full", "width": 2048}, loose).stream.width == 2048
    assert _error({"width": 520}, loose).allowed == "a multiple of 64 in [64, 2048]"


def test_check_caps_on_defaults() -> None:
    check_caps(BASE, LIMITS)
    with pytest.raises(ProtocolError, match="defaults.cfg_type"):
        check_caps(StreamSettings(StreamConfig(cfg_type="full")), LIMITS, path="defaults")


def test_engine_changes_are_pipeline_update_kwargs() -> None:
    new = apply_settings(BASE, {"prompt": "p", "strength": 0.9, "filter": {"enabled": True},
                                "output": {"format": "webp"}}, LIMITS)
    changes = engine_changes(BASE, new)
    assert changes == {"prompt": "p", "t_index_list": new.stream.t_index_list, "filter": new.stream.filter}
    assert engine_changes(new, new) == {}
    assert set(SETTING_FIELDS) - {"strength", "steps", "output"} == set(BASE.to_json()) - {"output"}


def test_output_config_validates() -> None:
    assert OutputConfig("WEBP").format is ImageFormat.WEBP
    with pytest.raises(ConfigError, match=r"output quality=True is outside \[1, 100\]"):
        OutputConfig(quality=True)


def test_a_size_list_refuses_every_other_size_naming_the_side_that_differs() -> None:
    limits = ServerLimits(sizes=("256x256", (320, 240)))
    assert limits.sizes == ("256x256", "320x240") and limits.to_json()["sizes"] == ["256x256", "320x240"]
    check_caps(apply_settings(BASE, {"width": 320, "height": 240}, LIMITS), limits)
    for width, height, field in ((512, 512, "settings.width"), (320, 256, "settings.height")):
        with pytest.raises(ProtocolError) as caught:
            check_caps(apply_settings(BASE, {"width": width, "height": height}, LIMITS), limits)
        assert (caught.value.code, caught.value.field) == ("not_allowed", field)
        assert caught.value.allowed == "one of the sizes 256x256, 320x240"
    with pytest.raises(ConfigError, match="sizes"):
        ServerLimits(sizes="256x256")


def test_image_prompt_settings_name_the_servers_ip_adapter_and_carry_a_scale() -> None:
    import dataclasses

    import numpy as np

    offering = dataclasses.replace(LIMITS, ip_adapter="style")
    s = apply_settings(BASE, {"ip_adapter": "style", "ip_adapter_scale": 0.5}, offering)
    assert (s.ip_adapter, s.prompt.ip_adapter_scale) == ("style", 0.5)
    assert s.to_json()["ip_adapter"] == "style" and s.to_json()["ip_adapter_scale"] == 0.5
    assert engine_changes(BASE, s) == {"ip_adapter_scale": 0.5}
    error = _error({"ip_adapter": "other"}, offering)
    assert (error.code.value, error.field, error.value) == ("not_allowed", "settings.ip_adapter", "other")
    assert _error({"ip_adapter": "style"}).allowed == '"" (this server offers no IP-Adapter)'
    assert _error({"ip_adapter_scale": -1}, offering).field == "settings.ip_adapter_scale"
    assert _error({"ip_adapter_scale": "big"}, offering).code.value == "invalid_value"
    # choosing no IP-Adapter again removes the stream's reference image
    with_image = dataclasses.replace(s, prompt=dataclasses.replace(s.prompt, reference_image=np.zeros((2, 2, 3),
                                                                                                       np.uint8)))
    cleared = apply_settings(with_image, {"ip_adapter": ""}, offering)
    assert cleared.prompt.reference_image is None and engine_changes(with_image, cleared) == {"reference_image": None}


def test_limits_name_the_engines_ip_adapter() -> None:
    class Adapter:
        name = "style"

    class Model:
        ip_adapter = Adapter()

    class Engine:
        model, size_multiple, allowed_sizes, size_range = Model(), 8, None, (8, 1024)

    assert LIMITS.for_engine(Engine()).ip_adapter == "style"
    assert LIMITS.ip_adapter == "" and LIMITS.to_json()["ip_adapter"] == ""

# -- ControlNet ---------------------------------------------------------------------------------------------------


def test_controlnets_map_onto_controlnet_specs_and_back() -> None:
    from streamdiff.config import ControlNetSpec

    s = apply_settings(BASE, {"controlnets": [{"name": "canny", "scale": 1, "end": 0.5, "low_threshold": 50}]},
                       LIMITS)
    assert s.prompt.controlnets == (ControlNetSpec("canny", 1.0, end=0.5, low_threshold=50),)
    again = apply_settings(BASE, json.loads(json.dumps(s.to_json())), None)
    assert again.prompt == s.prompt
    assert engine_changes(BASE, s) == {"controlnets": s.prompt.controlnets}
    assert apply_settings(s, {"controlnets": []}, LIMITS).prompt.controlnets == ()


@pytest.mark.parametrize("changes, field, code", [
    ({"controlnets": "canny"}, "settings.controlnets", "invalid_value"),
    ({"controlnets": [{"name": "a"}] * 5}, "settings.controlnets", "invalid_value"),
    ({"controlnets": [{"scale": 1}]}, "settings.controlnets[0].name", "invalid_value"),
    ({"controlnets": [{"name": "a", "scale": "1"}]}, "settings.controlnets[0].scale", "invalid_value"),
    ({"controlnets": [{"name": "a", "weight": 1}]}, "settings.controlnets[0].weight", "unknown_field"),
    ({"controlnets": [{"name": "a", "scale": 11}]}, "settings.controlnets", "invalid_value"),
    ({"controlnets": [{"name": "a", "start": 0.5, "end": 0.5}]}, "settings.controlnets", "invalid_value"),
    ({"controlnets": [{"name": "a", "preprocessor": "passthrough"}]}, "settings.controlnets", "not_allowed"),
])
def test_bad_controlnets_name_the_field(changes, field, code) -> None:
    error = _error(changes)
    assert (error.field, error.code.value) == (field, code), error
