"""``streamdiff run`` end to end on the tiny model: files, TOML config, clear errors, signals and exit codes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from streamdiff import ConfigError
from streamdiff.cli import main
from streamdiff.commands import run as run_command
from streamdiff.testing.serve import default_sigint


def frame_count(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, stream.codec_context.width, stream.codec_context.height, float(stream.average_rate)


def test_readme_style_run_writes_a_video_and_stats(tiny_model, tmp_path: Path, capsys) -> None:
    out, stats = tmp_path / "out" / "demo.mp4", tmp_path / "stats.json"
    code = main([
        "run", "--source", "testpattern", "--sink", f"file:{out}", "--sink", "null", "--frames", "7",
        "--size", "64x64", "--fps", "12", "--stats-json", str(stats), "--status-interval", "0",
    ])
    assert code == 0
    assert frame_count(out) == (7, 64, 64, 12.0)
    data = json.loads(stats.read_text())
    assert data["frames_in"] == data["frames_out"] == 7 and data["drops"] == {} and data["error"] is None
    # a video file brings its PNG contact sheet (streamdiff/io/contact_sheet.py), a sink of its own
    sheet = f"contact-sheet:{out.with_suffix('.png')}"
    assert data["latency_p50_ms"] > 0 and data["sinks"] == {f"file:{out}": 7, "null": 7, sheet: 7}
    printed = capsys.readouterr().out
    assert "frames   in 7, out 7" in printed and "latency  p50" in printed


def test_toml_config_with_flag_overrides(tiny_model, tmp_path: Path) -> None:
    config = tmp_path / "stream.toml"
    config.write_text(
        'source = "testpattern:96x64"\nsink = ["folder:%s"]\nframes = 9\nsize = "64x64"\nstrength = 0.5\n'
        'guidance-scale = 1.4\nfilter = true\nstatus_interval = 0\n' % (tmp_path / "pngs")
    )
    assert main(["run", "--config", str(config), "--frames", "4", "--output-size", "source"]) == 0
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert len(pngs) <= 4 and len(pngs) >= 1  # the filter may skip near-identical frames; the flag won over 9
    from PIL import Image

    assert Image.open(pngs[0]).size == (96, 64)  # scaled back to the source size
    args = run_command.resolve_options(_parse(["run", "--config", str(config), "--seed", "9"]))
    assert args["seed"] == 9 and args["guidance_scale"] == 1.4 and args["frames"] == 9
    stream = run_command.stream_config(args)
    assert stream.t_index_list == (25, 37) and stream.filter.enabled


def _parse(argv: list[str]):
    from streamdiff.cli import build_parser

    return build_parser().parse_args(argv)


def test_config_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("promt = 'typo'\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['promt'\]"):
        run_command.resolve_options(_parse(["run", "--config", str(bad)]))
    with pytest.raises(ConfigError, match="either t_index_list or strength"):
        options = run_command.resolve_options(_parse(["run", "--strength", "0.5", "--t-index-list", "3,4"]))
        run_command.stream_config(options)


@pytest.mark.parametrize(
    "sink,source,message",
    [
        ("null", "webcam:/dev/video77", "cannot open webcam '/dev/video77'"),
        ("virtualcam", "testpattern", "no virtual camera is available"),
    ],
)
def test_unopenable_webcam_and_missing_virtualcam_exit_1_with_a_message(
    tiny_model, caplog, sink: str, source: str, message: str
) -> None:
    if sink == "virtualcam" and sys.platform.startswith("linux") and Path("/dev/video0").exists():
        pytest.skip("a video device exists here")
    with caplog.at_level(logging.ERROR, logger="streamdiff"):
        code = main(["run", "--source", source, "--sink", sink, "--size", "64x64", "--frames", "3",
                     "--virtualcam-backend", "v4l2loopback"] if sink == "virtualcam" else
                    ["run", "--source", source, "--sink", sink, "--size", "64x64"])
    assert code == 1
    assert any(message in record.getMessage() for record in caplog.records), caplog.text


@pytest.fixture()
def spawn(tmp_path: Path):
    """Start endless ``streamdiff run`` processes (test pattern → ``live.mp4``); any still running are killed at the
    end of the test, whatever its outcome."""
    processes: list[subprocess.Popen] = []

    def start(*extra: str, stdin: int | None = None) -> subprocess.Popen:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            [sys.executable, "-m", "streamdiff.cli", "run", "--source", "testpattern", "--size", "64x64",
             "--sink", f"file:{tmp_path / 'live.mp4'}", "--status-interval", "0.2", *extra],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
            preexec_fn=default_sigint,  # the test's SIGINT reaches it however the suite started
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its whole group: compile workers hold the pipes too
            process.communicate(timeout=30)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_an_endless_run_cleanly(tiny_model, spawn, tmp_path: Path, sig: int, code: int) -> None:
    process = spawn("--realtime")
    # Wait for a status line with frames out: the stream is running and the file has frames.
    deadline = time.monotonic() + 60
    assert process.stderr is not None
    seen = ""
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        seen += line
        if re.search(r" \| out [1-9]", line) or not line:
            break
    assert re.search(r" \| out [1-9]", seen), seen
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == code, seen + stderr
    assert "Traceback" not in stderr and "frames   in" in stdout
    count, width, height, _ = frame_count(tmp_path / "live.mp4")  # the file was finalised
    assert count >= 1 and (width, height) == (64, 64)


def test_no_traceback_for_an_unopenable_webcam_in_a_real_process(tiny_model, tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "streamdiff.cli", "run", "--source", "webcam:5", "--size", "64x64"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 1
    assert "cannot open webcam 5" in result.stderr and "Traceback" not in result.stderr


def test_list_devices_matches_the_video_devices(capsys) -> None:
    import glob

    assert main(["run", "--list-devices"]) == 0
    captured = capsys.readouterr()
    if sys.platform.startswith("linux"):
        devices = glob.glob("/dev/video*")
        listed = [line.split("\t")[0] for line in captured.out.splitlines() if line]
        assert sorted(listed) == sorted(devices)
        if not devices:
            assert "no webcams found" in captured.err


def test_virtualcam_sink_through_the_whole_run(tiny_model) -> None:
    """`--sink virtualcam` with a registered stand-in backend: every frame arrives as RGB, paced to --fps."""
    import numpy as np
    import pyvirtualcam

    received: list[tuple[float, np.ndarray]] = []

    class StandIn:
        def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw) -> None:
            self.shape = (height, width, 3)
            assert fourcc == pyvirtualcam.camera.encode_fourcc(pyvirtualcam.PixelFormat.RGB.value)

        def send(self, frame: np.ndarray) -> None:
            received.append((time.perf_counter(), frame.reshape(self.shape).copy()))

        def close(self) -> None:
            pass

        def device(self) -> str:
            return "stand-in"

        def native_fourcc(self) -> None:
            return None

    pyvirtualcam.register_backend("streamdiff-run-test", StandIn)
    code = main(["run", "--source", "testpattern:96x64", "--sink", "virtualcam", "--virtualcam-backend",
                 "streamdiff-run-test", "--size", "64x64", "--output-size", "128x96", "--frames", "8", "--fps", "25",
                 "--status-interval", "0"])
    assert code == 0
    assert len(received) == 8 and all(frame.shape == (96, 128, 3) for _, frame in received)
    assert float(np.median(np.diff([t for t, _ in received]))) >= 0.8 / 25


def test_lora_flags_parse_path_and_scale() -> None:
    from streamdiff.options import lora_specs

    specs = lora_specs(["org/lcm-lora:0.5", "style.safetensors", "C:\\loras\\x.safetensors", "dir/lora:-1"])
    assert [(s.source, s.scale) for s in specs] == [
        ("org/lcm-lora", 0.5), ("style.safetensors", 1.0), ("C:\\loras\\x.safetensors", 1.0), ("dir/lora", -1.0)
    ]
    from streamdiff import ConfigError

    with pytest.raises(ConfigError, match="nan"):
        lora_specs(["x:nan"])


def test_live_changes_on_stdin_change_size_and_frame_buffer_without_ending_the_run(
    tiny_model, spawn, tmp_path: Path
) -> None:
    """Shape changes typed into a running ``streamdiff run`` (F, size, cfg mode, steps) keep it alive; an invalid
    change is reported and ignored; ``quit`` ends it cleanly with the file finalised."""
    # Eager torch: this is about the runtime; a compiled backend would rebuild its engines for each new shape.
    process = spawn("--realtime", "--control-stdin", "--backend", "torch", stdin=subprocess.PIPE)
    assert process.stdin is not None and process.stderr is not None
    log = ""

    def wait_for(pattern: str) -> str:
        nonlocal log
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            log += line
            if re.search(pattern, line) or not line:
                return line
        return ""

    def out_count() -> int:
        match = re.search(r" \| out (\d+)", wait_for(r" \| out \d+"))
        return int(match.group(1)) if match else -1

    def frames_keep_coming(more: int = 3) -> bool:
        before = out_count()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if out_count() >= before + more:
                return True
        return False

    assert frames_keep_coming()
    for command in ("frame_buffer_size=2", "size=96x96", "guidance_scale=99", "cfg_type=full", "t_index_list=10,25,40"):
        process.stdin.write(command + "\n")
        process.stdin.flush()
        assert frames_keep_coming(), (command, log)
    process.stdin.write("quit\n")
    process.stdin.flush()
    stdout, stderr = process.communicate(timeout=60)
    log += stderr
    assert process.returncode == 0, log
    assert "settings v1: frame_buffer_size=2" in log and "settings v2: width=96, height=96" in log
    assert "ignored 'guidance_scale=99': guidance_scale=99.0 is outside [0, 50]" in log
    assert "Traceback" not in log and "frames   in" in stdout
    count, width, height, _ = frame_count(tmp_path / "live.mp4")
    assert count >= 10 and (width, height) == (64, 64)


# -- a failed output is a failed run -------------------------------------------------------------------------------


def _run_to_stats(tmp_path: Path, sink: str, frames: int = 4) -> tuple[int, dict]:
    stats = tmp_path / "stats.json"
    code = main(["run", "--model", "tiny", "--size", "64x64", "--frames", str(frames), "--sink", sink,
                 "--status-interval", "0", "--stats-json", str(stats)])
    return code, json.loads(stats.read_text())


@pytest.mark.parametrize("kind", ["file", "folder", "proc"])
def test_a_sink_that_cannot_open_exits_1_naming_the_sink_and_the_cause(
    tiny_model, tmp_path: Path, caplog, kind: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    if kind == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    sink, cause = {
        "file": (f"file:{blocker / 'out.mp4'}", f"{str(blocker)!r} is not a folder"),
        "folder": (f"folder:{blocker / 'frames'}", "Not a directory"),
        "proc": ("file:/proc/streamdiff-out.mp4", "No such file or directory"),
    }[kind]
    with caplog.at_level(logging.ERROR, logger="streamdiff"):
        code, stats = _run_to_stats(tmp_path, sink)
    assert code == 1
    assert stats["error"].startswith(f"opening sink {sink}: cannot create") and cause in stats["error"], stats
    assert stats["frames_out"] == 0
    assert any(record.getMessage() == stats["error"] for record in caplog.records), caplog.text


def test_a_write_error_mid_run_exits_1(tiny_model, tmp_path: Path, caplog) -> None:
    out = tmp_path / "frames"
    (out / "frame_000002.png").mkdir(parents=True)  # the third frame cannot be written: a folder is in the way
    with caplog.at_level(logging.ERROR, logger="streamdiff"):
        code, stats = _run_to_stats(tmp_path, f"folder:{out}", frames=6)
    assert code == 1
    assert stats["error"] == (
        f"sink-folder:{out} stage: cannot write '{out / 'frame_000002.png'}': Is a directory"
    ), stats
    assert stats["sinks"] == {f"folder:{out}": 2}
    assert any(stats["error"] in record.getMessage() for record in caplog.records)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail: disk full)")
@pytest.mark.parametrize("frames, where", [(3, "closing sink {sink}: finalising video file"),
                                           (150, "sink-{sink} stage: writing video file")])
def test_a_video_file_that_fails_at_write_or_close_exits_1(tiny_model, tmp_path: Path, frames: int, where: str) -> None:
    """An mp4 on a full disk: 3 small frames stay in the muxer's buffer until the file is finalised at close; 150
    overflow it mid-run. A separate process, as PyAV used to crash when muxing after a failed write."""
    full = tmp_path / "full.mp4"
    full.symlink_to("/dev/full")
    stats = tmp_path / "stats.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "streamdiff.cli", "run", "--model", "tiny", "--size", "64x64", "--frames", str(frames),
         "--sink", f"file:{full}", "--status-interval", "0", "--stats-json", str(stats)],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert result.returncode == 1, result.stderr
    error = json.loads(stats.read_text())["error"]
    assert error.startswith(where.format(sink=f"file:{full}")) and "No space left on device" in error, error
    assert error in result.stderr and "Traceback" not in result.stderr
def _png_frames(folder: Path) -> list:
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(path)) for path in sorted(folder.iterdir())]


def test_engine_url_gives_the_same_frames_and_stats_as_the_in_process_engine(tiny_model, tmp_path: Path) -> None:
    """`run --engine ws://…` through a local server: lossless frames both ways (WebP at quality 100), the same
    PNGs and the same run statistics as the engine in this process."""
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig

    # The local engine as the server's: torch float32 (run's default backend would pick OpenVINO bfloat16 here).
    common = ["run", "--model", "tiny-random", "--source", "testpattern", "--frames", "12", "--size", "64x64",
              "--prompt", "ink drawing", "--seed", "7", "--status-interval", "0", "--backend", "torch",
              "--dtype", "float32"]
    assert main(common + ["--sink", f"folder:{tmp_path / 'local'}", "--stats-json", str(tmp_path / "local.json")]) == 0
    engine = StreamEngine(tiny_model, EngineConfig(max_streams=2))
    with BackgroundServer(engine, ServerConfig(port=0)) as server:
        url = f"ws://127.0.0.1:{server.port}"
        assert main(common + ["--sink", f"folder:{tmp_path / 'remote'}", "--stats-json", str(tmp_path / "remote.json"),
                              "--engine", url, "--remote-format", "webp", "--remote-quality", "100"]) == 0
    local, remote = _png_frames(tmp_path / "local"), _png_frames(tmp_path / "remote")
    assert len(local) == len(remote) == 12
    assert max(int(abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(local, remote)) <= 1
    stats = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("local", "remote")]
    for key in ("frames_in", "frames_out", "drops", "error"):
        assert stats[0][key] == stats[1][key], key
    assert list(stats[0]["sinks"].values()) == list(stats[1]["sinks"].values()) == [12]
    assert stats[1]["frames_out"] == 12 and stats[1]["drops"] == {} and stats[1]["latency_p50_ms"] > 0


def test_engine_url_reports_a_refusal_and_the_token_comes_from_the_environment(tiny_model, tmp_path: Path, caplog,
                                                                             monkeypatch) -> None:
    from streamdiff.engine import EngineConfig, StreamEngine
    from streamdiff.server.app import BackgroundServer
    from streamdiff.server.hub import ServerConfig

    engine = StreamEngine(tiny_model, EngineConfig(max_streams=1))
    argv = ["run", "--source", "testpattern", "--frames", "3", "--size", "64x64", "--status-interval", "0"]
    with BackgroundServer(engine, ServerConfig(port=0, token="t0ken-from-env")) as server:
        url = f"ws://127.0.0.1:{server.port}"
        assert main(argv + ["--engine", url]) == 1
        assert "unauthorized: the token is wrong" in caplog.text or "needs a token" in caplog.text
        monkeypatch.setenv("STREAMDIFF_TOKEN", "t0ken-from-env")
        assert main(argv + ["--engine", url, "--sink", f"folder:{tmp_path / 'out'}"]) == 0
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_ip_adapter_flags_give_the_stream_an_image_prompt(tiny_model, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    reference = tmp_path / "reference.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(reference)
    outs = {}
    for name, flags in {"with": ["--ip-adapter-image", str(reference), "--ip-adapter-scale", "1.5"],
                        "without": []}.items():
        folder = tmp_path / name
        code = main(["run", "--model", "tiny-random", "--ip-adapter", "tiny", "--source", "testpattern",
                     "--sink", f"folder:{folder}", "--frames", "3", "--size", "64x64", "--status-interval", "0",
                     *flags])
        assert code == 0
        outs[name] = [np.asarray(Image.open(f), dtype=np.int16) for f in sorted(folder.iterdir())]
    assert len(outs["with"]) == len(outs["without"]) == 3
    assert max(int(np.abs(a - b).max()) for a, b in zip(outs["with"], outs["without"])) > 2
    options = run_command.resolve_options(_parse(["run", "--ip-adapter-image", str(reference)]))
    with pytest.raises(ConfigError, match="needs a model with an IP-Adapter"):
        run_command.build_runner(options)
    options = run_command.resolve_options(_parse(["run", "--ip-adapter", "tiny", "--ip-adapter-image",
                                                  str(tmp_path / "missing.png")]))
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        run_command.build_runner(options)

def test_controlnet_flags_run_the_tiny_controlnet_on_canny_edges(tiny_model, tmp_path: Path) -> None:
    from streamdiff.options import controlnet_sources, run_controlnets

    stats = tmp_path / "stats.json"
    code = main(["run", "--source", "testpattern", "--sink", "null", "--frames", "4", "--size", "64x64",
                 "--controlnet", "edges=tiny", "--control-scale", "0.8", "--stats-json", str(stats),
                 "--status-interval", "0"])
    assert code == 0
    data = json.loads(stats.read_text())
    assert data["frames_out"] == 4 and data["error"] is None
    specs = run_controlnets({"controlnet": ["a=tiny", "b=some/folder"], "control_scale": [0.5, 2]})
    assert [(s.name, s.scale, s.preprocessor) for s in specs] == [("a", 0.5, "canny"), ("b", 2.0, "canny")]
    assert controlnet_sources("canny=org/cn") == (("canny", "org/cn"),)
    with pytest.raises(ConfigError, match="3 --control-scale values for 2 ControlNets"):
        run_controlnets({"controlnet": ["a=tiny", "b=tiny"], "control_scale": [1, 1, 1]})
    with pytest.raises(ConfigError, match="is not NAME=ID_OR_PATH"):
        controlnet_sources(["tiny"])
    with pytest.raises(ConfigError, match="repeat a name"):
        controlnet_sources(["a=tiny", "a=other"])
