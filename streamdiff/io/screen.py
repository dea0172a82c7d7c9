"""Screen capture source: one monitor, or all of them, grabbed with ``mss`` at a steady frame rate.

``open_source("screen")`` captures the first monitor, ``"screen:2"`` the second, ``"screen:0"`` all monitors as one
picture (mss's numbering). Needs the ``screen`` extra (``pip install 'streamdiff[screen]'``) and a desktop session
(on Linux an X11 display, ``$DISPLAY``; Wayland desktops through XWayland).

The grabber is a seam: anything with mss's shape — a ``monitors`` list of ``{"left", "top", "width", "height"}``
dicts (index 0: all monitors together) and ``grab(region)`` returning a BGRA screenshot with ``raw``, ``width`` and
``height`` — can stand in for ``mss.MSS`` (tests pass one; there is no display on CI).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Protocol

import numpy as np

from ..config import check_int, check_number
from ..errors import ConfigError, SourceError, missing_extra
from .pacing import Pacer

logger = logging.getLogger(__name__)

DEFAULT_SCREEN_FPS = 30.0
REGION_KEYS = ("left", "top", "width", "height")


class Grabber(Protocol):
    """What :class:`ScreenSource` needs of ``mss.MSS``."""

    monitors: list[dict[str, Any]]

    def grab(self, region: dict[str, int]) -> Any: ...  # a BGRA screenshot: .raw, .width, .height

    def close(self) -> None: ...


def mss_grabber() -> Grabber:
    """A new ``mss.MSS`` (the ``screen`` extra); no screen to capture raises SourceError saying why."""
    try:
        import mss
    except ImportError:
        raise missing_extra("mss", "screen") from None
    try:
        return mss.MSS() if hasattr(mss, "MSS") else mss.mss()
    except mss.ScreenShotError as error:
        raise SourceError(
            f"cannot capture the screen: {error}. Screen capture needs a desktop session (on Linux an X11 "
            "display in $DISPLAY; under Wayland, XWayland). Use another source (webcam, file:VIDEO) otherwise."
        ) from None


def _capture_errors() -> tuple[type[BaseException], ...]:
    try:
        import mss
    except ImportError:
        return (OSError,)
    return (OSError, mss.ScreenShotError)


def parse_monitor(target: str | None) -> int:
    """``screen[:MONITOR]`` target → monitor number (default 1, the first monitor; 0 is all monitors)."""
    if target is None:
        return 1
    if not target.strip().isdigit():
        raise ConfigError(f"screen monitor {target!r} is not a number: screen:1 is the first monitor, screen:0 all")
    return int(target)


class ScreenSource:
    """Frames of one monitor (``monitor`` 1, 2, …; 0 for all together) at ``fps`` (default 30), paced like a camera.

    ``grabber_factory`` makes the screen grabber (default :func:`mss_grabber`); each thread that reads gets its own,
    as platform capture handles (GDI device contexts, X connections) may belong to the thread that made them.
    """

    realtime = True

    def __init__(
        self, monitor: int = 1, fps: float | None = None, grabber_factory: Callable[[], Grabber] | None = None
    ) -> None:
        self.monitor = check_int("screen monitor", monitor, 0)
        self.fps = check_number("screen fps", fps, 0, 1000, min_open=True) if fps is not None else DEFAULT_SCREEN_FPS
        self.name = f"screen {self.monitor}"
        self.size: tuple[int, int] | None = None
        self._factory = grabber_factory or mss_grabber
        self._local = threading.local()
        self._grabbers: list[Grabber] = []
        self._lock = threading.Lock()
        self._region: dict[str, int] | None = None
        self._pacer: Pacer | None = None

    def _grabber(self) -> Grabber:
        grabber = getattr(self._local, "grabber", None)
        if grabber is None:
            grabber = self._factory()
            self._local.grabber = grabber
            with self._lock:
                self._grabbers.append(grabber)
        return grabber

    def open(self) -> None:
        """Find the monitor (a second call while open does nothing); a missing one raises SourceError listing all."""
        if self._region is not None:
            return
        monitors = list(self._grabber().monitors)
        if self.monitor >= len(monitors) or (self.monitor == 0 and len(monitors) < 2):
            listing = ", ".join(
                f"{i} ({'all: ' if i == 0 else ''}{m['width']}x{m['height']} at {m['left']},{m['top']})"
                for i, m in enumerate(monitors)
            ) or "none"
            self.close()
            raise SourceError(
                f"screen monitor {self.monitor} does not exist; monitors: {listing}. Pick one with --source screen:N"
            )
        self._region = {key: int(monitors[self.monitor][key]) for key in REGION_KEYS}
        self.size = (self._region["width"], self._region["height"])
        self._pacer = Pacer(self.fps)
        logger.info("capturing %s at %dx%d, %.1f fps", self.name, *self.size, self.fps)

    def read(self) -> np.ndarray:
        """The next screenshot as uint8 RGB ``[H, W, 3]`` (a screen never ends)."""
        if self._region is None or self._pacer is None:
            raise SourceError(f"{self.name} is not open")
        self._pacer.wait()
        try:
            shot = self._grabber().grab(dict(self._region))
        except _capture_errors() as error:
            raise SourceError(f"capturing {self.name} failed: {error}") from error
        bgra = np.frombuffer(shot.raw, np.uint8).reshape(shot.height, shot.width, 4)
        return np.ascontiguousarray(bgra[:, :, 2::-1])  # BGRA -> RGB

    def close(self) -> None:
        with self._lock:
            grabbers, self._grabbers = self._grabbers, []
        for grabber in grabbers:
            close = getattr(grabber, "close", None)
            if close is not None:
                close()
        self._local = threading.local()
        self._region = None
