"""Frame sources: webcam, video file, image folder, screen (in :mod:`.screen`) and a deterministic test pattern.

Every source has ``open()`` (idempotent while open), ``read() -> uint8 RGB [H, W, 3] | None`` (None at the end)
and ``close()``, a ``name``, its ``fps`` (None when unknown) and ``realtime`` (True when frames arrive at their own
pace: a camera, or a file paced on request). Sources deliver frames at their native size; the runtime fits them to the engine size.
Build one from a spec with :func:`open_source`: ``testpattern``, ``webcam[:INDEX|PATH]``, ``file:clip.mp4``,
``folder:frames/``, ``screen[:MONITOR]`` (a bare existing path also works).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.image import pattern_frame
from ..errors import ConfigError, SourceError, missing_extra
from .pacing import Pacer

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SOURCE_KINDS = ("testpattern", "webcam", "file", "folder", "screen")


# -- test pattern -------------------------------------------------------------------------------------------------


class TestPatternSource:
    """The built-in deterministic source (the offline default). Unlimited unless ``frames`` is given."""

    __test__ = False  # not a pytest class

    def __init__(self, width: int = 256, height: int = 256, fps: float = 30.0, frames: int | None = None,
                 realtime: bool = False) -> None:
        self.width, self.height = width, height
        self.fps = fps
        self.frames = frames
        self.realtime = realtime
        self.name = f"testpattern {width}x{height}"
        self._index = 0
        self._pacer = Pacer(fps) if realtime else None

    def open(self) -> None:
        self._index = 0

    def read(self) -> np.ndarray | None:
        if self.frames is not None and self._index >= self.frames:
            return None
        if self._pacer is not None:
            self._pacer.wait()
        frame = pattern_frame(self._index, self.width, self.height)
        self._index += 1
        return frame

    def close(self) -> None:
        pass


# -- video file -----------------------------------------------------------------------------------------------------


class VideoFileSource:
    """Frames of a video file decoded with PyAV; ``realtime=True`` paces them at the file's frame rate."""

    def __init__(self, path: str | Path, realtime: bool = False) -> None:
        self.path = Path(path)
        self.realtime = realtime
        self.name = f"file {self.path}"
        self.fps: float | None = None
        self.frame_count: int | None = None
        self.size: tuple[int, int] | None = None
        self._container: Any = None
        self._frames: Any = None
        self._pacer: Pacer | None = None

    def open(self) -> None:
        """Open the file (a second call while open does nothing)."""
        if self._container is not None:
            return
        try:
            import av
        except ImportError:
            raise missing_extra("av", "cam") from None
        if not self.path.is_file():
            raise SourceError(f"video file {str(self.path)!r} does not exist")
        try:
            self._container = av.open(str(self.path))
            stream = self._container.streams.video[0]
        except (IndexError, av.error.FFmpegError, OSError) as error:
            raise SourceError(f"cannot read video file {str(self.path)!r}: {error}") from error
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else None
        self.frame_count = int(stream.frames) or None
        self.size = (stream.codec_context.width, stream.codec_context.height)
        self._frames = self._container.decode(stream)
        if self.realtime:
            self._pacer = Pacer(self.fps or 30.0)

    def read(self) -> np.ndarray | None:
        import av

        if self._frames is None:
            raise SourceError(f"video file {str(self.path)!r} is not open")
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except av.error.FFmpegError as error:
            raise SourceError(f"decoding {str(self.path)!r} failed: {error}") from error
        if self._pacer is not None:
            self._pacer.wait()
        return frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
            self._frames = None


