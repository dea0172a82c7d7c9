"""A stream's settings on the wire (JSON) and in streamdiff (StreamConfig, PromptConfig, OutputConfig).

:func:`apply_settings` is the one way JSON settings become configuration: it checks JSON types (an integer is not
a boolean, a number is finite), applies each field with ``with_changes``/``dataclasses.replace`` so that streamdiff's
own validation decides what is valid, then checks the server's caps (:class:`ServerLimits`). Every failure is a
:class:`~streamdiff.errors.ProtocolError` naming the field (``settings.width``), the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..config import PromptConfig, StreamConfig, t_index_list_for_strength, to_enum
from ..errors import ConfigError, ProtocolError
from .images import ImageFormat
from .limits import ServerLimits
from .wire import ErrorCode, is_valid_unicode

__all__ = [
    "SETTING_FIELDS", "OutputConfig", "StreamSettings", "apply_settings", "check_caps", "engine_changes", "engine_refusal",
    "reshaped",
]


@dataclass(frozen=True)
class OutputConfig:
    """How the server encodes a stream's output frames."""

    format: ImageFormat = ImageFormat.JPEG
    quality: int = 80

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", to_enum(ImageFormat, self.format, "output format"))
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ConfigError(f"output quality={self.quality!r} is outside [1, 100]")


