"""The one way into the engine: small typed messages in one locked queue, drained by the worker every tick.

A :class:`~streamdiff.engine.Stream` handle never touches the engine's records of its stream: each operation
becomes a frozen message — :class:`OpenStream`, :class:`SubmitFrame`, :class:`ChangeSettings`, :class:`EndInput`,
:class:`CloseStream` — put into the engine's :class:`Inbox` after it was validated in the caller's thread. The
worker takes them all at the start of a tick (the schedule phase) and applies them to the records only it touches;
:class:`StopEngine` is the shutdown sentinel.

The inbox also keeps, per stream, what a caller must know *before* queuing (one lock for all of it): whether the
stream is still open, how many of its frames are on their way (a lossless ``submit`` waits for room), and the
open streams' handles (admission, :attr:`StreamEngine.streams`). The inbox is bounded whatever clients do: per
stream at most ``capacity`` frames, one settings change (a newer one replaces it: only the newest would apply
anyway), one end of input and one close. A latest-wins stream never waits: when the inbox already holds
``capacity`` of its frames, the oldest of them is dropped and the new message carries the count.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Union

import torch

from ..config import PromptConfig, StreamConfig
from ..errors import EngineFull

if TYPE_CHECKING:
    from .records import StreamRecord


@dataclass(frozen=True)
class InputFrame:
    """One submitted frame: float ``[3, H, W]`` in [0, 1] (CPU), None for a txt2img request; its id and time; and
    its control images ``[3, H, W]`` by ControlNet name (ControlNet streams)."""

    image: torch.Tensor | None
    frame_id: Any
    submitted: float
    control: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class OpenStream:
    """A new stream: ``record`` is the engine's record of it, handed to the worker (the caller keeps no hold)."""

    record: StreamRecord

    @property
    def stream_id(self) -> int:
        return self.record.id


@dataclass(frozen=True)
class SubmitFrame:
    """One frame for ``stream_id``; at most ``capacity`` of its frames wait. ``superseded``: frames of the same
    stream this one replaced in the inbox (latest-wins; counted in ``stats.dropped_inputs``)."""

    stream_id: int
    frame: InputFrame
    capacity: int
    superseded: int = 0


@dataclass(frozen=True)
class ChangeSettings:
    """Validated settings for ``stream_id``, as a whole; only the newest pending one applies at the next tick."""

    stream_id: int
    config: StreamConfig
    prompt: PromptConfig
    version: int


@dataclass(frozen=True)
class EndInput:
    """No more frames for ``stream_id``: run the frames inside out, then end the stream."""

    stream_id: int


@dataclass(frozen=True)
class CloseStream:
    """``stream_id`` leaves at the next tick; frames inside are dropped."""

    stream_id: int


@dataclass(frozen=True)
class StopEngine:
    """The sentinel that ends the worker's loop."""


Message = Union[OpenStream, SubmitFrame, ChangeSettings, EndInput, CloseStream, StopEngine]


@dataclass
class _Lane:
    """What the inbox knows of one stream, from its OpenStream until the worker forgets it."""

    handle: Any  # the client's Stream
    name: str
    lossless: bool
    queued: int = 0  # frames put and neither taken by the worker's execute phase nor discarded
    in_inbox: int = 0  # of those, still in the inbox
    closed: bool = False  # ended or closed: no more frames or changes
    change_queued: bool = False  # a ChangeSettings waits in the inbox
    close_queued: bool = False  # a CloseStream waits in the inbox (or was taken: closes are never repeated)


