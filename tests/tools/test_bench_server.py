"""tools/bench_server.py runs end to end (a short smoke run: one round of 1 and 2 clients, a second each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).parents[2] / "tools" / "bench_server.py"


def test_bench_server_reports_every_client_count(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(TOOL), "--clients", "1", "2", "--rounds", "1", "--warmup", "0.5",
                             "--seconds", "1.5", "--size", "64", "--json", str(out)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {r["clients"]: r for r in report["results"]}
    assert set(rows) == {1, 2} and all(r["aggregate_fps"] > 0 for r in rows.values())
    for row in rows.values():
        assert row["e2e_p50_ms"] > 0 and row["server_p95_ms"] >= row["server_p50_ms"] > 0
        assert 0 <= row["dropped_percent"] <= 100
    assert "\n2 | " in result.stdout and result.stdout.startswith("clients | aggregate fps")
