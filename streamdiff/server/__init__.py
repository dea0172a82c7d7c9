"""``streamdiff serve``: the I/O shell around the sans-I/O protocol (:mod:`streamdiff.protocol`, docs/protocol.md).

- :mod:`.hub`: :class:`ServerConfig` and :class:`Hub` (the engine, the codec threads, metrics, who is streaming);
- :mod:`.session` and :mod:`.viewing`: :class:`StreamSession` and :class:`ViewerSession`, one per socket, written
  against the :class:`~.transport.Transport` seam (:mod:`.transport`), so any WebSocket library can drive them;
- :mod:`.pacing`: latest-wins slots and time limits; :mod:`.metrics`: Prometheus; :mod:`.routes`: the HTTP side;
- :mod:`.asgi`: :class:`~.asgi.ServerApp`, every route in one ASGI application (the same under Ray Serve);
- :mod:`.app`: :class:`StreamServer`, that application on an aiohttp host (:mod:`.aiohttp_app`), and
  :class:`BackgroundServer`, the same in a thread;
- ``web/``: the browser page (``index.html``) and the view-only page for OBS (``view.html``), static files.

Importing this package needs neither ``aiohttp`` nor ``websockets`` nor a model (they load when a server starts).
"""

from __future__ import annotations

from pathlib import Path

from .app import BackgroundServer, StreamServer
from .hub import Hub, ServerConfig
from ..protocol.policy import OriginPolicy
from .session import StreamSession
from .transport import Transport, TransportClosed
from .viewing import ViewerSession

#: The static files of the browser page and the viewer.
WEB_DIR = Path(__file__).with_name("web")

__all__ = [
    "WEB_DIR",
    "BackgroundServer",
    "Hub",
    "OriginPolicy",
    "ServerConfig",
    "StreamServer",
    "StreamSession",
    "Transport",
    "TransportClosed",
    "ViewerSession",
]
