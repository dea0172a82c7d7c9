"""Pure numerics of the LCM schedule used by Stream Batch.

No device choice, no I/O: functions take a :class:`NoiseSchedule` (the model's ᾱ table) and return CPU float64
values; the pipeline casts them once per configuration to its device and dtype.

Formulas (Luo et al., *Latent Consistency Models*, Eq. 9 and App. D; diffusers' ``LCMScheduler``):

- timesteps: ``k = T // N_orig``; the distillation grid is ``(1..N_orig)·k − 1`` reversed; ``num_inference_steps``
  indices are taken at ``floor(linspace(0, N_orig, steps, endpoint=False))``.
- boundary scalings at timestep t, with σ_data = 0.5 and s = t·timestep_scaling:
  ``c_skip = σ² / (s² + σ²)``, ``c_out = s / sqrt(s² + σ²)``.
- per slot: ``alpha_sqrt = sqrt(ᾱ_t)``, ``beta_sqrt = sqrt(1 − ᾱ_t)``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

SIGMA_DATA = 0.5


class PredictionType(str, enum.Enum):
    """What the model's U-Net predicts (its scheduler's ``prediction_type``); see :func:`streamdiff.core.step.to_epsilon`.

    ``EPSILON``: the noise ε (SD 1.x, SD-Turbo, most models). ``V_PREDICTION``: v = √ᾱ·ε − √(1−ᾱ)·x0 (SD 2.x at
    768 px and many fine-tunes). ``SAMPLE``: x0 itself.
    """

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a model: ``alphas_cumprod[t]`` for t in [0, T), and what its U-Net predicts."""

    alphas_cumprod: tuple[float, ...]
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    prediction_type: PredictionType = PredictionType.EPSILON

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_betas(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        original_inference_steps: int = 50,
        timestep_scaling: float = 10.0,
    ) -> NoiseSchedule:
        """Build ᾱ from a beta schedule (``linear`` or ``scaled_linear``, as in Stable Diffusion)."""
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise ConfigError(f"beta_schedule={beta_schedule!r} is not one of 'linear', 'scaled_linear'")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(tuple(float(a) for a in alphas_cumprod), original_inference_steps, timestep_scaling)


def lcm_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> tuple[int, ...]:
    """The ``num_inference_steps`` LCM timesteps, noisiest first (equal to ``LCMScheduler.set_timesteps``)."""
    original = schedule.original_inference_steps
    total = schedule.num_train_timesteps
    if not 1 <= num_inference_steps <= original:
        raise ConfigError(
            f"num_inference_steps={num_inference_steps} is outside [1, {original}] "
            f"(the model's original_inference_steps)"
        )
    k = total // original
    grid = [(i + 1) * k - 1 for i in range(original)][::-1]
    return tuple(grid[int(math.floor(i * original / num_inference_steps))] for i in range(num_inference_steps))


def boundary_scalings(timestep: int, timestep_scaling: float) -> tuple[float, float]:
    """LCM consistency boundary condition ``(c_skip, c_out)`` at a discrete timestep."""
    scaled = timestep * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


@dataclass(frozen=True)
class SlotCoefficients:
    """Per-slot coefficients of the Stream Batch, each ``[n·F, 1, 1, 1]`` (``timesteps`` is ``[n·F]``).

    Slot ``k·F + f`` holds step k of frame f: every value is repeated F times, so ``F > 1`` works for every n.
    """

    timesteps: torch.Tensor  # [nF] int64
    alpha_sqrt: torch.Tensor  # [nF, 1, 1, 1]
    beta_sqrt: torch.Tensor  # [nF, 1, 1, 1]
    c_skip: torch.Tensor  # [nF, 1, 1, 1]
    c_out: torch.Tensor  # [nF, 1, 1, 1]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> SlotCoefficients:
        """Move to the compute device/dtype (timesteps stay integer)."""
        return SlotCoefficients(
            self.timesteps.to(device),
            self.alpha_sqrt.to(device, dtype),
            self.beta_sqrt.to(device, dtype),
            self.c_skip.to(device, dtype),
            self.c_out.to(device, dtype),
        )

    def rows(self, start: int, stop: int) -> SlotCoefficients:
        """The coefficients of slots [start, stop)."""
        return SlotCoefficients(
            self.timesteps[start:stop],
            self.alpha_sqrt[start:stop],
            self.beta_sqrt[start:stop],
            self.c_skip[start:stop],
            self.c_out[start:stop],
        )


def slot_coefficients(
    schedule: NoiseSchedule, t_index_list: tuple[int, ...], num_inference_steps: int, frame_buffer_size: int
) -> SlotCoefficients:
    """Coefficients for every Stream Batch slot, computed once per configuration."""
    timesteps = lcm_timesteps(schedule, num_inference_steps)
    for entry in t_index_list:
        if not 0 <= entry < num_inference_steps:
            raise ConfigError(f"t_index_list entry {entry} is outside [0, {num_inference_steps})")
    sub = [timesteps[i] for i in t_index_list]
    acp = torch.tensor([schedule.alphas_cumprod[t] for t in sub], dtype=torch.float64)
    for entry, t, value in zip(t_index_list, sub, acp.tolist()):
        if not 0.0 < value < 1.0:
            raise ConfigError(
                f"t_index_list entry {entry} (timestep {t}) has alphas_cumprod={value}, outside (0, 1): the model's "
                f"schedule has zero signal there (zero terminal SNR); choose a later index"
            )
    scal = [boundary_scalings(t, schedule.timestep_scaling) for t in sub]

    def per_slot(values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(frame_buffer_size).view(-1, 1, 1, 1)

    return SlotCoefficients(
        timesteps=torch.tensor(sub, dtype=torch.int64).repeat_interleave(frame_buffer_size),
        alpha_sqrt=per_slot(acp.sqrt()),
        beta_sqrt=per_slot((1.0 - acp).sqrt()),
        c_skip=per_slot(torch.tensor([s[0] for s in scal], dtype=torch.float64)),
        c_out=per_slot(torch.tensor([s[1] for s in scal], dtype=torch.float64)),
    )
