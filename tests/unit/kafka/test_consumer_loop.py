"""ConsumerLoop without a broker: commits (the contiguous done prefix, on the timer, early once it moved far, before
the drain at a stop, only for partitions still owned), back pressure (pause and resume on the buffered and the
uncommitted bounds), revokes (drain, commit, cancel, forget) and parked records.

A stand-in consumer with aiokafka's method names hands out records and records the loop's commits, pauses and
resumes; the loop runs on a manual clock, so its commit timer fires only when a test moves the clock. "The loop
did not commit" is asserted only after it polled twice since the state it judged was reached (one whole turn,
commit check included), never after a sleep. The end-to-end behaviour on a real broker is in tests/integration.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError
from aiokafka.structs import ConsumerRecord

from service.core.errors import FatalError
from service.core.records import Lender, SourceRecord, Work
from service.kafka.consumer import ConsumerLoop, LoopSettings
from service.ops.health import HealthState
from service.ops.metrics import Metrics

TP = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeConsumer:
    """Serves queued batches of owned, unpaused partitions from getmany; records every commit, pause and resume,
    and which partitions each poll asked for (`asked`: None for all of them).

    `changed` is set on every call the loop makes, so a test waits for a state with `until` rather than sleeping.
    Revokes and assignments go through the listener the loop subscribed with, as aiokafka calls it: a revoked
    partition is no longer fetched from the start of the revoke, and leaves the assignment once the listener
    returned.
    """

    def __init__(self, *owned: TopicPartition) -> None:
        self.owned: set[TopicPartition] = set(owned or (TP,))
        self.queued: dict[TopicPartition, deque[list[ConsumerRecord[bytes, bytes]]]] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.paused: set[TopicPartition] = set()
        self.highwaters: dict[TopicPartition, int] = {}
        self.refuse_next_commit: Exception | None = None
        self.hang_commits = False
        self.hung_commits = 0
        self.listener: Any = None
        self.unsubscribed = False
        self.polls = 0
        self.asked: list[frozenset[TopicPartition] | None] = []
        self._revoking: set[TopicPartition] = set()
        self._changed = asyncio.Event()

    def feed(self, tp: TopicPartition, start: int, count: int) -> None:
        records = [
            ConsumerRecord(tp.topic, tp.partition, o, 0, 0, None, b"v", None, 0, 1, ())
            for o in range(start, start + count)
        ]
        self.queued.setdefault(tp, deque()).append(records)

    def queued_batches(self, tp: TopicPartition = TP) -> int:
        return len(self.queued.get(tp, ()))

    def _touch(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Until `condition` holds, checked after each call the loop makes (and every few ms)."""

        async def wait() -> None:
            while not condition():
                self._changed.clear()
                # Also looked at again every few ms: a loop whose partitions are all full makes no call while
                # it waits for room, yet its records keep starting and finishing.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.005)

        await asyncio.wait_for(wait(), timeout_s)

    async def turns(self, count: int = 2) -> None:
        """Until the loop polled `count` more times: at least one whole turn saw the present state."""
        target = self.polls + count
        await self.until(lambda: self.polls >= target)

    # --- aiokafka's names ---

    def subscribe(self, topics: Sequence[str], listener: Any) -> None:
        self.listener = listener

    def unsubscribe(self) -> None:
        self.unsubscribed = True
        self._touch()

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int
    ) -> Mapping[TopicPartition, list[Any]]:
        self.polls += 1
        self.asked.append(frozenset(partitions) if partitions else None)
        self._touch()
        batches = {
            tp: queue.popleft()
            for tp, queue in self.queued.items()
            if queue
            and tp in self.owned
            and tp not in self.paused
            and tp not in self._revoking
            and (not partitions or tp in partitions)
        }
        # As aiokafka, an empty poll waits a little (here 1 ms rather than timeout_ms) and a full one does not.
        await asyncio.sleep(0 if batches else 0.001)
        return batches

    def assignment(self) -> Collection[TopicPartition]:
        return set(self.owned)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._touch()
        if self.hang_commits:  # as aiokafka's does while the group's coordinator is unknown (the broker is gone)
            self.hung_commits += 1
            await asyncio.Event().wait()
        if self.refuse_next_commit is not None:
            error, self.refuse_next_commit = self.refuse_next_commit, None
            raise error
        self.commits.append(dict(offsets))

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)
        self._touch()

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)
        self._touch()

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.highwaters.get(tp)

    # --- the group ---

    async def revoke(self, *partitions: TopicPartition) -> None:
        self._revoking.update(partitions)
        await self.listener.on_partitions_revoked(set(partitions))
        self.owned.difference_update(partitions)
        self._revoking.difference_update(partitions)

    async def assign(self, *partitions: TopicPartition) -> None:
        self.owned.update(partitions)
        self.paused.difference_update(partitions)  # aiokafka's new assignment starts unpaused
        await self.listener.on_partitions_assigned(set(partitions))


