"""Live controls of a running stream: updates, pause, stop, strength and filter toggles.

Any thread (a window's key handler, a terminal reading prompts, a server) calls these methods; the engine stage,
which owns the model, applies queued updates between two frames. Nothing here touches the model.
"""

from __future__ import annotations

import threading
from typing import Any

from ..config import FilterConfig, StreamConfig, t_index_list_for_strength

STRENGTH_STEP = 0.05
MIN_STRENGTH = 0.05


class Controls:
    """Thread-safe requests to the engine stage. Build with :meth:`for_config` to get strength/filter keys."""

    def __init__(self, config: StreamConfig | None = None) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._stop = threading.Event()
        self.config = config
        self.strength: float | None = None
        if config is not None:
            self.strength = 1.0 - config.t_index_list[0] / config.num_inference_steps

    # -- generic --------------------------------------------------------------------------------------------

    def update(self, **changes: Any) -> None:
        """Queue ``changes`` for ``engine.update(**changes)`` (later calls override earlier keys)."""
        with self._lock:
            self._pending.update(changes)

    def take_updates(self) -> dict[str, Any]:
        """The queued changes, merged, and clear them (called by the engine stage)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def toggle_pause(self) -> bool:
        """Pause or resume the engine; returns True when now paused."""
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

    # -- stream-specific keys ---------------------------------------------------------------------------------

    def change_strength(self, delta: float) -> float | None:
        """Raise or lower the denoising strength by ``delta`` (new t_index_list, same number of steps)."""
        if self.config is None or self.strength is None:
            return None
        strength = min(1.0, max(MIN_STRENGTH, round(self.strength + delta, 4)))
        steps = self.config.denoising_steps
        if strength == self.strength:
            return strength
        t_index_list = t_index_list_for_strength(strength, steps, self.config.num_inference_steps)
        with self._lock:
            self.strength = strength
            self.config = self.config.with_changes(t_index_list=t_index_list)
            self._pending["t_index_list"] = t_index_list
        return strength

    def toggle_filter(self) -> bool | None:
        """Switch the similarity filter on or off; returns the new state."""
        if self.config is None:
            return None
        with self._lock:
            current = self.config.filter
            new = FilterConfig(not current.enabled, current.threshold, current.max_skip_frames)
            self.config = self.config.with_changes(filter=new)
            self._pending["filter"] = new
        return new.enabled
