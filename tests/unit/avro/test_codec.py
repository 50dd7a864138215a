"""The codec: both wire formats for every event kind, evolution, strictness, lossless values, config mapping.

The registry is a real `SchemaRegistry` over `httpx.MockTransport`, so these tests cover the codec's use of
it without a server; the registry's own behaviour is in tests/unit/avro/test_registry.py.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastavro import parse_schema, schemaless_writer

from service.apis.openlayer import ConfigShape, snake_to_camel
from service.avro.codec import AvroCodec
from service.avro.registry import SchemaRegistry
from service.avro.schemas import SchemaSet
from service.config.settings import DEFAULT_SCHEMA_DIR
from service.core.errors import DecodeError, RegistryUnavailable, RouteError
from service.core.events import Event, EventKind, LogUpdate, NewInference, RowUpdate
from service.streams import schema_set

PIPELINE = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
Json = dict[str, Any]


def raw_schema(kind: EventKind) -> Json:
    schema: Json = orjson.loads((DEFAULT_SCHEMA_DIR / f"{kind.value}.avsc").read_bytes())
    return schema


def plain(kind: EventKind, record: Json, schema: Json | None = None) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema or raw_schema(kind)), record)
    return buf.getvalue()


def framed(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


class FakeRegistryTransport:
    """Answers GET /schemas/ids/{id} like a Confluent registry, from a dict, and counts requests."""

    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}
        self.requests = 0
        self.status: int | None = None

    def register(self, schema_id: int, schema: Json) -> int:
        self.schemas[schema_id] = orjson.dumps(schema).decode()
        return schema_id

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.status is not None:
            return httpx.Response(self.status, json={"error_code": 50301, "message": "unavailable"})
        schema_id = int(request.url.path.rsplit("/", 1)[1])
        if schema_id not in self.schemas:
            return httpx.Response(404, json={"error_code": 40403, "message": "Schema not found"})
        return httpx.Response(200, json={"schema": self.schemas[schema_id]})


# One sample per kind: (record as a producer writes it, the event the codec must give back).
SAMPLES: dict[EventKind, tuple[Json, Event]] = {
    EventKind.INFERENCE: (
        {
            "inference_pipeline_id": PIPELINE,
            "row": {"user_query": "what is the meaning of life?", "output": "42", "tokens": 7, "cost": 0.02},
            "inference_id": "inf-1",
            "config": {"output_column_name": "output", "num_of_token_column_name": "tokens"},
        },
        NewInference(
            pipeline_id=PIPELINE,
            row={"user_query": "what is the meaning of life?", "output": "42", "tokens": 7, "cost": 0.02},
            inference_id="inf-1",
            config={"outputColumnName": "output", "numOfTokenColumnName": "tokens"},
        ),
    ),
    EventKind.ROW_UPDATE: (
        {
            "inference_pipeline_id": PIPELINE,
            "inference_id": "832y98d3",
            "row": {"ground_truth": "The sun is 94.471 million miles from the earth."},
            "config": {"ground_truth_column_name": "ground_truth"},
        },
        RowUpdate(
            pipeline_id=PIPELINE,
            inference_id="832y98d3",
            row={"ground_truth": "The sun is 94.471 million miles from the earth."},
            config={"groundTruthColumnName": "ground_truth"},
        ),
    ),
    EventKind.LOG_UPDATE: (
        {"reference_id": "conv-8841-turn-3", "output": "Paris is the capital of France.", "duration": 1.42},
        LogUpdate(reference_id="conv-8841-turn-3", output="Paris is the capital of France.", duration=1.42),
    ),
}


@pytest.fixture(scope="module")
def schemas() -> SchemaSet:
    return schema_set(DEFAULT_SCHEMA_DIR)


@pytest.fixture
def transport() -> FakeRegistryTransport:
    return FakeRegistryTransport()


@pytest.fixture
async def registry(transport: FakeRegistryTransport) -> AsyncIterator[SchemaRegistry]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(transport)) as client:
        yield SchemaRegistry(client, "http://registry.test")


@pytest.fixture
def codec(schemas: SchemaSet) -> AvroCodec:
    """Auto mode without a registry: plain Avro only."""
    return AvroCodec(schemas)


@pytest.fixture
def plain_codec(schemas: SchemaSet) -> AvroCodec:
    return AvroCodec(schemas, wire_format="plain")


@pytest.fixture
def confluent_codec(schemas: SchemaSet, registry: SchemaRegistry) -> AvroCodec:
    return AvroCodec(schemas, registry)


async def decode_error(codec: AvroCodec, kind: EventKind, value: bytes | None) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        await codec.decode(kind, value)
    return caught.value


async def decode_inference(codec: AvroCodec, record: Json) -> NewInference:
    event = await codec.decode(EventKind.INFERENCE, plain(EventKind.INFERENCE, record))
    assert isinstance(event, NewInference)
    return event


# -- wire formats -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EventKind))
async def test_plain_avro_decodes_each_kind(codec: AvroCodec, kind: EventKind) -> None:
    record, event = SAMPLES[kind]
    assert await codec.decode(kind, plain(kind, record)) == event


@pytest.mark.parametrize("kind", list(EventKind))
@pytest.mark.parametrize("wire_format", ["auto", "confluent"])
async def test_confluent_framing_decodes_each_kind(
    schemas: SchemaSet,
    registry: SchemaRegistry,
    transport: FakeRegistryTransport,
    kind: EventKind,
    wire_format: Any,
) -> None:
    codec = AvroCodec(schemas, registry, wire_format)
    schema_id = transport.register(21, raw_schema(kind))
    record, event = SAMPLES[kind]
    assert await codec.decode(kind, framed(schema_id, plain(kind, record))) == event


async def test_writer_schema_is_fetched_once_per_id(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    kind = EventKind.LOG_UPDATE
    value = framed(transport.register(3, raw_schema(kind)), plain(kind, SAMPLES[kind][0]))
    for _ in range(5):
        await confluent_codec.decode(kind, value)
    assert transport.requests == 1


async def test_auto_mode_reads_plain_values_without_asking_the_registry(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    record, event = SAMPLES[EventKind.INFERENCE]
    assert await confluent_codec.decode(EventKind.INFERENCE, plain(EventKind.INFERENCE, record)) == event
    assert transport.requests == 0


async def test_auto_mode_without_registry_names_the_missing_registry(codec: AvroCodec) -> None:
    kind = EventKind.LOG_UPDATE
    error = await decode_error(codec, kind, framed(1, plain(kind, SAMPLES[kind][0])))
    assert error.reason == "no-schema-registry"
    assert "registry" in error.message


async def test_forced_plain_reads_a_framed_value_as_plain_and_says_it_may_be_framed(
    plain_codec: AvroCodec,
) -> None:
    kind = EventKind.LOG_UPDATE
    error = await decode_error(plain_codec, kind, framed(1, plain(kind, SAMPLES[kind][0])))
    assert error.reason in {"missing-field", "garbage-bytes", "truncated", "trailing-bytes"}
    assert "Confluent" in error.message


async def test_forced_confluent_rejects_a_value_without_the_magic_byte(
    schemas: SchemaSet, registry: SchemaRegistry, transport: FakeRegistryTransport
) -> None:
    codec = AvroCodec(schemas, registry, "confluent")
    kind = EventKind.INFERENCE
    error = await decode_error(codec, kind, plain(kind, SAMPLES[kind][0]))
    assert error.reason == "bad-magic-byte"
    assert transport.requests == 0


async def test_forced_confluent_rejects_a_value_shorter_than_the_header(
    schemas: SchemaSet, registry: SchemaRegistry
) -> None:
    codec = AvroCodec(schemas, registry, "confluent")
    assert (await decode_error(codec, EventKind.INFERENCE, b"\x00\x00\x01")).reason == "truncated"


def test_forced_confluent_needs_a_registry(schemas: SchemaSet) -> None:
    with pytest.raises(ValueError, match="registry"):
        AvroCodec(schemas, None, "confluent")


async def test_unknown_schema_id_is_a_decode_error(confluent_codec: AvroCodec) -> None:
    kind = EventKind.LOG_UPDATE
    error = await decode_error(confluent_codec, kind, framed(999, plain(kind, SAMPLES[kind][0])))
    assert error.reason == "unknown-schema-id"
    assert "999" in error.message


async def test_negative_schema_id_is_unknown_without_a_lookup(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    value = b"\x00\xff\xff\xff\xfe" + plain(EventKind.LOG_UPDATE, SAMPLES[EventKind.LOG_UPDATE][0])
    assert (await decode_error(confluent_codec, EventKind.LOG_UPDATE, value)).reason == "unknown-schema-id"
    assert transport.requests == 0


async def test_registry_outage_is_retryable_not_a_bad_record(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    kind = EventKind.LOG_UPDATE
    value = framed(transport.register(4, raw_schema(kind)), plain(kind, SAMPLES[kind][0]))
    transport.status = 503
    with pytest.raises(RegistryUnavailable):
        await confluent_codec.decode(kind, value)
    transport.status = None
    assert await confluent_codec.decode(kind, value) == SAMPLES[kind][1]


# -- schema evolution ---------------------------------------------------------------------------------------


def with_extra_field(kind: EventKind) -> Json:
    schema = raw_schema(kind)
    extra = {"name": "producer_version", "type": "string", "default": "", "doc": "added by a newer producer"}
    schema["fields"].insert(1, extra)
    return schema


def without_field(kind: EventKind, name: str) -> Json:
    schema = raw_schema(kind)
    schema["fields"] = [f for f in schema["fields"] if f["name"] != name]
    return schema


@pytest.mark.parametrize("kind", list(EventKind))
async def test_writer_with_an_added_field_still_decodes(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport, kind: EventKind
) -> None:
    writer = with_extra_field(kind)
    record, event = SAMPLES[kind]
    value = framed(transport.register(7, writer), plain(kind, {**record, "producer_version": "2.1"}, writer))
    assert await confluent_codec.decode(kind, value) == event


@pytest.mark.parametrize(
    ("kind", "missing", "expected"),
    [
        (EventKind.INFERENCE, "config", {"config": None}),
        (EventKind.INFERENCE, "inference_id", {"inference_id": None}),
        (EventKind.ROW_UPDATE, "config", {"config": None}),
        (EventKind.LOG_UPDATE, "duration", {"duration": None}),
    ],
)
async def test_writer_without_an_optional_field_gets_its_default(
    confluent_codec: AvroCodec,
    transport: FakeRegistryTransport,
    kind: EventKind,
    missing: str,
    expected: Json,
) -> None:
    writer = without_field(kind, missing)
    record = {k: v for k, v in SAMPLES[kind][0].items() if k != missing}
    event = await confluent_codec.decode(kind, framed(transport.register(8, writer), plain(kind, record, writer)))
    assert all(getattr(event, name) == value for name, value in expected.items())


async def test_writer_missing_a_required_field_is_incompatible(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    writer = without_field(EventKind.LOG_UPDATE, "reference_id")
    value = framed(transport.register(9, writer), plain(EventKind.LOG_UPDATE, {"output": "x"}, writer))
    error = await decode_error(confluent_codec, EventKind.LOG_UPDATE, value)
    assert error.reason == "incompatible-schema"
    assert "reference_id" in error.message


async def test_writer_with_a_changed_field_type_is_incompatible(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    writer = raw_schema(EventKind.LOG_UPDATE)
    writer["fields"][3]["type"] = ["null", "string"]  # duration as text
    value = framed(
        transport.register(10, writer),
        plain(EventKind.LOG_UPDATE, {"reference_id": "r", "duration": "1.5s"}, writer),
    )
    assert (await decode_error(confluent_codec, EventKind.LOG_UPDATE, value)).reason == "incompatible-schema"


async def test_another_events_schema_id_is_incompatible(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    # Plain Avro cannot tell these apart (see the next section); the registry's record name can.
    kind = EventKind.LOG_UPDATE
    value = framed(transport.register(11, raw_schema(kind)), plain(kind, SAMPLES[kind][0]))
    error = await decode_error(confluent_codec, EventKind.INFERENCE, value)
    assert error.reason == "incompatible-schema"


async def test_writer_that_differs_only_in_docs_needs_no_resolution(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport
) -> None:
    writer = copy.deepcopy(raw_schema(EventKind.INFERENCE))
    writer["doc"] = "registered by another team, with other words"
    record, event = SAMPLES[EventKind.INFERENCE]
    value = framed(transport.register(12, writer), plain(EventKind.INFERENCE, record, writer))
    assert await confluent_codec.decode(EventKind.INFERENCE, value) == event


# -- bad bytes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""])
async def test_empty_value_is_rejected(codec: AvroCodec, value: bytes | None) -> None:
    assert (await decode_error(codec, EventKind.INFERENCE, value)).reason == "empty-value"


@pytest.mark.parametrize(
    "value",
    [
        b"\x02a\x08\x00\x00",  # union branch 4 of a 2-branch union
        b"\x04\xff\xfe\x00\x00\x00",  # reference_id is not UTF-8
    ],
)
async def test_garbage_bytes_are_rejected(codec: AvroCodec, value: bytes) -> None:
    error = await decode_error(codec, EventKind.LOG_UPDATE, value)
    assert error.reason == "garbage-bytes"
    assert "byte" in error.message
    assert error.__cause__ is not None


async def test_every_truncation_is_rejected(plain_codec: AvroCodec) -> None:
    value = plain(EventKind.INFERENCE, SAMPLES[EventKind.INFERENCE][0])
    for size in range(1, len(value)):
        error = await decode_error(plain_codec, EventKind.INFERENCE, value[:size])
        assert error.reason in {"truncated", "garbage-bytes", "missing-field"}, size
    assert (await decode_error(plain_codec, EventKind.INFERENCE, value[: len(value) // 2])).reason == "truncated"


async def test_trailing_bytes_are_rejected(codec: AvroCodec) -> None:
    value = plain(EventKind.LOG_UPDATE, SAMPLES[EventKind.LOG_UPDATE][0]) + b"\x00"
    error = await decode_error(codec, EventKind.LOG_UPDATE, value)
    assert error.reason == "trailing-bytes"
    assert "another schema" in error.message


@pytest.mark.parametrize(("written", "read_as"), list(itertools.permutations(EventKind, 2)))
async def test_another_events_bytes_are_rejected(codec: AvroCodec, written: EventKind, read_as: EventKind) -> None:
    await decode_error(codec, read_as, plain(written, SAMPLES[written][0]))


async def test_minimal_records_of_another_kind_are_caught_by_the_content_checks(codec: AvroCodec) -> None:
    # A NewInference with an empty row has the very bytes of a LogUpdate that sets nothing; both are refused.
    value = plain(EventKind.LOG_UPDATE, {"reference_id": "r"})
    assert (await decode_error(codec, EventKind.INFERENCE, value)).reason == "missing-field"
    assert (await decode_error(codec, EventKind.LOG_UPDATE, value)).reason == "missing-field"


# -- ids and content ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (EventKind.INFERENCE, "inference_pipeline_id"),
        (EventKind.INFERENCE, "inference_id"),
        (EventKind.ROW_UPDATE, "inference_pipeline_id"),
        (EventKind.ROW_UPDATE, "inference_id"),
        (EventKind.LOG_UPDATE, "reference_id"),
    ],
)
async def test_empty_ids_are_missing_fields(plain_codec: AvroCodec, kind: EventKind, field: str) -> None:
    error = await decode_error(plain_codec, kind, plain(kind, {**SAMPLES[kind][0], field: ""}))
    assert error.reason == "missing-field"
    assert field in error.message


@pytest.mark.parametrize("bad_id", ["line\nbreak", "nul\x00", "x" * 1025])
async def test_implausible_ids_are_invalid(codec: AvroCodec, bad_id: str) -> None:
    value = plain(EventKind.LOG_UPDATE, {**SAMPLES[EventKind.LOG_UPDATE][0], "reference_id": bad_id})
    assert (await decode_error(codec, EventKind.LOG_UPDATE, value)).reason == "invalid-field"


@pytest.mark.parametrize("duration", [-0.5, math.inf, math.nan])
async def test_durations_must_be_finite_and_not_negative(codec: AvroCodec, duration: float) -> None:
    value = plain(EventKind.LOG_UPDATE, {"reference_id": "r", "duration": duration})
    assert (await decode_error(codec, EventKind.LOG_UPDATE, value)).reason == "invalid-field"


async def test_log_update_keeps_only_what_is_set(codec: AvroCodec) -> None:
    value = plain(EventKind.LOG_UPDATE, {"reference_id": "r", "error": "upstream timeout", "duration": 0.0})
    assert await codec.decode(EventKind.LOG_UPDATE, value) == LogUpdate("r", error="upstream timeout", duration=0.0)


@pytest.mark.parametrize("kind", [EventKind.INFERENCE, EventKind.ROW_UPDATE])
async def test_empty_row_is_a_missing_field(codec: AvroCodec, kind: EventKind) -> None:
    error = await decode_error(codec, kind, plain(kind, {**SAMPLES[kind][0], "row": {}}))
    assert error.reason == "missing-field"
    assert "row" in error.message


# -- lossless values ---------------------------------------------------------------------------------------


def same_types(left: Any, right: Any) -> bool:
    """Equal, and of the same type all the way down (so True is not 1 and 1.0 is not 1)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(same_types(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(same_types(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float) and math.isnan(left):
        return math.isnan(right)
    return bool(left == right)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        1,
        -1,
        2**63 - 1,
        -(2**63),
        0.0,
        1.0,
        -2.5,
        1e300,
        math.inf,
        math.nan,
        "",
        "naïve ✓ 日本",
        [],
        {},
        [1, 1.0, True, None, "1"],
        {"int": 1, "float": 1.0, "bool": True, "none": None},
        [[1, 2.0], {"a": False}],
        {"outer": {"inner": [1, 2.5, "x", None]}},
        [{"role": "user", "content": ["hi", 1, 2.0, True, None]}],
        [[[1, True], {"k": 1.0}]],
    ],
    ids=repr,
)
async def test_row_values_round_trip_exactly(codec: AvroCodec, value: Any) -> None:
    row = {"value": value, "other": 1}
    event = await decode_inference(codec, {"inference_pipeline_id": "p", "row": row})
    assert same_types(event.row, row)


def test_nesting_deeper_than_three_containers_fails_at_the_producer() -> None:
    too_deep = {"inference_pipeline_id": "p", "row": {"v": [{"content": [{"type": "text"}]}]}}
    with pytest.raises(ValueError, match="do not match"):
        plain(EventKind.INFERENCE, too_deep)


async def test_integers_beyond_64_bits_become_doubles_at_the_producer(codec: AvroCodec) -> None:
    # Documented in schemas/README.md: fastavro falls through to the double branch; send such numbers as text.
    record = {"inference_pipeline_id": "p", "row": {"big": 2**64}}
    event = await decode_inference(codec, record)
    assert same_types(event.row["big"], float(2**64))


async def test_metadata_values_round_trip_exactly(codec: AvroCodec) -> None:
    metadata = {"model": "gpt-4o", "temperature": 0.0, "seed": 7, "stream": False, "tags": ["a", 1], "x": {"y": [1]}}
    record = {"inference_pipeline_id": "p", "row": {"a": 1}, "config": {"metadata": metadata}}
    event = await decode_inference(codec, record)
    assert event.config is not None
    assert same_types(event.config["metadata"], metadata)


# -- config mapping ----------------------------------------------------------------------------------------

INFERENCE_CONFIG_KEYS = {
    "output_column_name": "outputColumnName",
    "input_variable_names": "inputVariableNames",
    "prompt": "prompt",
    "context_column_name": "contextColumnName",
    "question_column_name": "questionColumnName",
    "cost_column_name": "costColumnName",
    "num_of_token_column_name": "numOfTokenColumnName",
    "ground_truth_column_name": "groundTruthColumnName",
    "user_id_column_name": "userIdColumnName",
    "session_id_column_name": "sessionIdColumnName",
    "class_names": "classNames",
    "feature_names": "featureNames",
    "categorical_feature_names": "categoricalFeatureNames",
    "label_column_name": "labelColumnName",
    "predictions_column_name": "predictionsColumnName",
    "prediction_scores_column_name": "predictionScoresColumnName",
    "target_column_name": "targetColumnName",
    "text_column_name": "textColumnName",
    "inference_id_column_name": "inferenceIdColumnName",
    "latency_column_name": "latencyColumnName",
    "timestamp_column_name": "timestampColumnName",
    "metadata": "metadata",
}
ROW_UPDATE_CONFIG_KEYS = {
    "inference_id_column_name": "inferenceIdColumnName",
    "latency_column_name": "latencyColumnName",
    "timestamp_column_name": "timestampColumnName",
    "ground_truth_column_name": "groundTruthColumnName",
    "human_feedback_column_name": "humanFeedbackColumnName",
}


@pytest.mark.parametrize(("snake", "camel"), sorted({**INFERENCE_CONFIG_KEYS, **ROW_UPDATE_CONFIG_KEYS}.items()))
def test_snake_to_camel(snake: str, camel: str) -> None:
    assert snake_to_camel(snake) == camel


def config_value(field: str) -> Any:
    if field == "prompt":
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": None}]
    if field == "metadata":
        return {"team": "search"}
    if field.endswith("_names"):
        return [f"{field}-a", f"{field}-b"]
    return f"{field}-col"


def test_the_schemas_have_exactly_the_documented_config_fields() -> None:
    inference = next(f for f in raw_schema(EventKind.INFERENCE)["fields"] if f["name"] == "config")
    row_update = next(f for f in raw_schema(EventKind.ROW_UPDATE)["fields"] if f["name"] == "config")
    assert [f["name"] for f in inference["type"][1]["fields"]] == ["task_type", *INFERENCE_CONFIG_KEYS]
    assert [f["name"] for f in row_update["type"][1]["fields"]] == list(ROW_UPDATE_CONFIG_KEYS)


async def test_every_inference_config_key_is_camel_cased(codec: AvroCodec) -> None:
    config = {field: config_value(field) for field in INFERENCE_CONFIG_KEYS}
    record = {"inference_pipeline_id": "p", "row": {"a": 1}, "config": config}
    event = await decode_inference(codec, record)
    expected = {camel: config_value(snake) for snake, camel in INFERENCE_CONFIG_KEYS.items()}
    expected["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user"}]
    assert event.config == expected


