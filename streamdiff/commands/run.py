"""``streamdiff run``: stream frames from a source through the engine into one or more sinks.

Example (offline, built-in tiny model and test pattern)::

    streamdiff run --source testpattern --sink file:out/demo.mp4 --frames 120

Every flag can also come from ``--config FILE.toml`` under the same name (``guidance_scale = 1.4`` or
``guidance-scale = 1.4``; ``sink = ["window", "virtualcam"]``); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..config import BackendKind, CfgMode, FilterConfig, PromptConfig, StreamConfig, t_index_list_for_strength
from ..backends.keys import EngineOptions
from ..errors import ConfigError, StreamDiffError
from ..io.resize import parse_size
from ..io.sinks import open_sink
from ..io.sources import list_webcams, open_source
from ..models import LoraSpec
from ..runtime import RuntimeConfig, StreamRunner
from ..runtime.controls import COMMAND_HELP

TOKEN_ENV = "STREAMDIFF_TOKEN"

logger = logging.getLogger(__name__)

NAME = "run"
HELP = "stream a webcam, video, folder or test pattern through the engine into windows, files or a virtual camera"

DEFAULTS: dict[str, Any] = {
    "source": "testpattern",
    "sink": ["null"],
    "frames": None,
    "realtime": None,
    "fps": None,
    "camera_size": None,
    "model": "tiny",
    "vae": None,
    "lora": [],
    "dtype": None,
    "device": "auto",
    "backend": "torch",
    "engine_dir": None,
    "compile": False,
    "channels_last": False,
    "prompt": "",
    "negative_prompt": "",
    "t_index_list": None,
    "strength": None,
    "steps": 2,
    "num_inference_steps": 50,
    "cfg_type": "self",
    "guidance_scale": 1.2,
    "delta": 1.0,
    "seed": 2,
    "size": "256x256",
    "frame_buffer_size": 1,
    "filter": False,
    "filter_threshold": 0.98,
    "filter_max_skip": 10,
    "output_size": None,
    "queue_size": 1,
    "virtualcam_backend": None,
    "status_interval": 2.0,
    "stats_json": None,
    "control_stdin": False,
    "engine": None,
    "token": None,
    "remote_format": "jpeg",
    "remote_quality": 90,
}
# The options that load a model (shared with `streamdiff serve`, which takes them from here).
MODEL_KEYS = ("model", "vae", "lora", "dtype", "device", "backend", "engine_dir", "compile", "channels_last")
# The options that describe a stream (`streamdiff serve`: its streams' default settings).
STREAM_KEYS = ("prompt", "negative_prompt", "t_index_list", "strength", "steps", "num_inference_steps", "cfg_type",
               "guidance_scale", "delta", "seed", "size", "frame_buffer_size", "filter", "filter_threshold",
               "filter_max_skip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML file with any of these options (flags override it)")
    io = parser.add_argument_group("input and output")
    io.add_argument("--source",
                    help="testpattern[:WxH] | webcam[:INDEX|PATH] | file:VIDEO | folder:DIR (default testpattern)")
    io.add_argument("--sink", action="append", metavar="SPEC",
                    help="window | file:OUT.mp4 | folder:DIR | virtualcam[:DEVICE] | null; repeatable (default null)")
    io.add_argument("--frames", type=int, help="stop after reading this many frames (default: the whole input)")
    io.add_argument("--realtime", action=argparse.BooleanOptionalAction,
                    help="pace file/folder/pattern sources at their fps and drop late frames (latest wins); "
                         "default: on for webcams only")
    io.add_argument("--fps", type=float, help="pattern/folder frame rate, requested webcam rate and output fps")
    io.add_argument("--camera-size", metavar="WxH", help="requested webcam resolution, e.g. 1280x720")
    io.add_argument("--output-size", metavar="WxH|source",
                    help="scale output frames to this size ('source': the input's size)")
    io.add_argument("--list-devices", action="store_true", help="list webcams and exit")
    io.add_argument("--virtualcam-backend", help="pyvirtualcam backend name (default: the first that works)")
    add_model_arguments(parser)
    add_stream_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--queue-size", type=int, help="capacity of the latest-wins queues (default 1)")
    run.add_argument("--status-interval", type=float, help="seconds between status lines, 0 for none (default 2)")
    run.add_argument("--stats-json", metavar="FILE", help="write the final summary as JSON ('-' for stdout)")
    run.add_argument("--control-stdin", action=argparse.BooleanOptionalAction,
                     help=f"read live changes from standard input, {COMMAND_HELP}")
    remote = parser.add_argument_group("remote engine (a streamdiff serve server)")
    remote.add_argument("--engine", metavar="ws://HOST:PORT",
                        help="stylise on this server instead of loading a model here (the model flags are ignored)")
    remote.add_argument("--token", help=f"the server's token (default ${TOKEN_ENV})")
    remote.add_argument("--remote-format", choices=["jpeg", "webp"],
                        help="how frames travel to and from the server (default jpeg)")
    remote.add_argument("--remote-quality", type=int,
                        help="their quality in [1, 100] (default 90; webp at 100 is lossless)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model --vae --dtype --device --lora --backend --engine-dir --compile --channels-last``."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="'tiny' (built-in, offline), a diffusers folder, a checkpoint file or a hub id")
    model.add_argument("--vae", help="replacement VAE folder or hub id, e.g. madebyollin/taesd")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: per device")
    model.add_argument("--device", help="auto | cpu | cuda | mps (default auto)")
    model.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                       help="LoRA file, folder or hub id fused at load, with an optional scale (default 1); repeatable")
    model.add_argument("--backend", choices=[b.value for b in BackendKind], help="engine backend (default torch)")
    model.add_argument("--engine-dir", help="engine cache folder (default $STREAMDIFF_ENGINE_DIR or ./engines)")
    model.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch backend: AOTInductor-compiled U-Net, built once and cached")
    model.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="torch backend: channels-last memory format (faster on CPUs)")


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompt … --filter-max-skip``: one stream's settings."""
    stream = parser.add_argument_group("stream")
    stream.add_argument("--prompt", help="what to turn the frames into")
    stream.add_argument("--negative-prompt", help="what to steer away from (cfg full/initialize)")
    stream.add_argument("--t-index-list", metavar="I,J,..", help="timestep indices, e.g. 32,45")
    stream.add_argument("--strength", type=float, help="denoising strength in (0, 1] instead of --t-index-list")
    stream.add_argument("--steps", type=int, help="denoising steps used with --strength (default 2)")
    stream.add_argument("--num-inference-steps", type=int, help="LCM schedule length (default 50)")
    stream.add_argument("--cfg-type", choices=[m.value for m in CfgMode], help="guidance mode (default self)")
    stream.add_argument("--guidance-scale", type=float, help="guidance scale (default 1.2)")
    stream.add_argument("--delta", type=float, help="RCFG delta (default 1.0)")
    stream.add_argument("--seed", type=int, help="noise seed (default 2)")
    stream.add_argument("--size", metavar="WxH", help="engine frame size (default 256x256)")
    stream.add_argument("--frame-buffer-size", type=int, help="frames per engine step (default 1)")
    stream.add_argument("--filter", action=argparse.BooleanOptionalAction, help="stochastic similarity filter")
    stream.add_argument("--filter-threshold", type=float, help="similarity threshold (default 0.98)")
    stream.add_argument("--filter-max-skip", type=int, help="most frames skipped in a row (default 10)")


