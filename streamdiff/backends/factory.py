"""Choose and create the engines for a pipeline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..config import BackendKind, to_enum
from ..errors import BackendUnavailable
from .base import UNetEngine, VaeEngine
from .torch_backend import TorchUNet, TorchVae

if TYPE_CHECKING:
    from ..config import StreamConfig
    from ..models import LoadedModel

logger = logging.getLogger(__name__)


def create_engines(
    kind: BackendKind | str, model: LoadedModel, config: StreamConfig
) -> tuple[UNetEngine, VaeEngine]:
    """The U-Net and VAE engines of backend ``kind`` for ``model`` at ``config``'s shapes."""
    kind = to_enum(BackendKind, kind, "backend")
    if kind in (BackendKind.TORCH, BackendKind.AUTO):
        if kind is BackendKind.AUTO:
            logger.info("backend auto: picked torch (eager) on %s", model.device)
        return TorchUNet(model.unet), TorchVae(model.vae)
    raise BackendUnavailable(f"backend {kind.value!r} is not available in this build")
