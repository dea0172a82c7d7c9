"""tools/bench_abuse.py runs end to end (two short attack rounds against a real ``streamdiff serve``), and the
hostile images it sends are what they claim to be."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from streamdiff.bench.abuse import hostile_jpegs

TOOL = Path(__file__).parents[2] / "tools" / "bench_abuse.py"


def test_the_hostile_jpegs_are_valid_jpegs_of_about_one_megabyte() -> None:
    for name, body in hostile_jpegs().items():
        assert 900_000 <= len(body) < 1 << 20, (name, len(body))  # under the default max_message_bytes
        assert body.startswith(b"\xff\xd8\xff") and body.endswith(b"\xff\xd9"), name
        with Image.open(io.BytesIO(body)) as image:  # the header parses; a decoder takes it for a JPEG
            assert image.format == "JPEG" and image.size == (64, 64), name
    scans = hostile_jpegs()["many_scans"].count(b"\xff\xda")
    assert scans > 1000  # the last scan repeated many times


def test_bench_abuse_reports_each_attack(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    result = subprocess.run([sys.executable, str(TOOL), "--attacks", "update_flood", "odd_sizes", "--victims", "1",
                             "--warmup", "3", "--seconds", "2", "--size", "128", "--json", str(out)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["attack"]: r for r in report["results"]}
    assert set(rows) == {"update_flood", "odd_sizes"}
    for row in rows.values():
        assert row["baseline_fps"] > 0 and row["rss_after_mb"] > 0 and row["fds_after"] > 0
        assert row["attacker"]["connections"] >= 1
    assert result.stdout.startswith("attack | victim fps") and "\nodd_sizes | " in result.stdout
