"""ONNX export of the U-Net, the VAE encoder and the VAE decoder, with dynamic batch and spatial axes.

Each component is wrapped in a small module with the engine's exact contract (:class:`UNetExport`,
:class:`VaeEncoder`, :class:`VaeDecoder`), exported with TorchScript-based ``torch.onnx.export(dynamo=False)`` (no
onnxscript needed) at opset ≥ 17, constant-folded with polygraphy when the graph fits in one protobuf (< 2 GB), and
then checked: ONNX Runtime against PyTorch at two resolutions and two batch sizes inside the engine's shape range.
Next: :mod:`streamdiff.backends.onnxruntime_backend` runs the file, :mod:`streamdiff.backends.tensorrt_build`
builds a TensorRT plan from it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError, EngineBuildError, import_extra, missing_extra
from .base import UNET_EXTRAS, unet_kwargs
from .keys import Component, ShapeRange
from .unet_inputs import ExtraInput, known_extra

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
DEFAULT_TOLERANCE = 1e-3


class UNetExport(torch.nn.Module):
    """ε = U-Net(sample ``[B, C, h, w]``, timestep ``[B]`` float32, encoder_hidden_states ``[B, L, D]``, then the
    ``extra_names`` inputs in that order): any extras of :data:`~streamdiff.backends.base.UNET_EXTRAS` (SDXL's added
    conditions, ControlNet residuals, IP-Adapter tokens and scales), handed to diffusers as the eager torch backend
    hands them (:func:`~streamdiff.backends.base.unet_kwargs`)."""

    def __init__(self, unet: torch.nn.Module, extra_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        unknown = [name for name in extra_names if not known_extra(name)]
        if unknown:
            raise ConfigError(f"exported U-Net graphs take the extra inputs {sorted(UNET_EXTRAS)} "
                              f"(down_residual_<i> for the down blocks), not {unknown}")
        self.unet = unet
        self.extra_names = tuple(extra_names)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        kwargs = unet_kwargs(dict(zip(self.extra_names, extras)))
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         **kwargs)[0]


def _vae_factors(vae: torch.nn.Module) -> tuple[float, float, bool]:
    scaling = float(getattr(vae.config, "scaling_factor", 1.0))
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return scaling, shift, type(vae).__name__ == "AutoencoderTiny"


class VaeEncoder(torch.nn.Module):
    """Images in [-1, 1] ``[B, 3, H, W]`` → scaled latents ``[B, C, H/s, W/s]``; the KL encoder gives its mode."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor, self.shift_factor, self.is_tiny = _vae_factors(vae)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(images, return_dict=False)[0]
        latents = out if self.is_tiny else out.mode()
        return (latents - self.shift_factor) * self.scaling_factor


class VaeDecoder(torch.nn.Module):
    """Scaled latents ``[B, C, h, w]`` → images in [-1, 1] ``[B, 3, h·s, w·s]``."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor, self.shift_factor, _ = _vae_factors(vae)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor, return_dict=False)[0]


@dataclass(frozen=True)
class ComponentSpec:
    """Names, axes and example-input maker of one component's graph."""

    inputs: tuple[str, ...]
    output: str
    dynamic_axes: dict[str, dict[int, str]]
    make_inputs: Callable[[int, int, int], tuple[torch.Tensor, ...]]  # (batch, height px, width px) -> inputs


