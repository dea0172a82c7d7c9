"""The OpenVINO backend (CPU): the U-Net, the VAE encoder and the VAE decoder compiled by OpenVINO, cached.

Build (once per cache key): the component's engine-contract module is converted with ``ov.convert_model`` (traced
from the torch module; static shapes when the component serves exactly one shape, as for one stream, else dynamic
batch and spatial axes), compiled for the CPU with ``INFERENCE_PRECISION_HINT`` set
from the model's dtype (bfloat16 → ``bf16``), and the compiled model is exported (``export_model``) into the entry
as ``model.blob``. Load: ``import_model`` of that blob — no conversion, no compilation — so a warm start takes about
as long as reading the file.

The U-Net's time embedding stays float32: OpenVINO's bf16 mode would round the timestep to bfloat16 before the
sinusoidal projection (999 → 1000; PSNR 45 dB against float32 at t = 999). The graph therefore takes the projection
``unet.time_proj(timestep)`` as its input, computed here in float32 by torch, exactly as diffusers computes it
before casting to the model's dtype. Graph inputs and outputs are float32; the graph casts to the model's dtype
inside. Measured speeds: docs/PERF.md ("OpenVINO").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..config import Quantization
from ..errors import ConfigError, EngineBuildError, StreamDiffError, import_extra
from .base import unet_kwargs
from .keys import Component
from .openvino_quantize import import_nncf, quantize_model
from .unet_inputs import ExtraFeeds, ExtraInput

logger = logging.getLogger(__name__)

BLOB_FILE = "model.blob"
_PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def import_openvino() -> ModuleType:
    return import_extra("openvino", "openvino")


def openvino_version() -> str:
    return str(import_openvino().__version__)


def precision_hint(dtype: torch.dtype) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for a model loaded in ``dtype``."""
    return _PRECISION_HINTS[dtype]


_threads: int | None = None  # OpenVINO's thread count in this process, fixed by the first engine loaded


def openvino_threads() -> int:
    """The threads OpenVINO runs on: torch's intra-op thread count when the first OpenVINO engine was made."""
    return _threads or torch.get_num_threads()


def hand_cores_to_openvino() -> None:
    """Give the cores to OpenVINO: torch's own intra-op threads drop to 1 (logged once).

    Beside OpenVINO's thread pool, torch's element-wise work between the calls (image range, noising, guidance) is
    faster on one thread: measured here, a 256² image op after an OpenVINO call took 1.7–36 ms with 2 torch
    threads (each pool waiting for the other's spinning workers) and 0.1 ms with 1 (docs/PERF.md, "The tiny model").
    """
    global _threads
    if _threads is None:
        _threads = torch.get_num_threads()
    if torch.get_num_threads() > 1:
        logger.info("openvino backend: OpenVINO runs on %d threads; torch's intra-op threads set to 1 (its "
                    "remaining element-wise work is faster single-threaded beside OpenVINO's pool)", _threads)
        torch.set_num_threads(1)


def compile_config(dtype: torch.dtype, threads: int | None = None) -> dict[str, Any]:
    """Properties of a compiled model: the precision of ``dtype``, latency mode, ``threads``
    (:func:`openvino_threads` by default)."""
    return {
        "INFERENCE_PRECISION_HINT": precision_hint(dtype),
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads or openvino_threads()),
    }


@contextlib.contextmanager
def unet_time_projection_input(unet: torch.nn.Module) -> Iterator[None]:
    """While converting, the U-Net takes its time projection ``[B, P]`` (float32) in place of the timestep."""
    unet.get_time_embed = lambda sample, timestep: timestep.to(sample.dtype)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del unet.get_time_embed


