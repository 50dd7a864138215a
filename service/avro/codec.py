"""Avro bytes to typed events: the only module that knows the wire formats and the shipped `.avsc` files.

Two wire formats are read. *Plain* is a bare Avro body written with the shipped schema. *Confluent* is
byte 0, a 4-byte big-endian schema id, then an Avro body written with the schema the registry holds under
that id, resolved against the shipped (reader) schema so compatible evolution works. In `auto` mode a value
is Confluent when it starts with byte 0, is at least 5 bytes long and a registry is configured. That rule
cannot misread a valid plain record: each of the three records starts with a required id string, whose
length varint is 0 only for the empty string, and an empty id is invalid anyway. Every failure is a
`DecodeError` with a stable `reason`; a config that contradicts its own `task_type` is a `RouteError`
(`invalid-config`); a registry outage is `RegistryUnavailable`, never a bad record. Decoding is strict on
purpose, because bytes written with another schema often decode "successfully": a value must be consumed
to its last byte, and ids must be non-empty, printable and bounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

import orjson
from fastavro import parse_schema, schemaless_reader
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from service.avro.registry import ParsedSchema
from service.core.errors import DecodeError, RouteError
from service.core.events import Event, EventKind, JsonObject, LogUpdate, NewInference, RowUpdate

WireFormat = Literal["auto", "plain", "confluent"]

DEFAULT_SCHEMA_DIR: Final = Path(__file__).resolve().parents[2] / "schemas"
"""Where the repository keeps the `.avsc` files; deployments may point elsewhere."""

MAGIC_BYTE: Final = 0
CONFLUENT_HEADER_SIZE: Final = 5
CONFIG_CACHE_SIZE: Final = 1024
"""Distinct record configs remembered per event kind; real producers have a handful."""
MAX_ID_CHARS: Final = 1024
"""Longer ids are not ids: such a value was almost certainly written with another schema."""


class WriterSchemas(Protocol):
    """Where Confluent-framed values' writer schemas come from (`service.avro.registry.SchemaRegistry`)."""

    async def writer_schema(self, schema_id: int) -> ParsedSchema: ...


def snake_to_camel(name: str) -> str:
    """`num_of_token_column_name` -> `numOfTokenColumnName`: Avro field names to the APIs' config keys."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True, slots=True)
class TaskRules:
    """The config keys one Openlayer task type accepts, and those it requires (api-spec.md §2.1)."""

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
class SchemaSet:
    """The shipped reader schemas, parsed once, one per event kind."""

    readers: Mapping[EventKind, ParsedSchema]
    canonical: Mapping[EventKind, str]
    """Parsing Canonical Form of each reader: a writer with the same form needs no resolution."""

    @classmethod
    def from_dir(cls, directory: str | Path = DEFAULT_SCHEMA_DIR) -> SchemaSet:
        """Load `inference.avsc`, `row_update.avsc` and `log_update.avsc` from `directory`."""
        readers = {kind: _load_schema(Path(directory) / f"{kind.value}.avsc") for kind in EventKind}
        canonical = {kind: to_parsing_canonical_form(schema) for kind, schema in readers.items()}
        return cls(readers=MappingProxyType(readers), canonical=MappingProxyType(canonical))

    def reader(self, kind: EventKind) -> ParsedSchema:
        return self.readers[kind]


def _load_schema(path: Path) -> ParsedSchema:
    try:
        parsed = parse_schema(orjson.loads(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load Avro schema {path}: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ValueError(f"{path} must hold one Avro record schema")
    return parsed


@dataclass(frozen=True, slots=True)
class _Resolution:
    """How to read bodies written with one registry schema id: with resolution only when it changes bytes."""

    writer: ParsedSchema
    reader: ParsedSchema | None


@dataclass(frozen=True, slots=True)
class _ConfigShape:
    """A config record's Avro fields and their API keys, derived from the reader schema itself."""

    keys: tuple[tuple[str, str], ...]
    """(Avro field, API key) for every field that goes to the API."""
    avro_names: Mapping[str, str]
    """API key -> Avro field, to name fields in producers' terms in error messages."""
    cache: dict[bytes, JsonObject] = field(default_factory=dict, compare=False, repr=False)
    """Converted configs by their record's JSON; invalid configs are not cached (they raise)."""

    @classmethod
    def of(cls, schema: ParsedSchema) -> _ConfigShape:
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
        self._inference_config = _ConfigShape.of(schemas.reader(EventKind.INFERENCE))
        self._row_update_config = _ConfigShape.of(schemas.reader(EventKind.ROW_UPDATE))
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
        return self._build(kind, record, value, framed)

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

    def _build(self, kind: EventKind, record: dict[str, Any], value: bytes, framed: bool) -> Event:
        if kind is EventKind.INFERENCE:
            inference_id = record["inference_id"]
            return NewInference(
                pipeline_id=_id(record, "inference_pipeline_id", value, framed),
                row=_row(record),
                inference_id=None if inference_id is None else _id(record, "inference_id", value, framed),
                config=self._inference_config.to_api(record["config"]),
            )
        if kind is EventKind.ROW_UPDATE:
            return RowUpdate(
                pipeline_id=_id(record, "inference_pipeline_id", value, framed),
                inference_id=_id(record, "inference_id", value, framed),
                row=_row(record),
                config=self._row_update_config.to_api(record["config"]),
            )
        reference_id = _id(record, "reference_id", value, framed)
        output, error, duration = record["output"], record["error"], _duration(record["duration"])
        if output is None and error is None and duration is None:
            # An update that sets nothing is a producer bug (or another schema's bytes), not a no-op to send.
            raise DecodeError("a LogUpdate must set at least one of output, error, duration", reason="missing-field")
        return LogUpdate(
            reference_id=reference_id,
            output=output,
            error=error,
            duration=duration,
        )


def _id(record: Mapping[str, Any], field: str, value: bytes, framed: bool) -> str:
    found: str = record[field]
    if not found:
        raise DecodeError(f"{field} is empty; an id is required{_hint(value, framed)}", reason="missing-field")
    if len(found) > MAX_ID_CHARS or not found.isprintable():
        raise DecodeError(
            f"{field} is not a plausible id ({len(found)} characters, starting {found[:40]!r}); was the value "
            "written with another schema?",
            reason="invalid-field",
        )
    return found


def _row(record: Mapping[str, Any]) -> JsonObject:
    row: JsonObject = record["row"]
    if not row:
        raise DecodeError("row is empty; a row needs at least one column", reason="missing-field")
    return row


def _duration(seconds: float | None) -> float | None:
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise DecodeError(f"duration must be finite seconds >= 0, not {seconds!r}", reason="invalid-field")
    return seconds


def _source(value: bytes, framed: bool) -> str:
    return f"Confluent schema id {int.from_bytes(value[1:5], 'big', signed=True)}" if framed else "plain Avro"


def _hint(value: bytes, framed: bool) -> str:
    # The commonest cause of a plain value that starts with 0: it is Confluent-framed and read as plain.
    if not framed and value[:1] == b"\x00":
        return " (the value starts with byte 0: it may be Confluent-framed, read as plain Avro)"
    return ""
