"""A ControlNet compiled by OpenVINO: the :class:`~streamdiff.backends.base.ControlNetEngine` of the OpenVINO backend.

Converted, compiled, cached and imported as the U-Net is (:mod:`.openvino_backend`, :func:`.builders.openvino_step`),
always with a dynamic batch and spatial axes: the engine calls a ControlNet with the rows where it acts, which change
with each stream's scales and start/end. Its time embedding stays float32 for the same reason as the U-Net's: the
graph takes the sinusoidal projection as an input. Outputs: the residuals at conditioning scale 1, in
:func:`~streamdiff.backends.unet_inputs.controlnet_residual_inputs` order (the engine scales each row).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ConfigError
from .openvino_backend import DEFAULT_MAX_SHAPES, OvModel

SDXL_EXTRAS = ("text_embeds", "time_ids")


class _GivenProjection(torch.nn.Module):
    """Stands in for a ControlNet's ``time_proj`` while converting: returns the projection the graph was given."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        assert self.value is not None
        return self.value


@contextlib.contextmanager
def controlnet_time_projection_input(controlnet: torch.nn.Module) -> Iterator[_GivenProjection]:
    """While converting, ``controlnet.time_proj`` returns the graph's time projection input (float32)."""
    original = controlnet.time_proj
    given = _GivenProjection()
    controlnet.time_proj = given
    try:
        yield given
    finally:
        controlnet.time_proj = original


class OvControlNetGraph(torch.nn.Module):
    """ControlNet(sample ``[B, C, h, w]``, time projection ``[B, P]``, hidden states ``[B, L, D]``, control image
    ``[B, 3, H, W]``, then SDXL's ``text_embeds`` ``[B, D_pool]`` and ``time_ids`` ``[B, 6]`` when ``sdxl``) → its
    residuals at conditioning scale 1, float32 I/O. Convert inside :func:`controlnet_time_projection_input`."""

    def __init__(self, controlnet: torch.nn.Module, given: _GivenProjection, sdxl: bool = False) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.given = given
        self.sdxl = sdxl

    def forward(self, sample: torch.Tensor, time_projection: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, *extras: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = next(self.controlnet.parameters()).dtype
        self.given.value = time_projection
        added = {name: value.to(dtype) for name, value in zip(SDXL_EXTRAS, extras)} if self.sdxl else None
        down, mid = self.controlnet(
            sample.to(dtype), time_projection[:, 0], encoder_hidden_states=encoder_hidden_states.to(dtype),
            controlnet_cond=controlnet_cond.to(dtype), conditioning_scale=1.0, guess_mode=False,
            added_cond_kwargs=added, return_dict=False)
        return tuple(r.float() for r in (*down, mid))


def controlnet_examples(model: Any, controlnet: torch.nn.Module, batch: int, height: int, width: int
                        ) -> tuple[torch.Tensor, ...]:
    """Float32 example inputs of ``controlnet`` for ``model`` (a LoadedModel) at ``batch`` rows of ``height`` ×
    ``width`` pixels: sample, time projection, hidden states, control image (and SDXL's added conditions)."""
    generator = torch.Generator().manual_seed(batch + height)
    factor = model.vae_scale_factor
    timestep = torch.linspace(999.0, 19.0, batch).round()
    inputs = [
        torch.randn(batch, model.latent_channels, height // factor, width // factor, generator=generator),
        controlnet.time_proj(timestep).float(),
        torch.randn(batch, int(getattr(model.text_encoder.config, "max_position_embeddings", 77)),
                    int(model.unet.config.cross_attention_dim), generator=generator),
        torch.rand(batch, 3, height, width, generator=generator),
    ]
    if model.sdxl is not None:
        inputs.append(torch.randn(batch, model.pooled_size, generator=generator))
        inputs.append(torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1))
    return tuple(inputs)


class OvControlNet:
    """A :class:`~streamdiff.backends.base.ControlNetEngine` on a compiled OpenVINO ControlNet."""

    def __init__(self, path: Path | str, time_proj: torch.nn.Module, dtype: torch.dtype, sdxl: bool = False,
                 max_shapes: int = DEFAULT_MAX_SHAPES) -> None:
        self.model = OvModel(path, dtype, max_shapes=max_shapes)
        self.time_proj = time_proj
        self.extra_names = SDXL_EXTRAS if sdxl else ()

    def recover(self) -> None:
        """Undo a failed call's damage before the next call (see :class:`~.openvino_backend.OvModel`)."""
        self.model.recover()

    @torch.inference_mode()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor, **extras: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        if set(extras) != set(self.extra_names):
            raise ConfigError(f"the OpenVINO ControlNet takes the extra inputs {list(self.extra_names)}, got "
                              f"{sorted(extras)}")
        projection = self.time_proj(timestep.to(torch.float32)).to(torch.float32)  # [B, P], never bfloat16
        outputs = self.model.run_all(sample, projection, encoder_hidden_states, controlnet_cond,
                                     *(extras[n] for n in self.extra_names))
        return tuple(out.to(sample.device, sample.dtype) for out in outputs)