class OvUNetGraph(torch.nn.Module):
    """ε = U-Net(sample ``[B, C, h, w]``, time projection ``[B, P]``, hidden states ``[B, L, D]``, then the
    ``extra_names`` inputs of ``backends.base.UNET_EXTRAS`` in that order), float32 I/O.

    The extras reach the U-Net as the eager backend passes them (:func:`~.torch_backend.unet_kwargs`): SDXL's added
    conditions, ControlNet residuals, and the IP-Adapter's ``ip_tokens``/``ip_scale``, which its row-scaled
    attention processors (:mod:`streamdiff.models.ip_attention`) read; they trace like any other module, so a
    scale is a graph input and changing it live needs no rebuild."""

    def __init__(self, unet: torch.nn.Module, extra_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.unet = unet
        self.extra_names = tuple(extra_names)

    def forward(self, sample: torch.Tensor, time_projection: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extras: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        named = {name: value.to(dtype) for name, value in zip(self.extra_names, extras)}
        out = self.unet(sample.to(dtype), time_projection, encoder_hidden_states=encoder_hidden_states.to(dtype),
                        return_dict=False, **unet_kwargs(named))[0]
        return out.float()


class Float32Graph(torch.nn.Module):
    """``module`` (a VAE encoder or decoder wrapper) with float32 input and output around its own dtype."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.module.parameters()).dtype
        return self.module(x.to(dtype)).float()


def unet_time_projection(unet: torch.nn.Module, timestep: torch.Tensor) -> torch.Tensor:
    """diffusers' sinusoidal projection of ``timestep`` ``[B]``, in float32 ``[B, P]``."""
    return unet.time_proj(timestep.to(torch.float32)).to(torch.float32)


def build_blob(
    component: Component,
    graph: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    folder: Path,
    static: bool = False,
    quantize: Quantization = Quantization.NONE,
    guard: contextlib.AbstractContextManager[Any] | None = None,
    calibration: Sequence[tuple[torch.Tensor, ...]] | None = None,
) -> str:
    """Convert ``graph`` (the engine-contract wrapper, float32 I/O), compile it for the CPU, export it to ``folder``.

    ``example`` are float32 example inputs (a U-Net's or ControlNet's second input is the time projection).
    ``static``: compiled for exactly their shapes; otherwise dynamic batch (and spatial axes of 4-D inputs).
    ``quantize``: quantise the converted model first (:func:`~.openvino_quantize.quantize_model`; ``calibration``:
    the graph inputs ``INT8`` calibrates on). ``guard``: held while converting (:func:`unet_time_projection_input`).
    Returns the artifact's file name.
    """
    if quantize is not Quantization.NONE:
        import_nncf()  # a missing NNCF fails before the conversion, with the extra to install
    ov = import_openvino()
    if static:
        shapes = [ov.PartialShape(list(t.shape)) for t in example]
    else:
        shapes = [ov.PartialShape([-1, t.shape[1], -1, -1]) if t.ndim == 4 else ov.PartialShape([-1, *t.shape[1:]])
                  for t in example]
    try:
        with guard or contextlib.nullcontext(), torch.inference_mode(False), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            converted = ov.convert_model(graph.eval(), example_input=example, input=shapes)
        converted = quantize_model(converted, quantize, calibration)
        compiled = ov.Core().compile_model(converted, "CPU", compile_config(dtype))
        blob = compiled.export_model()
    except Exception as error:  # noqa: BLE001 - reported as a build failure with its cause
        raise EngineBuildError(f"OpenVINO conversion of {component.value} failed: {type(error).__name__}: {error}"
                               ) from error
    (folder / BLOB_FILE).write_bytes(blob.getvalue() if hasattr(blob, "getvalue") else bytes(blob))
    return BLOB_FILE


DEFAULT_MAX_SHAPES = 8


class OvModel:
    """One imported compiled model with a single output: ``run(*tensors) -> tensor`` (float32, CPU).

    The CPU plugin keeps per-shape state inside a compiled model (kernels, buffers, shape-inference results) that it
    never gives back, and a call whose shape inference fails leaves that state inconsistent: later calls at other
    shapes fail too, even on a new infer request. Both are undone only by importing the blob again, so: after a
    failed call :meth:`recover` re-imports it (the engine calls it before the next call), and beyond ``max_shapes``
    frame sizes (the spatial sides of the inputs; batch sizes do not count) it is re-imported before the new size
    runs, which releases what every earlier size held.
    """

    def __init__(self, path: Path | str, dtype: torch.dtype, threads: int | None = None,
                 max_shapes: int = DEFAULT_MAX_SHAPES) -> None:
        if max_shapes < 1:
            raise ConfigError(f"max_shapes={max_shapes} must be >= 1", field="max_shapes", value=max_shapes,
                              allowed=">= 1")
        self.path, self.dtype, self.threads, self.max_shapes = Path(path), dtype, threads, max_shapes
        self.sizes: OrderedDict[tuple[tuple[int, ...], ...], None] = OrderedDict()  # frame sizes run since import
        self.imports = 0
        self.failed = False  # the last call raised: the compiled model must be imported again
        self._import()
        partial = [i.get_partial_shape() for i in self.compiled.inputs]
        self.static_shapes = [tuple(p.to_shape()) for p in partial] if all(p.is_static for p in partial) else None

    def _import(self) -> None:
        ov = import_openvino()
        self.request = self.compiled = None  # the old model's memory goes before the new one is made
        try:
            compiled = ov.Core().import_model(self.path.read_bytes(), "CPU", compile_config(self.dtype, self.threads))
        except Exception as error:  # noqa: BLE001 - reported with the file that failed
            raise EngineBuildError(f"OpenVINO cannot load {self.path}: {type(error).__name__}: {error}") from error
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.sizes.clear()
        self.failed = False
        self.imports += 1
        release_freed_memory()

    def recover(self) -> None:
        """After a failed call: import the compiled model again (its per-shape state may be broken). Else nothing."""
        if self.failed:
            logger.info("OpenVINO %s: importing the compiled model again after a failed call", self.path.parent.name)
            self._import()

    @property
    def precision(self) -> str:
        """The inference precision the compiled model runs at (``bf16``, ``f32``)."""
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return str(value.to_string() if hasattr(value, "to_string") else value)

    def _admit(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Count the call's frame size; a new size beyond ``max_shapes`` first re-imports the model."""
        size = tuple(tuple(t.shape[2:]) for t in tensors if t.ndim == 4)
        if size in self.sizes:
            self.sizes.move_to_end(size)
            return
        if len(self.sizes) >= self.max_shapes:
            logger.info("OpenVINO %s: %d frame sizes ran; importing the compiled model again to release their "
                        "state", self.path.parent.name, len(self.sizes))
            self._import()
        self.sizes[size] = None

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The output of a single-output model (a U-Net, a VAE half) for ``tensors``, a new tensor."""
        return self.run_all(*tensors)[0]

    def run_all(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every output of the model for ``tensors``, in its output order (new tensors: the request's own buffers
        are reused by the next call)."""
        self._infer(tensors)
        return tuple(torch.from_numpy(np.array(self.request.get_output_tensor(i).data, copy=True))
                     for i in range(len(self.compiled.outputs)))

    def _infer(self, tensors: tuple[torch.Tensor, ...]) -> None:
        if self.static_shapes is not None and [tuple(t.shape) for t in tensors] != self.static_shapes:
            raise ConfigError(
                f"the OpenVINO engine was compiled for inputs {self.static_shapes}, got "
                f"{[tuple(t.shape) for t in tensors]}. Rebuild the pipeline for the new configuration."
            )
        if self.failed:
            self.recover()
        self._admit(tensors)
        arrays = [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in tensors]
        try:
            self.request.infer(arrays, share_inputs=True, share_outputs=True)
        except Exception:
            self.failed = True
            raise


def release_freed_memory() -> None:
    """Hand memory freed by native code back to the system (glibc ``malloc_trim``); nothing elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


class OvUNet:
    """A :class:`~streamdiff.backends.base.UNetEngine` on a compiled OpenVINO U-Net (float32 time embedding).

    ``inputs``: the graph's extra inputs (:func:`~.builders.unet_extra_inputs`, in its order). A call with no
    ControlNet residuals, as the engine makes when no row of it has control, runs the same graph with zero residuals
    (:class:`~.unet_inputs.ExtraFeeds`; adding zeros is exact): one compiled copy of the weights instead of a second
    graph without them (an SD-2.1-size U-Net is ~1.7 GB in bfloat16). What the zeros cost was measured:
    docs/PERF.md, "ControlNet on OpenVINO".
    """

    def __init__(self, path: Path | str, time_proj: torch.nn.Module, dtype: torch.dtype,
                 max_shapes: int = DEFAULT_MAX_SHAPES, inputs: tuple[ExtraInput, ...] = ()) -> None:
        self.model = OvModel(path, dtype, max_shapes=max_shapes)
        self.time_proj = time_proj
        self.feeds = ExtraFeeds(inputs)
        self.required = frozenset(i.name for i in self.feeds.inputs if not i.stride)  # all but the residuals

    def recover(self) -> None:
        """Undo a failed call's damage before the next call (see :class:`OvModel`)."""
        self.model.recover()

    @torch.inference_mode()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        extras = self.feeds.complete(sample, extras)  # in graph order; missing residuals as zeros
        projection = self.time_proj(timestep.to(torch.float32)).to(torch.float32)  # [B, P], never bfloat16
        out = self.model.run(sample, projection, encoder_hidden_states, *extras.values())
        if out.shape != sample.shape:
            # Seen with one inference thread: a latent the traced graph cannot run (not a multiple of the U-Net's
            # down factor) returned the previous call's output instead of raising.
            self.model.failed = True
            raise StreamDiffError(f"the OpenVINO U-Net returned {tuple(out.shape)} for a sample of "
                                  f"{tuple(sample.shape)}: a latent size its graph cannot run")
        return out.to(sample.device, sample.dtype)


class OvVae:
    """A :class:`~streamdiff.backends.base.VaeEngine` on compiled OpenVINO encoder and decoder."""

    def __init__(self, encoder_path: Path | str, decoder_path: Path | str, dtype: torch.dtype,
                 max_shapes: int = DEFAULT_MAX_SHAPES) -> None:
        self.encoder = OvModel(encoder_path, dtype, max_shapes=max_shapes)
        self.decoder = OvModel(decoder_path, dtype, max_shapes=max_shapes)

    def recover(self) -> None:
        """Undo a failed call's damage before the next call (see :class:`OvModel`)."""
        self.encoder.recover()
        self.decoder.recover()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.run(images).to(images.device, images.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.run(latents).to(latents.device, latents.dtype)
