"""Build steps: the cache entries a backend needs for a model and configuration, each built at most once.

:func:`plan_builds` lists the steps (ONNX graphs, TensorRT plans, AOTInductor packages) without running them, so
the CLI can show a progress bar and the pipeline can build what is missing on first use. Every step goes through
:class:`~streamdiff.backends.cache.EngineCache`, so an unchanged configuration reuses its entries.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..config import BackendKind, Quantization, StreamConfig
from ..errors import import_extra
from .cache import CacheEntry, EngineCache
from .keys import Component, EngineKey, EngineOptions, EngineShapes, ShapeRange, engine_key, exact_ranges, shape_range
from .onnx_export import UNetExport, VaeDecoder, VaeEncoder, component_spec, export_module, verification_cases
from .onnx_export import verify_onnx
from .unet_inputs import ExtraInput, controlnet_residual_inputs, extras_label, ip_token_dims, ordered

if TYPE_CHECKING:
    from ..models import LoadedModel

logger = logging.getLogger(__name__)

COMPONENTS = (Component.UNET, Component.VAE_ENCODER, Component.VAE_DECODER)
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"


@dataclass
class BuildStep:
    """One cache entry to make sure of. ``run()`` returns it, building it first when it is missing or invalid."""

    description: str
    key: EngineKey
    run: Callable[[], CacheEntry]
    component: Component

    def cached(self, cache: EngineCache) -> bool:
        return cache.load(self.key) is not None


def spatial_multiple(model: LoadedModel, component: Component) -> int:
    """Image sides must be multiples of this: the VAE factor, times the U-Net's down factor for the U-Net."""
    factor = model.vae_scale_factor
    if component is Component.UNET:
        return factor * model.unet_down_factor
    return factor


def component_module(model: LoadedModel, component: Component, options: EngineOptions | None = None) -> torch.nn.Module:
    """The engine-contract wrapper of ``component`` (shares the model's weights); the U-Net's takes
    :func:`unet_extra_inputs`."""
    if component is Component.UNET:
        return UNetExport(model.unet, tuple(extra.name for extra in unet_extra_inputs(model, options)))
    return VaeEncoder(model.vae) if component is Component.VAE_ENCODER else VaeDecoder(model.vae)


def spec_for(model: LoadedModel, component: Component, dtype: torch.dtype, device: torch.device,  # noqa: ANN201
             options: EngineOptions | None = None):
    return component_spec(
        component,
        latent_channels=model.latent_channels,
        vae_scale_factor=model.vae_scale_factor,
        text_length=int(getattr(model.text_encoder.config, "max_position_embeddings", 77)),
        text_dim=int(model.unet.config.cross_attention_dim),
        dtype=dtype,
        device=device,
        extras=unet_extra_inputs(model, options) if component is Component.UNET else (),
    )


def unet_extra_inputs(model: LoadedModel, options: EngineOptions | None = None) -> tuple[ExtraInput, ...]:
    """The extra inputs of ``model``'s exported or compiled U-Net, in graph order: SDXL's pooled embedding and 6
    time ids (an SDXL model), the IP-Adapter's tokens ``[B, N, D]`` and scales ``[B]`` (a model with one), the
    ControlNet residuals (``options.controlnet_residuals``: an engine with ControlNets). None for a plain SD model.
    See :mod:`~streamdiff.backends.unet_inputs`.
    """
    widths = {"text_embeds": model.pooled_size, "time_ids": 6}
    inputs = [ExtraInput(name, (widths[name],)) for name in model.unet_extras]
    adapter = getattr(model, "ip_adapter", None)
    if adapter is not None:
        inputs += [ExtraInput("ip_tokens", ip_token_dims(model)), ExtraInput("ip_scale", ())]
    if options is not None and options.controlnet_residuals:
        inputs += controlnet_residual_inputs(model.unet)
    return ordered(inputs)


def key_extra(model: LoadedModel, component: Component, options: EngineOptions,
              extra: dict[str, str] | None = None) -> dict[str, str] | None:
    """``extra`` for the cache key, plus the names of the U-Net's extra inputs (:func:`unet_extra_inputs`)."""
    inputs = unet_extra_inputs(model, options) if component is Component.UNET else ()
    if not inputs:
        return extra
    return {**(extra or {}), "unet_extras": extras_label(inputs)}


def _onnx_version() -> str:
    onnx = import_extra("onnx", "onnx")
    return f"torch-{torch.__version__}+onnx-{onnx.__version__}"


