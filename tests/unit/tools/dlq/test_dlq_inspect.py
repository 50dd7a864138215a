"""`python -m service dlq` without Kafka: reading dead-letter headers back, filters, ages, values decoded through the
service's codec, the text and JSON output, and redaction of everything printed."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from service.avro.codec import AvroCodec
from service.avro.registry import ParsedSchema
from service.core.errors import DecodeError, HttpEvidence, RecordError, RejectedError, RouteError
from service.core.events import EventKind
from service.core.records import SourceRecord
from service.kafka.deadletter import build_dead_letter
from service.ops.redaction import Redactor
from service.streams import schema_set
from service.tools.cli import ParserExit
from service.tools.dlq.cli import InspectOptions, parse_options, parse_since
from service.tools.dlq.letters import Filter, InspectUsageError, Letter, TopicSummary, age_bucket, human_age
from service.tools.dlq.reader import Report
from service.tools.dlq.render import letter_text, render, summary_text
from service.tools.dlq.values import ValueReader, http_evidence, jsonable, letter_json
from tests.support import avro_io
from tests.support.avro_io import AvroEncoder

NOW_MS = 1_800_000_000_000
HOUR_MS = 3_600_000
ENCODER = AvroEncoder()
KINDS = {"inferences": EventKind.INFERENCE, "row-updates": EventKind.ROW_UPDATE, "log-updates": EventKind.LOG_UPDATE}
SECRET = "ol-secret-key-7f3a9c"
EVIDENCE = HttpEvidence(
    method="PATCH",
    url="https://humanloop.test/v4/logs?reference_id=ref-1",
    status=422,
    body='{"detail":"bad output"}',
    attempts=2,
    headers={"x-request-id": "req-1", "content-type": "application/json"},
)


def record(
    topic: str, value: bytes | None, *, offset: int = 7, headers: tuple[tuple[str, bytes | None], ...] = ()
) -> SourceRecord:
    return SourceRecord(topic, 1, offset, b"key-1", value, headers, NOW_MS - 5 * HOUR_MS)


def dead(source: SourceRecord, error: RecordError, *, failed_at_ms: int = NOW_MS - HOUR_MS // 2) -> SourceRecord:
    """The dead letter the bridge writes for `source`, as the DLQ consumer reads it back."""
    letter = build_dead_letter(
        source,
        error,
        dlq_topic=source.topic + ".dlq",
        dlq_partitions=3,
        group_id="bridge",
        redact=Redactor([SECRET]),
        now_ms=failed_at_ms,
    )
    return SourceRecord(letter.topic, 1, 40, letter.key, letter.value, letter.headers, letter.timestamp_ms)


def log_value(i: int = 1) -> bytes:
    return ENCODER.plain("log_update", avro_io.log_update(f"ref-{i}", output=f"Paris {i}", duration=1.5))


def reader() -> ValueReader:
    return ValueReader(AvroCodec(schema_set()), KINDS)


# --- headers read back -------------------------------------------------------------------------------------------


def test_a_rejected_record_reads_back_with_its_evidence() -> None:
    letter = Letter.of(dead(record("log-updates", log_value()), RejectedError("422", EVIDENCE, reason="http-422")))
    assert letter.reason == "http-422"
    assert letter.stage == "TASK_PUT"
    assert letter.http_status == "422"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == ("log-updates", 1, 7)
    assert letter.failed_at_ms == NOW_MS - HOUR_MS // 2
    assert letter.where == "log-updates.dlq[1]@40"
    assert http_evidence(letter.record.headers) == {
        "method": "PATCH",
        "url": EVIDENCE.url,
        "status": 422,
        "attempts": 2,
        "response_headers": {"x-request-id": "req-1", "content-type": "application/json"},
        "response_body": '{"detail":"bad output"}',
    }


def test_a_decode_failure_has_no_http_status_and_no_evidence() -> None:
    letter = Letter.of(dead(record("inferences", b"\x01garbage"), DecodeError("bad bytes", reason="garbage-bytes")))
    assert (letter.reason, letter.stage, letter.http_status) == ("garbage-bytes", "VALUE_CONVERTER", None)
    assert http_evidence(letter.record.headers) is None


def test_a_record_without_bridge_headers_reads_as_unknown() -> None:
    letter = Letter.of(record("elsewhere.dlq", b"x", headers=(("bridge.failed.at.ms", b"soon"),)))
    assert (letter.reason, letter.stage, letter.source_topic, letter.failed_at_ms) == (None, None, None, None)


def test_the_last_header_wins_over_an_original_header_of_the_same_name() -> None:
    source = record("log-updates", log_value(), headers=(("bridge.reason", b"forged"),))
    assert Letter.of(dead(source, RouteError("no config", reason="no-config"))).reason == "no-config"


# --- filters and ages --------------------------------------------------------------------------------------------


def test_filters_by_reason_and_by_dead_letter_time() -> None:
    recent = Letter.of(
        dead(record("inferences", b"x"), RouteError("r", reason="no-config"), failed_at_ms=NOW_MS - 1000)
    )
    old = Letter.of(
        dead(record("inferences", b"x"), RouteError("r", reason="no-config"), failed_at_ms=NOW_MS - 3 * HOUR_MS)
    )
    undated = Letter.of(record("inferences.dlq", b"x", headers=(("bridge.reason", b"no-config"),)))
    assert Filter().matches(old)
    assert Filter().matches(undated)
    assert Filter(reasons=frozenset({"no-config"})).matches(recent)
    assert not Filter(reasons=frozenset({"http-422"})).matches(recent)
    since = Filter(since_ms=NOW_MS - HOUR_MS)
    assert since.matches(recent)
    assert not since.matches(old)
    assert not since.matches(undated), "a letter without bridge.failed.at.ms cannot be placed in time"


@pytest.mark.parametrize(
    ("age_ms", "bucket"),
    [(0, "<1h"), (HOUR_MS - 1, "<1h"), (HOUR_MS, "1h-1d"), (24 * HOUR_MS, "1d-7d"), (7 * 24 * HOUR_MS, ">=7d")],
)
def test_age_buckets(age_ms: int, bucket: str) -> None:
    assert age_bucket(NOW_MS - age_ms, NOW_MS) == bucket


def test_age_of_a_letter_without_time_is_unknown_and_a_future_one_is_new() -> None:
    assert age_bucket(None, NOW_MS) == "unknown"
    assert age_bucket(NOW_MS + 5000, NOW_MS) == "<1h"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW_MS - 30 * 60_000),
        ("2h", NOW_MS - 2 * HOUR_MS),
        ("1d12h", NOW_MS - 36 * HOUR_MS),
        ("90s", NOW_MS - 90_000),
        ("2027-01-15T08:00:00Z", NOW_MS),
    ],
)
def test_since_takes_durations_and_iso_times(text: str, expected: int) -> None:
    assert parse_since(text, NOW_MS) == expected


def test_since_takes_iso_times_with_and_without_a_zone() -> None:
    assert parse_since("2027-01-15T08:00:00Z", NOW_MS) == parse_since("2027-01-15T08:00:00", NOW_MS)
    assert parse_since("2027-01-15T09:00:00+01:00", NOW_MS) == parse_since("2027-01-15T08:00:00Z", NOW_MS)
    assert parse_since("2027-01-15", NOW_MS) == parse_since("2027-01-15T00:00:00Z", NOW_MS)


@pytest.mark.parametrize("text", ["yesterday", "10", "5 minutes", "-2h", ""])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(text, NOW_MS)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (42.9, "42s"), (423, "7m3s"), (18720, "5h12m"), (273600, "3d4h"), (-5, "0s")]
)
def test_human_age(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


# --- options -----------------------------------------------------------------------------------------------------


def test_options_default_to_the_configured_dlqs_and_a_summary_only() -> None:
    options = parse_options([], now_ms=NOW_MS)
    assert options == InspectOptions(topics=())


def test_options_are_parsed() -> None:
    argv = ["--from", "a.dlq", "--from", "b.dlq", "--from", "a.dlq", "--reason", "no-config", "--since", "2h"]
    options = parse_options([*argv, "--show", "5", "--json"], now_ms=NOW_MS)
    assert options.topics == ("a.dlq", "b.dlq")
    assert options.filter == Filter(reasons=frozenset({"no-config"}), since_ms=NOW_MS - 2 * HOUR_MS)
    assert (options.show, options.as_json) == (5, True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "soon"], "--since"),
        (["--show", "-1"], "must not be negative"),
        (["--show", "many"], "not an integer"),
        (["--from", " "], "must not be empty"),
        (["--commit"], "unrecognized arguments"),
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(InspectUsageError, match=message):
        parse_options(argv, now_ms=NOW_MS)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ParserExit) as exit_:
        parse_options(["--help"], now_ms=NOW_MS)
    assert exit_.value.status == 0
    assert "commits nothing" in capsys.readouterr().out


# --- values --------------------------------------------------------------------------------------------------------


async def test_a_value_decodes_to_the_avro_datum_of_its_source_topic() -> None:
    datum = avro_io.inference("p-1", {"q": "why?", "n": 3, "nested": {"ok": True}}, inference_id="i-1")
    value = await reader().read("inferences", ENCODER.plain("inference", datum))
    assert value == {
        "encoding": "avro",
        "schema": "inference",
        "wire_format": "plain",
        "datum": {"inference_pipeline_id": "p-1", "row": datum["row"], "inference_id": "i-1", "config": None},
    }


async def test_a_value_the_bridge_routed_away_still_decodes() -> None:
    # An empty row is refused by the codec (missing-field) after reading: the bytes are still shown as JSON.
    datum = avro_io.inference("p-1", {}, inference_id="i-1")
    value = await reader().read("inferences", ENCODER.plain("inference", datum))
    assert value["encoding"] == "avro"
    assert value["datum"]["row"] == {}


class _Registry:
    """Writer schemas by id, as the schema registry would answer: id 7 is the shipped log_update schema."""

    async def writer_schema(self, schema_id: int) -> ParsedSchema:
        if schema_id != 7:
            raise DecodeError(f"schema id {schema_id} is unknown", reason="unknown-schema-id")
        return schema_set().reader(EventKind.LOG_UPDATE)


async def test_a_confluent_framed_value_decodes_with_the_registrys_writer_schema() -> None:
    datum = avro_io.log_update("ref-9", output="Paris", duration=None)
    codec = AvroCodec(schema_set(), _Registry())
    value = ValueReader(codec, KINDS)
    framed = ENCODER.confluent(7, ENCODER.raw["log_update"], datum)

    decoded = await value.read("log-updates", framed)

    assert decoded == {"encoding": "avro", "schema": "log_update", "wire_format": "confluent", "datum": datum}
    unknown = await value.read("log-updates", ENCODER.confluent(8, ENCODER.raw["log_update"], datum))
    assert unknown["encoding"] == "hex"
    assert unknown["note"] == "does not decode with the log_update schema: unknown-schema-id"


@pytest.mark.parametrize(
    ("source_topic", "raw", "note"),
    [
        ("inferences", b"\x01garbage", "does not decode with the inference schema: truncated"),
        ("inferences", b"\x02\xff\xfe", "does not decode with the inference schema: "),
        ("inferences", log_value(), "does not decode with the inference schema: "),  # another topic's schema
        ("log-updates", b"\x00\x00\x00\x00\x07abc", "log_update schema: no-schema-registry"),  # Confluent-framed
        ("elsewhere", log_value(), "not one of the configured topics"),
        (None, log_value(), "not one of the configured topics"),
    ],
)
async def test_an_undecodable_value_is_shown_as_hex_with_the_reason(
    source_topic: str | None, raw: bytes, note: str
) -> None:
    value = await reader().read(source_topic, raw)
    assert value["encoding"] == "hex"
    assert value["hex"] == raw.hex()
    assert value["bytes"] == len(raw)
    assert note in value["note"]


async def test_a_tombstone_has_no_value() -> None:
    assert (await reader().read("inferences", None))["encoding"] == "none"


def test_jsonable_keeps_json_and_converts_the_rest() -> None:
    assert jsonable({"a": [1, 2.5, None, True], "b": b"\x00\xff", "c": float("nan"), "d": (1,)}) == {
        "a": [1, 2.5, None, True],
        "b": {"hex": "00ff"},
        "c": "nan",
        "d": [1],
    }


# --- output ------------------------------------------------------------------------------------------------------


async def test_a_letter_as_json_and_as_text_has_value_headers_and_evidence() -> None:
    source = record("log-updates", log_value(), headers=(("traceparent", b"00-abc-01"), ("bin", b"\xff\x00")))
    letter = Letter.of(dead(source, RejectedError("PATCH answered 422", EVIDENCE, reason="http-422")))
    item = letter_json(letter, await reader().read(letter.source_topic, letter.record.value))
    assert item["source"] == {"topic": "log-updates", "partition": 1, "offset": 7}
    assert item["key"] == {"text": "key-1"}
    assert item["error"] == {"class": "RejectedError", "message": "PATCH answered 422"}
    assert item["headers"][:2] == [{"name": "traceparent", "text": "00-abc-01"}, {"name": "bin", "hex": "ff00"}]
    names = [h["name"] for h in item["headers"]]
    assert "__connect.errors.topic" in names
    assert "bridge.http.response.header.x-request-id" in names
    assert item["value"]["datum"]["output"] == "Paris 1"
    json.dumps(item)  # serialisable as it is

    text = "\n".join(letter_text(item, NOW_MS))
    assert "--- log-updates.dlq[1]@40  reason=http-422  stage=TASK_PUT" in text
    assert "(30m0s ago)" in text
    assert "source:    log-updates[1]@7" in text
    assert f"http:      PATCH {EVIDENCE.url} -> 422 after 2 attempt(s)" in text
    assert "response header x-request-id: req-1" in text
    assert 'response body: {"detail":"bad output"}' in text
    assert "  traceparent: 00-abc-01" in text
    assert "  bin: 0xff00" in text
    assert "value:     log_update (plain Avro) as JSON:" in text
    assert '"output": "Paris 1"' in text


async def test_a_header_without_a_value_shows_as_null() -> None:
    """Kafka allows one, and a dead letter keeps the record's headers as they were."""
    source = record("log-updates", log_value(), headers=(("x-empty", None), ("traceparent", None)))
    letter = Letter.of(dead(source, RejectedError("PATCH answered 422", EVIDENCE, reason="http-422")))
    item = letter_json(letter, await reader().read(letter.source_topic, letter.record.value))

    assert item["headers"][:2] == [{"name": "x-empty", "null": True}, {"name": "traceparent", "null": True}]
    text = "\n".join(letter_text(item, NOW_MS))
    assert "  x-empty: null" in text
    assert "  traceparent: null" in text


