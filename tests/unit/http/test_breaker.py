"""The per-destination breaker: it opens on an outage (a failure rate over a window, or a stall), not on a few
errors among successes; it never flaps; its probes decide, and only they close it.

All of it runs on a manual clock. Waiting is observed as "this task has not finished yet" after the clock moved
short of the pause, and release through `asyncio.wait_for` guards, never through durations.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from service.http.breaker import Breaker, BreakerSettings, BreakerState, Fault

SETTINGS = BreakerSettings(
    window_s=10, min_calls=20, failure_rate=0.5, stall_failures=3, stall_s=10.0, probes=3, initial_pause_s=1.0
)


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Changes(list[tuple[BreakerState, Fault | None]]):
    def __call__(self, state: BreakerState, why: Fault | None) -> None:
        self.append((state, why))


def make(settings: BreakerSettings = SETTINGS) -> tuple[Breaker, ManualClock, Changes]:
    clock, changes = ManualClock(), Changes()
    return Breaker("dest", settings, rng=random.Random(1), clock=clock, on_change=changes), clock, changes


def state(breaker: Breaker) -> BreakerState:
    """Read through a call, so mypy does not carry an earlier assert's narrowing past a state change."""
    return breaker.state


async def admitted(breaker: Breaker) -> bool:
    return await asyncio.wait_for(breaker.admit(), 5)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def fail_many(breaker: Breaker, count: int, fault: Fault = Fault.OUTAGE) -> None:
    for _ in range(count):
        breaker.failed(fault, probe=False)


async def test_closed_admits_at_once_and_not_as_probe() -> None:
    breaker, _, _ = make()
    assert await admitted(breaker) is False


async def test_a_few_failures_among_many_successes_never_open_it() -> None:
    breaker, clock, changes = make()
    for second in range(60):
        clock.now += 1
        for _ in range(50):
            breaker.succeeded(probe=False)
        fail_many(breaker, 2 if second % 7 else 5)  # 4-10% failures, with short runs of five in a row

    assert changes == []
    assert state(breaker) is BreakerState.CLOSED


async def test_a_failure_rate_over_the_window_opens_it_once() -> None:
    breaker, _, changes = make()
    for _ in range(10):
        breaker.succeeded(probe=False)
    fail_many(breaker, 9)
    assert state(breaker) is BreakerState.CLOSED, "below the minimum number of calls"

    fail_many(breaker, 30)

    assert state(breaker) is BreakerState.OPEN
    assert changes == [(BreakerState.OPEN, Fault.OUTAGE)], "one change, however many failures follow"


async def test_old_successes_leave_the_window() -> None:
    breaker, clock, _ = make()
    for _ in range(100):
        breaker.succeeded(probe=False)
    clock.now += 10.5  # wait, but not long enough for the stall rule
    fail_many(breaker, 2)
    clock.now += 0.1
    assert state(breaker) is BreakerState.CLOSED
    fail_many(breaker, 18)

    assert state(breaker) is BreakerState.OPEN, "the 100 successes were older than the window"


async def test_a_stall_opens_it_without_enough_calls_for_a_rate() -> None:
    breaker, clock, changes = make()
    breaker.succeeded(probe=False)
    clock.now += 5
    fail_many(breaker, 3)
    assert state(breaker) is BreakerState.CLOSED, "a success 5 s ago: not a stall yet"

    clock.now += 6
    fail_many(breaker, 1)

    assert changes == [(BreakerState.OPEN, Fault.OUTAGE)]


async def test_refused_keys_open_it_with_their_own_reason() -> None:
    breaker, _, changes = make()
    breaker.succeeded(probe=False)
    fail_many(breaker, 3, Fault.AUTH)

    assert changes == [(BreakerState.OPEN, Fault.AUTH)]


