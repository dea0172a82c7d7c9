"""Which replica a new socket goes to: stream affinity, admission and viewers, as pure policy (no Ray here).

Every replica owns one engine and admits up to ``max_streams`` streams. The router in front of them
(:mod:`.router`, a Ray Serve request router) knows, per replica, what the replica last reported (streams, capacity,
the keys of its view tokens) and what it routed itself since; :func:`rank_replicas` turns that and one request into
ranked groups of replicas, best first:

- a **stream socket with a session** (the ``X-Session-Id`` header: the ``stream_id`` of the client's previous
  stream) goes back to the replica that issued that id — stream ids name their replica (``st-<replica>-<hex>``) —
  while that replica lives, whatever the router believes its load to be (the router's view lags; the replica
  knows): a full one answers 1013, and the client then tries again without the session (:mod:`streamdiff.client.reconnect`);
- a **new stream socket** (or a session whose replica is gone) goes to the replica with the most free
  stream slots (ties: the group is left to Ray Serve, which picks the one with the shortest queue); full replicas
  come last, so that when every replica is full the socket still reaches one, and its hello is answered with
  ``server_full`` and close code 1013 at once;
- a **viewer socket** (``/ws/view/<token>``) goes to the replica whose stream has that view token (replicas
  report keyed hashes of their view tokens, never the tokens); unknown: anywhere (the viewer is told
  ``unknown_view_token`` and its page retries);
- **WebRTC signalling** (plain HTTP): a WHIP ``POST /whip`` is a new stream (the replica with the most free slots;
  the replica answers 503 when full); the WHIP resource's ``DELETE`` and ``POST …/update`` go to the replica named in
  the resource id (``/whip/r-<replica>-<random>``: the id the replica issued, as a stream id names its replica); a
  WHEP ``POST /whep/<token>`` (and its resource's ``DELETE``) goes where a viewer socket of that token would;
- anything else (pages, ``/metrics``, ``/healthz``) is spread like new streams, without reserving a slot — or,
  with the header ``X-Streamdiff-Replica: <tag>``, sent to that replica (every reply names its replica in the same
  header: how to read one replica's ``/metrics`` through the fleet's endpoint).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from ..protocol.wire import SESSION_HEADER, VIEW_SOCKET_PREFIX, WHEP_PREFIX, WHIP_PATH

__all__ = ["ReplicaLoad", "RequestKind", "StreamRequest", "classify", "rank_replicas", "replica_of_resource",
           "replica_of_stream", "resource_prefix", "stream_id_prefix", "view_key"]

REPLICA_HEADER = "x-streamdiff-replica"


class RequestKind(enum.Enum):
    STREAM = "stream"  # a stream socket (/ws): takes a stream slot once its hello is admitted
    VIEWER = "viewer"  # a view-only socket (/ws/view/<token>)
    OTHER = "other"  # plain HTTP: pages, /healthz, /readyz, /metrics


@dataclass(frozen=True)
class StreamRequest:
    """What the router knows about one request."""

    kind: RequestKind = RequestKind.OTHER
    session: str | None = None  # the X-Session-Id header: a previous stream id
    view_token: str | None = None  # viewer sockets only; a secret: hash it with view_key(), never log it
    replica: str | None = None  # plain HTTP only: the X-Streamdiff-Replica header (a replica's tag)
    http: bool = False  # a STREAM made by plain HTTP (WHIP's POST /whip), not a socket


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the router sees it. ``key`` is whatever the caller uses to name replicas."""

    key: Hashable
    tag: str  # the replica's id, the middle of its stream ids
    streams: int = 0  # streams running or reserved
    max_streams: int = 1
    view_keys: frozenset[str] = field(default_factory=frozenset)

    @property
    def free(self) -> int:
        return max(0, self.max_streams - self.streams)


def stream_id_prefix(tag: str) -> str:
    """The beginning of every stream id a replica issues: ``st-<tag>-`` (a tag has no ``-``)."""
    return f"st-{tag}-"


