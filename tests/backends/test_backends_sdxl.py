"""SDXL's U-Net extra inputs (``text_embeds``, ``time_ids``) on each backend: run where taken, refused up front where
not (never mid-stream)."""

from __future__ import annotations

import pytest

from streamdiff import ConfigError, StreamConfig, StreamEngine
from streamdiff.backends import factory
from streamdiff.backends.keys import EngineOptions
from streamdiff.config import BackendKind
from streamdiff.engine import EngineConfig

CONFIG = StreamConfig(width=64, height=64, t_index_list=(20, 40), cfg_type="initialize")


@pytest.fixture(scope="module")
def sdxl_model(cache_dir):
    from streamdiff import load_model

    return load_model("tiny-sdxl", device="cpu")


@pytest.mark.parametrize("backend", sorted(k.value for k in set(BackendKind) - factory.EXTRA_INPUT_BACKENDS
                                           - {BackendKind.AUTO, BackendKind.TENSORRT}))
def test_a_backend_without_extra_inputs_is_refused_when_the_engine_is_built(sdxl_model, backend: str) -> None:
    with pytest.raises(ConfigError, match=rf"model 'tiny-sdxl': backend '{backend}' does not take the U-Net extra "
                                          r"inputs \['text_embeds', 'time_ids'\] \(SDXL\); use "):
        StreamEngine(sdxl_model, backend=backend)


def test_compiled_torch_and_cuda_graphs_are_refused_for_sdxl(sdxl_model, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"compile=True \(AOTInductor\) does not take the U-Net extra inputs"):
        StreamEngine(sdxl_model, backend="torch", engine_options=EngineOptions(compile=True, engine_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"cuda_graphs=True does not take the U-Net extra inputs"):
        StreamEngine(sdxl_model, EngineConfig(cuda_graphs=True), backend="torch")


def test_auto_picks_a_backend_that_takes_the_extra_inputs(sdxl_model, tiny_model) -> None:
    kind, reason = factory.choose_auto(sdxl_model, EngineOptions())
    assert kind in factory.EXTRA_INPUT_BACKENDS
    engine = StreamEngine(sdxl_model, EngineConfig(max_streams=1), backend="auto")
    assert engine.backend is kind
    if kind is BackendKind.TORCH:
        assert "SDXL" in reason
