"""TensorRT 10 runtime on the tensor-address API, with I/O buffers allocated once per shape and optional CUDA graphs.

Written to TensorRT 10's documented Python API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``)
and never run on these GPU-less machines (see docs/engines.md). Buffers are torch CUDA tensors: for each new set of
input shapes the engine allocates its inputs and outputs once, binds their addresses, and reuses them for every later
call of that shape; with ``cuda_graph=True`` the enqueue of each shape is captured once and replayed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .tensorrt_build import import_tensorrt

logger = logging.getLogger(__name__)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    return table[dtype]


class _ShapeBuffers:
    """The bound I/O tensors (and optional CUDA graph) of one input-shape combination."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.graph: torch.cuda.CUDAGraph | None = None


class TrtEngine:
    """A deserialised engine and its execution context. ``infer(feeds)`` returns the output tensors (reused!)."""

    def __init__(self, path: Path | str, device: torch.device, cuda_graph: bool = False) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.device = device
        self.cuda_graph = cuda_graph
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(device=device)
        self._buffers: dict[tuple[tuple[int, ...], ...], _ShapeBuffers] = {}

    def _bind(self, shapes: tuple[tuple[int, ...], ...]) -> _ShapeBuffers:
        """Allocate and bind the buffers of one shape combination (once per shape)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in zip(self.inputs, shapes):
            self.context.set_input_shape(name, shape)
            tensors[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            tensors[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        logger.debug("TensorRT buffers for shapes %s allocated", shapes)
        return _ShapeBuffers(tensors)

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``feeds`` into the bound inputs, run, and return the bound outputs (valid until the next call)."""
        shapes = tuple(tuple(feeds[name].shape) for name in self.inputs)
        buffers = self._buffers.get(shapes)
        fresh = buffers is None
        if buffers is None:
            buffers = self._buffers[shapes] = self._bind(shapes)
        for name in self.inputs:
            buffers.tensors[name].copy_(feeds[name])
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            if buffers.graph is not None:
                buffers.graph.replay()
            else:
                self._enqueue(buffers)
                if self.cuda_graph and not fresh:
                    buffers.graph = self._capture(buffers)
        current.wait_stream(self.stream)
        return {name: buffers.tensors[name] for name in self.outputs}

    def _enqueue(self, buffers: _ShapeBuffers) -> None:
        for name, tensor in buffers.tensors.items():
            if name in self.inputs:
                self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def _capture(self, buffers: _ShapeBuffers) -> torch.cuda.CUDAGraph | None:
        """Capture one enqueue (after a warm-up call of the same shape) for replay; None if capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(buffers)
        except RuntimeError as error:
            logger.warning("CUDA graph capture of the TensorRT engine failed (%s); running without it", error)
            self.cuda_graph = False
            return None
        return graph


class TrtUNet:
    """A :class:`~streamdiff.backends.base.UNetEngine` on a TensorRT U-Net engine."""

    def __init__(self, path: Path | str, device: torch.device, cuda_graph: bool = False) -> None:
        self.engine = TrtEngine(path, device, cuda_graph)

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        dtypes = self.engine.dtypes
        out = self.engine.infer(
            {
                "sample": sample.to(dtypes["sample"]),
                "timestep": timestep.to(dtypes["timestep"]),
                "encoder_hidden_states": encoder_hidden_states.to(dtypes["encoder_hidden_states"]),
            }
        )
        return out["noise_pred"].to(sample.dtype, copy=True)


class TrtVae:
    """A :class:`~streamdiff.backends.base.VaeEngine` on TensorRT encoder and decoder engines."""

    def __init__(self, encoder_path: Path | str, decoder_path: Path | str, device: torch.device,
                 cuda_graph: bool = False) -> None:
        self.encoder = TrtEngine(encoder_path, device, cuda_graph)
        self.decoder = TrtEngine(decoder_path, device, cuda_graph)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder.infer({"images": images.to(self.encoder.dtypes["images"])})
        return out["latents"].to(images.dtype, copy=True)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.decoder.infer({"latents": latents.to(self.decoder.dtypes["latents"])})
        return out["images"].to(latents.dtype, copy=True)
