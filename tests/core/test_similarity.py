from __future__ import annotations

import pytest
import torch

from streamdiff import FilterConfig
from streamdiff.core.similarity import SimilarityFilter, cosine_similarity, skip_probability


def test_skip_probability_formula() -> None:
    assert skip_probability(1.0, 0.98) == 1.0
    assert skip_probability(0.98, 0.98) == 0.0
    assert skip_probability(0.5, 0.98) == 0.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5)
    assert skip_probability(0.995, 0.9) == pytest.approx(1 - 0.005 / 0.1)
    assert skip_probability(1.0, 1.0) == 0.0


def test_cosine_similarity() -> None:
    a = torch.tensor([1.0, 0.0])
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    assert cosine_similarity(a, torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)


def _frames(count: int, noise: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand((1, 3, 16, 16), generator=g)
    return [base + noise * torch.randn(base.shape, generator=g) for _ in range(count)]


def test_seeded_filter_is_reproducible_and_seed_dependent() -> None:
    frames = _frames(200, 0.08)
    config = FilterConfig(enabled=True, threshold=0.95, max_skip_frames=4)

    def decisions(seed: int) -> list[bool]:
        f = SimilarityFilter(config, seed=seed)
        return [f.decide(x).skip for x in frames]

    first = decisions(7)
    assert first == decisions(7)
    assert 10 < sum(first) < 190  # stochastic: some skipped, some processed
    assert first != decisions(8)


@pytest.mark.parametrize("cap", [0, 1, 3, 10])
def test_never_more_than_max_skip_frames_in_a_row(cap: int) -> None:
    f = SimilarityFilter(FilterConfig(enabled=True, threshold=0.5, max_skip_frames=cap), seed=1)
    static = torch.ones((1, 3, 8, 8))
    skips = [f.decide(static).skip for _ in range(50)]
    run = longest = 0
    for s in skips:
        run = run + 1 if s else 0
        longest = max(longest, run)
    assert longest == cap
    assert f.total_skips == sum(skips)


def test_disabled_filter_never_skips() -> None:
    f = SimilarityFilter(FilterConfig(enabled=False), seed=0)
    static = torch.ones((1, 3, 8, 8))
    assert not any(f.decide(static).skip for _ in range(20))


def test_processed_frame_becomes_reference() -> None:
    f = SimilarityFilter(FilterConfig(enabled=True, threshold=0.9, max_skip_frames=100), seed=0)
    a, b = torch.ones((1, 3, 4, 4)), -torch.ones((1, 3, 4, 4))
    assert not f.decide(a).skip
    decision = f.decide(b)  # opposite image: similarity -1, never skipped
    assert not decision.skip and decision.similarity == pytest.approx(-1.0)
    assert f.decide(b).skip  # identical to the new reference: P = 1
