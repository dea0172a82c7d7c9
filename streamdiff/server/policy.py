"""Per-connection policy, pure and clock-injected: the input rate limiter, the error budget, tokens and origins.

Nothing here sleeps or reads the wall clock on its own: pass ``clock`` (monotonic seconds) and a test can move time.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Collection

__all__ = ["ErrorBudget", "RateLimiter", "new_token", "origin_allowed"]


class RateLimiter:
    """Token bucket: ``rate`` events per second on average, bursts of up to ``burst``; starts full."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()

    def allow(self) -> bool:
        """Take one token if there is one; False means drop this event."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class ErrorBudget:
    """At most ``max_errors`` errors within any ``window_s`` seconds; the next one exhausts the budget."""

    def __init__(self, max_errors: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_errors, self.window_s, self._clock = max_errors, window_s, clock
        self._times: collections.deque[float] = collections.deque(maxlen=max_errors + 1)

    def spend(self) -> bool:
        """Count one error; False when it is one too many."""
        now = self._clock()
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        self._times.append(now)
        return len(self._times) <= self.max_errors


def new_token() -> str:
    """A fresh unguessable token (stream ids, view tokens): 128 bits, URL-safe."""
    return secrets.token_urlsafe(16)


def origin_allowed(origin: str | None, allowed: Collection[str] | None) -> bool:
    """True when a browser ``Origin`` header is in ``allowed`` (``None`` allows every origin; no header passes)."""
    if allowed is None or origin is None:
        return True
    return origin.lower().rstrip("/") in {a.lower().rstrip("/") for a in allowed}
