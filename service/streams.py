"""The one table of streams: what the bridge reads, how it decodes it, and where it sends it.

A stream is one row: the topic setting that names its source topic (`BRIDGE_TOPICS__<SETTING>`), its event kind,
its Avro schema file, the decoder from an Avro record to its event, the route from its event to an API request,
that request's endpoint and destination, and the key that orders its requests (same key, one after another).
Everything else — which topics to subscribe to, which dead-letter topics to check, which schema and decoder a
record gets, which API a route calls — is read from this table. Adding a stream is one row here, plus its event
type (service/core/events.py), its schema (schemas/), its decoder and route (service/apis/), its topic setting
(service/config/settings.py, `TopicSettings`) and the chart's topic default (helm/inference-bridge/templates/
_helpers.tpl); tests/unit/test_streams.py checks that those agree. CONTRIBUTING.md walks through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

import httpx

from service.apis import humanloop, openlayer
from service.apis.humanloop import Humanloop
from service.apis.openlayer import Openlayer
from service.avro.codec import AvroCodec, AvroRecord
from service.avro.registry import ParsedSchema, SchemaRegistry
from service.avro.schemas import SchemaSet
from service.config.kafka import TopicSettings
from service.config.settings import DEFAULT_SCHEMA_DIR, Settings
from service.core.events import Event, EventKind, JsonObject, LogUpdate, NewInference, RowUpdate
from service.core.requests import ApiRequest, Coordinates, Destination, Endpoint, PublishRow

Api = TypeVar("Api")
E = TypeVar("E", NewInference, RowUpdate, LogUpdate)


@dataclass(frozen=True, slots=True)
class Stream(Generic[Api, E]):
    """One stream: a source topic's records, decoded to `E`, each sent as one call to one endpoint."""

    setting: str
    """The `TopicSettings` field holding the source topic (env `BRIDGE_TOPICS__<SETTING>`)."""
    kind: EventKind
    event: type[E]
    schema: str
    """The reader schema's file in the schemas directory."""
    decoder: Callable[[ParsedSchema], Callable[[AvroRecord], E]]
    """Built once from the reader schema; turns one Avro record into the event."""
    route: Callable[[Api, E, Coordinates], ApiRequest]
    """The event -> its request, given the destination's API (an unbound method of the API class)."""
    endpoint: Endpoint
    destination: Destination
    ordering_key: Callable[[E], str]
    """What a request addresses: requests with equal keys never overtake each other."""
    batch_row: Callable[[Api, E, Coordinates], PublishRow] | None = None
    """For a stream whose calls carry many rows: the event -> one row to batch (instead of `route`)."""


STREAMS: Final[tuple[Stream[Any, Any], ...]] = (
    Stream(
        setting="inferences",
        kind=EventKind.INFERENCE,
        event=NewInference,
        schema="inference.avsc",
        decoder=openlayer.inference_decoder,
        route=Openlayer.publish,
        endpoint=Endpoint.PUBLISH,
        destination=Destination.OPENLAYER,
        ordering_key=openlayer.publish_key,
        # Rows keep their order inside the batcher, so a batched record needs no key.
        batch_row=Openlayer.publish_row,
    ),
    Stream(
        setting="row_updates",
        kind=EventKind.ROW_UPDATE,
        event=RowUpdate,
        schema="row_update.avsc",
        decoder=openlayer.row_update_decoder,
        route=Openlayer.update_row,
        endpoint=Endpoint.UPDATE_ROW,
        destination=Destination.OPENLAYER,
        ordering_key=openlayer.row_key,
    ),
    Stream(
        setting="log_updates",
        kind=EventKind.LOG_UPDATE,
        event=LogUpdate,
        schema="log_update.avsc",
        decoder=humanloop.log_update_decoder,
        route=Humanloop.update_log,
        endpoint=Endpoint.UPDATE_LOG,
        destination=Destination.HUMANLOOP,
        ordering_key=humanloop.log_key,
    ),
)

_BY_EVENT: Final[Mapping[type[Event], Stream[Any, Any]]] = MappingProxyType({s.event: s for s in STREAMS})


def by_topic(topics: TopicSettings) -> dict[str, Stream[Any, Any]]:
    """Each configured source topic's stream, in table order."""
    return {getattr(topics, stream.setting): stream for stream in STREAMS}


def topic_kinds(topics: TopicSettings) -> dict[str, EventKind]:
    """Each configured source topic's event kind (the dlq tool reads values with it)."""
    return {topic: stream.kind for topic, stream in by_topic(topics).items()}


def schema_set(directory: str | Path = DEFAULT_SCHEMA_DIR) -> SchemaSet:
    """Every stream's reader schema from `directory`, with its decoder."""
    return SchemaSet.load(directory, {stream.kind: (stream.schema, stream.decoder) for stream in STREAMS})


def registry_client(settings: Settings) -> httpx.AsyncClient | None:
    """An HTTP client for the schema registry (the delivery timeouts), or None when no registry is configured."""
    if settings.schema_registry.url is None:
        return None
    delivery = settings.delivery
    return httpx.AsyncClient(timeout=httpx.Timeout(delivery.read_timeout_s, connect=delivery.connect_timeout_s))


def build_codec(settings: Settings, registry_http: httpx.AsyncClient | None) -> AvroCodec:
    """Every stream's schema and decoder, with the schema registry over `registry_http` when one is configured."""
    registry_settings = settings.schema_registry
    registry = None
    if registry_settings.url is not None and registry_http is not None:
        password = registry_settings.password
        registry = SchemaRegistry(
            registry_http,
            registry_settings.url,
            username=registry_settings.username,
            password=password.get_secret_value() if password else None,
        )
    return AvroCodec(schema_set(settings.schemas_dir), registry, registry_settings.wire_format)


class Router:
    """Routes events to requests through the table, with each destination's API built from the operator's settings."""

    __slots__ = ("_apis", "humanloop", "openlayer")

    def __init__(
        self,
        *,
        openlayer_base_url: str,
        humanloop_base_url: str,
        pipeline_configs: Mapping[str, JsonObject],
        default_config: JsonObject | None,
        inference_id_column: str,
    ) -> None:
        self.openlayer = Openlayer(
            base_url=openlayer_base_url,
            pipeline_configs=pipeline_configs,
            default_config=default_config,
            inference_id_column=inference_id_column,
        )
        self.humanloop = Humanloop(base_url=humanloop_base_url)
        self._apis: Mapping[Destination, object] = {
            Destination.OPENLAYER: self.openlayer,
            Destination.HUMANLOOP: self.humanloop,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        return cls(
            openlayer_base_url=settings.openlayer.base_url,
            humanloop_base_url=settings.humanloop.base_url,
            pipeline_configs=settings.openlayer.pipeline_configs,
            default_config=settings.openlayer.default_config,
            inference_id_column=settings.openlayer.inference_id_column,
        )

    def api(self, destination: Destination) -> object:
        """The API object a stream's `route` and `batch_row` take."""
        return self._apis[destination]

    def route(self, event: Event, where: Coordinates) -> ApiRequest:
        """The request for `event` alone (unbatched)."""
        stream = _BY_EVENT[type(event)]
        return stream.route(self._apis[stream.destination], event, where)

    def publish_row(self, event: NewInference, where: Coordinates) -> PublishRow:
        return self.openlayer.publish_row(event, where)

    def publish_request(self, pipeline_id: str, config_json: bytes, rows: Sequence[bytes]) -> ApiRequest:
        """The batcher's call: rows that share a pipeline and a config, in one Publish-records request."""
        return self.openlayer.publish_request(pipeline_id, config_json, rows)
