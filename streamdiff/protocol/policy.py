"""Per-connection policy, pure and clock-injected: the input rate limiter, the error budget, tokens and origins.

Nothing here sleeps or reads the wall clock on its own: pass ``clock`` (monotonic seconds) and a test can move time.
"""

from __future__ import annotations

import collections
import ipaddress
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["AddressRates", "ErrorBudget", "HostPolicy", "OriginPolicy", "RateLimiter", "ReadPacer", "client_address",
           "is_loopback_origin", "new_token", "origin_allowed"]


class RateLimiter:
    """Token bucket: ``rate`` events per second on average, bursts of up to ``burst``; starts full."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now

    def allow(self) -> bool:
        """Take one token if there is one; False means drop this event."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def owe(self, seconds: float) -> None:
        """Empty the bucket and owe ``seconds`` of refill: the next event is allowed no sooner than then."""
        self._refill()
        self._tokens = min(0.0, self._tokens) - seconds * self.rate + 1.0 - 1e-9


class ReadPacer(RateLimiter):
    """Messages read from one connection: ``rate`` per second on average with bursts of ``burst``. Past that,
    :meth:`read` says how long the I/O layer should wait before reading the next message, so that a flooding
    client is slowed by TCP's own flow control instead of costing the server a parse per message at full speed."""

    def read(self) -> float:
        """Count one message read now; the seconds to wait before reading the next (0 within the budget)."""
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class AddressRates:
    """A :class:`RateLimiter` per client address, for at most ``capacity`` addresses (the least recently seen are
    forgotten first: a forgotten address starts again with a full bucket, which only ever errs towards admitting)."""

    def __init__(self, rate: float, burst: int, capacity: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.capacity, self._clock = rate, burst, capacity, clock
        self._limiters: collections.OrderedDict[str, RateLimiter] = collections.OrderedDict()

    def allow(self, address: str) -> bool:
        """Take one token of ``address``'s bucket if there is one."""
        return self._limiter(address).allow()

    def penalize(self, address: str, seconds: float) -> None:
        """``address`` gets no token for the next ``seconds`` (its bucket is emptied and owes that much more)."""
        self._limiter(address).owe(seconds)

    def _limiter(self, address: str) -> RateLimiter:
        """``address``'s bucket, now the most recently seen (made full if new; the least recent beyond capacity
        forgotten)."""
        limiter = self._limiters.pop(address, None) or RateLimiter(self.rate, self.burst, self._clock)
        self._limiters[address] = limiter
        while len(self._limiters) > self.capacity:
            self._limiters.popitem(last=False)
        return limiter


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


def is_loopback_origin(origin: str) -> bool:
    """True for an ``http(s)`` origin on this machine: ``localhost``, ``127.0.0.0/8`` or ``[::1]``, any port."""
    try:
        parts = urlsplit(origin)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OriginPolicy:
    """Which browser ``Origin`` headers may open a stream (Cross-Site WebSocket Hijacking defence).

    A request without an ``Origin`` header (a non-browser client) passes. Otherwise the origin must be one of
    ``allowed`` (exact match, case-insensitive, e.g. ``https://studio.example.com``; ``"*"`` allows every origin), or a
    loopback page when ``allow_loopback`` (the default: pages served by this machine).
    """

    allowed: frozenset[str] = frozenset()
    allow_loopback: bool = True

    @classmethod
    def of(cls, allowed: Iterable[str] = (), allow_loopback: bool = True) -> OriginPolicy:
        return cls(frozenset(a.lower().rstrip("/") for a in allowed), allow_loopback)

    def allows(self, origin: str | None) -> bool:
        if origin is None or "*" in self.allowed:
            return True
        if self.allow_loopback and is_loopback_origin(origin):
            return True
        return origin_allowed(origin, self.allowed)


def client_address(remote: str) -> str:
    """The client's IP address of a transport's ``remote`` (``"host:port"``; IPv6 hosts unbracketed or bracketed)."""
    host, colon, port = remote.rpartition(":")
    return (host if colon and port.isdigit() else remote).strip("[]") or remote


def host_name(header: str) -> str | None:
    """The host name of an HTTP ``Host`` header (lower case, without port or IPv6 brackets); None when malformed."""
    try:
        parts = urlsplit(f"//{header}")
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    return parts.hostname or None


@dataclass(frozen=True)
class HostPolicy:
    """Which HTTP ``Host`` headers the server answers (DNS rebinding defence). Empty ``allowed``: every host.

    Entries are host names or IP addresses (``studio.example.com``, ``127.0.0.1``, ``::1``), any port, case-insensitive;
    a request without a ``Host`` header is refused once the list is set.
    """

    allowed: frozenset[str] = frozenset()

    @classmethod
    def of(cls, allowed: Iterable[str] = ()) -> HostPolicy:
        return cls(frozenset(a.strip().lower().strip("[]") for a in allowed if a.strip()))

    def allows(self, header: str | None) -> bool:
        if not self.allowed:
            return True
        return header is not None and host_name(header) in self.allowed
