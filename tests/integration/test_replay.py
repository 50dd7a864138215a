"""Dead-letter replay on the real broker: dead letters made by the real `build_dead_letter` go back to their source
topic byte for byte with a replay count, refusals and filters hold, a dry run touches nothing, and progress is
committed so a second run replays nothing new."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from service.config.settings import Settings, load_settings
from service.core.errors import DecodeError, HttpEvidence, RecordError, RejectedError, RouteError
from service.core.records import SourceRecord
from service.kafka.clients import KafkaDeadLetterProducer
from service.kafka.deadletter import DeadLetter, build_dead_letter
from service.ops.redaction import Redactor
from service.tools.dlq.cli import InspectOptions
from service.tools.dlq.reader import inspect
from service.tools.replay.cli import parse_options
from service.tools.replay.plan import REPLAY_COUNT_HEADER
from service.tools.replay.runner import ReplayError, ReplaySummary, replay
from tests.support.bridge import REPO
from tests.support.kafka_broker import create_topics
from tests.support.kafka_io import committed, end_offsets, read_all

pytestmark = pytest.mark.kafka

Headers = tuple[tuple[str, bytes], ...]
NOW_MS = int(time.time() * 1000)
# An hour old: clearly not the time of the replay, yet inside any broker's timestamp and retention limits.
OLD_MS = NOW_MS - 3_600_000
EVIDENCE = HttpEvidence(
    method="PUT",
    url="https://openlayer.test/v1/inference-pipelines/p-1/rows?inferenceId=i-1",
    status=422,
    body='{"error":"bad row"}',
    attempts=2,
    headers={"x-request-id": "req-1"},
)


def environment(bootstrap: str, group: str) -> dict[str, str]:
    return {
        "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "BRIDGE_KAFKA__GROUP_ID": group,
        "BRIDGE_OPENLAYER__API_KEY": "ol-test-key",
        "BRIDGE_HUMANLOOP__API_KEY": "hl-test-key",
    }


@pytest.fixture
def settings(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Settings:
    return load_settings(environment(kafka_bootstrap, unique_name("bridge")))


def source_record(
    topic: str, partition: int, n: int, *, headers: Headers = (), key: bytes | None = None
) -> SourceRecord:
    return SourceRecord(
        topic=topic,
        partition=partition,
        offset=100 + n,
        key=key if key is not None else f"key-{n}".encode(),
        value=b"\x00\x00\x00\x00\x01" + f"value-{n}".encode() + b"\xff",  # not text: bytes must survive as bytes
        headers=headers,
        timestamp_ms=OLD_MS + n,
    )


def dead_letter(record: SourceRecord, error: RecordError, dlq: str, dlq_partitions: int) -> DeadLetter:
    return build_dead_letter(
        record,
        error,
        dlq_topic=dlq,
        dlq_partitions=dlq_partitions,
        group_id="bridge",
        redact=Redactor([]),
        now_ms=int(time.time() * 1000),
    )


async def write(bootstrap: str, letters: Sequence[DeadLetter]) -> None:
    """Produce dead letters as `KafkaDeadLetterProducer` would: same partition rule, timestamp and headers."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for letter in letters:
            await producer.send_and_wait(
                letter.topic,
                value=letter.value,
                key=letter.key,
                partition=letter.partition,
                timestamp_ms=letter.timestamp_ms,
                headers=list(letter.headers),
            )
    finally:
        await producer.stop()


async def run(settings: Settings, *argv: str) -> tuple[ReplaySummary, list[str]]:
    """The command line's path minus the process: parse the same arguments, run, collect printed lines."""
    options = parse_options(list(argv), default_group=f"{settings.kafka.group_id}-replay")
    lines: list[str] = []
    summary = await replay(settings, options, out=lines.append)
    return summary, lines


def headers_of(record: Any) -> Headers:
    return tuple((name, bytes(value)) for name, value in record.headers)


def as_source_record(record: Any) -> SourceRecord:
    return SourceRecord(
        record.topic, record.partition, record.offset, record.key, record.value, headers_of(record), record.timestamp
    )


