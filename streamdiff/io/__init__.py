"""Frame sources and sinks, and fitting frames to a size.

``open_source("testpattern" | "webcam:0" | "file:clip.mp4" | "folder:frames/" | "screen:1")`` and
``open_sink("window" | "file:out.mp4" | "folder:out/" | "virtualcam" | "null")``.
"""

from __future__ import annotations

from ..config import parse_size
from ..core.image import fit_frame
from .screen import ScreenSource
from .sinks import (
    FolderSink,
    NullSink,
    VideoFileSink,
    VirtualCamSink,
    WindowKey,
    WindowSink,
    draw_overlay,
    no_virtualcam_help,
    open_sink,
)
from .pacing import Pacer
from .sources import (
    CameraInfo,
    FolderSource,
    TestPatternSource,
    VideoFileSource,
    WebcamSource,
    list_webcams,
    open_source,
    pattern_frame,
)

__all__ = [
    "CameraInfo",
    "FolderSink",
    "FolderSource",
    "NullSink",
    "Pacer",
    "ScreenSource",
    "TestPatternSource",
    "VideoFileSink",
    "VideoFileSource",
    "VirtualCamSink",
    "WebcamSource",
    "WindowKey",
    "WindowSink",
    "draw_overlay",
    "fit_frame",
    "list_webcams",
    "no_virtualcam_help",
    "open_sink",
    "open_source",
    "parse_size",
    "pattern_frame",
]
