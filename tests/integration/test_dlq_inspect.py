"""`python -m service dlq` on the real broker, against dead letters the real service wrote: the summary counts what
is there, --show decodes values through the service's codec and prints every header and the HTTP evidence, the
filters hold, nothing is committed (no consumer group appears) and no configured secret is ever printed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from service.config.settings import load_settings
from service.tools.dlq.cli import InspectOptions
from service.tools.dlq.letters import Filter, InspectUsageError
from service.tools.dlq.reader import inspect
from tests.integration.cases import CASES, HUMANLOOP_KEY, OPENLAYER_KEY, PIPELINE, is_marked
from tests.support import avro_io
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import REPO, Topics, running_bridge
from tests.support.fake_apis import FakeApiServer, Fault
from tests.support.kafka_io import all_committed, eventually, produce

pytestmark = pytest.mark.kafka

ENCODER = AvroEncoder()
CASE = {case.kind: case for case in CASES}


def cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")} | environ
    return subprocess.run(
        [sys.executable, "-m", "service", "dlq", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a speed assertion
        check=False,
    )


async def consumer_groups(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {group[0] for group in await admin.list_consumer_groups()}
    finally:
        await admin.close()


async def list_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


@pytest.fixture
async def dead_letters(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> dict[str, str]:
    """Runs the service over records of all three topics until it has dead-lettered six of them:
    inferences: one refused row (422) and one without a config (no-config);
    row updates: one refused (422) with the API key echoed in the response body;
    log updates: two refused (422) and one that is not Avro (it reads as truncated)."""
    fake_apis.reject_when("update_row", is_marked, Fault(status=422, body={"error": f"bad key {OPENLAYER_KEY}?"}))
    for endpoint in ("publish", "update_log"):
        fake_apis.reject_when(endpoint, is_marked, Fault(status=422))
    inference, row, log = CASE["inference"], CASE["row_update"], CASE["log_update"]
    no_config = avro_io.inference(PIPELINE, {"output": "o"}, inference_id="inf-no-config", config=None)
    await produce(
        kafka_bootstrap,
        topics.inferences,
        [ENCODER.plain("inference", inference.datum(i, i == 1)) for i in range(3)]
        + [ENCODER.plain("inference", no_config)],
    )
    await produce(
        kafka_bootstrap, topics.row_updates, [ENCODER.plain("row_update", row.datum(i, i == 0)) for i in range(3)]
    )
    await produce(
        kafka_bootstrap,
        topics.log_updates,
        [ENCODER.plain("log_update", log.datum(i, i in (1, 3))) for i in range(4)] + [b"\x01garbage"],
        headers=[("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
    )
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(bridge_env):
        await eventually(partial(all_committed, kafka_bootstrap, group, *topics.all()), what="all three drained")
    return bridge_env


async def test_the_summary_counts_what_the_service_dead_lettered(
    kafka_bootstrap: str, topics: Topics, dead_letters: dict[str, str]
) -> None:
    settings = load_settings(dead_letters)
    groups_before = await consumer_groups(kafka_bootstrap)

    report = await inspect(settings, InspectOptions(topics=()))

    by_topic = {s.topic: s.to_json() for s in report.summaries}
    assert list(by_topic) == [topics.dlq(t) for t in topics.all()], "the configured topics' DLQs, in order"
    inferences, rows, logs = (by_topic[topics.dlq(t)] for t in topics.all())
    assert inferences["by_reason"] == {"http-422": 1, "no-config": 1}
    assert inferences["by_stage"] == {"TASK_PUT": 1, "TRANSFORMATION": 1}
    assert inferences["by_http_status"] == {"-": 1, "422": 1}
    assert rows["by_reason"] == {"http-422": 1}
    assert logs["by_reason"] == {"http-422": 2, "truncated": 1}
    assert logs["by_stage"] == {"TASK_PUT": 2, "VALUE_CONVERTER": 1}
    assert logs["by_source_topic"] == {topics.log_updates: 3}
    for summary in by_topic.values():
        assert summary["read"] == summary["matched"]
        assert list(summary["by_age"]) == ["<1h"]
        assert summary["oldest_failed_at"] <= summary["newest_failed_at"]
    assert report.letters == [], "no --show, no records"

    filtered = await inspect(
        settings, InspectOptions(topics=(topics.dlq(topics.log_updates),), filter=Filter(frozenset({"http-422"})))
    )
    (only,) = filtered.summaries
    assert (only.read, only.matched, dict(only.by_reason)) == (3, 2, {"http-422": 2})

    assert await consumer_groups(kafka_bootstrap) == groups_before, "read without a group: nothing committed"


async def test_show_prints_decoded_values_headers_and_evidence_and_no_secret(
    kafka_bootstrap: str, topics: Topics, dead_letters: dict[str, str]
) -> None:
    groups_before = await consumer_groups(kafka_bootstrap)

    done = await asyncio.to_thread(cli, dead_letters, "--show", "10", "--json")

    assert done.returncode == 0, done.stderr
    for secret in (OPENLAYER_KEY, HUMANLOOP_KEY):
        assert secret not in done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert sum(t["matched"] for t in report["topics"]) == 6
    records = report["records"]
    assert len(records) == 6
    assert [r["failed_at"] for r in records] == sorted(r["failed_at"] for r in records), "oldest first, newest last"
    by_reason: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        by_reason.setdefault((r["source"]["topic"], r["reason"]), []).append(r)

    (garbage,) = by_reason[(topics.log_updates, "truncated")]
    assert garbage["value"]["encoding"] == "hex"
    assert garbage["value"]["hex"] == b"\x01garbage".hex()
    assert garbage["http"] is None
    assert garbage["stage"] == "VALUE_CONVERTER"
    assert garbage["error"]["class"] == "DecodeError"

    refused_logs = by_reason[(topics.log_updates, "http-422")]
    assert sorted(r["value"]["datum"]["reference_id"] for r in refused_logs) == ["ref-000001", "ref-000003"]
    for r in refused_logs:
        assert r["value"]["schema"] == "log_update"
        assert r["http"]["status"] == 422
        assert r["http"]["method"] == "PATCH"
        assert "reference_id=" in r["http"]["url"]
        assert r["http"]["attempts"] >= 1
        names = [h["name"] for h in r["headers"]]
        assert names[0] == "traceparent", "the producer's headers come first, untouched"
        assert {"__connect.errors.topic", "__connect.errors.offset", "bridge.reason", "bridge.failed.at.ms"} <= set(
            names
        )

    (row,) = by_reason[(topics.row_updates, "http-422")]
    assert row["value"]["datum"]["inference_id"] == "inf-000000"
    assert "[REDACTED]" in row["http"]["response_body"], "the echoed key was redacted when it was written"

    (no_config,) = by_reason[(topics.inferences, "no-config")]
    assert no_config["value"]["datum"]["config"] is None
    assert no_config["value"]["datum"]["inference_id"] == "inf-no-config"
    assert no_config["http"] is None
    (refused_row,) = by_reason[(topics.inferences, "http-422")]
    assert refused_row["value"]["datum"]["row"]["reject_me"] is True

    assert await consumer_groups(kafka_bootstrap) == groups_before, "read without a group: nothing committed"


async def test_the_command_line_for_people_filters_and_refuses_unknown_topics(
    kafka_bootstrap: str, topics: Topics, dead_letters: dict[str, str], unique_name: Callable[[str], str]
) -> None:
    log_dlq = topics.dlq(topics.log_updates)

    done = await asyncio.to_thread(cli, dead_letters, "--from", log_dlq, "--reason", "http-422", "--show", "1")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{log_dlq}: 2 dead letters (of 3 read), failed from ")
    assert lines[1] == "  reason        http-422 2"
    assert lines[3] == "  http status   422 2"
    assert lines[4] == f"  source topic  {topics.log_updates} 2"
    assert lines[5] == "  age           <1h 2"
    shown = "\n".join(lines[6:])
    assert shown.count("\n--- ") == 1
    assert f"--- {log_dlq}[" in shown
    assert "reason=http-422  stage=TASK_PUT" in shown
    assert "http:      PATCH " in shown
    assert "  traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" in shown
    assert "value:     log_update (plain Avro) as JSON:" in shown
    for secret in (OPENLAYER_KEY, HUMANLOOP_KEY):
        assert secret not in done.stdout + done.stderr

    future = await asyncio.to_thread(cli, dead_letters, "--from", log_dlq, "--since", "2999-01-01T00:00:00Z")

    assert future.returncode == 0, future.stderr
    assert future.stdout.strip() == f"{log_dlq}: no dead letters match (of 3 read)"

    missing = unique_name("missing") + ".dlq"
    absent = await asyncio.to_thread(cli, dead_letters, "--from", missing)

    assert absent.returncode == 2
    assert f"'{missing}' do not exist" in absent.stderr
    assert missing not in await list_topics(kafka_bootstrap), "looking for it must not create it"
    with pytest.raises(InspectUsageError):
        await inspect(load_settings(dead_letters), InspectOptions(topics=(missing,)))
