"""StreamState (streamdiff/engine/state.py): what a live change does to the tensors a stream owns."""

from __future__ import annotations

import torch

from streamdiff import StreamConfig, StreamEngine
from streamdiff.engine import EngineConfig

ONE_ROW = StreamConfig(width=64, height=64, t_index_list=(30,), cfg_type="none")  # its embeddings: one row


def test_a_prompt_change_rewrites_the_streams_own_embeddings_not_the_prompt_cache(tiny_model, frames) -> None:
    """The new prompt is written into the tensor the stream had (a captured graph reads it there); with one row
    that tensor must be the stream's own copy, not the prompt cache's, or a second stream with the old prompt would
    change too."""

    def run(change: bool) -> list[torch.Tensor]:
        engine = StreamEngine(tiny_model, EngineConfig(max_streams=2))
        first, second = engine.open_stream(ONE_ROW, prompt="a red door", seed=1), engine.open_stream(
            ONE_ROW, prompt="a red door", seed=2)
        engine.step({first: frames[0], second: frames[0]})
        before = first.state.embeddings.batch
        if change:
            first.update(prompt="a blue window")
        outputs = [engine.step({first: frames[i], second: frames[i]})[second].images for i in range(1, 3)]
        if change:
            assert first.state.embeddings.batch is before  # the same tensor, new values
            assert not torch.equal(before, second.state.embeddings.batch)
        return outputs

    assert all(torch.equal(a, b) for a, b in zip(run(change=True), run(change=False)))
