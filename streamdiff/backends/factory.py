"""Choose and create the engines for a pipeline, building missing compiled engines on first use."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import BackendKind, Quantization, to_enum
from ..errors import BackendUnavailable, ConfigError, missing_extra
from .base import ControlNetEngine, UNetEngine, VaeEngine
from .builders import COMPONENTS, BuildStep, plan_builds, unet_extra_inputs
from .cache import EngineCache
from .keys import Component, EngineOptions, EngineShapes, engine_shapes
from .torch_backend import TorchControlNet, TorchUNet, TorchVae

if TYPE_CHECKING:
    from ..config import StreamConfig
    from ..models import LoadedModel

logger = logging.getLogger(__name__)

# The backends whose U-Net engines take extra inputs (backends.base.UNET_EXTRAS: SDXL's added conditions); a model
# whose U-Net needs them is refused on the others when the engine is built, never mid-stream.
EXTRA_INPUT_BACKENDS = frozenset({BackendKind.TORCH, BackendKind.OPENVINO, BackendKind.ONNXRUNTIME,
                                  BackendKind.TENSORRT})


def extras_problem(kind: BackendKind, model: LoadedModel, options: EngineOptions) -> str | None:
    """Why backend ``kind`` (with ``options``) cannot run ``model``'s U-Net extra inputs, or None if it can."""
    extras = tuple(getattr(model, "unet_extras", ()))
    if not extras:
        return None
    if kind not in EXTRA_INPUT_BACKENDS:
        allowed = ", ".join(sorted(k.value for k in EXTRA_INPUT_BACKENDS))
        return f"backend {kind.value!r} does not take the U-Net extra inputs {list(extras)} (SDXL); use {allowed}"
    return None


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module without a spec: not usable as is
        return name in sys.modules and sys.modules[name] is not None


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot serve here (no CUDA GPU, not installed, a broken install, too old), or None if it can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if not _has_module("tensorrt"):
        return "TensorRT is not installed"
    from .tensorrt_build import usable_tensorrt

    try:
        usable_tensorrt()
    except BackendUnavailable as error:
        return str(error)
    return None


def tensorrt_usable() -> bool:
    """TensorRT imports (its native libraries load), is recent enough, and torch sees a CUDA GPU."""
    return tensorrt_problem() is None


def choose_auto(model: LoadedModel, options: EngineOptions) -> tuple[BackendKind, str]:
    """The backend ``auto`` picks for ``model`` and why (the reason goes into the log).

    On the CPU the order follows what was measured (docs/PERF.md, "OpenVINO" and "Backends"): OpenVINO compiles
    the U-Net and both VAE halves in seconds and ran the SD-2.1-size U-Net ~1.5× faster than torch eager bfloat16
    and the tiny model several times faster; then torch (AOTInductor with ``compile=True``) for bfloat16, ONNX
    Runtime for float32.
    """
    return _fastest(model, options)


def _fastest(model: LoadedModel, options: EngineOptions) -> tuple[BackendKind, str]:
    """The fastest available backend for ``model``'s device and dtype that takes its SDXL extras, and why."""
    if model.device.type == "cuda":
        problem = tensorrt_problem()
        if problem is None:
            return BackendKind.TENSORRT, "a CUDA GPU and TensorRT are available"
        if _has_module("tensorrt"):
            logger.warning("backend auto: TensorRT is installed but unusable, falling back to torch: %s", problem)
            return BackendKind.TORCH, f"TensorRT is installed but unusable ({problem})"
        return BackendKind.TORCH, "CUDA GPU without TensorRT (pip install 'streamdiff[tensorrt]' for engines)"
    if model.device.type != "cpu":
        return BackendKind.TORCH, f"the model is on {model.device}, which only torch runs"
    precision = str(model.dtype).removeprefix("torch.")
    if options.compile:
        return BackendKind.TORCH, f"compile=True asks for AOTInductor-compiled torch ({precision} on the CPU)"
    if extras_problem(BackendKind.OPENVINO, model, options) and extras_problem(BackendKind.ONNXRUNTIME, model,
                                                                                 options):
        extras = list(model.unet_extras)
        return BackendKind.TORCH, f"the U-Net takes extra inputs {extras} (SDXL), which only torch runs here"
    if _has_module("openvino"):
        return BackendKind.OPENVINO, (
            f"{precision} on the CPU runs fastest in OpenVINO (U-Net, VAE encoder and decoder compiled, cached)"
        )
    if model.dtype != torch.float32:
        return BackendKind.TORCH, (
            f"{precision} on the CPU without openvino runs fastest in torch (eager; EngineOptions(compile=True) "
            "compiles it; pip install 'streamdiff[openvino]' is faster)"
        )
    if not _has_module("onnxruntime"):
        return BackendKind.TORCH, "neither openvino nor onnxruntime is installed (pip install 'streamdiff[openvino]')"
    # Measured here (docs/PERF.md, "Backends"): ONNX Runtime beats torch eager in float32 on the tiny and the
    # SD-2.1-size U-Net alike.
    return BackendKind.ONNXRUNTIME, "float32 on the CPU without openvino: ONNX Runtime is faster than torch eager"


