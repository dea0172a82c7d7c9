"""``streamdiff engines build|list|clear`` on the tiny model with ONNX Runtime engines in a private folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamdiff.cli import main

BUILD = ["engines", "build", "--model", "tiny", "--backend", "onnxruntime", "--size", "64x64",
         "--min-resolution", "32", "--max-resolution", "128", "--t-index-list", "20", "40"]


def test_build_list_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str], cache_dir: Path) -> None:
    folder = ["--engine-dir", str(tmp_path)]
    assert main(BUILD + folder) == 0
    assert "3 built, 0 reused" in capsys.readouterr().out
    assert main(BUILD + folder) == 0
    assert "0 built, 3 reused" in capsys.readouterr().out

    assert main(["engines", "list", *folder]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", "component", "backend", "precision", "shapes", "size", "age", "status"]
    rows = [line.split() for line in table[1:-1]]
    assert sorted(r[1] for r in rows) == ["unet", "vae_decoder", "vae_encoder"]
    assert all(r[0] == "tiny" and r[2] == "onnx" and r[4] in ("b2", "b1") for r in rows)
    assert "32-128px" in table[1] and table[-1].startswith("3 engine(s)")

    unet = next(p for p in tmp_path.iterdir() if p.name.startswith("unet-"))
    (unet / "model.onnx").write_bytes(b"truncated")
    assert main(["engines", "list", "--json", "--verify", *folder]) == 0
    listed = {r["component"]: r for r in json.loads(capsys.readouterr().out)}
    assert "bytes" in listed["unet"]["status"] and listed["vae_encoder"]["status"] == "ok"

    assert main(BUILD + folder) == 0  # the damaged entry is rebuilt
    assert "1 built, 2 reused" in capsys.readouterr().out

    assert main(["engines", "clear", "--backend", "tensorrt", *folder]) == 0
    assert "removed 0 engine(s)" in capsys.readouterr().out
    assert main(["engines", "clear", *folder]) == 0
    assert "removed 3 engine(s)" in capsys.readouterr().out
    assert main(["engines", "list", *folder]) == 0
    assert "no engines" in capsys.readouterr().out


def test_bad_size_is_a_clear_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["engines", "build", "--size", "64by64", "--engine-dir", str(tmp_path)])
    assert info.value.code == 2
    assert "argument --size: size='64by64' is not WIDTHxHEIGHT or a single N for NxN" in capsys.readouterr().err
