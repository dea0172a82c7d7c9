"""streamdiff's exception hierarchy.

::

    StreamDiffError                 base of everything streamdiff raises on purpose
    ├── ConfigError                 an invalid setting; the message names the value and what is allowed
    ├── ModelLoadError              a model, VAE or LoRA could not be found or loaded
    ├── BackendUnavailable          an optional backend / extra is not installed or has no device
    ├── EngineBuildError            exporting or building a compiled engine failed
    ├── FrameError                  an input frame has the wrong shape, dtype or value range
    │   └── ImageError              an encoded image from a client is corrupt (also a ProtocolError)
    │       ├── UnsupportedImageFormat  not an allowed format (PNG, GIF, animated WebP, unknown bytes…)
    │       ├── ImageTooLarge           declares more pixels than allowed (found before decoding)
    │       ├── HostileImage            legal but built to be slow to decode (too many scans, segments…)
    │       └── DecodeTooSlow           its decode used more CPU time than a client's frame may
    ├── SourceError                 a frame source (webcam, file, folder) cannot be opened or read
    ├── SinkError                   a frame sink (window, file, virtual camera) cannot be opened or written
    ├── ProtocolError               a network client sent something the protocol does not allow
    ├── EngineFull                  the engine already serves max_streams streams (try again later)
    └── StreamClosed                the stream was closed or failed; it takes no more frames or changes

``ConfigError`` is also a ``ValueError`` and ``FrameError`` a ``ValueError`` so that generic callers keep working.
Every ``ProtocolError`` carries a stable ``code`` (the error codes of docs/protocol.md) and, when one part of a
message was wrong, its ``field``, ``value`` and what is ``allowed``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_UNSET: Any = object()


class StreamDiffError(Exception):
    """Base class of every error streamdiff raises on purpose."""


class ConfigError(StreamDiffError, ValueError):
    """An invalid setting. The message names the offending value and what is allowed.

    ``field`` names the setting (``"width"``, ``"t_index_list entry"``), ``value`` the value refused (check
    ``has_value``: ``None`` can be a value too) and ``allowed`` a short description of what is allowed, when the
    raiser knows them; callers that report errors to clients (the server) use these, never the message text.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = _UNSET,
                 allowed: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.has_value = value is not _UNSET
        self.value = None if value is _UNSET else value
        self.allowed = allowed


class ModelLoadError(StreamDiffError):
    """A model, VAE or LoRA could not be found or loaded; the message says what was tried."""


class BackendUnavailable(StreamDiffError):
    """A backend (or its device) is not available; the message names the extra to install."""


class EngineBuildError(StreamDiffError):
    """Export or build of a compiled engine failed."""


class FrameError(StreamDiffError, ValueError):
    """An input frame has the wrong shape, dtype or value range."""


class SourceError(StreamDiffError):
    """A frame source cannot be opened or read."""


class SinkError(StreamDiffError):
    """A frame sink cannot be opened or written."""


class ProtocolError(StreamDiffError):
    """A network peer broke the wire protocol.

    ``code`` is the stable machine-readable code sent to the peer; ``field`` names the offending part of a message
    (``"settings.width"``), ``value`` the value received (check ``has_value``: ``None`` is a JSON value too) and
    ``allowed`` a short description of what is allowed, when known. ``str(error)`` is the human-readable message.
    """

    code: str = "protocol_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        value: Any = _UNSET,
        allowed: str | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.field = field
        self.has_value = value is not _UNSET
        self.value = None if value is _UNSET else value
        self.allowed = allowed


class ImageError(FrameError, ProtocolError):
    """An encoded image sent by a client is truncated, corrupt or inconsistent (code ``bad_image``)."""

    code = "bad_image"


class UnsupportedImageFormat(ImageError):
    """An encoded image is not in an allowed format: the message names what it is (code ``unsupported_format``)."""

    code = "unsupported_format"


class ImageTooLarge(ImageError):
    """An encoded image declares more pixels than allowed; found from its header, before any decoding."""

    code = "image_too_large"


class HostileImage(ImageError):
    """An encoded image is legal but built to cost the decoder far more than its pixels: more scans, segments,
    fill bytes or chunks than any real encoder writes (code ``hostile_image``); found before decoding."""

    code = "hostile_image"


class DecodeTooSlow(ImageError):
    """Decoding a client's image used more CPU time than one frame, or that client's share, may (code
    ``decode_too_slow``); the decode is stopped there."""

    code = "decode_too_slow"


def missing_extra(module: str, extra: str) -> BackendUnavailable:
    """The error to raise when an optional dependency is missing: names the pip extra that installs it."""
    return BackendUnavailable(
        f"optional dependency {module!r} is not installed; install it with: pip install 'streamdiff[{extra}]'"
    )


def import_extra(module: str, extra: str) -> ModuleType:
    """``import module``, or :func:`missing_extra`'s error naming the pip ``extra`` that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(module, extra) from None


class EngineFull(StreamDiffError):
    """The engine already serves its ``max_streams`` streams; close one or try again later."""


class StreamClosed(StreamDiffError):
    """The stream was closed (or ended with an error): it takes no more frames or changes."""