def resolve_backend(kind: BackendKind | str, model: LoadedModel, options: EngineOptions) -> BackendKind:
    """``kind`` as an enum, ``auto`` resolved (logged with its reason), availability checked."""
    kind = to_enum(BackendKind, kind, "backend")
    if kind is BackendKind.AUTO:
        kind, reason = choose_auto(model, options)
        logger.info("backend auto: picked %s because %s", kind.value, reason)
    if options.quantize is not Quantization.NONE and kind is not BackendKind.OPENVINO:
        raise ConfigError(
            f"quantize={options.quantize.value!r} needs backend 'openvino' (the only backend with a quantised "
            f"U-Net); the backend is {kind.value!r}. Use backend='openvino' or quantize='none'",
            field="quantize", value=options.quantize.value, allowed="none (every backend); int8-weights, int8 (openvino)",
        )
    if kind is BackendKind.ONNXRUNTIME and not _has_module("onnxruntime"):
        raise missing_extra("onnxruntime", "onnx")
    if kind is BackendKind.OPENVINO:
        if not _has_module("openvino"):
            raise missing_extra("openvino", "openvino")
        if model.device.type != "cpu":
            raise BackendUnavailable(f"backend 'openvino' runs on the CPU; the model is on {model.device}")
        if options.quantize is not Quantization.NONE and not _has_module("nncf"):
            raise missing_extra("nncf", "int8")
    problem = extras_problem(kind, model, options)
    if problem is not None:
        raise ConfigError(f"model {model.model_id!r}: {problem}", field="backend", value=kind.value,
                          allowed=", ".join(sorted(k.value for k in EXTRA_INPUT_BACKENDS)))
    if kind is BackendKind.TENSORRT:
        from .tensorrt_build import usable_tensorrt

        usable_tensorrt()
        if model.device.type != "cuda":
            raise BackendUnavailable(f"backend 'tensorrt' needs a CUDA device; the model is on {model.device}")
    return kind


def engine_steps(
    kind: BackendKind | str,
    model: LoadedModel,
    shapes: EngineShapes | StreamConfig,
    options: EngineOptions | None = None,
    controlnets: Mapping[str, torch.nn.Module] | None = None,
) -> tuple[BackendKind, list[BuildStep]]:
    """The resolved backend and the cache entries it needs (for ``streamdiff engines build``); ``controlnets``:
    the engine's ControlNets by name (compiled too by a backend that runs them)."""
    options = with_controlnets(options or EngineOptions(), controlnets)
    resolved = resolve_backend(kind, model, options)
    return resolved, plan_builds(resolved, model, shapes, options, EngineCache(options.directory), controlnets)


def with_controlnets(options: EngineOptions, controlnets: Mapping[str, Any] | None) -> EngineOptions:
    """``options`` of an engine with ``controlnets``: its compiled U-Net takes the residual inputs
    (``EngineOptions.controlnet_residuals``), so its graph, its cache key and its ControlNets fit together."""
    return replace(options, controlnet_residuals=True) if controlnets and not options.controlnet_residuals else options


@dataclass(frozen=True)
class BackendEngines:
    """What :func:`create_backend` makes: the U-Net and VAE engines and the ControlNet engines by name."""

    unet: UNetEngine
    vae: VaeEngine
    controlnets: dict[str, ControlNetEngine] = field(default_factory=dict)


def create_engines(
    kind: BackendKind | str,
    model: LoadedModel,
    shapes: EngineShapes | StreamConfig,
    options: EngineOptions | None = None,
    *,
    max_shapes: int | None = None,
    cuda_graphs: bool = False,
) -> tuple[UNetEngine, VaeEngine]:
    """The U-Net and VAE engines of backend ``kind`` for ``model`` (:func:`create_backend` without ControlNets)."""
    engines = create_backend(kind, model, shapes, options, max_shapes=max_shapes, cuda_graphs=cuda_graphs)
    return engines.unet, engines.vae


