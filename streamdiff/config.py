"""Frozen configuration dataclasses, validated once at construction.

Each concern has one dataclass; strings are accepted for enum fields and converted in ``__post_init__`` so that the
hot path only ever compares enums. Every invalid value raises :class:`~streamdiff.errors.ConfigError` naming the value
and what is allowed.
"""

from __future__ import annotations

import enum
import math
import numbers
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from .errors import ConfigError

E = TypeVar("E", bound=enum.Enum)


class CfgMode(str, enum.Enum):
    """Residual classifier-free guidance mode (StreamDiffusion paper, Sec. 3.3).

    ``NONE``: no guidance (U-Net batch n·F). ``FULL``: conventional CFG with a real negative pass per slot (2n·F).
    ``SELF``: RCFG with the residual noise as virtual negative, no extra U-Net work (n·F). ``INITIALIZE``: RCFG whose
    virtual negative is seeded by one real negative pass at the first step (n·F + F).
    """

    NONE = "none"
    FULL = "full"
    SELF = "self"
    INITIALIZE = "initialize"


class StreamMode(str, enum.Enum):
    """What enters slot 0 of the Stream Batch: an encoded input frame, or pure noise."""

    IMG2IMG = "img2img"
    TXT2IMG = "txt2img"


class Precision(str, enum.Enum):
    """Compute precision of the model weights and activations."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Quantization(str, enum.Enum):
    """Weight quantisation of a compiled U-Net (opt-in; the VAE is never quantised).

    ``INT8_WEIGHTS``: NNCF's int8 weight-only compression (asymmetric, per output channel) of the OpenVINO U-Net;
    activations keep the model's precision. ``INT8``: NNCF's full int8 quantisation (weights and activations) of the
    OpenVINO U-Net, its activation ranges calibrated on U-Net inputs made as the engine makes them
    (:class:`Calibration`). PSNR against the float engine: docs/engines.md.
    """

    NONE = "none"
    INT8_WEIGHTS = "int8-weights"
    INT8 = "int8"


CALIBRATION_SAMPLES = (4, 256)  # the bounds of Calibration.samples
CALIBRATION_PROMPTS = (
    "a photo of a red fox in the snow, detailed", "an oil painting of a city street at night",
    "a portrait of a woman, soft light, 85mm", "a watercolour landscape with mountains and a lake",
)


@dataclass(frozen=True)
class Calibration:
    """The calibration set of a fully quantised U-Net (``Quantization.INT8``): what NNCF measures activation
    ranges on, made as the engine makes U-Net inputs, deterministic from ``seed``.

    ``samples`` U-Net calls (each of the engine's tuned batch), in [4, 256]. Each row holds a frame of the test pattern
    (:func:`~streamdiff.core.image.pattern_frame`, a different frame per sample), VAE-encoded, noised to one of the
    timesteps of ``t_index_list`` (indices into ``num_inference_steps`` LCM steps, as ``StreamConfig``'s) with
    seeded noise, and the hidden states of one of ``prompts`` (rows past the slots get the empty prompt, as the
    negative rows of CFG do). ``t_index_list=None``: the stream's, fixed when the engine is first built for it
    (:meth:`for_stream`); an engine planned without a stream takes ``StreamConfig``'s default.
    """

    samples: int = 32
    seed: int = 0
    t_index_list: tuple[int, ...] | None = None
    num_inference_steps: int = 50
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS

    def __post_init__(self) -> None:
        check_int("calibration samples", self.samples, *CALIBRATION_SAMPLES)
        check_int("calibration seed", self.seed, 0, 2**63 - 1)
        check_int("calibration num_inference_steps", self.num_inference_steps, 1, 1000)
        if self.t_index_list is not None:
            object.__setattr__(self, "t_index_list", tuple(self.t_index_list))
            validate_t_index_list(self.t_index_list, self.num_inference_steps)
        if isinstance(self.prompts, str) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ConfigError(f"calibration prompts={self.prompts!r} must be a non-empty sequence of strings",
                              field="calibration prompts", value=self.prompts, allowed="a non-empty list of strings")
        object.__setattr__(self, "prompts", tuple(self.prompts))

    def for_stream(self, config: StreamConfig) -> Calibration:
        """This calibration at ``config``'s timesteps when it names none itself (else unchanged)."""
        if self.t_index_list is not None:
            return self
        return replace(self, t_index_list=config.t_index_list, num_inference_steps=config.num_inference_steps)


class BackendKind(str, enum.Enum):
    """Which engine runs the U-Net and the VAE."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"
    AUTO = "auto"


def to_enum(enum_cls: type[E], value: Any, name: str) -> E:
    """Convert ``value`` to ``enum_cls`` or raise a ConfigError listing the allowed values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower())
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{name}={value!r} is not one of {allowed}", field=name, value=value,
                          allowed=", ".join(str(m.value) for m in enum_cls)) from None


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ConfigError: no truthiness, so ``'no'``, ``0`` and ``None`` are refused."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be True or False, not {type(value).__name__}", field=name,
                          value=value, allowed="true or false")
    return value


