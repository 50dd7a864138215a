"""Slots: the in-flight bound of partitions and destinations; in order, and no slot lost to a cancellation."""

from __future__ import annotations

import asyncio

from service.kafka.slots import Slots


async def test_slots_are_handed_to_waiters_in_order() -> None:
    slots = Slots(1)
    assert slots.try_take()
    order: list[str] = []

    async def taker(name: str) -> None:
        await slots.take()
        order.append(name)

    waiting = [asyncio.create_task(taker(name)) for name in ("a", "b")]
    await asyncio.sleep(0)
    assert order == []
    assert not slots.try_take()  # no jumping the queue, even by a synchronous taker

    slots.release()
    await asyncio.sleep(0)
    assert order == ["a"]
    slots.release()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert order == ["a", "b"]
    assert slots.free == 0
    slots.release()
    assert slots.free == 1


async def test_a_cancelled_waiter_does_not_swallow_a_slot() -> None:
    slots = Slots(1)
    assert slots.try_take()
    cancelled = asyncio.create_task(slots.take())
    patient = asyncio.create_task(slots.take())
    await asyncio.sleep(0)

    slots.release()  # handed to the first waiter ...
    cancelled.cancel()  # ... which is cancelled before it runs: the slot must pass on
    await asyncio.wait_for(patient, 5)

    assert cancelled.cancelled()
    assert slots.free == 0
