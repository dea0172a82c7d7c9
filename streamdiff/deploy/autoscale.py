"""Autoscaling on active streams: how many replicas the streams running now need (a Ray Serve policy, pure).

Ray Serve's default policy scales on ongoing requests; here one WebSocket is one request for its whole life, and
viewers and page loads are requests too. Streams are what occupy an engine, so every replica reports its streams
(``record_autoscaling_stats`` → ``{"streams": n}``) and :class:`StreamsPolicy` asks for
``ceil(total streams / target_streams_per_replica)`` replicas. Ray Serve applies ``min_replicas``/``max_replicas``,
``upscale_delay_s``/``downscale_delay_s`` and the scaling factors around it.

Pick ``target_streams_per_replica`` below ``max_streams`` so that the fleet grows while there is still room: a new
replica loads its model before it takes streams (a GPU replica: tens of seconds), and streams arriving meanwhile
need free slots. Scaling down never moves a stream: the replica Serve stops ends its streams with 1001 and their
clients reconnect to the others (docs/scaling.md) — keep ``downscale_delay_s`` long.

This module is pickled by value into the Serve controller: it imports nothing from streamdiff.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["StreamsPolicy", "desired_replicas"]

METRIC = "streams"


def desired_replicas(streams: float, target_streams_per_replica: float, current: int) -> int:
    """Replicas for ``streams`` running streams at ``target_streams_per_replica`` each (never fewer than 1 while
    streams run; ``current`` when nothing is known)."""
    if streams < 0 or math.isnan(streams):
        return current
    return math.ceil(streams / target_streams_per_replica) if streams else 0


class StreamsPolicy:
    """A Ray Serve autoscaling policy (``AutoscalingPolicy(policy_function=StreamsPolicy, policy_kwargs=...)``)."""

    def __init__(self, target_streams_per_replica: float = 4.0) -> None:
        if not isinstance(target_streams_per_replica, (int, float)) or not target_streams_per_replica > 0:
            raise ValueError(f"target_streams_per_replica={target_streams_per_replica!r} must be a number > 0")
        self.target = float(target_streams_per_replica)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        per_replica = metrics.get(METRIC)
        if not per_replica:  # no report yet (replicas starting): keep the current target
            return ctx.target_num_replicas, {}
        total = float(sum(per_replica.values()))
        return desired_replicas(total, self.target, ctx.current_num_replicas), {"streams": total}
