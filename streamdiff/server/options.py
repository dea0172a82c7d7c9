"""The options of a server (``streamdiff serve``'s, and every replica's of a Ray Serve fleet): their defaults and
the :class:`~.hub.ServerConfig` they describe.

A server's options are the named options of :mod:`streamdiff.options` (model, engine, the streams' default
settings), the server's own (:data:`SERVER_DEFAULTS`) and one per :class:`~.limits.ServerLimits` field. Next:
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
from .limits import ServerLimits
from .policy import HostPolicy, OriginPolicy
from .settings import OutputConfig, StreamSettings

__all__ = ["SERVER_DEFAULTS", "limits_defaults", "serve_defaults", "server_config"]

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
}


def limits_defaults() -> dict[str, Any]:
    """One option per :class:`ServerLimits` field, with its default."""
    defaults = ServerLimits()
    # ServerLimits.sizes is not a flag of its own: --sizes restricts the engine, and the limits follow it.
    return {f.name: getattr(defaults, f.name) for f in fields(ServerLimits) if f.name != "sizes"}


def serve_defaults() -> dict[str, Any]:
    """Every option of a server, with its default."""
    return {**MODEL_DEFAULTS, **CONTROLNET_DEFAULTS, **ENGINE_DEFAULTS, **STREAM_DEFAULTS, **PROMPT_DEFAULTS,
            **SERVER_DEFAULTS, **limits_defaults()}


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
