"""The Kafka side of the dlq command: list the topics, read each dead-letter partition once to its end, report.

The reader has no consumer group: it is assigned the partitions and never commits, so it moves no group's
position (neither the bridge's nor a replay's)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from service.config.settings import Settings
from service.core.records import SourceRecord
from service.kafka.clients import build_admin, build_reader, list_partition_counts, to_source_record
from service.streams import build_codec, registry_client, topic_kinds
from service.tools.cli import (
    kafka_errors,
)
from service.tools.dlq.cli import InspectOptions
from service.tools.dlq.letters import (
    InspectError,
    InspectUsageError,
    Letter,
    TopicSummary,
)
from service.tools.dlq.values import ValueReader, letter_json

# --- the Kafka side -----------------------------------------------------------------------------------------------


def _kafka_errors(what: str) -> contextlib.AbstractContextManager[None]:
    return kafka_errors(what, InspectError)


async def _partition_counts(settings: Settings) -> dict[str, int]:
    """Every topic's partition count (`list_partition_counts`: never by name, which may create a topic)."""
    admin = build_admin(settings.kafka, role="dlq")
    with _kafka_errors("cannot connect to Kafka"):
        await admin.start()
    try:
        with _kafka_errors("cannot read topic metadata"):
            return await list_partition_counts(admin)
    finally:
        await admin.close()


async def _scan(
    settings: Settings, partitions: list[TopicPartition], visit: Callable[[SourceRecord], None], idle_timeout_s: float
) -> None:
    """Every record of `partitions` up to the end offsets seen at start, in offset order per partition."""
    if not partitions:
        return
    consumer = build_reader(settings.kafka, role="dlq")
    with _kafka_errors("cannot start the dead-letter reader"):
        await consumer.start()
    try:
        with _kafka_errors("reading the dead-letter topics failed"):
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
            remaining = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
            loop = asyncio.get_running_loop()
            last_progress = loop.time()
            while remaining:
                batch: dict[TopicPartition, list[Any]] = await consumer.getmany(*remaining, timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        if record.offset < ends[tp]:
                            visit(to_source_record(record))
                if any(batch.values()):
                    last_progress = loop.time()
                elif loop.time() - last_progress > idle_timeout_s:
                    raise InspectError(
                        f"no records from {sorted(f'{tp.topic}[{tp.partition}]' for tp in remaining)} for "
                        f"{idle_timeout_s:.0f}s although they are behind their end offsets"
                    )
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
                        consumer.pause(tp)
    finally:
        await consumer.stop()


@dataclass(slots=True)
class Report:
    summaries: list[TopicSummary]
    letters: list[dict[str, Any]]
    """The shown dead letters as `letter_json` made them, most recent last."""
    now_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"topics": [s.to_json() for s in self.summaries], "records": self.letters}


async def inspect(settings: Settings, options: InspectOptions, *, now_ms: int | None = None) -> Report:
    """Read the dead-letter topics once and build the report (nothing redacted yet: `render` does that)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    configured = list(topic_kinds(settings.topics))
    names = list(options.topics) or list(dict.fromkeys(settings.topics.dead_letter_topic(t) for t in configured))
    counts = await _partition_counts(settings)
    missing = [name for name in options.topics if name not in counts]
    if missing:
        raise InspectUsageError(f"dead-letter topic(s) {', '.join(map(repr, missing))} do not exist")
    summaries = {name: TopicSummary(name, exists=name in counts) for name in names}
    shown: list[tuple[int, str, int, int, Letter]] = []  # a min-heap: the N most recent matching letters

    def visit(record: SourceRecord) -> None:
        summary = summaries[record.topic]
        summary.read += 1
        letter = Letter.of(record)
        if not options.filter.matches(letter):
            return
        summary.add(letter, now)
        if options.show:
            entry = (letter.failed_at_ms or -1, record.topic, record.partition, record.offset, letter)
            if len(shown) < options.show:
                heapq.heappush(shown, entry)
            else:
                heapq.heappushpop(shown, entry)

    partitions = [TopicPartition(name, p) for name in names for p in range(counts.get(name, 0))]
    await _scan(settings, partitions, visit, options.idle_timeout_s)
    letters = [entry[-1] for entry in sorted(shown, key=lambda e: e[:4])]
    return Report(list(summaries.values()), await _describe(settings, letters), now)


async def _describe(settings: Settings, letters: list[Letter]) -> list[dict[str, Any]]:
    if not letters:
        return []
    registry_http = registry_client(settings)
    try:
        reader = ValueReader(build_codec(settings, registry_http), topic_kinds(settings.topics))
        return [letter_json(letter, await reader.read(letter.source_topic, letter.record.value)) for letter in letters]
    finally:
        if registry_http is not None:
            await registry_http.aclose()