def onnx_step(
    model: LoadedModel,
    shapes: EngineShapes | StreamConfig,
    options: EngineOptions,
    cache: EngineCache,
    component: Component,
    dtype: torch.dtype = torch.float32,
) -> BuildStep:
    """Export ``component`` to ONNX in ``dtype`` (checked against PyTorch in ONNX Runtime when float32).

    A float16/bfloat16 graph computes its GroupNorm/LayerNorm layers in float32 (see
    :func:`~streamdiff.backends.onnx_export.float32_norms`): TensorRT's strongly typed networks run each layer in
    its input's type.
    """
    shapes = shape_range(component, shapes, options, spatial_multiple(model, component))
    export_device = model.device if dtype != torch.float32 else torch.device("cpu")
    norms_in_float32 = dtype != torch.float32
    key = engine_key(
        model, component, shapes, backend="onnx", backend_version=_onnx_version(), dtype=dtype, opset=options.opset,
        device=export_device, target="portable",
        extra=key_extra(model, component, options, {"norms": "float32"} if norms_in_float32 else None),
    )

    def build(folder: Path) -> str:
        module = component_module(model, component, options)
        if next(module.parameters()).dtype != dtype or next(module.parameters()).device != export_device:
            module = copy.deepcopy(module).to(export_device, dtype)
        spec = spec_for(model, component, dtype, export_device, options)
        export_module(module, spec, shapes, folder / ONNX_FILE, options.opset, norms_in_float32=norms_in_float32)
        if options.verify and dtype == torch.float32:
            verify_onnx(folder / ONNX_FILE, module, spec, verification_cases(shapes, spatial_multiple(model, component)))
        return ONNX_FILE

    description = f"export {component.value} to ONNX ({key.precision})"
    return BuildStep(description, key, lambda: cache.get_or_build(key, build, description=description), component)


def aoti_steps(
    model: LoadedModel, shapes: EngineShapes | StreamConfig, options: EngineOptions, cache: EngineCache
) -> list[BuildStep]:
    """One AOTInductor package of the U-Net per static batch and frame size (compiled for fixed shapes)."""
    component = Component.UNET
    steps = []
    for exact in exact_ranges(component, shapes, options):
        key = engine_key(
            model, component, exact, backend="torch-aoti", backend_version=torch.__version__, dtype=model.dtype,
            opset=None, extra=key_extra(model, component, options, {"freezing": "1"}),
        )

        def build(folder: Path, exact: ShapeRange = exact) -> str:
            from .compiled import aoti_compile

            spec = spec_for(model, component, model.dtype, model.device, options)
            return aoti_compile(component_module(model, component, options),
                                spec.make_inputs(exact.opt_batch, exact.opt_height, exact.opt_width), folder)

        description = f"compile unet (batch {exact.opt_batch}, {exact.opt_height}x{exact.opt_width}, {key.precision})"
        steps.append(
            BuildStep(description, key, lambda k=key, b=build, d=description: cache.get_or_build(k, b, description=d),
                      component)
        )
    return steps


def onnxruntime_dtype(model: LoadedModel) -> torch.dtype:
    """The type of the graphs ONNX Runtime runs: float16 for a float16 model (its CUDA path), else float32."""
    return torch.float16 if model.dtype == torch.float16 else torch.float32


def tensorrt_dtype(model: LoadedModel) -> torch.dtype:
    """The type of the graph a TensorRT engine is built from: bfloat16 for a bfloat16 model, else float16.

    TensorRT networks are strongly typed (the only kind TensorRT 11 builds): this type is the engine's precision.
    """
    return torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float16


TIMING_CACHE_DIR = ".tensorrt-timing"


def timing_cache_path(cache: EngineCache, key: EngineKey) -> Path:
    """Where TensorRT's timing cache for ``key``'s GPU and TensorRT version lives: beside the engine cache's entries
    (a dot folder, so never taken for an entry), one file per GPU model and TensorRT version, shared by all engines.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{key.target}-tensorrt-{key.backend_version}")
    return cache.root / TIMING_CACHE_DIR / f"{name}.cache"


def tensorrt_plan(model: LoadedModel, component: Component, shapes: ShapeRange, onnx_path: Path,  # noqa: ANN201
                  timing_cache: Path | None = None, *, options: EngineOptions | None = None):
    """The :class:`~streamdiff.backends.tensorrt_build.TrtBuildPlan` of ``component`` (pure; no TensorRT needed);
    the U-Net's profile covers its :func:`unet_extra_inputs`."""
    from .keys import precision_name
    from .tensorrt_build import build_plan

    return build_plan(
        component, onnx_path, shapes, latent_channels=model.latent_channels,
        vae_scale_factor=model.vae_scale_factor,
        text_length=int(getattr(model.text_encoder.config, "max_position_embeddings", 77)),
        text_dim=int(model.unet.config.cross_attention_dim), precision=precision_name(tensorrt_dtype(model)),
        timing_cache=timing_cache, extras=unet_extra_inputs(model, options) if component is Component.UNET else (),
    )


