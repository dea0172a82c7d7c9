"""Bounded latest-wins and lossless slots."""

from __future__ import annotations

import threading
import time

import pytest

from streamdiff import ConfigError
from streamdiff.runtime import Closed, FrameSlot, SlotPolicy


def test_latest_wins_keeps_the_newest_and_counts_superseded() -> None:
    slot = FrameSlot(2, SlotPolicy.LATEST_WINS)
    dropped = [slot.put(i) for i in range(5)]
    assert dropped == [[], [], [0], [1], [2]]
    assert slot.superseded == 3
    assert slot.max_depth == 2
    assert [slot.get(), slot.get()] == [3, 4]


def test_lossless_put_waits_for_room_and_drops_nothing() -> None:
    slot = FrameSlot(1, SlotPolicy.LOSSLESS)
    slot.put("a")
    done = threading.Event()

    def producer() -> None:
        slot.put("b")
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.15)  # blocked: the slot is full
    assert slot.get() == "a"
    assert done.wait(1.0)
    assert slot.get() == "b"
    assert slot.superseded == 0 and slot.max_depth == 1
    thread.join()


def test_stop_releases_waiting_put_and_get() -> None:
    stop = threading.Event()
    slot = FrameSlot(1, SlotPolicy.LOSSLESS)
    slot.put(1)
    results: list[object] = []

    def blocked_put() -> None:
        results.append(slot.put(2, stop))

    def blocked_get() -> None:
        empty = FrameSlot(1)
        try:
            empty.get(stop)
        except Closed:
            results.append("closed")

    threads = [threading.Thread(target=blocked_put), threading.Thread(target=blocked_get)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(1.0)
        assert not t.is_alive()
    assert sorted(map(str, results)) == ["[]", "closed"]
    assert len(slot) == 1  # the stopped put added nothing


def test_forced_put_never_drops_even_in_latest_wins() -> None:
    slot = FrameSlot(1, SlotPolicy.LATEST_WINS)
    slot.put("frame")
    threading.Timer(0.1, slot.get).start()
    assert slot.put("END", force=True) == []
    assert slot.get(timeout=1.0) == "END"
    assert slot.superseded == 0


def test_get_timeout_and_capacity_validation() -> None:
    with pytest.raises(TimeoutError):
        FrameSlot(1).get(timeout=0.05)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="capacity"):
            FrameSlot(bad)
