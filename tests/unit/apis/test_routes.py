"""Routes turn typed events into the exact request each API documents, or refuse them before a call is spent."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

from service.apis.openlayer import stable_inference_id
from service.core.errors import RouteError
from service.core.events import Event, LogUpdate, NewInference, RowUpdate
from service.core.requests import ApiRequest, Destination, Endpoint, RecordCoordinates
from service.streams import Router

OL = "https://openlayer.test/v1"
HL = "https://humanloop.test/v4"
PIPE = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
WHERE = RecordCoordinates(topic="inferences", partition=3, offset=1234, timestamp_ms=1_763_870_000_000)
PIPELINE_CONFIG = {"outputColumnName": "output", "inferenceIdColumnName": "id"}
DEFAULT_CONFIG = {"outputColumnName": "answer"}


def router(
    *,
    pipeline_configs: dict[str, dict[str, Any]] | None = None,
    default_config: dict[str, Any] | None = None,
    inference_id_column: str = "inference_id",
) -> Router:
    return Router(
        openlayer_base_url=OL,
        humanloop_base_url=HL,
        pipeline_configs={} if pipeline_configs is None else pipeline_configs,
        default_config=default_config,
        inference_id_column=inference_id_column,
    )


def body(request: ApiRequest) -> Any:
    return json.loads(request.body)


def route_error(r: Router, event: Event, where: RecordCoordinates = WHERE) -> RouteError:
    with pytest.raises(RouteError) as info:
        r.route(event, where)
    return info.value


# --- the three endpoints, byte for byte ----------------------------------------------------------------------


def test_publish_request() -> None:
    event = NewInference(
        pipeline_id=PIPE,
        row={"user_query": "meaning of life?", "output": "42", "tokens": 7, "cost": 0.02, "nested": {"a": [1, None]}},
        inference_id="7c1e4a0e",
        config={"outputColumnName": "output", "inferenceIdColumnName": "inference_id", "inputVariableNames": ["q"]},
    )

    request = router().route(event, WHERE)

    assert (request.endpoint, request.method) == (Endpoint.PUBLISH, "POST")
    assert request.url == f"{OL}/inference-pipelines/{PIPE}/data-stream"
    assert request.params == ()
    assert body(request) == {
        "rows": [
            {
                "user_query": "meaning of life?",
                "output": "42",
                "tokens": 7,
                "cost": 0.02,
                "nested": {"a": [1, None]},
                "inference_id": "7c1e4a0e",
            }
        ],
        "config": {"outputColumnName": "output", "inferenceIdColumnName": "inference_id", "inputVariableNames": ["q"]},
    }
    assert request.destination is Destination.OPENLAYER


def test_update_row_request() -> None:
    event = RowUpdate(
        pipeline_id=PIPE,
        inference_id="7c1e4a0e",
        row={"ground_truth": "42", "feedback": 1},
        config={"groundTruthColumnName": "ground_truth"},
    )

    request = router().route(event, WHERE)

    assert (request.endpoint, request.method) == (Endpoint.UPDATE_ROW, "PUT")
    assert request.url == f"{OL}/inference-pipelines/{PIPE}/rows"
    assert request.params == (("inferenceId", "7c1e4a0e"),)
    assert body(request) == {
        "row": {"ground_truth": "42", "feedback": 1},
        "config": {"groundTruthColumnName": "ground_truth"},
    }
    assert request.destination is Destination.OPENLAYER


def test_update_row_without_config_sends_null_config() -> None:
    request = router().route(RowUpdate(pipeline_id=PIPE, inference_id="i-1", row={"label": 1}), WHERE)

    assert body(request) == {"row": {"label": 1}, "config": None}


def test_update_row_ignores_the_operator_publish_configs() -> None:
    r = router(pipeline_configs={PIPE: PIPELINE_CONFIG}, default_config=DEFAULT_CONFIG)

    request = r.route(RowUpdate(pipeline_id=PIPE, inference_id="i-1", row={"label": 1}), WHERE)

    assert body(request)["config"] is None


def test_update_log_request() -> None:
    event = LogUpdate(reference_id="conv-8841-turn-3", output="Paris.", error="partial", duration=1.42)

    request = router().route(event, WHERE)

    assert (request.endpoint, request.method) == (Endpoint.UPDATE_LOG, "PATCH")
    assert request.url == f"{HL}/logs"
    assert request.params == (("reference_id", "conv-8841-turn-3"),)
    assert body(request) == {"output": "Paris.", "error": "partial", "duration": 1.42}
    assert request.destination is Destination.HUMANLOOP


# --- publish config: record > pipeline > default > no-config ----------------------------------------------------


RECORD_CONFIG = {"outputColumnName": "from-record", "inferenceIdColumnName": "id"}


@pytest.mark.parametrize(
    ("record_config", "pipeline_configs", "default_config", "expected"),
    [
        pytest.param(RECORD_CONFIG, {PIPE: PIPELINE_CONFIG}, DEFAULT_CONFIG, RECORD_CONFIG, id="record-wins"),
        pytest.param(None, {PIPE: PIPELINE_CONFIG}, DEFAULT_CONFIG, PIPELINE_CONFIG, id="pipeline-over-default"),
        pytest.param(None, {"other": PIPELINE_CONFIG}, DEFAULT_CONFIG, DEFAULT_CONFIG, id="default-for-others"),
        pytest.param(None, {}, DEFAULT_CONFIG, DEFAULT_CONFIG, id="default-only"),
        pytest.param(RECORD_CONFIG, {}, None, RECORD_CONFIG, id="record-only"),
        pytest.param({}, {PIPE: PIPELINE_CONFIG}, None, PIPELINE_CONFIG, id="empty-record-config-is-not-stated"),
    ],
)
def test_publish_config_fallback(
    record_config: dict[str, Any] | None,
    pipeline_configs: dict[str, dict[str, Any]],
    default_config: dict[str, Any] | None,
    expected: dict[str, Any],
) -> None:
    r = router(pipeline_configs=pipeline_configs, default_config=default_config)
    event = NewInference(pipeline_id=PIPE, row={"id": "row-1"}, config=record_config)

    sent = body(r.route(event, WHERE))["config"]

    # A config that names no id column gains the operator's (see test_config_names_the_inference_id_column).
    assert sent == {"inferenceIdColumnName": "inference_id", **expected}


@pytest.mark.parametrize(
    "pipeline_configs",
    [pytest.param({}, id="none-configured"), pytest.param({"other-pipeline": PIPELINE_CONFIG}, id="other-pipeline")],
)
def test_publish_without_any_config_is_a_route_error(pipeline_configs: dict[str, dict[str, Any]]) -> None:
    error = route_error(router(pipeline_configs=pipeline_configs), NewInference(pipeline_id=PIPE, row={"a": 1}))

    assert error.reason == "no-config"
    assert PIPE in str(error)


def test_routing_never_changes_the_operator_config() -> None:
    shared = {"outputColumnName": "output"}
    r = router(pipeline_configs={PIPE: shared}, inference_id_column="inference_id")

    first = body(r.route(NewInference(pipeline_id=PIPE, row={"a": 1}), WHERE))
    second = body(
        router(pipeline_configs={PIPE: shared}, inference_id_column="rid").route(
            NewInference(pipeline_id=PIPE, row={"a": 1}), WHERE
        )
    )

    assert shared == {"outputColumnName": "output"}
    assert first["config"]["inferenceIdColumnName"] == "inference_id"
    assert second["config"]["inferenceIdColumnName"] == "rid"


def test_routing_never_changes_the_event_row() -> None:
    row = {"a": 1}
    router(default_config=DEFAULT_CONFIG).route(NewInference(pipeline_id=PIPE, row=row), WHERE)

    assert row == {"a": 1}


# --- inference ids --------------------------------------------------------------------------------------------


def _published_row(r: Router, event: NewInference, where: RecordCoordinates = WHERE) -> dict[str, Any]:
    rows = body(r.route(event, where))["rows"]
    assert len(rows) == 1
    row: dict[str, Any] = rows[0]
    return row


def test_the_event_inference_id_wins_over_the_row_column() -> None:
    r = router(default_config=DEFAULT_CONFIG)

    row = _published_row(r, NewInference(pipeline_id=PIPE, row={"inference_id": "from-row"}, inference_id="ev-1"))

    assert row["inference_id"] == "ev-1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("row-id-9", "row-id-9", id="string"),
        pytest.param(42, "42", id="integer-as-string"),
    ],
)
def test_inference_id_from_the_row_column(value: object, expected: str) -> None:
    r = router(default_config=DEFAULT_CONFIG)

    row = _published_row(r, NewInference(pipeline_id=PIPE, row={"inference_id": value, "x": 1}))

    assert row == {"inference_id": expected, "x": 1}


def test_inference_id_from_the_column_the_config_names() -> None:
    r = router(pipeline_configs={PIPE: {"outputColumnName": "o", "inferenceIdColumnName": "rid"}})

    row = _published_row(r, NewInference(pipeline_id=PIPE, row={"rid": "custom-7", "inference_id": "ignored"}))

    assert row["rid"] == "custom-7"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="null"),
        pytest.param("", id="empty"),
        pytest.param(True, id="bool"),
        pytest.param(1.5, id="float"),
        pytest.param(["x"], id="list"),
    ],
)
def test_a_row_column_that_is_no_id_gets_the_derived_id(value: object) -> None:
    r = router(default_config=DEFAULT_CONFIG)

    row = _published_row(r, NewInference(pipeline_id=PIPE, row={"inference_id": value}))

    assert row["inference_id"] == stable_inference_id(WHERE)


def test_derived_id_is_stable_for_the_same_record() -> None:
    r = router(default_config=DEFAULT_CONFIG)
    event = NewInference(pipeline_id=PIPE, row={"x": 1})
    same_record_later = RecordCoordinates(WHERE.topic, WHERE.partition, WHERE.offset, WHERE.timestamp_ms + 60_000)

    first = _published_row(r, event)["inference_id"]
    again = _published_row(r, event)["inference_id"]
    redelivered = _published_row(r, event, same_record_later)["inference_id"]

    assert first == again == redelivered
    assert isinstance(first, str)
    assert first


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(
            RecordCoordinates(WHERE.topic, WHERE.partition, WHERE.offset + 1, WHERE.timestamp_ms), id="offset"
        ),
        pytest.param(RecordCoordinates(WHERE.topic, WHERE.partition + 1, WHERE.offset, WHERE.timestamp_ms), id="part"),
        pytest.param(RecordCoordinates("other-topic", WHERE.partition, WHERE.offset, WHERE.timestamp_ms), id="topic"),
    ],
)
def test_derived_id_differs_for_a_different_record(other: RecordCoordinates) -> None:
    assert stable_inference_id(other) != stable_inference_id(WHERE)


@pytest.mark.parametrize(
    "where", [WHERE, RecordCoordinates("inferences.v2", 0, 0, 0), RecordCoordinates("é/ü", 11, 2**40, 0)]
)
def test_derived_id_is_the_uuid5_of_the_record_coordinates(where: RecordCoordinates) -> None:
    # Redelivered rows must keep the ids earlier releases gave them: uuid5 of "topic/partition/offset"
    # in the bridge's own namespace.
    namespace = uuid.UUID("6f1d2c1e-4b0a-5d7e-9a51-2f3c8b7e1d40")
    expected = uuid.uuid5(namespace, f"{where.topic}/{where.partition}/{where.offset}")

    assert stable_inference_id(where) == str(expected)


def test_derived_ids_do_not_collide_over_many_offsets() -> None:
    ids = {stable_inference_id(RecordCoordinates("t", 0, offset, 0)) for offset in range(5000)}

    assert len(ids) == 5000


@pytest.mark.parametrize(
    ("configured", "id_column"),
    [
        pytest.param({"outputColumnName": "o"}, "inference_id", id="gains-operator-column"),
        pytest.param({"outputColumnName": "o", "inferenceIdColumnName": "rid"}, "rid", id="keeps-config-column"),
    ],
)
def test_config_names_the_inference_id_column(configured: dict[str, Any], id_column: str) -> None:
    r = router(pipeline_configs={PIPE: configured})

    sent = body(r.route(NewInference(pipeline_id=PIPE, row={"x": 1}), WHERE))

    assert sent["config"] == {**configured, "inferenceIdColumnName": id_column}
    assert sent["rows"][0][id_column] == stable_inference_id(WHERE)


@pytest.mark.parametrize("bad", [pytest.param("", id="empty"), pytest.param(7, id="not-a-string")])
def test_a_config_with_an_unusable_id_column_is_a_route_error(bad: object) -> None:
    event = NewInference(pipeline_id=PIPE, row={"x": 1}, config={"outputColumnName": "o", "inferenceIdColumnName": bad})

    assert route_error(router(), event).reason == "invalid-config"


# --- update row size bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "reason"),
    [pytest.param(0, "row-empty", id="0-columns"), pytest.param(101, "row-too-large", id="101-columns")],
)
def test_update_row_column_bounds(columns: int, reason: str) -> None:
    event = RowUpdate(pipeline_id=PIPE, inference_id="i", row={f"c{i}": i for i in range(columns)})

    error = route_error(router(), event)

    assert error.reason == reason
    assert str(columns) in str(error)


@pytest.mark.parametrize("columns", [1, 100])
def test_update_row_within_bounds_is_routed(columns: int) -> None:
    row = {f"c{i}": i for i in range(columns)}

    request = router().route(RowUpdate(pipeline_id=PIPE, inference_id="i", row=row), WHERE)

    assert body(request)["row"] == row


# --- log update body --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(LogUpdate("r"), {}, id="all-none-sends-empty-object"),
        pytest.param(LogUpdate("r", output="out"), {"output": "out"}, id="output-only"),
        pytest.param(LogUpdate("r", error="boom"), {"error": "boom"}, id="error-only"),
        pytest.param(LogUpdate("r", duration=0.0), {"duration": 0.0}, id="zero-duration"),
        pytest.param(LogUpdate("r", output="", duration=30.0), {"output": "", "duration": 30.0}, id="empty-output"),
    ],
)
def test_log_update_omits_none_fields(event: LogUpdate, expected: dict[str, Any]) -> None:
    request = router().route(event, WHERE)

    assert body(request) == expected
    assert request.body.startswith(b"{")


# --- URLs stay within their path -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pipeline_id", "segment"),
    [
        pytest.param("a/b", "a%2Fb", id="slash"),
        pytest.param("a?b=c", "a%3Fb%3Dc", id="question-mark"),
        pytest.param("../admin", "..%2Fadmin", id="dot-dot"),
        pytest.param("a#b", "a%23b", id="hash"),
        pytest.param("a b", "a%20b", id="space"),
    ],
)
def test_pipeline_id_is_percent_encoded_in_the_path(pipeline_id: str, segment: str) -> None:
    r = router(default_config=DEFAULT_CONFIG)

    publish = r.route(NewInference(pipeline_id=pipeline_id, row={"x": 1}), WHERE)
    update = r.route(RowUpdate(pipeline_id=pipeline_id, inference_id="i", row={"x": 1}), WHERE)

    assert publish.url == f"{OL}/inference-pipelines/{segment}/data-stream"
    assert update.url == f"{OL}/inference-pipelines/{segment}/rows"


def test_query_values_are_passed_raw_for_the_client_to_encode() -> None:
    r = router()

    update = r.route(RowUpdate(pipeline_id=PIPE, inference_id="a&b=c d", row={"x": 1}), WHERE)
    log = r.route(LogUpdate(reference_id="conv/1?x=2"), WHERE)

    assert update.params == (("inferenceId", "a&b=c d"),)
    assert log.params == (("reference_id", "conv/1?x=2"),)
    assert "?" not in update.url
    assert "?" not in log.url


# --- ordering keys and secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "key"),
    [
        pytest.param(NewInference(pipeline_id=PIPE, row={"x": 1}), PIPE, id="publish-by-pipeline"),
        pytest.param(RowUpdate(pipeline_id=PIPE, inference_id="i-9", row={"x": 1}), f"{PIPE}/i-9", id="row-by-id"),
        pytest.param(LogUpdate(reference_id="ref-3", output="o"), "ref-3", id="log-by-reference"),
    ],
)
def test_request_key(event: Event, key: str) -> None:
    assert router(default_config=DEFAULT_CONFIG).route(event, WHERE).key == key


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(NewInference(pipeline_id=PIPE, row={"x": 1}), id="publish"),
        pytest.param(RowUpdate(pipeline_id=PIPE, inference_id="i", row={"x": 1}), id="update-row"),
        pytest.param(LogUpdate(reference_id="r", output="o"), id="update-log"),
    ],
)
def test_an_api_request_carries_no_auth_header(event: Event) -> None:
    request = router(default_config=DEFAULT_CONFIG).route(event, WHERE)

    assert not hasattr(request, "headers")
    text = repr(request).lower()
    for marker in ("authorization", "bearer", "x-api-key"):
        assert marker not in text


@pytest.mark.parametrize(
    "row",
    [pytest.param({"x": {1, 2}}, id="set-value"), pytest.param({"x": {1: "a"}}, id="non-string-key")],
)
def test_a_row_json_cannot_carry_is_a_route_error(row: dict[str, Any]) -> None:
    event = RowUpdate(pipeline_id=PIPE, inference_id="i", row=row)

    assert route_error(router(), event).reason == "unserialisable"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_number_json_cannot_carry_is_sent_as_null(value: float) -> None:
    """JSON has no NaN or infinity: as pandas' to_json writes them (the Openlayer SDK's data frames go that way),
    not a refused record (docs/semantics.md, Records in)."""
    event = NewInference(pipeline_id=PIPE, row={"score": value, "nested": [value, 1.5]}, inference_id="i-1")

    row = _published_row(router(default_config=DEFAULT_CONFIG), event)

    assert (row["score"], row["nested"]) == (None, [None, 1.5])


@pytest.mark.parametrize(
    ("endpoint", "destination", "is_update"),
    [
        pytest.param(Endpoint.PUBLISH, Destination.OPENLAYER, False, id="publish"),
        pytest.param(Endpoint.UPDATE_ROW, Destination.OPENLAYER, True, id="update-row"),
        pytest.param(Endpoint.UPDATE_LOG, Destination.HUMANLOOP, True, id="update-log"),
    ],
)
def test_endpoint_destination_and_update_flag(endpoint: Endpoint, destination: Destination, is_update: bool) -> None:
    assert (endpoint.destination, endpoint.is_update) == (destination, is_update)


# --- rows for batching ------------------------------------------------------------------------------------------


def test_rows_published_together_form_one_request_body() -> None:
    r = router(pipeline_configs={PIPE: {"outputColumnName": "o"}})
    first = r.publish_row(NewInference(pipeline_id=PIPE, row={"n": 1}, inference_id="a"), WHERE)
    second = r.publish_row(NewInference(pipeline_id=PIPE, row={"n": 2}, inference_id="b"), WHERE)

    request = r.publish_request(PIPE, first.config_json, [first.row_json, second.row_json])

    assert request.url == f"{OL}/inference-pipelines/{PIPE}/data-stream"
    assert body(request) == {
        "rows": [{"n": 1, "inference_id": "a"}, {"n": 2, "inference_id": "b"}],
        "config": {"outputColumnName": "o", "inferenceIdColumnName": "inference_id"},
    }


def test_equal_configs_share_a_batch_key_whatever_their_key_order() -> None:
    r = router()
    config_a = {"outputColumnName": "o", "inputVariableNames": ["q"]}
    config_b = {"inputVariableNames": ["q"], "outputColumnName": "o"}
    other = {"outputColumnName": "other"}

    key_a = r.publish_row(NewInference(pipeline_id=PIPE, row={"x": 1}, config=config_a), WHERE).batch_key
    key_b = r.publish_row(NewInference(pipeline_id=PIPE, row={"x": 2}, config=config_b), WHERE).batch_key
    key_other = r.publish_row(NewInference(pipeline_id=PIPE, row={"x": 3}, config=other), WHERE).batch_key
    key_pipe = r.publish_row(NewInference(pipeline_id="p2", row={"x": 4}, config=config_a), WHERE).batch_key

    assert key_a == key_b
    assert len({key_a, key_other, key_pipe}) == 3


def test_each_records_config_is_sent_as_it_is_even_when_configs_come_and_go() -> None:
    r = router()
    for n in range(200):
        # A fresh dict each time, freed right after: CPython reuses its id, which a cache keyed
        # by id alone would confuse with the previous config.
        event = NewInference(pipeline_id=PIPE, row={"x": n}, inference_id=f"i{n}", config={"outputColumnName": f"o{n}"})
        row = r.publish_row(event, WHERE)
        assert json.loads(row.config_json) == {"outputColumnName": f"o{n}", "inferenceIdColumnName": "inference_id"}
        del event, row


def test_a_shared_config_object_is_serialised_once() -> None:
    r = router()
    config = {"outputColumnName": "o"}
    rows = [
        r.publish_row(NewInference(pipeline_id=PIPE, row={"x": n}, inference_id=f"i{n}", config=config), WHERE)
        for n in range(3)
    ]

    assert rows[0].config_json is rows[1].config_json is rows[2].config_json
