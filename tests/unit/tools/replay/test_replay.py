"""Replay's pure parts: a dead letter made by the real `build_dead_letter` turns back into the original record
plus a replay count, the filter and the refusal rules decide as documented, and the command line is strict."""

from __future__ import annotations

import pytest

from service.config.settings import load_settings
from service.core.errors import DecodeError, HttpEvidence, RecordError, RejectedError, RouteError
from service.core.records import SourceRecord
from service.kafka.deadletter import build_dead_letter
from service.ops.redaction import Redactor
from service.tools.cli import ParserExit
from service.tools.replay.cli import parse_options
from service.tools.replay.main import main
from service.tools.replay.plan import (
    REPLAY_COUNT_HEADER,
    Action,
    plan,
    replay_count,
    replay_headers,
    source_partition,
    target_partition,
)
from service.tools.replay.runner import ReplayOptions, ReplaySummary, ReplayUsageError

ORIGINAL_HEADERS = (("traceparent", b"00-abc-01"), ("producer", b"svc-a"), ("traceparent", b"dup"))
RECORD = SourceRecord(
    topic="inferences",
    partition=2,
    offset=4711,
    key=b"\x00key",
    value=b"\x00\x00\x00\x00\x07avro\xff",
    headers=ORIGINAL_HEADERS,
    timestamp_ms=1_700_000_000_000,
)
EVIDENCE = HttpEvidence(
    method="PUT",
    url="https://openlayer.test/v1/inference-pipelines/p/rows",
    status=422,
    body="{}",
    headers={"x-request-id": "r-1"},
)


def dead_letter(error: RecordError, record: SourceRecord = RECORD, dlq_offset: int = 9) -> SourceRecord:
    """The dead letter exactly as the consumer of `inferences.dlq` would read it."""
    letter = build_dead_letter(
        record,
        error,
        dlq_topic="inferences.dlq",
        dlq_partitions=4,
        group_id="bridge",
        redact=Redactor([]),
        now_ms=1_800_000_000_000,
    )
    return SourceRecord(
        topic=letter.topic,
        partition=letter.partition or 0,
        offset=dlq_offset,
        key=letter.key,
        value=letter.value,
        headers=letter.headers,
        timestamp_ms=letter.timestamp_ms,
    )


def decide(letter: SourceRecord, *reasons: str, max_replays: int = 3) -> Action:
    return plan(letter, reasons=frozenset(reasons), max_replays=max_replays).action


# --- headers ---------------------------------------------------------------------------------------------------


def test_replay_restores_the_original_record_with_a_count() -> None:
    letter = dead_letter(RejectedError("422", EVIDENCE, reason="http-422"))

    decision = plan(letter, reasons=frozenset(), max_replays=3)

    assert decision.action is Action.REPLAY
    replay = decision.replay
    assert replay is not None
    assert (replay.topic, replay.partition) == ("inferences", 2)
    assert (replay.key, replay.value, replay.timestamp_ms) == (RECORD.key, RECORD.value, RECORD.timestamp_ms)
    assert replay.headers == (*ORIGINAL_HEADERS, (REPLAY_COUNT_HEADER, b"1"))
    assert replay.count == 1


def test_the_count_is_carried_forward_and_incremented() -> None:
    replayed_once = RECORD._replace(headers=(*ORIGINAL_HEADERS, (REPLAY_COUNT_HEADER, b"1")))
    letter = dead_letter(DecodeError("bad"), record=replayed_once)

    decision = plan(letter, reasons=frozenset(), max_replays=3)

    assert decision.replay is not None
    assert decision.replay.headers == (*ORIGINAL_HEADERS, (REPLAY_COUNT_HEADER, b"2"))


def test_every_evidence_header_is_stripped_and_only_one_count_remains() -> None:
    headers = (
        ("a", b"1"),
        ("__connect.errors.topic", b"t"),
        ("bridge.replay.count", b"4"),
        ("b", b"2"),
        ("bridge.http.response.header.x", b"y"),
        ("bridge.replay.count", b"5"),
        ("__connect.errors.whatever", b"z"),
        ("bridgework", b"kept: not the bridge. prefix"),
    )

    assert replay_headers(headers, 6) == (
        ("a", b"1"),
        ("b", b"2"),
        ("bridgework", b"kept: not the bridge. prefix"),
        (REPLAY_COUNT_HEADER, b"6"),
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param((), 0, id="absent"),
        pytest.param(((REPLAY_COUNT_HEADER, b"2"),), 2, id="two"),
        pytest.param(((REPLAY_COUNT_HEADER, b"1"), (REPLAY_COUNT_HEADER, b"3")), 3, id="last-wins"),
        pytest.param(((REPLAY_COUNT_HEADER, b""),), None, id="empty"),
        pytest.param(((REPLAY_COUNT_HEADER, b"-1"),), None, id="negative"),
        pytest.param(((REPLAY_COUNT_HEADER, b" 1"),), None, id="space"),
        pytest.param(((REPLAY_COUNT_HEADER, "\uff13".encode()),), None, id="non-ascii-digit"),
        pytest.param(((REPLAY_COUNT_HEADER, b"\xff"),), None, id="not-utf8"),
    ],
)
def test_replay_count(headers: tuple[tuple[str, bytes], ...], expected: int | None) -> None:
    assert replay_count(headers) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"0", 0), (b"7", 7), (b"", None), (b"x", None), (b"-1", None)],
)
def test_source_partition(value: bytes, expected: int | None) -> None:
    assert source_partition((("__connect.errors.partition", value),)) == expected


