"""``streamdiff serve``: a WebSocket endpoint streaming video through the engine (docs/protocol.md).

The protocol is sans I/O, in layers that need neither sockets nor the engine:

- :mod:`.wire`: error and close codes, binary frame headers, strict JSON;
- :mod:`.images`: probe / decode / encode of the JPEG and WebP frames, with limits checked before decoding;
- :mod:`.limits`: :class:`ServerLimits`, every per-client bound with a safe default;
- :mod:`.settings`: JSON settings <-> StreamConfig / PromptConfig / OutputConfig, validated by streamdiff itself;
- :mod:`.policy`: the input rate limiter and the error budget (injected clock), origins, tokens;
- :mod:`.protocol`: :class:`ServerConnection`, bytes/str in, events out;
- :mod:`.viewer`: :class:`ViewerConnection`, the view-only socket;
- :mod:`.client_protocol`: :class:`ClientConnection`, the client's side;
- ``web/``: the browser page (``index.html``) and the view-only page for OBS (``view.html``), static files.

On top of it, the server (``streamdiff serve``):

- :mod:`.hub`: :class:`ServerConfig` and :class:`Hub` (the engine, the codec threads, metrics, who is streaming);
- :mod:`.session` and :mod:`.viewing`: :class:`StreamSession` and :class:`ViewerSession`, one per socket, written
  against the :class:`~.transport.Transport` seam (:mod:`.transport`), so any WebSocket library can drive them;
- :mod:`.pacing`: latest-wins slots and time limits; :mod:`.metrics`: Prometheus; :mod:`.routes`: the HTTP side;
- :mod:`.app`: :class:`StreamServer` on ``aiohttp``, every route on one HTTP/WebSocket stack (:mod:`.aiohttp_app`),
  and :class:`BackgroundServer`, the same in a thread.

Importing this package needs neither ``aiohttp`` nor ``websockets`` nor a model (they load when a server starts).
"""

from __future__ import annotations

from pathlib import Path

from .app import BackgroundServer, StreamServer
from .client_protocol import Ack, ClientConnection, OutputFrame, Ready, ServerError
from .hub import Hub, ServerConfig
from .images import ImageFormat, ImageInfo, decode, encode, probe
from .limits import ServerLimits
from .policy import OriginPolicy
from .protocol import (
    Close,
    ConnectionState,
    Event,
    Frame,
    Hello,
    Send,
    ServerConnection,
    Update,
)
from .session import StreamSession
from .settings import OutputConfig, StreamSettings, apply_settings
from .transport import Transport, TransportClosed
from .viewer import ViewerConnection
from .viewing import ViewerSession
from .wire import PROTOCOL_VERSION, CloseCode, ErrorCode, ServerTimings

#: The static files of the browser page and the viewer.
WEB_DIR = Path(__file__).with_name("web")

__all__ = [
    "PROTOCOL_VERSION",
    "WEB_DIR",
    "Ack",
    "BackgroundServer",
    "Hub",
    "OriginPolicy",
    "ServerConfig",
    "StreamServer",
    "StreamSession",
    "Transport",
    "TransportClosed",
    "ViewerSession",
    "ClientConnection",
    "Close",
    "CloseCode",
    "ConnectionState",
    "ErrorCode",
    "Event",
    "Frame",
    "Hello",
    "ImageFormat",
    "ImageInfo",
    "OutputConfig",
    "OutputFrame",
    "Ready",
    "Send",
    "ServerConnection",
    "ServerError",
    "ServerLimits",
    "ServerTimings",
    "StreamSettings",
    "Update",
    "ViewerConnection",
    "apply_settings",
    "decode",
    "encode",
    "probe",
]
