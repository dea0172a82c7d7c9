"""Worker threads and the messages they pass.

A :class:`Stage` runs one loop body in a thread. The body gets the run's ``stop`` event and must return soon after
it is set (every queue wait in :mod:`.slots` watches it). An exception in a body is kept on the stage and sets
``stop``, so one failing stage ends the whole run and the runner reports it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputFrame:
    """One output frame, carrying the id and capture time of the input it was made from."""

    frame_id: int
    captured: float
    image: np.ndarray  # uint8 [H, W, 3] RGB


class EndOfStream:
    """The marker that follows the last frame through every queue."""

    def __repr__(self) -> str:
        return "END"


END = EndOfStream()


class Stage(threading.Thread):
    """A named worker thread running ``body(stop)``; errors are captured in :attr:`error` and stop the run."""

    def __init__(self, name: str, body: Callable[[threading.Event], None], stop: threading.Event) -> None:
        super().__init__(name=f"streamdiff-{name}", daemon=True)
        self.stage_name = name
        self._body = body
        self._stop_event = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._body(self._stop_event)
        except BaseException as error:  # noqa: BLE001 - reported by the runner, never swallowed
            self.error = error
            logger.debug("stage %s failed", self.stage_name, exc_info=True)
            self._stop_event.set()
