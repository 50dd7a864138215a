"""Dead-letter inspection: what sits in a DLQ, why, since when, and what the records hold. Read-only.

`python -m service dlq` reads dead-letter topics (the three configured topics' DLQs, or `--from`) from their
beginning to the end offsets seen at start, with a consumer that has no group: it is assigned the partitions
and never commits, so it moves no group's position (neither the bridge's nor a replay's). Topics are looked
up by listing them, never by name, because a metadata request that names a topic creates it on brokers that
auto-create. It summarises by reason, stage, HTTP status, source topic and age (from `bridge.failed.at.ms`);
`--show N` prints the N most recent dead letters with their value decoded from Avro to JSON through the
service's own codec and the source topic's schema (hex when it does not decode), every header and the HTTP
evidence. Headers were redacted when written; everything printed passes through the redactor again, with the
secrets configured now. Reading a header is pure (`Letter.of`); Kafka is touched only by `_scan`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from service.avro.codec import AvroCodec
from service.avro.registry import SchemaRegistry
from service.config.settings import Settings
from service.core.errors import BridgeError, FatalError
from service.core.events import EventKind
from service.core.records import SourceRecord
from service.kafka.clients import build_reader, security_options, to_source_record
from service.kafka.deadletter import (
    REASON_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    Redactor,
)
from service.streams import schema_set, topic_kinds
from service.tools.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CommandParser,
    Headers,
    ParserExit,
    header_text,
    kafka_errors,
    last_header,
    non_empty,
    whole_number,
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


def _int_of(value: bytes | None) -> int | None:
    text = header_text(value)
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


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
            source_partition=_int_of(last_header(h, SOURCE_PARTITION_HEADER)),
            source_offset=_int_of(last_header(h, SOURCE_OFFSET_HEADER)),
            failed_at_ms=_int_of(last_header(h, FAILED_AT_HEADER)),
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
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


# --- the --since argument ---------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_DURATIONS = re.compile(r"(?:\d+(?:ms|s|m|h|d|w))+")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_since(text: str, now_ms: int) -> int:
    """`30m`, `2h`, `1d12h` (that long ago) or an ISO-8601 time (`2026-11-29T10:00:00Z`, a date, an offset) as
    epoch milliseconds; a time without a zone is UTC. Raises ValueError."""
    text = text.strip()
    if _DURATIONS.fullmatch(text):
        seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))
        return now_ms - int(seconds * 1000)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 2h, 7d) nor an ISO-8601 time (2026-11-29T10:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# --- values: Avro to JSON through the service's codec -------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """An Avro datum as JSON: bytes as hex, non-finite floats as text (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class ValueReader:
    """Reads a dead letter's value as the bridge did: the source topic's event kind, the codec's framing rule
    (plain or Confluent), the shipped reader schema and, for Confluent values, the registry's writer schema."""

    def __init__(self, codec: AvroCodec, kinds: Mapping[str, EventKind]) -> None:
        self._codec = codec
        self._kinds = kinds

    async def read(self, source_topic: str | None, value: bytes | None) -> dict[str, Any]:
        if value is None:
            return {"encoding": "none", "note": "no value (a tombstone)"}
        kind = self._kinds.get(source_topic or "")
        if kind is None:
            note = f"source topic {source_topic!r} is not one of the configured topics, so its schema is unknown"
            return _hex(value, note)
        codec = self._codec
        try:
            # The codec has no public call that stops before building an event; these are its own framing and
            # reading steps, so a value shown here is read exactly as the bridge read it (strict, to the last byte).
            if value and codec._is_confluent(kind, value):
                datum = await codec._read_confluent(kind, value)
                wire = "confluent"
            else:
                datum = codec._read(kind, value, codec._schemas.reader(kind), None, framed=False)
                wire = "plain"
        except BridgeError as exc:  # DecodeError, or RegistryUnavailable: show the bytes and say why, in short
            return _hex(value, f"does not decode with the {kind.value} schema: {exc.reason}")
        return {"encoding": "avro", "schema": kind.value, "wire_format": wire, "datum": jsonable(datum)}


def _hex(value: bytes, note: str) -> dict[str, Any]:
    return {"encoding": "hex", "bytes": len(value), "hex": value.hex(), "note": note}


# --- one dead letter as JSON and as text ------------------------------------------------------------------------


def http_evidence(headers: Headers) -> dict[str, Any] | None:
    """The `bridge.http.*` headers as one object, or None when the record never reached an API."""
    method = header_text(last_header(headers, "bridge.http.method"))
    if method is None:
        return None
    response_headers = {
        name.removeprefix(HTTP_RESPONSE_HEADER_PREFIX): header_text(value) or value.hex()
        for name, value in headers
        if name.startswith(HTTP_RESPONSE_HEADER_PREFIX)
    }
    return {
        "method": method,
        "url": header_text(last_header(headers, "bridge.http.url")),
        "status": _int_of(last_header(headers, "bridge.http.status")),
        "attempts": _int_of(last_header(headers, "bridge.http.attempts")),
        "response_headers": response_headers,
        "response_body": header_text(last_header(headers, "bridge.http.response.body")),
    }


def letter_json(letter: Letter, value: dict[str, Any]) -> dict[str, Any]:
    r = letter.record
    return {
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "reason": letter.reason,
        "stage": letter.stage,
        "failed_at": iso_ms(letter.failed_at_ms),
        "source": {"topic": letter.source_topic, "partition": letter.source_partition, "offset": letter.source_offset},
        "timestamp": iso_ms(r.timestamp_ms),
        "key": None if r.key is None else readable_bytes(r.key),
        "error": {
            "class": header_text(last_header(r.headers, EXCEPTION_CLASS_HEADER)),
            "message": header_text(last_header(r.headers, EXCEPTION_MESSAGE_HEADER)),
        },
        "http": http_evidence(r.headers),
        "headers": [{"name": name, **readable_bytes(value)} for name, value in r.headers],
        "value": value,
    }


def letter_text(item: Mapping[str, Any], now_ms: int) -> list[str]:
    """A dead letter as `letter_json` made it, for a person."""
    failed = item["failed_at"]
    age = ""
    if failed is not None:
        failed_ms = int(datetime.fromisoformat(failed.replace("Z", "+00:00")).timestamp() * 1000)
        age = f" ({human_age((now_ms - failed_ms) / 1000)} ago)"
    source = item["source"]
    lines = [
        f"--- {item['topic']}[{item['partition']}]@{item['offset']}  reason={item['reason'] or NONE}  "
        f"stage={item['stage'] or NONE}  failed={failed or NONE}{age}",
        f"source:    {source['topic'] or NONE}[{_or_none(source['partition'])}]@{_or_none(source['offset'])}  "
        f"timestamp={item['timestamp']}  key={_bytes_text(item['key'])}",
        f"error:     {item['error']['class'] or NONE}: {item['error']['message'] or NONE}",
    ]
    http = item["http"]
    if http is not None:
        lines.append(
            f"http:      {http['method']} {http['url']} -> {_or_none(http['status'])} "
            f"after {_or_none(http['attempts'])} attempt(s)"
        )
        lines += [f"           response header {k}: {v}" for k, v in http["response_headers"].items()]
        lines.append(f"           response body: {http['response_body'] or ''}")
    lines.append("headers:")
    lines += [f"  {h['name']}: {_bytes_text(h)}" for h in item["headers"]] or ["  (none)"]
    value = item["value"]
    if value["encoding"] == "avro":
        lines.append(f"value:     {value['schema']} ({value['wire_format']} Avro) as JSON:")
        lines += ["  " + line for line in json.dumps(value["datum"], indent=2, ensure_ascii=False).splitlines()]
    elif value["encoding"] == "hex":
        lines.append(f"value:     {value['bytes']} bytes as hex ({value['note']}):")
        shown = value["hex"][: 2 * MAX_HEX_BYTES]
        more = value["bytes"] - len(shown) // 2
        lines.append("  " + shown + (f" ... ({more} more bytes; --json has them all)" if more > 0 else ""))
    else:
        lines.append(f"value:     {value['note']}")
    return lines


def _or_none(value: Any) -> str:
    return NONE if value is None else str(value)


def _bytes_text(value: Mapping[str, Any] | None) -> str:
    if value is None:
        return "null"
    if "hex" in value:
        return f"0x{value['hex']}"
    text: str = value["text"]
    # As it is when that is unambiguous; quoted (JSON) when blanks at the ends or control characters would hide.
    return text if text and text.isprintable() and text == text.strip() else json.dumps(text, ensure_ascii=False)


def summary_text(summary: TopicSummary, now_ms: int, filtered: bool) -> list[str]:
    if not summary.exists:
        return [f"{summary.topic}: does not exist"]
    of = f" (of {summary.read} read)" if filtered else ""
    if not summary.matched:
        return [f"{summary.topic}: no dead letters{' match' if filtered else ''}{of}"]
    head = f"{summary.topic}: {summary.matched} dead letter{'s' if summary.matched != 1 else ''}{of}"
    if summary.oldest_failed_at_ms is not None and summary.newest_failed_at_ms is not None:
        oldest, newest = summary.oldest_failed_at_ms, summary.newest_failed_at_ms
        head += (
            f", failed from {iso_ms(oldest)} ({human_age((now_ms - oldest) / 1000)} ago)"
            f" to {iso_ms(newest)} ({human_age((now_ms - newest) / 1000)} ago)"
        )
    data = summary.to_json()
    rows = [
        ("reason", data["by_reason"]),
        ("stage", data["by_stage"]),
        ("http status", data["by_http_status"]),
        ("source topic", data["by_source_topic"]),
        ("age", data["by_age"]),
    ]
    return [head] + [f"  {name:<13} " + ", ".join(f"{k} {v}" for k, v in counts.items()) for name, counts in rows]


def redact_all(value: Any, redact: Redactor) -> Any:
    """Every string of a JSON-like value through the redactor (before serialising, so escaping cannot hide one)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): redact_all(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_all(v, redact) for v in value]
    return value


# --- options and the command line -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InspectOptions:
    topics: tuple[str, ...]
    """Dead-letter topics to read; empty: the DLQs of the three configured topics."""
    filter: Filter = Filter()
    show: int = 0
    as_json: bool = False
    idle_timeout_s: float = 30.0
    """Give up when partitions behind their end offset deliver nothing for this long (broker gone)."""


_DESCRIPTION = """\
Summarise dead-letter topics by reason, stage, HTTP status, source topic and age, and with --show N print the
N most recent dead letters: the value decoded from Avro to JSON with the source topic's schema (hex when it
does not decode), every header and the HTTP evidence. Read-only: reads without a consumer group, from the
beginning to the end offsets seen at start, and commits nothing."""

_EPILOG = """\
--since takes a duration (30m, 2h, 7d: that long ago) or an ISO-8601 time (2026-11-29T10:00:00Z) and compares it
with bridge.failed.at.ms, when the record was dead-lettered. Then re-drive what you fixed with
`python -m service replay --from TOPIC --reason REASON`.
Exit codes: 0 done, 1 Kafka failed, 2 bad arguments or a named topic that does not exist."""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        usage_error=InspectUsageError,
        prog="python -m service dlq",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from",
        dest="topics",
        action="append",
        type=non_empty,
        default=[],
        metavar="TOPIC",
        help="dead-letter topic (repeatable; default: the DLQs of the three configured topics)",
    )
    parser.add_argument(
        "--reason",
        dest="reasons",
        action="append",
        type=non_empty,
        default=[],
        metavar="REASON",
        help="only dead letters with this bridge.reason (repeatable)",
    )
    parser.add_argument(
        "--since", metavar="WHEN", help="only dead letters dead-lettered since WHEN (30m, 2h, an ISO time)"
    )
    parser.add_argument(
        "--show",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="print the N most recent matching dead letters in full",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="one JSON object on stdout, for scripts")
    return parser


def parse_options(argv: Sequence[str], *, now_ms: int) -> InspectOptions:
    """Raises `InspectUsageError` on bad arguments and `ParserExit` after --help."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    since_ms = None
    if args.since is not None:
        try:
            since_ms = parse_since(args.since, now_ms)
        except ValueError as exc:
            parser.error(f"argument --since: {exc}")
    return InspectOptions(
        topics=tuple(dict.fromkeys(args.topics)),
        filter=Filter(reasons=frozenset(args.reasons), since_ms=since_ms),
        show=args.show,
        as_json=args.as_json,
    )


