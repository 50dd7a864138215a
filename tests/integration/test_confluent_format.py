"""Confluent-framed records on the real broker: writer schemas come from a registry over HTTP,
evolved schemas resolve against the shipped ones, and a registry outage is waited out."""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import pytest

from tests.integration.cases import CASES
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import Topics, running_bridge
from tests.support.fake_apis import FakeApiServer
from tests.support.fake_registry import FakeSchemaRegistry
from tests.support.kafka_io import all_committed, committed, eventually, produce, read_all

pytestmark = pytest.mark.kafka

ENCODER = AvroEncoder()
LOG_CASE = next(c for c in CASES if c.endpoint == "update_log")


def _evolved_log_schema() -> dict[str, Any]:
    """The producer's newer schema: one more field, with a default, that the service does not know."""
    schema = copy.deepcopy(ENCODER.raw["log_update"])
    schema["fields"].append({"name": "model", "type": "string", "default": "unknown"})
    return schema


async def _registry_asked(registry: FakeSchemaRegistry, schema_id: int) -> bool:
    return registry.request_count(schema_id) >= 2


async def test_framed_records_with_an_evolved_schema_are_delivered(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    topic = LOG_CASE.topic_of(topics)
    with FakeSchemaRegistry() as registry:
        writer = _evolved_log_schema()
        schema_id = registry.register(f"{topic}-value", writer)
        values = [ENCODER.confluent(schema_id, writer, {**LOG_CASE.datum(i, False), "model": "gpt"}) for i in range(5)]
        unknown = ENCODER.confluent(schema_id + 100, writer, {**LOG_CASE.datum(9, False), "model": "gpt"})
        await produce(kafka_bootstrap, topic, [*values, unknown])
        env = {**bridge_env, "BRIDGE_SCHEMA_REGISTRY__URL": registry.url}
        group = env["BRIDGE_KAFKA__GROUP_ID"]
        async with running_bridge(env):
            await eventually(partial(all_committed, kafka_bootstrap, group, topic), what="drained")
        lookups = registry.request_count(schema_id)

    received = {r.query["reference_id"]: r.json for r in fake_apis.requests("update_log") if r.status == 200}
    for i in range(5):
        _method, _path, query, body = LOG_CASE.expected(i, False)
        assert received[query["reference_id"]] == body, "the unknown field is dropped, the rest arrives intact"
    assert lookups == 1, "the writer schema is fetched once and cached"
    (letter,) = await read_all(kafka_bootstrap, topics.dlq(topic))
    assert letter.value == unknown
    assert dict(letter.headers)["bridge.reason"] == b"unknown-schema-id"


async def test_a_registry_outage_is_waited_out_not_dead_lettered(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str]
) -> None:
    topic = LOG_CASE.topic_of(topics)
    with FakeSchemaRegistry() as registry:
        schema = ENCODER.raw["log_update"]
        schema_id = registry.register(f"{topic}-value", schema)
        registry.set_down()
        await produce(
            kafka_bootstrap, topic, [ENCODER.confluent(schema_id, schema, LOG_CASE.datum(i, False)) for i in range(3)]
        )
        env = {**bridge_env, "BRIDGE_SCHEMA_REGISTRY__URL": registry.url}
        group = env["BRIDGE_KAFKA__GROUP_ID"]
        async with running_bridge(env):
            await eventually(partial(_registry_asked, registry, schema_id), what="the registry was asked twice")
            assert await committed(kafka_bootstrap, group, topic) == {}, "nothing is committed while it is down"
            registry.set_down(down=False)
            await eventually(partial(all_committed, kafka_bootstrap, group, topic), what="drained after recovery")

    assert len({r.query["reference_id"] for r in fake_apis.requests("update_log") if r.status == 200}) == 3
    assert await read_all(kafka_bootstrap, topics.dlq(topic)) == []
