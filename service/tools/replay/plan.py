"""What to do with one dead letter, as pure functions: read its headers, decide, and rewrite them for the replay.

The dead-letter evidence (`__connect.errors.*`, `bridge.*`) is stripped and `bridge.replay.count` is carried
forward plus one, so a record that keeps failing is refused after `--max-replays` rounds instead of cycling.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from service.core.records import SourceRecord
from service.kafka.deadletter import REASON_HEADER, SOURCE_OFFSET_HEADER, SOURCE_PARTITION_HEADER, SOURCE_TOPIC_HEADER
from service.tools.cli import Headers, header_text, last_header

EVIDENCE_PREFIXES = ("__connect.errors.", "bridge.")
REPLAY_COUNT_HEADER = "bridge.replay.count"
DEFAULT_MAX_REPLAYS = 3


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


class Action(StrEnum):
    """What a replay does with one dead letter."""

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
    action: Action
    detail: str
    replay: Replay | None = None


def plan(letter: SourceRecord, *, reasons: frozenset[str], max_replays: int) -> Decision:
    """What to do with one dead letter. The filter comes first: a record the operator did not ask for is
    skipped whatever state it is in, so refusals only report records the operator wanted replayed."""
    headers = letter.headers
    reason = header_text(last_header(headers, REASON_HEADER))
    if reasons and reason not in reasons:
        return Decision(Action.SKIP, f"reason {reason!r} not selected")
    topic = header_text(last_header(headers, SOURCE_TOPIC_HEADER))
    if not topic:
        return Decision(Action.REFUSE, f"no {SOURCE_TOPIC_HEADER} header: the source topic is unknown")
    count = replay_count(headers)
    if count is None:
        return Decision(Action.REFUSE, f"unreadable {REPLAY_COUNT_HEADER} header")
    if count >= max_replays:
        return Decision(Action.REFUSE, f"replayed {count} times already (--max-replays {max_replays})")
    replay = Replay(
        topic=topic,
        partition=source_partition(headers),
        key=letter.key,
        value=letter.value,
        headers=replay_headers(headers, count + 1),
        timestamp_ms=letter.timestamp_ms,
        count=count + 1,
    )
    return Decision(Action.REPLAY, f"reason {reason!r}", replay)


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
