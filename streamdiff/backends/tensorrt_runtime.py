"""TensorRT runtime (10.1+ and 11): one execution context per input shape, shared scratch memory, CUDA graphs.

A :class:`TrtEngine` serves every input shape inside its engine's optimization profile. For each shape combination
it meets it keeps a :class:`ShapeSlot`: its own execution context (so a CUDA graph captured for one shape is never
invalidated by another shape's ``set_input_shape``), its input and output buffers (torch CUDA tensors, allocated
once and bound with ``set_tensor_address``) and, with ``cuda_graph=True``, the graph captured on the slot's second
call and replayed from then on (a shape whose capture or replay fails runs without a graph from then on, logged
once; its outputs come from a direct run). Slots live in an LRU of ``max_shapes``: the least recently used one is
freed — graph, context and buffers — when a new shape would exceed it. All contexts are created with the
``USER_MANAGED`` allocation strategy and share one scratch allocation of ``device_memory_size_v2`` bytes, which is
safe because they all run one after another on the engine's stream.

Every ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` return value is checked; a shape outside
the profile raises :class:`~streamdiff.errors.ConfigError` naming the tensor, the shape and the profile's range.
Device calls go through :class:`~streamdiff.backends.cuda_ops.TorchCuda`, which tests replace with a CPU fake
together with a fake ``tensorrt``; the code has never run against the real library or a GPU (docs/engines.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, EngineBuildError, StreamDiffError
from .cuda_ops import DEFAULT_CUDA, TorchCuda
from .tensorrt_build import check_version, import_tensorrt
from .unet_inputs import ExtraFeeds, ExtraInput

logger = logging.getLogger(__name__)

UNET_MAX_SHAPES = 16  # a multi-stream engine calls the U-Net with 1 … max_batch_rows rows
VAE_MAX_SHAPES = 8

Shapes = tuple[tuple[int, ...], ...]


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``; ConfigError for types streamdiff's graphs never have."""
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise ConfigError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class ShapeSlot:
    """One input-shape combination: its execution context, bound buffers, call count and optional CUDA graph."""

    def __init__(self, shapes: Shapes, context: Any, tensors: dict[str, torch.Tensor]) -> None:
        self.shapes = shapes
        self.context = context
        self.tensors = tensors
        self.calls = 0
        self.graph: Any = None


