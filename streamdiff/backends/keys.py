"""What a compiled engine is built for: components, shape ranges, build options and the engine cache key.

Everything here is pure data derived from a :class:`~streamdiff.config.StreamConfig`, a loaded model and
:class:`EngineOptions`; nothing touches a device except :func:`target_id`, which names the hardware an artifact is
compiled for (GPU compute capability or CPU ISA). The cache key (:class:`EngineKey`) holds every input that changes a
built artifact, so a changed resolution range, LoRA scale or library version can never reuse a stale engine;
streamdiff's own part is :data:`ENGINE_FORMAT`, not its package version, so a release that leaves artifacts unchanged
keeps them.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Calibration, Quantization, StreamConfig, check_bool, check_int, to_enum
from ..errors import ConfigError
from ..core.guidance import call_rows

if TYPE_CHECKING:
    from ..models import LoadedModel

ENGINE_DIR_ENV = "STREAMDIFF_ENGINE_DIR"
DEFAULT_OPSET = 17
DEFAULT_MIN_RESOLUTION = 256
DEFAULT_MAX_RESOLUTION = 1024
DEFAULT_OPT_RESOLUTION = 512


class Component(str, enum.Enum):
    """A part of the model that becomes one engine."""

    UNET = "unet"
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER = "vae_decoder"
    CONTROLNET = "controlnet"  # a ControlNet compiled beside the U-Net (its key names the ControlNet's weights)


def default_engine_dir() -> Path:
    """``$STREAMDIFF_ENGINE_DIR`` or ``engines/`` in the current directory."""
    return Path(os.environ.get(ENGINE_DIR_ENV) or "engines")


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built and where they are kept.

    ``min_resolution``/``max_resolution`` bound the image side (pixels) an engine accepts; None takes 256–1024,
    widened in steps (64, 8 below; 2048, 4096 above) to include the configured size, so a size change inside the
    range needs no rebuild. ``batch_sizes`` adds U-Net
    batch sizes to the profile beyond what the configuration needs. ``compile`` asks the torch backend for an
    AOTInductor-compiled U-Net (cached); ``channels_last`` applies to the eager torch backend (CUDA graphs, for torch
    and TensorRT alike, are ``EngineConfig.cuda_graphs``). ``onnx_providers``: ONNX Runtime's execution providers on
    a GPU, in order of preference (``("CUDAExecutionProvider",)``); empty means TensorRT's, then CUDA's.
    ``quantize``: ``"int8-weights"`` compresses the OpenVINO U-Net's weights to int8, ``"int8"`` quantises its
    weights and activations to int8 (:class:`Quantization`), calibrated on ``calibration`` (:class:`Calibration`;
    only ``int8`` reads it, and only then is it part of the U-Net's cache key).
    ``controlnet_residuals``: the compiled U-Net engines take ControlNet residual inputs (zeros in calls without
    control; see :mod:`streamdiff.backends.unet_inputs`); building for ControlNets sets it
    (``backends.factory.with_controlnets``).
    """

    engine_dir: Path | str | None = None
    compile: bool = False
    channels_last: bool = False
    min_resolution: int | None = None
    max_resolution: int | None = None
    opt_resolution: int = DEFAULT_OPT_RESOLUTION
    batch_sizes: tuple[int, ...] = ()
    opset: int = DEFAULT_OPSET
    verify: bool = True
    onnx_providers: tuple[str, ...] = ()
    quantize: Quantization | str = Quantization.NONE
    controlnet_residuals: bool = False
    calibration: Calibration = Calibration()

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", to_enum(Quantization, self.quantize, "quantize"))
        if not isinstance(self.calibration, Calibration):
            raise ConfigError(f"calibration={self.calibration!r} must be a Calibration", field="calibration",
                              value=self.calibration, allowed="a streamdiff.Calibration")
        object.__setattr__(self, "onnx_providers", tuple(self.onnx_providers))
        for name in ("compile", "channels_last", "verify", "controlnet_residuals"):
            check_bool(name, getattr(self, name))
        if check_int("opset", self.opset) < 17:
            raise ConfigError(f"opset={self.opset} is below 17, the lowest opset streamdiff exports")
        for name in ("min_resolution", "max_resolution"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, 8, 4096)
        check_int("opt_resolution", self.opt_resolution, 8, 4096)
        if self.min_resolution and self.max_resolution and self.min_resolution > self.max_resolution:
            raise ConfigError(f"min_resolution={self.min_resolution} > max_resolution={self.max_resolution}")
        if isinstance(self.batch_sizes, (str, bytes)) or not hasattr(self.batch_sizes, "__iter__"):
            raise ConfigError(f"batch_sizes={self.batch_sizes!r} must be a sequence of integers >= 1")
        object.__setattr__(
            self, "batch_sizes", tuple(check_int("batch_sizes entry", b, 1) for b in self.batch_sizes)
        )

    @property
    def directory(self) -> Path:
        return Path(self.engine_dir) if self.engine_dir is not None else default_engine_dir()


