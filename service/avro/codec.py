"""Avro bytes to typed events: the only module that knows the wire formats.

Two wire formats are read. *Plain* is a bare Avro body written with the shipped schema. *Confluent* is
byte 0, a 4-byte big-endian schema id, then an Avro body written with the schema the registry holds under
that id, resolved against the shipped (reader) schema so compatible evolution works. In `auto` mode a value
is Confluent when it starts with byte 0, is at least 5 bytes long and a registry is configured. That rule
cannot misread a valid plain record: each of the three records starts with a required id string, whose
length varint is 0 only for the empty string, and an empty id is invalid anyway. Every failure is a
`DecodeError` with a stable `reason`; a registry outage is `RegistryUnavailable`, never a bad record. What a
record's fields mean is each stream's decoder's business (service/streams.py names them, apis/ holds them).
Decoding is strict on purpose, because bytes written with another schema often decode "successfully": a
value must be consumed to its last byte, and ids must be non-empty, printable and bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Final, Literal, Protocol

from fastavro import schemaless_reader
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from service.avro.registry import ParsedSchema
from service.avro.schemas import SchemaSet
from service.core.errors import DecodeError
from service.core.events import Event, EventKind, JsonObject

WireFormat = Literal["auto", "plain", "confluent"]

MAGIC_BYTE: Final = 0
CONFLUENT_HEADER_SIZE: Final = 5
MAX_ID_CHARS: Final = 1024
"""Longer ids are not ids: such a value was almost certainly written with another schema."""


class WriterSchemas(Protocol):
    """Where Confluent-framed values' writer schemas come from (`service.avro.registry.SchemaRegistry`)."""

    async def writer_schema(self, schema_id: int) -> ParsedSchema: ...


@dataclass(frozen=True, slots=True)
class _Resolution:
    """How to read bodies written with one registry schema id: with resolution only when it changes bytes."""

    writer: ParsedSchema
    reader: ParsedSchema | None