async def test_a_long_undecodable_value_is_cut_in_the_text_only() -> None:
    raw = b"\x01" + bytes(2000)
    letter = Letter.of(dead(record("inferences", raw), DecodeError("bad", reason="truncated")))
    item = letter_json(letter, await reader().read(letter.source_topic, letter.record.value))
    assert item["value"]["hex"] == raw.hex()
    (line,) = [line for line in letter_text(item, NOW_MS) if line.startswith("  01")]
    assert line == "  " + raw[:512].hex() + " ... (1489 more bytes; --json has them all)"


def test_the_summary_counts_every_dimension() -> None:
    summary = TopicSummary("inferences.dlq")
    letters = [
        dead(record("inferences", b"x"), RouteError("r", reason="no-config"), failed_at_ms=NOW_MS - 2 * HOUR_MS),
        dead(record("inferences", b"x"), RouteError("r", reason="no-config"), failed_at_ms=NOW_MS - 60_000),
        dead(record("inferences", b"x"), RejectedError("422", EVIDENCE, reason="http-422"), failed_at_ms=NOW_MS - 8000),
        record("inferences.dlq", b"x"),  # no evidence at all
    ]
    for r in letters:
        summary.read += 1
        summary.add(Letter.of(r), NOW_MS)
    data = summary.to_json()
    assert data["matched"] == 4
    assert data["by_reason"] == {"no-config": 2, "-": 1, "http-422": 1}
    assert data["by_stage"] == {"TRANSFORMATION": 2, "-": 1, "TASK_PUT": 1}
    assert data["by_http_status"] == {"-": 3, "422": 1}
    assert data["by_source_topic"] == {"inferences": 3, "-": 1}
    assert data["by_age"] == {"<1h": 2, "1h-1d": 1, "unknown": 1}
    assert data["oldest_failed_at"] == "2027-01-15T06:00:00.000Z"
    assert data["newest_failed_at"] == "2027-01-15T07:59:52.000Z"
    text = summary_text(summary, NOW_MS, filtered=False)
    assert text[0] == (
        "inferences.dlq: 4 dead letters, failed from 2027-01-15T06:00:00.000Z (2h0m ago) "
        "to 2027-01-15T07:59:52.000Z (8s ago)"
    )
    assert text[1] == "  reason        no-config 2, - 1, http-422 1"
    assert text[5] == "  age           <1h 2, 1h-1d 1, unknown 1"


