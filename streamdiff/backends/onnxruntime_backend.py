"""The ONNX Runtime backend: the exported graphs on the CPU provider, or on CUDA through IO binding.

On the CPU, inputs are handed over as numpy views of contiguous tensors in the graph's input types. On a CUDA
device (``pip install 'streamdiff[onnx-gpu]'``, the ``onnxruntime-gpu`` build) the providers are, in order of
preference, ONNX Runtime's TensorRT execution provider (fp16 for fp16 graphs, an explicit profile over the engine's
shape range, its engine and timing caches in the engine folder), the CUDA provider, then the CPU; see
:func:`provider_options`. Tensors stay on the GPU through IO binding: inputs are bound where torch put them, the
output is allocated by ONNX Runtime on the device and handed to torch with ``torch.from_dlpack(ortvalue)`` (the
``OrtValue`` implements ``__dlpack__``; it has no ``to_dlpack()`` in onnxruntime 1.31), no copy. Ordering: the
session runs on its own CUDA stream (the providers' ``user_compute_stream``), which waits for torch's current
stream before the run; torch's stream waits for it after. The IO-binding path is tested on the CPU (a CPU
``OrtValue`` implements ``__dlpack__`` too); the CUDA half has never run (see docs/engines.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailable, ConfigError, EngineBuildError, import_extra
from .cuda_ops import DEFAULT_CUDA, TorchCuda
from .unet_inputs import ExtraFeeds, ExtraInput

logger = logging.getLogger(__name__)

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT_EP, CUDA_EP)
TENSORRT_EP_WORKSPACE = 4 << 30  # when free memory is not known (provider_options called alone)

# ONNX Runtime's input type strings → (torch dtype, numpy dtype) of the tensors handed over.
_TYPES = {
    "tensor(float)": (torch.float32, np.float32),
    "tensor(float16)": (torch.float16, np.float16),
    "tensor(int64)": (torch.int64, np.int64),
    "tensor(int32)": (torch.int32, np.int32),
}


def import_onnxruntime() -> ModuleType:
    return import_extra("onnxruntime", "onnx")


def onnxruntime_version() -> str:
    return str(import_onnxruntime().__version__)


def shape_string(shapes: dict[str, Sequence[int]]) -> str:
    """``sample:1x4x32x32,timestep:1`` — the TensorRT provider's profile format."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())