def _interval(minimum: Any, maximum: Any, min_open: bool = False, max_open: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f"{'(' if min_open else '['}{minimum}, {maximum}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{'>' if min_open else '>='} {minimum}"
    return f"{'<' if max_open else '<='} {maximum}"


def _check_range(name: str, value: Any, minimum: Any, maximum: Any, min_open: bool, max_open: bool) -> None:
    low_ok = minimum is None or (value > minimum if min_open else value >= minimum)
    high_ok = maximum is None or (value < maximum if max_open else value <= maximum)
    if low_ok and high_ok:
        return
    interval = _interval(minimum, maximum, min_open, max_open)
    if minimum is not None and maximum is not None:
        raise ConfigError(f"{name}={value!r} is outside {interval}", field=name, value=value, allowed=interval)
    raise ConfigError(f"{name}={value!r} must be {interval}", field=name, value=value, allowed=interval)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) in [minimum, maximum], else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        wanted = "an integer"
        if minimum is not None or maximum is not None:
            interval = _interval(minimum, maximum)
            wanted += f" in {interval}" if minimum is not None and maximum is not None else f" {interval}"
        raise ConfigError(f"{name}={value!r} must be {wanted}, not {type(value).__name__}", field=name, value=value,
                          allowed=wanted)
    value = int(value)
    _check_range(name, value, minimum, maximum, False, False)
    return value


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number (not a bool, not NaN or ±inf) inside the interval, else a
    ConfigError. ``min_open``/``max_open`` exclude the bound itself."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} must be a number, not {type(value).__name__}", field=name, value=value,
                          allowed="a number")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number", field=name, value=value,
                          allowed="a finite number")
    _check_range(name, value, minimum, maximum, min_open, max_open)
    return float(value)


