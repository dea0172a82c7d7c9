"""Configuration of the Ray Serve application: the fleet (:class:`FleetConfig`) and one replica (:class:`ReplicaSpec`).

Both are frozen, validated at construction, and plain data, so Ray can ship them to the controller and to every
replica. A replica's model, engine, limits, token and stream defaults are exactly ``streamdiff serve``'s options
(``options``: the resolved option dictionary of that command), so the same flags and TOML file configure one
server and a fleet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import check_int, check_number
from ..errors import ConfigError

__all__ = ["FleetConfig", "ReplicaSpec"]


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica builds: ``options`` (``streamdiff serve``'s resolved options: model, engine, limits, token,
    stream defaults), ``torch_threads`` (CPU threads of its engine; 0: torch's default), ``shutdown_timeout_s``
    (to tell clients and drain the engine), ``view_secret`` (hex key of the view-token hashes the router sees)."""

    options: dict[str, Any]
    view_secret: str = ""
    torch_threads: int = 0
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        check_int("torch_threads", self.torch_threads, 0)
        check_number("shutdown_timeout_s", self.shutdown_timeout_s, 0)
        try:
            bytes.fromhex(self.view_secret)
        except ValueError:
            raise ConfigError("view_secret must be hexadecimal") from None

    def server_config(self) -> Any:
        """The :class:`~streamdiff.server.hub.ServerConfig` of every replica (host and port are Ray Serve's)."""
        from ..server.options import server_config

        return server_config(self.options)

    def build(self) -> tuple[Any, Any]:
        """Load the model into an engine (not started) sized by the limits; returns ``(engine, server config)``."""
        from ..options import model_options, parse_sizes

        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        config = self.server_config()
        engine = model_options(self.options).stream_engine(config.limits.max_streams,
                                                          int(self.options["max_batch_rows"]),
                                                          parse_sizes(self.options.get("sizes")),
                                                          int(self.options.get("max_shapes", 8)))
        config = replace(config, limits=config.limits.for_engine(engine))
        defaults = config.defaults
        engine.check_settings(defaults.stream, defaults.prompt)
        engine.prepare_backends(defaults.stream)
        return engine, config

    def web_dir(self) -> Path:
        from ..server import app as server_app

        return server_app.WEB_DIR


@dataclass(frozen=True)
class FleetConfig:
    """The fleet: fixed ``num_replicas``, or autoscaling between ``min_replicas`` and ``max_replicas`` at
    ``target_streams_per_replica`` (set ``max_replicas`` > ``min_replicas`` to autoscale). Per replica:
    ``num_gpus``, ``num_cpus`` (Ray resources; 1 GPU per replica on GPU machines), ``health_check_period_s``,
    ``graceful_shutdown_timeout_s``; ``routing_stats_period_s``: how often replicas report their load to the
    routers (the staleness of a router's view). ``name``/``route_prefix``: the Serve application."""

    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    target_streams_per_replica: float | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 10.0
    routing_stats_period_s: float = 1.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0
    name: str = "streamdiff"
    route_prefix: str = "/"
    extra_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int("num_replicas", self.num_replicas, 1)
        check_int("min_replicas", self.min_replicas, 0)
        check_int("max_replicas", self.max_replicas, 1)
        if self.max_replicas < self.min_replicas:
            raise ConfigError(f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}")
        for name in ("num_gpus", "num_cpus", "health_check_period_s", "health_check_timeout_s",
                     "graceful_shutdown_timeout_s", "upscale_delay_s", "downscale_delay_s"):
            check_number(name, getattr(self, name), 0)
        check_number("routing_stats_period_s", self.routing_stats_period_s, 0, min_open=True)
        if self.target_streams_per_replica is not None:
            check_number("target_streams_per_replica", self.target_streams_per_replica, 0, min_open=True)
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix={self.route_prefix!r} must start with '/'")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas


def new_view_secret() -> str:
    return os.urandom(16).hex()
