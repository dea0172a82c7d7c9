"""``streamdiff serve``: the WebSocket video endpoint (docs/protocol.md) for many clients on one engine.

Example (offline, built-in tiny model; open http://127.0.0.1:8765/ in a browser)::

    streamdiff serve --model tiny --max-streams 4
    STREAMDIFF_TOKEN=s3cret streamdiff serve --host 0.0.0.0 --allowed-origin https://studio.example.com

Every stream gets its own settings; all of them share one model and one U-Net call per tick. The model options
and the TOML ``--config`` file are ``streamdiff run``'s (the stream options set the streams' default settings);
every server limit is a flag with its safe default. SIGINT/SIGTERM shut down gracefully: every client gets an
error and close code 1001, the engine is drained, the exit status is 0. ``--ray`` serves the same endpoint from a
fleet of engines on Ray Serve (:mod:`streamdiff.deploy`, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import replace
from typing import Any

from ..config import check_int
from ..deploy import cli as deploy_cli
from ..options import TOKEN_ENV, model_options, parse_sizes
from ..server.options import limits_defaults, serve_defaults, server_config
from . import options as shared

logger = logging.getLogger(__name__)

NAME = "serve"
HELP = "serve the WebSocket video endpoint, the browser page and metrics for many clients on one engine"

_LIMIT_HELP = {
    "max_streams": "streams at once; more are refused with 1013",
    "max_viewers_per_stream": "view-only sockets per stream",
    "max_message_bytes": "largest WebSocket message (1009 above; refused before it is read)",
    "max_text_bytes": "largest JSON message",
    "max_input_fps": "frames per second per stream; more are dropped and counted",
    "input_burst_frames": "burst allowed above the rate",
    "max_frame_pixels": "declared pixels of an input image, checked before decoding",
    "allowed_input_formats": "input image formats, comma-separated (jpeg, webp)",
    "max_width": "largest stream width",
    "max_height": "largest stream height",
    "size_multiple": "stream sizes must be multiples of this",
    "max_steps": "most denoising steps per stream",
    "max_frame_buffer_size": "most frames per engine call per stream",
    "allowed_cfg_types": "guidance modes clients may use, comma-separated (none, full, self, initialize)",
    "max_prompt_chars": "characters per prompt",
    "max_errors": "errors tolerated within --error-window-s before the connection is closed (1008)",
    "error_window_s": "seconds of the error budget's window",
    "hello_timeout_s": "seconds to send the hello after connecting",
    "idle_timeout_s": "seconds without any message before closing (1001)",
    "ping_interval_s": "seconds between WebSocket pings",
    "ping_timeout_s": "seconds to answer a ping before the connection is dropped",
    "handshake_timeout_s": "seconds to finish the opening handshake (slowloris)",
    "write_timeout_s": "seconds for one message to leave; a client that stops reading is then dropped",
    "close_timeout_s": "seconds for the closing handshake",
    "send_buffer_bytes": "kernel send buffer per socket",
    "max_queued_messages": "unused by serve since it runs on aiohttp (its queue stops reading a socket beyond "
                           "~128 KiB of waiting messages); kept for configuration files",
    "max_control_per_s": "text messages (hello, update) per second; more are answered rate_limited",
    "control_burst": "text messages allowed at once above that rate",
    "max_reshape_per_s": "updates per second that rebuild a stream (size, frame buffer, steps, cfg type)",
    "reshape_burst": "such updates allowed at once above that rate",
    "max_awaiting_hello": "stream sockets without a hello yet, in total; more get HTTP 503 (server-wide)",
    "max_awaiting_hello_per_address": "stream sockets without a hello yet from one IP address; more get HTTP 503",
    "max_messages_per_s": "messages of any kind read per second per connection; beyond, reading slows down",
    "message_burst": "messages read at once above that rate",
    "max_connects_per_address_per_s": "new stream sockets per second from one IP address; more get HTTP 503",
    "connect_burst_per_address": "new stream sockets at once from one address above that rate",
    "abuse_cooldown_s": "seconds an address may open no stream socket after one of its connections exhausted its "
                        "error budget",
    "max_decode_ms": "CPU milliseconds decoding one input frame may take (decode_too_slow beyond)",
    "max_decode_share": "share of one core a client's decodes may use over --decode-window-s",
    "decode_window_s": "seconds of the decode share's window",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of these options (flags override it)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", help="interface to listen on (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, help="port (default 8765; 0 picks a free one)")
    server.add_argument("--token", help="secret every client must send in its hello (default $STREAMDIFF_TOKEN; "
                                        "prefer the variable: flags show in process lists)")
    server.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                        help="a browser origin allowed to connect, exact match (e.g. https://studio.example.com; "
                             "'*' for any); repeatable")
    server.add_argument("--loopback-origins", action=argparse.BooleanOptionalAction,
                        help="allow pages served from this machine (localhost, 127.0.0.1, [::1]) (default on)")
    server.add_argument("--allowed-hosts", metavar="LIST",
                        help="Host header names the server answers, comma-separated (e.g. studio.example.com,"
                             "127.0.0.1); others get 421 (DNS rebinding). Default: any host")
    server.add_argument("--metrics-token-required", action=argparse.BooleanOptionalAction,
                        help="/metrics wants 'Authorization: Bearer TOKEN' (the server's token) (default off)")
    server.add_argument("--stats-interval", type=float, help="seconds between stats messages, 0 for none (default 2)")
    server.add_argument("--workers", type=int, help="threads of each image pool (default 0: decode one per stream, at most 32; "
                                              "encode one per core, at most 4)")
    server.add_argument("--max-batch-rows", type=int, help="U-Net rows per call at most (default 16)")
    server.add_argument("--sizes", metavar="LIST",
                        help="the only frame sizes clients may use, comma-separated (e.g. 256,320x240,512); each "
                             "must be one the model and backend run (default: any of those)")
    server.add_argument("--max-shapes", type=int,
                        help="frame sizes whose compiled state each engine keeps (least recently used beyond; bounds "
                             "memory whatever sizes clients ask for) (default 8)")
    rtc = parser.add_argument_group("WebRTC: WHIP ingest, WHEP playback (docs/webrtc.md)")
    rtc.add_argument("--rtc-host", action="append", metavar="ADDRESS",
                     help="a local IP address offered as ICE host candidate (UDP); repeatable (default: every "
                          "address of every interface except loopback; 127.0.0.1 for this machine only)")
    rtc.add_argument("--rtc-max-sdp-bytes", type=int, metavar="N", help="largest SDP offer read; more is 413 "
                                                                         "(default 16384)")
    rtc.add_argument("--rtc-codecs", metavar="LIST", help="video codecs allowed, in order of preference, "
                                                          "comma-separated (default H264,VP8)")
    rtc.add_argument("--rtc-connect-timeout", type=float, metavar="S",
                     help="seconds for ICE and DTLS to connect after the answer, or the peer is closed (default 10)")
    rtc.add_argument("--rtc-port-range", metavar="FIRST-LAST",
                     help="UDP ports the peers' media sockets bind to, for a firewall (one per peer connection and "
                          "--rtc-host address; none free: WHIP/WHEP answer 503) (default: the kernel's ephemeral "
                          "ports)")
    rtc.add_argument("--rtc-quality", metavar="CRF|aiortc",
                     help="quality of the video the server sends: an H.264/VP8 crf in [0, 51], lower is better and "
                          "bigger, the receiver's bandwidth estimate a ceiling; 'aiortc': aiortc's own encoder, a "
                          "bitrate of at least 500 kbit/s (default 26)")
    limits = parser.add_argument_group("limits (per client unless said otherwise; the defaults are safe)")
    for name, default in limits_defaults().items():
        shown = ",".join(v.value for v in default) if isinstance(default, tuple) else f"{default:g}" \
            if isinstance(default, float) else default
        kind = str if isinstance(default, tuple) else type(default)
        limits.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar="N" if kind is not str else "LIST",
                            help=f"{_LIMIT_HELP[name]} (default {shown})")
    shared.add_controlnet_options(shared.add_model_options(parser), scale=False)
    parser.add_argument("--ip-adapter", metavar="NAME=ID_OR_PATH",
                        help="an IP-Adapter (image prompts) the server offers, by NAME: 'tiny' (built in) or a local "
                             "folder/.safetensors file; clients choose it with settings.ip_adapter (docs/models.md)")
    shared.add_engine_options(parser)
    shared.add_prompt_options(shared.add_stream_options(parser))
    deploy_cli.add_arguments(parser)


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then the environment's token, then the flags given."""
    defaults = serve_defaults()
    file_options = shared.load_config_file(args.config, defaults) if getattr(args, "config", None) else {}
    environment = {}
    if file_options.get("token") is None and os.environ.get(TOKEN_ENV):
        environment["token"] = os.environ[TOKEN_ENV]
    options = shared.resolve(args, defaults, file_options, environment)
    for key in ("lora", "allowed_origin", "rtc_host"):
        if isinstance(options[key], str):
            options[key] = [options[key]]
    for key in ("allowed_input_formats", "allowed_cfg_types", "allowed_hosts", "rtc_codecs"):
        if isinstance(options[key], str):
            options[key] = tuple(v.strip() for v in options[key].split(",") if v.strip())
    return options


