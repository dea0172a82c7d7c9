"""tools/gpu_check.py's dry run, as CI runs it: a subprocess on the CPU, checked through its JSON report; the
offline box's wheel plan, the backends reported as not installed, and the hard deadline (tools/gpu_check_box.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def tools(monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """gpu_check.py and gpu_check_box.py as modules of this process (the tool imports its sibling by name)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    return runpy.run_path(str(TOOLS / "gpu_check_box.py")), runpy.run_path(str(TOOLS / "gpu_check.py"))


def test_dry_run_does_everything_up_to_the_gpu(cache_dir: Path, tmp_path: Path) -> None:
    out, engines, venv = tmp_path / "report.json", tmp_path / "engines", tmp_path / "venv"
    command = ["--json", str(out), "--engine-dir", str(engines), "--venv", str(venv), "--wheels", str(tmp_path / "w")]
    if torch.cuda.is_available():
        command.append("--dry-run")  # without a GPU the tool must choose the dry run itself
    done = _run(command, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no CUDA GPU visible to torch: running the dry run" in done.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True and report["failures"] == []
    assert report["deadline"]["reached"] is False and report["deadline"]["cut"] == []

    # The offline box's plan, from tools/gpu_wheels.txt (the folder is absent: the recorded sizes), under 64 MiB.
    box = report["offline_box"]
    assert [w["requirement"] for w in box["wheels"]] == ["diffusers==0.42.1"]
    assert box["wheels"][0]["source"] == "recorded" and 4e6 < box["wheels"][0]["bytes"] < 10e6
    assert box["total_bytes"] == box["wheels"][0]["bytes"] < box["limit_bytes"] == 64 * 2**20 and box["fits"]
    install = f"python3 -m pip install --no-index --no-deps --target /tmp/sd-wheels {tmp_path / 'w'}/*.whl"
    assert box["install"] == install
    assert box["run"] == "python3 tools/gpu_check.py --wheels-target /tmp/sd-wheels" and box["problems"] == []
    assert "install: python3 -m pip install --no-index --no-deps --target /tmp/sd-wheels" in done.stdout

    # The GPU backends are reported, not failed: without TensorRT or onnxruntime-gpu "not installed here".
    backends = {b["backend"]: b for b in report["backends"]}
    assert backends["torch-fp32"]["status"] == backends["onnxruntime-cpu"]["status"] == "run"
    assert backends["torch-fp32-graphs"]["status"] == "run"
    expected = "not run here" if importlib.util.find_spec("tensorrt") else "not installed here"
    assert backends["tensorrt"]["status"] == expected
    assert backends["onnxruntime-cuda"]["status"] == "not installed here"  # the CPU build of ONNX Runtime
    assert backends["torch-fp16"] == {"backend": "torch-fp16", "status": "not run here", "reason": "needs a CUDA GPU"}

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
        (b, steps, streams) for b in ("torch-fp32", "torch-fp32-graphs", "onnxruntime-cpu") for steps in (1, 2)
        for streams in (1, 3)
    }
    for row in results:
        assert row["status"] == "ok" and row["frames"] == 2 * row["streams"] and row["fps"] > 0
        assert row["latency_ms_p50"] >= row["tick_ms_p50"] * 0.5 and row["tflops"] > 0
        assert row["unet_calls_per_tick"] == 1.0  # every stream's rows in one U-Net call
        if row["backend"] == "onnxruntime-cpu":
            assert row["psnr_db"] >= 40, row
        if row["backend"] == "torch-fp32-graphs":  # the graph code paths through the CPU seam: torch's frames exactly
            assert row["psnr_db"] == float("inf"), row
            graphs = row["cuda_graphs"]  # every measured tick a whole-tick replay (captured during the warm-up)
            assert graphs["tick_replays"] >= 2 and graphs["tick_eager"] == 0 and graphs["call_eager"] == 0, graphs
        else:
            assert "cuda_graphs" not in row


