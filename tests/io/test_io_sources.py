"""Sources: the deterministic test pattern, video files, image folders, webcams, specs and pacing."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from streamdiff import ConfigError, SourceError
from streamdiff.io import FolderSource, TestPatternSource, VideoFileSource, WebcamSource, open_source, pattern_frame


def test_pattern_is_a_pure_function_of_index_and_size_and_moves() -> None:
    a = [pattern_frame(i, 80, 48) for i in range(5)]
    b = TestPatternSource(80, 48, frames=5)
    b.open()
    again = [b.read() for _ in range(6)]
    assert again[-1] is None
    for x, y in zip(a, again):
        assert np.array_equal(x, y) and x.shape == (48, 80, 3) and x.dtype == np.uint8
    diffs = [np.abs(a[i + 1].astype(int) - a[i].astype(int)).mean() for i in range(4)]
    assert min(diffs) > 1.0  # visibly moving


def test_paced_pattern_runs_at_its_fps() -> None:
    source = TestPatternSource(16, 16, fps=50.0, realtime=True)
    source.open()
    start = time.perf_counter()
    for _ in range(11):
        source.read()
    elapsed = time.perf_counter() - start
    assert 0.18 < elapsed < 0.4  # 10 intervals of 20 ms


def test_video_file_source_reads_frames_and_fps(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(9):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pattern_frame(i, 64, 48), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    source = open_source(str(path))
    assert isinstance(source, VideoFileSource)
    source.open()
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
    assert source.fps == 25.0 and source.size == (64, 48)
    # Lossy, but close to what went in.
    assert np.abs(frames[4].astype(int) - pattern_frame(4, 64, 48).astype(int)).mean() < 12


def test_missing_and_broken_video_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        VideoFileSource(tmp_path / "nope.mp4").open()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(SourceError, match="junk.mp4"):
        VideoFileSource(junk).open()


def test_folder_source_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        Image.fromarray(np.full((8, 12, 3), i, np.uint8)).save(tmp_path / f"f{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_source(f"folder:{tmp_path}")
    assert isinstance(source, FolderSource)
    source.open()
    values = []
    while (frame := source.read()) is not None:
        values.append(int(frame[0, 0, 0]))
    assert values == [1, 2, 10]
    with pytest.raises(SourceError, match="holds no images"):
        FolderSource(tmp_path / "empty").open() if (tmp_path / "empty").mkdir() is None else None


def test_unopenable_webcam_names_the_device() -> None:
    with pytest.raises(SourceError, match=r"cannot open webcam '/dev/video77'.*--list-devices"):
        WebcamSource("/dev/video77").open()
    with pytest.raises(SourceError, match=r"cannot open webcam 7"):
        WebcamSource(7).open()


def test_specs() -> None:
    assert isinstance(open_source("testpattern:40x30"), TestPatternSource)
    assert open_source("testpattern:40x30").width == 40
    assert open_source("webcam:2").device == 2
    assert open_source("webcam").device == 0
    with pytest.raises(ConfigError, match="testpattern, webcam, file, folder"):
        open_source("telepathy")
