"""tools/bench_transport.py runs end to end (a short smoke run: one round of each transport, a couple of seconds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiortc")
TOOL = Path(__file__).parents[2] / "tools" / "bench_transport.py"


def test_bench_transport_reports_both_transports(tiny_trained, tmp_path: Path) -> None:
    """ws, rtc (the server's constant-quality encoder at ``--rtc-quality``) and rtc-aiortc-encoder (a second server
    with aiortc's own encoder) in one run."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(TOOL), "--rounds", "1", "--warmup", "1.5", "--seconds", "2",
                             "--size", "64", "--transports", "ws", "rtc", "rtc-aiortc-encoder", "--rtc-quality", "28",
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ws", "rtc", "rtc-aiortc-encoder"} and len(report["load_average"]) == 3
    assert report["rtc_quality"] == "28" and set(report["output_bytes_ratio_to_ws"]) == {"rtc", "rtc-aiortc-encoder"}
    for name, row in report["results"].items():
        assert row["outputs"] > 0 and row["fps"] > 0, (name, row)
        assert 0 < row["e2e_p50_ms"] <= row["e2e_p95_ms"] < 10_000, (name, row)
        assert 50 < row["bytes_per_input_frame"] < 100_000 and 50 < row["bytes_per_output_frame"] < 100_000, row
        assert 15 < row["psnr_db"] < 99 and not math.isnan(row["psnr_db"]), (name, row)  # near the engine's own
    assert report["bytes_ratio_rtc_to_ws"]["output"] > 0 and "psnr_difference_db" in report
    assert result.stdout.startswith("transport | e2e p50 ms") and "\nrtc | " in result.stdout