def test_the_wheel_plan_measures_the_folder_and_refuses_strays_and_oversize(tools, tmp_path: Path) -> None:
    box, _ = tools
    folder = tmp_path / "gpu-wheels"
    folder.mkdir()
    (folder / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"x" * 1000)
    plan = box["offline_plan"](folder)
    assert plan["wheels"][0] | {"bytes": 1000} == plan["wheels"][0] and plan["wheels"][0]["source"] == "folder"
    assert plan["total_bytes"] == 1000 and plan["fits"] and plan["problems"] == []

    (folder / "stray-1.0-py3-none-any.whl").write_bytes(b"x")  # `*.whl` would install it on the box
    assert box["offline_plan"](folder)["problems"] == [f"{folder}/stray-1.0-py3-none-any.whl is not in gpu_wheels.txt: "
                                                       "`*.whl` would install it"]
    big = tmp_path / "big.txt"
    big.write_text("diffusers==0.42.1  # bytes: 70000000\n")
    plan = box["offline_plan"](tmp_path / "absent", wheel_list=big)
    assert not plan["fits"] and plan["problems"] == ["the wheels hold 66.8 MiB; the box takes less than 64 MiB"]
    big.write_text("diffusers>=0.42\n")
    with pytest.raises(ValueError, match="big.txt:1: 'diffusers>=0.42' is not a pinned requirement"):
        box["read_wheel_list"](big)


def test_gpu_wheels_sh_checks_the_folder_with_the_same_list() -> None:
    script = (TOOLS / "gpu_wheels.sh").read_text()
    assert '--requirement "$repo/tools/gpu_wheels.txt"' in script and "--python-version 3.12" in script
    assert '"$repo/tools/gpu_check_box.py" "$folder"' in script  # the plan and the 64 MiB check: one owner
    assert "/gpu-wheels/" in (REPO / ".gitignore").read_text().splitlines()