async def test_replay_restores_the_original_records(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    source = unique_name("inferences")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 2, dlq: 2})
    originals = [
        source_record(source, 0, 0, headers=(("traceparent", b"00-a-01"), ("dup", b"1"), ("dup", b"2"))),
        source_record(source, 1, 1),
        source_record(source, 5, 2, headers=(("producer", b"svc-b"),)),  # a partition the topic no longer has
    ]
    errors: list[RecordError] = [
        RejectedError("PUT answered 422", EVIDENCE, reason="http-422"),
        DecodeError("bad magic byte"),
        RouteError("no config", reason="no-config"),
    ]
    await write(kafka_bootstrap, [dead_letter(r, e, dlq, 2) for r, e in zip(originals, errors, strict=True)])

    summary, _ = await run(settings, "--from", dlq)

    assert summary == ReplaySummary(replayed=3, skipped=0, refused=0, dry_run=False)
    replayed = {record.timestamp: record for record in await read_all(kafka_bootstrap, source)}
    assert sorted(replayed) == [r.timestamp_ms for r in originals]
    for original in originals:
        record = replayed[original.timestamp_ms]
        assert (record.key, record.value, record.timestamp_type) == (original.key, original.value, 0)
        assert headers_of(record) == (*original.headers, (REPLAY_COUNT_HEADER, b"1"))
    assert replayed[originals[0].timestamp_ms].partition == 0
    assert replayed[originals[1].timestamp_ms].partition == 1
    group = f"{settings.kafka.group_id}-replay"
    assert await committed(kafka_bootstrap, group, dlq) == await end_offsets(kafka_bootstrap, dlq)

    again, _ = await run(settings, "--from", dlq)

    assert again == ReplaySummary(replayed=0, skipped=0, refused=0, dry_run=False)
    assert len(await read_all(kafka_bootstrap, source)) == 3


