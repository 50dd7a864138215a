"""A bound on work in flight, for the per-record and per-call paths (the consumer's and delivery's)."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """A bound on work in flight: `asyncio.Semaphore`'s job, at a fraction of its cost per record.

    Taking a free slot is an integer test rather than an awaited coroutine, and a released slot goes
    straight to the longest waiter, so waiters are served in order and none is skipped.
    """

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        return self._free

    def try_take(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter; the free count stays
                return
        self._free += 1
