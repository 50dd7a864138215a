"""The adaptive concurrency limit, driven by synthetic answers on a manual clock (Netflix's limit tests do the
same): it grows while the limit is reached and latency holds, is cut by back pressure and latency growth,
ignores a little noise, honours Retry-After pauses and hands slots to waiters in order."""

from __future__ import annotations

import asyncio

from service.http.limiter import ConcurrencyLimit, LimitSettings


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(**overrides: float) -> tuple[ConcurrencyLimit, ManualClock, list[int]]:
    clock, changes = ManualClock(), list[int]()
    settings = LimitSettings(**{"initial": 4, "ceiling": 1000, **overrides})  # type: ignore[arg-type]
    return ConcurrencyLimit(settings, clock=clock, on_change=changes.append), clock, changes


def window(limit: ConcurrencyLimit, clock: ManualClock, *, rtt: float, calls: int | None = None, back: int = 0) -> None:
    """One window in which the limit is filled and `calls` answers come back (`back` of them as back pressure)."""
    count = limit.limit if calls is None else calls
    for _ in range(count):
        assert limit.try_acquire()
    for i in range(count):
        limit.release(None if i < back else rtt, backpressure=i < back)
    clock.now += 0.25  # past the window (its length is the mean latency, 0.1 s at least)
    assert limit.try_acquire()  # the next answer closes it, and adds nothing to judge by
    limit.release(None)


def test_slow_start_doubles_while_the_limit_is_reached() -> None:
    limit, clock, _ = make()
    for expected in (8, 16, 32, 64):
        window(limit, clock, rtt=0.05)
        assert limit.limit == expected


def test_an_unreached_limit_does_not_grow() -> None:
    limit, clock, _ = make(initial=10)
    for _ in range(5):
        window(limit, clock, rtt=0.05, calls=3)
    assert limit.limit == 10


def test_back_pressure_cuts_and_ends_slow_start() -> None:
    limit, clock, _ = make(initial=100)
    window(limit, clock, rtt=0.05, back=50)
    assert limit.limit == 90
    window(limit, clock, rtt=0.05)
    assert limit.limit == 90 + 9, "after the first cut it grows by about the square root, not doubling"


def throttled_window(limit: ConcurrencyLimit, clock: ManualClock, *, answers: int, throttled: int) -> None:
    for _ in range(answers):
        assert limit.try_acquire()
    for i in range(answers):
        limit.release(None if i < throttled else 0.05, throttled=i < throttled)
    clock.now += 0.25
    assert limit.try_acquire()
    limit.release(None)


def test_429s_from_much_of_what_was_in_flight_halve_the_limit() -> None:
    limit, clock, _ = make(initial=100)
    throttled_window(limit, clock, answers=100, throttled=50)  # a token bucket ran dry
    assert limit.limit == 50


def test_a_stray_429_does_not_cut_the_limit() -> None:
    limit, clock, _ = make(initial=100)
    throttled_window(limit, clock, answers=100, throttled=1)
    assert limit.limit >= 100


def test_a_little_back_pressure_among_many_answers_is_noise() -> None:
    limit, clock, _ = make(initial=100)
    window(limit, clock, rtt=0.05)
    before = limit.limit
    window(limit, clock, rtt=0.05, back=40)  # 20% random faults: 40 hung calls among 200
    assert limit.limit >= before


def test_latency_growth_cuts_then_the_new_latency_becomes_normal() -> None:
    limit, clock, _ = make(initial=100)
    window(limit, clock, rtt=0.005)
    window(limit, clock, rtt=0.005)
    high = limit.limit
    window(limit, clock, rtt=0.2)  # 0 ms -> 200 ms
    assert limit.limit < high
    for _ in range(5):
        window(limit, clock, rtt=0.2)
    assert limit.limit > high * 0.9, "once 200 ms is the running mean, the limit grows again"


def test_it_stays_within_the_floor_and_the_ceiling() -> None:
    limit, clock, _ = make(initial=4, ceiling=50)
    for _ in range(20):
        window(limit, clock, rtt=0.05)
    assert limit.limit == 50
    for _ in range(100):
        window(limit, clock, rtt=0.05, back=limit.limit)
    assert limit.limit == 4


def test_changes_are_reported() -> None:
    limit, clock, changes = make()
    window(limit, clock, rtt=0.05)
    window(limit, clock, rtt=0.05, back=8)
    assert changes == [8, 7]


async def test_waiters_get_freed_slots_in_order() -> None:
    limit, _, _ = make(initial=1, floor=1)
    assert limit.try_acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        await limit.acquire()
        order.append(n)

    tasks = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        limit.release(0.01)
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2]


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    limit, _, _ = make(initial=1, floor=1)
    assert limit.try_acquire()
    first = asyncio.create_task(limit.acquire())
    second = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    limit.release(0.01)  # the slot goes to `first`...
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 5)
    assert limit.in_flight == 1


async def test_a_retry_after_pause_holds_new_calls_until_it_ends() -> None:
    limit, clock, _ = make(initial=10)
    limit.pause_until(clock.now + 1.0)
    assert not limit.try_acquire()
    assert limit.paused
    limit.pause_until(clock.now + 0.5)  # a shorter pause never shortens the first
    clock.now += 0.6
    assert not limit.try_acquire()
    clock.now += 0.5
    assert limit.try_acquire()
    assert not limit.paused