# -- image folder -----------------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class FolderSource:
    """The images of a folder in natural name order (``frame2`` before ``frame10``) at a nominal ``fps``."""

    def __init__(self, path: str | Path, fps: float = 30.0, realtime: bool = False) -> None:
        self.path = Path(path)
        self.fps = fps
        self.realtime = realtime
        self.name = f"folder {self.path}"
        self.files: list[Path] = []
        self._index = 0
        self._pacer = Pacer(fps) if realtime else None

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"image folder {str(self.path)!r} does not exist or is not a folder")
        self.files = sorted((p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not self.files:
            raise SourceError(f"image folder {str(self.path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self._index = 0

    def read(self) -> np.ndarray | None:
        from PIL import Image, UnidentifiedImageError

        if self._index >= len(self.files):
            return None
        path = self.files[self._index]
        self._index += 1
        if self._pacer is not None:
            self._pacer.wait()
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as error:
            raise SourceError(f"cannot read image {str(path)!r}: {error}") from error

    def close(self) -> None:
        pass


# -- webcam -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraInfo:
    """A capture device: what to pass as ``webcam:DEVICE`` and a human name."""

    device: str
    name: str


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise missing_extra("cv2 (opencv-python)", "cam") from None
    return cv2


def list_webcams(probe: int = 8) -> list[CameraInfo]:
    """The capture devices found: ``/dev/video*`` with their names on Linux, else indices 0..probe−1 that open."""
    if sys.platform.startswith("linux"):
        found = []
        for path in sorted(glob.glob("/dev/video*"), key=lambda p: int(re.sub(r"\D", "", p) or 0)):
            name_file = Path("/sys/class/video4linux") / Path(path).name / "name"
            name = name_file.read_text().strip() if name_file.is_file() else "video device"
            found.append(CameraInfo(path, name))
        return found
    cv2 = _import_cv2()
    found = []
    for index in range(probe):
        capture = cv2.VideoCapture(index)
        try:
            if capture.isOpened():
                found.append(CameraInfo(str(index), f"camera {index}"))
        finally:
            capture.release()
    return found


def _device_arg(device: int | str) -> int | str:
    text = str(device)
    return int(text) if text.isdigit() else text


class WebcamSource:
    """A camera through OpenCV (``cv2.VideoCapture``): frames arrive at the camera's pace (``realtime``)."""

    realtime = True

    def __init__(self, device: int | str = 0, size: tuple[int, int] | None = None, fps: float | None = None) -> None:
        self.device = _device_arg(device)
        self.requested_size = size
        self.requested_fps = fps
        self.fps: float | None = fps
        self.size: tuple[int, int] | None = None
        self.name = f"webcam {self.device}"
        self._capture: Any = None

    def open(self) -> None:
        """Open the camera (a second call while open does nothing)."""
        if self._capture is not None:
            return
        cv2 = _import_cv2()
        if isinstance(self.device, str) and not os.path.exists(self.device):
            raise SourceError(self._cannot_open(f"{self.device} does not exist"))
        capture = cv2.VideoCapture(self.device)
        if not capture.isOpened():
            capture.release()
            raise SourceError(self._cannot_open("the device did not open"))
        if self.requested_size is not None:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.requested_size[0])
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.requested_size[1])
        if self.requested_fps is not None:
            capture.set(cv2.CAP_PROP_FPS, self.requested_fps)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a backlog
        self.size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self.fps = float(capture.get(cv2.CAP_PROP_FPS)) or self.requested_fps
        self._capture = capture
        logger.info("opened %s at %dx%d, %s fps", self.name, *self.size, self.fps)

    def _cannot_open(self, why: str) -> str:
        cameras = list_webcams()
        listing = ", ".join(f"{c.device} ({c.name})" for c in cameras) or "none found"
        return (
            f"cannot open webcam {self.device!r}: {why}. Available devices: {listing}. "
            f"List them with `streamdiff run --list-devices`; pick one with --source webcam:INDEX or webcam:PATH."
        )

    def read(self) -> np.ndarray | None:
        if self._capture is None:
            raise SourceError(f"webcam {self.device!r} is not open")
        ok, frame = self._capture.read()
        if not ok or frame is None:
            raise SourceError(f"webcam {self.device!r} stopped delivering frames (unplugged or in use?)")
        return frame[:, :, ::-1]  # BGR -> RGB (a view; the runtime copies when fitting)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


# -- specs ----------------------------------------------------------------------------------------------------------


def parse_spec(spec: str, kinds: tuple[str, ...]) -> tuple[str, str | None]:
    """``"kind[:target]"`` → (kind, target); a bare existing path becomes ``file``/``folder``."""
    kind, sep, target = spec.partition(":")
    kind = kind.strip().lower()
    if kind in kinds:
        return kind, (target or None) if sep else None
    path = Path(spec).expanduser()
    if path.is_dir() and "folder" in kinds:
        return "folder", spec
    if (path.is_file() or path.suffix) and "file" in kinds:
        return "file", spec
    raise ConfigError(f"{spec!r} is not one of {', '.join(kinds)} (as kind[:target]) nor an existing path")


def open_source(
    spec: str,
    *,
    width: int = 256,
    height: int = 256,
    fps: float | None = None,
    realtime: bool = False,
    frames: int | None = None,
    camera_size: tuple[int, int] | None = None,
) -> Any:
    """A source from ``spec`` (see the module docstring). ``realtime`` paces file, folder and pattern sources.

    ``width``/``height`` size the test pattern (``testpattern:WxH`` overrides); ``fps`` is the pace of the pattern,
    folder and screen sources and the requested webcam rate; ``camera_size`` the requested webcam resolution.
    """
    from ..config import parse_size

    kind, target = parse_spec(spec, SOURCE_KINDS)
    if kind == "testpattern":
        w, h = parse_size(target, "testpattern size") if target else (width, height)
        return TestPatternSource(w, h, fps or 30.0, frames, realtime)
    if kind == "webcam":
        return WebcamSource(target if target is not None else 0, camera_size, fps)
    if kind == "screen":
        from .screen import ScreenSource, parse_monitor

        return ScreenSource(parse_monitor(target), fps)
    if target is None:
        raise ConfigError(f"source {kind!r} needs a path: {kind}:PATH")
    if kind == "file":
        return VideoFileSource(target, realtime)
    return FolderSource(target, fps or 30.0, realtime)