class AvroCodec:
    """Decodes Kafka record values into events; build once, share across partitions."""

    def __init__(
        self,
        schemas: SchemaSet,
        registry: WriterSchemas | None = None,
        wire_format: WireFormat = "auto",
    ) -> None:
        if wire_format not in ("auto", "plain", "confluent"):
            raise ValueError(f"unknown wire format {wire_format!r}")
        if wire_format == "confluent" and registry is None:
            raise ValueError("wire format 'confluent' needs a schema registry")
        self._schemas = schemas
        self._registry = registry
        self._wire_format = wire_format
        self._names = {kind: schema["name"].rpartition(".")[2] for kind, schema in schemas.readers.items()}
        # Ids are immutable, so how to read one is decided once; after that a lookup is a dict hit.
        self._resolutions: dict[tuple[EventKind, int], _Resolution] = {}

    async def decode(self, kind: EventKind, value: bytes | None) -> Event:
        """The event `value` encodes, or `DecodeError` / `RouteError` / `RegistryUnavailable`."""
        if not value:
            raise DecodeError(
                f"the record has no value (a tombstone or an empty message), so it holds no {self._names[kind]}",
                reason="empty-value",
            )
        framed = self._is_confluent(kind, value)
        if framed:
            record = await self._read_confluent(kind, value)
        else:
            record = self._read(kind, value, self._schemas.reader(kind), None, framed=False)
        return self._schemas.decoders[kind](AvroRecord(record, value, framed))

    def _is_confluent(self, kind: EventKind, value: bytes) -> bool:
        if self._wire_format != "auto":
            return self._wire_format == "confluent"
        if value[0] != MAGIC_BYTE or len(value) < CONFLUENT_HEADER_SIZE:
            return False
        if self._registry is None:
            raise DecodeError(
                f"the value starts with byte 0, so it is either Confluent-framed (and no schema registry is "
                f"configured) or a {self._names[kind]} with an empty first field; neither can be decoded",
                reason="no-schema-registry",
            )
        return True

    async def _read_confluent(self, kind: EventKind, value: bytes) -> dict[str, Any]:
        if len(value) < CONFLUENT_HEADER_SIZE:
            raise DecodeError(
                f"the value has {len(value)} bytes, fewer than the 5 of a Confluent header (magic byte and schema id)",
                reason="truncated",
            )
        if value[0] != MAGIC_BYTE:
            raise DecodeError(
                f"the value starts with byte {value[0]:#04x}, not the Confluent magic byte 0x00: it is not "
                "Confluent-framed (is the producer writing plain Avro?)",
                reason="bad-magic-byte",
            )
        schema_id = int.from_bytes(value[1:CONFLUENT_HEADER_SIZE], "big", signed=True)
        resolution = self._resolutions.get((kind, schema_id))
        if resolution is None:
            resolution = await self._resolve(kind, schema_id)
        return self._read(kind, value, resolution.writer, resolution.reader, framed=True)

    async def _resolve(self, kind: EventKind, schema_id: int) -> _Resolution:
        if schema_id < 0 or self._registry is None:
            raise DecodeError(f"schema id {schema_id} cannot exist", reason="unknown-schema-id")
        writer = await self._registry.writer_schema(schema_id)
        try:
            same = to_parsing_canonical_form(writer) == self._schemas.canonical[kind]
        except Exception as exc:  # a registry schema fastavro cannot canonicalise cannot be read either
            raise DecodeError(
                f"cannot use schema id {schema_id}: {type(exc).__name__}: {exc}", reason="unsupported-schema"
            ) from exc
        reader = self._schemas.reader(kind)
        # Same canonical form means byte-identical encoding: read with the shipped schema, skip resolution.
        resolution = _Resolution(reader, None) if same else _Resolution(writer, reader)
        self._resolutions[(kind, schema_id)] = resolution
        return resolution

    def _read(
        self,
        kind: EventKind,
        value: bytes,
        writer: ParsedSchema,
        reader: ParsedSchema | None,
        *,
        framed: bool,
    ) -> dict[str, Any]:
        buf = BytesIO(value)
        if framed:
            buf.seek(CONFLUENT_HEADER_SIZE)
        try:
            record = schemaless_reader(buf, writer, reader)
        except SchemaResolutionError as exc:
            raise DecodeError(
                f"the writer schema {_source(value, framed)} is not compatible with the shipped "
                f"{self._names[kind]} schema: {exc}",
                reason="incompatible-schema",
            ) from exc
        except Exception as exc:  # fastavro reports bad input with many exception types; all mean bad bytes
            raise self._undecodable(kind, value, buf.tell(), framed, exc) from exc
        end = buf.tell()
        if end != len(value):
            raise DecodeError(
                f"a {self._names[kind]} ({_source(value, framed)}) ends at byte {end}, but the value has "
                f"{len(value)} bytes: it was probably written with another schema{_hint(value, framed)}",
                reason="trailing-bytes",
            )
        if not isinstance(record, dict):
            raise DecodeError(f"the value is not a {self._names[kind]} record", reason="garbage-bytes")
        return record

    def _undecodable(self, kind: EventKind, value: bytes, position: int, framed: bool, exc: Exception) -> DecodeError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        what = f"{self._names[kind]} ({_source(value, framed)})"
        # Running out of bytes is what truncation looks like; failing before the end is garbage.
        if isinstance(exc, EOFError | StopIteration) or position >= len(value):
            return DecodeError(
                f"the value ({len(value)} bytes) ended before the {what} did ({detail}): it is truncated "
                f"or was written with another schema{_hint(value, framed)}",
                reason="truncated",
            )
        if isinstance(exc, IndexError):
            # Before the end, fastavro's IndexError means a union branch or enum index past the schema's list.
            detail = f"a union branch or enum index out of range; {detail}"
        return DecodeError(
            f"the value is not a {what}: decoding failed at byte {position} of {len(value)} "
            f"({detail}){_hint(value, framed)}",
            reason="garbage-bytes",
        )


class AvroRecord:
    """One decoded Avro record and the bytes it came from, with the strict field checks every decoder shares.

    A value written with another schema often decodes "successfully", so ids must be non-empty, printable and
    bounded, and errors hint at the commonest mix-up (Confluent-framed bytes read as plain Avro).
    """

    __slots__ = ("fields", "framed", "value")

    def __init__(self, fields: Mapping[str, Any], value: bytes, framed: bool) -> None:
        self.fields = fields
        self.value = value
        self.framed = framed

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def id(self, name: str) -> str:
        """The required id field `name`."""
        found: str = self.fields[name]
        if not found:
            raise DecodeError(
                f"{name} is empty; an id is required{_hint(self.value, self.framed)}", reason="missing-field"
            )
        if len(found) > MAX_ID_CHARS or not found.isprintable():
            raise DecodeError(
                f"{name} is not a plausible id ({len(found)} characters, starting {found[:40]!r}); was the value "
                "written with another schema?",
                reason="invalid-field",
            )
        return found

    def row(self, name: str = "row") -> JsonObject:
        """The map field `name`, which must hold at least one column."""
        row: JsonObject = self.fields[name]
        if not row:
            raise DecodeError(f"{name} is empty; a row needs at least one column", reason="missing-field")
        return row


def _source(value: bytes, framed: bool) -> str:
    return f"Confluent schema id {int.from_bytes(value[1:5], 'big', signed=True)}" if framed else "plain Avro"


def _hint(value: bytes, framed: bool) -> str:
    # The commonest cause of a plain value that starts with 0: it is Confluent-framed and read as plain.
    if not framed and value[:1] == b"\x00":
        return " (the value starts with byte 0: it may be Confluent-framed, read as plain Avro)"
    return ""
