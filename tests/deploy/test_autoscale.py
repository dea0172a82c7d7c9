"""The autoscaling policy on active streams, and the fleet's configuration checks (no Ray needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from streamdiff.deploy.autoscale import StreamsPolicy, desired_replicas
from streamdiff.deploy.config import FleetConfig, ReplicaSpec
from streamdiff.errors import ConfigError


def ctx(per_replica: dict[str, float] | None, current: int = 2, target: int = 2) -> SimpleNamespace:
    metrics = None if per_replica is None else {"streams": per_replica}
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=current, target_num_replicas=target)


@pytest.mark.parametrize(("streams", "target", "expected"), [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (9, 3, 3),
                                                              (10, 3, 4), (7, 2.5, 3)])
def test_replicas_for_the_streams_running(streams: float, target: float, expected: int) -> None:
    assert desired_replicas(streams, target, current=2) == expected


def test_the_policy_sums_every_replicas_streams_and_waits_for_reports() -> None:
    policy = StreamsPolicy(target_streams_per_replica=3)
    assert policy(ctx({"a": 3.0, "b": 3.0, "c": 1.0}))[0] == 3
    assert policy(ctx({"a": 0.0, "b": 1.0}))[0] == 1
    assert policy(ctx(None, target=5))[0] == 5  # nothing reported yet (replicas starting): keep the target
    assert policy(ctx({}, target=4))[0] == 4
    with pytest.raises(ValueError, match="target_streams_per_replica"):
        StreamsPolicy(0)


def test_fleet_config_checks() -> None:
    assert not FleetConfig().autoscaling and FleetConfig(min_replicas=1, max_replicas=4).autoscaling
    for bad, message in (
        ({"num_replicas": 0}, "num_replicas=0 must be >= 1"),
        ({"max_replicas": 1, "min_replicas": 2}, "max_replicas=1 is below min_replicas=2"),
        ({"num_gpus": -1}, "num_gpus=-1 must be >= 0"),
        ({"routing_stats_period_s": 0}, "routing_stats_period_s=0 must be > 0"),
        ({"target_streams_per_replica": 0}, "target_streams_per_replica=0 must be > 0"),
        ({"route_prefix": "ws"}, "route_prefix='ws' must start with '/'"),
        ({"num_replicas": True}, "num_replicas=True must be an integer >= 1, not bool"),
        ({"graceful_shutdown_timeout_s": float("nan")}, "graceful_shutdown_timeout_s=nan must be a finite number"),
    ):
        with pytest.raises(ConfigError) as raised:
            FleetConfig(**bad)
        assert str(raised.value) == message
    with pytest.raises(ConfigError, match=r"^torch_threads=-1 must be >= 0$"):
        ReplicaSpec({}, torch_threads=-1)
    with pytest.raises(ConfigError, match="hexadecimal"):
        ReplicaSpec({}, view_secret="not hex")