@dataclass(frozen=True)
class StreamSettings:
    """Everything a client may set for its stream: shapes and schedule, prompt and guidance, output encoding."""

    stream: StreamConfig = field(default_factory=StreamConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ip_adapter: str = ""  # the IP-Adapter (by the server's name for it) the stream's image prompt uses; "" none

    @property
    def strength(self) -> float:
        """The noise level the first step starts from: ``1 - t_index_list[0] / num_inference_steps``."""
        return 1.0 - self.stream.t_index_list[0] / self.stream.num_inference_steps

    def to_json(self) -> dict[str, Any]:
        """The effective settings as sent in ``ready`` and ``ack`` (docs/protocol.md, "Settings")."""
        s, p, f, o = self.stream, self.prompt, self.stream.filter, self.output
        return {
            "width": s.width, "height": s.height, "t_index_list": list(s.t_index_list),
            "num_inference_steps": s.num_inference_steps, "frame_buffer_size": s.frame_buffer_size,
            "cfg_type": s.cfg_type.value, "prompt": p.prompt, "negative_prompt": p.negative_prompt,
            "guidance_scale": p.guidance_scale, "delta": p.delta, "seed": p.seed,
            "ip_adapter": self.ip_adapter, "ip_adapter_scale": p.ip_adapter_scale,
            "controlnets": [asdict(spec) for spec in p.controlnets],
            "filter": {"enabled": f.enabled, "threshold": f.threshold, "max_skip_frames": f.max_skip_frames},
            "output": {"format": o.format.value, "quality": o.quality},
        }


# JSON type of each setting: "int", "number", "string", "bool", "int_list" or a nested table.
_FILTER_FIELDS = {"enabled": "bool", "threshold": "number", "max_skip_frames": "int"}
_OUTPUT_FIELDS = {"format": "string", "quality": "int"}
SETTING_FIELDS: dict[str, Any] = {
    "width": "int", "height": "int", "t_index_list": "int_list", "num_inference_steps": "int", "strength": "number",
    "steps": "int", "frame_buffer_size": "int", "cfg_type": "string", "prompt": "string",
    "negative_prompt": "string", "guidance_scale": "number", "delta": "number", "seed": "int",
    "ip_adapter": "string", "ip_adapter_scale": "number", "filter": _FILTER_FIELDS, "output": _OUTPUT_FIELDS,
    "controlnets": "controlnet_list",
}
# Each entry of "controlnets": a ControlNet the server offers, by the name its operator gave it, and how to use it.
_CONTROLNET_FIELDS = {"name": "string", "scale": "number", "start": "number", "end": "number",
                      "preprocessor": "string", "low_threshold": "int", "high_threshold": "int"}
MAX_CONTROLNETS = 4
_STREAM_SINGLE = ("width", "height", "frame_buffer_size", "cfg_type")
_TIMESTEPS = ("t_index_list", "num_inference_steps", "strength", "steps")
_PROMPT = ("prompt", "negative_prompt", "guidance_scale", "delta", "seed", "ip_adapter_scale")
_TYPE_NAMES = {"int": "an integer", "number": "a finite number", "string": "a string", "bool": "true or false",
               "int_list": "a list of integers"}


def apply_settings(
    current: StreamSettings, changes: Any, limits: ServerLimits | None = None, *, path: str = "settings"
) -> StreamSettings:
    """``current`` with the JSON object ``changes`` applied (only the fields it names), validated and capped.

    ``strength`` and ``steps`` are converted with :func:`~streamdiff.config.t_index_list_for_strength`; they may
    not come with ``t_index_list``. ``limits=None`` skips the server's caps (a client parsing ``ready``).
    """
    _check_types(changes, SETTING_FIELDS, path)
    stream, prompt, output = current.stream, current.prompt, current.output
    for name in _STREAM_SINGLE:
        if name in changes:
            stream = _apply(stream, {name: changes[name]}, f"{path}.{name}", changes[name])
    if any(name in changes for name in _TIMESTEPS):
        stream = _apply_timesteps(stream, changes, path)
    if "filter" in changes:
        filt = stream.filter
        for name, value in changes["filter"].items():
            filt = _apply(filt, {name: _number(value, _FILTER_FIELDS[name])}, f"{path}.filter.{name}", value)
        stream = stream.with_changes(filter=filt)
    for name in _PROMPT:
        if name in changes:
            prompt = _apply(prompt, {name: _number(changes[name], SETTING_FIELDS[name])}, f"{path}.{name}",
                            changes[name])
    if "controlnets" in changes:
        entries = tuple({k: _number(v, _CONTROLNET_FIELDS[k]) for k, v in entry.items()}
                        for entry in changes["controlnets"])
        prompt = _apply(prompt, {"controlnets": entries}, f"{path}.controlnets", changes["controlnets"])
    if "output" in changes:
        for name, value in changes["output"].items():
            output = _apply(output, {name: value}, f"{path}.output.{name}", value)
    ip_adapter = changes.get("ip_adapter", current.ip_adapter)
    if ip_adapter == "" and prompt.reference_image is not None:  # no IP-Adapter: no image prompt
        prompt = replace(prompt, reference_image=None)
    settings = StreamSettings(stream, prompt, output, ip_adapter)
    if limits is not None:
        check_caps(settings, limits, path=path, steps_field="steps" if "steps" in changes else "t_index_list")
    return settings


def check_caps(settings: StreamSettings, limits: ServerLimits, *, path: str = "settings",
               steps_field: str = "t_index_list") -> None:
    """Raise ProtocolError(``not_allowed``) when ``settings`` asks for more than ``limits`` allow."""
    s, m = settings.stream, limits.size_multiple
    for name, cap in (("width", limits.max_width), ("height", limits.max_height)):
        value = getattr(s, name)
        if value > cap or value % m:
            _not_allowed(f"{path}.{name}", value, f"a multiple of {m} in [{m}, {cap}]")
    if limits.sizes and f"{s.width}x{s.height}" not in limits.sizes:
        name = "width" if all(not size.startswith(f"{s.width}x") for size in limits.sizes) else "height"
        _not_allowed(f"{path}.{name}", getattr(s, name), "one of the sizes " + ", ".join(limits.sizes),
                     f"{s.width}x{s.height} is not one of this server's sizes ({', '.join(limits.sizes)})")
    if s.denoising_steps > limits.max_steps:
        value = s.denoising_steps if steps_field == "steps" else list(s.t_index_list)
        _not_allowed(f"{path}.{steps_field}", value, f"at most {limits.max_steps} denoising steps",
                     f"{s.denoising_steps} denoising steps are more than this server's {limits.max_steps}")
    if s.frame_buffer_size > limits.max_frame_buffer_size:
        _not_allowed(f"{path}.frame_buffer_size", s.frame_buffer_size, f"[1, {limits.max_frame_buffer_size}]")
    if s.cfg_type not in limits.allowed_cfg_types:
        _not_allowed(f"{path}.cfg_type", s.cfg_type.value, ", ".join(c.value for c in limits.allowed_cfg_types))
    if settings.ip_adapter and settings.ip_adapter != limits.ip_adapter:
        allowed = f'"{limits.ip_adapter}" or ""' if limits.ip_adapter else '"" (this server offers no IP-Adapter)'
        _not_allowed(f"{path}.ip_adapter", settings.ip_adapter, allowed)
    for spec in settings.prompt.controlnets:
        if spec.preprocessor == "passthrough":  # the wire carries no control images (yet)
            _not_allowed(f"{path}.controlnets", spec.preprocessor, "the preprocessor canny",
                         f"controlnet {spec.name!r}: preprocessor 'passthrough' needs control images, which this "
                         "server's protocol does not carry; use 'canny'")
    for name in ("prompt", "negative_prompt"):
        value = getattr(settings.prompt, name)
        if len(value) > limits.max_prompt_chars:
            _not_allowed(f"{path}.{name}", value, f"at most {limits.max_prompt_chars} characters",
                         f"{path}.{name} has {len(value)} characters, more than {limits.max_prompt_chars}")


def engine_changes(previous: StreamSettings, new: StreamSettings) -> dict[str, Any]:
    """The changed fields as keyword arguments for ``StreamPipeline.update`` (output encoding excluded)."""
    out: dict[str, Any] = {}
    for name in ("width", "height", "t_index_list", "num_inference_steps", "frame_buffer_size", "cfg_type", "filter"):
        if getattr(new.stream, name) != getattr(previous.stream, name):
            out[name] = getattr(new.stream, name)
    for name in (*_PROMPT, "reference_image", "controlnets"):
        if getattr(new.prompt, name) != getattr(previous.prompt, name):
            out[name] = getattr(new.prompt, name)
    return out


# -- helpers ----------------------------------------------------------------------------------------------------


def _check_types(changes: Any, table: dict[str, Any], path: str) -> None:
    if not isinstance(changes, dict):
        raise ProtocolError(f"{path} must be a JSON object", code=ErrorCode.INVALID_VALUE, field=path,
                            value=changes, allowed="an object")
    unknown = sorted(k for k in changes if k not in table)
    if unknown:
        allowed = ", ".join(table)
        raise ProtocolError(f"{path}.{unknown[0]} is not a known setting; allowed: {allowed}",
                            code=ErrorCode.UNKNOWN_FIELD, field=f"{path}.{unknown[0]}", allowed=allowed)
    for name, value in changes.items():
        kind = table[name]
        if kind == "controlnet_list":
            _check_controlnets(value, f"{path}.{name}")
        elif isinstance(kind, dict):
            _check_types(value, kind, f"{path}.{name}")
        elif not _is_type(value, kind):
            raise ProtocolError(f"{path}.{name} must be {_TYPE_NAMES[kind]}, got {_describe(value)}",
                                code=ErrorCode.INVALID_VALUE, field=f"{path}.{name}", value=value,
                                allowed=_TYPE_NAMES[kind])


def _check_controlnets(value: Any, path: str) -> None:
    """A list of at most MAX_CONTROLNETS objects of ``_CONTROLNET_FIELDS``, each with a name."""
    if not isinstance(value, list) or len(value) > MAX_CONTROLNETS:
        raise ProtocolError(f"{path} must be a list of at most {MAX_CONTROLNETS} objects, got {_describe(value)}",
                            code=ErrorCode.INVALID_VALUE, field=path, value=value if not isinstance(value, list)
                            else len(value), allowed=f"a list of at most {MAX_CONTROLNETS} objects")
    for i, entry in enumerate(value):
        _check_types(entry, _CONTROLNET_FIELDS, f"{path}[{i}]")
        if "name" not in entry:
            raise ProtocolError(f"{path}[{i}] has no name", code=ErrorCode.INVALID_VALUE, field=f"{path}[{i}].name",
                                allowed="the name of a ControlNet this server offers")


def _is_type(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an integer beyond the float range
            return False
    if kind == "string":
        return isinstance(value, str) and is_valid_unicode(value)
    if kind == "bool":
        return isinstance(value, bool)
    return isinstance(value, list) and all(_is_type(v, "int") for v in value)


def _number(value: Any, kind: str) -> Any:
    return float(value) if kind == "number" else value


def _apply(config: Any, change: dict[str, Any], where: str, value: Any) -> Any:
    try:
        return config.with_changes(**change) if isinstance(config, StreamConfig) else replace(config, **change)
    except ConfigError as exc:
        raise ProtocolError(str(exc), code=ErrorCode.INVALID_VALUE, field=where, value=value) from None


def _apply_timesteps(stream: StreamConfig, changes: dict[str, Any], path: str) -> StreamConfig:
    """t_index_list, num_inference_steps, strength and steps change together: validated as one."""
    steps_n = changes.get("num_inference_steps", stream.num_inference_steps)
    by_strength = "strength" in changes or "steps" in changes
    if by_strength and "t_index_list" in changes:
        raise ProtocolError(f"{path}: give t_index_list or strength/steps, not both", code=ErrorCode.INVALID_VALUE,
                            field=f"{path}.t_index_list", value=changes["t_index_list"],
                            allowed="t_index_list alone, or strength and/or steps")
    if "num_inference_steps" in changes:  # is the new N valid on its own?
        _apply(stream, {"num_inference_steps": steps_n, "t_index_list": (0,)}, f"{path}.num_inference_steps",
               steps_n)
    t_index_list = changes.get("t_index_list", stream.t_index_list)
    if by_strength:
        strength = float(changes.get("strength", 1.0 - stream.t_index_list[0] / stream.num_inference_steps))
        steps = changes.get("steps", stream.denoising_steps)
        try:
            t_index_list = t_index_list_for_strength(strength, steps, steps_n)
        except ConfigError as exc:
            name = "strength"
            if "steps" in changes:
                try:
                    t_index_list_for_strength(strength, 1, steps_n)
                    name = "steps"
                except ConfigError:
                    pass
            raise ProtocolError(str(exc), code=ErrorCode.INVALID_VALUE, field=f"{path}.{name}",
                                value=changes.get(name, strength)) from None
    name = "t_index_list" if "t_index_list" in changes else (
        ("strength" if "strength" in changes else "steps") if by_strength else "num_inference_steps")
    return _apply(stream, {"num_inference_steps": steps_n, "t_index_list": tuple(t_index_list)}, f"{path}.{name}",
                  changes.get(name, list(t_index_list)))


def _not_allowed(where: str, value: Any, allowed: str, message: str | None = None) -> None:
    raise ProtocolError(message or f"{where}={value!r} is not allowed by this server; allowed: {allowed}",
                        code=ErrorCode.NOT_ALLOWED, field=where, value=value, allowed=allowed)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if len(value) > 40 else f"string {value!r}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    text = repr(value)
    return f"number {text}" if len(text) <= 40 else f"a number of {len(text)} digits"


def reshaped(previous: StreamSettings, new: StreamSettings) -> str | None:
    """The first setting whose change rebuilds the stream's state on the engine, or None."""
    old, s = previous.stream, new.stream
    for name in ("width", "height", "frame_buffer_size", "cfg_type"):
        if getattr(s, name) != getattr(old, name):
            return name
    return "t_index_list" if s.denoising_steps != old.denoising_steps else None


def engine_refusal(error: ConfigError, names: Any, settings: StreamSettings) -> ProtocolError:
    """A ProtocolError(``not_allowed``) for ``settings`` the engine refused, naming the field, the value and what is
    allowed from the ConfigError's own ``field``/``value``/``allowed``; the field is looked for in its message only
    when the raiser did not set it, and the value is then the setting's own."""
    text = str(error)
    name = error.field.split()[0] if error.field else None  # "t_index_list entry" names t_index_list
    if name == "size":  # the engine's size list refuses the pair: the wire has width and height
        name = "width"
    if name is None:
        found = [(m.start(), n) for n in names if (m := re.search(rf"\b{re.escape(n)}\b(=| entry)", text))]
        name = min(found)[1] if found else (next(iter(names)) if len(names) == 1 else None)
    extra = {"value": error.value} if error.has_value else {}
    if not extra and name is not None:
        for part in (settings.stream, settings.prompt):
            if hasattr(part, name):
                value = getattr(part, name)
                extra = {"value": list(value) if isinstance(value, tuple) else getattr(value, "value", value)}
                break
    return ProtocolError(f"this server's engine cannot run these settings: {text}", code=ErrorCode.NOT_ALLOWED,
                         field="settings" if name is None else f"settings.{name}",
                         allowed=error.allowed or "settings this engine runs", **extra)
