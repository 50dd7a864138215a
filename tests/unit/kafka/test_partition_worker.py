"""PartitionWorker without Kafka: same-key records run in offset order, different keys overlap, the
per-partition and shared in-flight bounds both hold, and a parked record (or one waiting behind its key)
holds no slot while still holding the commit point."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping

from aiokafka import TopicPartition

from service.core.records import Lender, SourceRecord, Work
from service.kafka.consumer import ConsumerLoop
from service.kafka.slots import Slots
from service.kafka.worker import PartitionWorker


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
        return Work(key=self.keys[record.offset], start=lambda lender: asyncio.ensure_future(self._run(record.offset)))

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
        def start(lender: Lender) -> asyncio.Future[None]:
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
    worker = PartitionWorker(TopicPartition("t", 0), outcomes.prepare, 8, Slots(8), loop)
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
    worker = PartitionWorker(TopicPartition("t", 0), outcomes.prepare, 8, Slots(8), loop)
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
    worker = PartitionWorker(TopicPartition("t", 0), outcomes.prepare, 8, shared, _Loop())
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
    worker = PartitionWorker(TopicPartition("t", 0), prepare, 8, shared, _Loop())
    worker.push(_records(0, 3))
    await asyncio.wait_for(_started(keyed, 1), 5)
    await _settled()
    assert list(keyed.futures) == [0]  # the others wait for it, unstarted
    assert shared.free == 2, "records waiting behind their key hold no slot"

    await worker.stop(0.01)

    assert list(keyed.futures) == [0]  # cancelled before they ever started
    assert worker.tracker.committable() is None
    assert shared.free == 3


async def test_a_start_that_raises_stops_the_loop_without_keeping_its_slots() -> None:
    async def prepare(record: SourceRecord) -> Work:
        def start(lender: Lender) -> asyncio.Future[None]:
            raise RuntimeError("a bug in start")

        return Work(key=None, start=start)

    loop = _Loop()
    shared = Slots(2)
    worker = PartitionWorker(TopicPartition("t", 0), prepare, 8, shared, loop)
    worker.push(_records(0, 1))
    await _settled()

    assert [str(e) for e in loop.failures] == ["a bug in start"]
    assert shared.free == 2
    await worker.stop(0.01)


class _Parker:
    """Records that park until the test releases them (as a not-yet update waits), and records that just run."""

    def __init__(self, keys: Mapping[int, Hashable], parking: set[int]) -> None:
        self.keys = keys
        self.parking = parking
        self.release = asyncio.Event()
        self.parked = asyncio.Event()
        self.done: list[int] = []

    async def prepare(self, record: SourceRecord) -> Work:
        return Work(
            key=self.keys[record.offset], start=lambda lender: asyncio.ensure_future(self._run(record.offset, lender))
        )

    async def _run(self, offset: int, lender: Lender) -> None:
        if offset in self.parking:
            lender.park(offset)
            self.parked.set()
            await self.release.wait()
            await lender.resume(offset)
        self.done.append(offset)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110  # the worker has no event to await
        await asyncio.sleep(0.001)


async def test_a_parked_record_gives_its_slot_to_other_keys_and_holds_the_commit_point() -> None:
    # One slot only: without parking, offset 0 would hold it and nothing else could run.
    parker = _Parker({o: o for o in range(10)}, parking={0})
    shared = Slots(1)
    worker = PartitionWorker(TopicPartition("t", 0), parker.prepare, 1, shared, _Loop())
    worker.push(_records(0, 10))

    await asyncio.wait_for(_until(lambda: len(parker.done) == 9), 10)
    assert worker.parked == 1
    assert worker.tracker.committable() is None, "the parked record still holds the commit point"

    parker.release.set()
    await asyncio.wait_for(_until(lambda: worker.tracker.committable() == 10), 10)
    assert parker.done[-1] == 0
    assert worker.parked == 0
    assert shared.free == 1
    await worker.stop(1)


async def test_later_records_of_a_parked_key_wait_behind_it_without_slots() -> None:
    keys = {o: ("k" if o in (0, 3, 6) else o) for o in range(10)}
    parker = _Parker(keys, parking={0})
    worker = PartitionWorker(TopicPartition("t", 0), parker.prepare, 1, Slots(1), _Loop())
    worker.push(_records(0, 10))

    await asyncio.wait_for(_until(lambda: len(parker.done) == 7), 10)
    assert sorted(parker.done) == [1, 2, 4, 5, 7, 8, 9], "other keys flowed past the parked key's records"

    parker.release.set()
    await asyncio.wait_for(_until(lambda: worker.tracker.committable() == 10), 10)
    assert [o for o in parker.done if keys[o] == "k"] == [0, 3, 6]
    await worker.stop(1)


async def test_a_record_cancelled_while_parked_frees_nothing_twice() -> None:
    parker = _Parker(dict.fromkeys(range(3)), parking={0, 1, 2})
    shared = Slots(2)
    worker = PartitionWorker(TopicPartition("t", 0), parker.prepare, 2, shared, _Loop())
    worker.push(_records(0, 3))
    await asyncio.wait_for(_until(lambda: worker.parked == 3), 10)

    await worker.stop(0.01)

    assert shared.free == 2
    assert worker.tracker.committable() is None


async def test_a_stop_lets_records_waiting_behind_their_key_run_so_the_done_prefix_has_no_hole() -> None:
    # Offsets 0 and 2 share a key; 1 and 3 have their own. At the stop, 0 is still running and 2 waits for it:
    # left out, 2 would hold the commit point and the done 3 would be delivered again by the next owner.
    outcomes = _Outcomes()

    async def prepare(record: SourceRecord) -> Work:
        return (await outcomes.prepare(record))._replace(key="k" if record.offset in (0, 2) else record.offset)

    worker = PartitionWorker(TopicPartition("t", 0), prepare, 8, Slots(8), _Loop())
    worker.push(_records(0, 4))
    await asyncio.wait_for(_started(outcomes, 3), 5)  # 0, 1 and 3; 2 waits for 0
    outcomes.futures[1].set_result(None)
    outcomes.futures[3].set_result(None)

    stopping = asyncio.create_task(worker.stop(5.0))
    await _settled()
    outcomes.futures[0].set_result(None)  # finishes during the drain: 2's turn comes
    await asyncio.wait_for(_started(outcomes, 4), 5)
    outcomes.futures[2].set_result(None)
    await asyncio.wait_for(stopping, 5)

    assert worker.tracker.committable() == 4


async def test_a_record_whose_turn_comes_in_the_drain_runs_even_when_its_slot_goes_to_another_partition() -> None:
    # One shared slot. P's 0 and 1 share a key; Q's 0 waits for the slot. When P's 0 finishes in P's drain, the
    # slot goes to Q (first in line) and P's 1 gets its turn with no slot: the drain must wait for it, or 1 is a
    # hole in P's done prefix.
    p_outcomes, q_outcomes = _Outcomes(), _Outcomes()

    async def keyed(record: SourceRecord) -> Work:
        return (await p_outcomes.prepare(record))._replace(key="k")

    shared = Slots(1)
    p = PartitionWorker(TopicPartition("t", 0), keyed, 8, shared, _Loop())
    q = PartitionWorker(TopicPartition("t", 1), q_outcomes.prepare, 8, shared, _Loop())
    p.push(_records(0, 2))
    await asyncio.wait_for(_started(p_outcomes, 1), 5)
    q.push(_records(1, 1))
    await _settled()  # Q's 0 waits for the slot

    stopping = asyncio.create_task(p.stop(5.0))
    await _settled()
    p_outcomes.futures[0].set_result(None)
    await asyncio.wait_for(_started(q_outcomes, 1), 5)
    q_outcomes.futures[0].set_result(None)  # the slot comes back: P's 1 takes it

    await asyncio.wait_for(_started(p_outcomes, 2), 5)
    p_outcomes.futures[1].set_result(None)
    await asyncio.wait_for(stopping, 5)
    assert p.tracker.committable() == 2
    await q.stop(1)