def test_empty_and_missing_topics_say_so() -> None:
    assert summary_text(TopicSummary("a.dlq", read=3), NOW_MS, filtered=True) == [
        "a.dlq: no dead letters match (of 3 read)"
    ]
    assert summary_text(TopicSummary("a.dlq"), NOW_MS, filtered=False) == ["a.dlq: no dead letters"]
    assert summary_text(TopicSummary("b.dlq", exists=False), NOW_MS, filtered=False) == ["b.dlq: does not exist"]


async def test_nothing_printed_holds_a_configured_secret() -> None:
    # A secret the API echoed after the letter was written, or one that reached a value or an original header:
    # the output is redacted again with the secrets configured now.
    leaky = RejectedError("422", HttpEvidence("PATCH", "https://h.test/logs", 422, body="fine"), reason="http-422")
    source = record(
        "log-updates",
        ENCODER.plain("log_update", avro_io.log_update("ref-1", output=f"token {SECRET}")),
        headers=(("authorization", f"Bearer {SECRET}".encode()), (f"x-{SECRET}", b"1")),
    )
    letter = Letter.of(dead(source, leaky))
    item = letter_json(letter, await reader().read(letter.source_topic, letter.record.value))
    summary = TopicSummary("log-updates.dlq", read=1)
    summary.add(letter, NOW_MS)
    report = Report([summary], [item], NOW_MS)
    assert SECRET in json.dumps(report.to_json()), "the test plants the secret where the output would show it"
    for as_json in (False, True):
        out = render(report, InspectOptions(topics=(), show=1, as_json=as_json), Redactor([SECRET]))
        assert SECRET not in out
        assert "[REDACTED]" in out
    parsed: dict[str, Any] = json.loads(render(report, InspectOptions(topics=(), as_json=True), Redactor([SECRET])))
    assert parsed["records"][0]["value"]["datum"]["output"] == "token [REDACTED]"


