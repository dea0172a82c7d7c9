"""Frame sinks: on-screen window, video file, image folder, virtual camera and null.

Every sink has ``open(width, height, fps)``, ``write(frame uint8 RGB [H, W, 3])`` and ``close()`` and a ``name``.
The window also has ``bind(controls, metrics)`` (overlay and keys), ``idle()`` (keys and redraw while no frame
arrives, e.g. paused) and ``main_thread = True`` (GUI toolkits want the main thread). Build one from a spec with
:func:`open_sink`: ``window``, ``file:out.mp4``, ``folder:out/``, ``virtualcam[:DEVICE]``, ``null``.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, SinkError, missing_extra
from .sources import parse_spec

logger = logging.getLogger(__name__)

SINK_KINDS = ("window", "file", "folder", "virtualcam", "null")
VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "mpeg4"}


class NullSink:
    """Discards frames (benchmarks); counts them."""

    name = "null"

    def __init__(self) -> None:
        self.frames = 0

    def open(self, width: int, height: int, fps: float) -> None:
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        self.frames += 1

    def close(self) -> None:
        pass


def _check_frame(frame: np.ndarray, width: int, height: int, name: str) -> None:
    if frame.dtype != np.uint8 or frame.shape != (height, width, 3):
        raise SinkError(f"{name}: frame {frame.dtype} {tuple(frame.shape)} is not uint8 [{height}, {width}, 3]")


class VideoFileSink:
    """An H.264 mp4 (or mkv/mov; avi: MPEG-4) written with PyAV at the stream's fps."""

    def __init__(self, path: str | Path, crf: int = 18, preset: str = "veryfast") -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_CODECS:
            raise ConfigError(f"video file {str(self.path)!r} must end in one of {', '.join(VIDEO_CODECS)}")
        self.name = f"file:{self.path}"
        self.crf = crf
        self.preset = preset
        self.frames = 0
        self._container: Any = None
        self._stream: Any = None
        self._failed = False

    def open(self, width: int, height: int, fps: float) -> None:
        try:
            import av
        except ImportError:
            raise missing_extra("av", "cam") from None
        if width % 2 or height % 2:
            raise SinkError(f"video file {str(self.path)!r}: size {width}x{height} must be even for yuv420p")
        try:  # PyAV opens the file only when the first packet is written: create it now to fail before the run
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.open("wb").close()
        except OSError as error:
            cause = error.strerror or str(error)
            if isinstance(error, FileExistsError):  # mkdir met a file where a folder belongs
                cause = f"{str(error.filename)!r} is not a folder"
            raise SinkError(f"cannot create video file {str(self.path)!r}: {cause}") from error
        codec = VIDEO_CODECS[self.path.suffix.lower()]
        try:
            self._container = av.open(str(self.path), mode="w")
            stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise SinkError(f"cannot create video file {str(self.path)!r}: {error}") from error
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._stream = stream
        self._size = (width, height)
        self._failed = False
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        import av

        if self._stream is None:
            raise SinkError(f"video file {str(self.path)!r} is not open")
        if self._failed:
            raise SinkError(f"video file {str(self.path)!r} failed earlier and takes no more frames")
        _check_frame(frame, *self._size, self.name)
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        try:
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
        except (av.error.FFmpegError, OSError) as error:
            self._failed = True
            raise SinkError(f"writing video file {str(self.path)!r} failed at frame {self.frames}: {error}") from error
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finalise the file; a failure (disk full, file gone) raises SinkError."""
        import av

        if self._container is None:
            return
        container, stream, self._container, self._stream = self._container, self._stream, None, None
        failure: BaseException | None = None
        try:
            if not self._failed:  # muxing again after a failed mux crashes PyAV (segfault): only close then
                for packet in stream.encode(None):
                    container.mux(packet)
        except (av.error.FFmpegError, OSError) as error:
            failure = error
        finally:
            try:
                container.close()
            except (av.error.FFmpegError, OSError) as error:
                failure = failure or error
        if failure is not None:
            raise SinkError(f"finalising video file {str(self.path)!r} failed: {failure}") from failure
        if self.frames == 0 and self.path.is_file() and self.path.stat().st_size == 0:
            self.path.unlink()  # no frame came: leave no empty file created by open()
            logger.warning("no frames were written: %s not created", self.path)
        elif not self._failed:
            logger.info("wrote %d frames to %s", self.frames, self.path)


class FolderSink:
    """Numbered PNG files ``frame_000000.png``… in a folder (created if needed)."""

    def __init__(self, path: str | Path, prefix: str = "frame_") -> None:
        self.path = Path(path)
        self.prefix = prefix
        self.name = f"folder:{self.path}"
        self.frames = 0

    def open(self, width: int, height: int, fps: float) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SinkError(f"cannot create output folder {str(self.path)!r}: {error.strerror or error}") from error
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise SinkError(f"output folder {str(self.path)!r} is not writable")
        self._size = (width, height)
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        from PIL import Image

        _check_frame(frame, *self._size, self.name)
        path = self.path / f"{self.prefix}{self.frames:06d}.png"
        try:
            Image.fromarray(frame).save(path, compress_level=1)
        except OSError as error:
            raise SinkError(f"cannot write {str(path)!r}: {error.strerror or error}") from error
        self.frames += 1

    def close(self) -> None:
        pass


# -- virtual camera -------------------------------------------------------------------------------------------------


def no_virtualcam_help(platform: str = sys.platform) -> str:
    """How to get a virtual camera on ``platform``."""
    if platform.startswith("linux"):
        return (
            "install v4l2loopback (Debian/Ubuntu: `sudo apt install v4l2loopback-dkms`) and load it with "
            "`sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=streamdiff`, then run again"
        )
    if platform == "darwin":
        return (
            "install OBS Studio (30 or newer), click 'Start Virtual Camera' once (allow the system extension in "
            "System Settings > Privacy & Security) and stop it again, then run again"
        )
    return (
        "install OBS Studio (28 or newer) and click 'Start Virtual Camera' once, then stop it so that the camera is "
        "free, then run again"
    )


class VirtualCamSink:
    """A virtual camera through pyvirtualcam (OBS Virtual Camera on Windows/macOS, v4l2loopback on Linux).

    Frames are sent as RGB and paced to the camera's fps (``sleep_until_next_frame``), so a fast engine does not
    flood it. ``backend`` picks a pyvirtualcam backend by name (None: the first that works).
    """

    def __init__(self, device: str | None = None, backend: str | None = None, pace: bool = True) -> None:
        self.device = device
        self.backend = backend
        self.pace = pace
        self.name = "virtualcam" + (f":{device}" if device else "")
        self._camera: Any = None

    def open(self, width: int, height: int, fps: float) -> None:
        try:
            import pyvirtualcam
        except ImportError:
            raise missing_extra("pyvirtualcam", "virtualcam") from None
        if self.backend is not None and self.backend not in pyvirtualcam.camera.BACKENDS:
            known = ", ".join(sorted(pyvirtualcam.camera.BACKENDS)) or "none"
            raise SinkError(f"virtual camera backend {self.backend!r} is not one of: {known}")
        try:
            self._camera = pyvirtualcam.Camera(
                width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=self.device, backend=self.backend
            )
        except RuntimeError as error:
            detail = " / ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise SinkError(
                f"no virtual camera is available ({detail}). To get one, {no_virtualcam_help()}. "
                f"Alternatively use --sink window and capture that window (see docs/obs.md)."
            ) from None
        self._size = (width, height)
        logger.info("virtual camera %s (%s) at %dx%d %.1f fps", self._camera.device, self._camera.backend,
                    width, height, fps)

    def write(self, frame: np.ndarray) -> None:
        if self._camera is None:
            raise SinkError("the virtual camera is not open")
        _check_frame(frame, *self._size, self.name)
        self._camera.send(frame)
        if self.pace:
            self._camera.sleep_until_next_frame()

    def close(self) -> None:
        if self._camera is not None:
            self._camera.close()
            self._camera = None


# -- window ---------------------------------------------------------------------------------------------------------


class WindowKey(str, enum.Enum):
    """What a key in the window does."""

    QUIT = "quit"
    PAUSE = "pause"
    STRENGTH_UP = "strength_up"
    STRENGTH_DOWN = "strength_down"
    TOGGLE_FILTER = "toggle_filter"


KEYMAP: dict[int, WindowKey] = {
    ord("q"): WindowKey.QUIT,
    27: WindowKey.QUIT,  # Esc
    ord(" "): WindowKey.PAUSE,
    ord("p"): WindowKey.PAUSE,
    ord("+"): WindowKey.STRENGTH_UP,
    ord("="): WindowKey.STRENGTH_UP,
    ord("-"): WindowKey.STRENGTH_DOWN,
    ord("f"): WindowKey.TOGGLE_FILTER,
}
KEY_HELP = "q quit | space pause | +/- strength | f filter"


class Display(Protocol):
    """The seam between the window sink and a GUI toolkit."""

    def open(self, title: str, width: int, height: int) -> None: ...

    def show(self, frame: np.ndarray) -> None: ...  # uint8 RGB [H, W, 3]

    def poll_key(self) -> int | None: ...  # a key code, or None; -2 means the window was closed

    def close(self) -> None: ...


WINDOW_CLOSED = -2


class OpenCVDisplay:
    """A HighGUI window (needs an OpenCV build with GUI support: ``opencv-python``, not the headless wheel)."""

    def __init__(self) -> None:
        self._cv2: Any = None
        self._title = ""

    def open(self, title: str, width: int, height: int) -> None:
        try:
            import cv2
        except ImportError:
            raise missing_extra("cv2 (opencv-python)", "window") from None
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
            cv2.resizeWindow(title, width, height)
        except cv2.error as error:
            raise SinkError(
                "the window sink needs OpenCV with GUI support, but this OpenCV has none "
                f"({str(error).strip().splitlines()[-1]}). Install it with `pip uninstall -y opencv-python-headless "
                "&& pip install 'streamdiff[window]'`, or use another sink (file:out.mp4, virtualcam)."
            ) from None
        self._cv2, self._title = cv2, title

    def show(self, frame: np.ndarray) -> None:
        self._cv2.imshow(self._title, np.ascontiguousarray(frame[:, :, ::-1]))

    def poll_key(self) -> int | None:
        key = self._cv2.waitKey(1)
        if self._cv2.getWindowProperty(self._title, self._cv2.WND_PROP_VISIBLE) < 1:
            return WINDOW_CLOSED
        return None if key < 0 else key & 0xFF

    def close(self) -> None:
        if self._cv2 is not None:
            self._cv2.destroyWindow(self._title)
            self._cv2.waitKey(1)
            self._cv2 = None


def draw_overlay(frame: np.ndarray, lines: list[str]) -> np.ndarray:
    """A copy of ``frame`` with ``lines`` of small white text on a dark band at the top left."""
    try:
        import cv2
    except ImportError:
        raise missing_extra("cv2 (opencv-python)", "cam") from None
    out = frame.copy()
    scale = max(0.35, min(out.shape[0], out.shape[1]) / 900.0)
    line_h = int(22 * scale / 0.6) + 2
    width = max((cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for text in lines), default=0)
    band = out[: line_h * len(lines) + 4, : width + 8]
    band[...] = (band.astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken
    for i, text in enumerate(lines):
        cv2.putText(out, text, (4, line_h * (i + 1) - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out


class WindowSink:
    """An on-screen window with an overlay (fps, end-to-end latency, drops) and keys (see :data:`KEY_HELP`)."""

    main_thread = True

    def __init__(self, title: str = "streamdiff", display: Display | None = None, overlay: bool = True) -> None:
        self.title = title
        self.display = display if display is not None else OpenCVDisplay()
        self.overlay = overlay
        self.name = "window"
        self.controls: Any = None
        self.metrics: Any = None
        self._last: np.ndarray | None = None  # the last frame shown, redrawn by idle()

    def bind(self, controls: Any, metrics: Any) -> None:
        """Connect the keys to the run's :class:`~streamdiff.runtime.Controls` and the overlay to its metrics."""
        self.controls, self.metrics = controls, metrics

    def open(self, width: int, height: int, fps: float) -> None:
        self.display.open(self.title, width, height)
        logger.info("window keys: %s", KEY_HELP)

    def overlay_lines(self) -> list[str]:
        lines = []
        if self.metrics is not None:
            fps, latency, drops = self.metrics.recent()
            fps_text = "-" if fps is None else f"{fps:.1f}"
            latency_text = "-" if latency is None else f"{latency:.0f}"
            lines.append(f"{fps_text} fps  {latency_text} ms  drops {drops}")
        if self.controls is not None:
            state = []
            if self.controls.strength is not None:
                state.append(f"strength {self.controls.strength:.2f}")
            if self.controls.config is not None:
                state.append("filter " + ("on" if self.controls.config.filter.enabled else "off"))
            if self.controls.paused:
                state.append("PAUSED")
            if state:
                lines.append("  ".join(state))
        return lines

    def write(self, frame: np.ndarray) -> None:
        self._last = frame
        self._show(frame)
        self.handle_key(self.display.poll_key())

    def idle(self) -> None:
        """No new frame (paused, waiting for the first, or a slow engine): redraw the last frame with a fresh overlay
        (``PAUSED``) and act on keys, so the window stays responsive and a pause can be undone. The runner calls this
        every few tens of milliseconds while no frame arrives."""
        if self._last is not None:
            self._show(self._last)
        self.handle_key(self.display.poll_key())

    def _show(self, frame: np.ndarray) -> None:
        self.display.show(draw_overlay(frame, self.overlay_lines()) if self.overlay else frame)

    def handle_key(self, key: int | None) -> WindowKey | None:
        """Act on ``key`` (a code from the display); returns what it did, None for unbound keys."""
        if key is None:
            return None
        action = WindowKey.QUIT if key == WINDOW_CLOSED else KEYMAP.get(key)
        if action is None or self.controls is None:
            return action
        if action is WindowKey.QUIT:
            self.controls.request_stop()
        elif action is WindowKey.PAUSE:
            self.controls.toggle_pause()
        elif action is WindowKey.STRENGTH_UP:
            self.controls.change_strength(+0.05)
        elif action is WindowKey.STRENGTH_DOWN:
            self.controls.change_strength(-0.05)
        elif action is WindowKey.TOGGLE_FILTER:
            self.controls.toggle_filter()
        return action

    def close(self) -> None:
        self.display.close()


def open_sink(spec: str, *, virtualcam_backend: str | None = None) -> Any:
    """A sink from ``spec``: ``window``, ``file:PATH``, ``folder:PATH``, ``virtualcam[:DEVICE]`` or ``null``."""
    kind, target = parse_spec(spec, SINK_KINDS)
    if kind == "null":
        return NullSink()
    if kind == "window":
        return WindowSink(title=target or "streamdiff")
    if kind == "virtualcam":
        return VirtualCamSink(device=target, backend=virtualcam_backend)
    if target is None:
        raise ConfigError(f"sink {kind!r} needs a path: {kind}:PATH")
    if kind == "file":
        return VideoFileSink(target)
    return FolderSink(target)
