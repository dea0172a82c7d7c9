"""streamdiff/bench/quality_suite.py and ``streamdiff bench --quality`` on the trained tiny model."""

from __future__ import annotations

import json

import torch

from streamdiff.bench.quality import warp_error
from streamdiff.bench.quality_suite import CLIP_FRAMES, MOTION, format_quality, moving_clip, temporal_figures
from streamdiff.cli import main


def test_the_moving_clip_moves_exactly_as_stated() -> None:
    clip, shifts = moving_clip(64, 14)
    assert clip.shape == (14, 3, 64, 64) and len(shifts) == 13
    assert set(shifts) == {MOTION, (0, 0)}
    for i, shift in enumerate(shifts):
        assert warp_error(clip[i : i + 2], shift) == 0.0
    assert not torch.equal(clip[0], clip[-1])


def test_stream_batch_is_steadier_than_per_frame_img2img(tiny_trained) -> None:
    figures = temporal_figures(tiny_trained)
    errors = figures["warp_error"]
    assert figures["frames"] == CLIP_FRAMES and errors["input"] == 0.0
    # fixed noise (StreamDiffusion's) against fresh noise for every frame (plain img2img per frame)
    assert errors["stream_batch"] < errors["per_frame_img2img"], errors
    assert errors["sequential_fixed_noise"] < errors["per_frame_img2img"], errors


def test_bench_quality_prints_a_table_and_json(tiny_trained, capsys) -> None:
    assert main(["bench", "--quality", "--json"]) == 0
    captured = capsys.readouterr()
    figures = json.loads(captured.out)
    assert set(figures) == {"style", "temporal", "seconds"}
    assert captured.err.strip().endswith(format_quality(figures).strip().splitlines()[-1].strip())