class TrtEngine:
    """A deserialised engine: ``infer({input: tensor}) -> {output: tensor}`` (the outputs are reused buffers).

    ``max_shapes`` bounds the shape slots kept (each with a context, buffers and perhaps a graph). ``cuda`` is the
    device seam (tests pass a CPU fake); ``trt`` the module (tests pass a fake).
    """

    def __init__(
        self,
        path: Path | str,
        device: torch.device,
        cuda_graph: bool = False,
        *,
        max_shapes: int = VAE_MAX_SHAPES,
        cuda: TorchCuda | None = None,
        trt: Any = None,
    ) -> None:
        if max_shapes < 1:
            raise ConfigError(f"max_shapes={max_shapes} must be >= 1")
        self.trt = trt or import_tensorrt()
        check_version(self.trt)
        self.cuda = cuda or DEFAULT_CUDA
        self.device = device
        self.cuda_graph = cuda_graph
        self.max_shapes = max_shapes
        self.path = Path(path)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not deserialise {path} (built by another TensorRT version or GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(self.trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        self.stream = self.cuda.new_stream(device)
        scratch_bytes = int(self.engine.device_memory_size_v2)
        with self.cuda.use(self.stream):
            self.scratch = self.cuda.empty((scratch_bytes,), torch.uint8, device)
        self.slots: OrderedDict[Shapes, ShapeSlot] = OrderedDict()
        self.evictions = 0
        self.uncaptured: set[Shapes] = set()  # shapes whose CUDA graph failed: they run without one
        self.failed: Shapes | None = None  # the input shapes of the last call, when it raised

    # -- shape slots ------------------------------------------------------------------------------------------------

    def _check_shape(self, context: Any, name: str, shape: tuple[int, ...]) -> None:
        if context.set_input_shape(name, shape):
            return
        low, opt, high = self.profile[name]
        raise ConfigError(
            f"TensorRT engine {self.path.parent.name}: input {name!r} shape {shape} is outside its optimization "
            f"profile (min {low}, opt {opt}, max {high}); build engines for this size (EngineOptions "
            f"min_resolution/max_resolution, or a larger max_batch_rows)"
        )

    def _new_slot(self, shapes: Shapes) -> ShapeSlot:
        """A context for ``shapes`` on the shared scratch memory, with its buffers allocated and bound."""
        trt = self.trt
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineBuildError(f"TensorRT could not create an execution context for {self.path}")
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        for name, shape in zip(self.inputs, shapes):
            self._check_shape(context, name, shape)
        tensors: dict[str, torch.Tensor] = {}
        for name in self.inputs + self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineBuildError(f"TensorRT left {name!r} with an unresolved shape {shape} for inputs {shapes}")
            tensors[name] = self.cuda.empty(shape, self.dtypes[name], self.device)
            if not context.set_tensor_address(name, tensors[name].data_ptr()):
                raise EngineBuildError(f"TensorRT refused the buffer of {name!r} ({shape}, {self.dtypes[name]})")
        logger.debug("TensorRT %s: new shape slot %s (%d kept)", self.path.parent.name, shapes, len(self.slots) + 1)
        return ShapeSlot(shapes, context, tensors)

    def _slot(self, shapes: Shapes) -> ShapeSlot:
        """The slot of ``shapes`` (most recently used now), made on first use; the LRU one is freed beyond the bound."""
        slot = self.slots.get(shapes)
        if slot is not None:
            self.slots.move_to_end(shapes)
            return slot
        slot = self._new_slot(shapes)
        self.slots[shapes] = slot
        while len(self.slots) > self.max_shapes:
            _, old = self.slots.popitem(last=False)
            self._free(old)
        return slot

    def _free(self, slot: ShapeSlot) -> None:
        """Drop a slot: its graph now, its context and buffers with the last reference (stream-ordered frees)."""
        if slot.graph is not None:
            self.cuda.release(slot.graph)
            slot.graph = None
        slot.context = None
        slot.tensors = {}
        self.evictions += 1
        logger.debug("TensorRT %s: freed shape slot %s", self.path.parent.name, slot.shapes)

    def recover(self) -> None:
        """After a failed call: free the slot of its shapes (context, buffers, half-captured graph), if it has one.

        The next call at those shapes makes a fresh slot; the other shapes' slots were never touched.
        """
        shapes, self.failed = self.failed, None
        slot = self.slots.pop(shapes, None) if shapes is not None else None
        if slot is not None:
            self._free(slot)
            logger.info("TensorRT %s: dropped the shape slot %s after a failed call", self.path.parent.name, shapes)

    # -- running ----------------------------------------------------------------------------------------------------

    def _enqueue(self, slot: ShapeSlot) -> None:
        if not slot.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise StreamDiffError(f"TensorRT execute_async_v3 failed for inputs {slot.shapes} ({self.path})")

    def _capture(self, slot: ShapeSlot) -> None:
        """Capture the slot's enqueue into a CUDA graph (after a warm-up call).

        Any failure — the capture raising, or ``execute_async_v3`` returning False while capturing (an engine with
        operations a graph cannot hold) — leaves this shape uncaptured from now on (:meth:`_uncapturable`); the
        call's outputs came from the direct run before the capture, so they stand. Other shapes still capture.
        """
        try:
            slot.graph = self.cuda.capture(self.stream, lambda: self._enqueue(slot))
        except Exception as error:  # noqa: BLE001 - any capture failure means: run this shape without a graph
            slot.graph = None
            self._uncapturable(slot.shapes, "capture", error)

    def _uncapturable(self, shapes: Shapes, what: str, error: BaseException) -> None:
        """Remember that ``shapes`` runs without a CUDA graph; logged once per shape."""
        if shapes in self.uncaptured:
            return
        self.uncaptured.add(shapes)
        logger.warning("CUDA graph %s of TensorRT engine %s failed for inputs %s (%s: %s); that shape runs without "
                       "a graph from now on", what, self.path.parent.name, shapes, type(error).__name__, error)

    def _run(self, slot: ShapeSlot) -> None:
        """Replay the slot's graph, or enqueue directly (and capture on the second call when graphs are on)."""
        if slot.graph is not None:
            try:
                self.cuda.replay(slot.graph)
                return
            except Exception as error:  # noqa: BLE001 - falls back to a direct run of the same inputs
                self.cuda.release(slot.graph)
                slot.graph = None
                self._uncapturable(slot.shapes, "replay", error)
        self._enqueue(slot)
        slot.calls += 1
        if self.cuda_graph and slot.calls >= 2 and slot.shapes not in self.uncaptured:
            self._capture(slot)

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``feeds`` into the slot of their shapes, run, return the outputs (valid until the next call).

        Ordering without host syncs: the engine stream waits for the caller's stream (the feeds are ready), the
        copies, the run and the graph replay go on the engine stream, and the caller's stream waits for it.
        """
        shapes = tuple(tuple(int(d) for d in feeds[name].shape) for name in self.inputs)
        if self.failed is not None:
            self.recover()
        current = self.cuda.current_stream(self.device)
        self.cuda.wait(self.stream, current)
        try:
            with self.cuda.use(self.stream):
                slot = self._slot(shapes)
                for name in self.inputs:
                    slot.tensors[name].copy_(feeds[name])
                self._run(slot)
        except Exception:
            self.failed = shapes
            raise
        self.cuda.wait(current, self.stream)
        return {name: slot.tensors[name] for name in self.outputs}


class TrtUNet:
    """A :class:`~streamdiff.backends.base.UNetEngine` on a TensorRT U-Net engine.

    ``extras``: the engine's extra inputs (``builders.unet_extra_inputs``), each bound in every shape slot; a call
    without ControlNet residuals on an engine that takes them runs with zero residuals
    (:class:`~streamdiff.backends.unet_inputs.ExtraFeeds`). None takes the engine's own extra inputs as they come
    (no residual filling).
    """

    def __init__(self, path: Path | str, device: torch.device, cuda_graph: bool = False,
                 extras: Sequence[ExtraInput] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("max_shapes", UNET_MAX_SHAPES)
        self.engine = TrtEngine(path, device, cuda_graph, **kwargs)
        self.extras = ExtraFeeds(extras) if extras is not None else None
        engine_extras = set(self.engine.inputs) - {"sample", "timestep", "encoder_hidden_states"}
        if self.extras is not None and engine_extras != set(self.extras.names):
            raise EngineBuildError(f"{path}: the engine's extra inputs {sorted(engine_extras)} are not the "
                                   f"expected {list(self.extras.names)}; rebuild it")

    def recover(self) -> None:
        """Before the next call after a failed one (see :meth:`TrtEngine.recover`)."""
        self.engine.recover()

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        """``extras``: the engine's extra inputs by name (``base.UNET_EXTRAS``; ControlNet residuals all or none)."""
        dtypes = self.engine.dtypes
        if self.extras is not None:
            extras = self.extras.complete(sample, extras)
        wanted = set(self.engine.inputs) - {"sample", "timestep", "encoder_hidden_states"}
        if set(extras) != wanted:
            raise ConfigError(f"the TensorRT U-Net takes the extra inputs {sorted(wanted)}, got {sorted(extras)}")
        out = self.engine.infer(
            {
                "sample": sample.to(dtypes["sample"]),
                "timestep": timestep.to(dtypes["timestep"]),
                "encoder_hidden_states": encoder_hidden_states.to(dtypes["encoder_hidden_states"]),
                **{name: value.to(dtypes[name]) for name, value in extras.items()},
            }
        )
        return out["noise_pred"].to(sample.dtype, copy=True)


class TrtVae:
    """A :class:`~streamdiff.backends.base.VaeEngine` on TensorRT encoder and decoder engines."""

    def __init__(self, encoder_path: Path | str, decoder_path: Path | str, device: torch.device,
                 cuda_graph: bool = False, **kwargs: Any) -> None:
        self.encoder = TrtEngine(encoder_path, device, cuda_graph, **kwargs)
        self.decoder = TrtEngine(decoder_path, device, cuda_graph, **kwargs)

    def recover(self) -> None:
        """Before the next call after a failed one (see :meth:`TrtEngine.recover`)."""
        self.encoder.recover()
        self.decoder.recover()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder.infer({"images": images.to(self.encoder.dtypes["images"])})
        return out["latents"].to(images.dtype, copy=True)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.decoder.infer({"latents": latents.to(self.decoder.dtypes["latents"])})
        return out["images"].to(latents.dtype, copy=True)
