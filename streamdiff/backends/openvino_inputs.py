"""The OpenVINO backend's example inputs (what graphs are traced with) and the warm-up of fresh engines."""

from __future__ import annotations

from typing import Any

import torch

from .keys import Component, ShapeRange
from .openvino_backend import OvUNet, OvVae, unet_time_projection
from .unet_inputs import ip_token_dims


def example_inputs(component: Component, spec: Any, shapes: ShapeRange, unet: torch.nn.Module | None
                   ) -> tuple[torch.Tensor, ...]:
    """Float32 example inputs at the tuned shape; the U-Net's timestep replaced by its time projection."""
    inputs = tuple(t.float() for t in spec.make_inputs(shapes.opt_batch, shapes.opt_height, shapes.opt_width))
    if component is Component.UNET:
        assert unet is not None
        return graph_inputs(unet, inputs)
    return inputs


def graph_inputs(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The U-Net's inputs (sample, timestep ``[B]``, hidden states, extras) as its OpenVINO graph takes them: the
    timestep replaced by its float32 time projection ``[B, P]``."""
    sample, timestep, hidden, *extras = inputs
    return (sample, unet_time_projection(unet, timestep), hidden, *extras)


@torch.inference_mode()
def warm_up(unet: OvUNet, vae: OvVae, model: Any, shapes: Any) -> None:
    """One call of each engine per frame size, at the tuned U-Net batch.

    OpenVINO prepares its kernels for an input shape on the first call with that shape (seconds for an SD-2.1-size
    U-Net); doing it here keeps that out of the first frames. ``model``: the LoadedModel; ``shapes``: EngineShapes.
    """
    batch = min(max(shapes.opt_batch, shapes.unet_batch[0]), shapes.unet_batch[1])
    text = (int(getattr(model.text_encoder.config, "max_position_embeddings", 77)),
            int(model.unet.config.cross_attention_dim))
    for width, height in shapes.sizes:
        latents = vae.encode(torch.zeros(shapes.vae_batch[0], 3, height, width, dtype=model.dtype))
        extras = {"text_embeds": torch.zeros(batch, model.pooled_size, dtype=model.dtype),
                  "time_ids": torch.tensor([[height, width, 0, 0, height, width]], dtype=model.dtype).expand(batch, -1)}
        if model.ip_adapter is not None:  # rows without an image prompt: zero tokens at scale 0
            extras.update(ip_tokens=torch.zeros(batch, *ip_token_dims(model)), ip_scale=torch.zeros(batch))
        unet(latents[:1].expand(batch, *latents.shape[1:]).contiguous(), torch.full((batch,), 500),
             torch.zeros(batch, *text, dtype=model.dtype), **{name: extras[name] for name in unet.required})
        vae.decode(latents)
