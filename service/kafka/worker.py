"""One partition's records: prepared in offset order, same key in order, bounded concurrency (`PartitionWorker`).

The consumer loop (service/kafka/consumer.py) owns one per assigned partition, pushes fetched records to it, reads
its backlog for back pressure and its offset tracker for commits, and stops it on revoke or stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Protocol

from aiokafka import TopicPartition

from service.core.records import Prepare, SourceRecord, Work
from service.kafka.offsets import OffsetTracker
from service.kafka.slots import Slots

log = logging.getLogger("service.consumer")  # the loop's logger name, which log queries filter on


class FailureSink(Protocol):
    """Where a partition worker reports work that failed to reach a durable outcome (the `ConsumerLoop`)."""

    def fail(self, exc: BaseException) -> None:
        """Stop the member: `exc` (a `FatalError`, or a bug) means a record cannot be delivered nor dead-lettered."""


class PartitionWorker:
    """Runs one partition's records: prepared in order, same key in order, bounded concurrency.

    A record holds an in-flight slot of its partition and one of the member's only while it runs:
    a record waiting behind an earlier one of its key holds none, and neither does one that parked
    itself (`park`, a "not yet" answer it waits out), so other keys use those slots meanwhile. All
    of them still count in `backlog`, which keeps the partition out of polls when full, so memory stays
    bounded however many records wait.
    """

    def __init__(
        self,
        tp: TopicPartition,
        prepare: Prepare,
        max_in_flight: int,
        shared: Slots,
        failures: FailureSink,
        room: asyncio.Event | None = None,
        backlog_limit: int = 0,
    ) -> None:
        self.tp = tp
        self.tracker = OffsetTracker()
        self._prepare = prepare
        self._failures = failures
        self._queue: deque[SourceRecord] = deque()
        self._arrived = asyncio.Event()
        self._slots = Slots(max_in_flight)
        # Shared by every partition of this member: the total bound. Slots are always taken in the
        # order partition, then member, and a record holding none never waits for one holding both.
        self._shared = shared
        # key -> records of that key waiting behind the one running (or about to); present while busy.
        self._keys: dict[Hashable, deque[tuple[Work, int]]] = {}
        self._ready: deque[tuple[Work, int]] = deque()
        """Records whose key turn came: started before new records, as soon as slots allow."""
        self._parked: set[int] = set()
        self._running: set[asyncio.Future[None]] = set()
        self._draining = False
        self._holding = False
        """The feeder holds a record, prepared or whose key turn came, while it waits for slots to start it."""
        # Set when a record's end brings the backlog below `backlog_limit`: a full partition, left out of the
        # loop's polls, can take records again. Only on that crossing, so the loop is not woken per record.
        self._room = room if room is not None else asyncio.Event()
        self._room_at = backlog_limit - 1
        self._feeder = asyncio.create_task(self._feed(), name=f"feed-{tp.topic}-{tp.partition}")

    @property
    def backlog(self) -> int:
        """Records taken from Kafka and not yet done (queued, waiting, parked or in flight)."""
        return self.tracker.open

    @property
    def uncommitted(self) -> int:
        """Records from the first one not done on, done or not: what a crash would read again."""
        return self.tracker.pending

    @property
    def parked(self) -> int:
        return len(self._parked)

    def push(self, records: Sequence[SourceRecord]) -> None:
        for record in records:
            self.tracker.add(record.offset)
            self._queue.append(record)
        self._arrived.set()

    async def _feed(self) -> None:
        try:
            while True:
                if self._ready:
                    work, offset = self._ready.popleft()
                elif self._queue and not self._draining:
                    record = self._queue.popleft()
                    work, offset = await self._prepare(record), record.offset
                    key = work.key
                    if key is not None:
                        waiting = self._keys.get(key)
                        if waiting is not None:
                            waiting.append((work, offset))
                            continue
                        self._keys[key] = deque()
                else:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                self._holding = True  # off every queue, not yet running: a drain waits for it (`_settled`)
                try:
                    await self._take()
                finally:
                    self._holding = False
                self._launch(work, offset)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001  # prepare promises not to raise; if it does, stop
            self._failures.fail(exc)

    async def _take(self) -> None:
        if not self._slots.try_take():
            await self._slots.take()
        if not self._shared.try_take():
            try:
                await self._shared.take()
            except BaseException:
                self._slots.release()
                raise

    def _give(self) -> None:
        self._slots.release()
        self._shared.release()

    def park(self, offset: int) -> None:
        if offset not in self._parked:
            self._parked.add(offset)
            self._give()

    async def resume(self, offset: int) -> None:
        if offset in self._parked:
            await self._take()
            self._parked.discard(offset)

    def _launch(self, work: Work, offset: int) -> None:
        try:
            outcome = work.start(self)
        except BaseException:  # a bug in `start`: the loop stops (see _feed), but not with our slots held
            self._give()
            raise
        self._running.add(outcome)
        outcome.add_done_callback(partial(self._finished, work.key, offset))

    def _finished(self, key: Hashable | None, offset: int, outcome: asyncio.Future[None]) -> None:
        if offset in self._parked:
            self._parked.discard(offset)  # cancelled while parked: it holds no slots
        else:
            self._give()
        self._running.discard(outcome)
        if key is not None:
            waiting = self._keys.get(key)
            if waiting:
                self._ready.append(waiting.popleft())
                self._arrived.set()
            else:
                self._keys.pop(key, None)
        if outcome.cancelled():
            return  # stopped or revoked before it finished: it stays pending and is read again
        exc = outcome.exception()
        if exc is None:
            self.tracker.done(offset)
            if self.tracker.open == self._room_at:
                self._room.set()
        else:  # a FatalError: the loop stops, nothing is committed past it
            self._failures.fail(exc)

    async def stop(self, timeout_s: float) -> None:
        """Take no new records, give started work `timeout_s` to finish, cancel the rest.

        Records waiting behind an earlier one of their key started in offset order among the records
        that ran, so they run too: left out, each would be a hole in the done prefix, and everything
        done after it would be delivered again by the partition's next owner.
        """
        self._draining = True
        self._queue.clear()  # not started, and after every started record: the next owner reads them
        self._arrived.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled(), timeout_s)
        self._feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._feeder
        self._ready.clear()
        self._keys.clear()
        unfinished = set(self._running)
        if unfinished:
            for task in unfinished:
                task.cancel()
            log.warning(
                "cancelled unfinished records; they will be read again",
                extra={"topic": self.tp.topic, "partition": self.tp.partition, "count": len(unfinished)},
            )
            await asyncio.wait(unfinished)

    async def _settled(self) -> None:
        """Until nothing runs and no record of a busy key waits for its turn."""
        while self._running or self._ready or self._holding or any(self._keys.values()):
            if self._running:
                await asyncio.wait(set(self._running), return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(0.01)  # the feeder is taking slots for a record whose turn came
