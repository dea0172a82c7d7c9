"""The multi-stream engine: one model, one worker, many streams, every stream's rows in one U-Net call.

:class:`StreamEngine` owns the loaded model and its execution backends. Clients open :class:`~.stream.Stream`
handles, each with its own size, steps, F, cfg mode, prompt, seed, guidance and filter. Each *tick*:

1. **schedule** — changes queued since the last tick are applied (streams join and leave, settings change, all at
   once per stream); the streams with a new frame group (or frames to flush) are packed by the pure
   :class:`~.scheduler.Scheduler` into ONE U-Net call per latent-size bucket, at most ``max_batch_rows`` rows each,
   least recently served first;
2. **execute** — every chosen stream's frames pass its similarity filter and the VAE encoder; each stream *plans*
   its rows (:mod:`streamdiff.core.step`), the rows are concatenated (:mod:`.batch`), the U-Net runs once per
   bucket, and each stream *applies* its slice of the prediction; finished latents are decoded;
3. **update** — outputs go to each stream's queue and callback; the scheduler records who ran.

A stream's frames are exactly the frames it would get alone. An error in one stream's work ends that stream with
its error and nothing else: a failing batched call is retried stream by stream to find the culprit.

Two ways to drive it: synchronously, ``engine.step({stream: frame, ...})`` runs one tick in the caller's thread;
or threaded, ``engine.start()`` runs ticks in a worker thread whenever a stream has work (no polling, no sleeps),
and clients ``submit`` frames and ``get`` outputs. Either way exactly one thread touches the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..backends.base import UNetEngine, VaeEngine
from ..backends.device import resolve_device, resolve_dtype
from ..backends.keys import EngineOptions, EngineShapes
from ..config import BackendKind, CfgMode, PromptConfig, StreamConfig, StreamMode
from ..core.image import frame_to_tensor, from_model_range, tensor_to_frame, to_model_range
from ..core.schedule import slot_coefficients
from ..errors import ConfigError, EngineFull, FrameError, StreamDiffError
from ..io.resize import fit_frame
from ..models import LoadedModel, LoraSpec, load_model
from ..models.prompts import PromptEncoder
from .batch import assemble
from .scheduler import Demand, Scheduler
from .state import StreamState, StreamTask, stream_rows
from .stream import InputFrame, Stream, StreamOutput

logger = logging.getLogger(__name__)

# The frame id of padding frames (a group completed with copies of the last frame at end of input): not output.
PADDING = type("Padding", (), {"__repr__": lambda self: "PADDING"})()
_SHAPE_FIELDS = ("width", "height", "frame_buffer_size", "cfg_type", "use_denoising_batch", "mode")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and batching policy of a :class:`StreamEngine`.

    ``max_streams``: open streams at most (one more raises :class:`~streamdiff.errors.EngineFull`).
    ``max_batch_rows``: U-Net rows per call at most (compiled backends are built for 1 … this). ``batch_vae``: encode
    and decode all streams of a size in one VAE call; None batches on GPUs only (on the CPU a batch of frames cost
    no less per frame than single frames, measured). ``prompt_cache``: prompt embeddings kept.
    """

    max_streams: int = 8
    max_batch_rows: int = 16
    batch_vae: bool | None = None
    prompt_cache: int = 64

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_batch_rows", "prompt_cache"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if self.batch_vae is not None and not isinstance(self.batch_vae, bool):
            raise ConfigError(f"batch_vae={self.batch_vae!r} must be True, False or None (auto)")


# The engine of one stream (StreamPipeline, ``streamdiff run``): every configuration the stream may switch to fits in
# one call, and compiled backends are built for exactly that stream's shapes.
SINGLE_STREAM = EngineConfig(max_streams=1, max_batch_rows=4096)


