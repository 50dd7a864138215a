"""PartitionWorker without Kafka: same-key records run in offset order, different keys overlap, and
the per-partition and shared in-flight bounds both hold."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from aiokafka import TopicPartition

from service.consumer import ConsumerLoop, PartitionWorker
from service.records import SourceRecord, Work
from service.slots import Slots


class _Loop:
    """The one thing a worker asks of its loop."""

    def __init__(self) -> None:
        self.failures: list[BaseException] = []

    def fail(self, exc: BaseException) -> None:
        self.failures.append(exc)


class _Probe:
    def __init__(self, keys: dict[int, Hashable]) -> None:
        self.keys = keys
        self.running = 0
        self.peak = 0
        self.order: list[int] = []

    async def prepare(self, record: SourceRecord) -> Work:
        return Work(key=self.keys[record.offset], start=lambda: asyncio.ensure_future(self._run(record.offset)))

    async def _run(self, offset: int) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.001 * (5 - offset % 5))  # later records would finish first if allowed
        self.order.append(offset)
        self.running -= 1


def _records(partition: int, count: int) -> list[SourceRecord]:
    return [SourceRecord("t", partition, o, None, b"v", (), 0) for o in range(count)]


async def _drain(*workers: PartitionWorker) -> None:
    while any(w.tracker.committable() != 10 for w in workers):  # noqa: ASYNC110  # the tracker has no event to await
        await asyncio.sleep(0.001)


def _worker(partition: int, probe: _Probe, per_partition: int, shared: Slots) -> PartitionWorker:
    loop: ConsumerLoop = _Loop()  # type: ignore[assignment]  # a stand-in with the one method used
    return PartitionWorker(TopicPartition("t", partition), probe.prepare, per_partition, shared, loop)


async def test_same_key_runs_in_offset_order_and_all_offsets_complete() -> None:
    probe = _Probe(dict.fromkeys(range(10), "one-key"))
    worker = _worker(0, probe, 8, Slots(100))
    worker.push(_records(0, 10))
    await asyncio.wait_for(_drain(worker), 10)
    assert probe.order == list(range(10))
    assert probe.peak == 1
    await worker.stop(1)


async def test_different_keys_overlap_up_to_the_partition_bound() -> None:
    probe = _Probe({o: o for o in range(10)})
    worker = _worker(0, probe, 3, Slots(100))
    worker.push(_records(0, 10))
    await asyncio.wait_for(_drain(worker), 10)
    assert probe.peak == 3
    assert worker.tracker.committable() == 10
    await worker.stop(1)


async def test_the_shared_bound_holds_across_partitions() -> None:
    probe = _Probe({o: o for o in range(10)})
    shared = Slots(2)
    first, second = _worker(0, probe, 5, shared), _worker(1, probe, 5, shared)
    first.push(_records(0, 10))
    second.push(_records(1, 10))
    await asyncio.wait_for(_drain(first, second), 10)
    assert probe.peak == 2
    await first.stop(1)
    await second.stop(1)


async def test_keyless_work_overlaps_up_to_the_partition_bound() -> None:
    probe = _Probe(dict.fromkeys(range(10)))
    worker = _worker(0, probe, 4, Slots(100))
    worker.push(_records(0, 10))
    await asyncio.wait_for(_drain(worker), 10)
    assert probe.peak == 4
    await worker.stop(1)


class _Outcomes:
    """Work whose outcome is a bare future the test settles, as a batched row's is."""

    def __init__(self) -> None:
        self.futures: dict[int, asyncio.Future[None]] = {}
        self.started = asyncio.Event()

    async def prepare(self, record: SourceRecord) -> Work:
        def start() -> asyncio.Future[None]:
            future = self.futures[record.offset] = asyncio.get_running_loop().create_future()
            self.started.set()
            return future

        return Work(key=None, start=start)


