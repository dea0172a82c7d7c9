"""The single-stream convenience: one :class:`~streamdiff.engine.Stream` on its own engine, driven synchronously.

Typical use::

    pipe = StreamPipeline.from_pretrained("tiny", StreamConfig(width=256, height=256, t_index_list=[32, 45]))
    pipe.prepare(prompt="a watercolor portrait", guidance_scale=1.2, delta=1.0, seed=2)
    out = pipe(frame)        # None for the first n−1 frames while the Stream Batch fills
    pipe.update(prompt="an oil painting", t_index_list=[20, 40])   # any thread; applied at the next frame
    tail = pipe.flush()      # the frames still inside at end of input

For many streams on one model, or a worker thread, use :class:`~streamdiff.engine.StreamEngine` directly.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .backends.base import UNetEngine, VaeEngine
from .backends.keys import EngineOptions
from .config import BackendKind, ControlNetSpec, PromptConfig, StreamConfig
from .core.image import check_image_tensor, frame_to_tensor, tensor_to_frame
from .engine import SINGLE_STREAM, Stream, StreamEngine, StreamOutput, StreamStats
from .engine.state import StreamState
from .errors import ConfigError, StreamDiffError
from .models import LoadedModel, LoraSpec, load_model

logger = logging.getLogger(__name__)

class StreamPipeline:
    """A loaded model plus one stream. Build with :meth:`from_pretrained`, then :meth:`prepare`.

    Frames go through :meth:`step` / ``__call__`` from one thread; :meth:`update` may come from any thread (it is
    validated at once and applied before the next frame).
    """

    def __init__(
        self,
        model: LoadedModel,
        config: StreamConfig,
        unet: UNetEngine | None = None,
        vae: VaeEngine | None = None,
        backend: BackendKind | str = BackendKind.TORCH,
        engine_options: EngineOptions | None = None,
        cuda_graphs: bool | None = None,
        controlnets: Mapping[str, Any] | None = None,
    ) -> None:
        self.engine = StreamEngine(
            model, replace(SINGLE_STREAM, cuda_graphs=cuda_graphs), unet=unet, vae=vae,
            backend=backend, engine_options=engine_options, controlnets=controlnets,
        )
        self.engine.check_settings(config, _default_prompt())
        self.engine.prepare_backends(config)
        self._config = config
        self.stream: Stream | None = None

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
        cuda_graphs: bool | None = None,
        controlnets: Mapping[str, Any] | None = None,
        **load_kwargs: Any,
    ) -> StreamPipeline:
        """Load ``model`` (``"tiny"``, folder, checkpoint file or hub id) and build a pipeline. Next: prepare().

        ``engine_options`` (engine folder, compile, channels-last, resolution range) configure the backend;
        compiled engines missing from the cache are built on first use. ``cuda_graphs``: as
        ``EngineConfig.cuda_graphs`` (None: on for torch on CUDA in float16). ``controlnets``: named ControlNets
        (``{"canny": "ID_OR_PATH"}``) that :meth:`prepare` may use.
        """
        loaded = load_model(model, vae=vae, loras=loras, dtype=dtype, device=device, **load_kwargs)
        return cls(loaded, config or StreamConfig(), backend=backend, engine_options=engine_options,
                   cuda_graphs=cuda_graphs, controlnets=controlnets)

    # -- what it runs on ------------------------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel:
        return self.engine.model

    @property
    def config(self) -> StreamConfig:
        """The stream's newest requested configuration."""
        return self.stream.config if self.stream is not None else self._config

    @property
    def unet(self) -> UNetEngine | None:
        return self.engine.unet

    @property
    def vae(self) -> VaeEngine | None:
        return self.engine.vae

    @property
    def prompts(self) -> Any:
        return self.engine.prompts

    @property
    def state(self) -> StreamState | None:
        """The stream's numeric state (buffers, coefficients), once the first frame made it."""
        return self.stream.state if self.stream is not None else None

    @property
    def stats(self) -> StreamStats:
        return self._require_stream().stats

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent; C comes from the U-Net config."""
        factor = self.model.vae_scale_factor
        return (self.model.latent_channels, self.config.height // factor, self.config.width // factor)

    # -- set-up and live changes ------------------------------------------------------------------------------------

    def prepare(
        self,
        prompt: str | None = None,
        negative_prompt: str = "",
        guidance_scale: float = 1.2,
        delta: float = 1.0,
        seed: int = 2,
        *,
        reference_image: Any = None,
        ip_adapter_scale: float = 1.0,
        controlnets: Sequence[ControlNetSpec | dict[str, Any] | str] = (),
    ) -> None:
        """Set the prompt and guidance (and the ControlNets it uses) and open the stream (a new one each time).
        Next: call it with frames.

        ``reference_image``/``ip_adapter_scale``: an image prompt, for a model with an IP-Adapter."""
        if prompt is None:
            raise ConfigError("prompt is missing: prepare(prompt='...') needs a prompt (use '' for none)")
        config = self.config
        if self.stream is not None:
            self.stream.close()
            self.engine.apply_messages()  # the old stream leaves now: this engine serves one stream at a time
        self.stream = self.engine.open_stream(config, prompt, negative_prompt, guidance_scale, delta, seed,
                                              reference_image=reference_image, ip_adapter_scale=ip_adapter_scale,
                                              controlnets=controlnets, name="pipeline")
        self.engine.apply_messages()  # make the state now, so that its buffers can be inspected

    def update(self, **changes: Any) -> int:
        """Change prompt, negative_prompt, guidance_scale, delta, seed or any StreamConfig field, live.

        Validated now (ConfigError leaves the stream as it was), applied before the next frame, all at once. Prompt,
        guidance and timestep changes keep the frames inside the Stream Batch; a change of shape (size, F,
        cfg_type, batching, the number of steps) starts a new batch and counts the frames inside as dropped.
        Returns the settings version.
        """
        return self._require_stream().update(**changes)

    # -- per frame --------------------------------------------------------------------------------------------------

    def __call__(self, frame: np.ndarray | torch.Tensor | None = None, control_image: Any = None
                 ) -> np.ndarray | torch.Tensor | None:
        """One frame in, one frame out (same kind: uint8 RGB array or float tensor in [0, 1]).

        Returns None for the first n−1 calls while the Stream Batch fills. ``frame=None`` in txt2img mode.
        ``control_image``: for passthrough ControlNets (see :meth:`step`).
        """
        if isinstance(frame, np.ndarray):
            out = self.step(frame_to_tensor(frame), control_image=control_image)
            if out.images is None:
                return None
            images = tensor_to_frame(out.images)
            return images[0] if frame.ndim == 3 else images
        return self.step(frame, control_image=control_image).images

    @torch.inference_mode()
    def step(self, images: torch.Tensor | None = None, frame_id: Any = None, control_image: Any = None
             ) -> StreamOutput:
        """One engine tick: float ``[F, 3, H, W]`` in [0, 1] (None for txt2img) → :class:`StreamOutput`.

        ``frame_id`` (any object) is given to every frame of the group and comes back in ``frame_ids``.
        ``control_image`` (uint8 ``[H, W, 3]`` or float ``[3, H, W]``): the control image of every frame of the
        group for passthrough ControlNets (:meth:`~streamdiff.engine.Stream.submit`).
        """
        stream = self._require_stream()
        config = self.config
        if images is None:
            group: list[torch.Tensor | None] = [None] * config.frame_buffer_size
        else:
            check_image_tensor(images, config.frame_buffer_size, config.height, config.width)
            group = list(images)
        for image in group:
            stream.submit(image, frame_id, control_image=control_image)
        out = self.engine.step({}).get(stream)
        if out is None:
            if stream.error is not None:
                raise stream.error
            raise StreamDiffError(f"{stream.name} produced nothing this tick")
        return out

    def flush(self) -> list[StreamOutput]:
        """Run the frames still inside the Stream Batch out (n−1 calls at most). Their outputs, oldest first."""
        with torch.inference_mode():
            return self.engine.flush(self._require_stream())

    def txt2img(self) -> torch.Tensor | None:
        """One txt2img call (``mode='txt2img'``): ``[F, 3, H, W]`` in [0, 1], None while the batch fills."""
        return self.step(None).images

    def close(self) -> None:
        """Close the stream (prepare() opens a new one)."""
        if self.stream is not None:
            self.stream.close()

    def _require_stream(self) -> Stream:
        if self.stream is None:
            raise StreamDiffError("the stream is not prepared: call prepare(prompt=...) first")
        if self.stream.finished and self.stream.error is not None:
            raise self.stream.error
        return self.stream



def _default_prompt() -> PromptConfig:
    return PromptConfig()
