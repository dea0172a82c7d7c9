"""streamdiff.server.pacing: the latest-wins slot and time-limited awaits every session is built from."""

from __future__ import annotations

import asyncio

import pytest

from streamdiff.server.pacing import LatestSlot, SendTimeout, send_within, within


def test_latest_slot_keeps_only_the_newest_and_reports_what_it_replaced() -> None:
    async def main() -> None:
        slot: LatestSlot[int] = LatestSlot()
        assert slot.put(1) is None and slot.put(2) == 1 and slot.occupied
        assert await slot.get() == 2 and not slot.occupied and slot.take() is None
        waiter = asyncio.ensure_future(slot.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        slot.put(3)
        assert await asyncio.wait_for(waiter, 1) == 3

    asyncio.run(main())


def test_a_slot_of_one_group_keeps_the_newest_few_oldest_first() -> None:
    """A stream's input slot holds F frames: a put into a full slot replaces the oldest; the capacity follows F."""
    async def main() -> None:
        slot: LatestSlot[int] = LatestSlot()
        assert [slot.put(i, capacity=3) for i in range(4)] == [None, None, None, 0]
        assert slot.full and len(slot) == 3
        assert [await slot.get(), slot.take()] == [1, 2] and not slot.full
        assert slot.put(4, capacity=1) == 3 and len(slot) == 1  # F shrank: one frame waits
        assert await slot.get() == 4 and not slot.occupied

    asyncio.run(main())


def test_within_and_send_within_time_out_and_stay_cancellable() -> None:
    class Stuck:
        async def send(self, data: object) -> None:
            await asyncio.Event().wait()

    async def main() -> None:
        assert await within(asyncio.sleep(0, "done"), None) == "done"
        with pytest.raises(asyncio.TimeoutError):
            await within(asyncio.Event().wait(), 0.01)
        with pytest.raises(SendTimeout, match="did not leave within 0.01 s"):
            await send_within(Stuck(), b"x", 0.01)
        task = asyncio.ensure_future(within(asyncio.Event().wait(), 10))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
