"""streamdiff's exception hierarchy.

::

    StreamDiffError                 base of everything streamdiff raises on purpose
    ├── ConfigError                 an invalid setting; the message names the value and what is allowed
    ├── ModelLoadError              a model, VAE or LoRA could not be found or loaded
    ├── BackendUnavailable          an optional backend / extra is not installed or has no device
    ├── EngineBuildError            exporting or building a compiled engine failed
    ├── FrameError                  an input frame has the wrong shape, dtype or value range
    ├── SourceError                 a frame source (webcam, file, folder) cannot be opened or read
    ├── SinkError                   a frame sink (window, file, virtual camera) cannot be opened or written
    ├── ProtocolError               a network client sent something the protocol does not allow
    ├── EngineFull                  the engine already serves max_streams streams (try again later)
    └── StreamClosed                the stream was closed or failed; it takes no more frames or changes

``ConfigError`` is also a ``ValueError`` and ``FrameError`` a ``ValueError`` so that generic callers keep working.
"""

from __future__ import annotations


class StreamDiffError(Exception):
    """Base class of every error streamdiff raises on purpose."""


class ConfigError(StreamDiffError, ValueError):
    """An invalid setting. The message names the offending value and what is allowed."""


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
    """A network peer broke the wire protocol."""


def missing_extra(module: str, extra: str) -> BackendUnavailable:
    """The error to raise when an optional dependency is missing: names the pip extra that installs it."""
    return BackendUnavailable(
        f"optional dependency {module!r} is not installed; install it with: pip install 'streamdiff[{extra}]'"
    )


class EngineFull(StreamDiffError):
    """The engine already serves its ``max_streams`` streams; close one or try again later."""


class StreamClosed(StreamDiffError):
    """The stream was closed (or ended with an error): it takes no more frames or changes."""
