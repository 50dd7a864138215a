"""A circuit breaker per destination: an outage pauses the destination, a few errors do not.

Closed, calls flow, and their outcomes fill a sliding window of one-second buckets. It opens on an
outage, not on noise: when at least `min_calls` answers in the window failed at `failure_rate` or
more, or when `stall_failures` failures came in a row with no success for `stall_s` (a destination
with too little traffic to fill the window). A refused key (`Fault.AUTH`) opens it after
`stall_failures` refusals in a row, with its own reason, and pauses it at most `auth_pause_cap_s`,
so a key rotated in its file is picked up within seconds. 429s never count: they are rate limits,
handled by the destination's concurrency limit and Retry-After pause (service/http/limiter.py).

Open, every caller waits (records stay uncommitted, partitions back up and are paused by the
consumer loop). After the pause, up to `probes` callers go through as probes, each with a short
attempt timeout (delivery's job), so one hung probe cannot hold the destination. The first probe
that succeeds closes the breaker; when every probe failed it re-opens for a longer pause. Only a
probe closes it: a call that was in flight before it opened and succeeds late says nothing about
now, and closing on it was what made the old breaker flap. Each state change is logged once
(`on_change`), and a pause of at least `initial_pause_s` bounds how often it can change.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from service.http.classify import backoff_s


class BreakerState(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Fault(Enum):
    """Why a call failed, as far as the destination's health is concerned."""

    OUTAGE = "outage"
    """No usable answer or a 5xx: the API is down or broken."""
    AUTH = "auth"
    """The API refused our key: waiting is right, dead-lettering would lose every record."""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    window_s: int = 10
    min_calls: int = 20
    failure_rate: float = 0.5
    stall_failures: int = 3
    stall_s: float = 10.0
    probes: int = 3
    initial_pause_s: float = 1.0
    max_pause_s: float = 30.0
    auth_pause_cap_s: float = 5.0


class Breaker:
    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, Fault | None], None] = lambda state, why: None,
    ) -> None:
        self.name = name
        self._s = settings
        self._rng = rng
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._why: Fault | None = None
        self._ok = [0] * settings.window_s
        self._failed = [0] * settings.window_s
        self._second = int(clock())
        self._total_ok = 0
        self._total_failed = 0
        self._streak = 0
        self._streak_auth = 0
        self._last_success = clock()
        self._opened = 0
        self._resume_at = 0.0
        self._probes_out = 0
        self._probes_failed = 0
        self._changed = asyncio.Event()

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def why(self) -> Fault | None:
        """The reason it is open or probing; None while closed."""
        return self._why

    @property
    def resume_at(self) -> float:
        """When the pause of the last opening ends, on the breaker's clock: then it admits probes."""
        return self._resume_at

    def recent_success(self) -> bool:
        """Whether a call to this destination succeeded within the window (and it is not open now)."""
        self._advance()
        return self._state is BreakerState.CLOSED and self._total_ok > 0

    async def admit(self) -> bool:
        """Wait until a call may go; True when the caller is a probe and must report back."""
        while True:
            if self._state is BreakerState.CLOSED:
                return False
            now = self._clock()
            if self._state is BreakerState.OPEN and now >= self._resume_at:
                self._state = BreakerState.HALF_OPEN
                self._probes_out = self._probes_failed = 0
            if self._state is BreakerState.HALF_OPEN and self._probes_out + self._probes_failed < self._s.probes:
                self._probes_out += 1
                return True
            self._changed.clear()
            timeout = self._resume_at - now if self._state is BreakerState.OPEN else None
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` returns the inner result when a
            # cancellation (a revoke) lands in the turn the breaker changes, and the record would go on to deliver.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

    def succeeded(self, *, probe: bool) -> None:
        self._count(ok=True)
        self._streak = self._streak_auth = 0
        self._last_success = self._clock()
        if probe:
            self._probes_out -= 1
        if probe and self._state is BreakerState.HALF_OPEN:
            self._opened = 0
            self._set(BreakerState.CLOSED, None)
            self._reset_window()

    def answered(self, *, probe: bool) -> None:
        """The API answered about the record (a 4xx that is the record's fault): it is up, but no verdict on health."""
        if probe:
            self.succeeded(probe=True)
        else:
            self._streak = self._streak_auth = 0

    def failed(self, fault: Fault, *, probe: bool) -> None:
        now = self._clock()
        self._count(ok=False)
        self._streak += 1
        self._streak_auth = self._streak_auth + 1 if fault is Fault.AUTH else 0
        if probe:
            self._probes_out -= 1
            self._probes_failed += 1
            if self._state is BreakerState.HALF_OPEN and self._probes_failed >= self._s.probes:
                self._open(fault, now)
            return
        if self._state is not BreakerState.CLOSED:
            return  # in flight when it opened: the same outage, not a new one
        s = self._s
        if self._streak_auth >= s.stall_failures:
            self._open(Fault.AUTH, now)
            return
        total = self._total_ok + self._total_failed
        by_rate = total >= s.min_calls and self._total_failed >= s.failure_rate * total
        stalled = self._streak >= s.stall_failures and now - self._last_success >= s.stall_s
        if by_rate or stalled:
            self._open(fault, now)

    def released(self, *, probe: bool) -> None:
        """A call ended without a verdict (cancelled); a probe's turn passes to the next caller."""
        if probe:
            self._probes_out -= 1
            self._changed.set()

    def _open(self, fault: Fault, now: float) -> None:
        pause = backoff_s(self._opened, self._s.initial_pause_s, self._s.max_pause_s, self._rng)
        if fault is Fault.AUTH:
            pause = min(pause, self._s.auth_pause_cap_s)
        self._opened += 1
        self._resume_at = now + pause
        was, why = self._state, self._why
        self._state = BreakerState.OPEN
        self._why = fault
        self._changed.set()
        if was is BreakerState.CLOSED or why is not fault:
            self._on_change(self._state, fault)

    def _set(self, state: BreakerState, why: Fault | None) -> None:
        self._state = state
        self._why = why
        self._changed.set()
        self._on_change(state, why)

    def _reset_window(self) -> None:
        self._ok = [0] * self._s.window_s
        self._failed = [0] * self._s.window_s
        self._total_ok = self._total_failed = 0
        self._second = int(self._clock())

    def _advance(self) -> None:
        second = int(self._clock())
        if second == self._second:
            return
        size = self._s.window_s
        for step in range(1, min(second - self._second, size) + 1):
            i = (self._second + step) % size
            self._total_ok -= self._ok[i]
            self._total_failed -= self._failed[i]
            self._ok[i] = self._failed[i] = 0
        self._second = second

    def _count(self, *, ok: bool) -> None:
        self._advance()
        i = self._second % self._s.window_s
        if ok:
            self._ok[i] += 1
            self._total_ok += 1
        else:
            self._failed[i] += 1
            self._total_failed += 1
