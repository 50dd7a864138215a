"""Dead-letter replay: re-produce dead letters to their source topic, so the bridge tries them again.

`python -m service replay --from <topic>.dlq` reads the dead-letter topic with its own consumer group,
from that group's committed position up to the end offsets seen at start (so it terminates even while
the bridge keeps dead-lettering), and re-produces each dead letter's original key, value bytes, headers
and timestamp to the topic named by `__connect.errors.topic`, to the original partition when the
source topic still has it. The dead-letter evidence (`__connect.errors.*`, `bridge.*`) is stripped and
`bridge.replay.count` is carried forward plus one, so a record that keeps failing is refused after
`--max-replays` rounds instead of cycling forever. Progress is committed only after the broker
acknowledged the replayed record (acks=all, idempotent producer): a crash replays at least once,
never loses. The header rewriting is pure functions; Kafka is touched only by `_Replayer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from service.config.settings import Settings
from service.core.errors import BridgeError, FatalError
from service.core.records import SourceRecord
from service.kafka.clients import build_durable_producer, security_options, to_source_record
from service.kafka.deadletter import REASON_HEADER, SOURCE_OFFSET_HEADER, SOURCE_PARTITION_HEADER, SOURCE_TOPIC_HEADER
from service.tools.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CommandParser,
    Headers,
    ParserExit,
    describe_error,
    header_text,
    kafka_errors,
    last_header,
    non_empty,
    whole_number,
)

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.replay")


EVIDENCE_PREFIXES = ("__connect.errors.", "bridge.")
REPLAY_COUNT_HEADER = "bridge.replay.count"
DEFAULT_MAX_REPLAYS = 3


class ReplayUsageError(BridgeError):
    """The operator asked for something impossible (bad arguments, no such topic); nothing was touched."""

    reason = "replay-usage"


class ReplayError(FatalError):
    """Kafka failed mid-replay; everything acknowledged before the failure is committed, nothing after."""

    reason = "replay-failed"


# --- pure: reading and rewriting a dead letter's headers ---------------------------------------------------------


def replay_count(headers: Headers) -> int | None:
    """How often this record was replayed already: 0 without the header, None when it is unreadable."""
    raw = last_header(headers, REPLAY_COUNT_HEADER)
    if raw is None:
        return 0
    text = header_text(raw)
    # ASCII decimal only: int() would also take " 3", "+3" or non-ASCII digits, which no replay of ours wrote.
    if text is None or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def is_evidence(name: str) -> bool:
    return name.startswith(EVIDENCE_PREFIXES)


def replay_headers(headers: Headers, count: int) -> Headers:
    """The original headers (order and duplicates kept) without dead-letter evidence, plus the new count."""
    kept = tuple((name, value) for name, value in headers if not is_evidence(name))
    return (*kept, (REPLAY_COUNT_HEADER, str(count).encode("ascii")))


def source_partition(headers: Headers) -> int | None:
    text = header_text(last_header(headers, SOURCE_PARTITION_HEADER))
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


def target_partition(original: int | None, partitions: int) -> int | None:
    """The original partition when the source topic still has it; otherwise None lets the key decide."""
    return original if original is not None and original < partitions else None


class Verdict(StrEnum):
    REPLAY = "replay"
    SKIP = "skip"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Replay:
    """The record to re-produce; `partition` is the original one, before checking the topic still has it."""

    topic: str
    partition: int | None
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    count: int


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    detail: str
    replay: Replay | None = None


def plan(letter: SourceRecord, *, reasons: frozenset[str], max_replays: int) -> Decision:
    """What to do with one dead letter. The filter comes first: a record the operator did not ask for is
    skipped whatever state it is in, so refusals only report records the operator wanted replayed."""
    headers = letter.headers
    reason = header_text(last_header(headers, REASON_HEADER))
    if reasons and reason not in reasons:
        return Decision(Verdict.SKIP, f"reason {reason!r} not selected")
    topic = header_text(last_header(headers, SOURCE_TOPIC_HEADER))
    if not topic:
        return Decision(Verdict.REFUSE, f"no {SOURCE_TOPIC_HEADER} header: the source topic is unknown")
    count = replay_count(headers)
    if count is None:
        return Decision(Verdict.REFUSE, f"unreadable {REPLAY_COUNT_HEADER} header")
    if count >= max_replays:
        return Decision(Verdict.REFUSE, f"replayed {count} times already (--max-replays {max_replays})")
    replay = Replay(
        topic=topic,
        partition=source_partition(headers),
        key=letter.key,
        value=letter.value,
        headers=replay_headers(headers, count + 1),
        timestamp_ms=letter.timestamp_ms,
        count=count + 1,
    )
    return Decision(Verdict.REPLAY, f"reason {reason!r}", replay)


def coordinates(letter: SourceRecord) -> dict[str, Any]:
    """Where a dead letter is and where it came from, for log lines and dry-run output."""
    return {
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "source_topic": header_text(last_header(letter.headers, SOURCE_TOPIC_HEADER)),
        "source_partition": header_text(last_header(letter.headers, SOURCE_PARTITION_HEADER)),
        "source_offset": header_text(last_header(letter.headers, SOURCE_OFFSET_HEADER)),
        "reason": header_text(last_header(letter.headers, REASON_HEADER)),
    }


# --- options and the command line --------------------------------------------------------------------------------


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


_DESCRIPTION = """\
Re-produce dead letters to their source topic (header __connect.errors.topic) with the original key, value,
headers and timestamp, to the original partition when the topic still has it. Dead-letter headers are
stripped and bridge.replay.count is incremented; records already replayed --max-replays times are refused.
Reads from the group's committed position (earliest if none) up to the end offsets seen at start, and
commits after each acknowledged write, so an interrupted replay resumes where it stopped."""

_EPILOG = """\
A filtered replay consumes what it skips: progress past records that do not match --reason (and past
refused records) is committed, so a later run with the same group will not see them again. Run with
--dry-run first to see what would happen (it produces and commits nothing), and pass a fresh --group to
re-scan the whole topic. Do not run two replays with the same group at once.
Exit codes: 0 done, 1 Kafka failed mid-way (acknowledged progress is committed), 2 bad arguments or no
such dead-letter topic."""


def build_parser(default_group: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        usage_error=ReplayUsageError,
        prog="python -m service replay",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from", dest="dlq_topic", required=True, type=non_empty, metavar="TOPIC", help="dead-letter topic"
    )
    parser.add_argument(
        "--reason",
        dest="reasons",
        action="append",
        type=non_empty,
        default=[],
        metavar="REASON",
        help="replay only dead letters with this bridge.reason (repeatable); others are skipped and consumed",
    )
    parser.add_argument("--limit", type=whole_number(1), metavar="N", help="stop after N replayed records")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would happen; produce nothing, commit nothing"
    )
    parser.add_argument(
        "--max-replays",
        type=whole_number(1),
        default=DEFAULT_MAX_REPLAYS,
        metavar="N",
        help="refuse records whose bridge.replay.count is already N or more (default %(default)s)",
    )
    parser.add_argument(
        "--group",
        type=non_empty,
        default=default_group,
        metavar="GROUP",
        help="consumer group that keeps the replay's progress (default %(default)s); a fresh one re-scans",
    )
    return parser


def parse_options(argv: Sequence[str], *, default_group: str) -> ReplayOptions:
    """Raises `ReplayUsageError` on bad arguments and `ParserExit` after --help."""
    args = build_parser(default_group).parse_args(list(argv))
    return ReplayOptions(
        dlq_topic=args.dlq_topic,
        group_id=args.group,
        reasons=frozenset(args.reasons),
        limit=args.limit,
        dry_run=args.dry_run,
        max_replays=args.max_replays,
    )


# --- the Kafka side -----------------------------------------------------------------------------------------------


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
    """Partition counts from the admin client. Lists all topics rather than asking for one by name,
    because a metadata request that names a topic auto-creates it on brokers that allow that."""

    def __init__(self, admin: Any) -> None:
        self._admin = admin
        self._partitions: dict[str, int] = {}

    async def refresh(self) -> None:
        with _kafka_errors("cannot read topic metadata"):
            described: list[dict[str, Any]] = await self._admin.describe_topics()
        self._partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}

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
            admin = AIOKafkaAdminClient(
                bootstrap_servers=kafka.bootstrap_servers,
                client_id=f"{kafka.client_id}-replay",
                **security_options(kafka),
            )
            with _kafka_errors("cannot connect to Kafka"):
                await admin.start()
            stack.push_async_callback(admin.close)
            catalog = _TopicCatalog(admin)
            await catalog.refresh()
            count = await catalog.partitions(options.dlq_topic)
            if count is None:
                raise ReplayUsageError(f"dead-letter topic {options.dlq_topic!r} does not exist")

            consumer = AIOKafkaConsumer(
                bootstrap_servers=kafka.bootstrap_servers,
                group_id=options.group_id,
                client_id=f"{kafka.client_id}-replay",
                enable_auto_commit=False,  # progress is committed only after the replay is acknowledged
                auto_offset_reset="earliest",  # a fresh group starts at the oldest dead letter
                max_poll_records=kafka.max_poll_records,
                fetch_max_bytes=kafka.fetch_max_bytes,
                max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
                **security_options(kafka),
            )
            with _kafka_errors("cannot start the dead-letter consumer"):
                await consumer.start()
            stack.push_async_callback(consumer.stop)

            producer: Any = None
            if not options.dry_run:  # a dry run needs no write access at all
                producer = build_durable_producer(
                    kafka, role="replay", send_timeout_s=self._settings.dead_letter.send_timeout_s
                )
                with _kafka_errors("cannot start the replay producer"):
                    await producer.start()
                stack.push_async_callback(producer.stop)

            with _kafka_errors(f"replay of {options.dlq_topic!r} failed"):
                await self._drain(consumer, producer, catalog, count)

    async def _drain(self, consumer: Any, producer: Any, catalog: _TopicCatalog, count: int) -> None:
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

    async def _handle(self, tp: TopicPartition, letter: SourceRecord, producer: Any, catalog: _TopicCatalog) -> _Done:
        options = self._options
        decision = plan(letter, reasons=options.reasons, max_replays=options.max_replays)
        where = f"{letter.topic}[{letter.partition}]@{letter.offset}"
        context = coordinates(letter)
        if decision.verdict is Verdict.SKIP:
            self.tally.skipped += 1
            log.debug("dead letter skipped", extra={**context, "detail": decision.detail})
            if options.dry_run:
                self._out(f"would skip {where}: {decision.detail}")
            return _Done(tp, letter)
        if decision.verdict is Verdict.REFUSE or decision.replay is None:
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
        if options.dry_run:
            self.tally.replayed += 1
            self._out(f"would replay {where} -> {target} {decision.detail} {REPLAY_COUNT_HEADER}={replay.count}")
            return _Done(tp, letter)
        with _kafka_errors(f"cannot replay {where} to {target}"):
            ack = await producer.send(
                replay.topic,
                value=replay.value,
                key=replay.key,
                partition=partition,
                timestamp_ms=replay.timestamp_ms,
                headers=list(replay.headers),
            )
        return _Done(tp, letter, ack, target, replay.count)

    async def _settle(self, consumer: Any, done: list[_Done]) -> None:
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


def main(argv: list[str], settings: Settings) -> int:
    """`python -m service replay ...`: prints the summary line and returns the exit code."""
    try:
        options = parse_options(argv, default_group=f"{settings.kafka.group_id}-replay")
        summary = asyncio.run(replay(settings, options))
    except ParserExit as exc:
        return exc.status
    except ReplayUsageError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(summary.line())
    return EXIT_OK
