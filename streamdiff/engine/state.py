"""Per-stream state, apart from the loaded model: buffers, coefficients, conditioning, filter, last output.

Several :class:`StreamState` objects can share one model; each owns what changes from frame to frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import PromptConfig, StreamConfig
from ..core.step import Embeddings, Guidance, StreamBuffers
from ..core.guidance import expand_embeddings
from ..core.schedule import NoiseSchedule, SlotCoefficients, slot_coefficients
from ..core.similarity import SimilarityFilter


def draw_noise(seed: int, rows: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Per-row initial noise, StreamDiffusion-compatible: float32 randn on the CPU from ``manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, *latent_shape), generator=generator, dtype=torch.float32)


@dataclass
class StreamStats:
    """Counters of one stream."""

    frames_in: int = 0
    frames_out: int = 0
    unet_calls: int = 0
    filter_skips: int = 0
    dropped_on_reconfigure: int = 0


@dataclass
class StreamState:
    """Everything one stream carries between calls. Build with :meth:`create`; change with the pipeline's update."""

    config: StreamConfig
    prompt: PromptConfig
    coeffs: SlotCoefficients
    buffers: StreamBuffers
    guidance: Guidance
    embeddings: Embeddings
    filter: SimilarityFilter
    last_output: torch.Tensor | None = None
    last_latents: torch.Tensor | None = None
    stats: StreamStats = field(default_factory=StreamStats)

    @classmethod
    def create(
        cls,
        config: StreamConfig,
        prompt: PromptConfig,
        schedule: NoiseSchedule,
        latent_shape: tuple[int, int, int],
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> StreamState:
        coeffs = cls._coefficients(config, schedule, device, dtype)
        f = config.frame_buffer_size
        noise = draw_noise(prompt.seed, config.denoising_steps * f, latent_shape).to(device, dtype)
        return cls(
            config=config,
            prompt=prompt,
            coeffs=coeffs,
            buffers=StreamBuffers.allocate(coeffs, f, latent_shape, noise),
            guidance=Guidance(config.cfg_type, float(prompt.guidance_scale), float(prompt.delta)),
            embeddings=cls._embeddings(config, cond, uncond),
            filter=SimilarityFilter(config.filter, seed=prompt.seed),
        )

    @staticmethod
    def _coefficients(
        config: StreamConfig, schedule: NoiseSchedule, device: torch.device, dtype: torch.dtype
    ) -> SlotCoefficients:
        coeffs = slot_coefficients(
            schedule, config.t_index_list, config.num_inference_steps, config.frame_buffer_size
        )
        return coeffs.to(device, dtype)

    @staticmethod
    def _embeddings(config: StreamConfig, cond: torch.Tensor, uncond: torch.Tensor | None) -> Embeddings:
        mode, f = config.cfg_type, config.frame_buffer_size
        rows = config.denoising_steps * f
        return Embeddings(
            batch=expand_embeddings(mode, cond, uncond, rows, f, has_first_step=True),
            first=expand_embeddings(mode, cond, uncond, f, f, has_first_step=True),
            later=expand_embeddings(mode, cond, uncond, f, f, has_first_step=False),
        )

    def set_conditioning(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> None:
        """New prompt embeddings (expanded once for every row layout)."""
        self.embeddings = self._embeddings(self.config, cond, uncond)

    def set_schedule(self, config: StreamConfig, schedule: NoiseSchedule) -> None:
        """New timesteps with the same n and F: coefficients change in place, the frames inside stay."""
        coeffs = self._coefficients(config, schedule, self.coeffs.alpha_sqrt.device, self.coeffs.alpha_sqrt.dtype)
        self.coeffs = coeffs
        self.buffers.set_coefficients(coeffs)
        self.config = config

    def set_seed(self, seed: int) -> None:
        """Redraw the per-row noise for ``seed`` and reseed the filter."""
        noise = draw_noise(seed, self.buffers.init_noise.shape[0], tuple(self.buffers.init_noise.shape[1:]))
        self.buffers.set_noise(noise.to(self.buffers.init_noise.device, self.buffers.init_noise.dtype))
        self.filter.reset(seed)
