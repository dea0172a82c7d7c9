from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from streamdiff.core.schedule import NoiseSchedule, boundary_scalings, lcm_timesteps, slot_coefficients
from streamdiff.models.tiny import SD_SCHEDULER


@pytest.fixture(scope="module")
def scheduler() -> LCMScheduler:
    return LCMScheduler(**SD_SCHEDULER)


@pytest.fixture(scope="module")
def schedule(scheduler: LCMScheduler) -> NoiseSchedule:
    return NoiseSchedule(tuple(float(a) for a in scheduler.alphas_cumprod))


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 25, 50])
def test_timesteps_equal_lcm_scheduler(scheduler: LCMScheduler, schedule: NoiseSchedule, steps: int) -> None:
    scheduler.set_timesteps(steps)
    assert list(lcm_timesteps(schedule, steps)) == scheduler.timesteps.tolist()


def test_from_betas_equals_scheduler(scheduler: LCMScheduler, schedule: NoiseSchedule) -> None:
    built = NoiseSchedule.from_betas()
    assert torch.allclose(torch.tensor(built.alphas_cumprod), torch.tensor(schedule.alphas_cumprod), atol=1e-7)


@pytest.mark.parametrize("t_index_list, frames", [((0,), 1), ((32, 45), 1), ((10, 20, 30, 40), 2), ((0, 49), 3)])
def test_slot_coefficients_equal_lcm_scheduler(
    scheduler: LCMScheduler, schedule: NoiseSchedule, t_index_list: tuple[int, ...], frames: int
) -> None:
    scheduler.set_timesteps(50)
    coeffs = slot_coefficients(schedule, t_index_list, 50, frames)
    n = len(t_index_list)
    assert coeffs.alpha_sqrt.shape == (n * frames, 1, 1, 1)
    for row in range(n * frames):
        t = int(scheduler.timesteps[t_index_list[row // frames]])
        assert int(coeffs.timesteps[row]) == t
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert float(coeffs.c_skip[row]) == pytest.approx(float(c_skip), rel=1e-12, abs=1e-15)
        assert float(coeffs.c_out[row]) == pytest.approx(float(c_out), rel=1e-12)
        acp = scheduler.alphas_cumprod[t].double()
        assert float(coeffs.alpha_sqrt[row]) == pytest.approx(float(acp.sqrt()), rel=1e-6)
        assert float(coeffs.beta_sqrt[row]) == pytest.approx(float((1 - acp).sqrt()), rel=1e-6)


def test_boundary_scalings_limits() -> None:
    c_skip, c_out = boundary_scalings(0, 10.0)
    assert (c_skip, c_out) == (1.0, 0.0)
    c_skip, c_out = boundary_scalings(999, 10.0)
    assert c_skip < 1e-8 and c_out == pytest.approx(1.0, abs=1e-8)


def test_steps_beyond_original_rejected(schedule: NoiseSchedule) -> None:
    from streamdiff import ConfigError

    with pytest.raises(ConfigError, match="num_inference_steps=60 is outside"):
        lcm_timesteps(schedule, 60)
