"""The Ray Serve request router of the stream replicas: :func:`~.routing.rank_replicas` over live replica loads.

Ray Serve calls :meth:`StreamRouter.choose_replicas` for every request its HTTP proxy forwards to the deployment
(one WebSocket is one request, for its whole life). The load of a replica is what it last reported through
``record_routing_stats`` (capacity, view-token keys, and the Serve request ids of its admitted stream sockets),
merged with what this router saw itself: a socket it sent there counts from the moment it is routed until it
ends, whether or not the (possibly old) report has it; a reported socket this router saw end no longer counts.
So one proxy's view is exact, and a burst of connections spreads before any report (a WHIP ``POST /whip`` counts
from its routing until two report periods after its answer, by when its replica reports the stream it made); other proxies' streams (one
proxy per node) count from their replica's next report until the one after they end. Nothing here blocks or
talks to a replica.

Configured by :func:`~.app.build_app` (``RequestRouterConfig(request_router_class=StreamRouter, ...)``).
"""

from __future__ import annotations

import collections
import logging
import pickle
import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .routing import ReplicaLoad, RequestKind, StreamRequest, classify, rank_replicas

__all__ = ["StreamRouter", "request_of"]

logger = logging.getLogger(__name__)

FORGET_S = 120.0  # an ended socket is forgotten this long after (every replica has reported since)


def request_of(pending: PendingRequest | None) -> StreamRequest:
    """What kind of request ``pending`` is, read from the ASGI scope the proxy sends (OTHER when unreadable)."""
    if pending is None:
        return StreamRequest()
    session = getattr(pending.metadata, "session_id", "") or None
    scope = None
    if pending.args and isinstance(pending.args[0], (bytes, bytearray)):
        try:  # the proxy's own pickle of its StreamingHTTPRequest (the replica unpickles the same bytes)
            request = pickle.loads(pending.args[0])
            scope = getattr(request, "asgi_scope", None) or getattr(request, "_asgi_scope", None)
        except Exception:  # noqa: BLE001 - a request we cannot read is routed as OTHER
            scope = None
    if not isinstance(scope, dict):
        return StreamRequest(RequestKind.OTHER, session=session)
    return classify(str(scope.get("type", "")), str(scope.get("path", "")), scope.get("headers") or (), session)


class StreamRouter(RequestRouter):
    """Stream affinity, least-loaded admission and viewer routing (see :mod:`.routing`).

    ``request_router_kwargs``: ``view_secret`` (hex, the key of the view-token hashes, shared with the replicas) and
    ``max_streams`` (per replica, until a replica reports its own).
    """

    def initialize_state(self, view_secret: str = "", max_streams: int = 1, stats_period_s: float = 1.0,
                         **kwargs: Any) -> None:
        self._secret = bytes.fromhex(view_secret)
        self._max_streams = int(max_streams)
        self._grace_s = 2 * float(stats_period_s) + 1.0  # a WHIP stream shows in its replica's reports by then
        self._rng = random.Random()
        self._open: dict[str, ReplicaID] = {}  # internal request id -> replica, for open stream sockets
        self._http: set[str] = set()  # those of them that are WHIP requests (plain HTTP, not sockets)
        self._published: dict[str, tuple[ReplicaID, float]] = {}  # answered WHIP request id -> replica, when
        self._ended: collections.OrderedDict[str, float] = collections.OrderedDict()  # ended request id -> when

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request = request_of(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = [self._load(r) for r in candidate_replicas]
        ranks = rank_replicas(request, loads, secret=self._secret, rng=self._rng)
        return [[by_id[key] for key in group] for group in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = request_of(pending_request)
        if request.kind is RequestKind.STREAM:
            self._open[pending_request.metadata.internal_request_id] = replica_id
            if request.http:
                self._http.add(pending_request.metadata.internal_request_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._open.pop(internal_request_id, None) is not None:
            now = time.monotonic()
            if internal_request_id in self._http:  # a WHIP POST answered: its stream (if admitted) goes on there
                self._http.discard(internal_request_id)
                self._published[internal_request_id] = (replica_id, now)
            self._ended[internal_request_id] = now
            while self._ended and next(iter(self._ended.values())) < now - FORGET_S:
                self._ended.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for request_id in [k for k, r in self._open.items() if r == replica_id]:
            del self._open[request_id]
        for request_id in [k for k, (r, _) in self._published.items() if r == replica_id]:
            del self._published[request_id]

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        rid = replica.replica_id
        reported = {r for r in stats.get("requests", ()) if r not in self._ended}
        mine = {r for r, where in self._open.items() if where == rid}
        now = time.monotonic()
        for request_id, (where, when) in list(self._published.items()):
            if when < now - self._grace_s:  # the replica's reports count it now (as rtc:<stream id>)
                del self._published[request_id]
            elif where == rid:
                mine.add(request_id)
        return ReplicaLoad(key=rid, tag=rid.unique_id, streams=len(reported | mine),
                           max_streams=int(stats.get("max_streams", self._max_streams)),
                           view_keys=frozenset(stats.get("view_keys", ())))
