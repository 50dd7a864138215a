"""The service as operators see it, on the real broker: metrics and probes tell the truth, an
outage opens the breaker and dead-letters nothing, and no secret ever leaves the process."""

from __future__ import annotations

import logging
from functools import partial

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.cases import CASES, HUMANLOOP_KEY, OPENLAYER_KEY, is_marked
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import Topics, running_bridge
from tests.support.fake_apis import FakeApiServer, Fault
from tests.support.kafka_broker import free_port
from tests.support.kafka_io import all_committed, committed, eventually, produce, read_all

pytestmark = pytest.mark.kafka

ENCODER = AvroEncoder()
LOG_CASE = next(c for c in CASES if c.endpoint == "update_log")
INFERENCE_CASE = next(c for c in CASES if c.endpoint == "publish")


async def _get(port: int, path: str) -> httpx.Response:
    # The service runs in this event loop: a blocking client here would wait for itself.
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def _samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = (await _get(port, "/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _value(port: int, name: str, **labels: str) -> float:
    """The sample's value; a KeyError when the service does not export it (absent is not zero)."""
    return (await _samples(port))[(name, frozenset(labels.items()))]


async def _metric_at_least(port: int, name: str, minimum: float, labels: dict[str, str]) -> bool:
    try:
        return await _value(port, name, **labels) >= minimum
    except (httpx.ConnectError, KeyError):  # the service is still starting, or has not counted it yet
        return False


async def test_metrics_and_probes_report_what_happened(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    port = free_port()
    env = {**bridge_env, "BRIDGE_OBSERVABILITY__HTTP_PORT": str(port)}
    topic = LOG_CASE.topic_of(topics)
    fake_apis.reject_when("update_log", is_marked, Fault(status=422))
    values = [ENCODER.plain("log_update", LOG_CASE.datum(i, i == 3)) for i in range(6)] + [b"\x01garbage"]
    await produce(kafka_bootstrap, topic, values)
    inferences = INFERENCE_CASE.topic_of(topics)
    await produce(
        kafka_bootstrap, inferences, [ENCODER.plain("inference", INFERENCE_CASE.datum(i, False)) for i in range(3)]
    )
    group = env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(env):
        await eventually(partial(all_committed, kafka_bootstrap, group, topic, inferences), what="drained")
        await eventually(partial(_metric_at_least, port, "bridge_records_consumed_total", 7, {"topic": topic}))
        assert (await _get(port, "/livez")).status_code == 200
        assert (await _get(port, "/readyz")).status_code == 200
        assert await _value(port, "bridge_records_delivered_total", topic=topic) == 5
        assert await _value(port, "bridge_records_dead_lettered_total", topic=topic, reason="http-422") == 1
        dead_decode = sum(
            v
            for (name, labels), v in (await _samples(port)).items()
            if name == "bridge_records_dead_lettered_total" and ("topic", topic) in labels
        )
        assert dead_decode == 2, "the 422 and the garbage"
        assert await _value(port, "bridge_api_calls_total", endpoint="update_log", status_class="2xx") == 5
        assert await _value(port, "bridge_api_calls_total", endpoint="update_log", status_class="4xx") == 1
        assert await _value(port, "bridge_breaker_open", destination="humanloop") == 0
        assert await _value(port, "bridge_api_last_success_timestamp_seconds", destination="humanloop") > 0
        assert await _value(port, "process_resident_memory_bytes") > 0
        assert await _value(port, "python_gc_collections_total", generation="0") >= 0
        assert await _value(port, "bridge_publish_batch_rows_sum") == 3
        assert (await _get(port, "/nope")).status_code == 404


async def test_an_outage_opens_the_breaker_and_dead_letters_nothing(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    port = free_port()
    env = {**bridge_env, "BRIDGE_OBSERVABILITY__HTTP_PORT": str(port)}
    topic = LOG_CASE.topic_of(topics)
    fake_apis.set_down("update_log")
    await produce(kafka_bootstrap, topic, [ENCODER.plain("log_update", LOG_CASE.datum(i, False)) for i in range(5)])
    group = env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(env):
        await eventually(partial(_metric_at_least, port, "bridge_breaker_open", 1, {"destination": "humanloop"}))
        await eventually(
            partial(
                _metric_at_least, port, "bridge_api_calls_total", 10, {"endpoint": "update_log", "status_class": "5xx"}
            )
        )
        assert await committed(kafka_bootstrap, group, topic) == {}, "nothing is committed during the outage"
        assert await _value(port, "bridge_breaker_open", destination="openlayer") == 0, "the other API is unaffected"
        fake_apis.set_down("update_log", down=False)
        await eventually(partial(all_committed, kafka_bootstrap, group, topic), what="drained after recovery")
        assert await _value(port, "bridge_breaker_open", destination="humanloop") == 0

    delivered = {r.query["reference_id"] for r in fake_apis.requests("update_log") if r.status == 200}
    assert len(delivered) == 5
    assert await read_all(kafka_bootstrap, topics.dlq(topic)) == []


async def test_api_keys_never_reach_logs_dead_letters_or_metrics(
    kafka_bootstrap: str,
    topics: Topics,
    fake_apis: FakeApiServer,
    bridge_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    env = {**bridge_env, "BRIDGE_OBSERVABILITY__HTTP_PORT": str(port), "BRIDGE_OBSERVABILITY__LOG_LEVEL": "DEBUG"}
    # Rejections whose bodies echo the key are the likeliest leak: the evidence is copied into headers.
    echo = Fault(status=422, body={"code": 401, "error": f"invalid key {OPENLAYER_KEY} / {HUMANLOOP_KEY}"})
    for case in CASES:
        fake_apis.reject_when(case.endpoint, is_marked, echo)
        values = [ENCODER.plain(case.kind, case.datum(i, i % 2 == 0)) for i in range(4)]
        await produce(kafka_bootstrap, case.topic_of(topics), values)
    group = env["BRIDGE_KAFKA__GROUP_ID"]
    caplog.set_level(logging.DEBUG)
    async with running_bridge(env):
        for topic in topics.all():
            await eventually(partial(all_committed, kafka_bootstrap, group, topic), what=f"{topic} drained")
        metrics_text = (await _get(port, "/metrics")).text

    letters = [letter for t in topics.all() for letter in await read_all(kafka_bootstrap, topics.dlq(t))]
    assert len(letters) == 6
    header_text = repr([letter.headers for letter in letters])
    assert "[REDACTED]" in header_text, "the echoed key was seen and replaced"
    formatted = "\n".join(caplog.handler.format(r) for r in caplog.records) + repr([r.__dict__ for r in caplog.records])
    for secret in (OPENLAYER_KEY, HUMANLOOP_KEY):
        assert secret not in header_text
        assert secret not in metrics_text
        assert secret not in formatted
