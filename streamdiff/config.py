"""Frozen configuration dataclasses, validated once at construction.

Each concern has one dataclass; strings are accepted for enum fields and converted in ``__post_init__`` so that the
hot path only ever compares enums. Every invalid value raises :class:`~streamdiff.errors.ConfigError` naming the value
and what is allowed.
"""

from __future__ import annotations

import enum
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
        raise ConfigError(f"{name}={value!r} is not one of {allowed}") from None


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
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"filter threshold={self.threshold!r} is outside [0, 1)")
        if isinstance(self.max_skip_frames, bool) or not isinstance(self.max_skip_frames, int):
            raise ConfigError(f"max_skip_frames={self.max_skip_frames!r} must be an integer >= 0")
        if self.max_skip_frames < 0:
            raise ConfigError(f"max_skip_frames={self.max_skip_frames} must be >= 0")


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
        for name in ("width", "height", "num_inference_steps", "frame_buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r} must be an integer")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 8 <= value <= 4096:
                raise ConfigError(f"{name}={value} is outside [8, 4096]")
        if self.frame_buffer_size < 1:
            raise ConfigError(f"frame_buffer_size={self.frame_buffer_size} must be >= 1")
        if not 1 <= self.num_inference_steps <= 1000:
            raise ConfigError(f"num_inference_steps={self.num_inference_steps} is outside [1, 1000]")
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
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength={strength!r} is outside (0, 1]")
    if not 1 <= steps <= num_inference_steps:
        raise ConfigError(f"steps={steps} is outside [1, {num_inference_steps}]")
    start = min(int(round((1.0 - strength) * num_inference_steps)), num_inference_steps - steps)
    span = num_inference_steps - start
    out = tuple(start + (span * i) // steps for i in range(steps))
    validate_t_index_list(out, num_inference_steps)
    return out


@dataclass(frozen=True)
class PromptConfig:
    """What the stream is asked to produce; changes live without new buffers."""

    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = 1.2
    delta: float = 1.0
    seed: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ConfigError(f"prompt={self.prompt!r} must be a string")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"negative_prompt={self.negative_prompt!r} must be a string")
        if not 0.0 <= float(self.guidance_scale) <= 50.0:
            raise ConfigError(f"guidance_scale={self.guidance_scale!r} is outside [0, 50]")
        if not 0.0 <= float(self.delta) <= 10.0:
            raise ConfigError(f"delta={self.delta!r} is outside [0, 10]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed={self.seed!r} must be an integer in [0, 2**63)")