class Outcomes:
    """Work whose outcome is a future: offsets in `held` wait for the test to settle them, the rest are done at
    once; records in `parking` park their slots until `unpark` is set, as a not-yet answer waits."""

    def __init__(
        self,
        held: Iterable[tuple[TopicPartition, int]] = (),
        parking: Iterable[tuple[TopicPartition, int]] = (),
        key: Callable[[SourceRecord], Hashable | None] = lambda record: None,
    ) -> None:
        self.held = set(held)
        self.parking = set(parking)
        self.key = key
        self.futures: dict[tuple[TopicPartition, int], asyncio.Future[None]] = {}
        self.unpark = asyncio.Event()

    def started(self, tp: TopicPartition = TP) -> int:
        return sum(1 for where, _ in self.futures if where == tp)

    def future(self, tp: TopicPartition, offset: int) -> asyncio.Future[None]:
        return self.futures[(tp, offset)]

    def settle(self, tp: TopicPartition, offsets: Iterable[int]) -> None:
        for offset in offsets:
            self.futures[(tp, offset)].set_result(None)

    async def prepare(self, record: SourceRecord) -> Work:
        where = (TopicPartition(record.topic, record.partition), record.offset)

        def start(lender: Lender) -> asyncio.Future[None]:
            future: asyncio.Future[None]
            if where in self.parking:
                future = asyncio.ensure_future(self._parked(lender, record.offset))
            else:
                future = asyncio.get_running_loop().create_future()
                if where not in self.held:
                    future.set_result(None)
            self.futures[where] = future
            return future

        return Work(key=self.key(record), start=start)

    async def _parked(self, lender: Lender, offset: int) -> None:
        lender.park(offset)
        await self.unpark.wait()
        await lender.resume(offset)


