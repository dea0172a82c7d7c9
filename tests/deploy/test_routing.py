"""The fleet's routing policy without Ray: affinity, least-loaded admission with room, viewers, pinned requests."""

from __future__ import annotations

import random

import pytest

from streamdiff.deploy.routing import (ReplicaLoad, RequestKind, StreamRequest, classify, rank_replicas,
                                       replica_of_resource, resource_prefix,
                                       replica_of_stream, stream_id_prefix, view_key)

SECRET = b"k" * 16


def loads(*streams: int, max_streams: int = 2, views: dict[int, str] | None = None) -> list[ReplicaLoad]:
    views = views or {}
    return [ReplicaLoad(key=f"r{i}", tag=f"tag{i}", streams=n, max_streams=max_streams,
                        view_keys=frozenset({view_key(SECRET, views[i])} if i in views else ()))
            for i, n in enumerate(streams)]


def rank(request: StreamRequest, replicas: list[ReplicaLoad], seed: int = 0) -> list[list[str]]:
    return rank_replicas(request, replicas, secret=SECRET, rng=random.Random(seed))


def test_stream_ids_name_their_replica() -> None:
    assert replica_of_stream(stream_id_prefix("ab12cd34") + "0f0f0f0f") == "ab12cd34"
    for other in (None, "", "st-", "st-abc", "st-abc-", "view-abc-1", "st--12"):
        assert replica_of_stream(other) is None


def test_a_new_stream_goes_to_the_replica_with_the_most_room_full_ones_last() -> None:
    new = StreamRequest(RequestKind.STREAM)
    assert rank(new, loads(1, 0, 2)) == [["r1"], ["r0"], ["r2"]]
    assert rank(new, loads(2, 2)) in ([["r0"], ["r1"]], [["r1"], ["r0"]])  # full: still reaches one (→ 1013)
    tie = rank(new, loads(0, 0, 1))
    assert sorted(tie[0]) == ["r0", "r1"] and tie[1:] == [["r2"]]  # equal room: one group, Serve picks


def test_every_replica_appears_exactly_once() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        replicas = loads(*(rng.randrange(4) for _ in range(5)), max_streams=3)
        for request in (StreamRequest(RequestKind.STREAM), StreamRequest(RequestKind.STREAM, session="st-tag3-1"),
                        StreamRequest(RequestKind.OTHER), StreamRequest(RequestKind.VIEWER, view_token="x" * 16)):
            flat = [key for group in rank(request, replicas, seed) for key in group]
            assert sorted(flat) == sorted(r.key for r in replicas)


def test_a_session_goes_back_to_its_replica_while_it_lives_even_when_it_looks_full() -> None:
    back = StreamRequest(RequestKind.STREAM, session="st-tag2-00ff00ff")
    assert rank(back, loads(0, 0, 1))[0] == ["r2"]
    assert rank(back, loads(0, 0, 2))[0] == ["r2"]  # the router's view lags: the replica answers (1013 if full)
    gone = StreamRequest(RequestKind.STREAM, session="st-tag9-00ff00ff")
    assert rank(gone, loads(2, 0, 1)) == [["r1"], ["r2"], ["r0"]]


def test_a_viewer_goes_to_the_replica_with_its_view_token() -> None:
    token = "Qk3vX9mT2pLr8sWa"
    viewer = StreamRequest(RequestKind.VIEWER, view_token=token)
    assert rank(viewer, loads(0, 2, 1, views={2: token}))[0] == ["r2"]
    assert view_key(SECRET, token) != view_key(b"other", token)  # keyed: the token never leaves the replica
    assert token not in view_key(SECRET, token)


def test_a_whip_resource_names_its_replica() -> None:
    assert replica_of_resource(resource_prefix("tag1") + "xyz-_abc") == "tag1"
    assert replica_of_resource("r--x") is None and replica_of_resource("xyz") is None
    resource = classify("http", "/whip/" + resource_prefix("tag1") + "abc")
    assert rank(resource, loads(0, 2, 0))[0] == ["r1"]


def test_a_pinned_plain_request_goes_to_its_replica() -> None:
    assert rank(StreamRequest(RequestKind.OTHER, replica="tag1"), loads(0, 2, 0))[0] == ["r1"]


@pytest.mark.parametrize(("kind", "path", "headers", "expected"), [
    ("websocket", "/ws", [], StreamRequest(RequestKind.STREAM)),
    ("websocket", "/ws", [(b"x-session-id", b"st-a-1")], StreamRequest(RequestKind.STREAM, session="st-a-1")),
    ("websocket", "/ws", [(b"X_Session_Id", b"st-a-1")], StreamRequest(RequestKind.STREAM, session="st-a-1")),
    ("websocket", "/ws/view/tok", [], StreamRequest(RequestKind.VIEWER, view_token="tok")),
    ("http", "/metrics", [(b"x-streamdiff-replica", b"t1")], StreamRequest(RequestKind.OTHER, replica="t1")),
    ("http", "/ws", [(b"x-session-id", b"st-a-1")], StreamRequest(RequestKind.OTHER)),
    ("http", "/whip", [], StreamRequest(RequestKind.STREAM, http=True)),
    ("http", "/whip/r-t1-Abc_d-e", [], StreamRequest(RequestKind.OTHER, replica="t1")),
    ("http", "/whip/r-t1-Abc/update", [], StreamRequest(RequestKind.OTHER, replica="t1")),
    ("http", "/whip/not-a-resource", [], StreamRequest(RequestKind.OTHER)),
    ("http", "/whep/tok", [], StreamRequest(RequestKind.VIEWER, view_token="tok")),
    ("http", "/whep/tok/r-t2-x", [], StreamRequest(RequestKind.VIEWER, view_token="tok")),
])
def test_classify(kind: str, path: str, headers: list, expected: StreamRequest) -> None:
    assert classify(kind, path, headers) == expected