async def test_open_holds_callers_until_the_pause_ends_then_admits_a_few_probes() -> None:
    breaker, clock, _ = make()
    fail_many(breaker, 40)
    waiting = [asyncio.create_task(breaker.admit()) for _ in range(5)]
    await settle()
    assert not any(t.done() for t in waiting)

    clock.now += SETTINGS.max_pause_s  # past any pause
    # The waiters sleep until the pause they saw ends; a new caller finds the pause over at once.
    assert await admitted(breaker) is True
    assert state(breaker) is BreakerState.HALF_OPEN
    await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    probes = [t.result() for t in waiting if t.done()]
    assert probes
    assert all(probes)
    assert 1 + len(probes) <= SETTINGS.probes
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_only_a_probe_closes_it_a_late_success_does_not() -> None:
    breaker, clock, changes = make()
    fail_many(breaker, 40)

    breaker.succeeded(probe=False)  # a call that was in flight before it opened
    assert state(breaker) is BreakerState.OPEN

    clock.now += SETTINGS.max_pause_s
    assert await admitted(breaker) is True
    breaker.succeeded(probe=True)

    assert state(breaker) is BreakerState.CLOSED
    assert changes == [(BreakerState.OPEN, Fault.OUTAGE), (BreakerState.CLOSED, None)]


async def test_all_probes_failing_reopen_it_for_longer() -> None:
    breaker, clock, changes = make()
    fail_many(breaker, 40)
    first_resume = breaker.resume_at
    clock.now += SETTINGS.max_pause_s
    for _ in range(SETTINGS.probes):
        assert await admitted(breaker) is True
    for _ in range(SETTINGS.probes - 1):
        breaker.failed(Fault.OUTAGE, probe=True)
        assert state(breaker) is BreakerState.HALF_OPEN, "one failed probe of three decides nothing"
    breaker.failed(Fault.OUTAGE, probe=True)

    assert state(breaker) is BreakerState.OPEN
    assert breaker.resume_at - clock.now > 0
    assert breaker.resume_at > first_resume
    assert changes == [(BreakerState.OPEN, Fault.OUTAGE)], "re-opening for the same reason is not a new change"


async def test_a_released_probe_passes_its_turn_on() -> None:
    breaker, clock, _ = make(BreakerSettings(probes=1, initial_pause_s=1.0))
    fail_many(breaker, 40)
    clock.now += 60
    assert await admitted(breaker) is True
    second = asyncio.create_task(breaker.admit())
    await settle()
    assert not second.done(), "one probe at a time"

    breaker.released(probe=True)

    assert await asyncio.wait_for(second, 5) is True


async def test_recent_success_is_what_a_403_is_judged_by() -> None:
    breaker, clock, _ = make()
    assert breaker.recent_success() is False
    breaker.succeeded(probe=False)
    assert breaker.recent_success() is True
    clock.now += 11
    assert breaker.recent_success() is False


@pytest.mark.parametrize("fault", list(Fault))
async def test_an_auth_pause_is_capped_so_a_new_key_is_tried_soon(fault: Fault) -> None:
    breaker, clock, _ = make(BreakerSettings(initial_pause_s=20.0, max_pause_s=60.0, auth_pause_cap_s=5.0))
    fail_many(breaker, 40, fault)
    pause = breaker.resume_at - clock.now
    if fault is Fault.AUTH:
        assert pause <= 5.0
    else:
        assert pause >= 15.0


async def test_a_caller_cancelled_as_the_breaker_closes_is_cancelled() -> None:
    """A revoke cancels a record waiting out the pause; the breaker closing in the same turn must not swallow that
    (Python 3.11's `asyncio.wait_for` returns the inner result then, and the record went on to deliver after its
    partition was gone)."""
    # A pause far longer than the test: the waiter's own timeout never ends its wait here.
    breaker, clock, _ = make(BreakerSettings(probes=1, initial_pause_s=1000.0, max_pause_s=2000.0))
    fail_many(breaker, 40)
    waiting = asyncio.create_task(breaker.admit())
    await settle()
    assert not waiting.done(), "open: it waits out the pause"
    clock.now += 3000
    assert await admitted(breaker) is True  # a probe

    breaker.succeeded(probe=True)  # closes it: wakes the waiter, in this turn
    waiting.cancel()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)
