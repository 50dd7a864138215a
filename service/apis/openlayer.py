"""Openlayer: the Publish-records and Update-record calls, and every rule that belongs to them.

Pure functions and values, no I/O and no secrets (delivery adds the auth header), so a request can be logged or
put in a dead-letter header as it is. What a record gets wrong that Openlayer would refuse anyway (no config
for its pipeline, a config that contradicts its `task_type`, an update row with no or too many columns) is a
`RouteError` here, before a call is spent on it. The decoders turn the Avro records of `schemas/inference.avsc`
and `schemas/row_update.avsc` into events, converting the snake_case config record into the API's camelCase keys.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import orjson

from service.apis.json import check_segment as _check_segment
from service.apis.json import segment as _segment
from service.apis.json import to_json as _json
from service.avro.codec import AvroRecord
from service.avro.registry import ParsedSchema
from service.core.errors import RouteError
from service.core.events import JsonObject, NewInference, RowUpdate
from service.core.requests import ApiRequest, Coordinates, Endpoint, PublishRow

MAX_UPDATE_COLUMNS = 100
"""Update record's `row` has maxProperties 100 (and minProperties 1)."""

# Stable ids for rows published without one: the same record (topic/partition/offset) always
# gets the same id, so a redelivery after a crash is recognisable downstream (Openlayer keeps the
# row under the id it is sent, so a second publish of one record carries the id of the first).
_INFERENCE_ID_NAMESPACE = uuid.UUID("6f1d2c1e-4b0a-5d7e-9a51-2f3c8b7e1d40")
_NAMESPACE_BYTES = _INFERENCE_ID_NAMESPACE.bytes

PREPARED_CONFIGS = 2048
"""Distinct configs the API keeps serialised; beyond that it starts over (bounded memory)."""
CONFIG_CACHE_SIZE: Final = 1024
"""Distinct record configs remembered per stream; real producers have a handful."""