def run(args: argparse.Namespace) -> int:
    options = resolve_options(args)
    config = server_config(options)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.token is None:
        logger.warning("listening on %s without a token: anyone who reaches this port can use the engine; set "
                       "STREAMDIFF_TOKEN", config.host)
    batch_rows = check_int("max_batch_rows", options["max_batch_rows"], 1)  # before a fleet loads anything
    if getattr(args, "ray", False):  # a fleet of engines on Ray Serve (docs/scaling.md)
        return deploy_cli.run(options, args)
    sizes = parse_sizes(options["sizes"])
    max_shapes = check_int("max_shapes", options["max_shapes"], 1)
    engine = model_options(options).stream_engine(config.limits.max_streams, batch_rows, sizes, max_shapes)
    config = replace(config, limits=config.limits.for_engine(engine))
    defaults = config.defaults
    engine.check_settings(defaults.stream, defaults.prompt)
    engine.prepare_backends(defaults.stream)
    asyncio.run(_serve(engine, config, _rtc(options)))
    return 0


def _rtc(options: dict[str, Any]) -> Any:
    """WHIP/WHEP's configuration (docs/webrtc.md) when aiortc is installed; without it None (the WebSocket routes
    alone, said once)."""
    import importlib.util

    if importlib.util.find_spec("aiortc") is None:
        logger.info("WebRTC (WHIP/WHEP) is off: aiortc is not installed (pip install 'streamdiff[webrtc]')")
        return None
    from ..server.options import rtc_config

    return rtc_config(options)


async def _serve(engine: Any, config: Any, rtc: Any = None) -> None:
    from ..server.app import StreamServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with StreamServer(engine, config, rtc=rtc) as server:
            logger.info("open http://%s:%d/ (stream socket %s)", config.host, server.port, server.url)
            await stop.wait()
            logger.info("shutting down")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
