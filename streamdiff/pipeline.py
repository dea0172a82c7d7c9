"""The stream pipeline: encode → Stream Batch denoise → decode, with live updates.

Typical use::

    pipe = StreamPipeline.from_pretrained("tiny", StreamConfig(width=256, height=256, t_index_list=[32, 45]))
    pipe.prepare(prompt="a watercolor portrait", guidance_scale=1.2, delta=1.0, seed=2)
    out = pipe(frame)        # None for the first n−1 frames while the Stream Batch fills
    pipe.update(prompt="an oil painting", t_index_list=[20, 40])
    tail = pipe.flush()      # the frames still inside at end of input
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import numpy as np
import torch

from .backends.base import UNetEngine, VaeEngine
from .backends.device import resolve_device, resolve_dtype
from .backends.factory import create_engines
from .backends.keys import EngineOptions
from .config import BackendKind, CfgMode, PromptConfig, StreamConfig, StreamMode
from .core.step import sequential_step, stream_batch_step
from .errors import ConfigError, FrameError, StreamDiffError
from .core.image import check_image_tensor, frame_to_tensor, from_model_range, tensor_to_frame, to_model_range
from .models import LoadedModel, LoraSpec, load_model
from .models.prompts import PromptEncoder
from .engine.state import StreamState

logger = logging.getLogger(__name__)

_PROMPT_FIELDS = {f.name for f in fields(PromptConfig)}
_SHAPE_FIELDS = {"width", "height", "frame_buffer_size", "cfg_type", "use_denoising_batch", "mode"}


@dataclass
class StreamOutput:
    """What one call produced. ``images`` is ``[F, 3, H, W]`` in [0, 1], or None while the batch fills."""

    images: torch.Tensor | None
    skipped: bool = False
    frame_ids: tuple[Any, ...] = ()


class StreamPipeline:
    """A loaded model plus one stream's state. Build with :meth:`from_pretrained`, then :meth:`prepare`."""

    def __init__(
        self,
        model: LoadedModel,
        config: StreamConfig,
        unet: UNetEngine | None = None,
        vae: VaeEngine | None = None,
        backend: BackendKind | str = BackendKind.TORCH,
        engine_options: EngineOptions | None = None,
    ) -> None:
        self.model = model
        self.config = self._checked(config)
        # Engines the pipeline made itself are remade (from the cache) when a live update changes their shapes.
        self._engine_request = (backend, engine_options) if unet is None and vae is None else None
        if unet is None or vae is None:
            default_unet, default_vae = create_engines(backend, model, config, engine_options)
            unet, vae = unet or default_unet, vae or default_vae
        self.unet = unet
        self.vae = vae
        self.prompts = PromptEncoder(model.tokenizer, model.text_encoder)
        self.state: StreamState | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny",
        config: StreamConfig | None = None,
        *,
        vae: str | None = None,
        loras: Sequence[LoraSpec | tuple[str, float] | str] = (),
        dtype: str | None = None,
        device: str = "auto",
        backend: BackendKind | str = BackendKind.TORCH,
        engine_options: EngineOptions | None = None,
        **load_kwargs: Any,
    ) -> StreamPipeline:
        """Load ``model`` (``"tiny"``, folder, checkpoint file or hub id) and build a pipeline. Next: prepare().

        ``engine_options`` (engine folder, compile, channels-last, resolution range) configure the backend;
        compiled engines missing from the cache are built on first use.
        """
        config = config or StreamConfig()
        resolved = resolve_device(device)
        loaded = load_model(
            model, vae=vae, loras=loras, dtype=resolve_dtype(dtype, resolved), device=resolved, **load_kwargs
        )
        return cls(loaded, config, backend=backend, engine_options=engine_options)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent; C comes from the U-Net config."""
        factor = self.model.vae_scale_factor
        return (self.model.latent_channels, self.config.height // factor, self.config.width // factor)

    # -- set-up and live changes ------------------------------------------------------------------------------

    def prepare(
        self,
        prompt: str | None = None,
        negative_prompt: str = "",
        guidance_scale: float = 1.2,
        delta: float = 1.0,
        seed: int = 2,
    ) -> None:
        """Set the prompt and guidance and allocate the stream's buffers. Next: call the pipeline with frames."""
        if prompt is None:
            raise ConfigError("prompt is missing: prepare(prompt='...') needs a prompt (use '' for none)")
        settings = PromptConfig(prompt, negative_prompt, guidance_scale, delta, seed)
        cond, uncond = self._encode(settings)
        self.state = StreamState.create(
            self.config, settings, self.model.schedule, self.latent_shape, cond, uncond, self.model.device,
            self.model.dtype,
        )

    def update(self, **changes: Any) -> None:
        """Change prompt, negative_prompt, guidance_scale, delta, seed or any StreamConfig field, live.

        Prompt, guidance and timestep changes keep the frames inside the Stream Batch; a change of shape (size, F,
        cfg_type, batching, or the number of steps) starts a new batch and counts the frames inside as dropped.
        """
        state = self._require_state()
        prompt_changes = {k: v for k, v in changes.items() if k in _PROMPT_FIELDS}
        config_changes = {k: v for k, v in changes.items() if k not in _PROMPT_FIELDS}
        settings = replace(state.prompt, **prompt_changes)
        config = self.config.with_changes(**config_changes) if config_changes else self.config
        reshape = any(getattr(config, k) != getattr(self.config, k) for k in _SHAPE_FIELDS) or (
            config.denoising_steps != self.config.denoising_steps
        )
        if reshape:
            self._checked(config)
            if self._engine_request is not None:
                backend, options = self._engine_request
                self.unet, self.vae = create_engines(backend, self.model, config, options)
            state.stats.dropped_on_reconfigure += len([i for i in state.buffers.frame_ids if i is not None])
            stats = state.stats
            self.config = config
            self.prepare(settings.prompt, settings.negative_prompt, settings.guidance_scale, settings.delta, settings.seed)
            self._require_state().stats = stats
            return
        if config != self.config:
            state.set_schedule(config, self.model.schedule)
            state.filter.config = config.filter
            self.config = config
        if settings.prompt != state.prompt.prompt or settings.negative_prompt != state.prompt.negative_prompt:
            state.set_conditioning(*self._encode(settings))
        if settings.seed != state.prompt.seed:
            state.set_seed(settings.seed)
        state.guidance.scale = float(settings.guidance_scale)
        state.guidance.delta = float(settings.delta)
        state.prompt = settings

    # -- per frame --------------------------------------------------------------------------------------------

    def __call__(self, frame: np.ndarray | torch.Tensor | None = None) -> np.ndarray | torch.Tensor | None:
        """One frame in, one frame out (same kind: uint8 RGB array or float tensor in [0, 1]).

        Returns None for the first n−1 calls while the Stream Batch fills. ``frame=None`` in txt2img mode.
        """
        if isinstance(frame, np.ndarray):
            out = self.step(frame_to_tensor(frame))
            if out.images is None:
                return None
            images = tensor_to_frame(out.images)
            return images[0] if frame.ndim == 3 else images
        return self.step(frame).images

    @torch.inference_mode()
    def step(self, images: torch.Tensor | None = None, frame_id: Any = None) -> StreamOutput:
        """The engine step: float ``[F, 3, H, W]`` in [0, 1] (None for txt2img) → :class:`StreamOutput`."""
        state = self._require_state()
        config = state.config
        f = config.frame_buffer_size
        state.stats.frames_in += f
        if config.mode is StreamMode.TXT2IMG:
            latents = state.buffers.init_noise[:f]
        else:
            if images is None:
                raise FrameError("img2img mode needs an input frame; use mode='txt2img' to generate without one")
            check_image_tensor(images, f, config.height, config.width)
            model_input = to_model_range(images.to(self.model.device, self.model.dtype))
            if state.filter.decide(model_input).skip:
                state.stats.filter_skips += f
                return StreamOutput(state.last_output, skipped=True)
            # The method's first step (paper Sec. 3; reference encode_image): noise the clean latent to t0.
            coeffs = state.coeffs
            latents = coeffs.alpha_sqrt[:f] * self.vae.encode(model_input) + coeffs.beta_sqrt[:f] * (
                state.buffers.init_noise[:f]
            )
        state.last_latents = latents
        return self._denoise(state, latents, frame_id)

    def flush(self) -> list[StreamOutput]:
        """Run the frames still inside the Stream Batch out (n−1 calls at most). Their outputs, oldest first."""
        state = self._require_state()
        outputs: list[StreamOutput] = []
        with torch.inference_mode():
            while state.last_latents is not None and any(i is not None for i in state.buffers.frame_ids):
                out = self._denoise(state, state.last_latents, None, placeholder=True)
                if out.images is not None:
                    outputs.append(out)
        state.buffers.reset()
        return outputs

    def _denoise(
        self, state: StreamState, latents: torch.Tensor, frame_id: Any, placeholder: bool = False
    ) -> StreamOutput:
        config = state.config
        state.stats.unet_calls += 1
        if not config.use_denoising_batch:
            x0 = sequential_step(
                self.unet, latents, state.buffers.init_noise, state.coeffs, state.embeddings, state.guidance,
                config.add_noise,
            )
            return self._finish(state, x0, (frame_id,))
        x0 = stream_batch_step(
            self.unet, latents, state.buffers, state.coeffs, state.embeddings, state.guidance, config.add_noise
        )
        ids = state.buffers.frame_ids
        ids.append(None if placeholder else frame_id if frame_id is not None else state.stats.frames_in)
        if len(ids) < config.denoising_steps:
            return StreamOutput(None)
        leaving = ids.pop(0)
        if leaving is None:
            return StreamOutput(None)
        return self._finish(state, x0, (leaving,))

    def _finish(self, state: StreamState, x0: torch.Tensor, ids: tuple[Any, ...]) -> StreamOutput:
        images = from_model_range(self.vae.decode(x0)).float()
        state.last_output = images
        state.stats.frames_out += images.shape[0]
        return StreamOutput(images, frame_ids=ids)

    def txt2img(self) -> torch.Tensor | None:
        """One txt2img call (``mode='txt2img'``): ``[F, 3, H, W]`` in [0, 1], None while the batch fills."""
        return self.step(None).images

    # -- helpers ----------------------------------------------------------------------------------------------

    def _checked(self, config: StreamConfig) -> StreamConfig:
        factor = self.model.vae_scale_factor
        for name in ("width", "height"):
            if getattr(config, name) % factor:
                raise ConfigError(f"{name}={getattr(config, name)} is not a multiple of the VAE factor {factor}")
        return config

    def _encode(self, settings: PromptConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = self.prompts.encode(settings.prompt)
        needs_negative = self.config.cfg_type in (CfgMode.FULL, CfgMode.INITIALIZE)
        uncond = self.prompts.encode(settings.negative_prompt) if needs_negative else None
        return cond, uncond

    def _require_state(self) -> StreamState:
        if self.state is None:
            raise StreamDiffError("the stream is not prepared: call prepare(prompt=...) first")
        return self.state