async def test_every_row_update_config_key_is_camel_cased(codec: AvroCodec) -> None:
    record = {
        "inference_pipeline_id": "p",
        "inference_id": "i",
        "row": {"a": 1},
        "config": {field: config_value(field) for field in ROW_UPDATE_CONFIG_KEYS},
    }
    event = await codec.decode(EventKind.ROW_UPDATE, plain(EventKind.ROW_UPDATE, record))
    assert isinstance(event, RowUpdate)
    assert event.config == {camel: config_value(snake) for snake, camel in ROW_UPDATE_CONFIG_KEYS.items()}


@pytest.mark.parametrize("kind", [EventKind.INFERENCE, EventKind.ROW_UPDATE])
async def test_a_config_with_nothing_set_means_no_config(codec: AvroCodec, kind: EventKind) -> None:
    event = await codec.decode(kind, plain(kind, {**SAMPLES[kind][0], "config": {}}))
    assert isinstance(event, NewInference | RowUpdate)
    assert event.config is None


async def test_equal_configs_come_back_as_one_shared_object_and_distinct_ones_do_not(codec: AvroCodec) -> None:
    config = {"task_type": "LLM", "output_column_name": "o", "prompt": [{"role": "user", "content": "{{ q }}"}]}
    record = {"inference_pipeline_id": "p", "row": {"a": 1}, "config": config}
    other = {**record, "config": {**config, "output_column_name": "answer"}}

    first, again = await decode_inference(codec, record), await decode_inference(codec, record)
    different = await decode_inference(codec, other)

    assert first.config is again.config  # converted once, which lets the router serialise it once
    assert different.config == {**(first.config or {}), "outputColumnName": "answer"}


