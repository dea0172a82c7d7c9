"""The extra inputs of an exported or compiled U-Net (ONNX graph, TensorRT engine, AOTInductor package).

Besides sample, timestep and hidden states a graph may take the per-row extras of
:data:`~streamdiff.backends.base.UNET_EXTRAS`: SDXL's added conditions, an IP-Adapter's tokens and scales, and
ControlNet residuals. Each is an :class:`ExtraInput`: a fixed shape after the batch, or a residual whose sides follow
the latent's at its block's stride. Which of them a graph takes is fixed when it is built (the engine cache key names
them, :func:`extras_label`): SDXL's whenever the model is SDXL, the IP-Adapter's whenever the model has one (every row
carries them, zeros at scale 0 without an image), the residuals whenever the engine has ControlNets.

Calls without ControlNet residuals (no row of the call has control) on a graph that takes them get zero residuals
(:class:`ExtraFeeds`): adding zeros changes nothing (x + 0 == x exactly), and it keeps ONE graph per engine. A second
graph without residual inputs would hold a second copy of the U-Net's weights in the session or engine (3.5 GB for
an SD-2.1 U-Net in float32) and a second build, for the cost of a few additions.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .base import MID_RESIDUAL, RESIDUAL_PREFIX, UNET_EXTRAS, extra_names

MAX_ZERO_SHAPES = 16


def known_extra(name: str) -> bool:
    """Whether ``name`` is one of :data:`UNET_EXTRAS` (``down_residual_<i>`` for any i)."""
    return name in UNET_EXTRAS or (name.startswith(RESIDUAL_PREFIX) and name[len(RESIDUAL_PREFIX):].isdigit())


@dataclass(frozen=True)
class ExtraInput:
    """One extra graph input: ``[B, *dims]``, or with ``stride`` a residual ``[B, dims[0], h/stride, w/stride]``
    over the latent's sides h, w."""

    name: str
    dims: tuple[int, ...]
    stride: int = 0

    def __post_init__(self) -> None:
        if not known_extra(self.name):
            raise ConfigError(f"U-Net extra input {self.name!r} is not one of {sorted(UNET_EXTRAS)} "
                              "(down_residual_<i> for the down blocks)")
        if self.stride and len(self.dims) != 1:
            raise ConfigError(f"residual input {self.name!r} has dims {self.dims}; a residual names its channels only")

    def shape(self, batch: int, latent_height: int, latent_width: int) -> tuple[int, ...]:
        """Its shape in a call of ``batch`` rows on latents of ``latent_height`` × ``latent_width``."""
        if self.stride:
            return (batch, self.dims[0], latent_height // self.stride, latent_width // self.stride)
        return (batch, *self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        """The ONNX dynamic axes: the batch, and a residual's sides (one name per stride, ``h`` at stride 1)."""
        if not self.stride:
            return {0: "B"}
        suffix = "" if self.stride == 1 else f"_{self.stride}"
        return {0: "B", 2: f"h{suffix}", 3: f"w{suffix}"}


def ordered(inputs: Sequence[ExtraInput]) -> tuple[ExtraInput, ...]:
    """``inputs`` in :func:`~streamdiff.backends.base.extra_names` order (the graph's input order)."""
    by_name = {i.name: i for i in inputs}
    return tuple(by_name[name] for name in extra_names(dict.fromkeys(by_name)))


def extras_label(inputs: Sequence[ExtraInput]) -> str:
    """The extras' names, comma-separated (for the engine cache key)."""
    return ",".join(i.name for i in ordered(inputs))


def controlnet_residual_inputs(unet: torch.nn.Module) -> tuple[ExtraInput, ...]:
    """The ControlNet residuals a diffusers ``UNet2DConditionModel`` adds, read from its modules: one per skip
    connection of the down path (``conv_in``, each down block's resnets, then its downsampler), and the mid block's.

    A ControlNet of the U-Net's family returns exactly these (diffusers' ``ControlNetModel`` mirrors the down path).
    """
    inputs = [ExtraInput(f"{RESIDUAL_PREFIX}0", (int(unet.conv_in.out_channels),), 1)]
    stride = 1
    for block in unet.down_blocks:
        for resnet in block.resnets:
            inputs.append(ExtraInput(f"{RESIDUAL_PREFIX}{len(inputs)}", (int(resnet.out_channels),), stride))
        for downsampler in block.downsamplers or ():
            stride *= 2
            inputs.append(ExtraInput(f"{RESIDUAL_PREFIX}{len(inputs)}", (int(downsampler.out_channels),), stride))
    mid = int(unet.mid_block.resnets[-1].out_channels)
    return (*inputs, ExtraInput(MID_RESIDUAL, (mid,), stride))


# (N, D) of each loaded IP-Adapter's tokens, by its image projection: a Plus adapter's is found by running the image
# encoder once, which the engine's key (computed at every stream open) should not repeat.
_IP_TOKEN_DIMS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


def ip_token_dims(model: Any) -> tuple[int, int]:
    """(N, D) of the IP-Adapter's image-prompt tokens: those of the projection of a zero image embedding, as the
    engine's negative rows get (:class:`~streamdiff.models.ip_adapter.ImagePromptEncoder`)."""
    from ..models.ip_adapter import ImagePromptEncoder

    projection = model.ip_adapter.image_proj
    dims = _IP_TOKEN_DIMS.get(projection)
    if dims is None:
        tokens = ImagePromptEncoder(model.ip_adapter).negative()  # [1, N, D]
        dims = _IP_TOKEN_DIMS[projection] = (int(tokens.shape[1]), int(tokens.shape[2]))
    return dims


class ExtraFeeds:
    """Checks a call's extras against a graph's inputs and completes them: missing ControlNet residuals become
    zeros (see the module docstring), kept per shape (at most ``max_shapes``, least recently used dropped).

    Raises ConfigError naming the extras when a call brings ones the graph does not take, lacks non-residual ones,
    or brings only some of the residuals.
    """

    def __init__(self, inputs: Sequence[ExtraInput], max_shapes: int = MAX_ZERO_SHAPES) -> None:
        self.inputs = ordered(inputs)
        self.names = tuple(i.name for i in self.inputs)
        self.residuals = tuple(i for i in self.inputs if i.stride)
        self.max_shapes = max_shapes
        self._zeros: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

    def complete(self, sample: torch.Tensor, extras: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``extras`` with every input of the graph (in graph order); ``sample`` ``[B, C, h, w]`` gives the shapes."""
        unknown = set(extras) - set(self.names)
        residuals = {i.name for i in self.residuals}
        given = residuals & set(extras)
        missing = set(self.names) - set(extras) - residuals
        if unknown or missing or (given and given != residuals):
            raise ConfigError(f"this U-Net engine takes the extra inputs {list(self.names)} (ControlNet residuals all "
                              f"or none), got {extra_names(dict(extras))}")
        out = dict(extras)
        if self.residuals and not given:
            out.update(self._zero_residuals(sample))
        return {name: out[name] for name in self.names}

    def _zero_residuals(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = sample.shape
        key = (b, h, w, sample.dtype, sample.device)
        zeros = self._zeros.get(key)
        if zeros is None:
            zeros = {i.name: torch.zeros(i.shape(b, h, w), dtype=sample.dtype, device=sample.device)
                     for i in self.residuals}
            self._zeros[key] = zeros
            while len(self._zeros) > self.max_shapes:
                self._zeros.popitem(last=False)
        else:
            self._zeros.move_to_end(key)
        return zeros