@dataclass(frozen=True, slots=True)
class Openlayer:
    """Maps Openlayer's events to requests with the operator's base URL and per-pipeline configs."""

    base_url: str
    pipeline_configs: Mapping[str, JsonObject]
    default_config: JsonObject | None
    inference_id_column: str
    _prepared: dict[int, tuple[JsonObject, bytes, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def publish_config(self, event: NewInference) -> JsonObject:
        config = event.config or None  # a record's empty config states nothing
        if config is None:
            # `get` and not `or`: an operator's `{}` for a pipeline is a choice, not an absence.
            config = self.pipeline_configs.get(event.pipeline_id, self.default_config)
        if config is None:
            raise RouteError(
                f"no config for pipeline {event.pipeline_id!r}: the record carries none and the operator "
                "configured neither BRIDGE_OPENLAYER__PIPELINE_CONFIGS for it nor BRIDGE_OPENLAYER__DEFAULT_CONFIG",
                reason="no-config",
            )
        return config

    def publish_row(self, event: NewInference, where: Coordinates) -> PublishRow:
        """One row, serialised once, ready to share a Publish-records call with rows of the same batch."""
        config = self.publish_config(event)
        # Refused here, per record, rather than when its batch's URL is built.
        _check_segment(event.pipeline_id)
        # Configs are few long-lived objects: the operator's, and the codec's shared copies of the
        # configs records carry. Each is prepared once, by identity; holding the object in the
        # entry keeps its id from being reused while the entry lives.
        prepared = self._prepared.get(id(config))
        if prepared is None:
            if len(self._prepared) >= PREPARED_CONFIGS:
                self._prepared.clear()
            prepared = self._prepared[id(config)] = (config, *self._prepare_config(config))
        _, config_json, id_column = prepared
        row = dict(event.row)
        row[id_column] = event.inference_id or _as_id(row.get(id_column)) or stable_inference_id(where)
        return PublishRow(batch_key=(event.pipeline_id, config_json), row_json=_json(row))

    def _prepare_config(self, source: JsonObject) -> tuple[bytes, str]:
        config = dict(source)
        id_column = config.setdefault("inferenceIdColumnName", self.inference_id_column)
        if not isinstance(id_column, str) or not id_column:
            raise RouteError(
                f"config inferenceIdColumnName must be a column name, got {id_column!r}", reason="invalid-config"
            )
        # Sorted keys make equal configs byte-equal, so they land in the same batch.
        return _json(config, sort_keys=True), id_column

    def publish_request(self, pipeline_id: str, config_json: bytes, rows: Sequence[bytes]) -> ApiRequest:
        # The rows are already JSON; splicing them avoids serialising every row a second time.
        body = b'{"rows":[' + b",".join(rows) + b'],"config":' + config_json + b"}"
        return ApiRequest(
            endpoint=Endpoint.PUBLISH,
            method="POST",
            url=f"{self.base_url}/inference-pipelines/{_segment(pipeline_id)}/data-stream",
            params=(),
            body=body,
            key=pipeline_id,  # publish_key
        )

    def publish(self, event: NewInference, where: Coordinates) -> ApiRequest:
        """A Publish-records call for this one row (the pipeline batches rows instead: `publish_row`)."""
        row = self.publish_row(event, where)
        return self.publish_request(row.pipeline_id, row.config_json, [row.row_json])

    def update_row(self, event: RowUpdate, where: Coordinates) -> ApiRequest:
        """An Update-record call: late data for a row, addressed by pipeline and inference id.

        `where` is unused: every route takes the record's coordinates (a publish derives missing ids from them).
        """
        columns = len(event.row)
        if not 1 <= columns <= MAX_UPDATE_COLUMNS:
            raise RouteError(
                f"an update row must have 1..{MAX_UPDATE_COLUMNS} columns, this one has {columns}",
                reason="row-too-large" if columns else "row-empty",
            )
        return ApiRequest(
            endpoint=Endpoint.UPDATE_ROW,
            method="PUT",
            url=f"{self.base_url}/inference-pipelines/{_segment(event.pipeline_id)}/rows",
            params=(("inferenceId", event.inference_id),),
            body=_json({"row": event.row, "config": event.config}),
            key=row_key(event),
        )


def publish_key(event: NewInference) -> str:
    """What a Publish-records call addresses: its pipeline."""
    return event.pipeline_id


def row_key(event: RowUpdate) -> str:
    """What an Update-record call addresses: one row of one pipeline."""
    return f"{event.pipeline_id}/{event.inference_id}"


def stable_inference_id(where: Coordinates) -> str:
    """`uuid.uuid5(namespace, "topic/partition/offset")`, computed without the `UUID` object.

    Once per row without an id, and `uuid.uuid5` plus `str()` cost more than the hash itself.
    """
    digest = bytearray(
        # SHA-1 because RFC 4122 defines version-5 UUIDs with it; it names a row, it protects nothing.
        hashlib.sha1(
            _NAMESPACE_BYTES + f"{where.topic}/{where.partition}/{where.offset}".encode(), usedforsecurity=False
        ).digest()
    )
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _as_id(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


# --- decoding: the Avro records of schemas/inference.avsc and schemas/row_update.avsc -------------------------


def inference_decoder(schema: ParsedSchema) -> Callable[[AvroRecord], NewInference]:
    """Turns `Inference` records (read with `schema`) into `NewInference` events."""
    config = ConfigShape.of(schema)

    def decode(record: AvroRecord) -> NewInference:
        inference_id = record["inference_id"]
        return NewInference(
            pipeline_id=record.id("inference_pipeline_id"),
            row=record.row(),
            inference_id=None if inference_id is None else record.id("inference_id"),
            config=config.to_api(record["config"]),
        )

    return decode


def row_update_decoder(schema: ParsedSchema) -> Callable[[AvroRecord], RowUpdate]:
    """Turns `RowUpdate` records (read with `schema`) into `RowUpdate` events."""
    config = ConfigShape.of(schema)

    def decode(record: AvroRecord) -> RowUpdate:
        return RowUpdate(
            pipeline_id=record.id("inference_pipeline_id"),
            inference_id=record.id("inference_id"),
            row=record.row(),
            config=config.to_api(record["config"]),
        )

    return decode


def snake_to_camel(name: str) -> str:
    """`num_of_token_column_name` -> `numOfTokenColumnName`: Avro field names to the APIs' config keys."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True, slots=True)
class TaskRules:
    """The config keys one Openlayer task type accepts, and those it requires."""

    allowed: frozenset[str]
    required: frozenset[str]


def _keys(names: str) -> frozenset[str]:
    return frozenset(names.split())


_EVERY_TASK: Final = _keys("inferenceIdColumnName latencyColumnName timestampColumnName metadata")
TASK_RULES: Final[Mapping[str, TaskRules]] = MappingProxyType(
    {
        "LLM": TaskRules(
            allowed=_EVERY_TASK
            | _keys(
                "outputColumnName inputVariableNames prompt contextColumnName questionColumnName costColumnName"
                " numOfTokenColumnName groundTruthColumnName userIdColumnName sessionIdColumnName"
            ),
            required=_keys("outputColumnName"),
        ),
        "TABULAR_CLASSIFICATION": TaskRules(
            allowed=_EVERY_TASK
            | _keys(
                "classNames featureNames categoricalFeatureNames labelColumnName predictionsColumnName"
                " predictionScoresColumnName"
            ),
            required=_keys("classNames"),
        ),
        "TABULAR_REGRESSION": TaskRules(
            allowed=_EVERY_TASK | _keys("featureNames categoricalFeatureNames predictionsColumnName targetColumnName"),
            required=frozenset(),
        ),
        "TEXT_CLASSIFICATION": TaskRules(
            allowed=_EVERY_TASK
            | _keys("classNames labelColumnName predictionsColumnName predictionScoresColumnName textColumnName"),
            required=_keys("classNames"),
        ),
    }
)
"""Per Openlayer task type (the Avro TaskType symbols), which API config keys it takes and needs."""


@dataclass(frozen=True, slots=True)
class ConfigShape:
    """A config record's Avro fields and their API keys, derived from the reader schema itself."""

    keys: tuple[tuple[str, str], ...]
    """(Avro field, API key) for every field that goes to the API."""
    avro_names: Mapping[str, str]
    """API key -> Avro field, to name fields in producers' terms in error messages."""
    cache: dict[bytes, JsonObject] = field(default_factory=dict, compare=False, repr=False)
    """Converted configs by their record's JSON; invalid configs are not cached (they raise)."""

    @classmethod
    def of(cls, schema: ParsedSchema) -> ConfigShape:
        names = [name for name in _config_field_names(schema) if name != "task_type"]
        keys = tuple((name, snake_to_camel(name)) for name in names)
        return cls(keys=keys, avro_names=MappingProxyType({camel: snake for snake, camel in keys}))

    def to_api(self, record: Mapping[str, Any] | None) -> JsonObject | None:
        """The API config: camelCase keys, null fields dropped; None when nothing is set.

        Producers repeat one config on every record, so results are cached by the record's JSON:
        equal configs then come back as one shared object (never mutate it), which also lets the
        router serialise each distinct config once. JSON is the key because it is what the API
        gets: configs that serialise alike are sent alike.
        """
        if record is None:
            return None
        key = orjson.dumps(record)
        config = self.cache.get(key)
        if config is None:
            config = self._convert(record)
            if len(self.cache) >= CONFIG_CACHE_SIZE:
                self.cache.clear()  # a producer with ever-new configs: stay bounded, start over
            self.cache[key] = config
        return config or None

    def _convert(self, record: Mapping[str, Any]) -> JsonObject:
        config = {camel: value for snake, camel in self.keys if (value := record.get(snake)) is not None}
        prompt = config.get("prompt")
        if prompt is not None:
            config["prompt"] = [{k: v for k, v in message.items() if v is not None} for message in prompt]
        task_type = record.get("task_type")
        if task_type is not None:
            self._check_task(task_type, config)
        # An all-null config says nothing, so it means the same as no config: the operator's default.
        return config

    def _check_task(self, task_type: str, config: JsonObject) -> None:
        rules = TASK_RULES.get(task_type)
        if rules is None:
            raise RouteError(f"config.task_type {task_type!r} is not a known task type", reason="invalid-config")
        foreign = sorted(self.avro_names[key] for key in config.keys() - rules.allowed)
        missing = sorted(self.avro_names.get(key, key) for key in rules.required - config.keys())
        if foreign or missing:
            problems = []
            if foreign:
                problems.append(f"fields that do not belong to it: {', '.join(foreign)}")
            if missing:
                problems.append(f"missing required fields: {', '.join(missing)}")
            raise RouteError(f"config for task_type {task_type} has {'; '.join(problems)}", reason="invalid-config")


def _config_field_names(schema: ParsedSchema) -> list[str]:
    field = next((f for f in schema["fields"] if f["name"] == "config"), None)
    if field is None:
        raise ValueError(f"schema {schema['name']} has no 'config' field")
    branch = next(b for b in field["type"] if b != "null")
    if isinstance(branch, str):
        branch = schema["__named_schemas"][branch]
    return [f["name"] for f in branch["fields"]]
