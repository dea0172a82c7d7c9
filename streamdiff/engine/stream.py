"""A :class:`Stream`: the handle a client holds on one stream of a :class:`~streamdiff.engine.StreamEngine`.

A handle submits frames and validated changes; it never touches the model. Every change is validated in the
caller's thread (an invalid one raises :class:`~streamdiff.errors.ConfigError` and leaves the stream as it was) and
applied by the engine atomically between two ticks, so no output ever mixes two settings. Frames go into a bounded
input queue: latest-wins (real time: the newest ``frame_buffer_size`` frames, older ones dropped and counted) or
lossless (files: :meth:`Stream.submit` waits for room). Outputs come out of a bounded queue (:meth:`Stream.get`)
and/or through a callback called on the engine's thread. Typical use::

    stream = engine.open_stream(StreamConfig(width=256, height=256), prompt="a watercolor portrait")
    stream.submit(frame, frame_id=7)          # uint8 [H, W, 3] RGB (any size: resized), or float [3, H, W] in [0, 1]
    out = stream.get(timeout=1.0)             # StreamOutput, or None once the stream has ended
    stream.update(prompt="charcoal sketch")   # validated now, applied between ticks
    stream.close()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..config import PromptConfig, StreamConfig, StreamMode
from ..errors import ConfigError, FrameError, StreamClosed
from ..core.image import fit_frame, frame_to_tensor
from .state import StreamState, StreamStats

if TYPE_CHECKING:
    from .engine import StreamEngine

PROMPT_FIELDS = tuple(f.name for f in fields(PromptConfig))
CONFIG_FIELDS = tuple(f.name for f in fields(StreamConfig))


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


@dataclass
class InputFrame:
    """One submitted frame: float ``[3, H, W]`` in [0, 1] (CPU), None for a txt2img request; its id and time."""

    image: torch.Tensor | None
    frame_id: Any
    submitted: float


class Stream:
    """One client's stream on an engine. Made by :meth:`StreamEngine.open_stream`; see the module docstring."""

    def __init__(
        self,
        engine: StreamEngine,
        stream_id: int,
        config: StreamConfig,
        prompt: PromptConfig,
        *,
        lossless: bool = False,
        input_capacity: int | None = None,
        output_capacity: int = 2,
        on_output: Callable[[Stream, StreamOutput], None] | None = None,
        name: str | None = None,
    ) -> None:
        for label, value in (("input_capacity", input_capacity), ("output_capacity", output_capacity)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{label}={value!r} must be an integer >= 1")
        self.engine = engine
        self.id = stream_id
        self.name = name or f"stream-{stream_id}"
        self.lossless = lossless
        self._input_capacity = input_capacity
        self.output_capacity = output_capacity
        self.on_output = on_output
        self._lock = threading.Lock()
        self._requested = (config, prompt)
        self._version = 0
        self._pending: tuple[StreamConfig, PromptConfig, int] | None = None
        self._inputs: deque[InputFrame] = deque()  # guarded by the engine's condition
        self._outputs: deque[StreamOutput] = deque()
        self._output_cond = threading.Condition()
        self.stats = StreamStats()
        self.dropped_outputs = 0
        self.state: StreamState | None = None  # owned by the engine's worker
        self.error: BaseException | None = None
        self._close_requested = False
        self._drain_requested = False
        self._close_after_drain = False
        self.finished = False  # the engine will produce nothing more
        self._next_frame_id = 0

    def __repr__(self) -> str:
        return f"<Stream {self.name} {'finished' if self.finished else 'open'}>"

    # -- settings -------------------------------------------------------------------------------------------------

    @property
    def config(self) -> StreamConfig:
        """The newest requested configuration (applied at the next tick)."""
        return self._requested[0]

    @property
    def prompt(self) -> PromptConfig:
        """The newest requested prompt settings (applied at the next tick)."""
        return self._requested[1]

    @property
    def version(self) -> int:
        """The version of the newest requested settings; outputs carry the version they were made with."""
        return self._version

    def update(self, **changes: Any) -> int:
        """Change any :class:`StreamConfig` or :class:`PromptConfig` field, live. Returns the new settings version.

        Validated here, in the caller's thread: an invalid change raises ConfigError naming the field, the value and
        what is allowed, and changes nothing. A valid one is applied between two ticks, all fields at once. A
        change of shape (size, frame_buffer_size, cfg_type, mode, batching, the number of steps) restarts the
        Stream Batch; the frames inside are counted in ``stats.dropped_on_reconfigure``.
        """
        self._check_open()
        unknown = sorted(set(changes) - set(PROMPT_FIELDS) - set(CONFIG_FIELDS))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; allowed: {sorted(PROMPT_FIELDS + CONFIG_FIELDS)}")
        with self._lock:
            config, prompt = self._requested
            prompt_changes = {k: v for k, v in changes.items() if k in PROMPT_FIELDS}
            config_changes = {k: v for k, v in changes.items() if k in CONFIG_FIELDS}
            new_prompt = replace(prompt, **prompt_changes) if prompt_changes else prompt
            new_config = config.with_changes(**config_changes) if config_changes else config
            self.engine.check_settings(new_config, new_prompt)
            self._version += 1
            self._requested = (new_config, new_prompt)
            self._pending = (new_config, new_prompt, self._version)
            version = self._version
        self.engine._wake()
        return version

    def _take_pending(self) -> tuple[StreamConfig, PromptConfig, int] | None:
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    # -- frames in ------------------------------------------------------------------------------------------------

    @property
    def input_capacity(self) -> int:
        """Frames the input queue holds: by default one group (F frames) latest-wins, two groups lossless."""
        if self._input_capacity is not None:
            return self._input_capacity
        return self.config.frame_buffer_size * (2 if self.lossless else 1)

    def submit(
        self,
        frame: np.ndarray | torch.Tensor | None,
        frame_id: Any = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Queue one frame (uint8 RGB ``[H, W, 3]`` of any size, or float ``[3, H, W]`` in [0, 1]); None in txt2img.

        Latest-wins streams never wait: a full queue drops its oldest frame (``stats.dropped_inputs``). Lossless
        streams wait for room (up to ``timeout`` s, then TimeoutError). ``frame_id`` (any object) comes back in
        :attr:`StreamOutput.frame_ids`; by default a running number. Raises StreamClosed once the stream is closed.
        """
        self._check_open()
        image = self._to_tensor(frame)
        if frame_id is None:
            frame_id = self._next_frame_id
        self._next_frame_id += 1
        item = InputFrame(image, frame_id, time.perf_counter())
        self.engine._queue_input(self, item, timeout)

    def _to_tensor(self, frame: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
        config = self.config
        if frame is None:
            if config.mode is not StreamMode.TXT2IMG:
                raise FrameError("img2img mode needs an input frame; use mode='txt2img' to generate without one")
            return None
        if isinstance(frame, np.ndarray):
            return frame_to_tensor(fit_frame(frame, config.width, config.height))[0]
        if isinstance(frame, torch.Tensor):
            expected = (3, config.height, config.width)
            if tuple(frame.shape) != expected or not torch.is_floating_point(frame):
                raise FrameError(
                    f"tensor frame {frame.dtype} {tuple(frame.shape)} is not float {list(expected)} in [0, 1] "
                    f"(uint8 [H, W, 3] arrays of any size are resized)"
                )
            return frame.detach().to("cpu", torch.float32)
        raise FrameError(f"frame must be a numpy array or a torch tensor, got {type(frame).__name__}")

    # -- outputs --------------------------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> StreamOutput | None:
        """The oldest queued output, waiting up to ``timeout`` s (TimeoutError); None once the stream has ended.

        After None, :attr:`error` tells whether the stream failed.
        """
        out = wait_popleft(self._output_cond, self._outputs, lambda: self.finished, timeout, self.name)
        if out is None:
            return None
        if self.lossless:
            self.engine._wake()  # room again: the engine may take this stream's next frame
        return out

    def poll(self) -> StreamOutput | None:
        """The oldest queued output, or None at once when there is none."""
        with self._output_cond:
            return self._outputs.popleft() if self._outputs else None

    def _has_output_room(self) -> bool:
        return not self.lossless or len(self._outputs) < self.output_capacity

    def _deliver(self, output: StreamOutput) -> None:
        """Engine thread: queue ``output`` (latest-wins drops the oldest when full) and call the callback."""
        with self._output_cond:
            self._outputs.append(output)
            while len(self._outputs) > self.output_capacity:
                self._outputs.popleft()
                self.dropped_outputs += 1
            self._output_cond.notify_all()
        if self.on_output is not None:
            self.on_output(self, output)

    def _finish(self, error: BaseException | None = None) -> None:
        """Engine thread: nothing more will come; wake readers (they get None after the queued outputs)."""
        if error is not None and self.error is None:
            self.error = error
        with self._output_cond:
            self.finished = True
            self._output_cond.notify_all()

    # -- life cycle -----------------------------------------------------------------------------------------------

    def end_input(self) -> None:
        """No more frames: the engine runs the frames still inside the Stream Batch out, then ends the stream."""
        self._check_open()
        self._drain_requested = True
        self._close_after_drain = True
        self.engine._wake()

    def close(self) -> None:
        """Leave the engine at the next tick (frames inside are dropped). Idempotent."""
        self._close_requested = True
        self.engine._wake()

    @property
    def closed(self) -> bool:
        return self._close_requested or self._close_after_drain or self.finished

    def _check_open(self) -> None:
        if self.closed:
            why = f": {self.error}" if self.error is not None else ""
            raise StreamClosed(f"{self.name} is closed{why}")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