@dataclass(frozen=True)
class ShapeRange:
    """Inclusive ranges of batch and image size (pixels) an engine accepts, and the size it is tuned for."""

    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    opt_batch: int
    opt_height: int
    opt_width: int

    def contains(self, batch: int, height: int, width: int) -> bool:
        return (
            self.batch[0] <= batch <= self.batch[1]
            and self.height[0] <= height <= self.height[1]
            and self.width[0] <= width <= self.width[1]
        )


def unet_batch_sizes(config: StreamConfig) -> tuple[int, ...]:
    """Every U-Net batch a stream with ``config`` runs (see :func:`streamdiff.core.guidance.call_rows`).

    With the denoising batch: n·F (NONE/SELF), (n+1)·F (INITIALIZE), 2n·F (FULL). Without it each step is its own
    call of F rows, the first step of INITIALIZE adding F negatives.
    """
    return call_rows(config.cfg_type, config.denoising_steps, config.frame_buffer_size, config.use_denoising_batch)


def component_batch_sizes(component: Component, config: StreamConfig, options: EngineOptions) -> tuple[int, ...]:
    """Batch sizes an engine of ``component`` must accept: the U-Net's per cfg mode, F frames for the VAE."""
    if component is Component.UNET:
        return tuple(sorted(set(unet_batch_sizes(config)) | set(options.batch_sizes)))
    return (config.frame_buffer_size,)


@dataclass(frozen=True)
class EngineShapes:
    """The shapes a U-Net and a VAE engine must serve.

    ``unet_batch`` / ``vae_batch``: inclusive (min, max) rows per call. ``sizes``: the (width, height) of the frames
    (the resolution range is derived from them in buckets). ``opt_batch``: the U-Net batch engines are tuned for;
    ``opt_vae_batch`` the VAE's (None: the smallest). ``opt_size``: the (width, height) they are tuned for (None:
    ``EngineOptions.opt_resolution`` square). ``static_batches``: the U-Net batches that artifacts compiled for fixed
    shapes are built for (a call is padded up to the next one). Build with :meth:`for_config` (one stream) or
    :meth:`for_engine` (a multi-stream engine).
    """

    unet_batch: tuple[int, int]
    vae_batch: tuple[int, int]
    sizes: tuple[tuple[int, int], ...]
    opt_batch: int
    static_batches: tuple[int, ...]
    opt_vae_batch: int | None = None
    opt_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ConfigError("EngineShapes needs at least one (width, height) size")
        for name in ("unet_batch", "vae_batch"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ConfigError(f"{name}={(low, high)} must be (min, max) with 1 <= min <= max")
        for name, value, (low, high) in (("opt_batch", self.opt_batch, self.unet_batch),
                                         ("opt_vae_batch", self.opt_vae_batch, self.vae_batch)):
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{name}={value} is outside its batch range [{low}, {high}]", field=name,
                                  value=value, allowed=f"{low} to {high}")

    @classmethod
    def for_config(cls, config: StreamConfig, options: EngineOptions | None = None) -> EngineShapes:
        """What one stream with ``config`` runs (plus ``options.batch_sizes``)."""
        sizes = component_batch_sizes(Component.UNET, config, options or EngineOptions())
        f = config.frame_buffer_size
        return cls(
            unet_batch=(sizes[0], sizes[-1]), vae_batch=(f, f), sizes=((config.width, config.height),),
            opt_batch=unet_batch_sizes(config)[0], static_batches=tuple(sorted({sizes[0], sizes[-1]})),
        )

    @classmethod
    def for_engine(
        cls, max_batch_rows: int, max_vae_batch: int, sizes: tuple[tuple[int, int], ...], opt_batch: int | None = None,
        *, opt_size: tuple[int, int] | None = None,
    ) -> EngineShapes:
        """A multi-stream engine: any U-Net call of 1 … ``max_batch_rows`` rows, VAE calls of 1 … ``max_vae_batch``.

        Tuned for the full engine — ``max_batch_rows`` U-Net rows (or ``opt_batch``) and ``max_vae_batch`` frames,
        the calls of a busy engine, where speed matters — at ``opt_size`` (pass :func:`tuned_size` of the engine's
        listed sizes; None tunes for ``EngineOptions.opt_resolution``). Fixed-shape artifacts are built for the
        powers of two below ``max_batch_rows`` and for ``max_batch_rows``.
        """
        static = {max_batch_rows}
        size = 1
        while size < max_batch_rows:
            static.add(size)
            size *= 2
        return cls(
            unet_batch=(1, max_batch_rows), vae_batch=(1, max_vae_batch), sizes=tuple(sorted(set(sizes))),
            opt_batch=opt_batch or max_batch_rows, static_batches=tuple(sorted(static)),
            opt_vae_batch=max_vae_batch, opt_size=opt_size,
        )


