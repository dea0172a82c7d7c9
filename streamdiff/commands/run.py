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
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import StreamConfig, parse_size
from ..errors import ConfigError, StreamDiffError
from ..io.contact_sheet import ContactSheetSink, InputTap
from ..io.sinks import VideoFileSink, open_sink
from ..io.sources import list_webcams, open_source
from ..runtime import RuntimeConfig, StreamRunner
from ..runtime.controls import COMMAND_HELP, read_reference_image
from ..options import (
    CONTROLNET_DEFAULTS,
    ENGINE_DEFAULTS,
    MODEL_DEFAULTS,
    PROMPT_DEFAULTS,
    STREAM_DEFAULTS,
    TOKEN_ENV,
    ModelOptions,
    lora_specs,
    model_options,
    output_size_value,
    prompt_config,
    run_controlnets,
    stream_config,
)
from . import options as shared
from .options import output_size_arg, size_arg

__all__ = ["DEFAULTS", "add_arguments", "build_request", "build_runner", "lora_specs", "resolve_options", "run",
           "stream_config"]

logger = logging.getLogger(__name__)

NAME = "run"
HELP = ("stream a webcam, video, folder, screen or test pattern through the engine into windows, files or a "
        "virtual camera")

DEFAULTS: dict[str, Any] = {
    "source": "testpattern",
    "sink": ["null"],
    "frames": None,
    "realtime": None,
    "fps": None,
    "camera_size": None,
    **MODEL_DEFAULTS,
    **ENGINE_DEFAULTS,
    **STREAM_DEFAULTS,
    **PROMPT_DEFAULTS,
    **CONTROLNET_DEFAULTS,
    "control_scale": (),
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
    "ip_adapter": None,
    "ip_adapter_image": None,
    "ip_adapter_scale": 1.0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML file with any of these options (flags override it)")
    io = parser.add_argument_group("input and output")
    io.add_argument("--source",
                    help="testpattern[:WxH] | webcam[:INDEX|PATH] | file:VIDEO | folder:DIR | screen[:MONITOR] "
                         "(default testpattern)")
    io.add_argument("--sink", action="append", metavar="SPEC",
                    help="window | file:OUT.mp4 | folder:DIR | virtualcam[:DEVICE] | null; repeatable (default null)")
    io.add_argument("--frames", type=int, help="stop after reading this many frames (default: the whole input)")
    io.add_argument("--realtime", action=argparse.BooleanOptionalAction,
                    help="pace file/folder/pattern sources at their fps and drop late frames (latest wins); "
                         "default: on for webcams only")
    io.add_argument("--fps", type=float, help="pattern/folder frame rate, requested webcam rate and output fps")
    io.add_argument("--camera-size", type=size_arg, metavar="WxH", help="requested webcam resolution, e.g. 1280x720")
    io.add_argument("--output-size", type=output_size_arg, metavar="WxH|source",
                    help="scale output frames to this size ('source': the input's size)")
    io.add_argument("--list-devices", action="store_true", help="list webcams and exit")
    io.add_argument("--virtualcam-backend", help="pyvirtualcam backend name (default: the first that works)")
    shared.add_controlnet_options(shared.add_model_options(parser), scale=True)
    shared.add_engine_options(parser)
    shared.add_prompt_options(shared.add_stream_options(parser))
    image = parser.add_argument_group("image prompt (IP-Adapter)")
    image.add_argument("--ip-adapter", metavar="ID_OR_PATH",
                       help="IP-Adapter to load: 'tiny' (built in, for the tiny models) or a local folder/.safetensors "
                            "file with image_encoder/ beside it (offline)")
    image.add_argument("--ip-adapter-image", metavar="FILE", help="the reference image (needs --ip-adapter)")
    image.add_argument("--ip-adapter-scale", type=float,
                       help=f"the image prompt's weight (default {DEFAULTS['ip_adapter_scale']})")
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


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then the flags given on the command line."""
    file_options = shared.load_config_file(args.config, DEFAULTS) if getattr(args, "config", None) else {}
    options = shared.resolve(args, DEFAULTS, file_options)
    for key in ("sink", "lora"):
        if isinstance(options[key], str):
            options[key] = [options[key]]
    return options


def build_request(options: dict[str, Any]) -> tuple[ModelOptions, StreamConfig]:
    """What the run loads and streams with: the model options and the StreamConfig (as ``engines build`` derives
    them, from the same shared options)."""
    return model_options(options), stream_config(options)


def build_runner(options: dict[str, Any]) -> StreamRunner:
    """Check every setting, open the source (so a bad device fails before the model loads), load the model, build
    the runner. The runner opens the sinks and the stream when it starts.
    """
    from ..engine import SINGLE_STREAM
    from ..client.remote import RemoteEngine

    request, config = build_request(options)
    output_size = options["output_size"]
    if output_size is not None:
        output_size = output_size_value(output_size)
    camera_size = parse_size(options["camera_size"], "camera_size") if options["camera_size"] is not None else None
    runtime = RuntimeConfig(
        realtime=options["realtime"], queue_size=options["queue_size"], max_frames=options["frames"],
        output_size=output_size, fps=options["fps"],
    )
    source = open_source(
        str(options["source"]), width=config.width, height=config.height, fps=options["fps"],
        realtime=bool(options["realtime"]), frames=None, camera_size=camera_size,
    )
    sinks = [open_sink(str(spec), virtualcam_backend=options["virtualcam_backend"]) for spec in options["sink"]]
    videos = [sink for sink in sinks if isinstance(sink, VideoFileSink)]
    if videos:  # a PNG contact sheet (inputs over outputs) beside the first video file
        source = InputTap(source)
        sinks.append(ContactSheetSink(videos[0].path.with_suffix(".png"), source))
    source.open()  # fail fast, before a possibly long model load; the runner's open() is then a no-op
    prompt = replace(prompt_config(options), controlnets=run_controlnets(options))
    if options["engine"] and prompt.controlnets:
        source.close()
        raise ConfigError("--controlnet loads ControlNets into a local engine; with --engine the server's operator "
                          "chooses what it offers", field="controlnet", value=options["controlnet"])
    try:
        if options["ip_adapter_image"]:
            prompt = replace(prompt, reference_image=read_reference_image(str(options["ip_adapter_image"])))
        if options["engine"] and (options["ip_adapter"] or options["ip_adapter_image"]):
            raise ConfigError("--ip-adapter/--ip-adapter-image: image prompts are not available with --engine yet",
                              field="ip_adapter", value=options["ip_adapter"], allowed="none with --engine")
        if options["engine"]:
            engine: Any = RemoteEngine(str(options["engine"]), token=options["token"],
                                       image_format=options["remote_format"], quality=int(options["remote_quality"]))
        else:
            engine = request.stream_engine(SINGLE_STREAM.max_streams, SINGLE_STREAM.max_batch_rows)
            engine.check_settings(config, prompt)
            engine.prepare_backends(config)
    except BaseException:
        source.close()
        raise
    return StreamRunner(engine, source, sinks, runtime, stream_config=config, prompt=prompt)


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
    except StreamDiffError as error:
        if runner.summary is None:
            raise
        # A stage, or a sink at open or close, failed: the summary says which and why; exit 1.
        print(runner.summary.format())
        _write_stats(runner.summary, options["stats_json"])
        logger.error("%s", runner.summary.error or error)
        return 1
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