@dataclass
class EngineStats:
    """Counters of an engine: ticks, U-Net calls, rows per call (recent), padding, failed streams."""

    ticks: int = 0
    unet_calls: int = 0
    unet_rows: int = 0
    padded_rows: int = 0
    streams_failed: int = 0
    recent_rows: list[int] = field(default_factory=list)  # rows of the last calls (newest last, ≤ 1000)

    def record_call(self, rows: int, padding: int) -> None:
        self.unet_calls += 1
        self.unet_rows += rows
        self.padded_rows += padding
        self.recent_rows.append(rows)
        del self.recent_rows[:-1000]


class StreamEngine:
    """A loaded model serving many streams; see the module docstring. Build with :meth:`from_pretrained`.

    ``unet``/``vae``: engines to use instead of the backend's (tests, benchmarks); ``backend`` and
    ``engine_options`` choose and configure the backend's own (compiled ones are built for the shapes streams
    need, from the engine cache, when a stream first needs them).
    """

    def __init__(
        self,
        model: LoadedModel,
        config: EngineConfig | None = None,
        *,
        unet: UNetEngine | None = None,
        vae: VaeEngine | None = None,
        backend: BackendKind | str = BackendKind.TORCH,
        engine_options: EngineOptions | None = None,
    ) -> None:
        from ..backends.factory import resolve_backend

        self.model = model
        self.config = config or EngineConfig()
        self.options = engine_options or EngineOptions()
        self.backend = resolve_backend(backend, model, self.options)
        self._given = (unet, vae)
        self.unet: UNetEngine | None = unet
        self.vae: VaeEngine | None = vae
        self._backend_shapes: EngineShapes | None = None
        self.prompts = PromptEncoder(model.tokenizer, model.text_encoder, capacity=self.config.prompt_cache)
        self.scheduler = Scheduler(self.config.max_batch_rows)
        self.batch_vae = self.config.batch_vae if self.config.batch_vae is not None else model.device.type == "cuda"
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._streams: dict[int, Stream] = {}  # open (not finished) streams, by id
        self._next_id = 1
        self._thread: threading.Thread | None = None
        self._stop = False
        self._owner: int | None = None  # the thread that runs ticks

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny",
        *,
        max_streams: int = 8,
        max_batch_rows: int = 16,
        batch_vae: bool | None = None,
        vae: str | None = None,
        loras: Sequence[LoraSpec | tuple[str, float] | str] = (),
        dtype: str | None = None,
        device: str = "auto",
        backend: BackendKind | str = BackendKind.TORCH,
        engine_options: EngineOptions | None = None,
        **load_kwargs: Any,
    ) -> StreamEngine:
        """Load ``model`` (``"tiny"``, a folder, a checkpoint file or a hub id) once. Next: :meth:`open_stream`."""
        config = EngineConfig(max_streams=max_streams, max_batch_rows=max_batch_rows, batch_vae=batch_vae)
        resolved = resolve_device(device)
        loaded = load_model(
            model, vae=vae, loras=loras, dtype=resolve_dtype(dtype, resolved), device=resolved, **load_kwargs
        )
        return cls(loaded, config, backend=backend, engine_options=engine_options)

    # -- streams --------------------------------------------------------------------------------------------------

    def open_stream(
        self,
        config: StreamConfig,
        prompt: str = "",
        negative_prompt: str = "",
        guidance_scale: float = 1.2,
        delta: float = 1.0,
        seed: int = 2,
        *,
        lossless: bool = False,
        input_capacity: int | None = None,
        output_capacity: int = 2,
        on_output: Callable[[Stream, StreamOutput], None] | None = None,
        name: str | None = None,
    ) -> Stream:
        """Open a stream; it joins at the next tick. Raises ConfigError (bad settings) or EngineFull.

        ``lossless``: submits wait for room and no output is dropped (files); otherwise latest-wins (real time).
        ``on_output(stream, output)`` is called on the engine's thread for every output (keep it quick).
        """
        if not isinstance(config, StreamConfig):
            raise ConfigError(f"config must be a StreamConfig, got {type(config).__name__}")
        settings = PromptConfig(prompt, negative_prompt, guidance_scale, delta, seed)
        self.check_settings(config, settings)
        with self._cond:
            if sum(not s.closed for s in self._streams.values()) >= self.config.max_streams:
                raise EngineFull(
                    f"the engine already serves max_streams={self.config.max_streams} streams; close one or try later"
                )
            stream = Stream(
                self, self._next_id, config, settings, lossless=lossless, input_capacity=input_capacity,
                output_capacity=output_capacity, on_output=on_output, name=name,
            )
            self._streams[stream.id] = stream
            self._next_id += 1
            self._cond.notify_all()
        logger.info("opened %s: %dx%d, steps %s, F=%d, cfg %s", stream.name, config.width, config.height,
                    list(config.t_index_list), config.frame_buffer_size, config.cfg_type.value)
        return stream

    @property
    def streams(self) -> list[Stream]:
        """The open streams."""
        with self._cond:
            return list(self._streams.values())

    def check_settings(self, config: StreamConfig, prompt: PromptConfig) -> None:
        """Raise ConfigError unless this engine can run a stream with ``config`` (any thread; touches no model)."""
        factor = self.model.vae_scale_factor
        for name in ("width", "height"):
            if getattr(config, name) % factor:
                raise ConfigError(f"{name}={getattr(config, name)} is not a multiple of the VAE factor {factor}")
        slot_coefficients(self.model.schedule, config.t_index_list, config.num_inference_steps, 1)
        self.scheduler.check_rows(stream_rows(config))
        if not isinstance(prompt, PromptConfig):
            raise ConfigError(f"prompt settings must be a PromptConfig, got {type(prompt).__name__}")

    # -- synchronous use --------------------------------------------------------------------------------------------

    def step(self, frames: Mapping[Stream, Any]) -> dict[Stream, StreamOutput]:
        """One tick in the caller's thread: ``{stream: frame}`` → ``{stream: output}`` for the streams that ran.

        A frame is uint8 ``[H, W, 3]`` (one frame; any size), ``[F, H, W, 3]`` (a group), float ``[F, 3, H, W]`` in
        [0, 1], or None for txt2img. A stream left out by the row cap keeps its frames for the next tick.
        """
        self._claim_sync()
        for stream, frame in frames.items():
            if stream.engine is not self:
                raise StreamDiffError(f"{stream.name} belongs to another engine")
            for image in _split_group(frame, stream.config.frame_buffer_size):
                stream.submit(image)
        return self._tick()

    def flush(self, stream: Stream) -> list[StreamOutput]:
        """Run the frames still inside ``stream``'s Stream Batch out (synchronous use). Their outputs, oldest first."""
        self._claim_sync()
        self._apply_changes()
        state = stream.state
        outputs: list[StreamOutput] = []
        if state is None or stream.finished:
            return outputs
        stream._drain_requested = True
        while stream._drain_requested and not stream.finished:
            produced = self._tick(only=stream)
            out = produced.get(stream)
            if out is not None and out.images is not None:
                outputs.append(out)
            if not produced:
                break
        stream._drain_requested = False
        return outputs

    def _claim_sync(self) -> None:
        if self._thread is not None:
            raise StreamDiffError("the engine is running in its worker thread (start()); submit frames instead")

    # -- threaded use -----------------------------------------------------------------------------------------------

    def start(self) -> StreamEngine:
        """Run ticks in a worker thread whenever a stream has work. Idempotent. Next: ``stream.submit(...)``."""
        with self._cond:
            if self._thread is not None:
                return self
            self._stop = False
            self._thread = threading.Thread(target=self._worker, name="streamdiff-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = False, timeout: float = 30.0) -> None:
        """Stop the worker. ``drain``: first end every stream's input and run its frames out. Streams are closed."""
        if drain and self._thread is not None:
            for stream in self.streams:
                if not stream.closed:
                    stream.end_input()
            deadline = time.monotonic() + timeout
            with self._cond:
                while self._streams and time.monotonic() < deadline:
                    self._cond.wait(0.1)
        with self._cond:
            self._stop = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.error("the engine worker did not stop within %.1f s", timeout)
        for stream in self.streams:
            self._remove(stream, None)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> StreamEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _worker(self) -> None:
        logger.info("engine worker started (%s, %s, max_streams=%d, max_batch_rows=%d)", self.model.device,
                    str(self.model.dtype).removeprefix("torch."), self.config.max_streams, self.config.max_batch_rows)
        while True:
            with self._cond:
                while not self._stop and not self._has_work():
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - a bug outside any stream's work: log it, end the streams, stop
                logger.exception("engine tick failed; closing every stream")
                for stream in self.streams:
                    self._remove(stream, StreamDiffError("the engine failed; see its log"))
                break
        logger.info("engine worker stopped")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _queue_input(self, stream: Stream, item: InputFrame, timeout: float | None) -> None:
        """A handle's submit: latest-wins drops the oldest frame; lossless waits for room."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            capacity = stream.input_capacity
            if stream.lossless:
                while len(stream._inputs) >= capacity and not stream.finished and not self._stop:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"{stream.name}: no room in the input queue within {timeout} s")
                    self._cond.wait(left)
                stream._check_open()
            stream._inputs.append(item)
            while len(stream._inputs) > capacity:
                stream._inputs.popleft()
                stream.stats.dropped_inputs += 1
            self._cond.notify_all()

    def _has_work(self) -> bool:
        for stream in self._streams.values():
            if stream.state is None or stream._pending is not None or stream._close_requested:
                return True
            if self._ready(stream):
                return True
        return False

    def _ready(self, stream: Stream) -> bool:
        state = stream.state
        if state is None or stream.finished or not stream._has_output_room():
            return False
        return len(stream._inputs) >= state.config.frame_buffer_size or stream._drain_requested

    # -- one tick: schedule → execute → update ---------------------------------------------------------------------

    def _tick(self, only: Stream | None = None) -> dict[Stream, StreamOutput]:
        started = time.perf_counter()
        self._apply_changes()
        with self._cond:
            candidates = [only] if only is not None else list(self._streams.values())
            ready = [s for s in candidates if s.id in self._streams and self._ready(s)]
        outputs: dict[Stream, StreamOutput] = {}
        finished_drains = [s for s in ready if s._drain_requested and not s._inputs and not s.state.frames_inside]
        for stream in finished_drains:
            self._end_drain(stream)
        ready = [s for s in ready if s not in finished_drains]
        if not ready:
            return outputs
        by_id = {s.id: s for s in ready}
        plan = self.scheduler.schedule([Demand(s.id, s.state.latent_shape, s.state.rows) for s in ready])
        tasks: dict[Stream, StreamTask] = {}
        self._prepare([by_id[sid] for sid in plan.stream_ids], tasks, outputs)
        for call in plan.calls:
            members = [(by_id[sid], tasks[by_id[sid]]) for sid in call.stream_ids if by_id[sid] in tasks]
            for round_index in range(max((t.rounds for _, t in members), default=0)):
                self._run_unet([(s, t) for s, t in members if s in tasks and round_index < t.rounds], round_index)
        self._finish(tasks, outputs)
        self.scheduler.served([s.id for s in ready if s.id in plan.stream_ids])
        self.stats.ticks += 1
        for stream, output in outputs.items():
            self._deliver(stream, output, started)
        return outputs

    def _prepare(self, streams: list[Stream], tasks: dict[Stream, StreamTask], outputs: dict[Stream, StreamOutput]
                 ) -> None:
        """Take each stream's frame group, run its filter and the VAE encoder, and make its task."""
        to_encode: list[tuple[Stream, torch.Tensor, tuple[Any, ...]]] = []
        for stream in streams:
            try:
                state = stream.state
                assert state is not None
                f = state.config.frame_buffer_size
                with self._cond:
                    group = [stream._inputs.popleft() for _ in range(min(f, len(stream._inputs)))]
                    self._cond.notify_all()  # lossless submitters waiting for room
                if not group:  # draining: pad with the newest latents, no output of its own
                    tasks[stream] = state.task(state.last_latents, None)
                    continue
                stream.stats.frames_in += len(group)
                ids = tuple(item.frame_id for item in group) + (PADDING,) * (f - len(group))
                group += [group[-1]] * (f - len(group))  # end of input inside a group: pad with the last frame
                if state.config.mode is StreamMode.TXT2IMG:
                    tasks[stream] = state.task(state.entry_latents(None), ids)
                    continue
                images = torch.stack([_fit(item.image, state.config) for item in group])
                model_input = to_model_range(images.to(self.model.device, self.model.dtype))
                if state.filter.decide(model_input).skip:
                    stream.stats.filter_skips += len(group)
                    outputs[stream] = _output(state.last_output, ids, state.version, skipped=True)
                    continue
                to_encode.append((stream, model_input, ids))
            except Exception as error:  # noqa: BLE001 - this stream's work failed: it ends, the others go on
                self._fail(stream, error)
        for (stream, _, ids), latents in zip(to_encode, self._vae_calls("encode", [x for _, x, _ in to_encode],
                                                                       [s for s, _, _ in to_encode])):
            if latents is not None:
                tasks[stream] = stream.state.task(stream.state.entry_latents(latents), ids)
        for stream in [s for s in tasks if s.finished]:
            tasks.pop(stream)

    def _run_unet(self, members: list[tuple[Stream, StreamTask]], round_index: int) -> None:
        """ONE U-Net call over the members' rows; on failure, each member alone (to find whose work fails)."""
        planned = []
        for stream, task in members:
            try:
                planned.append((stream, task, task.plan(round_index)))
            except Exception as error:  # noqa: BLE001
                self._fail(stream, error)
        if not planned:
            return
        unet = self._unet()
        batch_sizes = getattr(unet, "batch_sizes", None)
        try:
            assembled = assemble([rows for _, _, rows in planned], batch_sizes)
            prediction = unet(assembled.rows.sample, assembled.rows.timesteps, assembled.rows.embeddings)
            self.stats.record_call(assembled.rows.rows - assembled.padding, assembled.padding)
            slices = assembled.split(prediction)
        except Exception as error:  # noqa: BLE001
            if len(planned) == 1:
                self._fail(planned[0][0], error)
                return
            logger.warning("a batched U-Net call of %d streams failed (%s); retrying each alone", len(planned), error)
            for stream, task in [(s, t) for s, t, _ in planned]:
                self._run_unet([(stream, task)], round_index)
            return
        for (stream, task, _), prediction in zip(planned, slices):
            try:
                task.apply(round_index, prediction)
                stream.stats.unet_calls += 1
            except Exception as error:  # noqa: BLE001
                self._fail(stream, error)

    def _finish(self, tasks: dict[Stream, StreamTask], outputs: dict[Stream, StreamOutput]) -> None:
        """Decode what leaves each Stream Batch this tick."""
        leaving: list[tuple[Stream, torch.Tensor, tuple[Any, ...]]] = []
        for stream, task in tasks.items():
            if stream.finished:
                continue
            try:
                x0, ids = task.finish()
            except Exception as error:  # noqa: BLE001
                self._fail(stream, error)
                continue
            if x0 is None:
                outputs[stream] = StreamOutput(None, False, (), stream.state.version)
            else:
                leaving.append((stream, x0, ids))
        decoded = self._vae_calls("decode", [x0 for _, x0, _ in leaving], [s for s, _, _ in leaving])
        for (stream, _, ids), images in zip(leaving, decoded):
            if images is None:
                continue
            images = from_model_range(images).float().cpu()
            state = stream.state
            state.last_output = images
            output = _output(images, ids, state.version)
            stream.stats.frames_out += len(output.frame_ids)
            outputs[stream] = output

    def _vae_calls(self, method: str, inputs: list[torch.Tensor], streams: list[Stream]) -> list[torch.Tensor | None]:
        """``vae.encode``/``decode`` of every input: one call per shape when batching, else one per stream.

        A failing batched call is retried per stream; a stream whose own call fails ends (its slot is None).
        """
        vae = self._vae()
        results: list[torch.Tensor | None] = [None] * len(inputs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, tensor in enumerate(inputs):
            groups.setdefault(tuple(tensor.shape[1:]), []).append(i)
        for members in groups.values():
            if self.batch_vae and len(members) > 1:
                try:
                    out = getattr(vae, method)(torch.cat([inputs[i] for i in members]))
                    sizes = [inputs[i].shape[0] for i in members]
                    for i, part in zip(members, torch.split(out, sizes)):
                        results[i] = part
                    continue
                except Exception as error:  # noqa: BLE001
                    logger.warning("a batched VAE %s failed (%s); retrying each stream alone", method, error)
            for i in members:
                try:
                    results[i] = getattr(vae, method)(inputs[i])
                except Exception as error:  # noqa: BLE001
                    self._fail(streams[i], error)
        return results

    def _deliver(self, stream: Stream, output: StreamOutput, started: float) -> None:
        output.started, output.finished = started, time.perf_counter()
        try:
            stream._deliver(output)
        except Exception as error:  # noqa: BLE001 - the stream's own callback failed
            self._fail(stream, error)

    # -- changes between ticks -------------------------------------------------------------------------------------

    def _apply_changes(self) -> None:
        """Opens, settings changes and closes queued since the last tick (owner thread only)."""
        with self._cond:
            streams = list(self._streams.values())
        for stream in streams:
            if stream._close_requested:
                self._remove(stream, None)
                continue
            try:
                if stream.state is None:
                    pending = stream._take_pending()
                    config, prompt = (pending[0], pending[1]) if pending else stream._requested
                    stream.state = self._new_state(config, prompt)
                    stream.state.version = pending[2] if pending else stream.version
                    continue
                pending = stream._take_pending()
                if pending is not None:
                    self._change(stream, *pending)
            except Exception as error:  # noqa: BLE001 - e.g. a compiled backend that cannot be built for it
                self._fail(stream, error)

    def _new_state(self, config: StreamConfig, prompt: PromptConfig) -> StreamState:
        self.prepare_backends(config)
        cond, uncond = self._encode(config, prompt)
        factor = self.model.vae_scale_factor
        latent_shape = (self.model.latent_channels, config.height // factor, config.width // factor)
        return StreamState.create(config, prompt, self.model.schedule, latent_shape, cond, uncond,
                                  self.model.device, self.model.dtype)

    def _change(self, stream: Stream, config: StreamConfig, prompt: PromptConfig, version: int) -> None:
        """Apply one validated settings change, atomically (the state is replaced or edited before the next use)."""
        state = stream.state
        assert state is not None
        old = state.config
        reshape = any(getattr(config, k) != getattr(old, k) for k in _SHAPE_FIELDS) or (
            config.denoising_steps != old.denoising_steps
        )
        if reshape:
            dropped = state.frames_inside
            stream.stats.dropped_on_reconfigure += dropped
            new_state = self._new_state(config, prompt)
            if (config.width, config.height) == (old.width, old.height) and config.frame_buffer_size == (
                old.frame_buffer_size
            ):
                new_state.last_output = state.last_output
            new_state.version = version
            stream.state = new_state
            logger.info("%s reconfigured (%s); %d frame(s) inside dropped", stream.name,
                        ", ".join(k for k in _SHAPE_FIELDS if getattr(config, k) != getattr(old, k)) or "steps",
                        dropped)
            return
        if config != old:
            state.set_schedule(config, self.model.schedule)
            state.filter.config = config.filter
        if prompt.prompt != state.prompt.prompt or prompt.negative_prompt != state.prompt.negative_prompt:
            state.set_conditioning(*self._encode(config, prompt))
        if prompt.seed != state.prompt.seed:
            state.set_seed(prompt.seed)
        state.guidance.scale = float(prompt.guidance_scale)
        state.guidance.delta = float(prompt.delta)
        state.prompt = prompt
        state.version = version

    def _encode(self, config: StreamConfig, prompt: PromptConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = self.prompts.encode(prompt.prompt)
        needs_negative = config.cfg_type in (CfgMode.FULL, CfgMode.INITIALIZE)
        return cond, self.prompts.encode(prompt.negative_prompt) if needs_negative else None

    def _end_drain(self, stream: Stream) -> None:
        stream._drain_requested = False
        if stream._close_after_drain:
            self._remove(stream, None)
        elif stream.state is not None:
            stream.state.reset()

    def _fail(self, stream: Stream, error: BaseException) -> None:
        """End ``stream`` with ``error``; the engine and the other streams go on."""
        if stream.finished:
            return
        self.stats.streams_failed += 1
        logger.error("%s failed and was closed: %s: %s", stream.name, type(error).__name__, error,
                     exc_info=not isinstance(error, StreamDiffError))
        self._remove(stream, error)

    def _remove(self, stream: Stream, error: BaseException | None) -> None:
        with self._cond:
            known = self._streams.pop(stream.id, None) is not None
            stream._inputs.clear()
            self._cond.notify_all()
        if known:
            self.scheduler.forget(stream.id)
            if error is None:
                logger.info("closed %s (%d frames in, %d out)", stream.name, stream.stats.frames_in,
                            stream.stats.frames_out)
        stream._close_requested = True
        stream._finish(error)

    # -- backends ---------------------------------------------------------------------------------------------------

    def prepare_backends(self, config: StreamConfig) -> None:
        """Load (and build, if compiled and not cached) the engines a stream with ``config`` needs, now.

        Otherwise this happens when the first stream of a new frame size joins. A single-stream engine (the
        pipeline's) builds for exactly that stream's shapes; a multi-stream one for 1 … ``max_batch_rows`` U-Net
        rows and every frame size its streams use.
        """
        given_unet, given_vae = self._given
        if given_unet is not None and given_vae is not None:
            return
        compiled = self.backend is not BackendKind.TORCH or self.options.compile
        if self.config.max_streams == 1:
            shapes = EngineShapes.for_config(config, self.options)
        else:
            sizes = tuple(sorted(set(self._backend_shapes.sizes if self._backend_shapes else ()) |
                                 {(config.width, config.height)}))
            shapes = EngineShapes.for_engine(self.config.max_batch_rows, self.config.max_streams, sizes)
        if self.unet is not None and self.vae is not None and (not compiled or shapes == self._backend_shapes):
            return
        from ..backends.factory import create_engines

        logger.info("preparing %s engines for %s", self.backend.value, shapes)
        unet, vae = create_engines(self.backend, self.model, shapes, self.options)
        self.unet = given_unet or unet
        self.vae = given_vae or vae
        self._backend_shapes = shapes

    def _unet(self) -> UNetEngine:
        assert self.unet is not None, "no stream has opened yet"
        return self.unet

    def _vae(self) -> VaeEngine:
        assert self.vae is not None, "no stream has opened yet"
        return self.vae


def _output(images: torch.Tensor | None, ids: tuple[Any, ...], version: int, skipped: bool = False) -> StreamOutput:
    """A stream's output, without the frames that only padded a group at end of input."""
    if images is not None and PADDING in ids:
        real = [i for i, frame_id in enumerate(ids) if frame_id is not PADDING]
        images, ids = images[real], tuple(ids[i] for i in real)
    return StreamOutput(images, skipped, ids if images is not None or skipped else (), version)


def _fit(image: torch.Tensor, config: StreamConfig) -> torch.Tensor:
    """A queued frame at the stream's current size (frames queued before a size change are resized here)."""
    if tuple(image.shape[1:]) == (config.height, config.width):
        return image
    return frame_to_tensor(fit_frame(tensor_to_frame(image[None])[0], config.width, config.height))[0]


def _split_group(frame: Any, frames: int) -> list[Any]:
    """A ``step()`` input as single frames: a group of F is split; one frame (F = 1) or None passes as is."""
    if frame is None:
        return [None] * frames
    if isinstance(frame, np.ndarray) and frame.ndim == 4:
        group = list(frame)
    elif isinstance(frame, torch.Tensor) and frame.ndim == 4:
        group = list(frame)
    else:
        group = [frame]
    if len(group) != frames:
        raise FrameError(f"got {len(group)} frame(s) for a stream with frame_buffer_size={frames}")
    return group