def test_the_clock_is_the_callers() -> None:
    # parse_options takes `now` from main: --since 1h means an hour before the command started.
    now = int(time.time() * 1000)
    assert parse_options(["--since", "1h"], now_ms=now).filter.since_ms == now - HOUR_MS


# --- garbled input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("duration", ["9" * 400 + "w", "9" * 308 + "w"])
def test_a_duration_past_any_number_is_a_usage_error(duration: str) -> None:
    # int(...) * 604800.0 overflows a float, or the sum is infinite: an OverflowError, not a ValueError.
    with pytest.raises(InspectUsageError, match="too long a duration"):
        parse_options(["--since", duration], now_ms=NOW_MS)


@pytest.mark.parametrize("as_json", [False, True])
def test_a_failed_at_time_no_date_can_show_is_unknown(as_json: bool) -> None:
    source = record("log-updates", b"\x02garbage")
    letter = dead(source, DecodeError("bad", reason="truncated"))
    garbled = tuple(
        (name, b"99999999999999999" if name == "bridge.failed.at.ms" else value) for name, value in letter.headers
    )
    read = Letter.of(SourceRecord(letter.topic, 1, 40, letter.key, letter.value, garbled, letter.timestamp_ms))
    summary = TopicSummary("log-updates.dlq")
    summary.read += 1
    summary.add(read, NOW_MS)

    out = render(Report([summary], [], NOW_MS), InspectOptions(topics=(), as_json=as_json), Redactor([]))

    assert read.failed_at_ms is None
    assert summary.by_age == {"unknown": 1}
    assert "log-updates.dlq" in out
