"""Adaptive concurrency per destination: how many calls may be in flight, learned from the answers.

The limit moves once per window (about one mean round trip, at least `min_window_s`), in the
manner of Vector's adaptive request concurrency and Netflix's AIMD limit:

- it grows when the window reached the limit and neither back pressure nor latency growth was
  seen: doubling until the first sign of trouble (slow start, so a 200 ms API is filled within a
  second or two), then by about the square root of the limit per window (Envoy's headroom), which
  refills a large limit in seconds rather than minutes;
- it is cut by `decrease` when back pressure (503, an attempt timeout) made up at least
  `backpressure_share` of the window's answers (a few hung calls among thousands are not an
  overload, and cutting on each of them would starve a healthy API), or when the window's mean
  latency exceeded the running mean by `latency_tolerance`;
- it is halved (`throttled_decrease`) when 429s came back from a good part of what was in flight
  (half the limit, or a quarter of the window's answers): under a token bucket every call in flight
  when the bucket runs dry comes back 429, so the limit is what sets the share of 429s, while a
  stray 429 now and then says nothing about how many calls are too many;
- it never leaves [floor, ceiling]; the ceiling is `BRIDGE_DELIVERY__MAX_CONNECTIONS`.

A server's Retry-After is a pause of the whole destination (`pause_until`): under a token bucket a
429 describes the destination, not the call, so other callers must not spend their turn on a
certain 429. The pause only delays new calls; the limit keeps adapting after it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimitSettings:
    initial: int = 32
    ceiling: int = 1024
    floor: int = 4
    """The lowest limit back pressure leads to: a few calls in flight overload nothing, and under random
    faults a limit of one turns every hung call into a stall of the whole destination."""
    decrease: float = 0.9
    throttled_decrease: float = 0.5
    backpressure_share: float = 0.25
    latency_tolerance: float = 1.0
    """Cut when the window's mean latency exceeds (1 + this) x the running mean."""
    ewma_alpha: float = 0.4
    min_window_s: float = 0.1


class ConcurrencyLimit:
    """A limit on calls in flight to one destination that adapts to the answers (see the module doc)."""

    def __init__(
        self,
        settings: LimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] = lambda limit: None,
    ) -> None:
        self._s = settings
        self._clock = clock
        self._on_change = on_change
        self._limit = min(settings.ceiling, max(settings.initial, settings.floor))
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._slow_start = True
        self._mean_rtt: float | None = None
        self._resume_at = 0.0
        self._window_end = clock() + settings.min_window_s
        self._reached = False
        self._answers = 0
        self._backpressure = 0
        self._throttled = 0
        self._rtt_sum = 0.0
        self._rtt_count = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def mean_rtt_s(self) -> float | None:
        return self._mean_rtt

    def try_acquire(self) -> bool:
        """Take a slot if one is free and no pause is in force: the cheap path of `acquire`."""
        if self._in_flight < self._limit and not self._waiters and self._clock() >= self._resume_at:
            self._in_flight += 1
            if self._in_flight >= self._limit:
                self._reached = True
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot (in arrival order) and for any Retry-After pause to end."""
        while True:
            wait = self._resume_at - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.try_acquire():
                return
            self._reached = True
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._in_flight -= 1  # handed a slot just as we were cancelled: pass it on
                    self._wake()
                raise
            if self._clock() >= self._resume_at:
                return
            # A pause began while we queued: give the slot back and wait it out.
            self._in_flight -= 1
            self._wake()

    def release(self, rtt_s: float | None, *, backpressure: bool = False, throttled: bool = False) -> None:
        """A call ended: `rtt_s` for an answer worth timing (None for none), `backpressure` for 503/timeouts,
        `throttled` for a 429."""
        now = self._clock()
        if now >= self._window_end:
            self._adjust(now)  # the window is over: this answer belongs to the next one
        self._in_flight -= 1
        self._answers += 1
        if throttled:
            self._throttled += 1
        elif backpressure:
            self._backpressure += 1
        elif rtt_s is not None:
            self._rtt_sum += rtt_s
            self._rtt_count += 1
        self._wake()

    def cancelled(self) -> None:
        """A call ended without an answer worth learning from (the caller was cancelled)."""
        self._in_flight -= 1
        self._wake()

    def pause_until(self, moment: float) -> None:
        """Hold new calls until `moment` (a server's Retry-After); a later pause never shortens an earlier one."""
        self._resume_at = max(self._resume_at, moment)

    @property
    def paused(self) -> bool:
        return self._clock() < self._resume_at

    def _adjust(self, now: float) -> None:
        s = self._s
        mean = self._rtt_sum / self._rtt_count if self._rtt_count else None
        limit = self._limit
        pressed = self._answers > 0 and self._backpressure >= max(1.0, s.backpressure_share * self._answers)
        slower = mean is not None and self._mean_rtt is not None and mean > self._mean_rtt * (1 + s.latency_tolerance)
        if self._throttled and self._throttled >= min(limit / 2, s.backpressure_share * self._answers):
            limit = max(s.floor, math.floor(limit * s.throttled_decrease))
            self._slow_start = False
        elif pressed or slower:
            limit = max(s.floor, math.floor(limit * s.decrease))
            self._slow_start = False
        elif self._reached:
            limit = min(s.ceiling, limit * 2 if self._slow_start else limit + max(1, math.isqrt(limit)))
        if mean is not None:
            self._mean_rtt = mean if self._mean_rtt is None else self._mean_rtt + s.ewma_alpha * (mean - self._mean_rtt)
        self._window_end = now + max(s.min_window_s, self._mean_rtt or 0.0)
        self._reached = self._in_flight >= limit
        self._answers = self._backpressure = self._rtt_count = 0
        self._throttled = 0
        self._rtt_sum = 0.0
        if limit != self._limit:
            self._limit = limit
            self._on_change(limit)

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1  # the slot passes to the waiter
                waiter.set_result(None)
