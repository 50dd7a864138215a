"""Dead letters: the original record plus the evidence of what went wrong, acknowledged before commit.

The DLQ record keeps the source's key, value bytes, headers and timestamp untouched, so a replay
re-produces exactly what the producer wrote. Kafka Connect's `__connect.errors.*` headers carry
the context (existing DLQ tooling reads them) and `bridge.*` headers the HTTP evidence and a stable
reason code. It goes to the same partition number when the DLQ has that many partitions, and the
write is awaited with acks=all: an unacknowledged dead letter is a lost record, so a write that
keeps failing is fatal for the service, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from service.core.errors import BridgeError, DeadLetterWriteError, RecordError, RejectedError
from service.core.records import SourceRecord
from service.ops.redaction import Redactor

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.deadletter")

_MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


class DeadLetterProducer(Protocol):
    """The slice of a Kafka producer the writer needs; `send` returns when the broker acknowledged."""

    async def send(self, letter: DeadLetter) -> None: ...

    async def partition_count(self, topic: str) -> int: ...


SOURCE_TOPIC_HEADER = "__connect.errors.topic"
SOURCE_PARTITION_HEADER = "__connect.errors.partition"
SOURCE_OFFSET_HEADER = "__connect.errors.offset"
REASON_HEADER = "bridge.reason"
"""Headers the replay command reads back, so they are named once, here where they are written."""


def build_dead_letter(
    record: SourceRecord,
    error: RecordError,
    *,
    dlq_topic: str,
    dlq_partitions: int,
    group_id: str,
    redact: Redactor,
    now_ms: int,
) -> DeadLetter:
    context = [
        (SOURCE_TOPIC_HEADER, record.topic),
        (SOURCE_PARTITION_HEADER, str(record.partition)),
        (SOURCE_OFFSET_HEADER, str(record.offset)),
        ("__connect.errors.connector.name", group_id),
        ("__connect.errors.stage", error.stage.value),
        ("__connect.errors.class.name", "inference-bridge"),
        ("__connect.errors.exception.class.name", type(error).__name__),
        ("__connect.errors.exception.message", redact(str(error))[:_MAX_MESSAGE_CHARS]),
        (REASON_HEADER, error.reason),
        ("bridge.failed.at.ms", str(now_ms)),
    ]
    if isinstance(error, RejectedError):
        evidence = error.evidence
        context += [
            ("bridge.http.method", evidence.method),
            ("bridge.http.url", redact(evidence.url)),
            ("bridge.http.status", "" if evidence.status is None else str(evidence.status)),
            ("bridge.http.attempts", str(evidence.attempts)),
            ("bridge.http.response.body", redact(evidence.body)),
        ]
        context += [(f"bridge.http.response.header.{k}", redact(v)) for k, v in evidence.headers.items()]
    headers = record.headers + tuple((name, value.encode()) for name, value in context)
    return DeadLetter(
        topic=dlq_topic,
        partition=record.partition if record.partition < dlq_partitions else None,
        key=record.key,
        value=record.value,
        headers=headers,
        timestamp_ms=record.timestamp_ms,
    )


class DeadLetterWriter:
    """Builds and sends dead letters, retrying the write a bounded number of times."""

    def __init__(
        self,
        producer: DeadLetterProducer,
        *,
        topic_for: Callable[[str], str],
        group_id: str,
        redact: Redactor,
        attempts: int,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._producer = producer
        self._topic_for = topic_for
        self._group_id = group_id
        self._redact = redact
        self._attempts = attempts
        self._clock_ms = clock_ms
        self._partitions: dict[str, int] = {}

    async def prepare(self, topics: Iterable[str]) -> None:
        """Check at start-up that every DLQ exists (or is auto-created): fail now, not on the first bad record."""
        for topic in topics:
            dlq = self._topic_for(topic)
            try:
                self._partitions[dlq] = await self._producer.partition_count(dlq)
            except BridgeError as exc:
                raise DeadLetterWriteError(f"dead-letter topic {dlq!r} is not usable: {exc}") from exc

    async def write(self, record: SourceRecord, error: RecordError) -> None:
        dlq = self._topic_for(record.topic)
        letter = build_dead_letter(
            record,
            error,
            dlq_topic=dlq,
            dlq_partitions=self._partitions.get(dlq, 0),
            group_id=self._group_id,
            redact=self._redact,
            now_ms=self._clock_ms(),
        )
        for attempt in range(1, self._attempts + 1):
            try:
                await self._producer.send(letter)
                return
            except BridgeError as exc:
                log.warning(
                    "dead-letter write failed",
                    extra={"topic": dlq, "attempt": attempt, "error": str(exc)},
                )
                if attempt == self._attempts:
                    raise DeadLetterWriteError(
                        f"dead letter for {record.topic}-{record.partition}@{record.offset} not acknowledged "
                        f"by {dlq!r} after {attempt} attempts: {exc}"
                    ) from exc
                await asyncio.sleep(min(2.0**attempt, 30.0))