def load_config_file(path: str, defaults: dict[str, Any] = DEFAULTS) -> dict[str, Any]:
    """The options in a TOML file, keys normalised to flag names with underscores; keys not in ``defaults`` are an
    error."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError("--config needs Python 3.11+ (tomllib) or `pip install tomli`") from None
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(file)!r}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(file)!r} is not valid TOML: {error}") from None
    options = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"config file {str(file)!r} has unknown key(s) {unknown}; allowed: {sorted(defaults)}")
    return options


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then the flags given on the command line."""
    options = dict(DEFAULTS)
    if getattr(args, "config", None):
        options.update(load_config_file(args.config))
    options.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    for key in ("sink", "lora"):
        if isinstance(options[key], str):
            options[key] = [options[key]]
    return options


def lora_specs(values: list[str]) -> list[LoraSpec]:
    """``PATH[:SCALE]`` entries → LoRA specs (a trailing ``:number`` is the scale)."""
    specs = []
    for value in values:
        source, _, scale_text = str(value).rpartition(":")
        try:
            scale = float(scale_text) if source else None
        except ValueError:  # a colon inside the path (C:\\...), no scale given
            scale = None
        specs.append(LoraSpec(source, scale) if scale is not None else LoraSpec(str(value)))
    return specs


def _int_list(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a comma-separated list of integers (e.g. 32,45)") from None
    return tuple(value)


def _size(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{name}={value!r} must be [width, height]")
        return int(value[0]), int(value[1])
    return parse_size(str(value), name)


def stream_config(options: dict[str, Any]) -> StreamConfig:
    """The :class:`StreamConfig` the options describe (strength → t_index_list)."""
    width, height = _size(options["size"], "size")
    steps = int(options["num_inference_steps"])
    if options["strength"] is not None and options["t_index_list"] is not None:
        raise ConfigError("give either t_index_list or strength, not both")
    if options["strength"] is not None:
        t_index_list = t_index_list_for_strength(float(options["strength"]), int(options["steps"]), steps)
    else:
        t_index_list = _int_list(options["t_index_list"] or (32, 45), "t_index_list")
    filter_config = FilterConfig(
        bool(options["filter"]), float(options["filter_threshold"]), int(options["filter_max_skip"])
    )
    return StreamConfig(
        width=width, height=height, t_index_list=t_index_list, num_inference_steps=steps,
        frame_buffer_size=int(options["frame_buffer_size"]), cfg_type=options["cfg_type"], filter=filter_config,
    )


def build_runner(options: dict[str, Any]) -> StreamRunner:
    """Open the source (so a bad device fails before the model loads), load the model, build the runner.

    The runner opens the sinks and the stream when it starts.
    """
    from ..engine import SINGLE_STREAM
    from ..remote import RemoteEngine

    config = stream_config(options)
    output_size = options["output_size"]
    if output_size is not None and output_size != "source":
        output_size = _size(output_size, "output_size")
    camera_size = _size(options["camera_size"], "camera_size") if options["camera_size"] else None
    source = open_source(
        str(options["source"]), width=config.width, height=config.height, fps=options["fps"],
        realtime=bool(options["realtime"]), frames=None, camera_size=camera_size,
    )
    sinks = [open_sink(str(spec), virtualcam_backend=options["virtualcam_backend"]) for spec in options["sink"]]
    source.open()  # fail fast, before a possibly long model load; the runner's open() is then a no-op
    runtime = RuntimeConfig(
        realtime=options["realtime"], queue_size=int(options["queue_size"]), max_frames=options["frames"],
        output_size=output_size, fps=options["fps"],
    )
    prompt = prompt_config(options)
    try:
        if options["engine"]:
            engine: Any = RemoteEngine(str(options["engine"]), token=options["token"],
                                       image_format=options["remote_format"], quality=int(options["remote_quality"]))
        else:
            engine = load_engine(options, SINGLE_STREAM.max_streams, SINGLE_STREAM.max_batch_rows)
            engine.check_settings(config, prompt)
            engine.prepare_backends(config)
    except BaseException:
        source.close()
        raise
    return StreamRunner(engine, source, sinks, runtime, stream_config=config, prompt=prompt)


def prompt_config(options: dict[str, Any]) -> PromptConfig:
    """The :class:`PromptConfig` the options describe."""
    return PromptConfig(
        str(options["prompt"]), str(options["negative_prompt"]), float(options["guidance_scale"]),
        float(options["delta"]), int(options["seed"]),
    )


def load_engine(options: dict[str, Any], max_streams: int, max_batch_rows: int) -> Any:
    """Load the model the options name into a :class:`StreamEngine` (not started)."""
    from ..engine import StreamEngine

    return StreamEngine.from_pretrained(
        options["model"], max_streams=max_streams, max_batch_rows=max_batch_rows,
        vae=options["vae"], loras=lora_specs(options["lora"]), dtype=options["dtype"], device=options["device"],
        backend=options["backend"],
        engine_options=EngineOptions(
            engine_dir=options["engine_dir"], compile=bool(options["compile"]),
            channels_last=bool(options["channels_last"]),
        ),
    )


def _read_commands(runner: StreamRunner) -> None:
    """Live changes typed (or piped) on standard input, one per line; an invalid one is reported and ignored."""
    for line in sys.stdin:
        try:
            done = runner.controls.command(line)
        except StreamDiffError as error:
            logger.error("ignored %r: %s", line.strip(), error)
            continue
        if done:
            logger.info("%s", done)


def _write_stats(summary: Any, target: str | None) -> None:
    if not target:
        return
    text = summary.to_json()
    if target == "-":
        print(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def run(args: argparse.Namespace) -> int:
    if args.list_devices:
        cameras = list_webcams()
        for camera in cameras:
            print(f"{camera.device}\t{camera.name}")
        if not cameras:
            print("no webcams found", file=sys.stderr)
        return 0
    options = resolve_options(args)
    if options["sink"] == DEFAULTS["sink"] and "sink" not in {k for k, v in vars(args).items() if v is not None}:
        logger.warning("no --sink given: output frames are discarded (null sink); try --sink file:out.mp4")
    runner = build_runner(options)
    terminated = threading.Event()

    def on_sigterm(signum: int, frame: Any) -> None:
        terminated.set()
        runner.stop()

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    interval = float(options["status_interval"] or 0) or None
    try:
        runner.start()
        if options["control_stdin"]:
            threading.Thread(target=_read_commands, args=(runner,), name="stdin-commands", daemon=True).start()
        summary = runner.wait(interval, lambda s: logger.info("%s", s.status_line()))
    except StreamDiffError:
        if runner.summary is not None:
            print(runner.summary.format())
            _write_stats(runner.summary, options["stats_json"])
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if options["engine"]:
            runner.engine.stop()  # the remote engine's event loop thread
    print(summary.format())
    _write_stats(summary, options["stats_json"])
    if summary.interrupted:
        return 130
    if terminated.is_set():
        return 143
    return 0