def test_missing_gpu_software_is_reported_not_failed(tools) -> None:
    _, check = tools
    status, cuda = check["backend_status"], torch.device("cuda")
    env = {"tensorrt": "unavailable (ModuleNotFoundError: No module named 'tensorrt')", "onnxruntime": "1.30.0",
           "onnxruntime_providers": ["CPUExecutionProvider"]}  # the offline box
    assert status("tensorrt", cuda, env) == "not installed here: tensorrt (ModuleNotFoundError: No module named " \
                                           "'tensorrt')"
    assert status("onnxruntime-cuda", cuda, env) == ("not installed here: onnxruntime-gpu (ONNX Runtime 1.30.0 has "
                                                     "CPUExecutionProvider; no CUDAExecutionProvider)")
    assert status("onnxruntime-tensorrt", cuda, env).startswith("not installed here: tensorrt")
    assert [b for b in check["BACKENDS"] if status(b, cuda, env) is None] == [
        "torch-fp32", "torch-fp16", "torch-fp16-eager", "torch-compile", "torch-fp16-calls"]
    gpu_env = dict(env, tensorrt="10.13.0", onnxruntime_providers=["TensorrtExecutionProvider",
                                                                   "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [b for b in check["BACKENDS"] if status(b, cuda, gpu_env)] == []
    assert status("tensorrt", torch.device("cpu"), gpu_env) == "not run here: needs a CUDA GPU"


def test_the_deadline_abandons_hung_work_and_keeps_what_finished(tools) -> None:
    box, check = tools
    report = {"results": [], "builds": [], "failures": []}
    progress, release = box["Progress"](report), threading.Event()

    def work() -> None:
        progress.add("builds", {"model": "tiny", "backend": "hang", "status": "ok"})
        progress.add("results", {"model": "tiny", "backend": "hang", "steps": 1, "streams": 1, "status": "ok"})
        progress.start(model="tiny", backend="hang", steps=1, streams=2, phase="case")
        release.wait()  # hangs until the test lets it go

    started = time.monotonic()
    try:
        assert box["run_until"](work, started + 0.3) is False
        assert 0.3 <= time.monotonic() - started < 5 and box["worker_alive"]()
        final, current = progress.snapshot()
        args = check["parse_args"](["--dry-run", "--backends", "hang,torch-fp32", "--steps", "1", "--streams", "1,2"])
        args.backends = ["hang", "torch-fp32"]
        cut = check["cut_rows"](final, current, ["tiny"], args)
        assert [(r["backend"], r["streams"], r["error"]) for r in cut] == [
            ("hang", 2, "was running"), ("torch-fp32", 1, "not started"), ("torch-fp32", 2, "not started")]
        assert all(r["status"] == "cut: deadline" for r in cut)
    finally:
        release.set()
    assert box["run_until"](lambda: None, time.monotonic() + 5) is True


def test_a_build_cut_at_the_deadline_lists_its_cases(tools, capsys) -> None:
    _, check = tools
    args = check["parse_args"](["--dry-run", "--steps", "1", "--streams", "1,2", "--deadline", "300"])
    args.backends = ["torch-fp32", "torch-compile"]
    final = {"builds": [{"model": "tiny", "backend": "torch-fp32", "status": "ok"}], "failures": [],
             "results": [{"model": "tiny", "backend": "torch-fp32", "steps": 1, "streams": s, "status": "ok"}
                         for s in (1, 2)], "deadline": {"cut": []}}
    check["record_cut"](final, {"model": "tiny", "backend": "torch-compile", "phase": "build"}, ["tiny"], args)
    assert final["deadline"]["cut"] == ["tiny/torch-compile: was in build",
                                        "tiny/torch-compile/1 steps/1 streams: not started",
                                        "tiny/torch-compile/1 steps/2 streams: not started"]
    assert final["builds"][-1] == {"model": "tiny", "backend": "torch-compile", "status": "cut: deadline"}
    assert "DEADLINE: 300 s reached" in capsys.readouterr().out


# The offline box, simulated: diffusers is importable only from the --wheels-target folder (a sitecustomize hides
# any other copy), and streamdiff is not installed (the sitecustomize also drops an editable install's finder and
# path entry, as CI's venv has one): the tool must put both on the path itself.
HIDE_DIFFUSERS = '''
import importlib.machinery, os, sys

sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.environ["GPU_BOX_REPO"]]


class HideDiffusers:
    def find_spec(self, name, path=None, target=None):
        if name != "diffusers":
            return None
        allowed = [p for p in sys.path if p.startswith(os.environ["GPU_BOX_WHEELS"])]
        spec = importlib.machinery.PathFinder.find_spec(name, allowed)
        if spec is None:
            raise ModuleNotFoundError("No module named 'diffusers' (the offline box)", name=name)
        return spec


sys.meta_path.insert(0, HideDiffusers())
'''


def _box_run(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_DIFFUSERS)
    env = dict(os.environ, PYTHONPATH=str(site), GPU_BOX_WHEELS=str(tmp_path / "sd-wheels"), GPU_BOX_REPO=str(REPO))
    return subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_on_the_box_without_the_wheels_it_stops_at_once_with_the_commands(tmp_path: Path) -> None:
    done = _box_run(tmp_path, ["--json", str(tmp_path / "report.json")])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check: diffusers not installed in this interpreter" in done.stdout
    assert "bash tools/gpu_wheels.sh on a networked machine, bring gpu-wheels/ along, then python3 -m pip install " \
           "--no-index --no-deps --target /tmp/sd-wheels gpu-wheels/*.whl && python3 tools/gpu_check.py " \
           "--wheels-target /tmp/sd-wheels" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["failures"] == ["not installed in this interpreter: diffusers"]
    assert report["sys_path_added"] == [str(REPO)] and report["results"] == []


@pytest.mark.slow
def test_on_the_box_it_runs_from_the_wheels_and_the_repo_and_a_hang_is_cut_at_the_deadline(
        cache_dir: Path, tmp_path: Path) -> None:
    """The whole tool as the box runs it: diffusers from --wheels-target, streamdiff from this checkout (put on the
    path by the tool), torch float32 runs, the ``hang`` stand-in never returns; at --deadline the process writes its
    table and JSON and leaves, exit 0 (what ran passed; cut items are not failures)."""
    import diffusers

    if torch.cuda.is_available():
        pytest.skip("the CPU dry run's timings")
    target = tmp_path / "sd-wheels"  # as pip install --no-index --no-deps --target would leave it
    target.mkdir()
    (target / "diffusers").symlink_to(Path(diffusers.__file__).parent)
    out, deadline = tmp_path / "report.json", 45
    started = time.monotonic()
    done = _box_run(tmp_path, ["--json", str(out), "--wheels-target", str(target), "--engine-dir", str(tmp_path / "e"),
                               "--models", "tiny", "--backends", "torch-fp32,hang", "--steps", "1", "--streams", "1,2",
                               "--deadline", str(deadline)])
    assert time.monotonic() - started < deadline + 30
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"DEADLINE: {deadline} s reached" in done.stdout and "cut: deadline: was running" in done.stdout
    report = json.loads(out.read_text())
    assert report["sys_path_added"] == [str(target), str(REPO)]
    assert report["streamdiff_from"] == str(REPO / "streamdiff")
    assert report["ok"] is True and report["failures"] == [] and report["deadline"]["reached"] is True
    assert deadline <= report["seconds"] < deadline + 5
    assert report["deadline"]["cut"] == ["tiny/hang/1 steps/1 streams: was running",
                                         "tiny/hang/1 steps/2 streams: not started"]
    rows = {(r["backend"], r["streams"]): r["status"] for r in report["results"]}
    assert rows == {("torch-fp32", 1): "ok", ("torch-fp32", 2): "ok", ("hang", 1): "cut: deadline",
                    ("hang", 2): "cut: deadline"}
    assert "float16_graphs" not in report["models"]["tiny"]  # no ONNX backend asked for: no export
