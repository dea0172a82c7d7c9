"""The comparisons of ``streamdiff bench``: models to measure and one function per comparison.

Each comparison builds its configurations as :class:`~streamdiff.bench.harness.Case` objects over real pipelines, runs
them interleaved with :func:`~streamdiff.bench.harness.run_interleaved` and returns a
:class:`~streamdiff.bench.harness.Comparison` with the extra numbers (U-Net calls, PSNR) and the targets it is held to.
The SD-2.1-size model is built in memory from :func:`streamdiff.testing.sd21_components` (random weights).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..backends.torch_backend import TorchUNet, TorchVae
from .harness import Case, Check, Comparison, run_interleaved
from ..config import CfgMode, FilterConfig, StreamConfig, t_index_list_for_strength
from ..core.image import psnr
from ..models import LoadedModel, load_model, model_from_components
from ..pipeline import StreamPipeline
from ..testing import CountingUNet

logger = logging.getLogger(__name__)

PROMPT = "a watercolor portrait"
STRENGTH = 0.5  # streamdiff and diffusers' "same steps" configuration denoise from the same noise level
STEPS = 2  # U-Net steps per frame: t_index_list (25, 37) of 50, i.e. diffusers' 4 steps at strength 0.5


@dataclass
class Settings:
    """How long to measure: interleaved rounds, calls per round, warm-up calls, and the slow baseline's rounds."""

    rounds: int = 5
    calls: int = 3
    warmup: int = 2
    slow_rounds: int = 3


@dataclass
class BenchModel:
    """One model in float32 and in bfloat16 (TAESD as VAE), its KL VAE if it has one, and the diffusers scheduler."""

    name: str
    fp32: LoadedModel
    bf16: LoadedModel
    scheduler: Any
    kl_vae: torch.nn.Module | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def model(self, dtype: torch.dtype) -> LoadedModel:
        return self.bf16 if dtype == torch.bfloat16 else self.fp32


def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` in ``dtype`` without a transient full-precision duplicate (tensors are cast one by one)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b.to(dtype) if b.is_floating_point() else b.clone()
    return copy.deepcopy(module, memo).eval()


def tiny_bench_model() -> BenchModel:
    """The built-in tiny model in float32 and bfloat16 (its VAE is already a tiny autoencoder)."""
    from diffusers import LCMScheduler

    from ..models.tiny import SD_SCHEDULER

    fp32 = load_model("tiny", device="cpu")
    bf16 = load_model("tiny", device="cpu", dtype=torch.bfloat16)
    _memory_format([bf16.unet, bf16.vae], True)()
    return BenchModel("tiny", fp32, bf16, LCMScheduler(**SD_SCHEDULER))


@torch.no_grad()
def calibrate_tiny_vae(vae: torch.nn.Module, seed: int = 0) -> None:
    """Rescale a random ``AutoencoderTiny``'s last layers: unit-spread latents, decoded images spread around 0.5."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.rand((1, 3, 64, 64), generator=generator) * 2 - 1
    encoder_out = vae.encoder.layers[-1]
    scale = 1.0 / vae.encode(probe).latents.std().clamp_min(1e-6)
    encoder_out.weight.mul_(scale)
    encoder_out.bias.mul_(scale)
    decoder_out = vae.decoder.layers[-1]
    latents = torch.randn((1, vae.config.latent_channels, 8, 8), generator=generator)
    images = (vae.decode(latents).sample + 1) / 2
    k = 0.25 / images.std().clamp_min(1e-6)
    decoder_out.weight.mul_(k)
    decoder_out.bias.mul_(k)
    decoder_out.bias.add_(0.5 - images.mean(dim=(0, 2, 3)) * k)


def sd21_parts(seed: int = 0) -> tuple[dict[str, Any], Any]:
    """SD-2.1-size U-Net, KL VAE, TAESD and text encoder with random weights (float32), and the tiny model's
    tokenizer."""
    from transformers import CLIPTokenizer

    from ..testing import sd21_components
    from ..models.tokenizer_vocab import write_tokenizer_files

    parts = sd21_components(seed)
    # Random TAESD gives latents with std ~0.02 and near-black images; rescale its last layers (as the tiny model
    # does) so latents have unit spread and images fill [0, 1]. Speed is unchanged; PSNR becomes meaningful.
    calibrate_tiny_vae(parts["taesd"], seed)
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    return parts, tokenizer


def sd21_model(parts: dict[str, Any], tokenizer: Any, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """The SD-2.1-size model of :func:`sd21_parts` (TAESD as its VAE) in ``dtype`` (cast copies unless float32)."""
    unet, vae, text = (parts[k] if dtype == torch.float32 else cast_copy(parts[k], dtype)
                       for k in ("unet", "taesd", "text_encoder"))
    components = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=parts["scheduler"])
    return model_from_components(components, dtype=dtype, model_id="sd21-random", fingerprint=f"sd21-random-{seed}")


def sd21_bench_model(seed: int = 0) -> BenchModel:
    """SD-2.1-size U-Net, KL VAE, TAESD and text encoder with random weights; the tiny model's tokenizer."""
    parts, tokenizer = sd21_parts(seed)
    fp32 = sd21_model(parts, tokenizer, torch.float32, seed)
    bf16 = sd21_model(parts, tokenizer, torch.bfloat16, seed)
    _memory_format([bf16.unet, bf16.vae], True)()  # the fastest bfloat16 layout on this CPU (see compare_dtype)
    return BenchModel("sd21", fp32, bf16, parts["scheduler"], kl_vae=parts["vae"])


def moving_frames(count: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` frames ``[1, 3, size, size]`` in [0, 1]: sine gratings moving a quarter period per frame."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    phases = torch.rand(3, generator=generator) * 2 * math.pi
    frames = []
    for i in range(count):
        channels = [torch.sin(2 * math.pi * (3 * xx + 2 * yy) + phases[c] + i * math.pi / 2) for c in range(3)]
        frames.append((0.5 + 0.4 * torch.stack(channels))[None].float())
    return frames