def parse_size(value: Any, what: str = "size") -> tuple[int, int]:
    """A frame size as (width, height): ``"640x480"`` (also ``640X480``, ``640*480``), a bare ``"512"`` or ``512``
    meaning a square 512x512, or a ``(width, height)`` pair. Both sides must be positive integers.

    The one parser of sizes: every command option (``--size``, ``--output-size``, ``--camera-size``), the TOML
    config file and source specs (``testpattern:WxH``) go through it.
    """
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{what}={value!r} must be [width, height]")
        width, height = (check_int(f"{what} {side}", v, 1) for side, v in zip(("width", "height"), value))
        return width, height
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        side = check_int(what, value, 1)
        return side, side
    match = re.fullmatch(r"\s*([0-9]+)\s*(?:[xX*]\s*([0-9]+)\s*)?", value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{what}={value!r} is not WIDTHxHEIGHT or a single N for NxN (e.g. 512x512 or 512)")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) is not None else width
    if min(width, height) < 1:
        raise ConfigError(f"{what}={value!r} must have positive sides (e.g. 512x512)")
    return width, height


def parse_int_list(value: Any, what: str = "t_index_list") -> tuple[int, ...]:
    """``"32,45"``, ``32`` or ``[32, 45]`` → ``(32, 45)``; anything else is a ConfigError naming ``what``."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if not all(re.fullmatch(r"[+-]?[0-9]+", part) for part in parts):
            raise ConfigError(f"{what}={value!r} is not a comma-separated list of integers (e.g. 32,45)")
        return tuple(int(part) for part in parts)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, (list, tuple)):
        return tuple(check_int(f"{what} entry", entry) for entry in value)
    raise ConfigError(f"{what}={value!r} is not a list of integers (e.g. 32,45)")


@dataclass(frozen=True)
class FilterConfig:
    """Stochastic similarity filter (StreamDiffusion paper, Sec. 3.5).

    A frame whose cosine similarity with the last processed input is ``sim`` is skipped with probability
    ``max(0, 1 - (1 - sim) / (1 - threshold))``; never more than ``max_skip_frames`` skips in a row.
    """

    enabled: bool = False
    threshold: float = 0.98
    max_skip_frames: int = 10

    def __post_init__(self) -> None:
        check_bool("enabled", self.enabled)
        object.__setattr__(self, "threshold", check_number("threshold", self.threshold, 0, 1, max_open=True))
        object.__setattr__(self, "max_skip_frames", check_int("max_skip_frames", self.max_skip_frames, 0))


@dataclass(frozen=True)
class StreamConfig:
    """Everything that shapes one stream's buffers and schedule.

    ``t_index_list`` indexes the ``num_inference_steps`` timesteps of an LCM schedule (0 = noisiest). Its length ``n``
    and ``frame_buffer_size`` F fix the U-Net batch: one call denoises n·F latents (more with CFG, see
    :class:`CfgMode`). Changing any field other than the prompt/guidance/seed needs new buffers; the pipeline's
    ``update`` handles that.
    """

    width: int = 512
    height: int = 512
    t_index_list: tuple[int, ...] = (32, 45)
    num_inference_steps: int = 50
    frame_buffer_size: int = 1
    cfg_type: CfgMode = CfgMode.SELF
    mode: StreamMode = StreamMode.IMG2IMG
    use_denoising_batch: bool = True
    add_noise: bool = True
    filter: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg_type", to_enum(CfgMode, self.cfg_type, "cfg_type"))
        object.__setattr__(self, "mode", to_enum(StreamMode, self.mode, "mode"))
        if isinstance(self.filter, dict):
            object.__setattr__(self, "filter", FilterConfig(**self.filter))
        if not isinstance(self.filter, FilterConfig):
            raise ConfigError(f"filter={self.filter!r} must be a FilterConfig")
        for name, minimum, maximum in (
            ("width", 8, 4096), ("height", 8, 4096), ("num_inference_steps", 1, 1000), ("frame_buffer_size", 1, None)
        ):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum, maximum))
        check_bool("use_denoising_batch", self.use_denoising_batch)
        check_bool("add_noise", self.add_noise)
        try:
            t_list = tuple(self.t_index_list)
        except TypeError:
            raise ConfigError(f"t_index_list={self.t_index_list!r} must be a list of integers") from None
        object.__setattr__(self, "t_index_list", t_list)
        validate_t_index_list(t_list, self.num_inference_steps)

    @property
    def denoising_steps(self) -> int:
        """n: the number of denoising steps each frame goes through."""
        return len(self.t_index_list)

    @property
    def batch_size(self) -> int:
        """Latents in the Stream Batch: n·F with the denoising batch, F without."""
        return self.denoising_steps * self.frame_buffer_size if self.use_denoising_batch else self.frame_buffer_size

    def with_changes(self, **changes: Any) -> StreamConfig:
        """A copy with ``changes`` applied and validated again."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown StreamConfig field(s) {unknown}; allowed: {sorted(known)}")
        return replace(self, **changes)


