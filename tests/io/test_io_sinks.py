"""Sinks: folder, video file, virtual camera (via a registered pyvirtualcam backend), window (via a display seam)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import pyvirtualcam
from PIL import Image

from streamdiff import ConfigError, SinkError, StreamConfig
from streamdiff.io import (
    FolderSink,
    VideoFileSink,
    VirtualCamSink,
    WindowKey,
    WindowSink,
    no_virtualcam_help,
    open_sink,
    pattern_frame,
)
from streamdiff.io.sinks import WINDOW_CLOSED, NullSink, OpenCVDisplay
from streamdiff.runtime import Controls, RunMetrics


class RecordingCamera:
    """A pyvirtualcam backend standing in for a device (none exists here): keeps frames and send times."""

    instances: list[RecordingCamera] = []

    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw) -> None:
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.closed = False
        RecordingCamera.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        self.frames.append(frame.copy())
        self.times.append(time.perf_counter())

    def close(self) -> None:
        self.closed = True

    def device(self) -> str:
        return "recording"

    def native_fourcc(self) -> int | None:
        return None


class NoDevice(RecordingCamera):
    def __init__(self, **kw) -> None:
        raise RuntimeError("No v4l2 loopback device found at /dev/video[0-99]. Did you run 'modprobe v4l2loopback'?")


pyvirtualcam.register_backend("streamdiff-test", RecordingCamera)
pyvirtualcam.register_backend("streamdiff-nodevice", NoDevice)


def test_virtualcam_gets_rgb_frames_at_the_requested_pace() -> None:
    RecordingCamera.instances.clear()
    sink = open_sink("virtualcam", virtualcam_backend="streamdiff-test")
    assert isinstance(sink, VirtualCamSink)
    sink.open(48, 32, 40.0)
    frames = [pattern_frame(i, 48, 32) for i in range(9)]
    for frame in frames:  # written as fast as possible: the sink paces itself
        sink.write(frame)
    sink.close()
    camera = RecordingCamera.instances[-1]
    assert camera.closed and (camera.width, camera.height, camera.fps) == (48, 32, 40.0)
    assert camera.fourcc == pyvirtualcam.camera.encode_fourcc(pyvirtualcam.PixelFormat.RGB.value)
    assert len(camera.frames) == 9
    for sent, frame in zip(camera.frames, frames):
        assert sent.dtype == np.uint8 and sent.size == 48 * 32 * 3
        assert np.array_equal(sent.reshape(32, 48, 3), frame)  # RGB, row-major, unchanged
    intervals = np.diff(camera.times)
    assert 0.8 / 40 < float(np.median(intervals)) < 1.5 / 40
    with pytest.raises(SinkError, match=r"uint8 \[32, 48, 3\]"):
        sink.open(48, 32, 40.0)
        sink.write(np.zeros((48, 32, 3), np.uint8))


def test_missing_virtual_camera_says_how_to_get_one() -> None:
    sink = VirtualCamSink(backend="streamdiff-nodevice")
    with pytest.raises(SinkError, match="no virtual camera is available") as info:
        sink.open(64, 64, 30.0)
    assert no_virtualcam_help() in str(info.value)
    assert "modprobe v4l2loopback" in no_virtualcam_help("linux") and "exclusive_caps=1" in no_virtualcam_help("linux")
    assert "Start Virtual Camera" in no_virtualcam_help("win32") and "OBS" in no_virtualcam_help("darwin")
    with pytest.raises(SinkError, match="backend 'nope' is not one of"):
        VirtualCamSink(backend="nope").open(64, 64, 30.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the real v4l2loopback backend is Linux-only")
def test_real_backend_without_device_gives_the_clear_message() -> None:
    import glob

    if glob.glob("/dev/video*"):
        pytest.skip("a video device exists on this machine")
    with pytest.raises(SinkError, match="modprobe v4l2loopback"):
        VirtualCamSink(backend="v4l2loopback").open(64, 64, 30.0)  # the test backends above would succeed


class FakeDisplay:
    """The window seam: records shown frames and replays queued keys."""

    def __init__(self, keys: list[int | None]) -> None:
        self.keys = list(keys)
        self.shown: list[np.ndarray] = []
        self.opened = self.closed = False

    def open(self, title: str, width: int, height: int) -> None:
        self.opened = True

    def show(self, frame: np.ndarray) -> None:
        self.shown.append(frame)

    def poll_key(self) -> int | None:
        return self.keys.pop(0) if self.keys else None

    def close(self) -> None:
        self.closed = True


class SettingsOnly:
    """Stands for a running stream: keeps the settings the controls change (validated like the engine's)."""

    def __init__(self, config: StreamConfig) -> None:
        self.config = config

    def update(self, **changes) -> int:
        self.config = self.config.with_changes(**changes)
        return 1


def test_window_overlay_and_keys() -> None:
    config = StreamConfig(width=128, height=96, t_index_list=(25, 40))
    controls, metrics = Controls(), RunMetrics()
    stream = SettingsOnly(config)
    controls.bind(stream)
    for i in range(5):
        metrics.record_output("window", 10.0 + i / 20, 10.08 + i / 20)
    keys = [ord("+"), ord("f"), ord(" "), None, ord("x"), ord("q")]
    display = FakeDisplay(keys)
    sink = WindowSink(display=display)
    sink.bind(controls, metrics)
    sink.open(128, 96, 30.0)
    frame = np.full((96, 128, 3), 200, np.uint8)
    lines_after = []
    for _ in keys:
        sink.write(frame)
        lines_after.append(sink.overlay_lines())
    sink.close()
    assert display.opened and display.closed and len(display.shown) == len(keys)
    shown = display.shown[0]
    assert shown.shape == frame.shape and np.array_equal(frame, np.full_like(frame, 200))  # input untouched
    assert (shown[:20, :60] != 200).any() and np.array_equal(shown[60:], frame[60:])  # overlay in the corner only
    lines = lines_after[2]  # after '+', 'f' and space
    assert lines[0].startswith("20.0 fps  80 ms  drops 0"), lines
    assert "strength 0.56" in lines[1]  # 0.55 asked; t_index_list (22, 36) is 0.56 and "filter on" in lines[1] and "PAUSED" in lines[1]
    assert "PAUSED" not in lines_after[-1][1]  # quitting also releases a pause
    assert controls.stop_requested and stream.config.t_index_list == (22, 36) and stream.config.filter.enabled
    assert sink.handle_key(WINDOW_CLOSED) is WindowKey.QUIT


def test_opencv_display_without_gui_names_what_to_install() -> None:
    if "GUI:                           NONE" not in cv2.getBuildInformation():
        pytest.skip("this OpenCV has a GUI")
    with pytest.raises(SinkError, match=r"pip install .streamdiff\[window\]."):
        OpenCVDisplay().open("t", 64, 64)


def test_folder_and_video_sinks(tmp_path: Path) -> None:
    folder = FolderSink(tmp_path / "pngs")
    folder.open(40, 30, 30.0)
    for i in range(3):
        folder.write(pattern_frame(i, 40, 30))
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == ["frame_000000.png", "frame_000001.png", "frame_000002.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / names[2])), pattern_frame(2, 40, 30))
    with pytest.raises(SinkError, match="must be even"):
        VideoFileSink(tmp_path / "odd.mp4").open(41, 30, 30.0)
    with pytest.raises(ConfigError, match="must end in one of"):
        VideoFileSink(tmp_path / "x.gif")
    empty = VideoFileSink(tmp_path / "empty.mp4")
    empty.open(40, 30, 30.0)  # creates the file, so that an unwritable place fails here
    assert (tmp_path / "empty.mp4").is_file()
    empty.close()
    assert not (tmp_path / "empty.mp4").exists()  # no frame came: no empty file is left behind
    assert isinstance(open_sink("null"), NullSink)
    with pytest.raises(ConfigError, match="needs a path"):
        open_sink("file")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail: disk full)")
def test_video_sink_reports_a_failure_to_finalise_the_file(tmp_path: Path) -> None:
    full = tmp_path / "full.mp4"
    full.symlink_to("/dev/full")
    sink = VideoFileSink(full)
    sink.open(64, 48, 30.0)
    for i in range(3):  # a few small frames stay buffered: the disk-full error comes when the file is finalised
        sink.write(pattern_frame(i, 64, 48))
    with pytest.raises(SinkError, match=r"finalising video file '.*full.mp4' failed: .*No space left on device"):
        sink.close()
    sink.close()  # closed once; a second close does nothing


def test_window_idle_polls_keys_and_redraws_the_last_frame() -> None:
    controls = Controls()
    controls.bind(SettingsOnly(StreamConfig(width=128, height=96, t_index_list=(25, 40))))
    display = FakeDisplay([ord(" "), None, None, ord(" ")])
    sink = WindowSink(display=display)
    sink.bind(controls, RunMetrics())
    sink.open(128, 96, 30.0)
    sink.idle()  # before the first frame: keys only (space pauses), nothing to redraw yet
    assert controls.paused and display.shown == [] and "PAUSED" in sink.overlay_lines()[-1]
    frame = pattern_frame(0, 128, 96)
    sink.write(frame)
    sink.idle()  # no new frame: the last one again, with its overlay
    assert len(display.shown) == 2 and np.array_equal(display.shown[1], display.shown[0])
    assert np.array_equal(display.shown[1][60:], frame[60:])
    sink.idle()  # space again: resumed
    assert len(display.shown) == 3 and not controls.paused