async def _started(outcomes: _Outcomes, count: int) -> None:
    while len(outcomes.futures) < count:
        outcomes.started.clear()
        await outcomes.started.wait()


async def _settled() -> None:
    for _ in range(3):  # done callbacks run on the next loop iterations
        await asyncio.sleep(0)


async def test_future_outcomes_settled_out_of_order_commit_only_the_done_prefix() -> None:
    outcomes = _Outcomes()
    loop = _Loop()
    worker = PartitionWorker(TopicPartition("t", 0), outcomes.prepare, 8, Slots(8), loop)  # type: ignore[arg-type]
    worker.push(_records(0, 3))
    await asyncio.wait_for(_started(outcomes, 3), 5)

    outcomes.futures[2].set_result(None)
    await _settled()
    assert worker.tracker.committable() is None
    outcomes.futures[0].set_result(None)
    await _settled()
    assert worker.tracker.committable() == 1
    outcomes.futures[1].set_result(None)
    await _settled()
    assert worker.tracker.committable() == 3
    assert worker.backlog == 0
    assert loop.failures == []
    await worker.stop(1)


async def test_a_failed_outcome_stops_the_loop_and_is_never_committed() -> None:
    outcomes = _Outcomes()
    loop = _Loop()
    worker = PartitionWorker(TopicPartition("t", 0), outcomes.prepare, 8, Slots(8), loop)  # type: ignore[arg-type]
    worker.push(_records(0, 2))
    await asyncio.wait_for(_started(outcomes, 2), 5)
    fatal = RuntimeError("the dead-letter topic refused the record")

    outcomes.futures[0].set_exception(fatal)
    outcomes.futures[1].set_result(None)
    await _settled()

    assert loop.failures == [fatal]
    assert worker.tracker.committable() is None
    await worker.stop(1)


async def test_stop_cancels_unfinished_outcomes_and_frees_their_slots() -> None:
    outcomes = _Outcomes()
    shared = Slots(2)
    worker = PartitionWorker(TopicPartition("t", 0), outcomes.prepare, 8, shared, _Loop())  # type: ignore[arg-type]
    worker.push(_records(0, 2))
    await asyncio.wait_for(_started(outcomes, 2), 5)
    assert shared.free == 0

    await worker.stop(0.01)

    assert all(future.cancelled() for future in outcomes.futures.values())
    assert worker.tracker.committable() is None  # read again by whoever owns the partition next
    assert shared.free == 2


async def test_stop_cancels_a_same_key_chain_and_frees_every_slot() -> None:
    keyed = _Outcomes()

    async def prepare(record: SourceRecord) -> Work:
        # One key for all: record 1 waits for record 0, record 2 for record 1.
        return (await keyed.prepare(record))._replace(key="same")

    shared = Slots(3)
    worker = PartitionWorker(TopicPartition("t", 0), prepare, 8, shared, _Loop())  # type: ignore[arg-type]
    worker.push(_records(0, 3))
    await asyncio.wait_for(_started(keyed, 1), 5)
    await _settled()
    assert list(keyed.futures) == [0]  # the others wait for it, unstarted
    assert shared.free == 0

    await worker.stop(0.01)

    assert list(keyed.futures) == [0]  # cancelled before they ever started
    assert worker.tracker.committable() is None
    assert shared.free == 3


async def test_a_start_that_raises_stops_the_loop_without_keeping_its_slots() -> None:
    async def prepare(record: SourceRecord) -> Work:
        def start() -> asyncio.Future[None]:
            raise RuntimeError("a bug in start")

        return Work(key=None, start=start)

    loop = _Loop()
    shared = Slots(2)
    worker = PartitionWorker(TopicPartition("t", 0), prepare, 8, shared, loop)  # type: ignore[arg-type]
    worker.push(_records(0, 1))
    await _settled()

    assert [str(e) for e in loop.failures] == ["a bug in start"]
    assert shared.free == 2
    await worker.stop(0.01)