class Recorded(Metrics):
    """The loop's Instrumentation, as Prometheus metrics, also remembering the calls the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.backlogs: list[tuple[int, int]] = []
        self.lags: list[tuple[str, int, int]] = []
        self.forgotten: list[tuple[str, int]] = []

    def record_backlog(self, in_flight: int, parked: int) -> None:
        super().record_backlog(in_flight, parked)
        self.backlogs.append((in_flight, parked))

    def record_lag(self, topic: str, partition: int, records: int) -> None:
        super().record_lag(topic, partition, records)
        self.lags.append((topic, partition, records))

    def forget_partition(self, topic: str, partition: int) -> None:
        super().forget_partition(topic, partition)
        self.forgotten.append((topic, partition))


class Bench:
    """A loop over a fake consumer on a manual clock, running in a task until `stopped`."""

    def __init__(self, consumer: FakeConsumer, outcomes: Outcomes, **settings: Any) -> None:
        values: dict[str, Any] = {
            "max_in_flight_per_partition": 256,
            "max_in_flight_total": 4096,
            "max_buffered_per_partition": 5000,
            "commit_interval_s": 60.0,
            "drain_timeout_s": 0.01,
            "max_poll_records": 500,
            "commit_after_records": 10**9,  # no early commit unless a test asks for one
        }
        self.consumer = consumer
        self.outcomes = outcomes
        self.clock = ManualClock()
        self.instrumentation = Recorded()
        self.health = HealthState(stale_after_s=60, clock=self.clock)
        self.loop = ConsumerLoop(
            consumer,
            outcomes.prepare,
            LoopSettings(**{**values, **settings}),
            self.instrumentation,
            self.health,
            clock=self.clock,
        )
        self.loop.subscribe(["t"])
        self.stop = asyncio.Event()
        self.running = asyncio.create_task(self.loop.run(self.stop))

    async def stopped(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.running, 10)

    async def tick(self, seconds: float) -> None:
        """Move the clock, then let the loop turn on it."""
        self.clock.now += seconds
        await self.consumer.turns()


Benches = Callable[..., Bench]


@pytest.fixture
async def benches() -> AsyncIterator[Benches]:
    made: list[Bench] = []

    def make(consumer: FakeConsumer, outcomes: Outcomes, **settings: Any) -> Bench:
        made.append(Bench(consumer, outcomes, **settings))
        return made[-1]

    yield make
    for bench in made:  # a failed test must not leave its loop running
        bench.running.cancel()
        with contextlib.suppress(BaseException):
            await bench.running


# --- commits ---------------------------------------------------------------------------------------------------------


async def test_only_the_contiguous_done_prefix_is_committed(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, 5)])
    consumer.feed(TP, 0, 10)
    bench = benches(consumer, outcomes, commit_after_records=1)
    await consumer.until(lambda: outcomes.started() == 10)

    await bench.tick(0.2)  # past the early commits' gap: the prefix moved

    assert consumer.commits == [{TP: 5}], "offsets 6-9 are done, but 5 is not: a restart must begin at 5"

    outcomes.settle(TP, [5])
    await bench.tick(0.2)
    assert consumer.commits == [{TP: 5}, {TP: 10}]
    await bench.stopped()
    assert consumer.commits == [{TP: 5}, {TP: 10}], "an unchanged offset is not committed again"
    assert bench.loop.committed == {TP: 10}


async def test_a_prefix_that_moved_commit_after_records_commits_before_the_timer_and_less_waits(
    benches: Benches,
) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, 1200)])
    for start in range(0, 1500, 500):
        consumer.feed(TP, start, 500)
    bench = benches(consumer, outcomes, commit_after_records=1000, commit_interval_s=3600.0)
    await consumer.until(lambda: outcomes.started() == 1500)
    await bench.tick(0.2)
    assert consumer.commits == [{TP: 1200}]

    outcomes.settle(TP, [1200])  # the prefix moves 300 past the last commit
    await bench.tick(0.2)
    assert consumer.commits == [{TP: 1200}], "300 records are not enough for an early commit"

    consumer.feed(TP, 1500, 700)  # and now 1,000
    await consumer.until(lambda: len(consumer.commits) == 2)
    assert consumer.commits[-1] == {TP: 2200}
    await bench.stopped()


async def test_a_partitions_first_done_records_commit_early_and_then_the_timer_commits_whatever_moved(
    benches: Benches,
) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes()
    consumer.feed(TP, 0, 3)
    bench = benches(consumer, outcomes, commit_interval_s=5.0)
    await consumer.until(lambda: outcomes.started() == 3)
    await bench.tick(0.05)
    assert consumer.commits == [], "within the early commits' gap"
    await bench.tick(0.2)
    assert consumer.commits == [{TP: 3}], "nothing committed yet counts as moved far"

    consumer.feed(TP, 3, 2)
    await consumer.until(lambda: outcomes.started() == 5)
    await bench.tick(4.5)
    assert consumer.commits == [{TP: 3}], "two records are not far: they wait for the timer"
    await bench.tick(0.5)
    assert consumer.commits == [{TP: 3}, {TP: 5}]
    await bench.stopped()


async def test_a_stop_commits_what_is_done_before_it_drains_what_is_not(benches: Benches) -> None:
    # While a stopping member drains, another member leaving can end its generation; a commit made only
    # after the drain would then be refused and everything done since the last tick delivered again.
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, 10)])
    consumer.feed(TP, 0, 11)
    bench = benches(consumer, outcomes, drain_timeout_s=10.0)
    await consumer.until(lambda: outcomes.started() == 11)
    await consumer.turns()  # the ten done records' callbacks ran

    bench.stop.set()
    await consumer.until(lambda: bool(consumer.commits))
    assert consumer.commits == [{TP: 10}]
    assert not bench.running.done(), "the first commit came while the last record was still draining"

    outcomes.settle(TP, [10])
    await asyncio.wait_for(bench.running, 10)
    assert consumer.commits == [{TP: 10}, {TP: 11}]
    assert consumer.unsubscribed
    assert bench.health.ready() == (False, "stopping")


async def test_a_record_not_done_within_the_drain_is_cancelled_and_holds_the_commit_point(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, 1)])
    consumer.feed(TP, 0, 3)
    bench = benches(consumer, outcomes, drain_timeout_s=0.01)
    await consumer.until(lambda: outcomes.started() == 3)

    await bench.stopped()

    assert outcomes.future(TP, 1).cancelled()
    assert consumer.commits == [{TP: 1}], "read again from 1 by the next owner"


async def test_commits_only_partitions_still_owned(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(TP, TP1), Outcomes()
    consumer.feed(TP, 0, 2)
    consumer.feed(TP1, 0, 3)
    bench = benches(consumer, outcomes)
    await consumer.until(lambda: outcomes.started(TP) == 2 and outcomes.started(TP1) == 3)

    consumer.owned.discard(TP)  # lost to the group without a revoke (its session expired)
    await bench.tick(60.0)
    await bench.stopped()

    assert consumer.commits == [{TP1: 3}]


@pytest.mark.parametrize(
    "error",
    [CommitFailedError("rebalanced"), KafkaConnectionError("broker gone")],
    ids=["refused-by-the-group", "broker-error"],
)
async def test_a_failed_commit_is_tried_again_on_the_next_tick(benches: Benches, error: Exception) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes()
    consumer.feed(TP, 0, 4)
    consumer.refuse_next_commit = error
    bench = benches(consumer, outcomes, commit_interval_s=1.0)
    await consumer.until(lambda: outcomes.started() == 4)

    await bench.tick(1.0)
    assert consumer.refuse_next_commit is None, "the commit was tried"
    assert consumer.commits == []
    assert bench.loop.committed == {}
    assert not bench.running.done()

    await bench.tick(1.0)
    assert consumer.commits == [{TP: 4}]
    assert bench.loop.committed == {TP: 4}
    await bench.stopped()


async def test_a_commit_that_hangs_is_given_up_and_tried_again_on_the_next_tick(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes()
    consumer.feed(TP, 0, 4)
    consumer.hang_commits = True
    bench = benches(consumer, outcomes, commit_interval_s=1.0, commit_timeout_s=0.05)
    await consumer.until(lambda: outcomes.started() == 4)

    await bench.tick(1.0)
    await consumer.until(lambda: consumer.hung_commits == 1)
    consumer.hang_commits = False
    await bench.tick(1.0)  # the loop turns again: the hung commit was given up

    await consumer.until(lambda: consumer.commits == [{TP: 4}])
    assert bench.loop.committed == {TP: 4}
    await bench.stopped()


async def test_a_stop_ends_while_commits_hang(benches: Benches) -> None:
    """SIGTERM with the broker gone: the drain is bounded, and so are the commits before and after it."""
    consumer, outcomes = FakeConsumer(), Outcomes()
    consumer.feed(TP, 0, 4)
    consumer.hang_commits = True
    bench = benches(consumer, outcomes, commit_timeout_s=0.05)
    await consumer.until(lambda: outcomes.started() == 4)

    await bench.stopped()  # fails (its guard) rather than hangs

    assert consumer.hung_commits == 2  # before the drain and after it
    assert bench.loop.committed == {}


async def test_a_fatal_outcome_stops_the_loop_unhealthy_and_nothing_past_it_is_committed(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, 2)])
    consumer.feed(TP, 0, 5)
    bench = benches(consumer, outcomes)
    await consumer.until(lambda: outcomes.started() == 5)

    outcomes.future(TP, 2).set_exception(FatalError("the dead-letter topic refused the record"))

    with pytest.raises(FatalError, match="the dead-letter topic refused the record"):
        await asyncio.wait_for(bench.running, 10)
    assert consumer.commits == [{TP: 2}]
    assert bench.health.live() == (False, "fatal: the dead-letter topic refused the record")


# --- back pressure ---------------------------------------------------------------------------------------------------


async def test_a_full_backlog_keeps_the_partition_out_of_polls_unpaused_until_a_record_finishes(
    benches: Benches,
) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, o) for o in range(100)])
    consumer.feed(TP, 0, 100)
    consumer.feed(TP, 100, 50)
    # A poll timeout of an hour: only the partition's own signal that it has room can wake the loop.
    bench = benches(consumer, outcomes, max_buffered_per_partition=100, poll_timeout_ms=3_600_000)
    await consumer.until(lambda: outcomes.started() == 100)
    # Not paused: aiokafka would drop a paused partition's fetched records and fetch them again.
    assert not consumer.paused
    assert consumer.queued_batches() == 1

    outcomes.settle(TP, [0])  # 99 not done: room for more
    await consumer.until(lambda: outcomes.started() == 150)
    assert not consumer.paused
    await bench.stopped()
    assert consumer.commits[-1] == {TP: 1}


async def test_done_records_behind_a_stuck_one_count_against_the_uncommitted_bound_not_the_buffered_one(
    benches: Benches,
) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, 0)])  # stuck in retry: it holds the commit point
    bench = benches(consumer, outcomes, max_buffered_per_partition=150, max_uncommitted_per_partition=250)

    # The 200 done records behind the stuck one do not count against the buffered bound (one not done); the
    # 300 uncommitted ones hold the partition at the uncommitted bound (250), so a fourth batch waits.
    for fed in (100, 200):
        consumer.feed(TP, fed - 100, 100)
        await consumer.until(lambda fed=fed: outcomes.started() == fed)  # type: ignore[misc]
        await consumer.turns()  # their done callbacks ran
    assert not consumer.paused
    consumer.feed(TP, 200, 100)
    await consumer.until(lambda: TP in consumer.paused)
    consumer.feed(TP, 300, 100)
    await consumer.turns()
    assert consumer.queued_batches() == 1

    outcomes.settle(TP, [0])
    await consumer.until(lambda: TP not in consumer.paused)
    await consumer.until(lambda: outcomes.started() == 400)
    await bench.stopped()
    assert consumer.commits[-1] == {TP: 400}


async def test_a_full_partition_is_left_out_of_polls_and_does_not_hold_back_the_others(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(TP, TP1), Outcomes(held=[(TP, o) for o in range(15)])
    consumer.feed(TP, 0, 15)
    consumer.feed(TP, 15, 15)
    for start in range(0, 20, 5):
        consumer.feed(TP1, start, 5)
    bench = benches(consumer, outcomes, max_buffered_per_partition=15)

    await consumer.until(lambda: outcomes.started(TP1) == 20)
    assert frozenset({TP1}) in consumer.asked, "the full partition was left out of a poll"
    assert not consumer.paused
    assert consumer.queued_batches(TP) == 1
    await bench.tick(60.0)
    assert consumer.commits == [{TP1: 20}]
    outcomes.settle(TP, range(15))
    await consumer.until(lambda: outcomes.started(TP) == 30)
    await bench.stopped()


# --- revokes ---------------------------------------------------------------------------------------------------------


async def test_a_revoke_commits_the_revoked_partitions_prefix_cancels_the_rest_and_never_commits_it_again(
    benches: Benches,
) -> None:
    consumer, outcomes = FakeConsumer(TP, TP1), Outcomes(held=[(TP, 2)])
    consumer.feed(TP, 0, 4)
    consumer.feed(TP1, 0, 3)
    bench = benches(consumer, outcomes, drain_timeout_s=0.01)
    await consumer.until(lambda: outcomes.started(TP) == 4 and outcomes.started(TP1) == 3)

    await consumer.revoke(TP)

    assert consumer.commits == [{TP: 2}], "only the revoked partition, only its done prefix"
    assert outcomes.future(TP, 2).cancelled(), "its new owner delivers it"
    assert ("t", 0) in bench.instrumentation.forgotten, "no stale lag for a partition owned elsewhere"

    consumer.feed(TP1, 3, 2)
    await consumer.until(lambda: outcomes.started(TP1) == 5)
    await bench.tick(60.0)
    await bench.stopped()
    assert consumer.commits == [{TP: 2}, {TP1: 5}]
    assert bench.loop.committed == {TP: 2, TP1: 5}


async def test_a_revoke_during_a_stops_drain_waits_for_it_so_its_commit_is_made_while_the_partition_is_ours(
    benches: Benches,
) -> None:
    """Another member leaving rebalances the group while this one drains for its own stop: the revoke found the
    stop's workers gone and returned at once, the partition moved on, and the drain's commit was skipped as no
    longer ours, so its next owner delivered again what the drain had finished (make chaos rebalance, once)."""
    consumer, outcomes = FakeConsumer(TP), Outcomes(held=[(TP, 1)])
    consumer.feed(TP, 0, 3)
    bench = benches(consumer, outcomes, drain_timeout_s=10.0, revoke_drain_timeout_s=10.0)
    await consumer.until(lambda: outcomes.started(TP) == 3)
    await bench.tick(60.0)  # the done prefix before the stop: offset 0
    await consumer.until(lambda: consumer.commits == [{TP: 1}])

    bench.stop.set()  # SIGTERM: the stop drains the partition (offset 1 is still in flight)
    await consumer.until(lambda: bench.health.stopping)  # its poll ended: the stop's drain has begun
    await _loop_turns(10)
    revoking = asyncio.create_task(consumer.revoke(TP))  # meanwhile the group rebalances
    await _loop_turns(10)  # a revoke that does not wait has returned by now
    assert not revoking.done(), "the revoke waits for the stop's drain of its partition"
    outcomes.settle(TP, [1])

    await asyncio.wait_for(revoking, 10)
    assert consumer.commits == [{TP: 1}, {TP: 3}], "the drain's commit, made before the partition moved on"
    await asyncio.wait_for(bench.running, 10)


async def _loop_turns(count: int) -> None:
    """`count` turns of the event loop: what is ready to run has run (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_records_of_a_revoked_partition_that_had_not_started_never_start(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(TP), Outcomes(held=[(TP, 0)])
    consumer.feed(TP, 0, 3)
    bench = benches(consumer, outcomes, max_in_flight_per_partition=1, drain_timeout_s=10.0)  # 1, 2 wait for a slot
    await consumer.until(lambda: outcomes.started(TP) == 1)

    revoking = asyncio.create_task(consumer.revoke(TP))
    await consumer.turns()
    outcomes.settle(TP, [0])  # during the drain: its slot is free, but 2 (still queued) belongs to the next owner
    await asyncio.wait_for(revoking, 10)

    # The revoke returned after stopping the partition's worker: nothing of it is left to start 2. (1, which the
    # worker had already prepared and was waiting for 0's slot, may take it within the drain.)
    assert (TP, 2) not in outcomes.futures
    assert consumer.commits == [{TP: outcomes.started(TP)}], "what ran is committed, nothing more"
    await bench.stopped()
    assert (TP, 2) not in outcomes.futures
    assert len(consumer.commits) == 1


async def test_a_record_finishing_within_the_revoke_drain_is_committed(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(TP, TP1), Outcomes(held=[(TP, 2)])
    consumer.feed(TP, 0, 4)
    bench = benches(consumer, outcomes, drain_timeout_s=10.0)
    await consumer.until(lambda: outcomes.started(TP) == 4)

    revoking = asyncio.create_task(consumer.revoke(TP))
    await consumer.turns()
    assert not revoking.done(), "the revoke waits for the record in flight"
    outcomes.settle(TP, [2])
    await asyncio.wait_for(revoking, 10)

    assert consumer.commits == [{TP: 4}]
    await bench.stopped()
    assert consumer.commits == [{TP: 4}]


async def test_a_revoke_drains_for_its_own_timeout_not_the_stops(benches: Benches) -> None:
    # A revoke must end within the group's rebalance (service/kafka/clients.py revoke_drain_s), however long a stop
    # may drain: with the stop's hour it would never return here, as its record never settles.
    consumer, outcomes = FakeConsumer(TP, TP1), Outcomes(held=[(TP, 1)])
    consumer.feed(TP, 0, 3)
    bench = benches(consumer, outcomes, drain_timeout_s=3600.0, revoke_drain_timeout_s=0.01)
    await consumer.until(lambda: outcomes.started(TP) == 3)

    await asyncio.wait_for(consumer.revoke(TP), 60)

    assert outcomes.future(TP, 1).cancelled(), "cancelled at the revoke's drain; its next owner delivers it"
    assert consumer.commits == [{TP: 1}]
    await bench.stopped()


async def test_a_stop_drains_for_the_drain_timeout_not_the_revokes(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(TP), Outcomes(held=[(TP, 1)])
    consumer.feed(TP, 0, 3)
    bench = benches(consumer, outcomes, drain_timeout_s=0.01, revoke_drain_timeout_s=3600.0)
    await consumer.until(lambda: outcomes.started(TP) == 3)

    await bench.stopped()  # with the revoke's hour it would not return: 1 never settles

    assert outcomes.future(TP, 1).cancelled()
    assert consumer.commits == [{TP: 1}]


async def test_a_partition_assigned_again_after_a_revoke_is_consumed_and_committed_again(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(TP), Outcomes()
    consumer.feed(TP, 0, 4)
    bench = benches(consumer, outcomes)
    await consumer.until(lambda: outcomes.started(TP) == 4)
    await consumer.turns()
    await consumer.revoke(TP)
    assert consumer.commits == [{TP: 4}]

    # Another member delivered 4-5 meanwhile but did not commit them: we are handed the partition from 4 again.
    await consumer.assign(TP)
    consumer.feed(TP, 4, 2)
    await consumer.until(lambda: outcomes.started(TP) == 6)
    await bench.tick(60.0)
    await bench.stopped()
    assert consumer.commits == [{TP: 4}, {TP: 6}]


class RevokedAsItsFetchReturns(FakeConsumer):
    """A fetch, made while another partition is full, returns records of `tp` just as `tp` is revoked (aiokafka
    holds polls back during a rebalance, but not records it already fetched)."""

    def __init__(self, *owned: TopicPartition) -> None:
        super().__init__(*owned)
        self.revoke_on_fetch: TopicPartition | None = None
        self.revoking: asyncio.Task[None] | None = None

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int
    ) -> Mapping[TopicPartition, list[Any]]:
        tp = self.revoke_on_fetch
        if tp is not None and partitions and timeout_ms > 0 and self.queued.get(tp):
            self.revoke_on_fetch = None
            batches = {tp: self.queued[tp].popleft()}
            self.revoking = asyncio.ensure_future(self.revoke(tp))
            await asyncio.sleep(0)  # the revoke starts before the poll returns
            return batches
        return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)


async def test_records_fetched_as_their_partition_is_revoked_are_left_to_its_next_owner(benches: Benches) -> None:
    consumer = RevokedAsItsFetchReturns(TP, TP1)
    outcomes = Outcomes(held=[(TP, 0), (TP, 1), (TP1, 0)])
    consumer.feed(TP, 0, 2)
    consumer.feed(TP1, 0, 3)
    bench = benches(consumer, outcomes, max_buffered_per_partition=2)  # TP full: its next polls wait for a fetch
    await consumer.until(lambda: outcomes.started(TP) == 2 and outcomes.started(TP1) == 3)

    consumer.revoke_on_fetch = TP1
    consumer.feed(TP1, 3, 3)
    await consumer.until(lambda: consumer.revoking is not None and consumer.revoking.done())
    outcomes.settle(TP, [0, 1])  # TP has room again, so the loop polls again: a whole turn after the revoke
    await consumer.turns()
    assert outcomes.started(TP1) == 3, "3-5 came from the revoked assignment: not run here"

    # Handed the partition again, it is read from its last commit: 0 (still not done) comes first.
    await consumer.assign(TP1)
    consumer.feed(TP1, 0, 6)
    await consumer.until(lambda: outcomes.started(TP1) == 6)
    await bench.tick(60.0)
    assert not [c for c in consumer.commits if c.get(TP1, 0) > 0], "nothing of TP1 is done past 0, which is not"
    await bench.stopped()


async def test_a_partition_revoked_while_full_is_held_at_its_bound_again_after_it_comes_back(
    benches: Benches,
) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, o) for o in range(20)])
    consumer.feed(TP, 0, 10)
    bench = benches(consumer, outcomes, max_buffered_per_partition=10)
    await consumer.until(lambda: outcomes.started() == 10)
    await consumer.revoke(TP)

    await consumer.assign(TP)
    consumer.feed(TP, 0, 10)
    consumer.feed(TP, 10, 10)

    await consumer.until(lambda: outcomes.future(TP, 9) is not None and not outcomes.future(TP, 9).cancelled())
    assert consumer.queued_batches() == 1, "full again at its bound: the second batch stays fetched"
    outcomes.settle(TP, [0])
    await consumer.until(lambda: outcomes.started() == 20)
    await bench.stopped()


