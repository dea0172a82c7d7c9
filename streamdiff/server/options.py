"""The options of a server (``streamdiff serve``'s, and every replica's of a Ray Serve fleet): their defaults and
the :class:`~.hub.ServerConfig` they describe.

A server's options are the named options of :mod:`streamdiff.options` (model, engine, the streams' default
settings), the server's own (:data:`SERVER_DEFAULTS`) and one per :class:`~streamdiff.protocol.limits.ServerLimits` field. Next:
:func:`server_config`, then load the engine (:func:`streamdiff.options.model_options`) and start a
:class:`~.app.StreamServer`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..options import (
    CONTROLNET_DEFAULTS,
    ENGINE_DEFAULTS,
    MODEL_DEFAULTS,
    PROMPT_DEFAULTS,
    STREAM_DEFAULTS,
    prompt_config,
    stream_config,
)
from .hub import ServerConfig
from ..protocol.limits import ServerLimits
from ..protocol.policy import HostPolicy, OriginPolicy
from ..protocol.settings import OutputConfig, StreamSettings
from .rtc.config import RtcConfig, parse_quality

__all__ = ["RTC_DEFAULTS", "SERVER_DEFAULTS", "limits_defaults", "rtc_config", "serve_defaults", "server_config"]

SERVER_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8765,
    "token": None,
    "allowed_origin": [],
    "loopback_origins": True,
    "allowed_hosts": [],
    "metrics_token_required": False,
    "stats_interval": 2.0,
    "workers": 0,
    "max_batch_rows": 16,
    "sizes": None,
    "max_shapes": 8,
    "ip_adapter": None,
}


#: The WebRTC options (``--rtc-host``…): :func:`rtc_config` makes the :class:`~.rtc.config.RtcConfig` of WHIP/WHEP.
RTC_DEFAULTS: dict[str, Any] = {
    "rtc_host": [],
    "rtc_max_sdp_bytes": RtcConfig.max_sdp_bytes,
    "rtc_codecs": RtcConfig.video_codecs,
    "rtc_connect_timeout": RtcConfig.connect_timeout_s,
    "rtc_port_range": None,
    "rtc_quality": RtcConfig.encoder.crf,  # a crf, or "aiortc" (RtcConfig.encoder, parse_quality)
}


def limits_defaults() -> dict[str, Any]:
    """One option per :class:`ServerLimits` field, with its default."""
    defaults = ServerLimits()
    # ServerLimits.sizes is not a flag of its own: --sizes restricts the engine, and the limits follow it.
    # Nor are ServerLimits.ip_adapter and .controlnets: --ip-adapter NAME=ID_OR_PATH and --controlnet NAME=ID_OR_PATH
    # load them into the engine, and the limits follow (ServerLimits.for_engine).
    return {f.name: getattr(defaults, f.name) for f in fields(ServerLimits)
            if f.name not in ("sizes", "ip_adapter", "controlnets")}


def serve_defaults() -> dict[str, Any]:
    """Every option of a server, with its default."""
    return {**MODEL_DEFAULTS, **CONTROLNET_DEFAULTS, **ENGINE_DEFAULTS, **STREAM_DEFAULTS, **PROMPT_DEFAULTS,
            **SERVER_DEFAULTS, **RTC_DEFAULTS, **limits_defaults()}


def rtc_config(options: dict[str, Any]) -> RtcConfig:
    """The :class:`~.rtc.config.RtcConfig` the options describe (validated there)."""
    return RtcConfig(hosts=tuple(options["rtc_host"]), max_sdp_bytes=int(options["rtc_max_sdp_bytes"]),
                     video_codecs=tuple(options["rtc_codecs"]),
                     connect_timeout_s=float(options["rtc_connect_timeout"]),
                     ports=options["rtc_port_range"] or None, encoder=parse_quality(options["rtc_quality"]))


def server_config(options: dict[str, Any]) -> ServerConfig:
    """The :class:`~.hub.ServerConfig` the options describe."""
    limits = ServerLimits(**{name: options[name] for name in limits_defaults()})
    defaults = StreamSettings(stream_config(options), prompt_config(options), OutputConfig())
    return ServerConfig(
        host=str(options["host"]), port=int(options["port"]), limits=limits, token=options["token"] or None,
        origins=OriginPolicy.of(options["allowed_origin"], bool(options["loopback_origins"])), defaults=defaults,
        stats_interval_s=float(options["stats_interval"]), workers=int(options["workers"]),
        hosts=HostPolicy.of(options["allowed_hosts"]), metrics_token_required=bool(options["metrics_token_required"]),
    )
