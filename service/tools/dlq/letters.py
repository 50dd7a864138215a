"""A dead letter read back from its headers, the filter over them, and the per-topic summary: pure, no Kafka."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.core.errors import BridgeError, FatalError
from service.core.records import SourceRecord
from service.kafka.deadletter import REASON_HEADER, SOURCE_OFFSET_HEADER, SOURCE_PARTITION_HEADER, SOURCE_TOPIC_HEADER
from service.tools.cli import (
    header_text,
    last_header,
)

STAGE_HEADER = "__connect.errors.stage"
EXCEPTION_CLASS_HEADER = "__connect.errors.exception.class.name"
EXCEPTION_MESSAGE_HEADER = "__connect.errors.exception.message"
FAILED_AT_HEADER = "bridge.failed.at.ms"
HTTP_PREFIX = "bridge.http."
HTTP_RESPONSE_HEADER_PREFIX = "bridge.http.response.header."

MAX_HEX_BYTES = 512
"""Of an undecodable value, how many bytes the text output shows (--json shows all)."""

NONE = "-"
"""How a missing dimension (no HTTP status for a decode failure, no header at all) is counted."""

AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<1h", 3600.0),
    ("1h-1d", 86400.0),
    ("1d-7d", 7 * 86400.0),
    (">=7d", math.inf),
)
UNKNOWN_AGE = "unknown"


class InspectUsageError(BridgeError):
    """Bad arguments, or a named topic that does not exist; nothing was read."""

    reason = "dlq-usage"


class InspectError(FatalError):
    """Kafka failed while reading."""

    reason = "dlq-read-failed"


# --- pure: a dead letter's headers -------------------------------------------------------------------------------


def header_int(value: bytes | None) -> int | None:
    text = header_text(value)
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


def header_time_ms(value: bytes | None) -> int | None:
    """Epoch milliseconds from a header; a time no date can show (a garbled header) is unknown, as a missing one."""
    ms = header_int(value)
    return ms if ms is not None and iso_ms(ms) is not None else None


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter, with the evidence the bridge wrote in its headers read back."""

    record: SourceRecord
    reason: str | None
    stage: str | None
    http_status: str | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    failed_at_ms: int | None

    @classmethod
    def of(cls, record: SourceRecord) -> Letter:
        h = record.headers
        status = header_text(last_header(h, "bridge.http.status"))
        return cls(
            record=record,
            reason=header_text(last_header(h, REASON_HEADER)),
            stage=header_text(last_header(h, STAGE_HEADER)),
            http_status=status or None,  # written as "" when no response arrived
            source_topic=header_text(last_header(h, SOURCE_TOPIC_HEADER)),
            source_partition=header_int(last_header(h, SOURCE_PARTITION_HEADER)),
            source_offset=header_int(last_header(h, SOURCE_OFFSET_HEADER)),
            failed_at_ms=header_time_ms(last_header(h, FAILED_AT_HEADER)),
        )

    @property
    def where(self) -> str:
        r = self.record
        return f"{r.topic}[{r.partition}]@{r.offset}"


@dataclass(frozen=True, slots=True)
class Filter:
    reasons: frozenset[str] = frozenset()
    since_ms: int | None = None
    """Only letters dead-lettered at or after this time; letters without `bridge.failed.at.ms` are left out."""

    def matches(self, letter: Letter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.since_ms is not None:
            return letter.failed_at_ms is not None and letter.failed_at_ms >= self.since_ms
        return True


NO_FILTER = Filter()
"""Every dead letter matches."""


def age_bucket(failed_at_ms: int | None, now_ms: int) -> str:
    if failed_at_ms is None:
        return UNKNOWN_AGE
    age_s = max(0, now_ms - failed_at_ms) / 1000
    return next(name for name, limit in AGE_BUCKETS if age_s < limit)


@dataclass(slots=True)
class TopicSummary:
    """Counts for one dead-letter topic; `read` counts every letter, the rest only those the filter kept."""

    topic: str
    exists: bool = True
    read: int = 0
    matched: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_stage: Counter[str] = field(default_factory=Counter)
    by_http_status: Counter[str] = field(default_factory=Counter)
    by_source_topic: Counter[str] = field(default_factory=Counter)
    by_age: Counter[str] = field(default_factory=Counter)
    oldest_failed_at_ms: int | None = None
    newest_failed_at_ms: int | None = None

    def add(self, letter: Letter, now_ms: int) -> None:
        self.matched += 1
        self.by_reason[letter.reason or NONE] += 1
        self.by_stage[letter.stage or NONE] += 1
        self.by_http_status[letter.http_status or NONE] += 1
        self.by_source_topic[letter.source_topic or NONE] += 1
        self.by_age[age_bucket(letter.failed_at_ms, now_ms)] += 1
        at = letter.failed_at_ms
        if at is not None:
            self.oldest_failed_at_ms = at if self.oldest_failed_at_ms is None else min(self.oldest_failed_at_ms, at)
            self.newest_failed_at_ms = at if self.newest_failed_at_ms is None else max(self.newest_failed_at_ms, at)

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "exists": self.exists,
            "read": self.read,
            "matched": self.matched,
            "by_reason": _ordered(self.by_reason),
            "by_stage": _ordered(self.by_stage),
            "by_http_status": _ordered(self.by_http_status),
            "by_source_topic": _ordered(self.by_source_topic),
            "by_age": {name: self.by_age[name] for name in _age_names() if self.by_age[name]},
            "oldest_failed_at": iso_ms(self.oldest_failed_at_ms),
            "newest_failed_at": iso_ms(self.newest_failed_at_ms),
        }


def _age_names() -> list[str]:
    return [name for name, _ in AGE_BUCKETS] + [UNKNOWN_AGE]


def _ordered(counts: Counter[str]) -> dict[str, int]:
    """Most frequent first, ties by name: the same order for every run over the same letters."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def iso_ms(ms: int | None) -> str | None:
    """The time as ISO-8601 UTC; None for none, and for one outside the years 1-9999 (a record's timestamp is any
    64-bit number its producer chose)."""
    if ms is None:
        return None
    try:
        moment = datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_age(seconds: float) -> str:
    """3d4h, 5h12m, 7m3s, 42s: two units at most, enough to tell old from new."""
    s = int(max(0.0, seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def readable_bytes(value: bytes) -> dict[str, str]:
    """UTF-8 text as text, anything else as hex."""
    text = header_text(value)
    return {"text": text} if text is not None else {"hex": value.hex()}
