"""tools/gpu_check.py's dry run, as CI runs it: a subprocess on the CPU, checked through its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_does_everything_up_to_the_gpu(cache_dir: Path, tmp_path: Path) -> None:
    out, engines, venv = tmp_path / "report.json", tmp_path / "engines", tmp_path / "venv"
    command = [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--json", str(out), "--engine-dir", str(engines),
               "--venv", str(venv)]
    if torch.cuda.is_available():
        command.append("--dry-run")  # without a GPU the tool must choose the dry run itself
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no CUDA GPU visible to torch: running the dry run" in done.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True and report["failures"] == []

    # The venv is planned, not made: CUDA torch from the index, then the GPU extras.
    assert not venv.exists()
    commands = report["venv"]["commands"]
    assert commands[0].endswith(f"-m venv {venv}") and commands[2].endswith("pip install --quiet torch")
    assert commands[3].endswith(f"-e {REPO}[onnx-gpu,tensorrt]")

    # FLOPs are counted on meta-device models: SD-2.1's U-Net is 181 GFLOP per row at 256 px (measured by hand on
    # the CPU with sdpa's math kernel); attention makes 512 px more than 4x that.
    sd21 = report["models"]["sd21"]["flops_by_side"]
    assert abs(sd21["256"]["unet_per_row"] / 181.09e9 - 1) < 0.01
    assert sd21["512"]["unet_per_row"] > 4 * sd21["256"]["unet_per_row"]
    assert abs(sd21["256"]["unet_params"] / 865.9e6 - 1) < 0.01

    # TensorRT plans: strongly typed float16, one profile over 1 … max rows (3 streams × 2 steps), 256 … 1024 px,
    # tuned for the full batch.
    for name in ("tiny", "sd21"):
        plans = report["models"][name]["tensorrt_plans"]
        sample = plans["unet"]["profile"]["sample"]
        assert [sample["min"][0], sample["opt"][0], sample["max"][0]] == [1, 6, 6]
        assert sample["min"][2:] == [32, 32] and sample["max"][2:] == [128, 128]
        assert plans["vae_decoder"]["profile"]["latents"]["max"][0] == 3  # one frame per stream
        assert all(p["strongly_typed"] and p["precision"] == "float16" for p in plans.values())
    assert report["models"]["sd21"]["tensorrt_plans"]["unet"]["profile"]["encoder_hidden_states"]["max"] == [6, 77, 1024]

    # The float16 graphs of the GPU path exist and hold float16 weights.
    graphs = report["models"]["tiny"]["float16_graphs"]
    assert set(graphs) == {"unet", "vae_encoder", "vae_decoder"}
    for graph in graphs.values():
        assert Path(graph["onnx"]).is_file() and Path(graph["onnx"]).is_relative_to(engines)
        assert graph["weights"]["float16"] > graph["weights"].get("float32", 0)

    # Every case ran through the StreamEngine; ONNX Runtime on those float16 graphs matches torch float32.
    results = report["results"]
    assert {(r["backend"], r["steps"], r["streams"]) for r in results} == {
        (b, steps, streams) for b in ("torch-fp32", "onnxruntime-cpu") for steps in (1, 2) for streams in (1, 3)
    }
    for row in results:
        assert row["status"] == "ok" and row["frames"] == 2 * row["streams"] and row["fps"] > 0
        assert row["latency_ms_p50"] >= row["tick_ms_p50"] * 0.5 and row["tflops"] > 0
        assert row["unet_calls_per_tick"] == 1.0  # every stream's rows in one U-Net call
        if row["backend"] == "onnxruntime-cpu":
            assert row["psnr_db"] >= 40, row
