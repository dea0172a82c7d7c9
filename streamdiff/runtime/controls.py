"""Live controls of a running stream: settings changes, pause, stop, strength and filter toggles.

Any thread (a window's key handler, a terminal reading prompts, a server) calls these methods. Changes go straight
to the stream's :meth:`~streamdiff.engine.Stream.update`, which validates them in the caller's thread (an invalid one
raises :class:`~streamdiff.errors.ConfigError` there and changes nothing) and has the engine apply them between two
ticks. Nothing here touches the model.
"""

from __future__ import annotations

import threading
from typing import Any

from ..config import FilterConfig, StreamConfig, t_index_list_for_strength

STRENGTH_STEP = 0.05
MIN_STRENGTH = 0.05


class Controls:
    """Thread-safe requests to a running stream. The runner binds it to its stream when the run starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._stop = threading.Event()
        self.stream: Any = None

    def bind(self, stream: Any) -> None:
        """Control ``stream`` (a :class:`~streamdiff.engine.Stream` or a remote stream with ``update``/``config``)."""
        self.stream = stream

    # -- settings -------------------------------------------------------------------------------------------

    @property
    def config(self) -> StreamConfig | None:
        """The stream's newest requested configuration (None before the run starts)."""
        return None if self.stream is None else self.stream.config

    @property
    def strength(self) -> float | None:
        """The denoising strength of the first step (1 = from pure noise)."""
        config = self.config
        return None if config is None else 1.0 - config.t_index_list[0] / config.num_inference_steps

    def update(self, **changes: Any) -> int:
        """Change settings live (see :meth:`Stream.update`): ConfigError here when invalid. Returns the version."""
        if self.stream is None:
            raise RuntimeError("the controls are not bound to a running stream yet")
        return self.stream.update(**changes)

    def change_strength(self, delta: float) -> float | None:
        """Raise or lower the denoising strength by ``delta`` (new t_index_list, same number of steps)."""
        with self._lock:
            config, strength = self.config, self.strength
            if config is None or strength is None:
                return None
            new = min(1.0, max(MIN_STRENGTH, round(strength + delta, 4)))
            if new != strength:
                steps = config.denoising_steps
                self.update(t_index_list=t_index_list_for_strength(new, steps, config.num_inference_steps))
            return new

    def toggle_filter(self) -> bool | None:
        """Switch the similarity filter on or off; returns the new state."""
        with self._lock:
            config = self.config
            if config is None:
                return None
            current = config.filter
            self.update(filter=FilterConfig(not current.enabled, current.threshold, current.max_skip_frames))
            return not current.enabled

    # -- run state --------------------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def toggle_pause(self) -> bool:
        """Pause or resume capture (the stream gets no frames while paused); returns True when now paused."""
        if self._unpaused.is_set():
            self._unpaused.clear()
            return True
        self._unpaused.set()
        return False

    def wait_unpaused(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a resume; True when running."""
        return self._unpaused.wait(timeout)

    def request_stop(self) -> None:
        """Ask the run to end (like end of input, but without flushing). The runner notices within ~50 ms."""
        self._stop.set()
        self._unpaused.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()
