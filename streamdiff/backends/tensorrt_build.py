"""TensorRT engine build plans: optimization profiles derived from the configuration, built through polygraphy.

The pure half (:func:`trt_profile`, :func:`build_plan`) runs anywhere and is tested on the CPU: it turns a
:class:`~streamdiff.backends.keys.ShapeRange` into min/opt/max shapes for every graph input. The other half
(:func:`build_engine`) imports polygraphy's TensorRT backend lazily and needs TensorRT 10 and an NVIDIA GPU; it was
written to the documented API and never run on these machines (see docs/engines.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendUnavailable, EngineBuildError, missing_extra
from .keys import Component, ShapeRange

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE = 4 << 30


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
    """Everything :func:`build_engine` needs: the ONNX file, the profile and the builder settings."""

    onnx_path: Path
    profile: tuple[TensorProfile, ...]
    fp16: bool = True
    workspace_bytes: int = DEFAULT_WORKSPACE
    optimization_level: int = 3

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary (goes into the cache manifest)."""
        return {
            "onnx": self.onnx_path.name,
            "fp16": self.fp16,
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
    fp16: bool = True,
) -> TrtBuildPlan:
    """The build plan of ``component`` from its exported ONNX graph."""
    profile = trt_profile(
        component, shapes, latent_channels=latent_channels, vae_scale_factor=vae_scale_factor,
        text_length=text_length, text_dim=text_dim,
    )
    return TrtBuildPlan(onnx_path=onnx_path, profile=profile, fp16=fp16)


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


def build_engine(plan: TrtBuildPlan, out_path: Path) -> Path:
    """Build and serialise a TensorRT engine for ``plan`` with polygraphy. Needs TensorRT 10 and a GPU."""
    trt = import_tensorrt()
    try:
        from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path
        from polygraphy.backend.trt import save_engine
    except ImportError:
        raise missing_extra("polygraphy", "tensorrt") from None
    profile = Profile()
    for tensor in plan.profile:
        profile.add(tensor.name, min=tensor.min, opt=tensor.opt, max=tensor.max)
    config = CreateConfig(
        fp16=plan.fp16,
        profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes},
        builder_optimization_level=plan.optimization_level,
    )
    logger.info("building TensorRT engine from %s (fp16=%s); this takes minutes", plan.onnx_path.name, plan.fp16)
    try:
        network = network_from_onnx_path(str(plan.onnx_path), flags=[trt.OnnxParserFlag.NATIVE_INSTANCENORM])
        engine = engine_from_network(network, config=config)
        save_engine(engine, path=str(out_path))
    except Exception as error:  # noqa: BLE001 - reported with the plan that failed
        raise EngineBuildError(f"TensorRT build of {plan.onnx_path} failed: {type(error).__name__}: {error}") from error
    return out_path
