"""End to end on the real broker: each topic's records reach the fake API exactly as documented,
rejections and undecodable bytes are dead-lettered with their evidence, outages are waited out,
and the committed offsets account for every record."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cases import CASES, HUMANLOOP_KEY, OPENLAYER_KEY, PARTITIONS, Case, is_marked
from tests.support import avro_io
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import BridgeProcess, Topics, running_bridge
from tests.support.fake_apis import FakeApiServer, Fault, ReceivedRequest
from tests.support.kafka_io import all_committed, committed, eventually, produce, read_all

pytestmark = pytest.mark.kafka

ENCODER = AvroEncoder()
BY_KIND = pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])


def _succeeded(fake: FakeApiServer, case: Case) -> list[ReceivedRequest]:
    return [r for r in fake.requests(case.endpoint) if r.status == 200]


def _delivered(fake: FakeApiServer, case: Case) -> list[tuple[str, Any, ReceivedRequest]]:
    """(record id, that record's share of the body, the request) for every record an API accepted."""
    return [(ident, body, r) for r in _succeeded(fake, case) for ident, body in case.split(r.query, r.json)]


async def _produce_case(
    bootstrap: str, topic: str, case: Case, numbers: range, rejected: frozenset[int] = frozenset()
) -> None:
    values = [ENCODER.plain(case.kind, case.datum(i, i in rejected)) for i in numbers]
    # Keys spread the records over the partitions, so ordering and commits run on several at once.
    await produce(bootstrap, topic, values, keys=[f"k{i}".encode() for i in numbers])


def _header_map(headers: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in headers}


@BY_KIND
async def test_records_reach_their_api_exactly_as_documented(
    case: Case, kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    topic = case.topic_of(topics)
    await _produce_case(kafka_bootstrap, topic, case, range(6))
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(bridge_env):
        await eventually(lambda: all_committed(kafka_bootstrap, group, topic), what="all offsets committed")

    delivered = _delivered(fake_apis, case)
    received = {ident: (body, request) for ident, body, request in delivered}
    assert len(delivered) == 6, "each record is delivered once when nothing fails"
    for i in range(6):
        method, path, query, body = case.expected(i, False)
        share, request = received[case.identity(query, body)]
        assert (request.method, request.path, request.query) == (method, path, query)
        assert share == body
        assert request.headers["content-type"] == "application/json"
        if case.endpoint == "update_log":
            assert request.headers["x-api-key"] == HUMANLOOP_KEY
            assert "authorization" not in request.headers
        else:
            assert request.headers["authorization"] == f"Bearer {OPENLAYER_KEY}"
            assert "x-api-key" not in request.headers
    assert await read_all(kafka_bootstrap, topics.dlq(topic)) == []


@BY_KIND
async def test_rejected_record_is_dead_lettered_with_its_evidence(
    case: Case, kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    topic = case.topic_of(topics)
    fake_apis.reject_when(case.endpoint, is_marked, Fault(status=422, body={"code": 422, "error": "bad row x1"}))
    await _produce_case(kafka_bootstrap, topic, case, range(5), rejected=frozenset({2}))
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(bridge_env):
        await eventually(lambda: all_committed(kafka_bootstrap, group, topic), what="all offsets committed")

    assert len(_delivered(fake_apis, case)) == 4
    letters = await read_all(kafka_bootstrap, topics.dlq(topic))
    assert len(letters) == 1
    (letter,) = letters
    originals = {r.offset: r for r in await read_all(kafka_bootstrap, topic) if r.key == b"k2"}
    (original,) = originals.values()
    assert (letter.key, letter.value, letter.timestamp) == (original.key, original.value, original.timestamp)
    assert letter.partition == original.partition
    headers = _header_map(letter.headers)
    assert headers["__connect.errors.topic"] == topic
    assert headers["__connect.errors.partition"] == str(original.partition)
    assert headers["__connect.errors.offset"] == str(original.offset)
    assert headers["__connect.errors.stage"] == "TASK_PUT"
    assert headers["__connect.errors.exception.class.name"] == "RejectedError"
    assert headers["bridge.reason"] == "http-422"
    assert headers["bridge.http.status"] == "422"
    assert headers["bridge.http.method"] == case.expected(2, True)[0]
    assert "bad row x1" in headers["bridge.http.response.body"]
    assert headers["bridge.http.url"].startswith(fake_apis.base_url)
    everything = repr(letter.headers)
    assert OPENLAYER_KEY not in everything
    assert HUMANLOOP_KEY not in everything


@BY_KIND
async def test_headers_without_a_value_are_kept_and_stop_nothing(
    case: Case, kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    """Kafka allows a header without a value: the service stopped on such a record, and again on every restart.
    Now the record is delivered, and one that is refused is dead-lettered with that header as it was."""
    topic = case.topic_of(topics)
    fake_apis.reject_when(case.endpoint, is_marked, Fault(status=422, body={"code": 422, "error": "bad row"}))
    values = [ENCODER.plain(case.kind, case.datum(i, i == 1)) for i in range(3)]
    headers: list[tuple[str, bytes | None]] = [("x-empty", None), ("traceparent", None), ("tracestate", None)]
    await produce(kafka_bootstrap, topic, values, keys=[f"k{i}".encode() for i in range(3)], headers=headers)
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(bridge_env):
        await eventually(lambda: all_committed(kafka_bootstrap, group, topic), what="all offsets committed")

    assert len(_delivered(fake_apis, case)) == 2
    (letter,) = await read_all(kafka_bootstrap, topics.dlq(topic))
    assert list(letter.headers)[:3] == headers


async def test_a_record_near_the_size_limit_is_dead_lettered_with_its_evidence_trimmed(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    """A record that fits its topic (the broker's default of about 1 MiB) and is refused with a long answer: with
    its evidence the letter is over what the DLQ takes; it goes again, trimmed, instead of stopping the service.
    An ordinary letter goes to the same DLQ partition first and one after: the broker refusing a batch of the
    idempotent producer would make it refuse the producer's next batches there as out of order."""
    case = next(c for c in CASES if c.endpoint == "update_log")
    topic = case.topic_of(topics)
    fake_apis.reject_when(case.endpoint, is_marked, Fault(status=422, body={"code": 422, "error": "x" * 8000}))
    # One reference id: the three run in offset order (one key), and land in one partition.
    big = ENCODER.plain(case.kind, avro_io.log_update("ref-1", output="reject_me " + "x" * 1_046_000))
    small = [ENCODER.plain(case.kind, avro_io.log_update("ref-1", output=f"reject_me {n}")) for n in (1, 2)]
    await produce(kafka_bootstrap, topic, [small[0], big, small[1]], keys=[b"k-big"] * 3)
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(bridge_env):
        await eventually(lambda: all_committed(kafka_bootstrap, group, topic), what="all offsets committed")

    first, letter, last = await read_all(kafka_bootstrap, topics.dlq(topic))
    assert (first.value, letter.value, last.value) == (small[0], big, small[1])
    assert first.partition == letter.partition == last.partition
    headers = _header_map(letter.headers)
    assert headers["bridge.evidence.trimmed"] == "true"
    assert (headers["bridge.reason"], headers["bridge.http.status"]) == ("http-422", "422")
    assert "bridge.http.response.body" not in headers


@BY_KIND
async def test_transient_failures_are_retried_and_delivered_once(
    case: Case, kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    topic = case.topic_of(topics)
    fake_apis.script(
        case.endpoint,
        [
            Fault(status=503),
            Fault(status=503, headers={"Retry-After": "0"}),
            Fault(status=429, headers={"retry-after-ms": "50"}),
            Fault(reset=True),
            Fault(status=502),
        ],
    )
    await _produce_case(kafka_bootstrap, topic, case, range(3))
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(bridge_env):
        await eventually(lambda: all_committed(kafka_bootstrap, group, topic), what="all offsets committed")

    delivered = [ident for ident, _body, _request in _delivered(fake_apis, case)]
    assert len(delivered) == 3, "each record succeeds exactly once"
    assert len(set(delivered)) == 3
    assert fake_apis.pending_script(case.endpoint) == 0, "every scripted failure was met and retried"
    assert await read_all(kafka_bootstrap, topics.dlq(topic)) == []


@BY_KIND
async def test_undecodable_bytes_are_dead_lettered_and_the_rest_flows(
    case: Case, kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    topic = case.topic_of(topics)
    garbage = [os.urandom(64), b"", ENCODER.plain(case.kind, case.datum(0, False))[:5]]
    await produce(kafka_bootstrap, topic, garbage, partition=0)
    await _produce_case(kafka_bootstrap, topic, case, range(1, 4))
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(bridge_env):
        await eventually(lambda: all_committed(kafka_bootstrap, group, topic), what="all offsets committed")

    assert len(_delivered(fake_apis, case)) == 3
    letters = await read_all(kafka_bootstrap, topics.dlq(topic))
    assert sorted(bytes(letter.value or b"") for letter in letters) == sorted(garbage)
    for letter in letters:
        headers = _header_map(letter.headers)
        assert headers["__connect.errors.stage"] == "VALUE_CONVERTER"
        assert headers["__connect.errors.exception.class.name"] == "DecodeError"
        assert headers["bridge.reason"]
        assert headers["__connect.errors.exception.message"]


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_committed_offsets_equal_what_was_done_across_all_topics(
    event_loop: str,
    kafka_bootstrap: str,
    topics: Topics,
    fake_apis: FakeApiServer,
    bridge_env: dict[str, str],
    tmp_path: Path,
) -> None:
    for case in CASES:
        fake_apis.reject_when(case.endpoint, is_marked, Fault(status=400))
        await _produce_case(kafka_bootstrap, case.topic_of(topics), case, range(12), rejected=frozenset({3, 7}))
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    # As deployed: `python -m service`, which picks its event loop from the settings.
    log = tmp_path / "bridge.log"
    process = BridgeProcess({**bridge_env, "BRIDGE_DELIVERY__EVENT_LOOP": event_loop}, log)
    process.start()
    try:
        for case in CASES:
            topic = case.topic_of(topics)
            await eventually(partial(all_committed, kafka_bootstrap, group, topic), what=f"{topic} committed")
    finally:
        assert process.terminate() == 0, log.read_text()[-3000:]
    [running] = [line for line in map(json.loads, log.read_text().splitlines()) if line.get("msg") == "running"]
    assert running["event_loop"].split(".")[0] == event_loop

    for case in CASES:
        topic = case.topic_of(topics)
        done = len(_delivered(fake_apis, case)) + len(await read_all(kafka_bootstrap, topics.dlq(topic)))
        assert done == 12
        assert sum((await committed(kafka_bootstrap, group, topic)).values()) == 12
        assert len(await committed(kafka_bootstrap, group, topic)) <= PARTITIONS


@pytest.mark.parametrize("http_client", ["aiohttp", "httpx", "pyreqwest"])
async def test_ids_with_reserved_characters_stay_one_path_segment_and_one_query_value(
    http_client: str, kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    # Ids come from producers we do not control: none of these characters may add a path segment,
    # a query parameter or a fragment on the wire, whichever HTTP client sends the call.
    pipeline = "pipe/../admin?x=1#frag %é"
    inference_id = "inf&inferenceId=other#x /é"
    config = {"output_column_name": "output"}
    await produce(
        kafka_bootstrap,
        topics.inferences,
        [ENCODER.plain("inference", avro_io.inference(pipeline, {"output": "o"}, inference_id="i-1", config=config))],
    )
    await produce(
        kafka_bootstrap,
        topics.row_updates,
        [ENCODER.plain("row_update", avro_io.row_update(pipeline, inference_id, {"label": 1}))],
    )
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge({**bridge_env, "BRIDGE_DELIVERY__HTTP_CLIENT": http_client}):
        for topic in (topics.inferences, topics.row_updates):
            await eventually(partial(all_committed, kafka_bootstrap, group, topic), what=f"{topic} committed")

    [publish] = fake_apis.requests("publish")
    [update] = fake_apis.requests("update_row")
    for request, tail in ((publish, "/data-stream"), (update, "/rows")):
        prefix = "/openlayer/v1/inference-pipelines/"
        path = request.raw_path.partition("?")[0]  # aiohttp's raw_path carries the query too
        assert path.startswith(prefix)
        assert path.endswith(tail)
        segment = path.removeprefix(prefix).removesuffix(tail)
        assert not set(segment) & set("/?# "), f"{segment!r} must be one encoded path segment"
        assert request.pipeline_id == pipeline  # the server decodes it back to the producer's id
    assert update.query == {"inferenceId": inference_id}
    assert publish.status == update.status == 200
