"""The engine's own record of one stream: its input frames, pending change, drain and close flags, numeric state.

A :class:`StreamRecord` is made when a stream opens and handed to the worker inside an
:class:`~.inbox.OpenStream` message; from then on only the thread that runs ticks reads or writes it (the
worker, or the caller of :meth:`StreamEngine.step` in synchronous use). Clients reach it only through messages
(:mod:`.inbox`) and read what it produces through its :class:`~.outputs.OutputQueue`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..config import PromptConfig, StreamConfig
from .inbox import ChangeSettings, CloseStream, EndInput, InputFrame, Message, OpenStream, StopEngine, SubmitFrame
from .outputs import OutputQueue, StreamOutput
from .state import StreamState, StreamStats

if TYPE_CHECKING:
    from .stream import Stream


@dataclass(eq=False)
class StreamRecord:
    """One stream as the engine's worker sees it; see the module docstring.

    ``stream``: the client's handle (the key of :meth:`StreamEngine.step`'s result, the first argument of
    ``on_output``). ``config``/``prompt``: the settings it opened with. ``stats``: the handle shows the same object.
    """

    stream: Stream
    outputs: OutputQueue
    stats: StreamStats
    config: StreamConfig
    prompt: PromptConfig
    on_output: Callable[[Stream, StreamOutput], None] | None = None
    state: StreamState | None = None  # made when the worker takes the OpenStream
    inputs: deque[InputFrame] = field(default_factory=deque)  # the newest frames, oldest first
    pending: ChangeSettings | None = None  # the newest change not yet applied
    draining: bool = False  # run the frames inside out (end_input, flush)
    close_after_drain: bool = False
    closing: bool = False

    @property
    def id(self) -> int:
        return self.stream.id

    @property
    def name(self) -> str:
        return self.stream.name

    @property
    def lossless(self) -> bool:
        return self.outputs.lossless

    @property
    def finished(self) -> bool:
        return self.outputs.finished

    def set_state(self, state: StreamState) -> None:
        """Use ``state`` from now on and show it to the handle's readers."""
        self.state = state
        self.outputs.publish(state)

    def add_input(self, message: SubmitFrame) -> int:
        """Queue a submitted frame, keeping the newest ``message.capacity``. How many older frames it dropped."""
        self.stats.dropped_inputs += message.superseded
        self.inputs.append(message.frame)
        dropped = 0
        while len(self.inputs) > message.capacity:
            self.inputs.popleft()
            dropped += 1
        self.stats.dropped_inputs += dropped
        return dropped

    def take_inputs(self, frames: int) -> list[InputFrame]:
        """The oldest ``frames`` input frames (fewer at the end of input), taken out of the queue."""
        return [self.inputs.popleft() for _ in range(min(frames, len(self.inputs)))]

    def ready(self) -> bool:
        """Whether this stream has work for the next tick: a whole group (or a drain) and room for its output."""
        state = self.state
        if state is None or self.finished or not self.outputs.has_room():
            return False
        return len(self.inputs) >= state.config.frame_buffer_size or self.draining

    def drained(self) -> bool:
        """A drain with nothing left to run out."""
        return self.draining and not self.inputs and self.state is not None and not self.state.frames_inside


def take_messages(records: dict[int, StreamRecord], messages: Iterable[Message],
                  release: Callable[[int, int], None]) -> bool:
    """Book ``messages`` (drained from the inbox, oldest first) into ``records``: new records join, frames queue
    (``release(stream_id, frames)`` for those their bound drops), the newest change of each stream waits in
    ``pending``, ends and closes set flags. Pure bookkeeping: nothing is built or run. False if the stop sentinel
    came."""
    go_on = True
    for message in messages:
        if isinstance(message, StopEngine):
            go_on = False
        elif isinstance(message, OpenStream):
            records[message.stream_id] = message.record
        elif (record := records.get(message.stream_id)) is None:
            continue  # the stream has left already
        elif isinstance(message, SubmitFrame):
            release(record.id, record.add_input(message))
        elif isinstance(message, ChangeSettings):
            record.pending = message  # coalesced: only the newest applies
        elif isinstance(message, EndInput):
            record.draining = record.close_after_drain = True
        elif isinstance(message, CloseStream):
            record.closing = True
    return go_on