def validate_t_index_list(t_index_list: tuple[int, ...], num_inference_steps: int) -> None:
    """Raise ConfigError unless ``t_index_list`` is a non-empty strictly increasing list inside [0, steps)."""
    if len(t_index_list) == 0:
        raise ConfigError("t_index_list is empty; give at least one timestep index, e.g. [32, 45]")
    previous = -1
    for entry in t_index_list:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise ConfigError(f"t_index_list entry {entry!r} is not an integer")
        if not 0 <= entry < num_inference_steps:
            raise ConfigError(f"t_index_list entry {entry} is outside [0, {num_inference_steps})")
        if entry <= previous:
            raise ConfigError(f"t_index_list {list(t_index_list)} must be strictly increasing")
        previous = entry


def t_index_list_for_strength(strength: float, steps: int, num_inference_steps: int = 50) -> tuple[int, ...]:
    """A t_index_list of ``steps`` entries that denoises from noise level ``strength`` (1 = pure noise) to the end.

    ``strength=0.5, steps=2`` gives ``(25, 37)``-like lists: the first index is ``round((1 - strength) * N)`` and the
    rest are spaced evenly towards ``N``.
    """
    strength = check_number("strength", strength, 0, 1, min_open=True)
    steps = check_int("steps", steps, 1, num_inference_steps)
    start = min(int(round((1.0 - strength) * num_inference_steps)), num_inference_steps - steps)
    span = num_inference_steps - start
    out = tuple(start + (span * i) // steps for i in range(steps))
    validate_t_index_list(out, num_inference_steps)
    return out


# The largest side of a reference image (IP-Adapter image prompt); the image encoder sees it at ~224 px anyway.
MAX_REFERENCE_SIDE = 4096


@dataclass(frozen=True)
class ReferenceImage:
    """An image prompt (IP-Adapter): uint8 RGB pixels ``[H, W, 3]``, kept read-only, named by their ``digest``.

    Two reference images are equal when their pixels are: the engine embeds each distinct image once.
    Build with :meth:`from_pixels` (copies the array).
    """

    pixels: Any = field(compare=False, repr=False)  # numpy uint8 [H, W, 3], read-only
    digest: str = ""  # sha256 of the shape and the bytes

    def __post_init__(self) -> None:
        import hashlib

        import numpy as np

        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            shape = getattr(pixels, "shape", None)
            raise ConfigError(f"reference_image must be uint8 RGB pixels [H, W, 3], got {type(pixels).__name__} "
                              f"{getattr(pixels, 'dtype', '')} {shape}", field="reference_image",
                              allowed="uint8 [H, W, 3]")
        height, width = pixels.shape[:2]
        if not (1 <= height <= MAX_REFERENCE_SIDE and 1 <= width <= MAX_REFERENCE_SIDE):
            raise ConfigError(f"reference_image of {width}x{height} px: each side must be in [1, {MAX_REFERENCE_SIDE}]",
                              field="reference_image", value=(width, height),
                              allowed=f"sides in [1, {MAX_REFERENCE_SIDE}]")
        if pixels.flags.writeable:
            pixels = np.array(pixels, copy=True)
            pixels.flags.writeable = False
            object.__setattr__(self, "pixels", pixels)
        digest = hashlib.sha256(repr(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()
        object.__setattr__(self, "digest", digest)

    @classmethod
    def from_pixels(cls, pixels: Any) -> ReferenceImage:
        """From uint8 ``[H, W, 3]`` (numpy, or anything ``numpy.asarray`` turns into that, e.g. a PIL RGB image)."""
        import numpy as np

        return cls(np.array(pixels, copy=True) if not isinstance(pixels, np.ndarray) else pixels)


@dataclass(frozen=True)
class ControlNetSpec:
    """One ControlNet a stream uses, by the name the engine gives it, and how (all of it live).

    ``scale``: diffusers' ``controlnet_conditioning_scale``. ``start``/``end``: the fraction of the stream's denoising
    steps during which it acts (diffusers' ``control_guidance_start``/``end``: step k of n acts when
    ``start <= k/n`` and ``(k+1)/n <= end``). ``preprocessor``: what makes the control image from the input frame
    (``canny``, with ``low_threshold``/``high_threshold``) or ``passthrough`` (the client supplies the control image
    with each frame, ``stream.submit(frame, control_image=...)``); other names are plugins the engine registers.
    """

    name: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "canny"
    low_threshold: int = 100
    high_threshold: int = 200

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"controlnet name={self.name!r} must be a non-empty string", field="name",
                              value=self.name, allowed="a ControlNet name the engine offers")
        object.__setattr__(self, "scale", check_number("scale", self.scale, 0, 10))
        object.__setattr__(self, "start", check_number("start", self.start, 0, 1))
        object.__setattr__(self, "end", check_number("end", self.end, 0, 1))
        if self.start >= self.end:
            raise ConfigError(f"controlnet {self.name!r}: start={self.start} must be below end={self.end}",
                              field="start", value=self.start, allowed=f"[0, {self.end})")
        if not isinstance(self.preprocessor, str) or not re.fullmatch(r"[a-z0-9_-]+", self.preprocessor):
            raise ConfigError(f"preprocessor={self.preprocessor!r} must be a name such as 'canny' or 'passthrough'",
                              field="preprocessor", value=self.preprocessor, allowed="canny, passthrough")
        object.__setattr__(self, "low_threshold", check_int("low_threshold", self.low_threshold, 0, 255))
        object.__setattr__(self, "high_threshold", check_int("high_threshold", self.high_threshold,
                                                             self.low_threshold, 255))


def _controlnet_specs(value: Any) -> tuple[ControlNetSpec, ...]:
    """``value`` (ControlNetSpecs, dicts of their fields, or names) as a tuple of specs with distinct names."""
    if isinstance(value, (str, dict, ControlNetSpec)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"controlnets={value!r} must be a list of ControlNet settings", field="controlnets",
                          value=value, allowed="a list of {name, scale, start, end, preprocessor}")
    specs = []
    for entry in value:
        if isinstance(entry, str):
            entry = ControlNetSpec(entry)
        elif isinstance(entry, dict):
            unknown = sorted(set(entry) - {f.name for f in fields(ControlNetSpec)})
            if unknown:
                raise ConfigError(f"unknown controlnet setting(s) {unknown}; allowed: "
                                  f"{[f.name for f in fields(ControlNetSpec)]}", field="controlnets", value=entry)
            if "name" not in entry:
                raise ConfigError(f"controlnet {entry!r} has no name", field="controlnets", value=entry)
            entry = ControlNetSpec(**entry)
        elif not isinstance(entry, ControlNetSpec):
            raise ConfigError(f"controlnets entry {entry!r} must be a ControlNetSpec, a dict or a name",
                              field="controlnets", value=entry)
        specs.append(entry)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"controlnets {names} name a ControlNet twice", field="controlnets", value=names)
    return tuple(specs)


@dataclass(frozen=True)
class PromptConfig:
    """What the stream is asked to produce; changes live without new buffers.

    ``reference_image`` (an image prompt, for an engine with an IP-Adapter) and ``ip_adapter_scale`` (its weight)
    change live too; the image is embedded once per distinct image.
    """

    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = 1.2
    delta: float = 1.0
    seed: int = 2
    ip_adapter_scale: float = 1.0
    reference_image: ReferenceImage | None = None
    controlnets: tuple[ControlNetSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ConfigError(f"prompt={self.prompt!r} must be a string")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"negative_prompt={self.negative_prompt!r} must be a string")
        object.__setattr__(self, "guidance_scale", check_number("guidance_scale", self.guidance_scale, 0, 50))
        object.__setattr__(self, "delta", check_number("delta", self.delta, 0, 10))
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0, 2**63 - 1))
        object.__setattr__(self, "ip_adapter_scale", check_number("ip_adapter_scale", self.ip_adapter_scale, 0, 10))
        if self.reference_image is not None and not isinstance(self.reference_image, ReferenceImage):
            object.__setattr__(self, "reference_image", ReferenceImage.from_pixels(self.reference_image))
        object.__setattr__(self, "controlnets", _controlnet_specs(self.controlnets))
