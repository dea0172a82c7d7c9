"""ControlNet in the engine: control images through each Stream Batch, and ONE ControlNet call per model per U-Net
call over the rows of every stream using it.

- :class:`ControlState`: a stream's control images. Each frame's control image travels with the frame from slot to
  slot of the Stream Batch (as its latent does), so the batch equals the sequential path; without the denoising batch
  the group's images serve every step.
- :func:`group_control`: a frame group's control images, by ControlNet name. Canny runs where the frame is submitted
  (the client's thread, :meth:`~.stream.Stream.submit`), so the engine's worker — the one thread every stream
  waits for — spends nothing on it; a frame queued before a live change of ControlNets is preprocessed here.
- :func:`controlnet_extras`: for each ControlNet model, ONE call at conditioning scale 1 over all the rows (of all
  streams in this U-Net call) where it acts; each row's residuals are multiplied by that row's scale (exact: the
  residuals are linear in the scale, see :mod:`streamdiff.core.control`), scattered into full-batch zero tensors and
  summed over the ControlNets (as diffusers' ``MultiControlNetModel``). A ControlNet runs as its engine
  (:class:`~streamdiff.backends.base.ControlNetEngine`): eager torch, or compiled with the U-Net's backend. Rows
  without control get zeros, computed by no ControlNet; a call where no row has control gets no residuals at all. An SDXL ControlNet takes its rows' added
  conditions (``text_embeds``, ``time_ids`` of the call's extras) as the U-Net does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..backends.base import MID_RESIDUAL, RESIDUAL_PREFIX, ControlNetEngine
from ..config import ControlNetSpec
from ..core.control import ControlRows
from ..core.image import fit_frame, frame_to_tensor, tensor_to_frame
from ..core.step import UNetRows
from ..errors import FrameError
from ..models.controlnet import PASSTHROUGH, Preprocessor
from .inbox import InputFrame


class ControlState:
    """One stream's control images by ControlNet name: the current group ``[F, 3, H, W]`` and, with the denoising
    batch, the images of the frames in every slot ``[n·F, 3, H, W]`` (row ``k·F + f`` as the latents)."""

    def __init__(self, rows: int, frames: int, batched: bool) -> None:
        self.rows, self.frames, self.batched = rows, frames, batched
        self.group: dict[str, torch.Tensor] = {}
        self.batch: dict[str, torch.Tensor] = {}

    def enter(self, group: dict[str, torch.Tensor] | None) -> None:
        """A new group enters slot 0 (None: flush padding, the last group again); every other slot moves on.

        A ControlNet that was not used before starts with the new images in every slot."""
        self.group = self.group if group is None else group
        if not self.batched:
            return
        f = self.frames
        for name in [n for n in self.batch if n not in self.group]:
            del self.batch[name]
        for name, images in self.group.items():
            slots = self.batch.get(name)
            if slots is None:
                self.batch[name] = images.repeat(self.rows // f, 1, 1, 1)
            else:
                slots[f:] = slots[:-f].clone()
                slots[:f] = images


def group_control(
    specs: Sequence[ControlNetSpec],
    group: Sequence[InputFrame],
    images: torch.Tensor | None,
    last: Mapping[str, torch.Tensor],
    preprocessors: Mapping[str, Preprocessor | None],
    size: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """The group's control image ``[F, 3, H, W]`` (CPU, float in [0, 1]) for each of ``specs``.

    Each frame's own image comes first (made at submit); else the preprocessor runs on ``images`` ``[F, 3, H, W]``;
    else (passthrough without a new image) the stream's ``last`` one is used again.
    """
    width, height = size
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        per_frame = []
        for i, item in enumerate(group):
            image = (item.control or {}).get(spec.name)
            if image is None:
                process = preprocessors.get(spec.preprocessor)
                if process is not None and images is not None:
                    image = frame_to_tensor(process(tensor_to_frame(images[i : i + 1])[0], spec))[0]
                elif spec.name in last:
                    image = last[spec.name][min(i, last[spec.name].shape[0] - 1)].cpu().float()
                else:
                    raise FrameError(f"controlnet {spec.name!r} ({spec.preprocessor}) has no control image: submit "
                                     "frames with control_image=...")
            if tuple(image.shape[1:]) != (height, width):
                image = frame_to_tensor(fit_frame(tensor_to_frame(image[None])[0], width, height))[0]
            per_frame.append(image)
        out[spec.name] = torch.stack(per_frame)
    return out


def submit_control(
    specs: Sequence[ControlNetSpec],
    frame: np.ndarray | None,
    control_image: np.ndarray | torch.Tensor | None,
    preprocessors: Mapping[str, Preprocessor | None],
    size: tuple[int, int],
) -> dict[str, torch.Tensor] | None:
    """At submit: the control image ``[3, H, W]`` of each ControlNet spec for one frame (uint8 ``[H, W, 3]`` at the
    stream's size, or None). Passthrough specs take ``control_image`` (uint8 ``[H, W, 3]`` of any size or float
    ``[3, H, W]`` in [0, 1]); without one they reuse the stream's last (in the engine)."""
    if not specs:
        return None
    width, height = size
    given: torch.Tensor | None = None
    if control_image is not None:
        if isinstance(control_image, np.ndarray):
            if control_image.ndim != 3 or control_image.shape[2] != 3 or control_image.dtype != np.uint8:
                raise FrameError(f"control_image {control_image.dtype} {control_image.shape} is not uint8 [H, W, 3]")
            given = frame_to_tensor(fit_frame(control_image, width, height))[0]
        elif isinstance(control_image, torch.Tensor):
            if control_image.ndim != 3 or control_image.shape[0] != 3 or not torch.is_floating_point(control_image):
                raise FrameError(f"control_image {control_image.dtype} {tuple(control_image.shape)} is not float "
                                 "[3, H, W] in [0, 1]")
            given = control_image.detach().to("cpu", torch.float32)
        else:
            raise FrameError(f"control_image must be a numpy array or a torch tensor, got "
                             f"{type(control_image).__name__}")
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.preprocessor == PASSTHROUGH:
            if given is not None:
                out[spec.name] = given
            continue
        process = preprocessors.get(spec.preprocessor)
        if process is not None and frame is not None:
            out[spec.name] = frame_to_tensor(process(frame, spec))[0]
    return out


