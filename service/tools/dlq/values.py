"""A dead letter as JSON: its value decoded from Avro with the source topic's schema (hex when it does not
decode), its headers and its HTTP evidence."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.avro.codec import AvroCodec
from service.core.errors import BridgeError
from service.core.events import EventKind
from service.tools.cli import (
    Headers,
    header_text,
    last_header,
)
from service.tools.dlq.letters import (
    EXCEPTION_CLASS_HEADER,
    EXCEPTION_MESSAGE_HEADER,
    HTTP_RESPONSE_HEADER_PREFIX,
    Letter,
    header_int,
    iso_ms,
    readable_bytes,
)

# --- values: Avro to JSON through the service's codec -------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """An Avro datum as JSON: bytes as hex, non-finite floats as text (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class ValueReader:
    """Reads a dead letter's value as the bridge did: the source topic's event kind, the codec's framing rule
    (plain or Confluent), the shipped reader schema and, for Confluent values, the registry's writer schema."""

    def __init__(self, codec: AvroCodec, kinds: Mapping[str, EventKind]) -> None:
        self._codec = codec
        self._kinds = kinds

    async def read(self, source_topic: str | None, value: bytes | None) -> dict[str, Any]:
        if value is None:
            return {"encoding": "none", "note": "no value (a tombstone)"}
        kind = self._kinds.get(source_topic or "")
        if kind is None:
            note = f"source topic {source_topic!r} is not one of the configured topics, so its schema is unknown"
            return _hex(value, note)
        codec = self._codec
        try:
            # The codec has no public call that stops before building an event; these are its own framing and
            # reading steps, so a value shown here is read exactly as the bridge read it (strict, to the last byte).
            if value and codec._is_confluent(kind, value):
                datum = await codec._read_confluent(kind, value)
                wire = "confluent"
            else:
                datum = codec._read(kind, value, codec._schemas.reader(kind), None, framed=False)
                wire = "plain"
        except BridgeError as exc:  # DecodeError, or RegistryUnavailable: show the bytes and say why, in short
            return _hex(value, f"does not decode with the {kind.value} schema: {exc.reason}")
        return {"encoding": "avro", "schema": kind.value, "wire_format": wire, "datum": jsonable(datum)}


def _hex(value: bytes, note: str) -> dict[str, Any]:
    return {"encoding": "hex", "bytes": len(value), "hex": value.hex(), "note": note}


def http_evidence(headers: Headers) -> dict[str, Any] | None:
    """The `bridge.http.*` headers as one object, or None when the record never reached an API."""
    method = header_text(last_header(headers, "bridge.http.method"))
    if method is None:
        return None
    response_headers = {
        name.removeprefix(HTTP_RESPONSE_HEADER_PREFIX): header_text(value) or ("" if value is None else value.hex())
        for name, value in headers
        if name.startswith(HTTP_RESPONSE_HEADER_PREFIX)
    }
    return {
        "method": method,
        "url": header_text(last_header(headers, "bridge.http.url")),
        "status": header_int(last_header(headers, "bridge.http.status")),
        "attempts": header_int(last_header(headers, "bridge.http.attempts")),
        "response_headers": response_headers,
        "response_body": header_text(last_header(headers, "bridge.http.response.body")),
    }


def letter_json(letter: Letter, value: dict[str, Any]) -> dict[str, Any]:
    r = letter.record
    return {
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "reason": letter.reason,
        "stage": letter.stage,
        "failed_at": iso_ms(letter.failed_at_ms),
        "source": {"topic": letter.source_topic, "partition": letter.source_partition, "offset": letter.source_offset},
        "timestamp": iso_ms(r.timestamp_ms),
        "key": None if r.key is None else readable_bytes(r.key),
        "error": {
            "class": header_text(last_header(r.headers, EXCEPTION_CLASS_HEADER)),
            "message": header_text(last_header(r.headers, EXCEPTION_MESSAGE_HEADER)),
        },
        "http": http_evidence(r.headers),
        "headers": [
            {"name": name, **(readable_bytes(value) if value is not None else {"null": True})}
            for name, value in r.headers
        ],
        "value": value,
    }
