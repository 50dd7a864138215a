"""The table of streams agrees with everything that names a stream outside it: settings, schemas, the chart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.apis.openlayer import snake_to_camel
from service.config.kafka import TopicSettings
from service.config.settings import DEFAULT_SCHEMA_DIR
from service.core.events import EventKind, LogUpdate, NewInference, RowUpdate
from service.core.requests import RecordCoordinates
from service.streams import STREAMS, Router, Stream, by_topic, schema_set

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "helm" / "inference-bridge" / "templates" / "_helpers.tpl"
WHERE = RecordCoordinates(topic="t", partition=0, offset=7, timestamp_ms=0)
SAMPLES: dict[EventKind, Any] = {
    EventKind.INFERENCE: NewInference(pipeline_id="p", row={"a": 1}, inference_id="i"),
    EventKind.ROW_UPDATE: RowUpdate(pipeline_id="p", inference_id="i", row={"a": 1}),
    EventKind.LOG_UPDATE: LogUpdate(reference_id="r", output="o"),
}


def router() -> Router:
    return Router(
        openlayer_base_url="https://ol.test",
        humanloop_base_url="https://hl.test",
        pipeline_configs={},
        default_config={"outputColumnName": "o"},
        inference_id_column="inference_id",
    )


def test_each_event_kind_and_event_type_has_one_stream() -> None:
    assert sorted(s.kind for s in STREAMS) == sorted(EventKind)
    assert len({s.event for s in STREAMS}) == len(STREAMS)


def test_the_topic_settings_are_exactly_the_streams_settings_in_table_order() -> None:
    assert TopicSettings.source_settings() == [s.setting for s in STREAMS]


def test_by_topic_follows_the_configured_topic_names() -> None:
    topics = TopicSettings(inferences="a", row_updates="b", log_updates="c")

    assert {topic: s.kind for topic, s in by_topic(topics).items()} == {
        "a": EventKind.INFERENCE,
        "b": EventKind.ROW_UPDATE,
        "c": EventKind.LOG_UPDATE,
    }


def test_every_schema_file_exists_and_loads_with_its_decoder() -> None:
    schemas = schema_set(DEFAULT_SCHEMA_DIR)

    for stream in STREAMS:
        assert (DEFAULT_SCHEMA_DIR / stream.schema).is_file(), stream.schema
        assert stream.kind in schemas.decoders


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.setting)
def test_a_streams_route_builds_its_endpoint_for_its_destination_under_its_key(stream: Stream[Any, Any]) -> None:
    r = router()
    event = SAMPLES[stream.kind]

    request = stream.route(r.api(stream.destination), event, WHERE)

    assert isinstance(event, stream.event)
    assert request.endpoint is stream.endpoint
    assert request.destination is stream.destination is stream.endpoint.destination
    assert request.key == stream.ordering_key(event)
    assert r.route(event, WHERE) == request


def test_the_charts_topic_defaults_are_the_settings_defaults() -> None:
    """`inference-bridge.topics` lists each stream's values key (camelCase) and default topic, in table order."""
    template = HELPERS.read_text()
    body = template[template.index('define "inference-bridge.topics"') :]
    body = body[: body.index("{{- end }}")]
    listed = re.findall(r'dig "(\w+)" "([^"]+)" \$t', body)

    assert listed == [(snake_to_camel(s.setting), TopicSettings.model_fields[s.setting].default) for s in STREAMS]