class StreamCase:
    """A prepared pipeline fed frames in order; ``step`` runs ``frames_per_step`` frames and keeps outputs by index."""

    def __init__(
        self, model: LoadedModel, config: StreamConfig, frames: list[torch.Tensor], vae: torch.nn.Module | None = None,
        unet: Any = None, frames_per_step: int = 1, guidance_scale: float = 1.2, channels_last: bool | None = None,
        vae_engine: Any = None,
    ) -> None:
        # bfloat16 runs channels-last unless told otherwise: its fastest layout here (see compare_dtype).
        layout = model.dtype == torch.bfloat16 if channels_last is None else channels_last
        self.unet = CountingUNet(unet if unet is not None else TorchUNet(model.unet, channels_last=layout))
        if vae_engine is None:
            vae_engine = TorchVae(vae if vae is not None else model.vae, channels_last=layout and vae is None)
        self.pipe = StreamPipeline(model, config, unet=self.unet, vae=vae_engine)
        self.pipe.prepare(prompt=PROMPT, guidance_scale=guidance_scale, delta=1.0, seed=2)
        self.frames = [f.to(model.dtype) for f in frames]
        self.frames_per_step = frames_per_step
        self.calls = 0
        self.outputs: dict[int, torch.Tensor] = {}

    def step(self) -> None:
        for _ in range(self.frames_per_step):
            out = self.pipe.step(self.frames[self.calls % len(self.frames)])
            if out.images is not None and not out.skipped:
                self.outputs[self.calls] = out.images.float()
            self.calls += 1

    def case(self, name: str, **kwargs: Any) -> Case:
        return Case(name, self.step, items=self.frames_per_step, **kwargs)

    def unet_metrics(self) -> dict[str, float]:
        frames = max(self.pipe.stats.frames_in, 1) if self.pipe.stream else 1
        return {
            "unet_calls_per_frame": len(self.unet.batches) / frames,
            "unet_rows_per_frame": sum(self.unet.batches) / frames,
        }


def base_config(size: int, **changes: Any) -> StreamConfig:
    return StreamConfig(width=size, height=size, t_index_list=t_index_list_for_strength(STRENGTH, STEPS), **changes)


def _measure(name: str, cases: dict[str, StreamCase], baseline: str, settings: Settings) -> Comparison:
    results = run_interleaved(
        [case.case(label) for label, case in cases.items()], settings.rounds, settings.calls, settings.warmup
    )
    metrics = {label: case.unet_metrics() for label, case in cases.items()}
    return Comparison(name, results, baseline=baseline, metrics=metrics)


def compare_stream_batch(bm: BenchModel, size: int, dtype: torch.dtype, settings: Settings) -> Comparison:
    """Stream Batch (one U-Net call of n rows per frame) vs sequential (n calls of one row), RCFG self."""
    frames = moving_frames(8, size)
    model = bm.model(dtype)
    cases = {
        "sequential": StreamCase(model, base_config(size, use_denoising_batch=False), frames),
        "stream-batch": StreamCase(model, base_config(size), frames),
    }
    comparison = _measure("stream-batch", cases, "sequential", settings)
    comparison.checks.append(Check("Stream Batch / sequential frames/s", comparison.speedup("stream-batch"), 1.0))
    return comparison


