"""A Confluent-compatible schema registry client that only reads writer schemas by id, for the codec.

Schema ids are immutable, so a parsed schema is cached forever after its first lookup, and concurrent
lookups of one id share a single request. The registry's answers are classified here, once: a 404 with
the registry's "schema not found" code means the record names a schema that does not exist (the record is
bad: `DecodeError`), an answer that is not an Avro record schema is `DecodeError` too, and anything that
looks like an outage (connect errors, timeouts, 5xx, and refusals such as 401/403/429 or a 404 from
something that is not a registry, which are the operator's problem, not the record's) is
`RegistryUnavailable`, which the service retries without dead-lettering.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import httpx
import orjson
from fastavro import parse_schema

from service.core.errors import DecodeError, RegistryUnavailable

ParsedSchema = dict[str, Any]
"""A schema as `fastavro.parse_schema` returns it: ready for `schemaless_reader`."""

ACCEPT: Final = "application/vnd.schemaregistry.v1+json"
SCHEMA_NOT_FOUND: Final = 40403
"""The error code Confluent-compatible registries (Confluent, Karapace, Redpanda, Apicurio) give a missing id."""
_BODY_EXCERPT: Final = 300


class SchemaRegistry:
    """Reads writer schemas by id from `GET {base_url}/schemas/ids/{id}`; the caller owns `client`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        # Messages name the registry without any credentials a URL might carry.
        self._where = str(httpx.URL(self._base_url).copy_with(username=None, password=None))
        self._auth = httpx.BasicAuth(username, password or "") if username is not None else None
        self._cache: dict[int, ParsedSchema] = {}
        self._in_flight: dict[int, asyncio.Task[ParsedSchema]] = {}

    async def writer_schema(self, schema_id: int) -> ParsedSchema:
        """The parsed schema registered under `schema_id`.

        Raises `DecodeError` (reason `unknown-schema-id` or `unsupported-schema`) when no usable schema
        has that id, and `RegistryUnavailable` when the registry cannot answer now.
        """
        cached = self._cache.get(schema_id)
        if cached is not None:
            return cached
        task = self._in_flight.get(schema_id)
        if task is None:
            task = asyncio.create_task(self._fetch(schema_id), name=f"schema-registry-id-{schema_id}")
            task.add_done_callback(_mark_retrieved)
            self._in_flight[schema_id] = task
        # Shielded so a caller that is cancelled does not cancel the lookup other callers share.
        return await asyncio.shield(task)

    async def _fetch(self, schema_id: int) -> ParsedSchema:
        try:
            parsed = self._parse(schema_id, await self._get(schema_id))
            self._cache[schema_id] = parsed
            return parsed
        finally:
            self._in_flight.pop(schema_id, None)

    async def _get(self, schema_id: int) -> httpx.Response:
        url = f"{self._base_url}/schemas/ids/{schema_id}"
        try:
            response = await self._client.get(
                url, headers={"Accept": ACCEPT}, auth=self._auth or httpx.USE_CLIENT_DEFAULT
            )
        except httpx.RequestError as exc:
            raise RegistryUnavailable(
                f"schema registry {self._where} did not answer for schema id {schema_id}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code == httpx.codes.NOT_FOUND and _says_schema_not_found(response):
            raise DecodeError(
                f"the record names schema id {schema_id}, which schema registry {self._where} does not have "
                f"({_excerpt(response)}); the producer used another registry, or the value is not "
                "Confluent-framed",
                reason="unknown-schema-id",
            )
        if not response.is_success:
            # Not the record's fault (an outage, bad credentials, throttling, a URL that is no registry, whose
            # bare 404s would otherwise dead-letter every record): retry rather than dead-letter.
            raise RegistryUnavailable(
                f"schema registry {self._where} answered {response.status_code} for schema id {schema_id}: "
                f"{_excerpt(response)}"
            )
        return response

    def _parse(self, schema_id: int, response: httpx.Response) -> ParsedSchema:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise _unsupported(schema_id, f"the answer is not JSON ({_excerpt(response)})") from exc
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise _unsupported(schema_id, f"the answer has no 'schema' text ({_excerpt(response)})")
        schema_type = body.get("schemaType", "AVRO")
        if schema_type != "AVRO":
            raise _unsupported(schema_id, f"it is a {schema_type} schema, and only AVRO is supported")
        if body.get("references"):
            raise _unsupported(schema_id, "it uses schema references, which are not supported")
        return _parse_avro_record(schema_id, body["schema"])


def _parse_avro_record(schema_id: int, text: str) -> ParsedSchema:
    try:
        parsed = parse_schema(_without_logical_types(orjson.loads(text)))
    except Exception as exc:  # untrusted schema text: whatever fastavro raises, the schema is unusable
        raise _unsupported(schema_id, f"it does not parse as Avro: {type(exc).__name__}: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise _unsupported(schema_id, "it is not an Avro record schema")
    return parsed


def _without_logical_types(schema: Any) -> Any:
    """The writer schema with its `logicalType`s taken out: fastavro applies a writer's logical types even where the
    shipped reader schema has none, so a long written as `timestamp-millis` (a Java producer's Instant) would reach
    the API as an ISO-8601 string, a `date` as a date. Their encoding is their underlying type's, so leaving them
    out reads the values as the producer wrote them."""
    if isinstance(schema, dict):  # a field's default is a value, not a schema: kept as it is
        return {
            key: value if key == "default" else _without_logical_types(value)
            for key, value in schema.items()
            if key != "logicalType"
        }
    if isinstance(schema, list):
        return [_without_logical_types(value) for value in schema]
    return schema


def _unsupported(schema_id: int, why: str) -> DecodeError:
    return DecodeError(f"cannot use schema id {schema_id}: {why}", reason="unsupported-schema")


def _says_schema_not_found(response: httpx.Response) -> bool:
    """True for a registry's own "schema not found" (Confluent error code 40403), not any server's 404."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("error_code") == SCHEMA_NOT_FOUND


def _excerpt(response: httpx.Response) -> str:
    text = response.text.strip()
    return text[:_BODY_EXCERPT] if text else f"HTTP {response.status_code}, empty body"


def _mark_retrieved(task: asyncio.Task[ParsedSchema]) -> None:
    # When every waiter was cancelled nobody reads the failure; read it so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()