def provider_options(
    device: torch.device,
    available: Sequence[str],
    *,
    graph_dtype: torch.dtype = torch.float32,
    preference: Sequence[str] = (),
    tensorrt_cache: Path | None = None,
    profile: Sequence[Any] = (),
    stream_handle: int | None = None,
    workspace_bytes: int = TENSORRT_EP_WORKSPACE,
) -> list[tuple[str, dict[str, Any]]]:
    """The providers (with options) a session on ``device`` gets, given the ``available`` ones. Pure.

    CPU devices get the CPU provider. On CUDA: ``preference`` (names, in order), all of them, whether or not
    ``available`` lists them (:func:`check_providers` then refuses a session that did not get them); or by default
    the TensorRT provider then the CUDA provider, those of them that this onnxruntime build has (BackendUnavailable
    when it has neither); then the CPU provider. ``profile`` is the engine's
    :class:`~streamdiff.backends.tensorrt_build.TensorProfile` tuple (min/opt/max per input) and ``tensorrt_cache``
    the folder for the TensorRT provider's engine and timing caches, ``workspace_bytes`` its builder workspace
    (:class:`OrtSession` sizes it from free memory). ``stream_handle`` is the CUDA stream the GPU providers compute on.
    """
    unknown = [p for p in preference if p not in (*GPU_PROVIDERS, CPU_EP)]
    if unknown:
        raise ConfigError(f"onnx_providers {unknown} are not among {', '.join((*GPU_PROVIDERS, CPU_EP))}",
                          field="onnx_providers", value=tuple(preference),
                          allowed=", ".join((*GPU_PROVIDERS, CPU_EP)))
    if device.type != "cuda":
        return [(CPU_EP, {})]
    explicit = [p for p in preference if p != CPU_EP]
    if preference and not explicit:
        return [(CPU_EP, {})]  # asked for the CPU provider alone
    wanted = explicit or [p for p in GPU_PROVIDERS if p in available]
    if not wanted:
        raise BackendUnavailable(
            f"ONNX Runtime on {device} needs {' or '.join(GPU_PROVIDERS)}, but this onnxruntime build has only "
            f"{', '.join(available) or 'no providers'}; install pip install 'streamdiff[onnx-gpu]' (and not "
            f"'streamdiff[onnx]' beside it), or run the model on the CPU"
        )
    chosen: list[tuple[str, dict[str, Any]]] = []
    common: dict[str, Any] = {"device_id": device.index or 0}
    if stream_handle is not None:
        common["user_compute_stream"] = str(stream_handle)
    for name in wanted:
        if name == TENSORRT_EP:
            options = dict(common)
            options.update(
                trt_fp16_enable=graph_dtype == torch.float16,
                trt_engine_cache_enable=tensorrt_cache is not None,
                trt_timing_cache_enable=tensorrt_cache is not None,
                trt_builder_optimization_level=3,
                trt_max_workspace_size=int(workspace_bytes),
            )
            if tensorrt_cache is not None:
                options["trt_engine_cache_path"] = str(tensorrt_cache)
                options["trt_timing_cache_path"] = str(tensorrt_cache)
            if profile:
                options["trt_profile_min_shapes"] = shape_string({p.name: p.min for p in profile})
                options["trt_profile_opt_shapes"] = shape_string({p.name: p.opt for p in profile})
                options["trt_profile_max_shapes"] = shape_string({p.name: p.max for p in profile})
            chosen.append((name, options))
        else:
            chosen.append((name, dict(common)))
    return chosen + [(CPU_EP, {})]


def check_providers(requested: Sequence[str], obtained: Sequence[str], *, explicit: bool, path: Path | str) -> None:
    """Refuse a session whose requested GPU provider did not load (ONNX Runtime then falls back to the CPU quietly).

    ``requested``: the providers the session was created with; ``obtained``: ``session.get_providers()``. With an
    ``explicit`` preference (``EngineOptions.onnx_providers``) every requested GPU provider must have loaded;
    otherwise at least one (a TensorRT provider that failed beside a working CUDA provider is a warning). Raises
    BackendUnavailable naming what was requested and what was obtained.
    """
    gpu = [p for p in requested if p in GPU_PROVIDERS]
    missing = [p for p in gpu if p not in obtained]
    if not missing:
        return
    if explicit or len(missing) == len(gpu):
        raise BackendUnavailable(
            f"ONNX Runtime did not load {', '.join(missing)} for {Path(path).parent.name or path}: requested "
            f"{', '.join(requested)}, obtained {', '.join(obtained) or 'none'}; the provider's libraries (CUDA, "
            f"cuDNN, TensorRT) are missing or do not match this onnxruntime-gpu build (its log says which)"
        )
    logger.warning("ONNX Runtime did not load %s for %s (obtained %s); running on %s", ", ".join(missing),
                   Path(path).parent.name, ", ".join(obtained), obtained[0])


DEFAULT_MAX_SHAPES = 8
SHRINK_ARENA = "memory.enable_memory_arena_shrinkage"


