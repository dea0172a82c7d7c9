"""streamdiff.protocol.policy: rate limiter and error budget on a fake clock, origins, tokens."""

from __future__ import annotations

import pytest
from server_helpers import FakeClock

from streamdiff.protocol.policy import (
    ErrorBudget,
    OriginPolicy,
    RateLimiter,
    is_loopback_origin,
    new_token,
    origin_allowed,
)


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


@pytest.mark.parametrize("origin,loopback", [
    ("http://127.0.0.1:8765", True), ("http://localhost", True), ("https://[::1]:9000", True),
    ("http://127.9.9.9", True), ("http://localhost.evil.example", False), ("http://128.0.0.1", False),
    ("null", False), ("file://", False), ("ws://127.0.0.1", False), ("http://127.0.0.1:99999", False), ("", False),
])
def test_loopback_origins(origin: str, loopback: bool) -> None:
    assert is_loopback_origin(origin) is loopback


def test_origin_policy_exact_match_loopback_and_any() -> None:
    default = OriginPolicy.of()
    assert default.allows(None) and default.allows("http://localhost:8765")
    assert not default.allows("https://evil.example") and not default.allows("null")
    listed = OriginPolicy.of(["https://Studio.example/"], allow_loopback=False)
    assert listed.allows("https://studio.example") and not listed.allows("https://studio.example:444")
    assert not listed.allows("http://127.0.0.1:8765") and not listed.allows("https://studio.example.evil")
    assert OriginPolicy.of(["*"], allow_loopback=False).allows("https://anything.example")


def test_address_rates_limit_each_address_apart_and_forget_the_least_recent() -> None:
    from server_helpers import FakeClock

    from streamdiff.protocol.policy import AddressRates

    clock = FakeClock()
    rates = AddressRates(rate=2.0, burst=3, capacity=2, clock=clock)
    assert [rates.allow("a") for _ in range(4)] == [True, True, True, False]  # the burst, then refused
    assert rates.allow("b")  # another address has its own bucket
    clock.advance(0.5)
    assert rates.allow("a") and not rates.allow("a")  # refilled at 2 a second
    rates.allow("c")  # a third address: the least recently seen ("b") is forgotten, "a" is kept
    assert not rates.allow("a")


def test_a_penalized_address_waits_its_cooldown_then_gets_its_rate_back() -> None:
    from server_helpers import FakeClock

    from streamdiff.protocol.policy import AddressRates

    clock = FakeClock()
    rates = AddressRates(rate=4.0, burst=8, clock=clock)
    assert rates.allow("a")
    rates.penalize("a", 2.0)
    assert not rates.allow("a") and rates.allow("b")  # only that address
    clock.advance(1.9)
    assert not rates.allow("a")
    clock.advance(0.2)
    assert rates.allow("a") and not rates.allow("a")  # one token after the cooldown, then the rate
    clock.advance(0.25)
    assert rates.allow("a")