async def test_an_invalid_config_fails_every_time_it_is_seen(codec: AvroCodec) -> None:
    record = {"inference_pipeline_id": "p", "row": {"a": 1}, "config": {"task_type": "LLM", "class_names": ["a"]}}
    value = plain(EventKind.INFERENCE, record)

    for _ in range(2):
        with pytest.raises(RouteError, match="output_column_name"):
            await codec.decode(EventKind.INFERENCE, value)


def test_the_config_cache_stays_bounded(schemas: SchemaSet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.apis.openlayer.CONFIG_CACHE_SIZE", 3)
    shape = ConfigShape.of(schemas.reader(EventKind.INFERENCE))

    configs = [shape.to_api({"output_column_name": f"o{n}"}) for n in range(10)]

    assert configs == [{"outputColumnName": f"o{n}"} for n in range(10)]
    assert len(shape.cache) <= 3


# -- task_type validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"task_type": "LLM", "output_column_name": "o"}, {"outputColumnName": "o"}),
        (
            {"task_type": "TABULAR_CLASSIFICATION", "class_names": ["no", "yes"], "feature_names": ["age"]},
            {"classNames": ["no", "yes"], "featureNames": ["age"]},
        ),
        (
            {"task_type": "TABULAR_REGRESSION", "target_column_name": "y", "latency_column_name": "ms"},
            {"targetColumnName": "y", "latencyColumnName": "ms"},
        ),
        (
            {"task_type": "TEXT_CLASSIFICATION", "class_names": ["neg", "pos"], "text_column_name": "text"},
            {"classNames": ["neg", "pos"], "textColumnName": "text"},
        ),
        # Not stated: not checked, passed on as given.
        ({"class_names": ["a"], "output_column_name": "o"}, {"classNames": ["a"], "outputColumnName": "o"}),
    ],
)
async def test_valid_task_configs_pass_with_task_type_removed(codec: AvroCodec, config: Json, expected: Json) -> None:
    record = {"inference_pipeline_id": "p", "row": {"a": 1}, "config": config}
    event = await decode_inference(codec, record)
    assert event.config == expected


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"task_type": "LLM", "output_column_name": "o", "class_names": ["a"]}, ["class_names"]),
        ({"task_type": "LLM", "input_variable_names": ["q"]}, ["output_column_name"]),
        ({"task_type": "TABULAR_CLASSIFICATION", "feature_names": ["x"]}, ["class_names"]),
        ({"task_type": "TEXT_CLASSIFICATION", "class_names": ["a"], "feature_names": ["x"]}, ["feature_names"]),
        (
            {"task_type": "TABULAR_REGRESSION", "prompt": [{"role": "user"}], "text_column_name": "t"},
            ["prompt", "text_column_name"],
        ),
        ({"task_type": "TEXT_CLASSIFICATION", "target_column_name": "y"}, ["target_column_name", "class_names"]),
    ],
)
async def test_configs_that_contradict_their_task_type_are_invalid(
    codec: AvroCodec, config: Json, named: list[str]
) -> None:
    record = {"inference_pipeline_id": "p", "row": {"a": 1}, "config": config}
    with pytest.raises(RouteError) as caught:
        await codec.decode(EventKind.INFERENCE, plain(EventKind.INFERENCE, record))
    assert not isinstance(caught.value, DecodeError)
    assert caught.value.reason == "invalid-config"
    assert all(name in caught.value.message for name in named)
    assert config["task_type"] in caught.value.message


