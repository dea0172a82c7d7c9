"""Frame conversion of the WebRTC media path (no peers): a received video frame at the stream's size."""

from __future__ import annotations

import av
import numpy as np
import pytest

from streamdiff.core.image import fit_frame
from streamdiff.io.sources import pattern_frame
from streamdiff.server.rtc.media import to_rgb


@pytest.mark.parametrize("source, size", [((1920, 1080), (512, 512)), ((256, 256), (128, 128)),
                                          ((640, 480), (512, 512)), ((320, 240), (320, 240)),
                                          ((1280, 720), (256, 320))])
def test_frames_are_cropped_and_scaled_like_fit_frame(source: tuple[int, int], size: tuple[int, int]) -> None:
    frame = av.VideoFrame.from_ndarray(pattern_frame(5, *source), format="rgb24").reformat(format="yuv420p")
    image = to_rgb(frame, *size)
    reference = fit_frame(frame.to_ndarray(format="rgb24"), *size)
    assert image.shape == (size[1], size[0], 3) and image.dtype == np.uint8
    assert np.abs(image.astype(np.int16) - reference).mean() < 3  # swscale's area scaling vs fit_frame's
