"""The shipped reader schemas (`schemas/*.avsc`), parsed once, each with the decoder of its stream."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import orjson
from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

from service.avro.registry import ParsedSchema
from service.core.events import Event, EventKind

if TYPE_CHECKING:
    from service.avro.codec import AvroRecord

Decode = Callable[["AvroRecord"], Event]
"""An Avro record -> its event (or `DecodeError` / `RouteError` when the record's content is wrong)."""
DecoderFactory = Callable[[ParsedSchema], Decode]
"""Builds a stream's `Decode` once from its reader schema (a config record's field names come from it)."""


@dataclass(frozen=True, slots=True)
class SchemaSet:
    """One reader schema and one decoder per event kind."""

    readers: Mapping[EventKind, ParsedSchema]
    canonical: Mapping[EventKind, str]
    """Parsing Canonical Form of each reader: a writer with the same form needs no resolution."""
    decoders: Mapping[EventKind, Decode]

    @classmethod
    def load(cls, directory: str | Path, streams: Mapping[EventKind, tuple[str, DecoderFactory]]) -> SchemaSet:
        """Load each kind's schema file from `directory` and build its decoder (`service.streams.schema_set`)."""
        readers = {kind: _load_schema(Path(directory) / file) for kind, (file, _) in streams.items()}
        canonical = {kind: to_parsing_canonical_form(schema) for kind, schema in readers.items()}
        decoders = {kind: factory(readers[kind]) for kind, (_, factory) in streams.items()}
        return cls(
            readers=MappingProxyType(readers),
            canonical=MappingProxyType(canonical),
            decoders=MappingProxyType(decoders),
        )

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
