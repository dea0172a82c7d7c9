"""Test media: a pattern video file, and frames streamed through a fresh pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

def write_pattern_video(path: Path, frames: int, width: int, height: int, fps: int) -> None:
    """Write ``frames`` frames of the built-in test pattern as an H.264 mp4 (PyAV)."""
    from fractions import Fraction

    import av

    from ..io import pattern_frame

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pattern_frame(i, width, height), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def stream_frames(model: Any, frames: list[Any], size: int = 64, t_index_list: tuple[int, ...] = (20, 40)) -> torch.Tensor:
    """Push uint8 frames through a fresh two-step stream on ``model``; the outputs stacked ``[k, 3, H, W]``."""
    from ..config import StreamConfig
    from ..core.image import frame_to_tensor
    from ..pipeline import StreamPipeline

    pipe = StreamPipeline(model, StreamConfig(width=size, height=size, t_index_list=t_index_list))
    pipe.prepare("a watercolor portrait", seed=3)
    outs = [pipe.step(frame_to_tensor(f)).images for f in frames]
    return torch.cat([o for o in outs if o is not None])
