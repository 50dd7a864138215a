"""The per-destination breaker: an outage holds every caller, one probe tests the water, success releases all.

No durations are asserted. Waiting is observed as "this task has not finished yet", and progress through
`eventually`, which polls a condition with a generous limit so a slow machine only makes the test slower.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest

from service.breaker import Breaker, BreakerState

LONG = 3600.0
"""A pause no test ever waits out: a task still waiting after it proves the breaker holds it."""


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_breaker(
    *,
    threshold: int = 3,
    initial_pause_s: float = 0.01,
    max_pause_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> Breaker:
    return Breaker(
        "dest",
        threshold=threshold,
        initial_pause_s=initial_pause_s,
        max_pause_s=max_pause_s,
        rng=random.Random(1),
        clock=clock,
    )


def state(breaker: Breaker) -> BreakerState:
    """Read through a call, so mypy does not carry an earlier assert's narrowing past a state change."""
    return breaker.state


async def eventually(condition: Callable[[], bool], what: str, limit_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    while not condition():
        if loop.time() > give_up:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every ready task run a few steps."""
    for _ in range(5):
        await asyncio.sleep(0)


def start_admits(breaker: Breaker, count: int) -> list[asyncio.Task[bool]]:
    return [asyncio.create_task(breaker.admit(), name=f"admit-{i}") for i in range(count)]


async def cancel_all(tasks: list[asyncio.Task[bool]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def finished(tasks: list[asyncio.Task[bool]]) -> list[asyncio.Task[bool]]:
    return [task for task in tasks if task.done()]


# --- closed -----------------------------------------------------------------------------------------------------


async def test_a_closed_breaker_admits_at_once_and_not_as_probe() -> None:
    breaker = make_breaker()

    assert state(breaker) is BreakerState.CLOSED
    assert await breaker.admit() is False


async def test_threshold_failures_in_a_row_open_it() -> None:
    breaker = make_breaker(threshold=3)

    breaker.failed(None, probe=False)
    breaker.failed(None, probe=False)
    assert state(breaker) is BreakerState.CLOSED
    assert await breaker.admit() is False

    breaker.failed(None, probe=False)
    assert state(breaker) is BreakerState.OPEN


async def test_a_success_resets_the_failure_count() -> None:
    breaker = make_breaker(threshold=3)

    for _ in range(2):
        breaker.failed(None, probe=False)
    breaker.succeeded()
    for _ in range(2):
        breaker.failed(None, probe=False)

    assert state(breaker) is BreakerState.CLOSED


async def test_retry_after_opens_it_at_once_below_the_threshold() -> None:
    breaker = make_breaker(threshold=100)

    breaker.failed(LONG, probe=False)

    assert state(breaker) is BreakerState.OPEN
    waiter = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0.02)
    assert not waiter.done()
    await cancel_all([waiter])


# --- open: everyone waits ------------------------------------------------------------------------------------------


async def test_admit_waits_while_open() -> None:
    breaker = make_breaker(threshold=1, initial_pause_s=LONG, max_pause_s=LONG)
    breaker.failed(None, probe=False)

    waiters = start_admits(breaker, 3)
    await asyncio.sleep(0.03)

    assert finished(waiters) == []
    assert state(breaker) is BreakerState.OPEN
    await cancel_all(waiters)


async def test_a_success_while_open_releases_every_waiter_as_non_probes() -> None:
    # A call that left before the breaker opened may still come back with a 2xx: the destination is up.
    breaker = make_breaker(threshold=1, initial_pause_s=LONG, max_pause_s=LONG)
    breaker.failed(None, probe=False)
    waiters = start_admits(breaker, 4)
    await asyncio.sleep(0.02)
    assert finished(waiters) == []

    breaker.succeeded()

    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [False] * 4
    assert state(breaker) is BreakerState.CLOSED


async def test_the_pause_follows_retry_after() -> None:
    clock = ManualClock()
    breaker = make_breaker(threshold=100, clock=clock)
    breaker.failed(30.0, probe=False)

    clock.now += 29.0
    early = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0.02)
    assert not early.done(), "admitted before the server's Retry-After"
    await cancel_all([early])

    clock.now += 2.0
    assert await asyncio.wait_for(breaker.admit(), 5) is True
    assert state(breaker) is BreakerState.HALF_OPEN


async def test_the_latest_requested_resume_time_wins() -> None:
    clock = ManualClock()
    breaker = make_breaker(threshold=100, clock=clock)
    breaker.failed(30.0, probe=False)
    breaker.failed(5.0, probe=False)  # a shorter request from another caller does not shorten the pause

    clock.now += 10.0
    early = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0.02)
    assert not early.done()
    await cancel_all([early])

    clock.now += 21.0
    assert await asyncio.wait_for(breaker.admit(), 5) is True


# --- half-open: one probe ------------------------------------------------------------------------------------------


async def _open_with_probe(breaker: Breaker, waiters: int) -> tuple[asyncio.Task[bool], list[asyncio.Task[bool]]]:
    """Open `breaker` for a short pause, start `waiters` callers and return the one admitted as the probe."""
    breaker.failed(0.01, probe=False)
    tasks = start_admits(breaker, waiters)
    await eventually(lambda: bool(finished(tasks)), "a probe is admitted after the pause")
    await asyncio.sleep(0.03)  # time enough for a second (wrong) probe to show up
    done = finished(tasks)
    assert len(done) == 1, f"{len(done)} callers admitted while half-open"
    probe = done[0]
    assert probe.result() is True
    return probe, [task for task in tasks if task is not probe]


async def test_exactly_one_probe_is_admitted_after_the_pause() -> None:
    breaker = make_breaker(threshold=100)

    _, others = await _open_with_probe(breaker, waiters=5)

    assert state(breaker) is BreakerState.HALF_OPEN
    assert finished(others) == []
    await cancel_all(others)


async def test_a_caller_arriving_while_half_open_waits_too() -> None:
    breaker = make_breaker(threshold=100)
    _, others = await _open_with_probe(breaker, waiters=2)

    late = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0.02)

    assert not late.done()
    await cancel_all([*others, late])


async def test_probe_success_closes_and_releases_all_waiters() -> None:
    breaker = make_breaker(threshold=100)
    _, others = await _open_with_probe(breaker, waiters=5)

    breaker.succeeded()

    assert await asyncio.wait_for(asyncio.gather(*others), 5) == [False] * 4
    assert state(breaker) is BreakerState.CLOSED
    assert await breaker.admit() is False


async def test_probe_failure_reopens_and_then_admits_one_new_probe() -> None:
    breaker = make_breaker(threshold=100)  # far above: a probe's failure re-opens on its own
    _, others = await _open_with_probe(breaker, waiters=5)

    breaker.failed(None, probe=True)

    assert state(breaker) is BreakerState.OPEN
    await settle()
    assert finished(others) == [], "a failed probe must not release the waiters"

    await eventually(lambda: bool(finished(others)), "a second probe after the new pause")
    await asyncio.sleep(0.03)
    second = finished(others)
    assert len(second) == 1
    assert second[0].result() is True
    assert state(breaker) is BreakerState.HALF_OPEN

    breaker.succeeded()
    rest = [task for task in others if task is not second[0]]
    assert await asyncio.wait_for(asyncio.gather(*rest), 5) == [False] * 3


async def test_a_failed_probe_with_retry_after_holds_for_that_long() -> None:
    breaker = make_breaker(threshold=100)
    _, others = await _open_with_probe(breaker, waiters=3)

    breaker.failed(LONG, probe=True)
    await asyncio.sleep(0.05)

    assert state(breaker) is BreakerState.OPEN
    assert finished(others) == []
    await cancel_all(others)


async def test_released_lets_another_probe_through() -> None:
    breaker = make_breaker(threshold=100, initial_pause_s=LONG, max_pause_s=LONG)
    _, others = await _open_with_probe(breaker, waiters=4)

    breaker.released()  # the probe was cancelled, or its record was not the API's to judge

    await eventually(lambda: bool(finished(others)), "a new probe after release")
    await asyncio.sleep(0.03)
    second = finished(others)
    assert len(second) == 1
    assert second[0].result() is True
    assert state(breaker) is BreakerState.HALF_OPEN
    await cancel_all([task for task in others if task is not second[0]])


async def test_released_without_a_probe_changes_nothing() -> None:
    breaker = make_breaker()

    breaker.released()
    assert state(breaker) is BreakerState.CLOSED

    breaker.failed(LONG, probe=False)
    breaker.released()
    assert state(breaker) is BreakerState.OPEN


async def test_released_with_no_waiters_lets_the_next_caller_probe() -> None:
    clock = ManualClock()
    breaker = make_breaker(threshold=1, clock=clock)
    breaker.failed(10.0, probe=False)
    clock.now += 11.0
    assert await breaker.admit() is True

    breaker.released()

    assert state(breaker) is BreakerState.OPEN
    assert await asyncio.wait_for(breaker.admit(), 5) is True


async def test_calls_failing_together_do_not_escalate_the_pause() -> None:
    # 16 calls were in flight when the destination went down; they all fail within moments.
    clock = ManualClock()
    breaker = make_breaker(threshold=1, initial_pause_s=1.0, max_pause_s=LONG, clock=clock)
    for _ in range(16):
        breaker.failed(None, probe=False)

    clock.now += 2.0  # well past the first pause (at most initial_pause_s)
    probe = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0.02)

    try:
        assert probe.done(), "still closed to probes long after the first pause should have ended"
        assert probe.result() is True
    finally:
        await cancel_all([probe])
