"""The output path of a stream: the engine's worker puts, the stream's handle takes.

:class:`OutputQueue` is made and written by the :class:`~streamdiff.engine.StreamEngine` (its worker puts every
:class:`StreamOutput`, counts what latest-wins drops, and finally :meth:`~OutputQueue.finish` es it, with the
stream's error if it failed); the :class:`~streamdiff.engine.Stream` handle only reads it (``get``, ``poll``,
``finished``, ``error``). One condition guards it; nothing else is shared between the worker and a reader.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from .state import StreamState


@dataclass
class StreamOutput:
    """What one tick produced for a stream.

    ``images``: ``[F, 3, H, W]`` float32 in [0, 1] on the CPU, or None while the Stream Batch fills. ``skipped``:
    the similarity filter skipped the group and ``images`` is the previous output, held. ``frame_ids``: the ids of
    the input frames these images were made from (one per frame). ``version``: the settings version (see
    :meth:`Stream.update`) in force when they were finished. ``started`` and ``finished``: ``time.perf_counter()``
    when the tick that made them began and at delivery (the tick's time is shared by every stream in its batch).
    """

    images: torch.Tensor | None
    skipped: bool = False
    frame_ids: tuple[Any, ...] = ()
    version: int = 0
    finished: float = 0.0
    started: float = 0.0

    def frames(self) -> np.ndarray | None:
        """``images`` as uint8 RGB ``[F, H, W, 3]`` (None while filling)."""
        from ..core.image import tensor_to_frame

        return None if self.images is None else tensor_to_frame(self.images)


class OutputQueue:
    """A bounded queue of one stream's outputs; see the module docstring.

    ``capacity`` outputs at most: latest-wins drops the oldest (counted in :attr:`dropped`); a ``lossless`` queue
    is never overfilled because the engine runs the stream only while :meth:`has_room`. ``on_room()`` is called
    (outside the lock) whenever a reader takes an output of a lossless queue: the engine may run the stream again.
    """

    def __init__(self, capacity: int, lossless: bool, name: str, on_room: Callable[[], None] | None = None) -> None:
        self.capacity = capacity
        self.lossless = lossless
        self.name = name
        self._on_room = on_room
        self._cond = threading.Condition()
        self._items: deque[StreamOutput] = deque()
        self._dropped = 0
        self._finished = False
        self._error: BaseException | None = None
        self._state: StreamState | None = None

    # -- the engine's side ----------------------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether the engine may make one more output now (always, latest-wins)."""
        with self._cond:
            return not self.lossless or len(self._items) < self.capacity

    def put(self, output: StreamOutput) -> None:
        """Queue ``output``; a full latest-wins queue drops its oldest output."""
        with self._cond:
            self._items.append(output)
            while len(self._items) > self.capacity:
                self._items.popleft()
                self._dropped += 1
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """Nothing more will come (``error``: why the stream failed). Readers get None after the queued outputs."""
        with self._cond:
            if error is not None and self._error is None:
                self._error = error
            self._finished = True
            self._cond.notify_all()

    def publish(self, state: StreamState) -> None:
        """The stream's numeric state after a change the engine applied (readers may inspect it, never change it)."""
        self._state = state

    # -- the reader's side ----------------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Outputs latest-wins dropped because no reader took them before newer ones came."""
        return self._dropped

    @property
    def finished(self) -> bool:
        """The engine will put nothing more."""
        return self._finished

    @property
    def error(self) -> BaseException | None:
        """Why the stream failed (set before :attr:`finished`), else None."""
        return self._error

    @property
    def state(self) -> StreamState | None:
        """The newest state :meth:`publish` ed (None before the stream joined the engine)."""
        return self._state

    def get(self, timeout: float | None = None) -> StreamOutput | None:
        """The oldest output, waiting up to ``timeout`` s (TimeoutError); None once finished and empty."""
        output = wait_popleft(self._cond, self._items, lambda: self._finished, timeout, self.name)
        if output is not None:
            self._room()
        return output

    def poll(self) -> StreamOutput | None:
        """The oldest output, or None at once when there is none."""
        with self._cond:
            output = self._items.popleft() if self._items else None
        if output is not None:
            self._room()
        return output

    def _room(self) -> None:
        if self.lossless and self._on_room is not None:
            self._on_room()


def wait_popleft(cond: threading.Condition, items: deque[Any], finished: Callable[[], bool], timeout: float | None,
                 name: str) -> Any:
    """Under ``cond``: wait for ``items`` and take the oldest; None once ``finished()`` with nothing left;
    TimeoutError (naming ``name``) after ``timeout`` s. The wait of every stream handle's ``get``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with cond:
        while not items:
            if finished():
                return None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{name}: no output within {timeout} s")
            cond.wait(left)
        return items.popleft()
