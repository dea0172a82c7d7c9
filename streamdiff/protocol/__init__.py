"""The streamdiff protocol, sans I/O and transport-agnostic (docs/protocol.md): bytes and JSON in, events out.

Nothing here opens a socket, starts a thread or touches the engine; the server (:mod:`streamdiff.server`), the
Python client (:mod:`streamdiff.client`) and the Ray replica (:mod:`streamdiff.deploy`) drive it.

- :mod:`.wire`: error and close codes, binary frame headers, strict JSON;
- :mod:`.images`: probe / decode / encode of the JPEG and WebP frames, with limits checked before decoding
  (:mod:`.image_structure`: the linear-time structure walk that refuses hostile files);
- :mod:`.limits`: :class:`ServerLimits`, every per-client bound with a safe default;
- :mod:`.settings`: JSON settings <-> StreamConfig / PromptConfig / OutputConfig, validated by streamdiff itself;
- :mod:`.versions`: which settings version made an output;
- :mod:`.session`: :class:`ServerConnection`, the stream session's state machine (hello → ready → frames/updates →
  close), written once for every transport;
- :mod:`.viewer`: :class:`ViewerConnection`, the view-only socket;
- :mod:`.client`: :class:`ClientConnection`, the client's side.
"""

from __future__ import annotations

from .client import Ack, ClientConnection, OutputFrame, Ready, ServerError
from .images import ImageFormat, ImageInfo, decode, encode, probe
from .limits import ServerLimits
from .session import Close, ConnectionState, Event, Frame, Hello, Send, ServerConnection, Update
from .settings import OutputConfig, StreamSettings, apply_settings
from .viewer import ViewerConnection
from .wire import PROTOCOL_VERSION, CloseCode, ErrorCode, ServerTimings

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
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
