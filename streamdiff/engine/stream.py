"""A :class:`Stream`: the handle a client holds on one stream of a :class:`~streamdiff.engine.StreamEngine`.

A handle submits frames and validated changes; it never touches the model nor the engine's records. Every
operation becomes a small message in the engine's one input queue (:mod:`.inbox`). Every change is validated in
the caller's thread (an invalid one raises :class:`~streamdiff.errors.ConfigError` and leaves the stream as it was)
and applied by the engine atomically between two ticks, so no output ever mixes two settings. Frames are bounded:
latest-wins (real time: the newest ``frame_buffer_size`` frames, older ones dropped and counted) or lossless
(files: :meth:`Stream.submit` waits for room). Outputs come out of a bounded queue the engine writes
(:mod:`.outputs`, read with :meth:`Stream.get`) and/or through a callback called on the engine's thread. Typical
use::

    stream = engine.open_stream(StreamConfig(width=256, height=256), prompt="a watercolor portrait")
    stream.submit(frame, frame_id=7)          # uint8 [H, W, 3] RGB (any size: resized), or float [3, H, W] in [0, 1]
    out = stream.get(timeout=1.0)             # StreamOutput, or None once the stream has ended
    stream.update(prompt="charcoal sketch")   # validated now, applied between ticks
    stream.close()
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..config import PromptConfig, StreamConfig, StreamMode
from ..errors import ConfigError, FrameError, StreamClosed
from ..core.image import fit_frame, frame_to_tensor, tensor_to_frame
from ..models.controlnet import PASSTHROUGH
from .control import submit_control
from .inbox import ChangeSettings, CloseStream, EndInput, Inbox, InputFrame, SubmitFrame
from .outputs import OutputQueue, StreamOutput, wait_popleft
from .state import StreamState, StreamStats

if TYPE_CHECKING:
    from .engine import StreamEngine

__all__ = ["CONFIG_FIELDS", "PROMPT_FIELDS", "Stream", "StreamOutput", "wait_popleft"]

PROMPT_FIELDS = tuple(f.name for f in fields(PromptConfig))
CONFIG_FIELDS = tuple(f.name for f in fields(StreamConfig))


class Stream:
    """One client's stream on an engine. Made by :meth:`StreamEngine.open_stream`; see the module docstring.

    ``inbox``: the engine's input queue (every operation is a message put there); ``outputs``: the queue the engine
    writes this stream's outputs to; ``stats``: the counters the engine keeps for it (read them, never write).
    """

    def __init__(
        self,
        engine: StreamEngine,
        stream_id: int,
        config: StreamConfig,
        prompt: PromptConfig,
        *,
        inbox: Inbox,
        outputs: OutputQueue,
        stats: StreamStats,
        input_capacity: int | None = None,
        on_output: Callable[[Stream, StreamOutput], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.engine = engine
        self.id = stream_id
        self.name = name or f"stream-{stream_id}"
        self._inbox = inbox
        self._outputs = outputs
        self._stats = stats
        self._input_capacity = input_capacity
        self._on_output = on_output
        self._lock = threading.Lock()  # guards what this handle requested (settings, version, frame ids, closing)
        self._requested = (config, prompt)
        self._version = 0
        self._next_frame_id = 0
        self._ended = False  # end_input() was called
        self._close_requested = False
        self._controls_given: set[str] = set()  # passthrough ControlNets a control image was submitted for

    def __repr__(self) -> str:
        return f"<Stream {self.name} {'finished' if self.finished else 'open'}>"

    # -- what the stream was opened with --------------------------------------------------------------------------

    @property
    def lossless(self) -> bool:
        """Submits wait for room and no output is dropped (files); otherwise latest-wins (real time)."""
        return self._outputs.lossless

    @property
    def output_capacity(self) -> int:
        return self._outputs.capacity

    @property
    def on_output(self) -> Callable[[Stream, StreamOutput], None] | None:
        """Called as ``on_output(stream, output)`` on the engine's thread for every output."""
        return self._on_output

    @property
    def stats(self) -> StreamStats:
        """The engine's counters of this stream (frames in and out, drops, skips); read-only for clients."""
        return self._stats

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

    @property
    def state(self) -> StreamState | None:
        """The numeric state the engine applied last (buffers, coefficients), for inspection; None before the
        stream joined. Only the engine's worker changes it."""
        return self._outputs.state

    def update(self, **changes: Any) -> int:
        """Change any :class:`StreamConfig` or :class:`PromptConfig` field, live. Returns the new settings version.

        Validated here, in the caller's thread: an invalid change raises ConfigError naming the field, the value and
        what is allowed, and changes nothing. A valid one is applied between two ticks, all fields at once (of
        several changes queued between two ticks only the newest applies). A change of shape (size,
        frame_buffer_size, cfg_type, mode, batching, the number of steps) restarts the Stream Batch; the frames
        inside are counted in ``stats.dropped_on_reconfigure``.
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
            version = self._version + 1
            if not self._inbox.put(ChangeSettings(self.id, new_config, new_prompt, version)):
                raise self._closed_error()
            self._version = version
            self._requested = (new_config, new_prompt)
        return version

    def set_reference_image(self, image: Any, scale: float | None = None) -> int:
        """Set (or, with None, remove) the stream's image prompt, live, and optionally its ``ip_adapter_scale``.

        ``image``: uint8 ``[H, W, 3]``, a PIL RGB image or a :class:`~streamdiff.config.ReferenceImage`; needs a
        model with an IP-Adapter. It is embedded once (per distinct image) on the engine's thread; the Stream Batch
        goes on. Same as ``update(reference_image=image, ip_adapter_scale=scale)``; returns the settings version.
        """
        changes: dict[str, Any] = {"reference_image": image}
        if scale is not None:
            changes["ip_adapter_scale"] = scale
        return self.update(**changes)

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
        control_image: np.ndarray | torch.Tensor | None = None,
        timeout: float | None = None,
    ) -> None:
        """Queue one frame (uint8 RGB ``[H, W, 3]`` of any size, or float ``[3, H, W]`` in [0, 1]); None in txt2img.

        Latest-wins streams never wait: a full queue drops its oldest frame (``stats.dropped_inputs``). Lossless
        streams wait for room (up to ``timeout`` s, then TimeoutError). ``frame_id`` (any object) comes back in
        :attr:`StreamOutput.frame_ids`; by default a running number. Raises StreamClosed once the stream is closed
        (also when it is closed while this call waits).

        ControlNet streams: the control image of each ControlNet is made here, on the caller's thread (``canny``), or
        is ``control_image`` (``passthrough``: uint8 ``[H, W, 3]`` of any size or float ``[3, H, W]`` in [0, 1]; without
        one the last is used again).
        """
        self._check_open()
        image = self._to_tensor(frame)
        control = self._control(image, control_image)
        with self._lock:
            if frame_id is None:
                frame_id = self._next_frame_id
            self._next_frame_id += 1
        item = InputFrame(image, frame_id, time.perf_counter(), control)
        if not self._inbox.submit(SubmitFrame(self.id, item, self.input_capacity), timeout):
            raise self._closed_error()

    def _control(self, image: torch.Tensor | None, control_image: np.ndarray | torch.Tensor | None
                 ) -> dict[str, torch.Tensor] | None:
        specs = self.prompt.controlnets
        if not specs:
            if control_image is not None:
                raise FrameError(f"{self.name} uses no ControlNet: control_image is not used")
            return None
        waiting = [s.name for s in specs if s.preprocessor == PASSTHROUGH and s.name not in self._controls_given]
        if waiting and control_image is None:
            raise FrameError(f"{self.name}: controlnet(s) {waiting} take the client's control image: submit the first "
                             "frame with control_image=... (later frames reuse the last one)")
        if control_image is not None:
            self._controls_given.update(s.name for s in specs if s.preprocessor == PASSTHROUGH)
        processed = image is not None and any(spec.preprocessor != PASSTHROUGH for spec in specs)
        frame = tensor_to_frame(image[None])[0] if processed else None
        return submit_control(specs, frame, control_image, self.engine.preprocessors,
                              (self.config.width, self.config.height))

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
        return self._outputs.get(timeout)

    def poll(self) -> StreamOutput | None:
        """The oldest queued output, or None at once when there is none."""
        return self._outputs.poll()

    @property
    def dropped_outputs(self) -> int:
        """Outputs dropped (latest-wins) because they were not read before ``output_capacity`` newer ones came."""
        return self._outputs.dropped

    @property
    def finished(self) -> bool:
        """The engine will produce nothing more (the queued outputs can still be read)."""
        return self._outputs.finished

    @property
    def error(self) -> BaseException | None:
        """Why the engine ended this stream, if it failed."""
        return self._outputs.error

    # -- life cycle -----------------------------------------------------------------------------------------------

    def end_input(self) -> None:
        """No more frames: the engine runs the frames still inside the Stream Batch out, then ends the stream."""
        self._check_open()
        with self._lock:
            self._ended = True
        if not self._inbox.put(EndInput(self.id)):
            raise self._closed_error()

    def close(self) -> None:
        """Leave the engine at the next tick (frames inside are dropped). Idempotent."""
        with self._lock:
            self._close_requested = True
        self._inbox.put(CloseStream(self.id))

    @property
    def closed(self) -> bool:
        """No more frames or changes are taken: closed, input ended, or finished by the engine."""
        return self._close_requested or self._ended or self.finished

    def _check_open(self) -> None:
        if self.closed:
            raise self._closed_error()

    def _closed_error(self) -> StreamClosed:
        why = f": {self.error}" if self.error is not None else ""
        return StreamClosed(f"{self.name} is closed{why}")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
