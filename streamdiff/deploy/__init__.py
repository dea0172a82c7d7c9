"""Scale-out on Ray Serve: many engines on many GPUs and machines behind one endpoint (docs/scaling.md).

Thin: every replica runs the same engine and the same protocol implementation as ``streamdiff serve``; this package
only adds what a fleet needs. The data path: client → Ray Serve's HTTP proxy → :mod:`.router` (which replica) →
:mod:`.replica` (the server's one ASGI application, :class:`~streamdiff.server.asgi.ServerApp`, as Serve's ingress:
the same :class:`~streamdiff.server.session.StreamSession`) → the replica's :class:`~streamdiff.engine.StreamEngine`.

=====================  ==========================================================================================
:mod:`.routing`        pure policy: stream affinity, least-loaded admission, viewers (no Ray)
:mod:`.router`         the Ray Serve request router around it
:mod:`.replica`        the deployment: one engine, the server's Hub and sessions, routing/autoscaling reports
:mod:`.autoscale`      the autoscaling policy on active streams (pure)
:mod:`.config`         FleetConfig (replicas, autoscaling, resources) and ReplicaSpec (``streamdiff serve`` options)
:mod:`.app`            build_app, and ``app``: the builder of ``serve run streamdiff.deploy:app key=value…``
:mod:`.launch`         deploy / drain / shutdown from Python (``streamdiff serve --ray``)
:mod:`.control`        the drain flag in Ray's key-value store
=====================  ==========================================================================================

Needs the ``ray`` extra: ``pip install 'streamdiff[ray]'``.
"""

from __future__ import annotations

from .app import app, build_app
from .config import FleetConfig, ReplicaSpec

__all__ = ["FleetConfig", "ReplicaSpec", "app", "build_app"]