def tensorrt_step(
    model: LoadedModel, shapes: EngineShapes | StreamConfig, options: EngineOptions, cache: EngineCache, component: Component,
    onnx: BuildStep,
) -> BuildStep:
    """Build a strongly typed TensorRT engine of ``component`` from its fp16/bf16 ONNX entry (``onnx`` runs first)."""
    from .tensorrt_build import build_engine, tensorrt_version

    shapes = shape_range(component, shapes, options, spatial_multiple(model, component))
    dtype = tensorrt_dtype(model)
    key = engine_key(
        model, component, shapes, backend="tensorrt", backend_version=tensorrt_version(), dtype=dtype,
        opset=options.opset, extra=key_extra(model, component, options),
    )
    info = tensorrt_plan(model, component, shapes, Path(ONNX_FILE), options=options).describe()

    def build(folder: Path) -> str:
        onnx_entry = onnx.run()
        build_engine(tensorrt_plan(model, component, shapes, onnx_entry.artifact, timing_cache_path(cache, key),
                                   options=options), folder / PLAN_FILE)
        return PLAN_FILE

    description = f"build TensorRT {component.value} engine ({key.precision}, strongly typed)"
    return BuildStep(
        description, key, lambda: cache.get_or_build(key, build, description=description, info=info), component
    )


def smallest(shapes: ShapeRange) -> ShapeRange:
    """``shapes`` tuned for its smallest batch and size: where a graph with dynamic axes is traced for OpenVINO.

    The trace only records the operations (the axes stay dynamic), and it runs the torch module once: at an
    SD-2.1-size U-Net's default tuned shape (batch 8, 512²) in bfloat16 on a CPU without native bfloat16 that one
    eager call took over 10 minutes here.
    """
    return replace(shapes, opt_batch=shapes.batch[0], opt_height=shapes.height[0], opt_width=shapes.width[0])


def openvino_step(
    model: LoadedModel, shapes: EngineShapes | StreamConfig, options: EngineOptions, cache: EngineCache,
    component: Component,
) -> BuildStep:
    """Convert ``component`` with OpenVINO and keep the compiled model.

    Static shapes when the component serves exactly one shape (a single stream: one U-Net batch, F frames, one
    size): measured 5.5 % faster on the SD-2.1-size U-Net than dynamic axes (docs/PERF.md, "OpenVINO"). Otherwise
    (a multi-stream engine's 1 … max_batch_rows rows) one model with dynamic batch and spatial axes, rather than
    one compiled copy of the weights per batch size. The U-Net takes :func:`unet_extra_inputs` (ControlNet
    residuals with ``options.controlnet_residuals``), and its key names every one of them.
    """
    from .openvino_backend import (Float32Graph, OvUNetGraph, build_blob, openvino_version, precision_hint,
                                   unet_time_projection_input)
    from .openvino_inputs import example_inputs, graph_inputs
    from .openvino_quantize import calibration_set, quantize_label

    # planned without a stream (an EngineShapes), calibration timesteps not given: StreamConfig's default ones
    calibration = options.calibration.for_stream(shapes if isinstance(shapes, StreamConfig) else StreamConfig())
    exact = exact_ranges(component, shapes, options)
    static = len(exact) == 1
    shapes = exact[0] if static else shape_range(component, shapes, options, spatial_multiple(model, component))
    extra = {"precision_hint": precision_hint(model.dtype), "shapes": "static" if static else "dynamic"}
    quantize = options.quantize if component is Component.UNET else Quantization.NONE  # the VAE stays float
    names = tuple(i.name for i in unet_extra_inputs(model, options)) if component is Component.UNET else ()
    if component is Component.UNET:
        extra["time_embedding"] = "float32"
    if quantize is not Quantization.NONE:
        extra["quantize"] = quantize_label(quantize, calibration)
    key = engine_key(
        model, component, shapes, backend="openvino", backend_version=openvino_version(), dtype=model.dtype,
        opset=None, device=torch.device("cpu"), extra=key_extra(model, component, options, extra),
    )

    def build(folder: Path) -> str:
        spec = spec_for(model, component, torch.float32, torch.device("cpu"), options)  # the extras in graph order
        traced = shapes if static else smallest(shapes)
        example = example_inputs(component, spec, traced, model.unet)
        if component is not Component.UNET:
            return build_blob(component, Float32Graph(component_module(model, component)), example, model.dtype,
                              folder, static=static)
        calibrated = None
        if quantize is Quantization.INT8:  # U-Net inputs as the engine feeds them, at its tuned size (batch:
            # the static one, else the smallest, which keeps calibrating a multi-stream engine affordable)
            tuned = example if static else example_inputs(component, spec, replace(shapes, opt_batch=shapes.batch[0]),
                                                          model.unet)
            calibrated = [graph_inputs(model.unet, inputs)
                          for inputs in calibration_set(model, tuned, names, calibration)]
        return build_blob(component, OvUNetGraph(model.unet, names), example, model.dtype, folder, static=static,
                          quantize=quantize, guard=unet_time_projection_input(model.unet), calibration=calibrated)

    weights = f", {quantize.value}" if quantize is not Quantization.NONE else ""
    inputs = " with ControlNet inputs" if options.controlnet_residuals and component is Component.UNET else ""
    description = (f"compile {component.value}{inputs} with OpenVINO ({extra['precision_hint']}{weights}, "
                   f"{extra['shapes']} shapes)")
    return BuildStep(description, key, lambda: cache.get_or_build(key, build, description=description), component)


_fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of ``module``'s parameters and buffers (names, dtypes, shapes and bytes): a ControlNet's identity in
    its cache key. Computed once per module object (it reads every weight; a loaded module's weights stay)."""
    known = _fingerprints.get(module)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    _fingerprints[module] = digest.hexdigest()[:16]
    return _fingerprints[module]


def openvino_controlnet_step(
    model: LoadedModel, name: str, controlnet: torch.nn.Module, shapes: EngineShapes | StreamConfig,
    options: EngineOptions, cache: EngineCache,
) -> BuildStep:
    """Convert the ControlNet ``name`` with OpenVINO (dynamic batch and spatial axes over the U-Net's range: its
    rows are those where it acts) and keep the compiled model; keyed by its weights."""
    from .openvino_backend import build_blob, openvino_version, precision_hint
    from .openvino_controlnet import OvControlNetGraph, controlnet_examples, controlnet_time_projection_input

    shapes = shape_range(Component.UNET, shapes, options, spatial_multiple(model, Component.UNET))
    extra = {"precision_hint": precision_hint(model.dtype), "shapes": "dynamic", "time_embedding": "float32",
             "controlnet": weights_fingerprint(controlnet)}
    key = engine_key(
        model, Component.CONTROLNET, shapes, backend="openvino", backend_version=openvino_version(),
        dtype=model.dtype, opset=None, device=torch.device("cpu"), extra=extra,
    )

    def build(folder: Path) -> str:
        traced = smallest(shapes)
        example = controlnet_examples(model, controlnet, traced.opt_batch, traced.opt_height, traced.opt_width)
        with controlnet_time_projection_input(controlnet) as given:
            graph = OvControlNetGraph(controlnet, given, sdxl=model.sdxl is not None)
            return build_blob(Component.CONTROLNET, graph, example, model.dtype, folder)

    description = f"compile controlnet {name!r} with OpenVINO ({extra['precision_hint']}, dynamic shapes)"
    return BuildStep(description, key, lambda: cache.get_or_build(key, build, description=description),
                     Component.CONTROLNET)


def plan_builds(
    kind: BackendKind, model: LoadedModel, shapes: EngineShapes | StreamConfig, options: EngineOptions, cache: EngineCache,
    controlnets: Mapping[str, torch.nn.Module] | None = None,
) -> list[BuildStep]:
    """The entries backend ``kind`` needs (none for eager torch), in build order. ``controlnets``: the engine's
    ControlNets by name, for a backend that runs them compiled (``options`` then says its U-Net takes residual
    inputs: :func:`~.factory.with_controlnets`)."""
    if kind is BackendKind.ONNXRUNTIME:
        return [onnx_step(model, shapes, options, cache, c, dtype=onnxruntime_dtype(model)) for c in COMPONENTS]
    if kind is BackendKind.OPENVINO:
        controlnets = controlnets or {}
        return [openvino_step(model, shapes, options, cache, c) for c in COMPONENTS] + [
            openvino_controlnet_step(model, name, module, shapes, options, cache) for name, module in controlnets.items()]
    if kind is BackendKind.TENSORRT:
        steps = []
        for component in COMPONENTS:
            onnx = onnx_step(model, shapes, options, cache, component, dtype=tensorrt_dtype(model))
            steps.append(tensorrt_step(model, shapes, options, cache, component, onnx))
        return steps
    if kind is BackendKind.TORCH and options.compile:
        return aoti_steps(model, shapes, options, cache)
    return []
