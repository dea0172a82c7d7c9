"""The PNG contact sheet beside a video file (streamdiff/io/contact_sheet.py), through ``streamdiff run``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from streamdiff.cli import main
from streamdiff.io.contact_sheet import ContactSheetSink, InputTap, contact_sheet
from streamdiff.io.sources import pattern_frame


def test_contact_sheet_lays_frames_out_in_a_grid() -> None:
    a, b = np.full((4, 6, 3), 200, np.uint8), np.full((4, 6, 3), 100, np.uint8)
    sheet = contact_sheet([[a, b], [b]], gap=2)
    assert sheet.shape == (2 * (4 + 2) + 2, 2 * (6 + 2) + 2, 3)
    assert (sheet[2:6, 2:8] == 200).all() and (sheet[2:6, 10:16] == 100).all() and (sheet[8:12, 2:8] == 100).all()
    assert (sheet[8:12, 10:16] == 24).all()  # an empty cell shows the background


class _Frames:
    name, realtime, fps = "frames", False, 30.0

    def __init__(self, count: int) -> None:
        self.frames = [pattern_frame(i, 16, 16) for i in range(count)]

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray | None:
        return self.frames.pop(0) if self.frames else None

    def close(self) -> None:
        pass


def test_tap_and_sink_pair_inputs_with_outputs(tmp_path: Path) -> None:
    tap = InputTap(_Frames(40), every=15, columns=8)
    sink = ContactSheetSink(tmp_path / "sheet.png", tap)
    sink.open(16, 16, 30.0)
    tap.open()
    while (frame := tap.read()) is not None:
        sink.write(255 - frame)
    sink.close()
    assert tap.name == "frames" and len(tap.kept) == len(sink.kept) == 3  # frames 0, 15, 30
    assert all(np.array_equal(255 - i, o) for i, o in zip(tap.kept, sink.kept))
    assert Image.open(tmp_path / "sheet.png").size == (3 * 20 + 4, 2 * 20 + 4)


def test_run_writes_a_contact_sheet_beside_the_video(cache_dir, tmp_path: Path) -> None:
    out = tmp_path / "out" / "demo.mp4"
    code = main(["run", "--source", "testpattern", "--sink", f"file:{out}", "--frames", "16", "--size", "64x64",
                 "--prompt", "a mosaic portrait", "--status-interval", "0", "--backend", "torch"])
    assert code == 0 and out.is_file()
    sheet = np.asarray(Image.open(out.with_suffix(".png")))
    assert sheet.shape == (2 * 68 + 4, 2 * 68 + 4, 3)  # frames 0 and 15: inputs above outputs
    assert np.array_equal(sheet[4:68, 4:68], pattern_frame(0, 64, 64))
