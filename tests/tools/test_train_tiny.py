"""tools/train_tiny.py: a few seeded training steps end to end, twice (same seed → the same weights), and the
result loads through the normal path. The full recipe's figures are checked against the shipped manifest in
tests/models/test_tiny.py."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

from streamdiff import load_model
from streamdiff.bench.quality_suite import run_stream, still_inputs
from streamdiff.models.tiny import save_trained_folder

TOOL = Path(__file__).parents[2] / "tools" / "train_tiny.py"
SHORT = ["--steps", "3", "--vae-steps", "2", "--pool", "8", "--batch", "4", "--threads", "1", "--no-eval"]


def _train(out: Path, capsys) -> dict:
    tool = runpy.run_path(str(TOOL))  # in this process: the imports are paid once
    assert tool["main"]([*SHORT, "--out", str(out)]) == 0
    assert "unet step 2" in capsys.readouterr().out
    return json.loads((out / "manifest.json").read_text())


def test_a_short_training_run_is_reproducible_and_loads(tmp_path: Path, capsys) -> None:
    first, second = _train(tmp_path / "a", capsys), _train(tmp_path / "b", capsys)
    assert first["files"] == second["files"]  # bit-identical weights from the same seed
    assert first["recipe"]["steps"] == 3 and first["seed"] == 0 and first["dtype"] == "float16"
    assert "metrics" not in first  # --no-eval
    model = load_model(str(save_trained_folder(tmp_path / "a", tmp_path / "model")), device="cpu")
    out = run_stream(model, still_inputs(64)[:1], "a watercolor portrait")
    assert out.shape == (1, 3, 64, 64)