def compare_rcfg(
    bm: BenchModel, size: int, dtype: torch.dtype, settings: Settings, compiled_unet: Any = None,
    compiled_vae: Any = None,
) -> Comparison:
    """RCFG self and initialize vs full CFG (guidance 1.2, Stream Batch); compiled engines replace the eager ones.

    A compiled U-Net is specialised per batch size: each mode's first call (in the warm-up) compiles its own graph.
    """
    frames = moving_frames(8, size)
    model = bm.model(dtype)
    cases = {mode.value: StreamCase(model, base_config(size, cfg_type=mode), frames, unet=compiled_unet,
                                    vae_engine=compiled_vae)
             for mode in (CfgMode.FULL, CfgMode.INITIALIZE, CfgMode.SELF)}
    comparison = _measure("rcfg", cases, "full", settings)
    comparison.checks.append(Check("RCFG self / full CFG frames/s", comparison.speedup("self"), 1.8))
    return comparison


def compare_filter(bm: BenchModel, size: int, dtype: torch.dtype, settings: Settings) -> Comparison:
    """The similarity filter (threshold 0.98, at most 10 skips in a row) on a static and on a moving input."""
    frames = moving_frames(8, size)
    model = bm.model(dtype)
    config = base_config(size, filter=FilterConfig(enabled=True, threshold=0.98, max_skip_frames=10))
    cases = {"moving": StreamCase(model, config, frames), "static": StreamCase(model, config, frames[:1])}
    comparison = _measure("filter", cases, "moving", settings)
    for label, case in cases.items():
        stats = case.pipe.stats
        comparison.metrics[label]["skipped_fraction"] = stats.filter_skips / max(stats.frames_in, 1)
    return comparison


def _psnr_against(reference: StreamCase, other: StreamCase, last: int = 4) -> tuple[float, float]:
    """Mean PSNR (dB) of ``other``'s outputs against ``reference``'s for the same inputs, and the reference's std."""
    common = sorted(set(reference.outputs) & set(other.outputs))[-last:]
    if not common:
        return math.nan, math.nan
    values = [psnr(reference.outputs[i], other.outputs[i]) for i in common]
    spread = sum(float(reference.outputs[i].std()) for i in common) / len(common)
    return sum(values) / len(values), spread


def _memory_format(modules: list[torch.nn.Module], channels_last: bool) -> Callable[[], None]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def setup() -> None:
        for module in modules:
            module.to(memory_format=fmt)

    return setup


def compare_dtype(bm: BenchModel, size: int, dtype: torch.dtype, settings: Settings) -> Comparison:
    """float32 vs bfloat16, each contiguous and channels-last, on the fastest setting; PSNR against float32.

    The target compares the faster bfloat16 layout with the faster float32 layout, so the layout's own gain is not
    counted as a precision gain.
    """
    frames = moving_frames(8, size)
    config = base_config(size)
    streams = {
        "float32": StreamCase(bm.fp32, config, frames, channels_last=False),
        "float32-channels-last": StreamCase(bm.fp32, config, frames, channels_last=True),
        "bfloat16": StreamCase(bm.bf16, config, frames, channels_last=False),
        "bfloat16-channels-last": StreamCase(bm.bf16, config, frames, channels_last=True),
    }
    modules = {torch.float32: [bm.fp32.unet, bm.fp32.vae], torch.bfloat16: [bm.bf16.unet, bm.bf16.vae]}
    cases = [
        case.case(label, setup=_memory_format(modules[case.pipe.model.dtype], label.endswith("channels-last")))
        for label, case in streams.items()
    ]
    try:
        results = run_interleaved(cases, settings.rounds, settings.calls, settings.warmup)
    finally:
        _memory_format(modules[torch.float32], False)()
        _memory_format(modules[torch.bfloat16], True)()
    metrics: dict[str, dict[str, float]] = {}
    for label, case in streams.items():
        value, spread = _psnr_against(streams["float32"], case)
        metrics[label] = {"psnr_vs_float32_db": value, "output_std": spread}
    comparison = Comparison("dtype", results, baseline="float32", metrics=metrics)
    best = max(("bfloat16", "bfloat16-channels-last"), key=comparison.speedup)
    best_fp32 = max(("float32", "float32-channels-last"), key=comparison.speedup)
    comparison.checks.append(
        Check(f"{best} / {best_fp32} frames/s", comparison.speedup(best, over=best_fp32), 3.0)
    )
    comparison.checks.append(Check(f"{best} PSNR vs float32 (dB)", metrics[best]["psnr_vs_float32_db"], 30.0))
    comparison.note = f"fastest: {best} and {best_fp32}; the other comparisons run bfloat16 channels-last"
    return comparison


