"""The Kafka loop: fetch, hand records to per-partition workers, commit the done prefix, stop cleanly.

It knows nothing of Avro or HTTP: a record becomes `Work` through the injected `prepare`, and the
future `Work.start` returns completes when the record is durable. Per partition, records are prepared in offset order
and same-key work runs in that order, while different keys overlap up to a bound. Commits are
`offset+1` of the contiguous done prefix, on a timer, on revoke and at stop, and only for partitions
this member still owns. A partition whose backlog is full is left out of the next polls, and one whose
uncommitted span is full is paused, so a stalled API never makes the process buffer the topic; the loop
keeps polling, so the member stays in its group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from service.core.errors import FatalError
from service.core.records import Prepare
from service.kafka.clients import to_source_record
from service.kafka.slots import Slots
from service.kafka.worker import PartitionWorker
from service.ops.health import HealthState
from service.ops.instrumentation import Instrumentation

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.consumer")


@dataclass(frozen=True, slots=True)
class LoopSettings:
    max_in_flight_per_partition: int
    max_in_flight_total: int
    max_buffered_per_partition: int
    commit_interval_s: float
    drain_timeout_s: float
    max_poll_records: int
    max_uncommitted_per_partition: int = 50_000
    poll_timeout_ms: int = 200
    commit_after_records: int = 1000
    """Commit before the timer once a partition's done prefix moved this far: a kill repeats less."""
    revoke_drain_timeout_s: float | None = None
    """The drain of a revoke, kept within the group's rebalance (service/kafka/clients.py `revoke_drain_s`);
    None: `drain_timeout_s`, as a stop."""
    commit_timeout_s: float = 5.0
    """A commit not answered within this is given up (a warning; the next tick tries again). aiokafka retries a
    commit for as long as the group's coordinator is unknown, so with the broker gone the loop stopped turning and
    a stop never ended; a stop makes two commits (before and after its drain) within the chart's
    terminationGraceExtraSeconds (15 s)."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, loop: ConsumerLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._loop.release(revoked, revoke=True)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self._loop.assigned(assigned)
        if self._loop.health.stopping:
            return  # about to leave the group; these partitions will be reassigned without us
        self._loop.health.mark_joined()
        log.info("partitions assigned", extra={"partitions": sorted(f"{tp.topic}-{tp.partition}" for tp in assigned)})


class ConsumerLoop:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        prepare: Prepare,
        settings: LoopSettings,
        instrumentation: Instrumentation,
        health: HealthState,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._clock = clock  # the commit timer's and the commit duration's; tests pass a manual one
        self._instrumentation = instrumentation
        self.health = health
        self._prepare = prepare
        self._settings = settings
        self._workers: dict[TopicPartition, PartitionWorker] = {}
        self._paused: set[TopicPartition] = set()
        self._committed: dict[TopicPartition, int] = {}  # owned partitions only: skips unchanged commits
        self._history: dict[TopicPartition, int] = {}
        self._fatal: BaseException | None = None
        self._shared_slots = Slots(settings.max_in_flight_total)
        self.room = asyncio.Event()
        """Set when a partition left out of polls for a full backlog has room again."""
        self._releasing: set[TopicPartition] = set()
        # Partitions a release is draining, with what is set when it committed (see `release`).
        self._draining: dict[TopicPartition, asyncio.Event] = {}
        """Partitions given up (a revoke, a stop) and not assigned again: records a poll returns for them were
        fetched before, and belong to whoever is assigned the partition next (reading from its last commit)."""

    def subscribe(self, topics: Sequence[str]) -> None:
        self._consumer.subscribe(list(topics), listener=_Rebalance(self))

    def fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            log.error("stopping: a record could not be brought to a durable outcome", exc_info=exc)
            self._fatal = exc
            self.health.mark_fatal(str(exc))

    @property
    def committed(self) -> Mapping[TopicPartition, int]:
        """Every offset this member committed, by partition, including partitions since released."""
        return self._history

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; raises `FatalError` after a clean drain if a record failed fatally."""
        next_commit = self._clock() + self._settings.commit_interval_s
        # Early commits (a done prefix that moved far) wait this long after the last one, so a
        # commit that keeps failing is retried at a steady pace rather than on every poll.
        early_gap = min(0.1, self._settings.commit_interval_s)
        last_commit = self._clock()
        try:
            while not stop.is_set() and self._fatal is None:
                self.health.heartbeat()
                batches = await self._poll()
                for tp, records in batches.items():
                    if records and tp not in self._releasing:
                        self._worker(tp).push([to_source_record(r) for r in records])
                        self._instrumentation.record_consumed(tp.topic, len(records))
                self._apply_backpressure()
                now = self._clock()
                if now >= next_commit or (now >= last_commit + early_gap and self._prefix_moved()):
                    await self._commit(self._workers)
                    self._observe()
                    last_commit = self._clock()
                    next_commit = last_commit + self._settings.commit_interval_s
        finally:
            self.health.mark_stopping()
            # Commit what is done before draining: while this member drains, another one leaving
            # starts a rebalance, this member's generation ends, and a commit after the drain is
            # refused, so everything done since the last tick would be delivered again.
            await self._commit(self._workers)  # failures are logged there and leave the drain to try again
            await self.release(list(self._workers))
            # Leave the group now rather than at teardown: a member that lingers after its last
            # commit can be handed partitions again, and the group would wait for it.
            self._consumer.unsubscribe()
        if self._fatal is not None:
            raise FatalError(f"stopped after a fatal error: {self._fatal}") from self._fatal

    def _worker(self, tp: TopicPartition) -> PartitionWorker:
        worker = self._workers.get(tp)
        if worker is None:
            worker = PartitionWorker(
                tp,
                self._prepare,
                self._settings.max_in_flight_per_partition,
                self._shared_slots,
                self,
                room=self.room,
                backlog_limit=self._settings.max_buffered_per_partition,
            )
            self._workers[tp] = worker
        return worker

    async def _poll(self) -> Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]:
        """Records from the partitions with room in their backlog.

        A full partition is left out rather than paused: aiokafka drops a paused partition's fetched
        records and fetches them again on resume, so pausing on every full backlog made the loop wait
        for the broker instead of working (the inference drain in `make bench` sat at 70% CPU). Left
        out, its records stay in the fetcher's buffer (one `max_partition_fetch_bytes` at most) until
        its backlog shrinks.
        """
        limit = self._settings.max_buffered_per_partition
        self.room.clear()  # before looking: a partition that gets room from now on sets it again
        full = [tp for tp, worker in self._workers.items() if worker.backlog >= limit]
        timeout_ms, most = self._settings.poll_timeout_ms, self._settings.max_poll_records
        batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
        if not full:
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=most)
            return batches
        room = [tp for tp in self._consumer.assignment() if tp not in full]
        if room:
            batches = await self._consumer.getmany(*room, timeout_ms=0, max_records=most)
            if batches:
                return batches
        if self.room.is_set():
            return {}  # a full partition got room meanwhile: look again
        # Nothing to take now: wait until a fetch brings records for a partition with room, or a
        # full partition gets room (its records are already fetched), whichever comes first.
        woken = asyncio.ensure_future(self.room.wait())
        fetch = (
            asyncio.ensure_future(self._consumer.getmany(*room, timeout_ms=timeout_ms, max_records=most))
            if room
            else None
        )
        waits = {woken} if fetch is None else {woken, fetch}
        await asyncio.wait(waits, timeout=timeout_ms / 1000, return_when=asyncio.FIRST_COMPLETED)
        pending = {task for task in waits if not task.done()}
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if fetch is not None and not fetch.cancelled():
            batches = fetch.result()
            return batches
        return {}

    def _prefix_moved(self) -> bool:
        """Whether some partition's done prefix moved `commit_after_records` past its last commit."""
        step = self._settings.commit_after_records
        for tp, worker in self._workers.items():
            done = worker.tracker.committable()
            if done is not None and done - self._committed.get(tp, done - step) >= step:
                return True
        return False

    def _apply_backpressure(self) -> None:
        # Records not done are bounded in `_poll`. Here: records a crash would repeat (a record stuck in
        # retry holds the commit point while later ones finish). That wait is long, so the partition is
        # paused and its fetched records are dropped rather than held.
        span = self._settings.max_uncommitted_per_partition
        for tp, worker in self._workers.items():
            if tp not in self._paused and worker.uncommitted >= span:
                self._consumer.pause(tp)
                self._paused.add(tp)
            elif tp in self._paused and worker.uncommitted <= span // 2:
                self._consumer.resume(tp)
                self._paused.discard(tp)

    def _observe(self) -> None:
        workers = self._workers.values()
        self._instrumentation.record_backlog(sum(w.backlog for w in workers), sum(w.parked for w in workers))
        for tp, worker in self._workers.items():
            highwater = self._consumer.highwater(tp)
            done = worker.tracker.committable()
            if highwater is not None and done is not None:
                self._instrumentation.record_lag(tp.topic, tp.partition, max(0, highwater - done))

    def assigned(self, partitions: Collection[TopicPartition]) -> None:
        """The group gave us `partitions`: from here on polls bring their records from the last commit."""
        self._releasing.difference_update(partitions)

    async def release(self, partitions: Collection[TopicPartition], *, revoke: bool = False) -> None:
        """Drain and commit `partitions` (a revoke, or a stop); afterwards they are no longer ours."""
        # Before the first await: a poll that fetched records of these partitions just before may return them
        # while they drain, and a worker made for them would run them and later commit past the drained ones.
        self._releasing.update(partitions)
        workers = {tp: self._workers.pop(tp) for tp in partitions if tp in self._workers}
        s = self._settings
        timeout_s = s.revoke_drain_timeout_s if revoke and s.revoke_drain_timeout_s is not None else s.drain_timeout_s
        # Partitions another release is draining: a stop's, when another member leaving rebalances the group
        # meanwhile. The revoke waits for that drain's commit (within its own bound): had it returned at once, the
        # group would hand the partitions on mid-drain, the drain's commit would be skipped as no longer ours, and
        # their next owner would deliver again what the drain finished.
        others = {self._draining[tp] for tp in partitions if tp in self._draining}
        if workers:
            committed = asyncio.Event()
            for tp in workers:
                self._draining[tp] = committed
            try:
                await asyncio.gather(*(w.stop(timeout_s) for w in workers.values()))
                await self._commit(workers)
            finally:
                for tp in workers:
                    if self._draining.get(tp) is committed:
                        del self._draining[tp]
                committed.set()
            for tp in workers:
                self._committed.pop(tp, None)
                self._paused.discard(tp)
                # A partition we no longer own must not keep reporting a stale lag.
                self._instrumentation.forget_partition(tp.topic, tp.partition)
        if others:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s + s.commit_timeout_s):
                    await asyncio.gather(*(event.wait() for event in others))

    async def _commit(self, workers: Mapping[TopicPartition, PartitionWorker]) -> None:
        owned = self._consumer.assignment()
        offsets = {}
        for tp, worker in workers.items():
            target = worker.tracker.committable()
            if target is not None and tp in owned and self._committed.get(tp) != target:
                offsets[tp] = target
        if not offsets:
            return
        started = self._clock()
        try:
            async with asyncio.timeout(self._settings.commit_timeout_s):
                await self._consumer.commit(offsets)
            self._instrumentation.record_commit(self._clock() - started)
        except TimeoutError:
            log.warning(
                "commit not answered, will retry on the next tick",
                extra={"timeout_s": self._settings.commit_timeout_s},
            )
            return
        except CommitFailedError as exc:
            # The group rebalanced under us; the new owner re-reads from the last commit.
            log.warning("commit refused by the group, records will be redelivered", extra={"error": str(exc)})
            return
        except KafkaError as exc:
            log.warning("commit failed, will retry on the next tick", extra={"error": str(exc)})
            return
        self._committed.update(offsets)
        self._history.update(offsets)