class Inbox:
    """The engine's locked input queue; see the module docstring. Callers: :meth:`open`, :meth:`submit`,
    :meth:`put`. The worker: :meth:`wait`, :meth:`drain`, :meth:`release`, :meth:`forget`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._messages: deque[Message] = deque()
        self._lanes: dict[int, _Lane] = {}
        self._waiting = 0

    # -- callers (any thread) ---------------------------------------------------------------------------------------

    def open(self, message: OpenStream, max_streams: int) -> None:
        """Admit a new stream (unless ``max_streams`` are open: EngineFull) and queue its record for the worker."""
        record = message.record
        with self._cond:
            if sum(not lane.closed for lane in self._lanes.values()) >= max_streams:
                raise EngineFull(f"the engine already serves max_streams={max_streams} streams; close one or try later")
            self._lanes[record.id] = _Lane(record.stream, record.name, record.lossless)
            self._append(message)

    def submit(self, message: SubmitFrame, timeout: float | None = None) -> bool:
        """Queue a frame. A lossless stream waits while ``message.capacity`` of its frames are on their way (up to
        ``timeout`` s, then TimeoutError). False (nothing queued) when the stream is closed, also while waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            lane = self._open_lane(message.stream_id)
            while lane is not None and lane.lossless and lane.queued >= message.capacity:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{lane.name}: no room in the input queue within {timeout} s")
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
                lane = self._open_lane(message.stream_id)
            if lane is None:
                return False
            if not lane.lossless and lane.in_inbox >= message.capacity:
                message = self._supersede(lane, message)
            lane.queued += 1
            lane.in_inbox += 1
            self._append(message)
            return True

    def put(self, message: ChangeSettings | EndInput | CloseStream | StopEngine) -> bool:
        """Queue a message. False (nothing queued) when its stream is closed; a close is refused only once the
        worker has forgotten the stream (and queued once). EndInput and CloseStream close the stream to further
        messages; a ChangeSettings replaces the stream's change still waiting here."""
        with self._cond:
            if isinstance(message, StopEngine):
                self._append(message)
                return True
            lane = self._lanes.get(message.stream_id)
            if lane is None or (lane.closed and not isinstance(message, CloseStream)):
                return False
            if isinstance(message, CloseStream):
                lane.closed = True
                if lane.close_queued:
                    return True
                lane.close_queued = True
            elif isinstance(message, EndInput):
                lane.closed = True
            elif lane.change_queued:
                self._remove_first(lambda m: isinstance(m, ChangeSettings) and m.stream_id == message.stream_id)
            else:
                lane.change_queued = True
            self._append(message)
            return True

    @property
    def waiting(self) -> int:
        """Lossless submitters waiting for room now."""
        return self._waiting

    def handles(self) -> list[Any]:
        """The handles of the streams not yet forgotten, oldest first."""
        with self._cond:
            return [lane.handle for lane in self._lanes.values()]

    def wait_empty(self, timeout: float | None) -> bool:
        """Wait until every stream is forgotten (up to ``timeout`` s); whether they all were."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._lanes, timeout)

    def notify(self) -> None:
        """Wake the worker to look at its records again (a reader made room in a lossless output queue)."""
        with self._cond:
            self._cond.notify_all()

    # -- the worker -------------------------------------------------------------------------------------------------

    def wait(self, busy: Callable[[], bool]) -> None:
        """Block until a message is queued or ``busy()`` (evaluated under the lock after every wake-up)."""
        with self._cond:
            while not self._messages and not busy():
                self._cond.wait()

    def drain(self) -> list[Message]:
        """Every queued message, oldest first; the inbox is empty afterwards."""
        with self._cond:
            messages = list(self._messages)
            self._messages.clear()
            for message in messages:
                lane = None if isinstance(message, StopEngine) else self._lanes.get(message.stream_id)
                if lane is None:
                    continue
                if isinstance(message, SubmitFrame):
                    lane.in_inbox -= 1
                elif isinstance(message, ChangeSettings):
                    lane.change_queued = False
            return messages

    def release(self, stream_id: int, frames: int) -> None:
        """``frames`` of ``stream_id``'s frames were taken or discarded: room for a lossless submitter."""
        if frames:
            with self._cond:
                if (lane := self._lanes.get(stream_id)) is not None:
                    lane.queued -= frames
                self._cond.notify_all()

    def forget(self, stream_id: int) -> None:
        """The stream has left: later messages for it are refused, waiting submitters are woken (and refused)."""
        with self._cond:
            self._lanes.pop(stream_id, None)
            self._cond.notify_all()

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _append(self, message: Message) -> None:
        self._messages.append(message)
        self._cond.notify_all()

    def _open_lane(self, stream_id: int) -> _Lane | None:
        lane = self._lanes.get(stream_id)
        return None if lane is None or lane.closed else lane

    def _supersede(self, lane: _Lane, message: SubmitFrame) -> SubmitFrame:
        """Drop the oldest of the stream's frames in the inbox; ``message`` carries the count on."""
        dropped = self._remove_first(lambda m: isinstance(m, SubmitFrame) and m.stream_id == message.stream_id)
        if not isinstance(dropped, SubmitFrame):
            return message
        lane.queued -= 1
        lane.in_inbox -= 1
        return replace(message, superseded=message.superseded + dropped.superseded + 1)

    def _remove_first(self, matches: Callable[[Message], bool]) -> Message | None:
        """Take the oldest queued message that ``matches`` out of the inbox."""
        for index, queued in enumerate(self._messages):
            if matches(queued):
                del self._messages[index]
                return queued
        return None
