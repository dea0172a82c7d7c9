"""``streamdiff serve``: a WebSocket endpoint streaming video through the engine (docs/protocol.md).

The protocol is sans I/O, in layers that need neither sockets nor the engine:

- :mod:`.wire`: error and close codes, binary frame headers, strict JSON;
- :mod:`.images`: probe / decode / encode of the JPEG and WebP frames, with limits checked before decoding;
- :mod:`.limits`: :class:`ServerLimits`, every per-client bound with a safe default;
- :mod:`.settings`: JSON settings <-> StreamConfig / PromptConfig / OutputConfig, validated by streamdiff itself.

Importing this package needs neither ``websockets`` nor a model.
"""

from __future__ import annotations

from .images import ImageFormat, ImageInfo, decode, encode, probe
from .limits import ServerLimits
from .settings import OutputConfig, StreamSettings, apply_settings
from .wire import PROTOCOL_VERSION, CloseCode, ErrorCode, ServerTimings

__all__ = [
    "PROTOCOL_VERSION",
    "CloseCode",
    "ErrorCode",
    "ImageFormat",
    "ImageInfo",
    "OutputConfig",
    "ServerLimits",
    "ServerTimings",
    "StreamSettings",
    "apply_settings",
    "decode",
    "encode",
    "probe",
]
