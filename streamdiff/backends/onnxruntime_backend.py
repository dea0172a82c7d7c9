"""The ONNX Runtime backend: runs the exported graphs with the CPU provider (CUDA/TensorRT providers when present).

On the CPU, inputs are handed over as zero-copy numpy views of contiguous float32 tensors. On CUDA, tensors stay on
the GPU through IO binding (written to ONNX Runtime's documented API; never run here, see docs/engines.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import EngineBuildError, missing_extra

logger = logging.getLogger(__name__)


def import_onnxruntime():  # noqa: ANN201 - the module
    try:
        import onnxruntime
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    return onnxruntime


def onnxruntime_version() -> str:
    return str(import_onnxruntime().__version__)


def choose_providers(device: torch.device) -> list[str]:
    """CPU by default; on a CUDA device the TensorRT and CUDA providers first when this build has them."""
    available = import_onnxruntime().get_available_providers()
    chosen = []
    if device.type == "cuda":
        chosen = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if not chosen:
            logger.warning("onnxruntime has no CUDA provider (available: %s); running on the CPU", available)
    return chosen + ["CPUExecutionProvider"]


class OrtSession:
    """One ``InferenceSession`` with a single output: ``run({name: tensor}) -> tensor``."""

    def __init__(self, path: Path | str, device: torch.device, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
        self.device = device
        self.providers = choose_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as error:  # noqa: BLE001 - reported with the file that failed
            raise EngineBuildError(f"ONNX Runtime cannot load {path}: {type(error).__name__}: {error}") from error
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 inputs → the float32 output (on the CPU, or on the feeds' GPU with a CUDA provider)."""
        if self.on_gpu:
            return self._run_bound(feeds)
        arrays = {name: feeds[name].detach().to("cpu", torch.float32).contiguous().numpy() for name in self.input_names}
        out = self.session.run([self.output_name], arrays)[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        binding = self.session.io_binding()
        kept = []
        for name in self.input_names:
            tensor = feeds[name].detach().to(torch.float32).contiguous()
            kept.append(tensor)
            binding.bind_input(
                name, tensor.device.type, tensor.device.index or 0, np.float32, tuple(tensor.shape), tensor.data_ptr()
            )
        binding.bind_output(self.output_name, self.device.type, self.device.index or 0)
        self.session.run_with_iobinding(binding)
        return torch.from_dlpack(binding.get_outputs()[0].to_dlpack())


class OrtUNet:
    """A :class:`~streamdiff.backends.base.UNetEngine` on an exported U-Net graph."""

    def __init__(self, path: Path | str, device: torch.device) -> None:
        self.session = OrtSession(path, device)

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        out = self.session.run(
            {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        )
        return out.to(sample.device, sample.dtype)


class OrtVae:
    """A :class:`~streamdiff.backends.base.VaeEngine` on exported encoder and decoder graphs."""

    def __init__(self, encoder_path: Path | str, decoder_path: Path | str, device: torch.device) -> None:
        self.encoder = OrtSession(encoder_path, device)
        self.decoder = OrtSession(decoder_path, device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.run({"images": images}).to(images.device, images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.run({"latents": latents}).to(latents.device, latents.dtype)
