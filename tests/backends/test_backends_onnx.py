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


NORM_OPS = {"InstanceNormalization", "LayerNormalization", "GroupNormalization"}


def _norm_input_types(path: Path) -> dict[str, str]:
    """The element type of each normalisation node's data input in the graph at ``path`` (by node name)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return {node.name: onnx.helper.tensor_dtype_to_np_dtype(types[node.input[0]]).name
            for node in model.graph.node if node.op_type in NORM_OPS}


@pytest.mark.parametrize("name", ["tiny-unet", "kl-decoder"])
def test_float16_graphs_compute_their_norms_in_float32(name: str, modules: dict[str, torch.nn.Module],
                                                       tmp_path: Path) -> None:
    """A float16 export for a strongly typed TensorRT engine: every GroupNorm/LayerNorm reads float32 (cast up
    before, cast back after); the rest stays float16; the module itself is left as it was."""
    import copy

    from streamdiff.backends.onnx_export import float32_norms
    from streamdiff.backends.tensorrt_build import graph_precision

    component, multiple = CASES[name]
    module = copy.deepcopy(modules[name]).half()
    shapes = shape_range(component, CONFIG, OPTIONS, multiple)
    spec = component_spec(component, latent_channels=4, vae_scale_factor=8, text_dim=64, dtype=torch.float16)
    plain = export_module(module, spec, shapes, tmp_path / "plain" / "model.onnx", 17, fold=False)
    fixed = export_module(module, spec, shapes, tmp_path / "fixed" / "model.onnx", 17, norms_in_float32=True)
    before, after = _norm_input_types(plain), _norm_input_types(fixed)
    assert before and set(before.values()) == {"float16"}  # what the review found: norms in float16
    assert len(after) == len(before) and set(after.values()) == {"float32"}
    if name == "tiny-unet":
        assert {n.op_type for n in onnx.load(str(fixed)).graph.node} >= {"LayerNormalization", "InstanceNormalization"}
    counts = graph_precision(fixed)
    assert counts["float16"] > 0.5 * sum(counts.values())  # still a float16 graph (TensorRT's precision check)
    assert not any("forward" in vars(layer) for layer in module.modules())  # unpatched afterwards
    with float32_norms(module) as patched:
        assert patched == len([m for m in module.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))])

    # Same values as the module computing its norms in float32 (ONNX Runtime runs float16 graphs on the CPU).
    inputs = spec.make_inputs(2, 64, 64)
    session = onnxruntime.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in zip(spec.inputs, inputs)}
    actual = torch.from_numpy(np.asarray(session.run(None, feeds)[0])).float()
    with torch.no_grad(), float32_norms(module):
        expected = module(*inputs).float()
    assert relative_error(actual, expected) <= 2e-2


def test_a_float32_norm_survives_float16_overflow() -> None:
    """Activations of a few hundred (a real VAE's decoder has them) square past float16's 65504: the float32 path
    still gives the float64 result. (Torch on the CPU accumulates float16 norms in float32 itself; a strongly typed
    TensorRT layer would not, which this cannot show without a GPU.)"""
    from streamdiff.backends.onnx_export import float32_norms

    norm = torch.nn.GroupNorm(2, 8).half().requires_grad_(False)
    x = (torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 400 + 300).half()
    reference = torch.nn.functional.group_norm(x.double(), 2, norm.weight.double(), norm.bias.double(), norm.eps)
    with float32_norms(norm), torch.no_grad():
        fixed = norm(x)
    assert fixed.dtype == torch.float16 and float((fixed.double() - reference).abs().max()) < 1e-2