def create_backend(
    kind: BackendKind | str,
    model: LoadedModel,
    shapes: EngineShapes | StreamConfig,
    options: EngineOptions | None = None,
    *,
    max_shapes: int | None = None,
    cuda_graphs: bool = False,
    controlnets: Mapping[str, torch.nn.Module] | None = None,
) -> BackendEngines:
    """The engines of backend ``kind`` for ``model``, serving ``shapes`` (or one stream's config).

    Compiled backends build their missing cache entries first (logged; once per configuration). ``max_shapes``:
    frame sizes whose per-shape state an OpenVINO or ONNX Runtime engine keeps (None: their default).
    ``cuda_graphs``: TensorRT engines replay a CUDA graph per shape slot (the engine passes
    ``EngineConfig.cuda_graphs`` here; the torch backend's graphs are the engine's own). ``controlnets``: the
    ControlNets by name (every backend takes them): the eager backend wraps them, OpenVINO compiles them, and each
    compiled U-Net is built with residual inputs.
    """
    options = options or EngineOptions()
    shapes = engine_shapes(shapes, options)
    kind = resolve_backend(kind, model, options)
    controlnets = dict(controlnets or {})
    options = with_controlnets(options, controlnets)
    steps = plan_builds(kind, model, shapes, options, EngineCache(options.directory), controlnets)
    entries = {step.key.name: step.run() for step in steps}
    by_component = {}
    for step in steps:
        by_component.setdefault(step.component, []).append((step.key, entries[step.key.name]))
    eager = {name: TorchControlNet(module) for name, module in controlnets.items()}  # all but OpenVINO's
    if kind is BackendKind.TORCH:
        vae = TorchVae(model.vae, channels_last=options.channels_last)
        if options.compile:
            from .compiled import CompiledUNet

            packages = {}
            for key, entry in by_component[Component.UNET]:
                latent = (model.latent_channels, key.shapes.opt_height // model.vae_scale_factor,
                          key.shapes.opt_width // model.vae_scale_factor)
                packages[(key.shapes.opt_batch, *latent)] = entry.artifact
            return BackendEngines(CompiledUNet(packages, unet_extra_inputs(model, options)), vae, eager)
        return BackendEngines(TorchUNet(model.unet, channels_last=options.channels_last), vae, eager)
    paths = {c: by_component[c][0][1].artifact for c in COMPONENTS}
    if kind is BackendKind.OPENVINO:
        from .openvino_backend import OvUNet, OvVae, hand_cores_to_openvino
        from .openvino_inputs import warm_up
        from .openvino_controlnet import OvControlNet

        bound = {} if max_shapes is None else {"max_shapes": max_shapes}
        ov_unet = OvUNet(paths[Component.UNET], model.unet.time_proj, model.dtype,
                         inputs=unet_extra_inputs(model, options), **bound)
        ov_vae = OvVae(paths[Component.VAE_ENCODER], paths[Component.VAE_DECODER], model.dtype, **bound)
        compiled = by_component.get(Component.CONTROLNET, [])
        ov_controlnets = {name: OvControlNet(entry.artifact, module.time_proj, model.dtype,
                                             sdxl=model.sdxl is not None, **bound)
                          for (name, module), (_, entry) in zip(controlnets.items(), compiled)}
        hand_cores_to_openvino()
        warm_up(ov_unet, ov_vae, model, shapes)
        return BackendEngines(ov_unet, ov_vae, ov_controlnets)
    keys = {c: by_component[c][0][0] for c in COMPONENTS}
    if kind is BackendKind.ONNXRUNTIME:
        from .onnxruntime_backend import OrtUNet, OrtVae

        session = onnxruntime_session_options(model, options, keys)
        if max_shapes is not None:
            for component_options in session.values():
                component_options["max_shapes"] = max_shapes
        engines = OrtUNet(paths[Component.UNET], model.device, unet_extra_inputs(model, options),
                          **session[Component.UNET]), OrtVae(
            paths[Component.VAE_ENCODER], paths[Component.VAE_DECODER], model.device,
            encoder=session[Component.VAE_ENCODER], decoder=session[Component.VAE_DECODER],
        )
    else:
        from .tensorrt_runtime import TrtUNet, TrtVae

        trt_unet = TrtUNet(paths[Component.UNET], model.device, cuda_graphs, unet_extra_inputs(model, options))
        engines = trt_unet, TrtVae(
            paths[Component.VAE_ENCODER], paths[Component.VAE_DECODER], model.device, cuda_graphs
        )
    if model.device.type == "cuda":
        offload_torch_modules(model)
    return BackendEngines(*engines, eager)  # their U-Nets take the residuals; the ControlNets run in eager torch


ORT_TENSORRT_CACHE = ".onnxruntime-tensorrt"


def onnxruntime_session_options(model: LoadedModel, options: EngineOptions, keys: dict) -> dict:
    """Per component: the ONNX Runtime session options (providers, TensorRT provider cache and profile, dtype)."""
    from .builders import tensorrt_plan

    out = {}
    for component, key in keys.items():
        dtype = getattr(torch, key.precision)
        out[component] = dict(
            providers=options.onnx_providers, graph_dtype=dtype,
            tensorrt_cache=options.directory / ORT_TENSORRT_CACHE if model.device.type == "cuda" else None,
            profile=tensorrt_plan(model, component, key.shapes, Path(key.name), options=options).profile,
        )
    return out


def offload_torch_modules(model: LoadedModel, cuda: Any = None) -> None:
    """Move the U-Net and the VAE to the CPU once compiled GPU engines exist: the engines hold their own weights.

    Kept on the CPU (not deleted) because a later rebuild — a new frame size outside the engine's range, a new
    batch range — exports them again (a temporary GPU copy while exporting). The text encoder stays on the GPU.
    After this the model serves only the compiled backend that moved it; load it again for a torch backend.
    """
    from .cuda_ops import DEFAULT_CUDA

    for name in ("unet", "vae"):
        getattr(model, name).to("cpu")
    (cuda or DEFAULT_CUDA).empty_cache()
    logger.info("moved the torch U-Net and VAE to the CPU: the compiled engines run on %s", model.device)