def component_spec(
    component: Component,
    *,
    latent_channels: int,
    vae_scale_factor: int,
    text_length: int = 77,
    text_dim: int = 1024,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    extras: tuple[ExtraInput, ...] = (),
) -> ComponentSpec:
    """The graph signature of ``component``; ``make_inputs`` draws seeded example inputs for a shape.

    ``extras``: the U-Net's extra inputs (:class:`~streamdiff.backends.unet_inputs.ExtraInput`), in graph order.
    SDXL's ``time_ids`` example is the frame's own (H, W, 0, 0, H, W); ``ip_scale``'s is in [0, 2)."""
    s, c = vae_scale_factor, latent_channels

    def randn(*shape: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + sum(shape))
        return torch.randn(shape, generator=generator).to(device, dtype)

    if component is Component.UNET:

        def extra_input(extra: ExtraInput, b: int, h: int, w: int) -> torch.Tensor:
            if extra.name == "time_ids":
                return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device).expand(b, -1).contiguous()
            value = randn(*extra.shape(b, h // s, w // s))
            return value.abs().remainder(2.0) if extra.name == "ip_scale" else value

        def unet_inputs(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
            timestep = torch.linspace(999.0, 19.0, b).round().to(device, torch.float32)
            added = tuple(extra_input(extra, b, h, w) for extra in extras)
            return (randn(b, c, h // s, w // s), timestep, randn(b, text_length, text_dim), *added)

        return ComponentSpec(
            ("sample", "timestep", "encoder_hidden_states", *(extra.name for extra in extras)),
            "noise_pred",
            {"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"}, "encoder_hidden_states": {0: "B"},
             **{extra.name: extra.dynamic_axes() for extra in extras}, "noise_pred": {0: "B", 2: "h", 3: "w"}},
            unet_inputs,
        )
    if component is Component.VAE_ENCODER:
        return ComponentSpec(
            ("images",),
            "latents",
            {"images": {0: "B", 2: "H", 3: "W"}, "latents": {0: "B", 2: "h", 3: "w"}},
            lambda b, h, w: (randn(b, 3, h, w).clamp(-1, 1),),
        )
    return ComponentSpec(
        ("latents",),
        "images",
        {"latents": {0: "B", 2: "h", 3: "w"}, "images": {0: "B", 2: "H", 3: "W"}},
        lambda b, h, w: (randn(b, c, h // s, w // s),),
    )


NORM_LAYERS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def _float32_forward(layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``layer``'s normalisation computed in float32 (input, weight and bias cast up), the result cast back."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = layer.weight.float() if layer.weight is not None else None
        bias = layer.bias.float() if layer.bias is not None else None
        if isinstance(layer, torch.nn.GroupNorm):
            out = F.group_norm(x.float(), layer.num_groups, weight, bias, layer.eps)
        else:
            out = F.layer_norm(x.float(), layer.normalized_shape, weight, bias, layer.eps)
        return out.to(x.dtype)

    return forward


@contextlib.contextmanager
def float32_norms(module: torch.nn.Module) -> Iterator[int]:
    """While inside: every GroupNorm and LayerNorm of ``module`` computes in float32. Yields how many there are.

    For graphs exported in float16/bfloat16: a strongly typed TensorRT network runs each layer in its input's type,
    and a GroupNorm's variance over a whole group of a real VAE's activations overflows float16 (or loses the
    precision that bfloat16's 8 bits cannot hold). The exported graph gets ``Cast(float32) → norm → Cast(back)``
    around each norm; the rest of the graph keeps its type. The module is unchanged afterwards.
    """
    patched = [layer for layer in module.modules() if isinstance(layer, NORM_LAYERS) and "forward" not in vars(layer)]
    for layer in patched:
        layer.forward = _float32_forward(layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward


def export_module(
    module: torch.nn.Module,
    spec: ComponentSpec,
    shapes: ShapeRange,
    path: Path,
    opset: int,
    fold: bool = True,
    norms_in_float32: bool = False,
) -> Path:
    """Export ``module`` to ``path`` (external data beside it when > 2 GB) and constant-fold it. Returns ``path``.

    ``norms_in_float32``: GroupNorm/LayerNorm computed in float32 inside a float16/bfloat16 graph
    (:func:`float32_norms`).
    """
    onnx = import_extra("onnx", "onnx")
    example = spec.make_inputs(shapes.opt_batch, shapes.opt_height, shapes.opt_width)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        norms = float32_norms(module) if norms_in_float32 else contextlib.nullcontext(0)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), norms:
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose
            torch.onnx.export(
                module.eval(),
                example,
                str(path),
                input_names=list(spec.inputs),
                output_names=[spec.output],
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as error:  # noqa: BLE001 - reported as a build failure with its cause
        raise EngineBuildError(f"ONNX export to {path} failed: {type(error).__name__}: {error}") from error
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    if fold and weights < PROTOBUF_LIMIT // 2:
        fold_constants(path)
    elif fold:
        logger.info("skipping polygraphy constant folding of %s: %.2f GB of weights exceed one protobuf", path,
                    weights / 1e9)
    onnx.checker.check_model(str(path))
    return path


def fold_constants(path: Path) -> None:
    """Constant-fold the graph at ``path`` in place with polygraphy (needs onnx-graphsurgeon)."""
    import onnx

    try:
        from polygraphy.backend.onnx import fold_constants as polygraphy_fold
    except ImportError:
        raise missing_extra("polygraphy", "onnx") from None
    import_extra("onnx_graphsurgeon", "onnx")
    from polygraphy.logger import G_LOGGER

    model = onnx.load(str(path))
    before = len(model.graph.node)
    from .onnxruntime_backend import import_onnxruntime

    # Folding runs the graph's constant parts in ONNX Runtime, whose optimiser chatters on stderr otherwise.
    import_onnxruntime().set_default_logger_severity(3)
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        folded = polygraphy_fold(model, num_passes=2, fold_shapes=True, error_ok=False)
    finally:
        G_LOGGER.module_severity = severity
    logger.debug("constant folding %s: %d -> %d nodes", path.name, before, len(folded.graph.node))
    onnx.save(folded, str(path))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e| (the tolerance measure of the export checks)."""
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual.float() - expected.float()).abs().max() / scale)


def verification_cases(shapes: ShapeRange, multiple: int) -> list[tuple[int, int, int]]:
    """Two batch sizes × two resolutions inside ``shapes``: the tuned size and a second one (smaller if possible)."""
    b0 = shapes.opt_batch
    b1 = shapes.batch[1] if shapes.batch[1] != b0 else (shapes.batch[0] if shapes.batch[0] != b0 else b0 + 1)
    h0, w0 = shapes.opt_height, shapes.opt_width

    def other(side: int, bounds: tuple[int, int]) -> int:
        smaller = max(bounds[0], (side // 2) // multiple * multiple)
        return smaller if smaller != side else min(bounds[1], side + multiple)

    h1, w1 = other(h0, shapes.height), other(w0, shapes.width)
    return [(b, h, w) for b in (b0, b1) for h, w in ((h0, w0), (h1, w1))]


def verify_onnx(
    path: Path,
    module: torch.nn.Module,
    spec: ComponentSpec,
    cases: list[tuple[int, int, int]],
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[dict[str, float]]:
    """Run ``path`` in ONNX Runtime (CPU) and ``module`` in PyTorch on the same inputs for each (batch, H, W).

    Raises EngineBuildError when a relative error exceeds ``tolerance``. Returns one record per case.
    """
    from .onnxruntime_backend import OrtSession

    if next(module.parameters()).dtype != torch.float32:
        raise EngineBuildError("ONNX verification compares float32 graphs; verify the float32 module")
    session = OrtSession(path, torch.device("cpu"))
    records = []
    for batch, height, width in cases:
        inputs = tuple(t.float().cpu() for t in spec.make_inputs(batch, height, width))
        with torch.no_grad():
            expected = module(*inputs)
        actual = session.run(dict(zip(spec.inputs, inputs)))
        error = relative_error(actual, expected)
        records.append({"batch": batch, "height": height, "width": width, "relative_error": error})
        if not error <= tolerance:
            raise EngineBuildError(
                f"ONNX graph {path.name} differs from PyTorch at batch {batch}, {height}x{width}: relative error "
                f"{error:.2e} > {tolerance:.0e}"
            )
    logger.info("verified %s against PyTorch: max relative error %.2e over %d shapes", path.name,
                max(r["relative_error"] for r in records), len(records))
    return records
