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
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendUnavailable, EngineBuildError
from .keys import Component, ShapeRange

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE = 4 << 30
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
) -> tuple[TensorProfile, ...]:
    """The optimization profile of ``component`` for ``shapes`` (sides in pixels; latents are 1/s of that)."""
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
        )
    if component is Component.VAE_ENCODER:
        return (TensorProfile("images", (b0, 3, h0, w0), (bo, 3, ho, wo), (b1, 3, h1, w1)),)
    return (TensorProfile("latents", (b0, c, h0 // s, w0 // s), (bo, c, ho // s, wo // s), (b1, c, h1 // s, w1 // s)),)


@dataclass(frozen=True)
class TrtBuildPlan:
    """Everything :func:`build_engine` needs: the ONNX file, the profile and the builder settings.

    ``precision`` is the type the graph was exported in (``float16`` or ``bfloat16``); the network is strongly typed,
    so TensorRT runs the graph's own types and no builder precision flag exists in the plan.
    """

    onnx_path: Path
    profile: tuple[TensorProfile, ...]
    precision: str = "float16"
    workspace_bytes: int = DEFAULT_WORKSPACE
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    strongly_typed: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineBuildError(f"TensorRT precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.optimization_level <= 5:
            raise EngineBuildError(f"builder optimization level {self.optimization_level} is outside [0, 5]")

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary (goes into the cache manifest and gpu_check's report)."""
        return {
            "onnx": self.onnx_path.name,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "workspace_bytes": self.workspace_bytes,
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
) -> TrtBuildPlan:
    """The build plan of ``component`` from its exported ONNX graph (in ``precision``)."""
    profile = trt_profile(
        component, shapes, latent_channels=latent_channels, vae_scale_factor=vae_scale_factor,
        text_length=text_length, text_dim=text_dim,
    )
    return TrtBuildPlan(onnx_path=onnx_path, profile=profile, precision=precision,
                        optimization_level=optimization_level)


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
    """``tensorrt`` or BackendUnavailable naming the extra (also when its native libraries are missing)."""
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailable(
            f"TensorRT is not usable here ({error}); install it with: pip install 'streamdiff[tensorrt]' on a machine "
            f"with an NVIDIA GPU"
        ) from None
    return tensorrt


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


def build_serialized(plan: TrtBuildPlan, trt=None) -> bytes:  # noqa: ANN001 - the module
    """Parse ``plan.onnx_path`` into a strongly typed network and build it with the plan's profile. Needs a GPU.

    Raises EngineBuildError naming the parser errors, the inputs the profile and the graph disagree on, or the
    failed build.
    """
    trt = trt or import_tensorrt()
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
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
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
    return bytes(serialized)


def build_engine(plan: TrtBuildPlan, out_path: Path, trt=None) -> float:  # noqa: ANN001 - the module
    """Check the graph's precision, build ``plan`` and write the serialised engine to ``out_path``.

    Returns the build time in seconds. Needs TensorRT >= 10.1 and an NVIDIA GPU.
    """
    trt = trt or import_tensorrt()
    check_graph_precision(plan.onnx_path, plan.precision)
    logger.info("building a TensorRT %s engine from %s (strongly typed, optimization level %d); this takes minutes",
                plan.precision, plan.onnx_path.name, plan.optimization_level)
    started = time.perf_counter()
    try:
        data = build_serialized(plan, trt)
    except (EngineBuildError, BackendUnavailable):
        raise
    except Exception as error:  # noqa: BLE001 - reported with the plan that failed
        raise EngineBuildError(f"TensorRT build of {plan.onnx_path} failed: {type(error).__name__}: {error}") from error
    out_path.write_bytes(data)
    return time.perf_counter() - started
