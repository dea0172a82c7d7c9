"""The screen source: mss's shape through a stand-in grabber (no display here), the specs and the clear errors."""

from __future__ import annotations

import logging
import sys
import threading
import time

import mss
import numpy as np
import pytest

from streamdiff import BackendUnavailable, ConfigError, SourceError
from streamdiff.cli import main
from streamdiff.io import ScreenSource, open_source, pattern_frame
from streamdiff.io.screen import mss_grabber

DESKTOP = (160, 60)  # two monitors side by side: 96x60 at (0, 0) and 64x48 at (96, 0)


class FakeScreen:
    """Stands in for ``mss.MSS``: the same ``monitors`` list and ``grab(region)`` returning a real
    ``mss.ScreenShot`` (BGRA) cut from a moving desktop picture (the test pattern, frame = grab count)."""

    instances: list[FakeScreen] = []

    def __init__(self) -> None:
        self.monitors = [
            {"left": 0, "top": 0, "width": 160, "height": 60},
            {"left": 0, "top": 0, "width": 96, "height": 60},
            {"left": 96, "top": 0, "width": 64, "height": 48},
        ]
        self.grabs: list[tuple[str, dict]] = []
        self.closed = False
        FakeScreen.instances.append(self)

    def desktop(self, index: int) -> np.ndarray:
        return pattern_frame(index, *DESKTOP)

    def grab(self, region: dict) -> mss.ScreenShot:
        self.grabs.append((threading.current_thread().name, dict(region)))
        rgb = self.desktop(len(self.grabs))
        crop = rgb[region["top"] : region["top"] + region["height"], region["left"] : region["left"] + region["width"]]
        bgra = np.dstack([crop[:, :, ::-1], np.full(crop.shape[:2], 255, np.uint8)])
        return mss.ScreenShot(bytearray(bgra.tobytes()), region)

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _fresh_fakes() -> None:
    FakeScreen.instances.clear()


def test_grabs_the_chosen_monitor_as_rgb() -> None:
    source = ScreenSource(2, fps=200.0, grabber_factory=FakeScreen)
    source.open()
    assert source.size == (64, 48) and source.realtime and source.name == "screen 2"
    frames = [source.read() for _ in range(3)]
    screen = FakeScreen.instances[0]
    for index, frame in enumerate(frames, start=1):
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.flags.c_contiguous
        assert np.array_equal(frame, screen.desktop(index)[0:48, 96:160])  # RGB, the right region
    whole = ScreenSource(0, grabber_factory=FakeScreen)
    whole.open()
    assert whole.size == DESKTOP and whole.read().shape == (60, 160, 3)
    source.close()
    assert screen.closed


def test_paced_at_its_fps() -> None:
    source = ScreenSource(1, fps=50.0, grabber_factory=FakeScreen)
    source.open()
    start = time.perf_counter()
    for _ in range(11):
        source.read()
    assert 0.18 < time.perf_counter() - start < 0.4  # 10 intervals of 20 ms


def test_every_reading_thread_gets_its_own_grabber_and_close_closes_all() -> None:
    source = ScreenSource(1, fps=200.0, grabber_factory=FakeScreen)
    source.open()  # in this thread
    thread = threading.Thread(target=source.read, name="reader")
    thread.start()
    thread.join()
    assert len(FakeScreen.instances) == 2 and FakeScreen.instances[1].grabs[0][0] == "reader"
    source.close()
    assert all(screen.closed for screen in FakeScreen.instances)


def test_a_missing_monitor_lists_the_ones_there_are() -> None:
    with pytest.raises(SourceError, match=r"screen monitor 3 does not exist; monitors: 0 \(all: 160x60 at 0,0\), "
                                          r"1 \(96x60 at 0,0\), 2 \(64x48 at 96,0\)\. Pick one with --source screen:N"):
        ScreenSource(3, grabber_factory=FakeScreen).open()
    assert FakeScreen.instances[0].closed
    with pytest.raises(SourceError, match="is not open"):
        ScreenSource(1, grabber_factory=FakeScreen).read()
    with pytest.raises(ConfigError, match="screen monitor=-1 must be >= 0"):
        ScreenSource(-1)


def test_capture_errors_name_the_monitor() -> None:
    class Failing(FakeScreen):
        def grab(self, region: dict) -> mss.ScreenShot:
            raise mss.ScreenShotError("XGetImage() failed")

    source = ScreenSource(1, grabber_factory=Failing)
    source.open()
    with pytest.raises(SourceError, match=r"capturing screen 1 failed: XGetImage\(\) failed"):
        source.read()


def test_specs() -> None:
    assert open_source("screen").monitor == 1
    assert open_source("screen:0").monitor == 0 and open_source("screen:2").monitor == 2
    assert open_source("screen:2", fps=12.0).fps == 12.0
    with pytest.raises(ConfigError, match="screen monitor 'left' is not a number"):
        open_source("screen:left")
    with pytest.raises(ConfigError, match="testpattern, webcam, file, folder, screen"):
        open_source("telepathy")


def test_runs_through_the_runner(tiny_model) -> None:
    """A screen source feeding the real runner and the tiny model: frames flow, the capture thread grabs."""
    from streamdiff import StreamConfig, StreamEngine
    from streamdiff.io import NullSink
    from streamdiff.runtime import RuntimeConfig, StreamRunner

    source = ScreenSource(2, fps=100.0, grabber_factory=FakeScreen)
    sink = NullSink()
    summary = StreamRunner(StreamEngine(tiny_model), source, [sink], RuntimeConfig(max_frames=6),
                           stream_config=StreamConfig(width=64, height=64, t_index_list=(20, 40))).run()
    assert summary.error is None and summary.frames_in == 6 and sink.frames >= 1
    assert {name for screen in FakeScreen.instances for name, _ in screen.grabs} == {"streamdiff-capture"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="other desktops need no $DISPLAY")
def test_no_display_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SourceError, match=r"cannot capture the screen: .*\$DISPLAY.*needs a desktop session"):
        mss_grabber()
    with pytest.raises(SourceError, match="cannot capture the screen"):
        ScreenSource().open()


def test_without_mss_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mss", None)  # `import mss` now raises ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install 'streamdiff\[screen\]'"):
        ScreenSource().open()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="other desktops need no $DISPLAY")
def test_run_with_a_screen_source_and_no_display_exits_1(tiny_model, monkeypatch, caplog) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with caplog.at_level(logging.ERROR, logger="streamdiff"):
        assert main(["run", "--source", "screen", "--size", "64x64", "--frames", "2"]) == 1
    assert "cannot capture the screen" in caplog.text
