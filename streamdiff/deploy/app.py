"""The Ray Serve application: :func:`build_app` from a fleet and a replica configuration, and :func:`app`, the
builder behind ``serve run streamdiff.deploy:app`` and ``serve deploy`` config files.

::

    serve run streamdiff.deploy:app model=tiny max_streams=4 replicas=2          # any streamdiff serve option
    streamdiff serve --ray --replicas 2 --model tiny --max-streams 4             # the same, from our command

One deployment, ``StreamReplica``: replicas that each own one engine and serve ``streamdiff serve``'s own ASGI
application (:class:`~streamdiff.server.asgi.ServerApp`) as their ingress. Ray Serve's HTTP proxies
(one per node) accept the connections and hand each to a replica chosen by :class:`~.router.StreamRouter`.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

from ..errors import ConfigError, missing_extra
from .config import FleetConfig, ReplicaSpec, new_view_secret

__all__ = ["app", "build_app", "deployment_options", "split_args"]

logger = logging.getLogger(__name__)

SLACK_REQUESTS = 16  # sockets beyond streams and viewers a replica accepts: hellos being read, refusals, pages


def deployment_options(fleet: FleetConfig, spec: ReplicaSpec, max_streams: int, max_viewers: int) -> dict[str, Any]:
    """The ``@serve.deployment`` options of the stream replicas."""
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    from .autoscale import StreamsPolicy
    from .router import StreamRouter

    actor_options: dict[str, Any] = {"num_cpus": fleet.num_cpus, **fleet.extra_actor_options}
    if fleet.num_gpus:
        actor_options["num_gpus"] = fleet.num_gpus
    options: dict[str, Any] = {
        "name": "StreamReplica",
        "ray_actor_options": actor_options,
        # A socket is one request for its whole life: the replica takes every socket it can hold and its Hub
        # decides (1013 when full), so a full fleet answers at once instead of queueing connections.
        "max_ongoing_requests": max_streams * (1 + max_viewers) + SLACK_REQUESTS,
        "max_queued_requests": -1,
        "health_check_period_s": fleet.health_check_period_s,
        "health_check_timeout_s": fleet.health_check_timeout_s,
        "graceful_shutdown_timeout_s": fleet.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "request_router_config": RequestRouterConfig(
            request_router_class=StreamRouter,
            request_router_kwargs={"view_secret": spec.view_secret, "max_streams": max_streams,
                                   "stats_period_s": fleet.routing_stats_period_s},
            request_routing_stats_period_s=fleet.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 4 * fleet.routing_stats_period_s),
        ),
    }
    if fleet.autoscaling:
        target = fleet.target_streams_per_replica or max(1.0, 0.75 * max_streams)
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=fleet.min_replicas, max_replicas=fleet.max_replicas, initial_replicas=max(1, fleet.min_replicas),
            metrics_interval_s=2.0, look_back_period_s=10.0,
            upscale_delay_s=fleet.upscale_delay_s, downscale_delay_s=fleet.downscale_delay_s,
            policy=AutoscalingPolicy(policy_function=StreamsPolicy,
                                     policy_kwargs={"target_streams_per_replica": float(target)}),
        )
    else:
        options["num_replicas"] = fleet.num_replicas
    return options


def build_app(fleet: FleetConfig, spec: ReplicaSpec) -> Any:
    """The bound Serve application (``serve.run(build_app(...), name=fleet.name, route_prefix=fleet.route_prefix)``;
    :func:`~.launch.deploy` does that)."""
    try:
        from ray import serve
    except ImportError:
        raise missing_extra("ray", "ray") from None
    from .replica import StreamIngress

    if not spec.view_secret:
        spec = ReplicaSpec(spec.options, new_view_secret(), spec.torch_threads, spec.shutdown_timeout_s)
    limits = spec.server_config().limits  # validates every server option before anything is deployed
    options = deployment_options(fleet, spec, limits.max_streams, limits.max_viewers_per_stream)
    deployment = serve.deployment(**options)(StreamIngress)
    return deployment.bind(spec)


FLEET_FIELDS = {f.name for f in fields(FleetConfig)} | {"replicas"}
SPEC_FIELDS = {"torch_threads", "shutdown_timeout_s"}


def split_args(args: dict[str, Any]) -> tuple[FleetConfig, dict[str, Any], dict[str, Any]]:
    """``serve run`` arguments → (fleet, replica-spec fields, ``streamdiff serve`` options given)."""
    fleet_args = {k: v for k, v in args.items() if k in FLEET_FIELDS}
    if "replicas" in fleet_args:
        fleet_args["num_replicas"] = fleet_args.pop("replicas")
    spec_args = {k: v for k, v in args.items() if k in SPEC_FIELDS}
    serve_args = {k: v for k, v in args.items() if k not in FLEET_FIELDS and k not in SPEC_FIELDS}
    try:
        fleet = FleetConfig(**{k: _number(v) for k, v in fleet_args.items()})
    except TypeError as error:
        raise ConfigError(str(error)) from None
    return fleet, {k: _number(v) for k, v in spec_args.items()}, serve_args


def app(args: dict[str, Any]) -> Any:
    """The application builder of ``serve run streamdiff.deploy:app key=value ...`` (and ``import_path`` in a
    ``serve deploy`` config file): any ``streamdiff serve`` option (``model``, ``max_streams``, ``prompt``…), the
    fleet's fields (``replicas``, ``min_replicas``, ``max_replicas``, ``target_streams_per_replica``,
    ``num_gpus``…) and ``torch_threads``."""
    fleet, spec_args, given = split_args(dict(args or {}))
    return build_app(fleet, ReplicaSpec(serve_options(given), **spec_args))


def serve_options(given: dict[str, Any]) -> dict[str, Any]:
    """``streamdiff serve``'s defaults with ``given`` applied (strings converted to each option's type)."""
    from ..server.options import serve_defaults

    options = serve_defaults()
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; allowed: {sorted(options) + sorted(FLEET_FIELDS | SPEC_FIELDS)}")
    for key, value in given.items():
        options[key] = _typed(key, value, options[key])
    return options


def _typed(key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value.lower() in ("true", "1", "yes")
    if isinstance(default, (tuple, list)):
        items = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(items) if isinstance(default, tuple) else items
    if isinstance(default, (int, float)):
        number = _number(value)
        if isinstance(number, str):
            raise ConfigError(f"{key}={value!r} must be a number")
        return number
    return value


def _number(value: Any) -> Any:
    """``serve run`` passes every argument as a string: ``"2"`` → 2, ``"0.5"`` → 0.5, others unchanged."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