def added_conditions(rows: UNetRows, at: torch.Tensor) -> dict[str, torch.Tensor]:
    """SDXL's added conditions (``text_embeds``, ``time_ids``) of the rows ``at``, the extras a ControlNet engine
    takes as the U-Net does; nothing for a model without them."""
    return {name: rows.extras[name][at] for name in ("text_embeds", "time_ids") if name in rows.extras}


@torch.inference_mode()
def controlnet_extras(
    controlnets: Mapping[str, ControlNetEngine],
    rows: UNetRows,
    spans: Sequence[tuple[int, int]],
    controls: Sequence[Mapping[str, ControlRows]],
) -> dict[str, torch.Tensor]:
    """The U-Net's residual extras (``down_residual_i``, ``mid_residual``) for one assembled call; see the module
    docstring. ``controlnets``: the ControlNet engines by name (eager torch or compiled, same call);
    ``spans[i]`` are the rows of the part whose ControlNet inputs are ``controls[i]``."""
    total = rows.rows
    sums: list[torch.Tensor] | None = None
    device, dtype = rows.sample.device, rows.sample.dtype
    for name, controlnet in controlnets.items():
        index, images, scales = [], [], []
        for (start, _), control in zip(spans, controls):
            part = control.get(name)
            if part is None:
                continue
            acting = torch.nonzero(part.scale).flatten()
            if acting.numel() == 0:
                continue
            index.append(acting + start)
            images.append(part.image[acting])
            scales.append(part.scale[acting])
        if not index:
            continue
        at = torch.cat(index).to(device)
        residuals = controlnet(rows.sample[at], rows.timesteps[at], rows.embeddings[at],
                               torch.cat(images).to(device, dtype), **added_conditions(rows, at))
        scale = torch.cat(scales).to(device, dtype).view(-1, 1, 1, 1)
        if sums is None:
            sums = [torch.zeros((total, *r.shape[1:]), device=device, dtype=r.dtype) for r in residuals]
        for full, residual in zip(sums, residuals):
            full.index_add_(0, at, residual * scale)
    if sums is None:
        return {}
    extras = {f"{RESIDUAL_PREFIX}{i}": residual for i, residual in enumerate(sums[:-1])}
    extras[MID_RESIDUAL] = sums[-1]
    return extras
