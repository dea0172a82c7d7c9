"""Stream Batch equals sequential denoising (the core property), on an analytic U-Net: no model needed."""

from __future__ import annotations

import pytest
import torch

from streamdiff.config import CfgMode
from streamdiff.core.step import Embeddings, Guidance, StreamBuffers, sequential_step, stream_batch_step
from streamdiff.core.guidance import expand_embeddings, unet_rows
from streamdiff.core.schedule import NoiseSchedule, slot_coefficients
from streamdiff.testing import AnalyticUNet

SHAPE = (4, 8, 8)


def _setup(t_index_list: tuple[int, ...], frames: int, mode: CfgMode):
    coeffs = slot_coefficients(NoiseSchedule.from_betas(), t_index_list, 50, frames).to("cpu", torch.float64)
    rows = len(t_index_list) * frames
    noise = torch.randn((rows, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = torch.randn((1, 5, 6), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    uncond = torch.randn((1, 5, 6), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    embeddings = Embeddings(
        batch=expand_embeddings(mode, cond, uncond, rows, frames, True),
        first=expand_embeddings(mode, cond, uncond, frames, frames, True),
        later=expand_embeddings(mode, cond, uncond, frames, frames, False),
    )
    return coeffs, noise, embeddings


@pytest.mark.parametrize("mode", list(CfgMode))
@pytest.mark.parametrize("frames", [1, 2, 3])
@pytest.mark.parametrize("t_index_list", [(0,), (32, 45), (5, 20, 35), (0, 10, 25, 49)])
def test_stream_batch_equals_sequential(mode: CfgMode, frames: int, t_index_list: tuple[int, ...]) -> None:
    coeffs, noise, embeddings = _setup(t_index_list, frames, mode)
    n = len(t_index_list)
    guidance = Guidance(mode, scale=1.7, delta=0.8)
    unet = AnalyticUNet()
    buffers = StreamBuffers.allocate(coeffs, frames, SHAPE, noise.clone())
    inputs = [torch.randn((frames, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(10 + i))
              for i in range(6)]
    batched = [stream_batch_step(unet, x, buffers, coeffs, embeddings, guidance) for x in inputs]
    assert set(unet.batches) == {unet_rows(mode, n * frames, frames, True)}
    for i, x in enumerate(inputs[: len(inputs) - (n - 1)]):
        expected = sequential_step(AnalyticUNet(), x, noise, coeffs, embeddings, guidance)
        torch.testing.assert_close(batched[i + n - 1], expected, rtol=0, atol=1e-12)


def test_guidance_changes_the_result_only_above_one() -> None:
    coeffs, noise, embeddings = _setup((20, 40), 1, CfgMode.SELF)
    x = torch.randn((1, *SHAPE), dtype=torch.float64)
    plain = sequential_step(AnalyticUNet(), x, noise, coeffs, embeddings, Guidance(CfgMode.NONE, 1.0, 1.0))
    at_one = sequential_step(AnalyticUNet(), x, noise, coeffs, embeddings, Guidance(CfgMode.SELF, 1.0, 1.0))
    above = sequential_step(AnalyticUNet(), x, noise, coeffs, embeddings, Guidance(CfgMode.SELF, 2.0, 1.0))
    torch.testing.assert_close(plain, at_one)
    assert (plain - above).abs().max() > 1e-3


def test_self_guidance_uses_residual_noise() -> None:
    """RCFG self: ε = δ·ε̃ + γ(ε_c − δ·ε̃) with ε̃ = the first slot's own noise (paper Eq. 11)."""
    coeffs, noise, embeddings = _setup((25,), 1, CfgMode.SELF)
    x = torch.randn((1, *SHAPE), dtype=torch.float64)
    unet = AnalyticUNet()
    got = sequential_step(unet, x, noise, coeffs, embeddings, Guidance(CfgMode.SELF, 1.5, 0.5))
    eps_c = AnalyticUNet()(x, coeffs.timesteps, embeddings.first)
    eps = 0.5 * noise[:1] + 1.5 * (eps_c - 0.5 * noise[:1])
    expected = coeffs.c_out * (x - coeffs.beta_sqrt * eps) / coeffs.alpha_sqrt + coeffs.c_skip * x
    torch.testing.assert_close(got, expected)


def test_full_guidance_uses_negative_pass() -> None:
    coeffs, noise, embeddings = _setup((25,), 1, CfgMode.FULL)
    x = torch.randn((1, *SHAPE), dtype=torch.float64)
    got = sequential_step(AnalyticUNet(), x, noise, coeffs, embeddings, Guidance(CfgMode.FULL, 3.0, 1.0))
    both = AnalyticUNet()(torch.cat([x, x]), coeffs.timesteps.repeat(2), embeddings.first)
    eps = both[:1] + 3.0 * (both[1:] - both[:1])
    expected = coeffs.c_out * (x - coeffs.beta_sqrt * eps) / coeffs.alpha_sqrt + coeffs.c_skip * x
    torch.testing.assert_close(got, expected)


def _streamdiffusion_formulation(unet, inputs, coeffs, noise, cond, uncond, mode, scale, delta):
    """StreamDiffusion's per-call update for F = 1, written from its equations with whole-batch rolls.

    Slot 0 takes noise row 0 as residual noise; after the call every row's residual noise moves one slot on.
    """
    n = noise.shape[0]
    x_buffer = torch.zeros_like(noise[1:])
    stock = torch.zeros_like(noise)
    ones = torch.ones_like(coeffs.alpha_sqrt[:1])
    alpha_next = torch.cat([coeffs.alpha_sqrt[1:], ones])
    beta_next = torch.cat([coeffs.beta_sqrt[1:], ones])
    outputs = []
    for x_new in inputs:
        x = torch.cat([x_new, x_buffer])
        stock = torch.cat([noise[:1], stock[:-1]])
        if mode is CfgMode.INITIALIZE:
            pred = unet(torch.cat([x[:1], x]), torch.cat([coeffs.timesteps[:1], coeffs.timesteps]),
                        torch.cat([uncond, cond.expand(n, -1, -1)]))
            stock = torch.cat([pred[:1], stock[1:]])
            pred = pred[1:]
        else:
            pred = unet(x, coeffs.timesteps, cond.expand(n, -1, -1))
        eps = delta * stock + scale * (pred - delta * stock)
        x0 = coeffs.c_out * (x - coeffs.beta_sqrt * eps) / coeffs.alpha_sqrt + coeffs.c_skip * x
        scaled = coeffs.beta_sqrt * stock
        dx = coeffs.c_out * (scaled - coeffs.beta_sqrt * eps) / coeffs.alpha_sqrt + coeffs.c_skip * scaled
        stock = torch.cat([noise[1:], noise[:1]]) + dx * alpha_next / beta_next
        x_buffer = coeffs.alpha_sqrt[1:] * x0[:-1] + coeffs.beta_sqrt[1:] * noise[1:]
        outputs.append(x0[-1:])
    return outputs


@pytest.mark.parametrize("mode", [CfgMode.SELF, CfgMode.INITIALIZE])
@pytest.mark.parametrize("t_index_list", [(32, 45), (10, 20, 35), (0, 15, 30, 45)])
def test_matches_streamdiffusion_formulation(mode: CfgMode, t_index_list: tuple[int, ...]) -> None:
    """For F = 1 and n >= 2 our Stream Batch reproduces the StreamDiffusion update exactly (RCFG modes)."""
    coeffs, noise, _ = _setup(t_index_list, 1, mode)
    cond = torch.randn((1, 5, 6), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    uncond = torch.randn((1, 5, 6), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    n = len(t_index_list)
    embeddings = Embeddings(
        batch=expand_embeddings(mode, cond, uncond, n, 1, True),
        first=expand_embeddings(mode, cond, uncond, 1, 1, True),
        later=expand_embeddings(mode, cond, uncond, 1, 1, False),
    )
    inputs = [torch.randn((1, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(20 + i))
              for i in range(5)]
    buffers = StreamBuffers.allocate(coeffs, 1, SHAPE, noise.clone())
    ours = [stream_batch_step(AnalyticUNet(), x, buffers, coeffs, embeddings, Guidance(mode, 1.4, 0.7))
            for x in inputs]
    reference = _streamdiffusion_formulation(AnalyticUNet(), inputs, coeffs, noise, cond, uncond, mode, 1.4, 0.7)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_follows_the_models_prediction_type_like_lcm_scheduler(kind: str) -> None:
    """One LCM step (cfg none) equals diffusers' LCMScheduler.step(...).denoised for every prediction type."""
    from diffusers import LCMScheduler

    from streamdiff.core.schedule import PredictionType
    from streamdiff.models.tiny import SD_SCHEDULER

    scheduler = LCMScheduler(**{**SD_SCHEDULER, "prediction_type": kind})
    scheduler.set_timesteps(50)
    schedule = NoiseSchedule(tuple(float(a) for a in scheduler.alphas_cumprod))
    for index in (0, 20, 45):
        coeffs = slot_coefficients(schedule, (index,), 50, 1).to("cpu", torch.float64)
        x = torch.randn((1, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(index))
        embeddings = Embeddings(*(expand_embeddings(CfgMode.NONE, torch.ones(1, 5, 6, dtype=torch.float64), None,
                                                    1, 1, first) for first in (True, True, False)))
        unet = AnalyticUNet()
        ours = sequential_step(unet, x, torch.zeros_like(x), coeffs, embeddings, Guidance(CfgMode.NONE, 1.0, 1.0),
                               prediction_type=PredictionType(kind))
        output = AnalyticUNet()(x, coeffs.timesteps, embeddings.first)
        scheduler._step_index = index
        t = int(coeffs.timesteps[0])
        theirs = scheduler.step(output.float(), t, x.float()).denoised.double()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_guidance_is_exact_in_epsilon_space_for_v_prediction() -> None:
    """Full CFG on v equals full CFG on the equivalent ε: the conversion is affine with the same x_t for both rows."""
    from streamdiff.core.schedule import PredictionType
    from streamdiff.core.step import to_epsilon

    coeffs, _, embeddings = _setup((25,), 1, CfgMode.FULL)
    x = torch.randn((1, *SHAPE), dtype=torch.float64)
    v = sequential_step(AnalyticUNet(), x, torch.zeros_like(x), coeffs, embeddings, Guidance(CfgMode.FULL, 3.0, 1.0),
                        prediction_type=PredictionType.V_PREDICTION)
    both = AnalyticUNet()(torch.cat([x, x]), coeffs.timesteps.repeat(2), embeddings.first)
    v_guided = both[:1] + 3.0 * (both[1:] - both[:1])
    eps = to_epsilon(v_guided, x, coeffs, PredictionType.V_PREDICTION)
    expected = coeffs.c_out * (x - coeffs.beta_sqrt * eps) / coeffs.alpha_sqrt + coeffs.c_skip * x
    torch.testing.assert_close(v, expected)


def test_a_zero_snr_timestep_is_refused() -> None:
    from streamdiff import ConfigError

    alphas = list(NoiseSchedule.from_betas().alphas_cumprod)
    alphas[-1] = 0.0  # zero terminal SNR (rescaled betas)
    with pytest.raises(ConfigError, match=r"t_index_list entry 0 \(timestep 999\) has alphas_cumprod=0.0"):
        slot_coefficients(NoiseSchedule(tuple(alphas)), (0, 30), 50, 1)


@pytest.mark.parametrize("mode", list(CfgMode))
def test_stream_batch_equals_sequential_with_extras(mode: CfgMode) -> None:
    """Extra conditioning inputs (cond/uncond variants) ride along with their rows in both paths (analytic U-Net)."""
    from streamdiff.core.guidance import expand_extras

    t_index_list, frames = (5, 20, 35), 2
    coeffs, noise, embeddings = _setup(t_index_list, frames, mode)
    rows = len(t_index_list) * frames
    cond = {"text_embeds": torch.full((1, 3), 0.5, dtype=torch.float64)}
    uncond = {"text_embeds": torch.full((1, 3), -0.7, dtype=torch.float64)}
    embeddings.batch_extras = expand_extras(mode, cond, uncond, rows, frames, True)
    embeddings.first_extras = expand_extras(mode, cond, uncond, frames, frames, True)
    embeddings.later_extras = expand_extras(mode, cond, uncond, frames, frames, False)
    guidance = Guidance(mode, scale=1.7, delta=0.8)
    buffers = StreamBuffers.allocate(coeffs, frames, SHAPE, noise.clone())
    inputs = [torch.randn((frames, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(10 + i))
              for i in range(4)]
    batched = [stream_batch_step(AnalyticUNet(), x, buffers, coeffs, embeddings, guidance) for x in inputs]
    without = Embeddings(embeddings.batch, embeddings.first, embeddings.later)
    n = len(t_index_list)
    for i, x in enumerate(inputs[: len(inputs) - (n - 1)]):
        expected = sequential_step(AnalyticUNet(), x, noise, coeffs, embeddings, guidance)
        torch.testing.assert_close(batched[i + n - 1], expected, rtol=0, atol=1e-12)
        plain = sequential_step(AnalyticUNet(), x, noise, coeffs, without, guidance)
        assert (plain - expected).abs().max() > 1e-4  # the extras reached the U-Net
