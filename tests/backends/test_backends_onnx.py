"""ONNX export of every component runs in ONNX Runtime and matches PyTorch at two sizes and two batch sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from streamdiff import StreamConfig
from streamdiff.backends.keys import Component, EngineOptions, shape_range
from streamdiff.backends.onnx_export import (
    UNetExport,
    VaeDecoder,
    VaeEncoder,
    component_spec,
    export_module,
    relative_error,
    verification_cases,
    verify_onnx,
)
from streamdiff.errors import EngineBuildError
from streamdiff.testing import small_kl_vae, small_sd21_unet_config, tiny_components

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40))
OPTIONS = EngineOptions(min_resolution=32, max_resolution=128, opt_resolution=64)


@pytest.fixture(scope="module")
def modules() -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel

    parts = tiny_components()
    kl = small_kl_vae()
    torch.manual_seed(0)
    sd21 = UNet2DConditionModel(**small_sd21_unet_config()).eval()
    return {
        "tiny-unet": UNetExport(parts["unet"]),
        "tiny-encoder": VaeEncoder(parts["vae"]),
        "tiny-decoder": VaeDecoder(parts["vae"]),
        "kl-encoder": VaeEncoder(kl),
        "kl-decoder": VaeDecoder(kl),
        "sd21-unet": UNetExport(sd21),
    }


CASES = {
    "tiny-unet": (Component.UNET, 32),
    "tiny-encoder": (Component.VAE_ENCODER, 8),
    "tiny-decoder": (Component.VAE_DECODER, 8),
    "kl-encoder": (Component.VAE_ENCODER, 8),
    "kl-decoder": (Component.VAE_DECODER, 8),
    "sd21-unet": (Component.UNET, 64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_pytorch(name: str, modules: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    component, multiple = CASES[name]
    module = modules[name]
    text_dim = module.unet.config.cross_attention_dim if component is Component.UNET else 64
    spec = component_spec(component, latent_channels=4, vae_scale_factor=8, text_dim=text_dim)
    shapes = shape_range(component, CONFIG, OPTIONS, multiple)
    path = export_module(module, spec, shapes, tmp_path / "model.onnx", opset=17)

    graph = onnx.load(str(path))
    assert graph.opset_import[0].version >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    first = spec.inputs[0]
    assert isinstance(dims[first][0], str), "batch axis must be dynamic"
    assert all(isinstance(d, str) for d in dims[first][2:]), "spatial axes must be dynamic"

    cases = verification_cases(shapes, multiple)
    assert len({c[0] for c in cases}) == 2 and len({c[1:] for c in cases}) == 2
    records = verify_onnx(path, module, spec, cases)
    assert len(records) == 4 and max(r["relative_error"] for r in records) <= 1e-3

    # An independent run straight through onnxruntime at the second size and batch.
    batch, height, width = cases[-1]
    inputs = spec.make_inputs(batch, height, width)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {n: t.numpy() for n, t in zip(spec.inputs, inputs)})[0]
    with torch.no_grad():
        expected = module(*inputs)
    assert out.shape == tuple(expected.shape)
    assert relative_error(torch.from_numpy(np.asarray(out)), expected) <= 1e-3


def test_verification_catches_a_wrong_graph(modules: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    spec = component_spec(Component.VAE_DECODER, latent_channels=4, vae_scale_factor=8)
    shapes = shape_range(Component.VAE_DECODER, CONFIG, OPTIONS, 8)
    path = export_module(modules["tiny-decoder"], spec, shapes, tmp_path / "model.onnx", opset=17)
    with pytest.raises(EngineBuildError, match="differs from PyTorch"):
        verify_onnx(path, modules["kl-decoder"], spec, verification_cases(shapes, 8))