@pytest.mark.parametrize(
    ("original", "partitions", "expected"),
    [(0, 1, 0), (2, 3, 2), (3, 3, None), (5, 1, None), (None, 4, None)],
)
def test_target_partition_is_the_original_only_when_the_topic_has_it(
    original: int | None, partitions: int, expected: int | None
) -> None:
    assert target_partition(original, partitions) == expected


# --- decisions -------------------------------------------------------------------------------------------------


def test_the_reason_filter_skips_what_was_not_asked_for() -> None:
    letter = dead_letter(RouteError("no config", reason="no-config"))

    assert decide(letter, "no-config") is Action.REPLAY
    assert decide(letter, "http-422", "no-config") is Action.REPLAY
    assert decide(letter, "http-422") is Action.SKIP
    assert decide(letter) is Action.REPLAY


def test_a_record_without_a_source_topic_is_refused() -> None:
    letter = SourceRecord("x.dlq", 0, 0, b"k", b"v", (("bridge.reason", b"decode-failed"),), 1)

    decision = plan(letter, reasons=frozenset(), max_replays=3)

    assert decision.action is Action.REFUSE
    assert "__connect.errors.topic" in decision.detail


def test_the_filter_comes_before_refusal() -> None:
    letter = SourceRecord("x.dlq", 0, 0, b"k", b"v", (("bridge.reason", b"decode-failed"),), 1)

    assert decide(letter, "http-422") is Action.SKIP


@pytest.mark.parametrize(("count", "verdict"), [(0, Action.REPLAY), (2, Action.REPLAY), (3, Action.REFUSE)])
def test_records_replayed_max_times_are_refused(count: int, verdict: Action) -> None:
    headers = (*ORIGINAL_HEADERS, (REPLAY_COUNT_HEADER, str(count).encode())) if count else ORIGINAL_HEADERS
    letter = dead_letter(DecodeError("bad"), record=RECORD._replace(headers=headers))

    assert decide(letter, max_replays=3) is verdict


def test_an_unreadable_count_is_refused_rather_than_reset() -> None:
    headers = (*ORIGINAL_HEADERS, (REPLAY_COUNT_HEADER, b"lots"))
    letter = dead_letter(DecodeError("bad"), record=RECORD._replace(headers=headers))

    decision = plan(letter, reasons=frozenset(), max_replays=3)

    assert decision.action is Action.REFUSE
    assert REPLAY_COUNT_HEADER in decision.detail


# --- command line ----------------------------------------------------------------------------------------------


def test_defaults() -> None:
    options = parse_options(["--from", "inferences.dlq"], default_group="bridge-replay")

    assert options == ReplayOptions(dlq_topic="inferences.dlq", group_id="bridge-replay")
    assert (options.max_replays, options.limit, options.dry_run, options.reasons) == (3, None, False, frozenset())


def test_every_option() -> None:
    argv = ["--from", "t.dlq", "--reason", "a", "--reason", "b", "--limit", "5", "--dry-run"]
    argv += ["--max-replays", "7", "--group", "g2"]

    options = parse_options(argv, default_group="unused")

    assert options == ReplayOptions(
        dlq_topic="t.dlq", group_id="g2", reasons=frozenset({"a", "b"}), limit=5, dry_run=True, max_replays=7
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param([], "--from", id="no-from"),
        pytest.param(["--from", ""], "empty", id="empty-from"),
        pytest.param(["--from", "t", "--limit", "0"], "--limit", id="zero-limit"),
        pytest.param(["--from", "t", "--limit", "x"], "not an integer", id="bad-limit"),
        pytest.param(["--from", "t", "--max-replays", "0"], "--max-replays", id="zero-max"),
        pytest.param(["--from", "t", "--reason", " "], "--reason", id="blank-reason"),
        pytest.param(["--from", "t", "--group", ""], "--group", id="empty-group"),
        pytest.param(["--from", "t", "--frm", "x"], "unrecognized", id="unknown"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ReplayUsageError, match=message):
        parse_options(argv, default_group="g")


def test_help_documents_the_consequences(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ParserExit) as raised:
        parse_options(["--help"], default_group="g-replay")

    assert raised.value.status == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A filtered replay consumes what it skips" in text
    assert "--dry-run first to see what would happen" in text
    assert "fresh --group to re-scan" in text
    assert "default g-replay" in text


def test_main_returns_2_on_bad_arguments_without_touching_kafka(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(
        {
            # nothing listens here: bad arguments must be reported before any connection is tried
            "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "BRIDGE_OPENLAYER__API_KEY": "k-openlayer",
            "BRIDGE_HUMANLOOP__API_KEY": "k-humanloop",
        }
    )

    assert main(["--from", "t.dlq", "--limit", "-1"], settings) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["--help"], settings) == 0


def test_summary_line() -> None:
    assert ReplaySummary(3, 2, 1, False).line() == "replayed=3 skipped=2 refused=1 dry_run=false"
    assert ReplaySummary(0, 0, 0, True).line() == "replayed=0 skipped=0 refused=0 dry_run=true"
