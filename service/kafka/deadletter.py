"""Dead letters: the original record plus the evidence of what went wrong, acknowledged before commit.

The DLQ record keeps the source's key, value bytes, headers and timestamp untouched, so a replay
re-produces exactly what the producer wrote. Kafka Connect's `__connect.errors.*` headers carry
the context (existing DLQ tooling reads them) and `bridge.*` headers the HTTP evidence and a stable
reason code. It goes to the same partition number when the DLQ has that many partitions, and the
write is awaited with acks=all: an unacknowledged dead letter is a lost record, so a write that
keeps failing is fatal for the service, never skipped. A letter too large for the producer or the topic is
sent again at once with its evidence trimmed (no response body, a short message); one still too large (its
value alone is) is fatal with the sizes to raise, never dropped.
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
_TRIMMED_MESSAGE_CHARS = 200
"""A trimmed letter's message: enough for the exception's first line, the rest is in the service's log."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int


class DeadLetterTooLarge(BridgeError):
    """The producer or the broker refused the letter for its size: sending it again as it is cannot help."""

    reason = "dlq-letter-too-large"

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        """The letter's size in bytes, key, value and headers, as the producer counts it."""
        self.limit = limit
        """The producer's largest request, in bytes."""


class DeadLetterProducer(Protocol):
    """The slice of a Kafka producer the writer needs; `send` returns when the broker acknowledged, and raises
    `DeadLetterTooLarge` for a letter over the producer's or the topic's size limit."""

    async def send(self, letter: DeadLetter) -> None: ...

    async def partition_count(self, topic: str) -> int: ...


SOURCE_TOPIC_HEADER = "__connect.errors.topic"
SOURCE_PARTITION_HEADER = "__connect.errors.partition"
SOURCE_OFFSET_HEADER = "__connect.errors.offset"
REASON_HEADER = "bridge.reason"
RESPONSE_BODY_HEADER = "bridge.http.response.body"
TRIMMED_HEADER = "bridge.evidence.trimmed"
"""Present ("true") when the letter was too large with its full evidence: the response body was left out."""
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
    trimmed: bool = False,
) -> DeadLetter:
    """The letter for `record`; `trimmed` leaves out the response body and cuts the message short, for a letter
    that was too large with them (the reason, stage, status and source coordinates stay)."""
    message_chars = _TRIMMED_MESSAGE_CHARS if trimmed else _MAX_MESSAGE_CHARS
    context = [
        (SOURCE_TOPIC_HEADER, record.topic),
        (SOURCE_PARTITION_HEADER, str(record.partition)),
        (SOURCE_OFFSET_HEADER, str(record.offset)),
        ("__connect.errors.connector.name", group_id),
        ("__connect.errors.stage", error.stage.value),
        ("__connect.errors.class.name", "inference-bridge"),
        ("__connect.errors.exception.class.name", type(error).__name__),
        ("__connect.errors.exception.message", redact(str(error))[:message_chars]),
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
        ]
        if not trimmed:
            # Redacted before it is cut: a secret the API echoed across the cut would otherwise leave its
            # prefix, which the redactor no longer recognises (delivery keeps enough past the cut for this).
            body = evidence.body if evidence.body_window is None else evidence.body_window
            context.append((RESPONSE_BODY_HEADER, cut_utf8(redact(body), evidence.body_limit)))
        context += [(f"bridge.http.response.header.{k}", redact(v)) for k, v in evidence.headers.items()]
    if trimmed:
        context.append((TRIMMED_HEADER, "true"))
    # "replace": a lone surrogate (a client's undecodable header byte) must not make the letter unwritable.
    headers = record.headers + tuple((name, value.encode("utf-8", "replace")) for name, value in context)
    return DeadLetter(
        topic=dlq_topic,
        partition=record.partition if record.partition < dlq_partitions else None,
        key=record.key,
        value=record.value,
        headers=headers,
        timestamp_ms=record.timestamp_ms,
    )


def cut_utf8(text: str, limit: int | None) -> str:
    """At most `limit` bytes of `text` as UTF-8, without a broken character at the end; None keeps it whole."""
    if limit is None:
        return text
    return text.encode()[:limit].decode(errors="ignore")


def _where(record: SourceRecord) -> str:
    return f"{record.topic}-{record.partition}@{record.offset}"


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
        now_ms = self._clock_ms()
        try:
            await self._send(record, self._letter(record, error, dlq, now_ms, trimmed=False))
        except DeadLetterTooLarge as exc:
            log.warning(
                "dead letter too large, sending it with its evidence trimmed",
                extra={"topic": dlq, "size": exc.size, "limit": exc.limit, "error": str(exc)},
            )
            try:
                await self._send(record, self._letter(record, error, dlq, now_ms, trimmed=True))
            except DeadLetterTooLarge as again:
                raise DeadLetterWriteError(
                    f"dead letter for {_where(record)} is {again.size} bytes even with its evidence trimmed, "
                    f"more than {dlq!r} takes ({again}). Its value alone is {len(record.value or b'')} bytes: "
                    f"raise {dlq!r}'s max.message.bytes to at least {again.size} (the source topic's own limit "
                    f"is a good value), then restart; the bridge itself sends up to {again.limit} bytes"
                ) from again

    def _letter(self, record: SourceRecord, error: RecordError, dlq: str, now_ms: int, *, trimmed: bool) -> DeadLetter:
        return build_dead_letter(
            record,
            error,
            dlq_topic=dlq,
            dlq_partitions=self._partitions.get(dlq, 0),
            group_id=self._group_id,
            redact=self._redact,
            now_ms=now_ms,
            trimmed=trimmed,
        )

    async def _send(self, record: SourceRecord, letter: DeadLetter) -> None:
        """Send with bounded retries of what may be an outage; `DeadLetterTooLarge` goes to the caller at once."""
        for attempt in range(1, self._attempts + 1):
            try:
                await self._producer.send(letter)
                return
            except DeadLetterTooLarge:
                raise
            except BridgeError as exc:
                log.warning(
                    "dead-letter write failed",
                    extra={"topic": letter.topic, "attempt": attempt, "error": str(exc)},
                )
                if attempt == self._attempts:
                    raise DeadLetterWriteError(
                        f"dead letter for {_where(record)} not acknowledged "
                        f"by {letter.topic!r} after {attempt} attempts: {exc}"
                    ) from exc
                await asyncio.sleep(min(2.0**attempt, 30.0))
            except Exception as exc:
                # Not an outage (a refusal by the client library, a bug): retrying would fail the same way, and
                # an anonymous traceback would not say which record could not be dead-lettered.
                raise DeadLetterWriteError(
                    f"dead letter for {_where(record)} could not be sent to {letter.topic!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
