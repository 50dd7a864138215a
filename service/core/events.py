"""Typed events: what a decoded Kafka record means, independent of Avro and of HTTP.

The codec turns bytes into these; the routes turn these into API requests. Keys of `config`
mappings are already the API's camelCase names (the codec converts the Avro snake_case fields),
and fields the producer left null are absent, so a route never has to know the Avro schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

JsonObject = dict[str, Any]


class EventKind(StrEnum):
    """The three streams the bridge carries; each has one schema and one endpoint."""

    INFERENCE = "inference"
    ROW_UPDATE = "row_update"
    LOG_UPDATE = "log_update"


@dataclass(frozen=True, slots=True)
class NewInference:
    """One inference row for Openlayer *Publish records*."""

    pipeline_id: str
    row: JsonObject
    inference_id: str | None = None
    config: JsonObject | None = None
    """Publish-records config with camelCase keys, or None to use the operator's config."""


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """Late data for an existing row, for Openlayer *Update record*."""

    pipeline_id: str
    inference_id: str
    row: JsonObject
    config: JsonObject | None = None
    """Update-record config with camelCase keys, or None (the API accepts a null config)."""


@dataclass(frozen=True, slots=True)
class LogUpdate:
    """The outcome of a logged LLM call, for Humanloop *Update By Reference*."""

    reference_id: str
    output: str | None = None
    error: str | None = None
    duration: float | None = None
    """Seconds, as Humanloop expects."""


Event = NewInference | RowUpdate | LogUpdate