def replica_of_stream(stream_id: str | None) -> str | None:
    """The tag of the replica that issued ``stream_id`` (``st-<tag>-<hex>``); None for other ids."""
    if not stream_id or not stream_id.startswith("st-"):
        return None
    tag, sep, rest = stream_id[3:].partition("-")
    return tag if sep and tag and rest else None


def resource_prefix(tag: str) -> str:
    """The beginning of every WHIP/WHEP resource id a replica issues: ``r-<tag>-``."""
    return f"r-{tag}-"


def replica_of_resource(resource: str | None) -> str | None:
    """The tag of the replica that issued the resource id ``resource`` (``r-<tag>-<random>``); None for others."""
    if not resource or not resource.startswith("r-"):
        return None
    tag, sep, rest = resource[2:].partition("-")
    return tag if sep and tag and rest else None


def view_key(secret: bytes, view_token: str) -> str:
    """A keyed hash of a view token: replicas report these, so the tokens themselves never leave the replica."""
    return hmac.new(secret, view_token.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


def classify(scope_type: str, path: str, headers: Sequence[tuple[bytes, bytes]] = (),
             session: str | None = None) -> StreamRequest:
    """The :class:`StreamRequest` of an ASGI request (its scope's type, path and headers)."""
    if scope_type != "websocket":
        if path == WHIP_PATH:
            return StreamRequest(RequestKind.STREAM, http=True)
        if path.startswith(WHIP_PATH + "/"):
            resource = path[len(WHIP_PATH) + 1:].split("/")[0]
            return StreamRequest(RequestKind.OTHER, replica=replica_of_resource(resource))
        if path.startswith(WHEP_PREFIX):
            return StreamRequest(RequestKind.VIEWER, view_token=path[len(WHEP_PREFIX):].split("/")[0] or None)
        return StreamRequest(RequestKind.OTHER, replica=_header(headers, REPLICA_HEADER))
    if path.startswith(VIEW_SOCKET_PREFIX):
        return StreamRequest(RequestKind.VIEWER, view_token=path[len(VIEW_SOCKET_PREFIX):] or None)
    return StreamRequest(RequestKind.STREAM, session=session or _header(headers, SESSION_HEADER))


def _header(headers: Sequence[tuple[bytes, bytes]], wanted: str) -> str | None:
    for name, value in headers:
        if name.decode("latin-1").lower().replace("_", "-") == wanted:
            return value.decode("latin-1") or None
    return None


def rank_replicas(request: StreamRequest, replicas: Sequence[ReplicaLoad], *, secret: bytes = b"",
                  rng: random.Random | None = None) -> list[list[Hashable]]:
    """Ranked groups of replica keys for ``request``, best first (see the module docstring); every replica appears
    exactly once, so a request is never refused by the router itself."""
    if not replicas:
        return []
    rng = rng or random.Random()
    first: list[ReplicaLoad] = []
    if request.kind is RequestKind.VIEWER and request.view_token:
        wanted = view_key(secret, request.view_token)
        first = [r for r in replicas if wanted in r.view_keys]
    elif request.kind is RequestKind.STREAM:
        tag = replica_of_stream(request.session)
        first = [r for r in replicas if tag is not None and r.tag == tag]
    elif request.replica is not None:
        first = [r for r in replicas if r.tag == request.replica]
    rest = [r for r in replicas if r not in first]
    ranks = [[r.key for r in first]] if first else []
    room = sorted({r.free for r in rest if r.free > 0}, reverse=True)
    for free in room:  # most free slots first; equal ones in one group, shuffled
        group = [r.key for r in rest if r.free == free]
        rng.shuffle(group)
        ranks.append(group)
    full = sorted((r for r in rest if r.free == 0), key=lambda r: (r.streams - r.max_streams, rng.random()))
    ranks.extend([r.key] for r in full)
    return ranks
