"""The engine's one input queue, driven through real Stream handles, with this test as the worker (no model)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from streamdiff import EngineFull, StreamClosed, StreamConfig
from streamdiff.config import PromptConfig
from streamdiff.engine.inbox import ChangeSettings, CloseStream, EndInput, Inbox, OpenStream, SubmitFrame
from streamdiff.engine.outputs import OutputQueue
from streamdiff.engine.records import StreamRecord
from streamdiff.engine.state import StreamStats
from streamdiff.engine.stream import Stream

CONFIG = StreamConfig(width=64, height=64, t_index_list=(25,))
FRAME = torch.zeros(3, 64, 64)


def open_stream(inbox: Inbox, stream_id: int, *, lossless: bool = False, input_capacity: int | None = None,
                max_streams: int = 4) -> tuple[Stream, StreamRecord]:
    """A real handle and record on ``inbox``, as StreamEngine.open_stream makes them (no engine: no update())."""
    outputs = OutputQueue(1, lossless, f"s{stream_id}", on_room=inbox.notify)
    stats = StreamStats()
    stream = Stream(None, stream_id, CONFIG, PromptConfig(), inbox=inbox, outputs=outputs, stats=stats,
                    input_capacity=input_capacity, name=f"s{stream_id}")
    record = StreamRecord(stream, outputs, stats, CONFIG, PromptConfig())
    inbox.open(OpenStream(record), max_streams)
    return stream, record


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_messages_keep_their_order_and_the_drain_empties_the_inbox() -> None:
    inbox = Inbox()
    stream, _ = open_stream(inbox, 1)
    stream.submit(FRAME, frame_id="a")
    inbox.put(ChangeSettings(1, CONFIG, PromptConfig(prompt="x"), 1))
    stream.end_input()
    stream.close()
    kinds = [type(m) for m in inbox.drain()]
    assert kinds == [OpenStream, SubmitFrame, ChangeSettings, EndInput, CloseStream]
    assert inbox.drain() == []


def test_latest_wins_keeps_the_newest_frames_and_counts_every_drop() -> None:
    inbox = Inbox()
    stream, record = open_stream(inbox, 1, input_capacity=2)
    inbox.drain()
    for i in range(5):  # the worker is busy: frames pile up in the inbox, never more than 2
        stream.submit(FRAME, frame_id=i)
    frames = [m for m in inbox.drain() if isinstance(m, SubmitFrame)]
    assert [m.frame.frame_id for m in frames] == [3, 4]
    assert sum(m.superseded for m in frames) == 3
    for message in frames:
        record.add_input(message)
    stream.submit(FRAME, frame_id=5)
    record.add_input(inbox.drain()[0])  # the record keeps the newest 2 too
    assert [f.frame_id for f in record.inputs] == [4, 5] and stream.stats.dropped_inputs == 4


def test_lossless_submit_waits_for_room_until_its_timeout() -> None:
    inbox = Inbox()
    stream, record = open_stream(inbox, 1, lossless=True, input_capacity=2)
    stream.submit(FRAME, frame_id=0)
    stream.submit(FRAME, frame_id=1)
    with pytest.raises(TimeoutError, match=r"s1: no room in the input queue within 0.05 s"):
        stream.submit(FRAME, frame_id=2, timeout=0.05)
    for message in inbox.drain()[1:]:
        record.add_input(message)
    with pytest.raises(TimeoutError):  # drained into the record, still not taken: still no room
        stream.submit(FRAME, frame_id=2, timeout=0.05)
    inbox.release(1, len(record.take_inputs(1)))  # the execute phase took one
    stream.submit(FRAME, frame_id=2, timeout=0.05)
    assert [m.frame.frame_id for m in inbox.drain()] == [2]


@pytest.mark.parametrize("how", ["close", "end_input", "forget"])
def test_a_waiting_lossless_submit_is_woken_with_stream_closed(how: str) -> None:
    inbox = Inbox()
    stream, _ = open_stream(inbox, 1, lossless=True, input_capacity=1)
    stream.submit(FRAME)
    raised: list[BaseException] = []

    def submit() -> None:
        try:
            stream.submit(FRAME, timeout=30)
        except BaseException as error:  # noqa: BLE001 - the test reports it
            raised.append(error)

    waiter = threading.Thread(target=submit)
    waiter.start()
    wait_until(lambda: inbox.waiting == 1)  # really waiting for room
    {"close": stream.close, "end_input": stream.end_input, "forget": lambda: inbox.forget(1)}[how]()
    waiter.join(10)
    assert not waiter.is_alive() and inbox.waiting == 0
    assert len(raised) == 1 and isinstance(raised[0], StreamClosed) and "s1 is closed" in str(raised[0])


def test_a_closed_stream_takes_no_more_messages_but_close_is_idempotent() -> None:
    inbox = Inbox()
    stream, _ = open_stream(inbox, 1)
    stream.end_input()
    with pytest.raises(StreamClosed):
        stream.submit(FRAME)
    assert not inbox.put(ChangeSettings(1, CONFIG, PromptConfig(), 1))
    assert inbox.put(CloseStream(1))  # a close still cancels the drain
    inbox.forget(1)
    stream.close()
    assert not inbox.put(CloseStream(1)) and [type(m) for m in inbox.drain()][-1] is CloseStream


def test_admission_counts_open_streams_and_a_closed_one_makes_room_at_once() -> None:
    inbox = Inbox()
    first, _ = open_stream(inbox, 1, max_streams=1)
    with pytest.raises(EngineFull, match=r"already serves max_streams=1 streams"):
        open_stream(inbox, 2, max_streams=1)
    first.close()
    second, _ = open_stream(inbox, 2, max_streams=1)
    assert inbox.handles() == [first, second]  # the closed one is listed until the worker forgets it
    inbox.forget(1)
    assert inbox.handles() == [second] and not inbox.wait_empty(0.01)
    inbox.forget(2)
    assert inbox.wait_empty(0.01)


def test_the_worker_waits_for_a_message_or_for_work() -> None:
    inbox = Inbox()
    ready = threading.Event()
    woke = threading.Event()

    def worker() -> None:
        inbox.wait(ready.is_set)
        woke.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert not woke.wait(0.05)
    ready.set()
    inbox.notify()  # e.g. a reader made room in a lossless output queue
    thread.join(10)
    assert woke.is_set()
    open_stream(inbox, 1)
    inbox.wait(lambda: False)  # a queued message: returns at once


def test_the_inbox_stays_bounded_however_often_clients_change_or_close() -> None:
    """Per stream at most one change (the newest) and one close wait, in their places among the frames."""
    inbox = Inbox()
    stream, _ = open_stream(inbox, 1)
    inbox.drain()
    for version in range(1, 100):
        inbox.put(ChangeSettings(1, CONFIG, PromptConfig(seed=version), version))
    stream.submit(FRAME, frame_id="f")
    inbox.put(ChangeSettings(1, CONFIG, PromptConfig(seed=100), 100))
    for _ in range(50):
        stream.close()
    messages = inbox.drain()
    assert [type(m) for m in messages] == [SubmitFrame, ChangeSettings, CloseStream]
    assert messages[1].version == 100
    assert inbox.put(CloseStream(1)) and inbox.drain() == []  # once closed, a close is never queued again
