"""The Kafka side of a replay: read the dead-letter topic, re-produce what the plan says, commit what is durable.

The dead-letter topic is read with the replay's own consumer group, from that group's committed position up to
the end offsets seen at start (so it terminates even while the bridge keeps dead-lettering). Progress is
committed only after the broker acknowledged the replayed record (acks=all, idempotent producer): a crash
replays at least once, never loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from service.config.settings import Settings
from service.core.errors import BridgeError, FatalError
from service.core.records import SourceRecord
from service.kafka.clients import (
    build_admin,
    build_durable_producer,
    build_reader,
    list_partition_counts,
    queue_record,
    to_source_record,
)
from service.tools.cli import describe_error, kafka_errors
from service.tools.replay.plan import (
    DEFAULT_MAX_REPLAYS,
    REPLAY_COUNT_HEADER,
    Action,
    coordinates,
    plan,
    target_partition,
)

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.replay")


class ReplayUsageError(BridgeError):
    """The operator asked for something impossible (bad arguments, no such topic); nothing was touched."""

    reason = "replay-usage"


class ReplayError(FatalError):
    """Kafka failed mid-replay; everything acknowledged before the failure is committed, nothing after."""

    reason = "replay-failed"


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    dlq_topic: str
    group_id: str
    reasons: frozenset[str] = frozenset()
    limit: int | None = None
    dry_run: bool = False
    max_replays: int = DEFAULT_MAX_REPLAYS
    idle_timeout_s: float = 60.0
    """Give up when partitions behind their end offset deliver nothing for this long (broker gone)."""


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    replayed: int
    skipped: int
    refused: int
    dry_run: bool

    def line(self) -> str:
        dry = "true" if self.dry_run else "false"
        return f"replayed={self.replayed} skipped={self.skipped} refused={self.refused} dry_run={dry}"


def _kafka_errors(what: str) -> contextlib.AbstractContextManager[None]:
    return kafka_errors(what, ReplayError)


@dataclass(slots=True)
class _Tally:
    replayed: int = 0
    skipped: int = 0
    refused: int = 0

    def summary(self, dry_run: bool) -> ReplaySummary:
        return ReplaySummary(self.replayed, self.skipped, self.refused, dry_run)


@dataclass(frozen=True, slots=True)
class _Done:
    """A handled dead letter; `ack` is the pending broker acknowledgement of its replay, if any."""

    tp: TopicPartition
    letter: SourceRecord
    ack: asyncio.Future[Any] | None = None
    target: str = ""
    count: int = 0


class _TopicCatalog:
    """Partition counts from the admin client (`list_partition_counts`), refreshed for topics it does not know."""

    def __init__(self, admin: AIOKafkaAdminClient) -> None:
        self._admin = admin
        self._partitions: dict[str, int] = {}

    async def refresh(self) -> None:
        with _kafka_errors("cannot read topic metadata"):
            self._partitions = await list_partition_counts(self._admin)

    async def partitions(self, topic: str) -> int | None:
        if topic not in self._partitions:
            await self.refresh()  # a topic created since start, or metadata that was still settling
        return self._partitions.get(topic)


class _Replayer:
    def __init__(
        self,
        settings: Settings,
        options: ReplayOptions,
        out: Callable[[str], None],
    ) -> None:
        self._settings = settings
        self._options = options
        self._out = out
        self.tally = _Tally()

    async def run(self) -> None:
        kafka = self._settings.kafka
        options = self._options
        async with AsyncExitStack() as stack:
            admin = build_admin(kafka, role="replay")
            with _kafka_errors("cannot connect to Kafka"):
                await admin.start()
            stack.push_async_callback(admin.close)
            catalog = _TopicCatalog(admin)
            await catalog.refresh()
            count = await catalog.partitions(options.dlq_topic)
            if count is None:
                raise ReplayUsageError(f"dead-letter topic {options.dlq_topic!r} does not exist")

            # Progress is committed by hand, only after the replay is acknowledged.
            consumer = build_reader(kafka, role="replay", group_id=options.group_id)
            with _kafka_errors("cannot start the dead-letter consumer"):
                await consumer.start()
            stack.push_async_callback(consumer.stop)

            producer: AIOKafkaProducer | None = None
            if not options.dry_run:  # a dry run needs no write access at all
                producer = build_durable_producer(
                    kafka, role="replay", send_timeout_s=self._settings.dead_letter.send_timeout_s
                )
                with _kafka_errors("cannot start the replay producer"):
                    await producer.start()
                stack.push_async_callback(producer.stop)

            with _kafka_errors(f"replay of {options.dlq_topic!r} failed"):
                await self._drain(consumer, producer, catalog, count)

    async def _drain(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer | None, catalog: _TopicCatalog, count: int
    ) -> None:
        options = self._options
        partitions = [TopicPartition(options.dlq_topic, p) for p in range(count)]
        # Manual assignment: no group rebalance to wait for. The group id still gives the committed
        # start position and a place to commit progress.
        consumer.assign(partitions)
        # Captured once: dead letters written while we run (including our own replays failing again)
        # wait for the next run, so the replay always terminates.
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
        consumer.pause(*(set(partitions) - remaining))
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        while remaining and not self._limit_reached(0):
            batch: dict[TopicPartition, list[Any]] = await consumer.getmany(*remaining, timeout_ms=500)
            done: list[_Done] = []
            queued_replays = 0  # of `done`, those sent for replay (their ack is pending)
            try:
                for tp, records in batch.items():
                    for record in records:
                        if record.offset >= ends[tp] or self._limit_reached(queued_replays):
                            break
                        item = await self._handle(tp, to_source_record(record), producer, catalog)
                        done.append(item)
                        queued_replays += item.ack is not None
            except ReplayError:
                # Keep what was sent before the failure: commit it once acknowledged, so a re-run
                # does not replay it twice.
                await self._settle(consumer, done)
                raise
            if done:
                last_progress = loop.time()
                await self._settle(consumer, done)
            elif loop.time() - last_progress > options.idle_timeout_s:
                raise ReplayError(
                    f"no records from {sorted(tp.partition for tp in remaining)} of {options.dlq_topic!r} "
                    f"for {options.idle_timeout_s:.0f}s although they are behind their end offsets"
                )
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
                    consumer.pause(tp)

    def _limit_reached(self, queued_replays: int) -> bool:
        # Replays sent in this batch are not in the tally until acknowledged, but they count to the limit.
        limit = self._options.limit
        return limit is not None and self.tally.replayed + queued_replays >= limit

    async def _handle(
        self, tp: TopicPartition, letter: SourceRecord, producer: AIOKafkaProducer | None, catalog: _TopicCatalog
    ) -> _Done:
        options = self._options
        decision = plan(letter, reasons=options.reasons, max_replays=options.max_replays)
        where = f"{letter.topic}[{letter.partition}]@{letter.offset}"
        context = coordinates(letter)
        if decision.action is Action.SKIP:
            self.tally.skipped += 1
            log.debug("dead letter skipped", extra={**context, "detail": decision.detail})
            if options.dry_run:
                self._out(f"would skip {where}: {decision.detail}")
            return _Done(tp, letter)
        if decision.action is Action.REFUSE or decision.replay is None:
            self.tally.refused += 1
            log.warning("dead letter refused", extra={**context, "detail": decision.detail})
            self._out(f"{'would refuse' if options.dry_run else 'refused'} {where}: {decision.detail}")
            return _Done(tp, letter)
        replay = decision.replay
        source_partitions = await catalog.partitions(replay.topic)
        if source_partitions is None:
            # Every dead letter of a DLQ names the same source topic, so this is an operator matter
            # (a renamed or deleted topic), not a bad record: stop rather than consume the queue.
            raise ReplayError(f"source topic {replay.topic!r} of dead letter {where} does not exist")
        partition = target_partition(replay.partition, source_partitions)
        target = f"{replay.topic}[{'by key' if partition is None else partition}]"
        if options.dry_run or producer is None:  # a dry run has no producer
            self.tally.replayed += 1
            self._out(f"would replay {where} -> {target} {decision.detail} {REPLAY_COUNT_HEADER}={replay.count}")
            return _Done(tp, letter)
        with _kafka_errors(f"cannot replay {where} to {target}"):
            ack = await queue_record(
                producer,
                replay.topic,
                key=replay.key,
                value=replay.value,
                partition=partition,
                timestamp_ms=replay.timestamp_ms,
                headers=list(replay.headers),
            )
        return _Done(tp, letter, ack, target, replay.count)

    async def _settle(self, consumer: AIOKafkaConsumer, done: list[_Done]) -> None:
        """Await the acks in order and commit the prefix that is durable; a failed ack ends the run."""
        commits: dict[TopicPartition, int] = {}
        failure: KafkaError | None = None
        for item in done:
            if item.ack is not None:
                try:
                    await item.ack
                except KafkaError as exc:
                    failure = exc
                    break
                self.tally.replayed += 1
                extra = {**coordinates(item.letter), "target": item.target, "replay_count": item.count}
                log.info("dead letter replayed", extra=extra)
            commits[item.tp] = item.letter.offset + 1
        if commits and not self._options.dry_run:
            await consumer.commit(commits)
        if failure is not None:
            raise ReplayError(f"replay not acknowledged: {describe_error(failure)}") from failure


async def replay(settings: Settings, options: ReplayOptions, *, out: Callable[[str], None] = print) -> ReplaySummary:
    """Run one replay; `out` receives the per-record lines a person reads (dry run, refusals)."""
    replayer = _Replayer(settings, options, out)
    try:
        await replayer.run()
    except ReplayError as exc:
        counts = replayer.tally.summary(options.dry_run).line()
        raise ReplayError(f"{exc} (stopped after {counts})") from exc
    return replayer.tally.summary(options.dry_run)
