"""A real video file through the real tiny model into a real mp4: same frame count, size and fps."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from streamdiff import PromptConfig, StreamConfig, StreamEngine
from streamdiff.io import VideoFileSink, VideoFileSource
from streamdiff.runtime import RuntimeConfig, StreamRunner
from streamdiff.testing import write_pattern_video


def probe(path: Path) -> tuple[int, int, int, float, list[np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return len(frames), stream.codec_context.width, stream.codec_context.height, float(stream.average_rate), frames


def test_video_file_through_tiny_model_keeps_count_size_and_fps(tiny_model, tmp_path: Path) -> None:
    source_path, out_path = tmp_path / "in.mp4", tmp_path / "out" / "styled.mp4"
    write_pattern_video(source_path, frames=11, width=96, height=72, fps=24)
    engine = StreamEngine(tiny_model)
    runner = StreamRunner(
        engine, VideoFileSource(source_path), [VideoFileSink(out_path)], RuntimeConfig(output_size="source"),
        stream_config=StreamConfig(width=64, height=64, t_index_list=(32, 45)), prompt=PromptConfig("a watercolor"),
    )
    summary = runner.run()
    assert summary.frames_in == summary.frames_out == 11 and summary.drops == {}
    count, width, height, fps, frames = probe(out_path)
    assert (count, width, height, fps) == (11, 96, 72, 24.0)
    assert frames[0].std() > 1.0 and not np.array_equal(frames[0], frames[-1])
