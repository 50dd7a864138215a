"""Routes: pure functions from a typed event to the exact HTTP request its API documents.

No I/O and no secrets: the auth header is added by delivery, so an `ApiRequest` can be logged or
put in a dead-letter header as it is. Everything a record gets wrong that the API would refuse
anyway (no config for its pipeline, an update row with no or too many columns, a negative duration)
is a `RouteError` here, before a call is spent on it.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from service.core.errors import RouteError
from service.core.events import Event, JsonObject, LogUpdate, NewInference, RowUpdate
from service.core.requests import ApiRequest, Coordinates, Endpoint, PublishRow

MAX_UPDATE_COLUMNS = 100
"""Update record's `row` has maxProperties 100 (and minProperties 1)."""

# Stable ids for rows published without one: the same record (topic/partition/offset) always
# gets the same id, so a redelivery after a crash is recognisable downstream (api-spec.md §1.4).
_INFERENCE_ID_NAMESPACE = uuid.UUID("6f1d2c1e-4b0a-5d7e-9a51-2f3c8b7e1d40")
_NAMESPACE_BYTES = _INFERENCE_ID_NAMESPACE.bytes

PREPARED_CONFIGS = 2048
"""Distinct configs the router keeps serialised; beyond that it starts over (bounded memory)."""


@dataclass(frozen=True, slots=True)
class Router:
    """Maps events to requests with the operator's base URLs and per-pipeline configs."""

    openlayer_base_url: str
    humanloop_base_url: str
    pipeline_configs: Mapping[str, JsonObject]
    default_config: JsonObject | None
    inference_id_column: str
    _prepared: dict[int, tuple[JsonObject, bytes, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def route(self, event: Event, where: Coordinates) -> ApiRequest:
        if isinstance(event, NewInference):
            return self._publish(event, where)
        if isinstance(event, RowUpdate):
            return self._update_row(event)
        return self._update_log(event)

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
            url=f"{self.openlayer_base_url}/inference-pipelines/{_segment(pipeline_id)}/data-stream",
            params=(),
            body=body,
            key=pipeline_id,
        )

    def _publish(self, event: NewInference, where: Coordinates) -> ApiRequest:
        row = self.publish_row(event, where)
        return self.publish_request(row.pipeline_id, row.config_json, [row.row_json])

    def _update_row(self, event: RowUpdate) -> ApiRequest:
        columns = len(event.row)
        if not 1 <= columns <= MAX_UPDATE_COLUMNS:
            raise RouteError(
                f"an update row must have 1..{MAX_UPDATE_COLUMNS} columns, this one has {columns}",
                reason="row-too-large" if columns else "row-empty",
            )
        return ApiRequest(
            endpoint=Endpoint.UPDATE_ROW,
            method="PUT",
            url=f"{self.openlayer_base_url}/inference-pipelines/{_segment(event.pipeline_id)}/rows",
            params=(("inferenceId", event.inference_id),),
            body=_json({"row": event.row, "config": event.config}),
            key=f"{event.pipeline_id}/{event.inference_id}",
        )

    def _update_log(self, event: LogUpdate) -> ApiRequest:
        body: dict[str, Any] = {}
        if event.output is not None:
            body["output"] = event.output
        if event.error is not None:
            body["error"] = event.error
        if event.duration is not None:
            if not math.isfinite(event.duration) or event.duration < 0:
                raise RouteError(
                    f"duration must be a finite number of seconds >= 0, got {event.duration}", reason="invalid-duration"
                )
            body["duration"] = event.duration
        return ApiRequest(
            endpoint=Endpoint.UPDATE_LOG,
            method="PATCH",
            url=f"{self.humanloop_base_url}/logs",
            params=(("reference_id", event.reference_id),),
            body=_json(body),
            key=event.reference_id,
        )


def stable_inference_id(where: Coordinates) -> str:
    """`uuid.uuid5(namespace, "topic/partition/offset")`, computed without the `UUID` object.

    Once per row without an id, and `uuid.uuid5` plus `str()` cost more than the hash itself.
    """
    digest = bytearray(
        hashlib.sha1(_NAMESPACE_BYTES + f"{where.topic}/{where.partition}/{where.offset}".encode()).digest()
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


def _segment(value: str) -> str:
    # A pipeline id is a UUID, but it comes from a producer we do not control: never let it add
    # path segments or a query to the URL.
    _check_segment(value)
    return quote(value, safe="")


def _check_segment(value: str) -> None:
    if value in (".", ".."):
        # Unreserved characters, so quoting keeps them, and both HTTP clients remove dot segments
        # (even percent-encoded ones): ".." would POST to {base}/data-stream. No id can be one.
        raise RouteError(
            f"pipeline id {value!r} is not an id: in a URL path it is a dot segment, which HTTP clients remove",
            reason="invalid-field",
        )


def _json(body: object, *, sort_keys: bool = False) -> bytes:
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError as exc:  # orjson raises TypeError for values JSON cannot carry
        raise RouteError(f"the body cannot be serialised as JSON: {exc}", reason="unserialisable") from exc