def tuned_size(sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The size an engine serving ``sizes`` (width, height) is tuned for: the largest by area (the first of equals).

    The largest frames cost the most per call, so their kernels matter most; smaller ones run inside the same
    profile. Pure.
    """
    if not sizes:
        raise ConfigError("tuned_size needs at least one (width, height) size", field="sizes", value=(),
                          allowed="a non-empty list of sizes")
    return max(sizes, key=lambda size: size[0] * size[1])


def engine_shapes(shapes: EngineShapes | StreamConfig, options: EngineOptions) -> EngineShapes:
    """``shapes`` itself, or what one stream with that StreamConfig needs."""
    return shapes if isinstance(shapes, EngineShapes) else EngineShapes.for_config(shapes, options)


# Default side bounds come in buckets, so that a size change inside a bucket keeps the same engine.
_MIN_BUCKETS = (8, 64, DEFAULT_MIN_RESOLUTION)
_MAX_BUCKETS = (DEFAULT_MAX_RESOLUTION, 2048, 4096)


def shape_range(
    component: Component, shapes: EngineShapes | StreamConfig, options: EngineOptions, multiple: int
) -> ShapeRange:
    """The shapes an engine of ``component`` is built for. Sides are in pixels, rounded to ``multiple``."""
    shapes = engine_shapes(shapes, options)
    small = min(min(size) for size in shapes.sizes)
    large = max(max(size) for size in shapes.sizes)
    side_min = options.min_resolution or max(b for b in _MIN_BUCKETS if b <= max(small, _MIN_BUCKETS[0]))
    side_max = options.max_resolution or min(b for b in _MAX_BUCKETS if b >= large)
    side_min = max(multiple, side_min // multiple * multiple)
    side_max = max(side_min, side_max // multiple * multiple)
    for width, height in shapes.sizes:
        for name, value in (("width", width), ("height", height)):
            if not side_min <= value <= side_max:
                raise ConfigError(f"{name}={value} is outside the engine resolution range [{side_min}, {side_max}]")
    opt_width, opt_height = shapes.opt_size or (options.opt_resolution, options.opt_resolution)
    unet = component is Component.UNET

    def fit(side: int) -> int:
        return min(max(side // multiple * multiple, side_min), side_max)

    return ShapeRange(
        batch=shapes.unet_batch if unet else shapes.vae_batch,
        height=(side_min, side_max),
        width=(side_min, side_max),
        opt_batch=shapes.opt_batch if unet else shapes.opt_vae_batch or shapes.vae_batch[0],
        opt_height=fit(opt_height),
        opt_width=fit(opt_width),
    )


def exact_ranges(component: Component, shapes: EngineShapes | StreamConfig, options: EngineOptions) -> list[ShapeRange]:
    """One single-shape range per static batch and size (for artifacts compiled for fixed shapes)."""
    shapes = engine_shapes(shapes, options)
    batches = shapes.static_batches if component is Component.UNET else tuple(sorted(set(shapes.vae_batch)))
    return [
        ShapeRange((batch, batch), (height, height), (width, width), batch, height, width)
        for width, height in shapes.sizes
        for batch in batches
    ]


CPU_FLAGS_FILE = Path("/proc/cpuinfo")
# CPU flags of native bfloat16 arithmetic: AVX512-BF16 dot products or AMX tiles.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def cpu_flags(source: Path = CPU_FLAGS_FILE) -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (``/proc/cpuinfo``); empty where that cannot be read."""
    try:
        for line in source.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX); ``flags`` defaults to :func:`cpu_flags`."""
    return bool((cpu_flags() if flags is None else flags) & BF16_FLAGS)


@functools.lru_cache(maxsize=None)
def cpu_isa() -> str:
    """The CPU an artifact is compiled for: architecture, torch's vector ISA level and AMX/bf16 support."""
    extra = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"})
    capability = torch.backends.cpu.get_cpu_capability()
    return "+".join([platform.machine() or "cpu", capability.lower(), *extra])


