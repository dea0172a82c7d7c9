"""streamdiff.server.policy: rate limiter and error budget on a fake clock, origins, tokens."""

from __future__ import annotations

from server_helpers import FakeClock

from streamdiff.server.policy import ErrorBudget, RateLimiter, new_token, origin_allowed


def test_rate_limiter_token_bucket(clock: FakeClock) -> None:
    limiter = RateLimiter(10.0, 3, clock)
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.05)
    assert not limiter.allow()
    clock.advance(0.06)
    assert limiter.allow() and not limiter.allow()
    clock.advance(100)
    assert sum(limiter.allow() for _ in range(10)) == 3  # never more than the burst
    clock.advance(-5)  # a clock that goes back grants nothing
    assert not limiter.allow()


def test_error_budget(clock: FakeClock) -> None:
    budget = ErrorBudget(3, 10.0, clock)
    assert [budget.spend() for _ in range(3)] == [True] * 3
    clock.advance(10.0)
    assert all(budget.spend() for _ in range(3))
    assert not budget.spend()


def test_origin_allowed_and_tokens() -> None:
    assert origin_allowed("https://a.example", None) and origin_allowed(None, ["https://a.example"])
    assert origin_allowed("HTTPS://A.example/", ["https://a.example"])
    assert not origin_allowed("https://evil.example", ["https://a.example"])
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) == 22 and t.replace("-", "").replace("_", "").isalnum() for t in tokens)
