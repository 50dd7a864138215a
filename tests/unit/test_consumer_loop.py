"""ConsumerLoop without a broker: a stand-in consumer with aiokafka's method names hands out records and records
the loop's commits, pauses and resumes. The end-to-end behaviour on a real broker is in tests/integration."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from service.core.records import Lender, Prepare, SourceRecord, Work
from service.kafka.consumer import ConsumerLoop, LoopSettings
from service.ops.health import HealthState
from service.ops.metrics import Metrics

TP = TopicPartition("t", 0)


class FakeConsumer:
    """Serves queued batches from getmany; every commit, pause and resume is recorded."""

    def __init__(self) -> None:
        self.batches: list[list[ConsumerRecord[bytes, bytes]]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.committed = asyncio.Event()
        self.paused: set[TopicPartition] = set()

    def subscribe(self, topics: Sequence[str], listener: Any) -> None:
        pass

    def unsubscribe(self) -> None:
        pass

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, list[Any]]:
        await asyncio.sleep(0.001)
        if self.batches and TP not in self.paused:  # as aiokafka: a paused partition is not fetched
            return {TP: self.batches.pop(0)}
        return {}

    def assignment(self) -> Collection[TopicPartition]:
        return {TP}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))
        self.committed.set()

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)

    def highwater(self, tp: TopicPartition) -> int | None:
        return None


def records(start: int, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord("t", 0, o, 0, 0, None, b"v", None, 0, 1, ()) for o in range(start, start + count)]


async def done_at_once(record: SourceRecord) -> Work:
    def start(lender: Lender) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    return Work(key=None, start=start)


def loop_over(consumer: FakeConsumer, prepare: Prepare = done_at_once, **settings: Any) -> ConsumerLoop:
    values: dict[str, Any] = {
        "max_in_flight_per_partition": 256,
        "max_in_flight_total": 4096,
        "max_buffered_per_partition": 5000,
        "commit_interval_s": 3600.0,  # the timer never fires here: only the moved prefix can commit
        "drain_timeout_s": 1.0,
        "max_poll_records": 500,
        "commit_after_records": 1000,
    }
    return ConsumerLoop(
        consumer,
        prepare,
        LoopSettings(**{**values, **settings}),
        Metrics(),
        HealthState(stale_after_s=60),
    )


async def test_a_done_prefix_that_moved_far_is_committed_before_the_timer() -> None:
    consumer = FakeConsumer()
    consumer.batches = [records(0, 500), records(500, 500), records(1000, 500)]
    loop = loop_over(consumer)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))

    await asyncio.wait_for(consumer.committed.wait(), 10)

    assert consumer.commits[0][TP] >= 1000
    stop.set()
    await asyncio.wait_for(running, 10)
    assert consumer.commits[-1] == {TP: 1500}, "the stop commits the rest"


async def test_a_full_backlog_pauses_the_partition_and_half_of_it_resumes_it() -> None:
    consumer = FakeConsumer()
    consumer.batches = [records(0, 100)]
    outcomes: dict[int, asyncio.Future[None]] = {}
    started = asyncio.Event()

    async def held(record: SourceRecord) -> Work:
        def start(lender: Lender) -> asyncio.Future[None]:
            outcomes[record.offset] = asyncio.get_running_loop().create_future()
            started.set()
            return outcomes[record.offset]

        return Work(key=None, start=start)

    loop = loop_over(consumer, held, max_buffered_per_partition=100, commit_interval_s=3600.0, drain_timeout_s=0.01)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    while TP not in consumer.paused:  # noqa: ASYNC110  # the fake has no event for "paused"
        await asyncio.sleep(0.001)

    for offset in range(50):
        outcomes[offset].set_result(None)
    while TP in consumer.paused:  # noqa: ASYNC110
        await asyncio.sleep(0.001)

    stop.set()
    await asyncio.wait_for(running, 10)
    assert consumer.commits[-1] == {TP: 50}


async def test_done_records_behind_a_stuck_one_count_against_the_uncommitted_bound_not_the_buffered_one() -> None:
    consumer = FakeConsumer()
    consumer.batches = [records(0, 100), records(100, 100), records(200, 100)]
    stuck: asyncio.Future[None] | None = None

    async def first_stuck(record: SourceRecord) -> Work:
        def start(lender: Lender) -> asyncio.Future[None]:
            nonlocal stuck
            future = asyncio.get_running_loop().create_future()
            if record.offset == 0:
                stuck = future  # a record stuck in retry: it holds the commit point
            else:
                future.set_result(None)
            return future

        return Work(key=None, start=start)

    loop = loop_over(
        consumer,
        first_stuck,
        max_buffered_per_partition=150,
        max_uncommitted_per_partition=250,
        commit_interval_s=3600.0,
        drain_timeout_s=0.01,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))

    async def fetched_and_paused() -> None:
        while consumer.batches or TP not in consumer.paused:  # noqa: ASYNC110  # the fake has no event for it
            await asyncio.sleep(0.001)

    # Every batch is fetched: the 200 done records behind the stuck one do not count against the buffered
    # bound (150 not done); the 300 uncommitted ones then hold the partition at the uncommitted bound (250).
    await asyncio.wait_for(fetched_and_paused(), 10)
    assert stuck is not None
    stuck.set_result(None)
    while TP in consumer.paused:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    stop.set()
    await asyncio.wait_for(running, 10)
    assert consumer.commits[-1] == {TP: 300}


async def test_a_stop_commits_what_is_done_before_it_drains_what_is_not() -> None:
    # While a stopping member drains, another member leaving can end its generation; a commit made only
    # after the drain would then be refused and everything done since the last tick delivered again.
    consumer = FakeConsumer()
    consumer.batches = [records(0, 11)]
    held: asyncio.Future[None] | None = None
    started = asyncio.Event()

    async def last_one_held(record: SourceRecord) -> Work:
        def start(lender: Lender) -> asyncio.Future[None]:
            nonlocal held
            future = asyncio.get_running_loop().create_future()
            if record.offset == 10:
                held = future
                started.set()
            else:
                future.set_result(None)
            return future

        return Work(key=None, start=start)

    seen_at_commit: list[bool] = []
    original_commit = consumer.commit

    async def commit(offsets: Mapping[TopicPartition, int]) -> None:
        seen_at_commit.append(held is not None and held.done())
        await original_commit(offsets)

    consumer.commit = commit  # type: ignore[method-assign]
    loop = loop_over(
        consumer,
        last_one_held,
        max_buffered_per_partition=5000,
        commit_interval_s=3600.0,
        drain_timeout_s=5.0,
        commit_after_records=10**9,  # no early commit: only the stop commits
    )
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0)  # the ten done records' callbacks

    stop.set()
    await asyncio.wait_for(consumer.committed.wait(), 10)
    assert consumer.commits == [{TP: 10}]
    assert seen_at_commit == [False], "the first commit came while the last record was still draining"
    assert held is not None
    held.set_result(None)
    await asyncio.wait_for(running, 10)
    assert consumer.commits[-1] == {TP: 11}