def target_id(device: torch.device) -> str:
    """``sm_90:NVIDIA-H100-80GB-HBM3`` for CUDA devices (compute capability and exact GPU name), else :func:`cpu_isa`.

    TensorRT engines are tuned for one GPU model (tactics timed on it), not only for its architecture: two GPUs of
    one compute capability (an L4 and an RTX 4090) must not share an engine.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = "-".join(torch.cuda.get_device_name(device).split())
        return f"sm_{major}{minor}:{name}"
    return f"cpu:{cpu_isa()}"


# The version of what streamdiff puts into an artifact (the export wrappers, graph rewrites, build settings, the
# manifest's layout). Bump it when a change makes artifacts built before it wrong or different; the package version
# is not in the key, so a release that changes none of this reuses every engine (TensorRT builds take minutes).
#   1: keyed by streamdiff's package version (until 0.1.0)
#   2: GroupNorm/LayerNorm in float32 inside float16/bfloat16 graphs for TensorRT; timing cache; workspace from free
#      memory
ENGINE_FORMAT = 2


def _engine_format() -> int:
    return ENGINE_FORMAT


@dataclass(frozen=True)
class EngineKey:
    """Everything that changes a built artifact. Equal keys ⇔ the same artifact; see :meth:`digest`."""

    model: str
    weights: str
    loras: tuple[tuple[str, float], ...]
    component: Component
    precision: str
    shapes: ShapeRange
    opset: int | None
    backend: str
    backend_version: str
    target: str
    engine_format: int = field(default_factory=_engine_format)
    extra: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's ``key``)."""
        data = asdict(self)
        data["component"] = self.component.value
        data["loras"] = [list(lora) for lora in self.loras]
        data["extra"] = [list(item) for item in self.extra]
        data["shapes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["shapes"].items()}
        return data

    def digest(self) -> str:
        """A stable hash of :meth:`to_dict`."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def name(self) -> str:
        """The entry folder name: readable prefix plus the digest."""
        return f"{self.component.value}-{self.backend}-{self.digest()}"

    def with_changes(self, **changes: Any) -> EngineKey:
        return replace(self, **changes)


def precision_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def engine_key(
    model: LoadedModel,
    component: Component,
    shapes: ShapeRange,
    *,
    backend: str,
    backend_version: str,
    dtype: torch.dtype,
    opset: int | None,
    device: torch.device | None = None,
    target: str | None = None,
    extra: dict[str, str] | None = None,
) -> EngineKey:
    """The cache key of one artifact of ``model``'s ``component``.

    ``target`` overrides the hardware id (``"portable"`` for ONNX graphs, which do not depend on the hardware).
    A U-Net with extra inputs has them in ``extra`` as ``unet_extras``: SDXL's ``text_embeds``/``time_ids`` unless
    ``extra`` names them itself (the exported graphs' builders name every input they take, see
    ``builders.unet_extra_inputs``); a U-Net with an IP-Adapter installed has its weights' fingerprint as
    ``ip_adapter``.
    """
    extras = tuple(getattr(model, "unet_extras", ()))
    if component is Component.UNET and extras:
        extra = {"unet_extras": ",".join(extras), **(extra or {})}
    adapter = getattr(model, "ip_adapter", None)
    if component is Component.UNET and adapter is not None:
        extra = {**(extra or {}), "ip_adapter": adapter.fingerprint}
    return EngineKey(
        model=model.model_id,
        weights=model.fingerprint,
        loras=tuple((spec.source, float(spec.scale)) for spec in model.loras),
        component=component,
        precision=precision_name(dtype),
        shapes=shapes,
        opset=opset,
        backend=backend,
        backend_version=backend_version,
        target=target or target_id(device or model.device),
        extra=tuple(sorted((extra or {}).items())),
    )
