"""Bounded frame queues between stages: latest-wins (real time) or lossless with back-pressure (files).

A :class:`FrameSlot` holds at most ``capacity`` items. In ``LATEST_WINS`` mode a put into a full slot drops the
oldest item and counts it as *superseded*, so the reader always gets the newest frame and latency cannot grow. In
``LOSSLESS`` mode a put waits until there is room (back-pressure): nothing is dropped and the fastest stage simply
waits for the slowest one. Every wait takes a ``stop`` event and returns when it is set, so no thread hangs on a
queue at shutdown.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from typing import Generic, TypeVar

from ..errors import ConfigError

T = TypeVar("T")

# How often a waiting put/get looks at the stop event (seconds); waits end at once on notify.
POLL_INTERVAL = 0.05


class SlotPolicy(str, enum.Enum):
    """What a put into a full slot does."""

    LATEST_WINS = "latest_wins"
    LOSSLESS = "lossless"


class Closed(Exception):
    """Raised by :meth:`FrameSlot.get` when the slot was stopped and is empty."""


class FrameSlot(Generic[T]):
    """A bounded, thread-safe queue with a drop policy and counters (``superseded``, ``max_depth``)."""

    def __init__(self, capacity: int = 1, policy: SlotPolicy | str = SlotPolicy.LATEST_WINS, name: str = "slot"):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"queue capacity={capacity!r} must be an integer >= 1")
        self.capacity = capacity
        self.policy = SlotPolicy(policy)
        self.name = name
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self.superseded = 0
        self.max_depth = 0
        self.puts = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T, stop: threading.Event | None = None, *, force: bool = False) -> list[T]:
        """Add ``item``; returns the items it superseded (LATEST_WINS), oldest first.

        In LOSSLESS mode waits for room until ``stop`` is set (then the item is not added and ``[]`` is returned).
        ``force=True`` always waits for room whatever the policy: used for the end-of-stream marker, which must
        never be dropped.
        """
        with self._cond:
            dropped: list[T] = []
            if self.policy is SlotPolicy.LOSSLESS or force:
                while len(self._items) >= self.capacity:
                    if stop is not None and stop.is_set():
                        return []
                    self._cond.wait(POLL_INTERVAL)
            else:
                while len(self._items) >= self.capacity:
                    dropped.append(self._items.popleft())
                self.superseded += len(dropped)
            self._items.append(item)
            self.puts += 1
            self.max_depth = max(self.max_depth, len(self._items))
            self._cond.notify_all()
            return dropped

    def get(self, stop: threading.Event | None = None, timeout: float | None = None) -> T:
        """The oldest item, waiting for one: :class:`Closed` once ``stop`` is set, TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if stop is not None and stop.is_set():
                    raise Closed(self.name)
                wait = POLL_INTERVAL
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no item in {self.name} after {timeout} s")
                    wait = min(wait, left)
                self._cond.wait(wait)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def wake(self) -> None:
        """Wake every waiting thread so it looks at its stop event now."""
        with self._cond:
            self._cond.notify_all()