# -- schema files ------------------------------------------------------------------------------------------


def test_schema_set_refuses_a_directory_without_schemas(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"inference\.avsc"):
        schema_set(tmp_path)


@pytest.mark.parametrize("kind", list(EventKind))
def test_every_field_is_documented(kind: EventKind) -> None:
    def fields(schema: Any) -> list[Json]:
        if isinstance(schema, list):
            return [f for branch in schema for f in fields(branch)]
        if not isinstance(schema, dict):
            return []
        found = list(schema.get("fields", []))
        nested = [f for field in found for f in fields(field["type"])]
        return found + nested + fields(schema.get("items")) + fields(schema.get("values"))

    undocumented = [f["name"] for f in fields(raw_schema(kind)) if not f.get("doc")]
    assert undocumented == []


@pytest.mark.parametrize(
    ("value_type", "value"),
    [
        ({"type": "long", "logicalType": "timestamp-millis"}, 1_700_000_000_000),  # a Java producer's Instant
        ({"type": "long", "logicalType": "timestamp-micros"}, 1_700_000_000_000_000),
        ({"type": "long", "logicalType": "local-timestamp-millis"}, 1_700_000_000_000),
        ({"type": "int", "logicalType": "date"}, 19_675),
        ({"type": "int", "logicalType": "time-millis"}, 3_600_000),
        ({"type": "string", "logicalType": "uuid"}, "5b7c8a8e-2f0e-4a53-9d43-0d6c0a8b6f10"),
    ],
)
async def test_a_writers_logical_types_do_not_change_row_values(
    confluent_codec: AvroCodec, transport: FakeRegistryTransport, value_type: Json, value: Any
) -> None:
    """Row values reach the API as the producer wrote them: the shipped schemas have no logical types, and a
    writer's must not turn a long into a datetime (sent as an ISO-8601 string) on the way."""
    writer = raw_schema(EventKind.INFERENCE)
    for field in writer["fields"]:
        if field["name"] == "row":
            field["type"] = {"type": "map", "values": ["null", "string", value_type]}
    record, _ = SAMPLES[EventKind.INFERENCE]
    body = plain(EventKind.INFERENCE, {**record, "row": {"output": "42", "value": value}}, writer)

    event = await confluent_codec.decode(EventKind.INFERENCE, framed(transport.register(41, writer), body))

    assert isinstance(event, NewInference)
    assert event.row["value"] == value
    assert type(event.row["value"]) is type(value)