# --- the Kafka side -----------------------------------------------------------------------------------------------


def _kafka_errors(what: str) -> contextlib.AbstractContextManager[None]:
    return kafka_errors(what, InspectError)


async def _partition_counts(settings: Settings) -> dict[str, int]:
    """Every topic's partition count, from a listing: naming a topic in a metadata request may create it."""
    kafka = settings.kafka
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers, client_id=f"{kafka.client_id}-dlq", **security_options(kafka)
    )
    with _kafka_errors("cannot connect to Kafka"):
        await admin.start()
    try:
        with _kafka_errors("cannot read topic metadata"):
            described: list[dict[str, Any]] = await admin.describe_topics()
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


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
    kinds = topic_kinds(settings.topics)
    sr = settings.schema_registry
    d = settings.delivery
    async with httpx.AsyncClient(timeout=httpx.Timeout(d.read_timeout_s, connect=d.connect_timeout_s)) as client:
        registry = None
        if sr.url is not None:
            password = sr.password.get_secret_value() if sr.password else None
            registry = SchemaRegistry(client, sr.url, username=sr.username, password=password)
        reader = ValueReader(AvroCodec(schema_set(settings.schemas_dir), registry, sr.wire_format), kinds)
        return [letter_json(letter, await reader.read(letter.source_topic, letter.record.value)) for letter in letters]


def render(report: Report, options: InspectOptions, redact: Redactor) -> str:
    """What the command prints, every string redacted."""
    if options.as_json:
        return json.dumps(redact_all(report.to_json(), redact), ensure_ascii=False, indent=2)
    filtered = bool(options.filter.reasons) or options.filter.since_ms is not None
    lines: list[str] = []
    for summary in report.summaries:
        lines += summary_text(summary, report.now_ms, filtered)
    for item in redact_all(report.letters, redact):
        lines.append("")
        lines += letter_text(item, report.now_ms)
    return "\n".join(redact(line) for line in lines)


def main(argv: list[str], settings: Settings, redact: Redactor) -> int:
    """`python -m service dlq ...`: prints the report and returns the exit code."""
    try:
        options = parse_options(argv, now_ms=int(time.time() * 1000))
        report = asyncio.run(inspect(settings, options))
    except ParserExit as exc:
        return exc.status
    except InspectUsageError as exc:
        print(f"dlq: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        print(f"dlq: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    print(render(report, options, redact))
    return EXIT_OK
