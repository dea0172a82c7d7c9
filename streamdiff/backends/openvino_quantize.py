"""int8 quantisation of the OpenVINO U-Net with NNCF: the one owner of both kinds (:class:`Quantization`).

``INT8_WEIGHTS``: ``nncf.compress_weights`` (int8 asymmetric, per output channel); the CPU plugin decompresses the
weights inside its kernels, activations keep the compiled precision. No calibration data.

``INT8``: ``nncf.quantize`` — weights and activations int8 (FakeQuantize nodes the CPU plugin turns into int8
kernels), activation ranges measured on a calibration set (:func:`calibration_set`): U-Net inputs made as the engine
makes them — test-pattern frames, VAE-encoded, noised to the stream's timesteps with seeded noise, with the hidden
states of a few prompts — so the same :class:`~streamdiff.config.Calibration` gives the same quantised model.
``model_type=TRANSFORMER`` (SmoothQuant on the MatMuls, the attention's softmax inputs left float), chosen by PSNR
against the float engine (docs/PERF.md, "int8 on the CPU").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Iterator

import torch

from ..config import Calibration, Quantization
from ..core.image import frame_to_tensor, pattern_frame, to_model_range
from ..core.schedule import slot_coefficients
from ..errors import import_extra
from ..models.prompts import PromptEncoder
from .onnx_export import VaeEncoder

logger = logging.getLogger(__name__)

PATTERN_STRIDE = 13  # test-pattern frames this far apart per row: the disc and the colours move between rows


def import_nncf() -> ModuleType:
    return import_extra("nncf", "int8")


def nncf_version() -> str:
    """NNCF's version (part of a quantised engine's cache key); a missing NNCF is a clear error naming the extra."""
    return str(import_nncf().__version__)


def quantize_label(quantize: Quantization, calibration: Calibration) -> str:
    """What the U-Net's cache key records of its quantisation: mode, NNCF version and, for ``INT8``, every
    calibration parameter (samples, seed, timesteps, a digest of the prompts)."""
    label = f"{quantize.value}+nncf-{nncf_version()}"
    if quantize is not Quantization.INT8:
        return label
    prompts = hashlib.sha256("\n".join(calibration.prompts).encode()).hexdigest()[:12]
    steps = ",".join(str(t) for t in calibration.t_index_list or ())
    return (f"{label}+calib-{calibration.samples}x-seed{calibration.seed}-t{steps}of{calibration.num_inference_steps}"
            f"-prompts{prompts}")


def quantize_model(model: Any, quantize: Quantization,
                   calibration: Sequence[tuple[torch.Tensor, ...]] | None = None) -> Any:
    """``model`` (an ``ov.Model``) quantised by NNCF as ``quantize`` says (unchanged for ``NONE``).

    ``calibration``: for ``INT8``, the graph's inputs of each calibration call, in input order (float32,
    :func:`calibration_set`).
    """
    if quantize is Quantization.NONE:
        return model
    nncf = import_nncf()
    with _quiet_nncf():
        if quantize is Quantization.INT8_WEIGHTS:
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        if not calibration:
            raise ValueError("full int8 quantisation needs a calibration set")
        dataset = nncf.Dataset([tuple(t.detach().float().contiguous().numpy() for t in inputs)
                                for inputs in calibration])
        return nncf.quantize(model, dataset, subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF prints a statistics table and a progress bar at INFO; keep them to our own log's level."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_logger.setLevel(level)


@torch.inference_mode()
def calibration_set(model: Any, example: tuple[torch.Tensor, ...], names: tuple[str, ...],
                    calibration: Calibration) -> list[tuple[torch.Tensor, ...]]:
    """``calibration.samples`` float32 U-Net input tuples as the engine passes them (sample ``[B, C, h, w]``,
    timestep ``[B]``, hidden states ``[B, L, D]``, then the extras ``names``), each shaped like ``example`` (a tuple
    of that form; its timestep entry is not read). The OpenVINO graph takes the time projection for the timestep
    (:func:`~.openvino_inputs.graph_inputs`).

    Row r of sample s: test-pattern frame ``(s·B + r)·PATTERN_STRIDE`` at the frame size, VAE-encoded as the engine
    encodes (the eager torch encoder), noised to timestep ``r mod n`` of the calibration's n timesteps,
    x_t = √ᾱ·z + √(1−ᾱ)·ε (ε from ``torch.Generator().manual_seed(seed)``), with the hidden states of prompt
    ``(s + r) mod`` (the prompts and the empty prompt, which guidance rows carry). Extras: the prompt's SDXL
    conditioning where the graph takes it, else zeros (no ControlNet residual, no image prompt: what the engine
    feeds rows without them). ``model``: the LoadedModel.
    """
    if calibration.t_index_list is None:
        raise ValueError("the calibration has no timesteps: resolve them with Calibration.for_stream first")
    sample, _, hidden, *extras = example
    batch, _, latent_h, latent_w = sample.shape
    height, width = latent_h * model.vae_scale_factor, latent_w * model.vae_scale_factor
    coeffs = slot_coefficients(model.schedule, calibration.t_index_list, calibration.num_inference_steps, 1)
    slots = [r % len(coeffs.timesteps) for r in range(batch)]  # row r's timestep
    steps = coeffs.timesteps[slots]
    alpha_sqrt, beta_sqrt = coeffs.alpha_sqrt[slots].float(), coeffs.beta_sqrt[slots].float()
    prompts = PromptEncoder.for_model(model, capacity=len(calibration.prompts) + 1)
    texts = (*calibration.prompts, "")
    encoder = VaeEncoder(model.vae)
    generator = torch.Generator().manual_seed(calibration.seed)
    out = []
    for s in range(calibration.samples):
        frames = torch.cat([frame_to_tensor(pattern_frame((s * batch + r) * PATTERN_STRIDE, width, height))
                            for r in range(batch)])
        latents = encoder(to_model_range(frames).to(model.device, model.dtype)).float().cpu()  # [B, C, h, w]
        noise = torch.randn(latents.shape, generator=generator)
        x_t = alpha_sqrt * latents + beta_sqrt * noise
        rows = [prompts.conditioning(texts[(s + r) % len(texts)], height, width) for r in range(batch)]
        states = torch.cat([h for h, _ in rows]).float().cpu()
        if states.shape != hidden.shape:
            raise ValueError(f"calibration hidden states {tuple(states.shape)} do not fit the graph's "
                             f"{tuple(hidden.shape)}")
        fed = []
        for name, like in zip(names, extras):
            given = [conditions.get(name) for _, conditions in rows]
            fed.append(torch.cat(given).float().cpu().reshape(like.shape) if all(g is not None for g in given)
                       else torch.zeros_like(like))
        out.append((x_t, steps, states, *fed))
    return out


def weight_precisions(compiled: Any) -> dict[str, int]:
    """How many constants of each element type (``f32``, ``u8``…) a compiled model runs with (its runtime graph).

    An int8-weights U-Net shows ``u8`` constants (its compressed weights), a float one none.
    """
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Const":
            precision = info["outputPrecisions"].astype(str)
            counts[precision] = counts.get(precision, 0) + 1
    return counts


INT8_KERNELS = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution")


def int8_layers(compiled: Any) -> dict[str, int]:
    """How many Convolution/FullyConnected/MatMul layers of a compiled model take an int8 activation (their first
    input ``u8``/``i8`` in the runtime graph: int8 kernels, e.g. ``jit_avx2_I8``). A fully quantised U-Net shows
    them; a float or int8-weights one none (its weights are int8, its activations float)."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        layer = op.get_rt_info()["layerType"].astype(str)
        if layer in INT8_KERNELS and op.get_input_size() and \
                op.input(0).get_element_type().get_type_name() in ("u8", "i8"):
            counts[layer] = counts.get(layer, 0) + 1
    return counts
