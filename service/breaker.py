"""A circuit breaker per destination: an outage pauses the destination, it does not fail records.

Closed, calls flow. After `threshold` retryable failures in a row, or a server's Retry-After, it
opens: every caller waits (their records stay uncommitted, their partitions back up and are paused
by the consumer loop), and after the pause a single probe call goes through. The probe's success
closes the breaker and releases everyone; its failure re-opens it for a longer pause. Waiting here
instead of per request is what makes a 429's Retry-After hold the whole destination, not one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from enum import Enum

from .classify import backoff_s


class BreakerState(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Breaker:
    def __init__(
        self,
        name: str,
        *,
        threshold: int,
        initial_pause_s: float,
        max_pause_s: float,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] = lambda state: None,
    ) -> None:
        self.name = name
        self._on_change = on_change
        self._threshold = threshold
        self._initial = initial_pause_s
        self._max = max_pause_s
        self._rng = rng
        self._clock = clock
        self._failures = 0
        self._opened = 0
        self._state = BreakerState.CLOSED
        self._resume_at = 0.0
        self._changed = asyncio.Event()

    @property
    def state(self) -> BreakerState:
        return self._state

    async def admit(self) -> bool:
        """Wait until a call may go; True when the caller is the probe and must report back."""
        while True:
            if self._state is BreakerState.CLOSED:
                return False
            wait = self._resume_at - self._clock()
            if self._state is BreakerState.OPEN and wait <= 0:
                self._state = BreakerState.HALF_OPEN
                return True
            self._changed.clear()
            timeout = wait if self._state is BreakerState.OPEN else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def succeeded(self) -> None:
        self._failures = 0
        self._opened = 0
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            self._changed.set()
            self._on_change(self._state)

    def failed(self, retry_after_s: float | None, *, probe: bool) -> None:
        """A retryable failure; `retry_after_s` is the server's requested pause, already capped."""
        self._failures += 1
        if self._state is not BreakerState.CLOSED and not probe:
            # A call already in flight when the breaker opened: the same outage, not a new one, so it
            # must not lengthen the pause, except that a server's own Retry-After is always honoured.
            if retry_after_s is not None:
                self._resume_at = max(self._resume_at, self._clock() + retry_after_s)
            return
        if retry_after_s is None and not probe and self._failures < self._threshold:
            return
        pause = backoff_s(self._opened, self._initial, self._max, self._rng) if retry_after_s is None else retry_after_s
        self._opened += 1
        self._resume_at = self._clock() + pause
        was = self._state
        self._state = BreakerState.OPEN
        self._changed.set()
        if was is BreakerState.CLOSED:
            self._on_change(self._state)

    def released(self) -> None:
        """The probe ended without a verdict (cancelled, or the record was not the API's to judge)."""
        if self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.OPEN
            self._resume_at = self._clock()
            self._changed.set()
