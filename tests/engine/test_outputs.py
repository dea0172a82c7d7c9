"""A stream's output queue: latest-wins drops counted, lossless room, the end of a stream seen by its readers."""

from __future__ import annotations

import threading

import pytest

from streamdiff.engine.outputs import OutputQueue, StreamOutput


def output(i: int) -> StreamOutput:
    return StreamOutput(None, frame_ids=(i,))


def test_latest_wins_keeps_the_newest_and_counts_the_rest() -> None:
    queue = OutputQueue(2, lossless=False, name="s")
    assert queue.has_room()
    for i in range(5):
        queue.put(output(i))
    assert queue.has_room() and queue.dropped == 3
    assert [queue.get(0).frame_ids, queue.poll().frame_ids, queue.poll()] == [(3,), (4,), None]
    with pytest.raises(TimeoutError, match="s: no output within 0.01 s"):
        queue.get(timeout=0.01)


def test_lossless_has_no_room_when_full_and_every_take_calls_on_room() -> None:
    rooms = []
    queue = OutputQueue(2, lossless=True, name="s", on_room=lambda: rooms.append(1))
    queue.put(output(0))
    queue.put(output(1))
    assert not queue.has_room()
    queue.get()
    assert queue.has_room() and len(rooms) == 1
    queue.poll()
    assert len(rooms) == 2 and queue.poll() is None and len(rooms) == 2 and queue.dropped == 0


def test_finish_wakes_a_waiting_reader_after_the_queued_outputs() -> None:
    queue = OutputQueue(4, lossless=False, name="s")
    got = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: queue.get(timeout=10), None)))
    reader.start()
    queue.put(output(0))
    error = RuntimeError("boom")
    queue.finish(error)
    reader.join(10)
    assert not reader.is_alive() and [o.frame_ids for o in got] == [(0,)]
    queue.finish(None)  # a second end keeps the first error
    assert queue.finished and queue.error is error and queue.get() is None
