"""The multi-stream engine: one model, one worker, many streams, every stream's rows in one U-Net call.

:class:`StreamEngine` owns the loaded model and its execution backends. Clients open :class:`~.stream.Stream`
handles, each with its own size, steps, F, cfg mode, prompt, seed, guidance and filter. Each *tick*:

1. **schedule** — the messages clients queued in the engine's one :class:`~.inbox.Inbox` since the last tick are
   taken into the engine's own :class:`~.records.StreamRecord` s (streams join and leave, frames arrive, the
   newest settings change of each stream applies, all at once); the streams with a new frame group (or frames
   to flush) are packed by the pure :class:`~.scheduler.Scheduler` into ONE U-Net call per latent-size bucket,
   at most ``max_batch_rows`` rows each, least recently served first;
2. **execute** — every chosen stream's frames pass its similarity filter and the VAE encoder; each stream *plans*
   its rows (:mod:`streamdiff.core.step`), the rows are concatenated (:mod:`.batch`), the U-Net runs once per
   bucket, and each stream *applies* its slice of the prediction; finished latents are decoded;
3. **update** — outputs go to each stream's :class:`~.outputs.OutputQueue` and callback; the scheduler records
   who ran.

A stream's frames are exactly the frames it would get alone. An error in one stream's work ends that stream with
its error and nothing else: a failing batched call is retried stream by stream to find the culprit.

Two ways to drive it: synchronously, ``engine.step({stream: frame, ...})`` runs one tick in the caller's thread;
or threaded, ``engine.start()`` runs ticks in a worker thread whenever a stream has work (no polling, no sleeps),
and clients ``submit`` frames and ``get`` outputs. Either way exactly one thread touches the model.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

from ..backends.base import ControlNetEngine, UNetEngine, VaeEngine
from ..backends.cuda_graphs import CudaGraphs, tune_torch_cuda
from ..backends.cuda_ops import DEFAULT_CUDA
from ..backends.keys import EngineOptions, EngineShapes, tuned_size
from ..backends.torch_backend import TorchControlNet
from ..config import BackendKind, ControlNetSpec, PromptConfig, Quantization, StreamConfig, check_int
from ..core.schedule import slot_coefficients
from ..errors import ConfigError, FrameError, StreamClosed, StreamDiffError
from ..models import LoadedModel, LoraSpec, load_model
from ..models.ip_adapter import ImagePromptEncoder
from ..models.controlnet import Preprocessor, builtin_preprocessors, check_family, check_name, load_controlnet
from ..models.prompts import PromptEncoder
from .scheduler import Demand, Scheduler
from .changes import StateBuilder, reshapes
from .limits import EngineConfig, EngineStats
from .execute import Executor
from .tick_graph import TickGraphs
from .inbox import ChangeSettings, Inbox, InputFrame, OpenStream, StopEngine
from .outputs import OutputQueue, StreamOutput
from .records import StreamRecord, take_messages
from .state import StreamStats, stream_rows
from .stream import Stream
from .shapes import SizeRule, size_rule

logger = logging.getLogger(__name__)


class StreamEngine:
    """A loaded model serving many streams; see the module docstring. Build with :meth:`from_pretrained`.

    ``unet``/``vae``: engines to use instead of the backend's (tests, benchmarks); ``backend`` and
    ``engine_options`` choose and configure the backend's own (compiled ones are built for the shapes streams
    need, from the engine cache, when a stream first needs them). ``cuda``: the CUDA seam
    (:class:`~streamdiff.backends.cuda_ops.TorchCuda`; tests pass a CPU fake). ``controlnets``: the ControlNets
    streams may use, by the name streams give (a ``ControlNetModel``, a folder, a hub id or ``tiny``);
    ``preprocessors``: control-image preprocessors besides ``canny`` and ``passthrough``, by name
    (:mod:`streamdiff.models.controlnet`).
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
        cuda: Any = None,
        controlnets: Mapping[str, Any] | None = None,
        preprocessors: Mapping[str, Preprocessor] | None = None,
    ) -> None:
        from ..backends.factory import resolve_backend

        self.model = model
        self.config = config or EngineConfig()
        self.options = engine_options or EngineOptions()
        self.backend = resolve_backend(backend, model, self.options)
        self.size_rule: SizeRule = size_rule(model, self.backend, self.options, self.config)
        self._given = (unet, vae)
        self.unet: UNetEngine | None = unet
        self.vae: VaeEngine | None = vae
        self._backend_shapes: EngineShapes | None = None
        self._backend_artifacts: frozenset[str] = frozenset()  # cache entries the current engines were made from
        self.prompts = PromptEncoder.for_model(model, capacity=self.config.prompt_cache)
        self.scheduler = Scheduler(self.config.max_batch_rows)
        self.batch_vae = self.config.batch_vae if self.config.batch_vae is not None else model.device.type == "cuda"
        self.stats = EngineStats()
        self.images = (ImagePromptEncoder(model.ip_adapter, capacity=self.config.image_prompt_cache)
                       if model.ip_adapter is not None else None)
        self.states = StateBuilder(model, self.prompts, self.prepare_backends, self.images)
        self._inbox = Inbox()  # the one way in: clients' messages
        sdxl = model.sdxl is not None
        self.controlnets = {
            check_name(name): check_family(name, load_controlnet(source, model.device, model.dtype, sdxl=sdxl), sdxl)
            for name, source in (controlnets or {}).items()}
        # The engines the executor calls, by name: eager until the backend's are made (prepare_backends).
        self.controlnet_engines: dict[str, ControlNetEngine] = {
            name: TorchControlNet(module) for name, module in self.controlnets.items()}
        self.graphs = self._cuda_graphs(cuda)
        on_cuda = model.device.type == "cuda" or cuda is not None
        self.preprocessors = {**builtin_preprocessors(), **(preprocessors or {})}
        seam = cuda or DEFAULT_CUDA
        ticks = None
        if self.graphs is not None and self.graphs.ticks is not None:
            ticks = TickGraphs(self.graphs.ticks, self._raw_backends,
                               lambda shape, dtype: seam.empty(shape, dtype, model.device), model.dtype,
                               self.batch_vae)
        self.executor = Executor(model, self._backends, self.stats.record_call, self.batch_vae, self._take_inputs,
                                 self._fail, to_host=seam.to_host if on_cuda else torch.Tensor.cpu,
                                 controlnets=self.controlnet_engines, preprocessors=self.preprocessors,
                                 ticks=ticks, host_filter=on_cuda)
        self._records: dict[int, StreamRecord] = {}  # open streams, by id: only the thread that runs ticks
        self._ids = itertools.count(1)
        self._life = threading.Lock()  # start/stop
        self._thread: threading.Thread | None = None
        self._stopping = False  # the worker took the stop sentinel

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
        controlnets: Mapping[str, Any] | None = None,
        **load_kwargs: Any,
    ) -> StreamEngine:
        """Load ``model`` (``"tiny"``, a folder, a checkpoint file or a hub id) once, with the named ``controlnets``
        (``{"canny": "ID_OR_PATH"}``, ``tiny`` for the built-in one). Next: :meth:`open_stream`."""
        config = EngineConfig(max_streams=max_streams, max_batch_rows=max_batch_rows, batch_vae=batch_vae)
        loaded = load_model(model, vae=vae, loras=loras, dtype=dtype, device=device, **load_kwargs)
        return cls(loaded, config, backend=backend, engine_options=engine_options, controlnets=controlnets)

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
        reference_image: Any = None,
        ip_adapter_scale: float = 1.0,
        controlnets: Sequence[ControlNetSpec | dict[str, Any] | str] = (),
        lossless: bool = False,
        input_capacity: int | None = None,
        output_capacity: int = 2,
        on_output: Callable[[Stream, StreamOutput], None] | None = None,
        name: str | None = None,
    ) -> Stream:
        """Open a stream; it joins at the next tick. Raises ConfigError (bad settings) or EngineFull.

        ``lossless``: submits wait for room and no output is dropped (files); otherwise latest-wins (real time).
        ``on_output(stream, output)`` is called on the engine's thread for every output (keep it quick).
        ``reference_image`` (uint8 ``[H, W, 3]``, a PIL image or a :class:`~streamdiff.config.ReferenceImage`) and
        ``ip_adapter_scale``: the stream's image prompt, for a model with an IP-Adapter (both change live).
        ``controlnets``: the engine's ControlNets this stream uses (:class:`~streamdiff.config.ControlNetSpec`).
        """
        if not isinstance(config, StreamConfig):
            raise ConfigError(f"config must be a StreamConfig, got {type(config).__name__}")
        settings = PromptConfig(prompt, negative_prompt, guidance_scale, delta, seed,
                                ip_adapter_scale=ip_adapter_scale, reference_image=reference_image,
                                controlnets=tuple(controlnets))
        self.check_settings(config, settings)
        if input_capacity is not None:
            input_capacity = check_int("input_capacity", input_capacity, 1)
        output_capacity = check_int("output_capacity", output_capacity, 1)
        stream_id = next(self._ids)
        name = name or f"stream-{stream_id}"
        outputs = OutputQueue(output_capacity, bool(lossless), name, on_room=self._inbox.notify)
        stats = StreamStats()
        stream = Stream(self, stream_id, config, settings, inbox=self._inbox, outputs=outputs, stats=stats,
                        input_capacity=input_capacity, on_output=on_output, name=name)
        record = StreamRecord(stream, outputs, stats, config, settings, on_output)
        self._inbox.open(OpenStream(record), self.config.max_streams)
        logger.info("opened %s: %dx%d, steps %s, F=%d, cfg %s", stream.name, config.width, config.height,
                    list(config.t_index_list), config.frame_buffer_size, config.cfg_type.value)
        return stream

    @property
    def streams(self) -> list[Stream]:
        """The open streams (opened and not yet finished), oldest first."""
        return self._inbox.handles()

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this (the model's VAE factor, × its U-Net down factor when traced)."""
        return self.size_rule.multiple

    @property
    def size_range(self) -> tuple[int, int]:
        """The (smallest, largest) frame side this engine runs."""
        return self.size_rule.min_side, self.size_rule.max_side

    @property
    def allowed_sizes(self) -> tuple[tuple[int, int], ...] | None:
        """The only (width, height) sizes streams may use, or None: any multiple of ``size_multiple`` in range."""
        return self.size_rule.sizes

    def check_settings(self, config: StreamConfig, prompt: PromptConfig) -> None:
        """Raise ConfigError unless this engine can run a stream with ``config`` (any thread; touches no model)."""
        self.size_rule.check(config.width, config.height)
        slot_coefficients(self.model.schedule, config.t_index_list, config.num_inference_steps, 1)
        self.scheduler.check_rows(stream_rows(config))
        if not isinstance(prompt, PromptConfig):
            raise ConfigError(f"prompt settings must be a PromptConfig, got {type(prompt).__name__}")
        if prompt.reference_image is not None and self.model.ip_adapter is None:
            raise ConfigError("a reference_image (image prompt) needs a model with an IP-Adapter "
                              "(load_model(..., ip_adapter=...), --ip-adapter)", field="reference_image",
                              value="an image", allowed="None (this model has no IP-Adapter)")
        self.check_controlnets(prompt.controlnets)

    def check_controlnets(self, specs: Sequence[ControlNetSpec]) -> None:
        """Raise ConfigError unless this engine offers every ControlNet and preprocessor ``specs`` name and its U-Net
        takes ControlNet residuals (checked when a stream opens or changes, never mid-stream)."""
        for spec in specs:
            if spec.name not in self.controlnets:
                allowed = ", ".join(sorted(self.controlnets)) or "none (build the engine with controlnets=...)"
                raise ConfigError(f"controlnet {spec.name!r} is not one this engine offers: {allowed}",
                                  field="controlnets", value=spec.name, allowed=allowed)
            if spec.preprocessor not in self.preprocessors:
                allowed = ", ".join(sorted(self.preprocessors))
                raise ConfigError(f"preprocessor {spec.preprocessor!r} of controlnet {spec.name!r} is not one of "
                                  f"{allowed}", field="preprocessor", value=spec.preprocessor, allowed=allowed)
        if not specs:
            return
        if self.graphs is not None:  # every backend takes residual inputs; the torch backend's CUDA graphs do not
            raise ConfigError("ControlNet needs a U-Net that takes residual inputs; the torch backend with CUDA graphs "
                              "does not", field="controlnets", value=[s.name for s in specs],
                              allowed="[] on this engine; ControlNet on an engine with cuda_graphs=False")

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
        self.apply_messages()
        record = self._records.get(stream.id)
        outputs: list[StreamOutput] = []
        if record is None or record.state is None or record.finished:
            return outputs
        record.draining = True
        while record.draining and not record.finished:
            produced = self._tick(only=record)
            out = produced.get(stream)
            if out is not None and out.images is not None:
                outputs.append(out)
            if not produced:
                break
        record.draining = False
        return outputs

    def apply_messages(self) -> bool:
        """Synchronous use: apply what clients queued (opens, frames, changes, ends, closes) now, as the next tick's
        schedule phase would, without running a tick; afterwards a new stream has its :attr:`Stream.state`."""
        self._claim_sync()
        return self._apply_messages()

    def _claim_sync(self) -> None:
        if self._thread is not None:
            raise StreamDiffError("the engine is running in its worker thread (start()); submit frames instead")

    # -- threaded use -----------------------------------------------------------------------------------------------

    def start(self) -> StreamEngine:
        """Run ticks in a worker thread whenever a stream has work. Idempotent. Next: ``stream.submit(...)``."""
        with self._life:
            if self._thread is not None:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="streamdiff-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = False, timeout: float = 30.0) -> None:
        """Stop the worker. ``drain``: first end every stream's input and run its frames out. Streams are closed."""
        with self._life:
            thread = self._thread
            if drain and thread is not None:
                for stream in self.streams:
                    try:
                        stream.end_input()
                    except StreamClosed:
                        pass  # it was closed or ended already: it leaves by itself
                if not self._inbox.wait_empty(timeout):
                    logger.warning("streams still running after %.1f s of draining; closing them", timeout)
            if thread is not None:
                self._inbox.put(StopEngine())
                thread.join(timeout)
                if thread.is_alive():
                    logger.error("the engine worker did not stop within %.1f s", timeout)
                    return
                self._thread = None
            self._apply_messages()  # this thread owns the records now: take what came after the sentinel
            for record in list(self._records.values()):
                self._remove(record, None)
            self._stopping = False

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
        while not self._stopping:
            self._inbox.wait(self._has_work)
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - a bug outside any stream's work: log it, end the streams, stop
                logger.exception("engine tick failed; closing every stream")
                for record in list(self._records.values()):
                    self._remove(record, StreamDiffError("the engine failed; see its log"))
                break
        logger.info("engine worker stopped")

    def _has_work(self) -> bool:
        return any(record.ready() for record in self._records.values())

    def _take_inputs(self, record: StreamRecord, frames: int) -> list[InputFrame]:
        """The executor takes a stream's next group: room again for its lossless submitters."""
        group = record.take_inputs(frames)
        self._inbox.release(record.id, len(group))
        return group

    # -- one tick: schedule → execute → update ---------------------------------------------------------------------

    def _tick(self, only: StreamRecord | None = None) -> dict[Stream, StreamOutput]:
        started = time.perf_counter()
        if not self._apply_messages():
            return {}
        candidates = [only] if only is not None else list(self._records.values())
        ready = [r for r in candidates if r.id in self._records and r.ready()]
        for record in [r for r in ready if r.drained()]:
            self._end_drain(record)
            ready.remove(record)
        if not ready:
            return {}
        by_id = {r.id: r for r in ready}
        plan = self.scheduler.schedule([Demand(r.id, r.state.latent_shape, r.state.rows) for r in ready])
        outputs = self.executor.run([[by_id[sid] for sid in call.stream_ids] for call in plan.calls])
        self.scheduler.served(plan.stream_ids)
        self.stats.ticks += 1
        for record, output in outputs.items():
            self._deliver(record, output, started)
        return {record.stream: output for record, output in outputs.items()}

    def _deliver(self, record: StreamRecord, output: StreamOutput, started: float) -> None:
        output.started, output.finished = started, time.perf_counter()
        record.outputs.put(output)
        if record.on_output is not None:
            try:
                record.on_output(record.stream, output)
            except Exception as error:  # noqa: BLE001 - the stream's own callback failed
                self._fail(record, error)

    # -- messages and changes between ticks ------------------------------------------------------------------------

    def _apply_messages(self) -> bool:
        """The schedule phase's first half (owner thread only): take the inbox's messages into the records, then
        closes, opens and each stream's newest pending change take effect. False once the stop sentinel came."""
        if not take_messages(self._records, self._inbox.drain(), self._inbox.release):
            self._stopping = True
        for record in list(self._records.values()):
            if record.closing:
                self._remove(record, None)
                continue
            change, record.pending = record.pending, None
            try:
                if record.state is None:
                    config, prompt, version = (change.config, change.prompt, change.version) if change else (
                        record.config, record.prompt, 0)
                    record.set_state(self.states.create(config, prompt, version))
                elif change is not None:
                    self._change(record, change)
            except Exception as error:  # noqa: BLE001 - e.g. a compiled backend that cannot be built for it
                self._fail(record, error)
        return not self._stopping

    def _change(self, record: StreamRecord, change: ChangeSettings) -> None:
        """Apply one validated change to ``record``, atomically (before the next tick uses its state)."""
        old = record.state
        assert old is not None
        changed = reshapes(old.config, change.config)
        record.set_state(self.states.change(old, change.config, change.prompt, change.version))
        if record.state is not old and self.executor.ticks is not None:
            self.executor.ticks.forget(old)  # the graphs that read the old state's buffers are of no more use
        if changed:
            dropped = old.frames_inside
            record.stats.dropped_on_reconfigure += dropped
            logger.info("%s reconfigured (%s); %d frame(s) inside dropped", record.name, ", ".join(changed), dropped)

    def _end_drain(self, record: StreamRecord) -> None:
        record.draining = False
        if record.close_after_drain:
            self._remove(record, None)
        elif record.state is not None:
            record.state.reset()

    def _fail(self, record: StreamRecord, error: BaseException) -> None:
        """End ``record``'s stream with ``error``; the engine and the other streams go on."""
        if record.finished:
            return
        self.stats.streams_failed += 1
        logger.error("%s failed and was closed: %s: %s", record.name, type(error).__name__, error,
                     exc_info=not isinstance(error, StreamDiffError))
        self._remove(record, error)

    def _remove(self, record: StreamRecord, error: BaseException | None) -> None:
        known = self._records.pop(record.id, None) is not None
        record.inputs.clear()
        record.outputs.finish(error)  # first: a submitter refused below already sees the stream's error
        self._inbox.forget(record.id)
        if self.executor.ticks is not None and record.state is not None:
            self.executor.ticks.forget(record.state)
        if known:
            self.scheduler.forget(record.id)
            if error is None:
                logger.info("closed %s (%d frames in, %d out)", record.name, record.stats.frames_in,
                            record.stats.frames_out)

    # -- backends ---------------------------------------------------------------------------------------------------

    def prepare_backends(self, config: StreamConfig) -> None:
        """Load (and build, if compiled and not cached) the engines a stream with ``config`` needs, now.

        Otherwise this happens when the first stream joins. A single-stream engine (the pipeline's) builds for
        exactly that stream's shapes (its own size change rebuilds them). A multi-stream one builds once for
        1 … ``max_batch_rows`` U-Net rows, the whole side range of :attr:`size_range` and every listed size
        (:attr:`allowed_sizes`): a size :meth:`check_settings` accepts never rebuilds the engines, so no client
        can stall the others' streams with a rebuild.
        """
        from dataclasses import replace

        from ..backends.factory import create_backend, engine_steps

        given_unet, given_vae = self._given
        if given_unet is not None and given_vae is not None:
            return
        self.size_rule.check(config.width, config.height)
        if self.options.quantize is Quantization.INT8 and self.options.calibration.t_index_list is None:
            # int8 calibrates at the first stream's timesteps; later streams reuse that engine (no rebuild)
            self.options = replace(self.options, calibration=self.options.calibration.for_stream(config))
        options = self.options
        if self.config.max_streams == 1:
            shapes = EngineShapes.for_config(config, options)
        else:
            rule = self.size_rule
            options = replace(options, min_resolution=rule.min_side, max_resolution=rule.max_side)
            sizes = tuple(sorted(set(self._backend_shapes.sizes if self._backend_shapes else ()) |
                                 set(rule.sizes or ()) | {(config.width, config.height)}))
            shapes = EngineShapes.for_engine(self.config.max_batch_rows, self.config.max_streams, sizes,
                                             opt_size=tuned_size(rule.sizes) if rule.sizes else None)
        artifacts = frozenset(step.key.name for step in engine_steps(self.backend, self.model, shapes, options,
                                                                     self.controlnets)[1])
        if self.unet is not None and self.vae is not None and artifacts == self._backend_artifacts:
            self._backend_shapes = shapes
            return
        logger.info("preparing %s engines for %s", self.backend.value, shapes)
        made = create_backend(self.backend, self.model, shapes, options, max_shapes=self.config.max_shapes,
                              cuda_graphs=self.backend is BackendKind.TENSORRT and self._wants_cuda_graphs(),
                              controlnets=self.controlnets)
        self.unet = given_unet or made.unet
        self.vae = given_vae or made.vae
        if given_unet is None:  # ControlNets run beside the backend's own U-Net (whose inputs they fit)
            self.controlnet_engines.update(made.controlnets)
        if self.backend is BackendKind.TORCH and self.model.device.type == "cuda":
            tune_torch_cuda(self.unet, self.vae)
        self._backend_shapes, self._backend_artifacts = shapes, artifacts

    def _backends(self) -> tuple[UNetEngine, VaeEngine]:
        assert self.unet is not None and self.vae is not None, "no stream has opened yet"
        if self.graphs is not None:
            return self.graphs.engines(self.unet, self.vae)
        return self.unet, self.vae

    def _raw_backends(self) -> tuple[UNetEngine, VaeEngine]:
        """The current engines without per-call graphs (what a whole-tick graph captures); after
        :meth:`_backends`, which releases every graph when the engines were replaced."""
        self._backends()
        assert self.unet is not None and self.vae is not None
        return self.unet, self.vae

    def _wants_cuda_graphs(self) -> bool:
        """``EngineConfig.cuda_graphs`` resolved: None is on for the torch backend on CUDA in float16 (eager);
        True is for the torch backend (:mod:`streamdiff.backends.cuda_graphs`) and TensorRT (its runtime captures
        each shape slot's enqueue) only."""
        wanted = self.config.cuda_graphs
        if wanted is None:
            return (self.backend is BackendKind.TORCH and self.model.device.type == "cuda"
                    and self.model.dtype == torch.float16 and not self.options.compile
                    and self.model.ip_adapter is None and not self.model.unet_extras
                    and not self.controlnets)
        if wanted and self.model.ip_adapter is not None:
            raise ConfigError("cuda_graphs=True cannot replay an IP-Adapter's per-row image prompts; leave it unset",
                              field="cuda_graphs", value=True, allowed="None or False with an IP-Adapter")
        if wanted and self.model.unet_extras:
            raise ConfigError(f"cuda_graphs=True does not take the U-Net extra inputs {list(self.model.unet_extras)} "
                              "(SDXL); leave cuda_graphs unset", field="cuda_graphs", value=True,
                              allowed="None or False for SDXL models")
        if wanted and self.backend not in (BackendKind.TORCH, BackendKind.TENSORRT):
            raise ConfigError(f"cuda_graphs=True is for the torch and tensorrt backends, not {self.backend.value}",
                              field="cuda_graphs", value=True, allowed="True with backend torch or tensorrt")
        return wanted

    def _cuda_graphs(self, cuda: Any) -> CudaGraphs | None:
        """The CUDA graphs of the torch backend's calls (TensorRT's are its runtime's: :meth:`prepare_backends`)."""
        if not self._wants_cuda_graphs() or self.backend is not BackendKind.TORCH:
            return None
        return CudaGraphs(self.model.device, cuda, self.config.max_shapes, self.config.cuda_graph_scope)


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