async def test_an_assignment_marks_the_member_ready(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes()
    bench = benches(consumer, outcomes)
    await consumer.turns()
    assert bench.health.ready() == (False, "not yet joined the consumer group")

    await consumer.assign(TP)

    assert bench.health.ready() == (True, "ok")
    await bench.stopped()


async def test_an_assignment_while_stopping_does_not_mark_the_member_joined(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes()
    bench = benches(consumer, outcomes)
    await bench.stopped()

    await consumer.assign(TP)  # the group handed out partitions before it saw us leave

    assert not bench.health.joined


# --- parked records and what the loop reports ------------------------------------------------------------------------


async def test_a_parked_record_frees_its_slots_for_the_others_and_holds_the_commit_point(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(parking=[(TP, 0)])
    consumer.feed(TP, 0, 5)
    # One slot for the whole member: without parking, record 0 would keep it and nothing else could start.
    bench = benches(consumer, outcomes, max_in_flight_per_partition=1, max_in_flight_total=1)

    await consumer.until(lambda: outcomes.started() == 5)
    await consumer.turns()
    await bench.tick(60.0)
    assert consumer.commits == [], "the parked record 0 holds the commit point"
    assert bench.instrumentation.backlogs[-1] == (1, 1), "one record not done, and it is parked"

    outcomes.unpark.set()
    await consumer.until(lambda: outcomes.future(TP, 0).done())
    await bench.tick(60.0)
    assert consumer.commits == [{TP: 5}]
    assert bench.instrumentation.backlogs[-1] == (0, 0)
    await bench.stopped()


async def test_lag_is_reported_from_the_highwater_and_the_done_prefix(benches: Benches) -> None:
    consumer, outcomes = FakeConsumer(), Outcomes(held=[(TP, 4)])
    consumer.feed(TP, 0, 6)
    consumer.highwaters[TP] = 10
    bench = benches(consumer, outcomes)
    await consumer.until(lambda: outcomes.started() == 6)
    await consumer.turns()

    await bench.tick(60.0)

    assert bench.instrumentation.lags == [("t", 0, 6)]
    assert bench.instrumentation.registry.get_sample_value("bridge_records_consumed_total", {"topic": "t"}) == 6.0
    await bench.stopped()