def compare_diffusers(
    bm: BenchModel, size: int, settings: Settings, compiled_unet: Any = None
) -> Comparison:
    """diffusers' ``AutoPipelineForImage2Image`` per frame (one full call) vs streamdiff, on the same U-Net.

    diffusers runs at its defaults (50 steps × strength 0.8, guidance 7.5, the model's KL VAE when it has one, fp32)
    and with streamdiff's steps and strength (4 steps × 0.5 = 2 U-Net steps, guidance 7.5). streamdiff runs the same
    2 steps with RCFG self: with the same VAE in float32, and in its fastest setting (bfloat16 channels-last, TAESD).
    """
    from diffusers import AutoPipelineForImage2Image, StableDiffusionPipeline

    text2img = StableDiffusionPipeline(
        vae=bm.kl_vae if bm.kl_vae is not None else bm.fp32.vae,
        text_encoder=bm.fp32.text_encoder,
        tokenizer=bm.fp32.tokenizer,
        unet=bm.fp32.unet,
        # steps_offset=1 is what StableDiffusionPipeline would patch in itself (with a deprecation warning).
        scheduler=type(bm.scheduler).from_config(bm.scheduler.config, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = AutoPipelineForImage2Image.from_pipe(text2img)
    pipe.set_progress_bar_config(disable=True)
    frames = moving_frames(8, size)
    batches: dict[str, list[int]] = {}
    frames_done: dict[str, int] = {}
    active: list[list[int]] = []

    def count(_module: Any, args: tuple[Any, ...]) -> None:
        if active:
            active[0].append(int(args[0].shape[0]))

    def diffusers_case(name: str, warmup: int | None, **kwargs: Any) -> Case:
        calls = batches.setdefault(name, [])
        frames_done[name] = 0

        def step() -> None:
            active[:] = [calls]
            generator = torch.Generator().manual_seed(0)
            pipe(PROMPT, image=frames[frames_done[name] % len(frames)], generator=generator, **kwargs)
            frames_done[name] += 1
            active.clear()

        return Case(name, step, warmup=warmup)

    config = base_config(size)
    per_step = settings.calls
    fastest = StreamCase(bm.bf16, config, frames, frames_per_step=per_step)
    streams = {
        "streamdiff-same-vae-fp32": StreamCase(bm.fp32, config, frames, vae=bm.kl_vae, frames_per_step=per_step),
        "streamdiff-fastest": fastest,
    }
    if compiled_unet is not None:
        streams["streamdiff-compiled"] = StreamCase(bm.bf16, config, frames, unet=compiled_unet, frames_per_step=per_step)
    cases = [
        diffusers_case("diffusers-defaults", warmup=0),  # warmed by the same-steps warm-up; one call is ~2 min
        diffusers_case("diffusers-same-steps", warmup=1, num_inference_steps=4, strength=STRENGTH),
        *(case.case(label) for label, case in streams.items()),
    ]
    hook = bm.fp32.unet.register_forward_pre_hook(count)
    try:
        results = run_interleaved(cases, settings.slow_rounds, 1, settings.warmup)
    finally:
        hook.remove()
    metrics = {label: case.unet_metrics() for label, case in streams.items()}
    for name, calls in batches.items():
        done = max(frames_done[name], 1)
        metrics[name] = {"unet_calls_per_frame": len(calls) / done, "unet_rows_per_frame": sum(calls) / done}
    comparison = Comparison("diffusers", results, baseline="diffusers-defaults", metrics=metrics)
    best = max(streams, key=comparison.speedup)
    comparison.checks.append(Check(f"{best} / diffusers defaults frames/s", comparison.speedup(best), 10.0))
    comparison.note = (
        f"same U-Net; diffusers at defaults runs 40 steps with CFG and the "
        f"{'KL VAE' if bm.kl_vae is not None else 'model VAE'}; streamdiff {STEPS} steps, RCFG self"
    )
    return comparison


COMPARISONS = ("stream-batch", "rcfg", "filter", "dtype", "diffusers", "rcfg-compiled", "streams", "controlnet")
# Only on request: rcfg-compiled compiles one U-Net graph per guidance mode (~1 min each at SD-2.1 size); streams
# runs 1, 2, 4 and 8 streams twice each (minutes at SD-2.1 size); controlnet compiles two U-Nets and a ControlNet
# with OpenVINO (bench/controlnet.py).
DEFAULT_COMPARISONS = COMPARISONS[:-3]


def controlnet_bench_model(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[LoadedModel, torch.nn.Module]:
    """The ``name`` model (``tiny`` or ``sd21``) in ``dtype`` only, and a ControlNet of its U-Net's size (for
    ``--only controlnet``: an SD-2.1-size model is not kept in float32 beside it)."""
    from .controlnet import controlnet_for

    if name == "tiny":
        model = load_model("tiny", device="cpu", dtype=dtype)
    else:
        model = sd21_model(*sd21_parts(seed), dtype, seed)
    return model, controlnet_for(model.unet, dtype, seed)
