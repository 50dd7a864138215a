"""Per-attempt timeouts from the latency actually seen: a hung call is cut in seconds, not after 30 s.

A fixed read timeout must allow for the slowest legitimate answer, so a call that hangs holds its
slot, its record and (for a batch) hundreds of rows for that long. Here each endpoint keeps the
round trips of its recent successes, and an attempt may take `factor` times their 99th percentile,
never less than `floor_s` and never more than the configured read timeout. Until enough successes
were seen, `cold_s` applies. A request whose attempt was cut is retried with a longer timeout, up to
the read timeout, so an API slower than any timeout so far is still waited for: twice as long after each
cut, except the first cut while the endpoint answered other calls (this call hung; see `Delivery` in
service/http/delivery.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TimeoutSettings:
    ceiling_s: float
    """The configured read timeout: no attempt is allowed longer."""
    floor_s: float = 2.0
    cold_s: float = 5.0
    """Before `min_samples` successes: a hang at start-up costs seconds, a slower API a retry or two."""
    factor: float = 4.0
    samples: int = 256
    min_samples: int = 32
    refresh_every: int = 32
    """Recompute the percentile after this many new samples (sorting on every call would cost more than the call)."""


class AttemptTimeout:
    """The timeout for the next attempt to one endpoint."""

    def __init__(self, settings: TimeoutSettings) -> None:
        self._s = settings
        self._ring: list[float] = []
        self._next = 0
        self._fresh = 0
        self._current = min(settings.ceiling_s, max(settings.floor_s, settings.cold_s))
        self._answered = 0

    @property
    def seconds(self) -> float:
        return self._current

    @property
    def ceiling_s(self) -> float:
        return self._s.ceiling_s

    @property
    def answered(self) -> int:
        """Answers of any status seen so far: a call compares it before and after its attempt."""
        return self._answered

    def answer(self) -> None:
        """An attempt got an answer, whatever its status: the endpoint answers within its timeouts."""
        self._answered += 1

    def observe(self, rtt_s: float) -> None:
        """A successful attempt's round trip."""
        s = self._s
        if len(self._ring) < s.samples:
            self._ring.append(rtt_s)
        else:
            self._ring[self._next] = rtt_s
            self._next = (self._next + 1) % s.samples
        self._fresh += 1
        if self._fresh >= s.refresh_every and len(self._ring) >= s.min_samples:
            self._fresh = 0
            ordered = sorted(self._ring)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            self._current = min(s.ceiling_s, max(s.floor_s, s.factor * p99))


def escalated(seconds: float, ceiling_s: float, doublings: int) -> float:
    """`seconds` doubled `doublings` times, never above `ceiling_s`: a record whose calls keep being cut for hours
    counts past 1,024 doublings, where 2.0 ** n overflows a float."""
    return min(ceiling_s, seconds * 2.0 ** min(doublings, 64))
