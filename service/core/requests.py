"""What a route produces and delivery sends: an API request, its endpoint and destination, and where a record came from.

Plain values with no I/O, so every layer above (HTTP delivery, tracing, the APIs' routes) shares one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol


class Destination(StrEnum):
    OPENLAYER = "openlayer"
    HUMANLOOP = "humanloop"


class Endpoint(StrEnum):
    PUBLISH = "publish"
    UPDATE_ROW = "update_row"
    UPDATE_LOG = "update_log"

    @property
    def destination(self) -> Destination:
        return Destination.HUMANLOOP if self is Endpoint.UPDATE_LOG else Destination.OPENLAYER

    @property
    def is_update(self) -> bool:
        """Updates address something that may not be ingested yet, so a 404 means "not yet"."""
        return self is not Endpoint.PUBLISH


class Coordinates(Protocol):
    """Where a record came from; enough to derive a stable id (the pipeline's `SourceRecord` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


@dataclass(frozen=True, slots=True)
class RecordCoordinates:
    """Plain `Coordinates`, for callers that have no source record at hand."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class ApiRequest:
    endpoint: Endpoint
    method: str
    url: str
    """Absolute URL without the query string."""
    params: tuple[tuple[str, str], ...]
    body: bytes
    """The JSON body, already serialised."""
    key: str
    """What the API call addresses: same-key requests must not overtake each other."""

    @property
    def destination(self) -> Destination:
        return self.endpoint.destination


class PublishRow(NamedTuple):  # built once per row: a NamedTuple is cheaper than a frozen dataclass
    """A new inference ready for batching: rows with equal `batch_key` share one call."""

    batch_key: tuple[str, bytes]
    """(pipeline id, config JSON): what a batch shares."""
    row_json: bytes

    @property
    def pipeline_id(self) -> str:
        return self.batch_key[0]

    @property
    def config_json(self) -> bytes:
        return self.batch_key[1]
