"""Applying validated settings to per-stream states: a new state for a change of shape, edits in place otherwise.

:class:`StateBuilder` runs on the engine's worker between ticks. It encodes prompts (through the shared, cached
:class:`~streamdiff.models.prompts.PromptEncoder`), makes sure the backends serve a new frame size, and builds or
edits a :class:`~.state.StreamState` so that every change takes effect all at once, before the next tick uses it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import CfgMode, PromptConfig, StreamConfig
from ..models import LoadedModel
from ..models.ip_adapter import ImagePromptEncoder
from ..models.prompts import PromptEncoder
from .state import StreamState

# Fields whose change needs new buffers (a new Stream Batch); a change in the number of steps does too.
SHAPE_FIELDS = ("width", "height", "frame_buffer_size", "cfg_type", "use_denoising_batch", "mode")


def reshapes(old: StreamConfig, new: StreamConfig) -> list[str]:
    """The fields of a change from ``old`` to ``new`` that need a new Stream Batch (empty: an edit in place)."""
    changed = [k for k in SHAPE_FIELDS if getattr(new, k) != getattr(old, k)]
    if new.denoising_steps != old.denoising_steps:
        changed.append("steps")
    return changed


class StateBuilder:
    """Builds and changes stream states on ``model``; ``prepare_backends(config)`` readies the engines for it."""

    def __init__(
        self, model: LoadedModel, prompts: PromptEncoder, prepare_backends: Callable[[StreamConfig], None],
        images: ImagePromptEncoder | None = None,
    ) -> None:
        self.model = model
        self.prompts = prompts
        self.prepare_backends = prepare_backends
        self.images = images  # reference images → IP tokens (a model with an IP-Adapter), cached

    def create(self, config: StreamConfig, prompt: PromptConfig, version: int) -> StreamState:
        """A fresh state (an empty Stream Batch) for ``config`` and ``prompt``."""
        self.prepare_backends(config)
        cond, uncond, cond_extras, uncond_extras = self._encode(config, prompt)
        factor = self.model.vae_scale_factor
        latent_shape = (self.model.latent_channels, config.height // factor, config.width // factor)
        state = StreamState.create(config, prompt, self.model.schedule, latent_shape, cond, uncond,
                                   self.model.device, self.model.dtype, cond_extras, uncond_extras)
        state.version = version
        self._image_prompt(state, prompt)
        return state

    def change(self, state: StreamState, config: StreamConfig, prompt: PromptConfig, version: int) -> StreamState:
        """``state`` with one validated change applied: a new state when the shape changes (the frames inside are
        then lost: ``state.frames_inside``), else ``state`` itself, edited."""
        old = state.config
        if reshapes(old, config):
            new_state = self.create(config, prompt, version)
            if (config.width, config.height, config.frame_buffer_size) == (old.width, old.height,
                                                                             old.frame_buffer_size):
                new_state.last_output = state.last_output
            return new_state
        if config != old:
            state.set_schedule(config, self.model.schedule)
            state.filter.config = config.filter
        if prompt.prompt != state.prompt.prompt or prompt.negative_prompt != state.prompt.negative_prompt:
            state.set_conditioning(*self._encode(config, prompt))
        if prompt.seed != state.prompt.seed:
            state.set_seed(prompt.seed)
        if (prompt.reference_image, prompt.ip_adapter_scale) != (state.prompt.reference_image,
                                                                  state.prompt.ip_adapter_scale):
            self._image_prompt(state, prompt)
        state.guidance.scale = float(prompt.guidance_scale)
        state.guidance.delta = float(prompt.delta)
        state.prompt = prompt
        state.version = version
        return state

    def _encode(self, config: StreamConfig, prompt: PromptConfig) -> tuple[
        torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], dict[str, torch.Tensor] | None
    ]:
        """Hidden states and extra conditioning inputs (SDXL) of the prompt and, when the mode needs it, the
        negative prompt."""
        cond, cond_extras = self.prompts.conditioning(prompt.prompt, config.height, config.width)
        if config.cfg_type not in (CfgMode.FULL, CfgMode.INITIALIZE):
            return cond, None, cond_extras, None
        uncond, uncond_extras = self.prompts.conditioning(prompt.negative_prompt, config.height, config.width,
                                                          negative=True)
        return cond, uncond, cond_extras, uncond_extras

    def _image_prompt(self, state: StreamState, prompt: PromptConfig) -> None:
        """The stream's IP-Adapter rows: its reference image's tokens (embedded once per distinct image) at its
        scale, or zero tokens at scale 0 without an image. Nothing without an IP-Adapter."""
        if self.images is None:
            return
        if prompt.reference_image is None:
            empty = self.images.empty()
            state.set_image_prompt(empty, empty, 0.0)
        else:
            state.set_image_prompt(self.images.encode(prompt.reference_image), self.images.negative(),
                                   prompt.ip_adapter_scale)
