"""Ahead-of-time compiled torch modules (AOTInductor): compiled once, kept in the engine cache, loaded at start.

``torch.compile`` of the SD-2.1 U-Net takes ~90 s on a 2-core CPU; paying that at every start would defeat the
purpose. Instead the module is exported with ``torch.export`` at the configured static shapes, compiled by
AOTInductor with weight freezing (which lets inductor pre-pack weights for oneDNN/AMX; without it bf16 gains little)
into a ``.pt2`` package, and stored as an engine cache entry. Loading a package takes about a second.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, EngineBuildError
from .unet_inputs import ExtraFeeds, ExtraInput

logger = logging.getLogger(__name__)

PACKAGE_NAME = "model.pt2"


def aoti_compile(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], folder: Path) -> str:
    """Export ``module`` at the shapes of ``example_inputs`` and compile it into ``folder/model.pt2``.

    Returns the package's file name (for :meth:`~streamdiff.backends.cache.EngineCache.get_or_build`).
    """
    try:
        with torch.no_grad():
            exported = torch.export.export(module.eval(), example_inputs)
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(folder / PACKAGE_NAME), inductor_configs={"freezing": True}
            )
    except Exception as error:  # noqa: BLE001 - reported as a build failure with its cause
        raise EngineBuildError(f"AOTInductor compilation failed: {type(error).__name__}: {error}") from error
    return PACKAGE_NAME


class AotiModule:
    """A loaded AOTInductor package; call it with the inputs it was compiled for."""

    def __init__(self, path: Path | str) -> None:
        try:
            self.runner: Any = torch._inductor.aoti_load_package(str(path))
        except Exception as error:  # noqa: BLE001
            raise EngineBuildError(f"cannot load the compiled package {path}: {type(error).__name__}: {error}") from error

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.runner(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out


class CompiledUNet:
    """A :class:`~streamdiff.backends.base.UNetEngine` from one compiled package per U-Net batch size.

    Compiled for static shapes: a sample shape it was not compiled for raises ConfigError naming the shapes it has.
    ``extras``: the packages' extra inputs after the hidden states (``builders.unet_extra_inputs``: SDXL's added
    conditions, IP-Adapter tokens and scales, ControlNet residuals), the same for every package; a call without
    ControlNet residuals runs with zero residuals (:class:`~streamdiff.backends.unet_inputs.ExtraFeeds`).
    """

    def __init__(self, packages: dict[tuple[int, ...], Path], extras: Sequence[ExtraInput] = ()) -> None:
        self.modules = {shape: AotiModule(path) for shape, path in packages.items()}
        self.extras = ExtraFeeds(extras)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes it was compiled for (a multi-stream engine pads each call up to one of them)."""
        return tuple(sorted({shape[0] for shape in self.modules}))

    @torch.inference_mode()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        module = self.modules.get(tuple(sample.shape))
        if module is None:
            raise ConfigError(
                f"the compiled U-Net has no engine for sample shape {tuple(sample.shape)}; compiled shapes: "
                f"{sorted(self.modules)}. Rebuild the pipeline for the new configuration."
            )
        inputs = self.extras.complete(sample, extras)
        return module(sample, timestep.to(torch.float32), encoder_hidden_states, *inputs.values())
