"""tools/bench_ray.py runs end to end (a short smoke run: one round of every configuration, a second each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

TOOL = Path(__file__).parents[2] / "tools" / "bench_ray.py"
pytestmark = pytest.mark.slow


def test_bench_ray_reports_every_configuration(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(TOOL), "--rounds", "1", "--warmup", "1", "--seconds", "1.5",
                             "--size", "64", "--backend", "torch", "--json", str(out)],
                            capture_output=True, text=True, timeout=400, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["configuration"]: r for r in report["results"]}
    assert set(rows) == {"serve-1", "ray1-1", "ray1-4", "ray2-4"}
    for name, row in rows.items():
        assert row["clients"] == int(name[-1]) and row["aggregate_fps"] > 0, row
        assert row["per_client_fps_min"] > 0, row  # every client of a shared replica gets frames
        assert row["e2e_p95_ms"] >= row["e2e_p50_ms"] > 0 and row["server_p50_ms"] > 0
    assert "\nray2-4 | " in result.stdout