async def test_a_record_that_fails_again_is_refused_at_max_replays(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    source = unique_name("log-updates")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    await write(kafka_bootstrap, [dead_letter(source_record(source, 0, 0), DecodeError("bad"), dlq, 1)])
    first, _ = await run(settings, "--from", dlq, "--max-replays", "1")
    assert first.replayed == 1
    # The bridge reads the replayed record and dead-letters it again: its count travels in the original headers.
    [replayed] = await read_all(kafka_bootstrap, source)
    await write(kafka_bootstrap, [dead_letter(as_source_record(replayed), DecodeError("still bad"), dlq, 1)])

    second, lines = await run(settings, "--from", dlq, "--max-replays", "1")

    assert second == ReplaySummary(replayed=0, skipped=0, refused=1, dry_run=False)
    assert lines == [f"refused {dlq}[0]@1: replayed 1 times already (--max-replays 1)"]
    assert len(await read_all(kafka_bootstrap, source)) == 1
    # refused records are consumed too, or they would block every record behind them
    assert await committed(kafka_bootstrap, f"{settings.kafka.group_id}-replay", dlq) == {0: 2}


async def test_records_without_a_source_topic_are_refused(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    source = unique_name("inferences")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    stray = DeadLetter(dlq, 0, b"k", b"v", (("bridge.reason", b"decode-failed"),), OLD_MS)
    good = dead_letter(source_record(source, 0, 1), DecodeError("bad"), dlq, 1)
    await write(kafka_bootstrap, [stray, good])

    summary, lines = await run(settings, "--from", dlq)

    assert summary == ReplaySummary(replayed=1, skipped=0, refused=1, dry_run=False)
    assert lines == [f"refused {dlq}[0]@0: no __connect.errors.topic header: the source topic is unknown"]
    assert [r.value for r in await read_all(kafka_bootstrap, source)] == [good.value]


async def test_reason_filter_replays_only_the_selected_and_consumes_the_rest(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    source = unique_name("row-updates")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    errors: list[RecordError] = [
        RejectedError("422", EVIDENCE, reason="http-422"),
        RouteError("no config", reason="no-config"),
        DecodeError("bad"),
    ]
    originals = [source_record(source, 0, n) for n in range(3)]
    await write(kafka_bootstrap, [dead_letter(r, e, dlq, 1) for r, e in zip(originals, errors, strict=True)])

    summary, _ = await run(settings, "--from", dlq, "--reason", "http-422", "--reason", "decode-failed")

    assert summary == ReplaySummary(replayed=2, skipped=1, refused=0, dry_run=False)
    assert [r.value for r in await read_all(kafka_bootstrap, source)] == [originals[0].value, originals[2].value]
    # As documented: the skipped record is behind the group now; a fresh group re-scans the topic.
    assert (await run(settings, "--from", dlq))[0].replayed == 0
    rescan, lines = await run(
        settings, "--from", dlq, "--reason", "no-config", "--group", unique_name("g"), "--dry-run"
    )
    assert rescan == ReplaySummary(replayed=1, skipped=2, refused=0, dry_run=True)
    assert f"would replay {dlq}[0]@1 -> {source}[0] reason 'no-config' {REPLAY_COUNT_HEADER}=1" in lines


async def test_limit_stops_after_n_and_the_next_run_resumes(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    source = unique_name("inferences")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    originals = [source_record(source, 0, n) for n in range(5)]
    await write(kafka_bootstrap, [dead_letter(r, DecodeError("bad"), dlq, 1) for r in originals])
    group = f"{settings.kafka.group_id}-replay"

    summary, _ = await run(settings, "--from", dlq, "--limit", "2")

    assert summary == ReplaySummary(replayed=2, skipped=0, refused=0, dry_run=False)
    assert [r.value for r in await read_all(kafka_bootstrap, source)] == [r.value for r in originals[:2]]
    assert await committed(kafka_bootstrap, group, dlq) == {0: 2}

    rest, _ = await run(settings, "--from", dlq)

    assert rest.replayed == 3
    assert [r.value for r in await read_all(kafka_bootstrap, source)] == [r.value for r in originals]
    assert await committed(kafka_bootstrap, group, dlq) == {0: 5}


async def test_dry_run_changes_nothing(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    source = unique_name("inferences")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 2, dlq: 2})
    at_max = source_record(source, 1, 2, headers=((REPLAY_COUNT_HEADER, b"3"),))
    letters = [
        dead_letter(source_record(source, 0, 0), DecodeError("bad"), dlq, 2),
        dead_letter(source_record(source, 1, 1), RejectedError("422", EVIDENCE, reason="http-422"), dlq, 2),
        dead_letter(at_max, DecodeError("bad"), dlq, 2),
    ]
    await write(kafka_bootstrap, letters)
    group = f"{settings.kafka.group_id}-replay"

    summary, lines = await run(settings, "--from", dlq, "--dry-run")

    assert summary == ReplaySummary(replayed=2, skipped=0, refused=1, dry_run=True)
    assert sorted(lines) == [
        f"would refuse {dlq}[1]@1: replayed 3 times already (--max-replays 3)",
        f"would replay {dlq}[0]@0 -> {source}[0] reason 'decode-failed' {REPLAY_COUNT_HEADER}=1",
        f"would replay {dlq}[1]@0 -> {source}[1] reason 'http-422' {REPLAY_COUNT_HEADER}=1",
    ]
    assert await read_all(kafka_bootstrap, source) == []
    assert await committed(kafka_bootstrap, group, dlq) == {}

    real, _ = await run(settings, "--from", dlq)

    assert real == ReplaySummary(replayed=2, skipped=0, refused=1, dry_run=False)


async def test_dead_letters_arriving_during_the_run_wait_for_the_next_one(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    # A dead letter whose source is its own DLQ: every replay adds a dead letter while the replay runs.
    # Only the end offsets captured at start make this terminate after one record.
    dlq = unique_name("loop") + ".dlq"
    await create_topics(kafka_bootstrap, {dlq: 1})
    await write(kafka_bootstrap, [dead_letter(source_record(dlq, 0, 0), DecodeError("bad"), dlq, 1)])

    summary, _ = await run(settings, "--from", dlq, "--max-replays", "50")

    assert summary.replayed == 1
    assert await end_offsets(kafka_bootstrap, dlq) == {0: 2}
    assert await committed(kafka_bootstrap, f"{settings.kafka.group_id}-replay", dlq) == {0: 1}


def cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")} | environ
    return subprocess.run(
        [sys.executable, "-m", "service", "replay", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a speed assertion
        check=False,
    )


async def test_command_line(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> None:
    source = unique_name("inferences")
    dlq = source + ".dlq"
    missing = unique_name("missing") + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    letter = dead_letter(source_record(source, 0, 0), DecodeError("bad"), dlq, 1)
    await write(kafka_bootstrap, [letter])
    group = unique_name("bridge")
    environ = environment(kafka_bootstrap, group)

    done = await asyncio.to_thread(cli, environ, "--from", dlq)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "replayed=1 skipped=0 refused=0 dry_run=false"
    assert [r.value for r in await read_all(kafka_bootstrap, source)] == [letter.value]
    assert await committed(kafka_bootstrap, f"{group}-replay", dlq) == {0: 1}

    absent = await asyncio.to_thread(cli, environ, "--from", missing)

    assert absent.returncode == 2
    assert f"dead-letter topic {missing!r} does not exist" in absent.stderr
    assert missing not in await list_topics(kafka_bootstrap)  # looking for it must not auto-create it

    bad = await asyncio.to_thread(cli, environ, "--from", dlq, "--max-replays", "0")

    assert bad.returncode == 2
    assert "--max-replays" in bad.stderr


async def test_a_missing_source_topic_stops_the_run_after_committing_what_was_done(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    source = unique_name("inferences")
    gone = unique_name("deleted")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    good = dead_letter(source_record(source, 0, 0), DecodeError("bad"), dlq, 1)
    orphan = dead_letter(source_record(gone, 0, 1), DecodeError("bad"), dlq, 1)
    await write(kafka_bootstrap, [good, orphan, good])

    with pytest.raises(ReplayError, match=f"source topic '{gone}' of dead letter {dlq}\\[0\\]@1 does not exist"):
        await run(settings, "--from", dlq)

    assert [r.value for r in await read_all(kafka_bootstrap, source)] == [good.value]
    assert await committed(kafka_bootstrap, f"{settings.kafka.group_id}-replay", dlq) == {0: 1}
    assert gone not in await list_topics(kafka_bootstrap)  # looking for it must not auto-create it


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_record_with_neither_key_nor_value_is_dead_lettered_and_replayed_as_it_was(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    # Kafka takes such a record, and the bridge dead-letters it (empty-value); aiokafka's send() refuses it.
    source = unique_name("log-updates")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    empty = SourceRecord(source, 0, 9, None, None, (("producer", b"svc-c"),), OLD_MS)
    producer = KafkaDeadLetterProducer(settings.kafka, send_timeout_s=10.0)
    await producer.start()
    try:
        await producer.send(dead_letter(empty, DecodeError("no value", reason="empty-value"), dlq, 1))
    finally:
        await producer.stop()

    summary, _ = await run(settings, "--from", dlq)

    [letter] = await read_all(kafka_bootstrap, dlq)
    assert (letter.key, letter.value) == (None, None)
    assert summary == ReplaySummary(replayed=1, skipped=0, refused=0, dry_run=False)
    [replayed] = await read_all(kafka_bootstrap, source)
    assert (replayed.key, replayed.value, replayed.timestamp) == (None, None, OLD_MS)
    assert headers_of(replayed) == (("producer", b"svc-c"), (REPLAY_COUNT_HEADER, b"1"))


async def test_dead_letters_of_an_aborted_transaction_are_neither_inspected_nor_replayed(
    kafka_bootstrap: str, settings: Settings, unique_name: Callable[[str], str]
) -> None:
    # A DLQ written by a transactional tool: letters 1-2 and 4 committed, 3 aborted (never written).
    source = unique_name("inferences")
    dlq = source + ".dlq"
    await create_topics(kafka_bootstrap, {source: 1, dlq: 1})
    letters = {n: dead_letter(source_record(source, 0, n), DecodeError("bad"), dlq, 1) for n in (1, 2, 3, 4)}
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=unique_name("tx"))
    await producer.start()
    try:
        for ns, commit in (((1, 2), True), ((3,), False), ((4,), True)):
            await producer.begin_transaction()
            for n in ns:
                letter = letters[n]
                await producer.send(
                    dlq,
                    value=letter.value,
                    key=letter.key,
                    partition=0,
                    timestamp_ms=letter.timestamp_ms,
                    headers=list(letter.headers),
                )
            await (producer.commit_transaction() if commit else producer.abort_transaction())
    finally:
        await producer.stop()

    report = await inspect(settings, InspectOptions(topics=(dlq,), idle_timeout_s=10.0))
    summary, _ = await run(settings, "--from", dlq)

    assert report.summaries[0].read == 3
    assert summary == ReplaySummary(replayed=3, skipped=0, refused=0, dry_run=False)
    replayed = sorted(record.key for record in await read_all(kafka_bootstrap, source))
    assert replayed == [b"key-1", b"key-2", b"key-4"]
