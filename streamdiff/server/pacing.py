"""Asyncio building blocks of the sessions: a latest-wins slot and a time-limited send.

Every per-client queue in the server is a :class:`LatestSlot`: it holds one item (a stream's input: one group of
frames), a newer one replaces the oldest (the replaced one is returned so that the caller counts the drop), and one
consumer waits for it. Memory per client is therefore bounded by construction, whatever the client does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["LatestSlot", "SendTimeout", "send_within", "within"]


class LatestSlot(Generic[T]):
    """Up to ``capacity`` items (1 by default), oldest first, newest wins: a put into a full slot drops the oldest;
    :meth:`get` waits for one and takes the oldest. Single consumer. Use inside the event loop only."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()

    def put(self, item: T, capacity: int | None = None) -> T | None:
        """Store ``item``; returns the item it replaced (dropped, never delivered) or None. ``capacity`` changes the
        slot's capacity first (when it shrinks, the items beyond it leave as the consumer takes them)."""
        if capacity is not None:
            self.capacity = capacity
        replaced = self._items.popleft() if len(self._items) >= self.capacity else None
        self._items.append(item)
        self._ready.set()
        return replaced

    async def get(self) -> T:
        """Wait for an item and take the oldest."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def take(self) -> T | None:
        """The oldest item, if any, without waiting."""
        return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def occupied(self) -> bool:
        return bool(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity


class SendTimeout(Exception):
    """A message did not leave within the write timeout: the peer stopped reading."""


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable`` for at most ``timeout`` seconds (``asyncio.TimeoutError`` after), None: no limit.

    ``asyncio.timeout`` where it exists (3.11+): ``asyncio.wait_for`` of 3.10/3.11 can swallow a cancellation
    that arrives as the awaited operation finishes, and a session's loop must always stop when cancelled.
    """
    if timeout is None:
        return await awaitable
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await awaitable
    return await asyncio.wait_for(awaitable, timeout)  # pragma: no cover - Python 3.10


async def send_within(transport: object, data: str | bytes, timeout: float) -> None:
    """``transport.send(data)`` or :class:`SendTimeout` after ``timeout`` seconds (then abort the connection)."""
    try:
        await within(transport.send(data), timeout)  # type: ignore[attr-defined]
    except asyncio.TimeoutError:
        raise SendTimeout(f"a message did not leave within {timeout:g} s") from None