class OrtSession:
    """One ``InferenceSession`` with a single output: ``run({name: tensor}) -> tensor`` (in the graph's type).

    The session's memory arena grows to the largest shapes it has run and keeps that memory. Beyond ``max_shapes``
    frame sizes (the spatial sides of the inputs) and after a failed call, the next run shrinks the arena back to
    what that run needs (``memory.enable_memory_arena_shrinkage``); nothing else is kept per shape (IO bindings are
    made per call).

    ``io_binding``: run through IO binding (always on CUDA; on the CPU when True, which tests use). ``providers``:
    provider names in order of preference (CUDA devices). ``tensorrt_cache``/``profile``/``graph_dtype`` (the type
    the graph was exported in): for the TensorRT provider.
    """

    def __init__(
        self,
        path: Path | str,
        device: torch.device,
        threads: int | None = None,
        *,
        io_binding: bool | None = None,
        providers: Sequence[str] = (),
        tensorrt_cache: Path | None = None,
        profile: Sequence[Any] = (),
        graph_dtype: torch.dtype = torch.float32,
        cuda: TorchCuda | None = None,
        max_shapes: int = DEFAULT_MAX_SHAPES,
    ) -> None:
        if max_shapes < 1:
            raise ConfigError(f"max_shapes={max_shapes} must be >= 1", field="max_shapes", value=max_shapes,
                              allowed=">= 1")
        self.max_shapes = max_shapes
        self.sizes: OrderedDict[tuple[tuple[int, ...], ...], None] = OrderedDict()  # frame sizes since the shrink
        self.shrink_next = False
        self.shrinks = 0
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
        self.device = device
        self.cuda = cuda or DEFAULT_CUDA
        self.stream = self.cuda.new_stream(device) if device.type == "cuda" else None
        if tensorrt_cache is not None:
            tensorrt_cache.mkdir(parents=True, exist_ok=True)
        workspace = TENSORRT_EP_WORKSPACE
        if device.type == "cuda":
            from .tensorrt_build import workspace_size

            workspace = workspace_size(self.cuda.memory_info(device)[0])
        self.provider_options = provider_options(
            device, ort.get_available_providers(), graph_dtype=graph_dtype, preference=providers,
            tensorrt_cache=tensorrt_cache, profile=profile,
            stream_handle=self.cuda.handle(self.stream) if self.stream is not None else None, workspace_bytes=workspace,
        )
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.provider_options)
        except Exception as error:  # noqa: BLE001 - reported with the file that failed
            raise EngineBuildError(f"ONNX Runtime cannot load {path}: {type(error).__name__}: {error}") from error
        self.providers = self.session.get_providers()
        check_providers([name for name, _ in self.provider_options], self.providers,
                        explicit=any(p != CPU_EP for p in providers), path=path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = {}
        for i in self.session.get_inputs():
            if i.type not in _TYPES:
                raise EngineBuildError(f"{path}: input {i.name!r} has type {i.type}, which streamdiff does not feed")
            self.input_types[i.name] = _TYPES[i.type]
        self.output_name = self.session.get_outputs()[0].name
        self.on_gpu = self.providers[0] != CPU_EP
        if device.type == "cuda":
            logger.info("ONNX Runtime runs %s with %s", Path(path).parent.name, ", ".join(self.providers))
        self.io_binding = self.on_gpu if io_binding is None else bool(io_binding or self.on_gpu)

    def recover(self) -> None:
        """After a failed call: the next run starts from a shrunk arena (nothing else outlives a call)."""
        self.shrink_next = True

    def _run_options(self, feeds: dict[str, torch.Tensor]) -> Any:
        """The RunOptions of this call: None, or one that shrinks the arena (a new size beyond the bound)."""
        size = tuple(tuple(t.shape[2:]) for t in feeds.values() if t.ndim == 4)
        if size in self.sizes:
            self.sizes.move_to_end(size)
        else:
            if len(self.sizes) >= self.max_shapes:
                self.sizes.clear()
                self.shrink_next = True
            self.sizes[size] = None
        if not self.shrink_next:
            return None
        self.shrink_next = False
        self.shrinks += 1
        options = import_onnxruntime().RunOptions()
        device = self.device if self.on_gpu else torch.device("cpu")
        options.add_run_config_entry(SHRINK_ARENA, f"{'gpu' if device.type == 'cuda' else 'cpu'}:{device.index or 0}")
        return options

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inputs (any float type; cast to the graph's) → the output, on the session's device."""
        run_options = self._run_options(feeds)
        try:
            if self.io_binding:
                return self._run_bound(feeds, run_options)
            arrays = {name: feeds[name].detach().to("cpu", self.input_types[name][0]).contiguous().numpy()
                      for name in self.input_names}
            out = self.session.run([self.output_name], arrays, run_options)[0]
        except Exception:
            self.recover()
            raise
        return torch.from_numpy(np.ascontiguousarray(out))

    def _run_bound(self, feeds: dict[str, torch.Tensor], run_options: Any = None) -> torch.Tensor:
        """IO binding: inputs bound in place, the output allocated by ONNX Runtime and taken over by torch (DLPack)."""
        target = self.device if self.on_gpu else torch.device("cpu")
        device_type, device_id = target.type, target.index or 0
        binding = self.session.io_binding()
        kept = []
        for name in self.input_names:
            dtype, np_dtype = self.input_types[name]
            tensor = feeds[name].detach().to(target, dtype).contiguous()
            kept.append(tensor)
            binding.bind_input(name, device_type, device_id, np_dtype, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output(self.output_name, device_type, device_id)
        if self.stream is None or not self.on_gpu:
            self.session.run_with_iobinding(binding, run_options)
            return torch.from_dlpack(binding.get_outputs()[0])
        current = self.cuda.current_stream(self.device)
        self.cuda.wait(self.stream, current)  # the inputs, made on torch's stream, are complete before the run
        self.session.run_with_iobinding(binding, run_options)
        out = torch.from_dlpack(binding.get_outputs()[0])
        self.cuda.wait(current, self.stream)  # torch's later work on the output comes after the run
        del kept  # run_with_iobinding returned: the session no longer reads the inputs
        return out


class OrtUNet:
    """A :class:`~streamdiff.backends.base.UNetEngine` on an exported U-Net graph.

    ``extras``: the graph's extra inputs (``builders.unet_extra_inputs``); a call without ControlNet residuals on a
    graph that takes them runs with zero residuals (:class:`~streamdiff.backends.unet_inputs.ExtraFeeds`). None takes
    the graph's extra inputs as they come (no residual filling).
    """

    def __init__(self, path: Path | str, device: torch.device, extras: Sequence[ExtraInput] | None = None,
                 **session: Any) -> None:
        self.session = OrtSession(path, device, **session)
        self.extras = ExtraFeeds(extras) if extras is not None else None
        graph = set(self.session.input_names) - {"sample", "timestep", "encoder_hidden_states"}
        if self.extras is not None and graph != set(self.extras.names):
            raise EngineBuildError(f"{path}: the graph's extra inputs {sorted(graph)} are not the engine's "
                                   f"{list(self.extras.names)}; rebuild it")

    def recover(self) -> None:
        """Before the next call after a failed one (see :class:`OrtSession`)."""
        self.session.recover()

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        """``extras``: the graph's extra inputs by name (``base.UNET_EXTRAS``; ControlNet residuals all or none)."""
        if self.extras is not None:
            extras = self.extras.complete(sample, extras)
        out = self.session.run(
            {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states, **extras}
        )
        return out.to(sample.device, sample.dtype)


class OrtVae:
    """A :class:`~streamdiff.backends.base.VaeEngine` on exported encoder and decoder graphs.

    ``session`` options apply to both; ``encoder``/``decoder`` options to one (e.g. their TensorRT profiles).
    """

    def __init__(self, encoder_path: Path | str, decoder_path: Path | str, device: torch.device,
                 encoder: dict[str, Any] | None = None, decoder: dict[str, Any] | None = None,
                 **session: Any) -> None:
        self.encoder = OrtSession(encoder_path, device, **{**session, **(encoder or {})})
        self.decoder = OrtSession(decoder_path, device, **{**session, **(decoder or {})})

    def recover(self) -> None:
        """Before the next call after a failed one (see :class:`OrtSession`)."""
        self.encoder.recover()
        self.decoder.recover()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.run({"images": images}).to(images.device, images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.run({"latents": latents}).to(latents.device, latents.dtype)
