"""TensorRT engine builds: strongly typed networks from fp16/bf16 ONNX graphs, one profile over the shape range.

TensorRT 10 and 11 are built the same way. TensorRT 11 removed weak typing (``BuilderFlag.FP16``/``BF16``/``INT8``,
``platform_has_fast_fp16``, ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``); TensorRT 10 accepts strongly typed
networks too (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, which 11 keeps and always applies). So the network is
created strongly typed and the precision comes from the graph's own types: the ONNX graph is exported in float16
(or bfloat16), and :func:`check_graph_precision` refuses a float32 graph, which would build a float32 engine.
No builder precision flag is ever set.

The pure half (:func:`trt_profile`, :func:`build_plan`, :func:`check_graph_precision`) runs anywhere. The other half
(:func:`build_serialized`, :func:`build_engine`) calls the ``tensorrt`` module directly (not polygraphy, whose
``CreateConfig(fp16=True)`` raises on TensorRT 11); tests run it against a fake ``tensorrt`` of each major version
(``tests/backends/fake_tensorrt.py``). It has never run against the real library (see docs/engines.md).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, EngineBuildError
from .keys import Component, ShapeRange
from .unet_inputs import ExtraInput

logger = logging.getLogger(__name__)

WORKSPACE_FRACTION = 0.5  # of the GPU memory free when the build starts
MIN_WORKSPACE = 256 << 20
MAX_WORKSPACE = 32 << 30
DEFAULT_OPTIMIZATION_LEVEL = 3
MIN_TENSORRT = (10, 1)  # set_device_memory(ptr, size) and device_memory_size_v2 (the runtime) appeared in 10.1
TESTED_MAJORS = (10, 11)
PRECISIONS = ("float16", "bfloat16")


@dataclass(frozen=True)
class TensorProfile:
    """Min/opt/max shapes of one engine input."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def trt_profile(
    component: Component,
    shapes: ShapeRange,
    *,
    latent_channels: int,
    vae_scale_factor: int,
    text_length: int,
    text_dim: int,
    extras: tuple[ExtraInput, ...] = (),
) -> tuple[TensorProfile, ...]:
    """The optimization profile of ``component`` for ``shapes`` (sides in pixels; latents are 1/s of that).

    ``extras``: the U-Net's extra inputs (:class:`~streamdiff.backends.unet_inputs.ExtraInput`): each follows the
    batch range, and a ControlNet residual the latent's sides at its stride too.
    """
    s, c = vae_scale_factor, latent_channels
    (b0, b1), bo = shapes.batch, shapes.opt_batch
    (h0, h1), ho = shapes.height, shapes.opt_height
    (w0, w1), wo = shapes.width, shapes.opt_width
    if component is Component.UNET:
        return (
            TensorProfile("sample", (b0, c, h0 // s, w0 // s), (bo, c, ho // s, wo // s), (b1, c, h1 // s, w1 // s)),
            TensorProfile("timestep", (b0,), (bo,), (b1,)),
            TensorProfile(
                "encoder_hidden_states", (b0, text_length, text_dim), (bo, text_length, text_dim),
                (b1, text_length, text_dim),
            ),
            *(TensorProfile(extra.name, extra.shape(b0, h0 // s, w0 // s), extra.shape(bo, ho // s, wo // s),
                            extra.shape(b1, h1 // s, w1 // s)) for extra in extras),
        )
    if component is Component.VAE_ENCODER:
        return (TensorProfile("images", (b0, 3, h0, w0), (bo, 3, ho, wo), (b1, 3, h1, w1)),)
    return (TensorProfile("latents", (b0, c, h0 // s, w0 // s), (bo, c, ho // s, wo // s), (b1, c, h1 // s, w1 // s)),)


@dataclass(frozen=True)
class TrtBuildPlan:
    """Everything :func:`build_engine` needs: the ONNX file, the profile and the builder settings.

    ``precision`` is the type the graph was exported in (``float16`` or ``bfloat16``); the network is strongly typed,
    so TensorRT runs the graph's own types and no builder precision flag exists in the plan. ``workspace_bytes``:
    the builder's workspace pool; None sizes it from the GPU memory free when the build starts
    (:func:`workspace_size`). ``timing_cache``: the file of TensorRT's timing cache (kernel timings of earlier builds
    on this GPU and TensorRT version), read before and written after the build; None builds without one.
    """

    onnx_path: Path
    profile: tuple[TensorProfile, ...]
    precision: str = "float16"
    workspace_bytes: int | None = None
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    strongly_typed: bool = True
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineBuildError(f"TensorRT precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.workspace_bytes is not None and self.workspace_bytes < MIN_WORKSPACE:
            raise EngineBuildError(f"workspace_bytes={self.workspace_bytes} is below {MIN_WORKSPACE} (256 MiB)")
        if not 0 <= self.optimization_level <= 5:
            raise EngineBuildError(f"builder optimization level {self.optimization_level} is outside [0, 5]")

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary (goes into the cache manifest and gpu_check's report)."""
        return {
            "onnx": self.onnx_path.name,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "workspace_bytes": self.workspace_bytes or "from free memory",
            "optimization_level": self.optimization_level,
            "profile": {p.name: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for p in self.profile},
        }


def build_plan(
    component: Component,
    onnx_path: Path,
    shapes: ShapeRange,
    *,
    latent_channels: int,
    vae_scale_factor: int,
    text_length: int = 77,
    text_dim: int = 1024,
    precision: str = "float16",
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    timing_cache: Path | None = None,
    extras: tuple[ExtraInput, ...] = (),
) -> TrtBuildPlan:
    """The build plan of ``component`` from its exported ONNX graph (in ``precision``); ``extras``: the U-Net's
    extra inputs (see :func:`trt_profile`)."""
    profile = trt_profile(
        component, shapes, latent_channels=latent_channels, vae_scale_factor=vae_scale_factor,
        text_length=text_length, text_dim=text_dim, extras=extras if component is Component.UNET else (),
    )
    return TrtBuildPlan(onnx_path=onnx_path, profile=profile, precision=precision,
                        optimization_level=optimization_level, timing_cache=timing_cache)


def workspace_size(free_bytes: int, fraction: float = WORKSPACE_FRACTION) -> int:
    """The builder workspace for a GPU with ``free_bytes`` free: ``fraction`` of it, in whole MiB, within
    [MIN_WORKSPACE, MAX_WORKSPACE] (256 MiB … 32 GiB). Pure.

    The workspace bounds the scratch memory of the tactics TensorRT may choose: too small rules out the fast ones,
    larger than what is free fails them at build time. Half of what is free leaves room for the builder's own
    allocations and whatever else runs on the GPU.
    """
    if not 0 < fraction <= 1:
        raise EngineBuildError(f"workspace fraction {fraction} is outside (0, 1]")
    size = int(max(0, free_bytes) * fraction) >> 20 << 20
    return min(max(size, MIN_WORKSPACE), MAX_WORKSPACE)


# ONNX TensorProto element types of floating-point tensors.
_ONNX_FLOATS = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


def graph_precision(onnx_path: Path) -> dict[str, int]:
    """Floating-point initializer elements per type in the graph (weights only; external data is not read)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}
    for initializer in model.graph.initializer:
        name = _ONNX_FLOATS.get(initializer.data_type)
        if name is not None:
            elements = 1
            for dim in initializer.dims:
                elements *= int(dim)
            counts[name] = counts.get(name, 0) + elements
    return counts


def check_graph_precision(onnx_path: Path, precision: str) -> dict[str, int]:
    """Raise EngineBuildError unless most of the graph's weights are in ``precision``.

    A strongly typed network runs the graph's own types: a float32 graph would silently give a float32 engine.
    (A few float32 weights are normal: timestep embedding constants, normalisation epsilons.)
    """
    counts = graph_precision(onnx_path)
    total = sum(counts.values())
    share = counts.get(precision, 0) / total if total else 0.0
    if share < 0.5:
        found = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no floating-point weights"
        raise EngineBuildError(
            f"{onnx_path} is not a {precision} graph ({found} weight elements); TensorRT builds strongly typed "
            f"networks, so export the graph in {precision} (the tensorrt backend does this itself)"
        )
    return counts


def import_tensorrt():  # noqa: ANN201 - the module
    """``tensorrt`` or BackendUnavailable naming the extra and the cause: not installed, or a broken install (its
    native libraries missing or mismatched raise ImportError, OSError or others while importing)."""
    try:
        import tensorrt
    except Exception as error:  # noqa: BLE001 - any failure to import is "not usable", with its cause
        raise BackendUnavailable(
            f"TensorRT is not usable here ({type(error).__name__}: {error}); install it with: pip install "
            f"'streamdiff[tensorrt]' on a machine with an NVIDIA GPU"
        ) from error
    return tensorrt


def usable_tensorrt():  # noqa: ANN201 - the module
    """``tensorrt``, imported and of a version streamdiff runs (:func:`check_version`); BackendUnavailable with the
    cause otherwise, also when a broken install fails on first use rather than on import."""
    trt = import_tensorrt()
    try:
        check_version(trt)
    except BackendUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - a broken install may fail on any attribute
        raise BackendUnavailable(
            f"TensorRT does not work here ({type(error).__name__}: {error}); reinstall it: pip install "
            f"'streamdiff[tensorrt]'"
        ) from error
    return trt


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


def version_tuple(version: str) -> tuple[int, int]:
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def check_version(trt) -> tuple[int, int]:  # noqa: ANN001 - the module
    """TensorRT's (major, minor); BackendUnavailable below 10.1, a warning above the tested majors."""
    version = version_tuple(str(trt.__version__))
    if version < MIN_TENSORRT:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} is too old: streamdiff needs TensorRT >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} "
            f"(pip install 'streamdiff[tensorrt]')"
        )
    if version[0] not in TESTED_MAJORS:
        logger.warning("TensorRT %s is newer than the versions streamdiff was written for (%s)", trt.__version__,
                       ", ".join(f"{m}.x" for m in TESTED_MAJORS))
    return version


def network_flags(trt) -> int:  # noqa: ANN001 - the module
    """The network creation flags: strongly typed, nothing else (EXPLICIT_BATCH is gone in 11 and implied in 10)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    """A timing cache for ``config``: the one saved at ``path`` (when readable), else an empty one; None without a path.

    A cache TensorRT refuses (another TensorRT version or GPU, a damaged file) is replaced by an empty one, with a
    warning: it only saves build time, it never changes what is built.
    """
    if path is None:
        return None
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as error:
        logger.warning("cannot read the TensorRT timing cache %s (%s); starting a new one", path, error)
        data = b""
    reason = "another TensorRT version or GPU?"
    try:
        cache = config.create_timing_cache(data)
        accepted = cache is not None and bool(config.set_timing_cache(cache, False))
    except Exception as error:  # noqa: BLE001 - TensorRT may raise on bytes it cannot parse; the cache is optional
        accepted, reason = False, f"{type(error).__name__}: {error}"
    if not accepted:
        logger.warning("TensorRT refused the timing cache %s (%s); building without its timings, a new one "
                       "replaces it", path, reason)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    elif data:
        logger.info("TensorRT build uses the timing cache %s (%d bytes)", path, len(data))
    return cache


def save_timing_cache(config: Any, path: Path) -> None:
    """Write ``config``'s timing cache (now holding this build's timings too) to ``path``, atomically.

    Two builds finishing at once each write a whole cache; the last one stays (the other's new timings are lost,
    which costs time on a later build, never correctness).
    """
    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(bytes(cache.serialize()))
    os.replace(tmp, path)


def build_serialized(plan: TrtBuildPlan, trt=None, *, workspace_bytes: int | None = None) -> bytes:  # noqa: ANN001
    """Parse ``plan.onnx_path`` into a strongly typed network and build it with the plan's profile. Needs a GPU.

    ``workspace_bytes`` overrides the plan's (:func:`build_engine` passes the size from free memory). The timing
    cache, if the plan has one, is loaded before and saved after a successful build. Raises EngineBuildError naming
    the parser errors, the inputs the profile and the graph disagree on, or the failed build.
    """
    trt = trt or import_tensorrt()
    workspace = workspace_bytes or plan.workspace_bytes or MIN_WORKSPACE
    check_version(trt)
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, log)
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no parser message"
        raise EngineBuildError(f"TensorRT cannot parse {plan.onnx_path}: {errors}")
    inputs = {network.get_input(i).name: len(network.get_input(i).shape) for i in range(network.num_inputs)}
    wanted = {p.name: len(p.min) for p in plan.profile}
    if inputs != wanted:
        raise EngineBuildError(
            f"the graph {plan.onnx_path.name} has inputs {inputs} (name: rank) but the build plan profiles {wanted}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    timing_cache = _load_timing_cache(config, plan.timing_cache)
    config.builder_optimization_level = plan.optimization_level
    profile = builder.create_optimization_profile()
    for tensor in plan.profile:
        profile.set_shape(tensor.name, tensor.min, tensor.opt, tensor.max)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimization profile {plan.describe()['profile']}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build {plan.onnx_path} ({plan.precision}, profile {plan.describe()['profile']}); "
            f"its log above says why"
        )
    if timing_cache is not None and plan.timing_cache is not None:
        save_timing_cache(config, plan.timing_cache)
    return bytes(serialized)


def build_engine(plan: TrtBuildPlan, out_path: Path, trt=None, cuda=None) -> float:  # noqa: ANN001 - modules
    """Check the graph's precision, build ``plan`` and write the serialised engine to ``out_path``.

    The workspace is the plan's, or :func:`workspace_size` of the GPU memory free now (``cuda``: the device seam,
    :class:`~streamdiff.backends.cuda_ops.TorchCuda` by default). Returns the build time in seconds. Needs
    TensorRT >= 10.1 and an NVIDIA GPU.
    """
    trt = trt or import_tensorrt()
    check_version(trt)
    check_graph_precision(plan.onnx_path, plan.precision)
    logger.info("building a TensorRT %s engine from %s (strongly typed, optimization level %d); this takes minutes",
                plan.precision, plan.onnx_path.name, plan.optimization_level)
    started = time.perf_counter()
    try:
        workspace = plan.workspace_bytes
        if workspace is None:
            from .cuda_ops import DEFAULT_CUDA

            free, total = (cuda or DEFAULT_CUDA).memory_info()
            workspace = workspace_size(free)
            logger.info("TensorRT workspace %.2f GiB (%.0f %% of the %.2f GiB free of %.2f GiB)", workspace / 2**30,
                        100 * WORKSPACE_FRACTION, free / 2**30, total / 2**30)
        data = build_serialized(plan, trt, workspace_bytes=workspace)
    except (EngineBuildError, BackendUnavailable):
        raise
    except Exception as error:  # noqa: BLE001 - reported with the plan that failed
        raise EngineBuildError(f"TensorRT build of {plan.onnx_path} failed: {type(error).__name__}: {error}") from error
    out_path.write_bytes(data)
    return time.perf_counter() - started
