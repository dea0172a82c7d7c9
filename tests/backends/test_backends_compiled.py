"""The compiled torch backend: an AOTInductor U-Net, compiled once into the engine cache, gives eager's frames."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from streamdiff import ConfigError, StreamConfig, StreamPipeline
from streamdiff.backends.compiled import CompiledUNet
from streamdiff.backends.keys import EngineOptions


@pytest.mark.slow
def test_compiled_unet_matches_eager_and_is_compiled_once(
    tiny_model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = StreamConfig(width=64, height=64, t_index_list=(20, 40))
    options = EngineOptions(engine_dir=tmp_path, compile=True)
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        compiled = StreamPipeline(tiny_model, config, backend="torch", engine_options=options)
    assert isinstance(compiled.unet, CompiledUNet) and caplog.text.count("not built yet") == 1
    eager = StreamPipeline(tiny_model, config, backend="torch")
    frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results = []
    for pipe in (eager, compiled):
        pipe.prepare(prompt="a red fox", seed=3)
        results.append([pipe.step(frame).images for frame in frames][1:])
    for expected, actual in zip(*results):
        assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-3

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamdiff.backends"):
        again = StreamPipeline(tiny_model, config, backend="torch", engine_options=options)
    assert "not built yet" not in caplog.text
    with pytest.raises(ConfigError, match="no engine for sample shape"):
        again.unet(torch.zeros(3, 4, 8, 8), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 77, 64))
