"""Humanloop: the Update-By-Reference call for a logged LLM call's outcome, and its decoder.

The decoder reads the Avro records of `schemas/log_update.avsc`. It is the one place a `duration` is checked:
Humanloop takes seconds, so a negative or non-finite value is a producer bug, dead-lettered as `invalid-field`
before a call is spent on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.apis.json import to_json
from service.avro.codec import AvroRecord
from service.avro.registry import ParsedSchema
from service.core.errors import DecodeError
from service.core.events import LogUpdate
from service.core.requests import ApiRequest, Coordinates, Endpoint


@dataclass(frozen=True, slots=True)
class Humanloop:
    """Maps log updates to requests with the operator's base URL."""

    base_url: str

    def update_log(self, event: LogUpdate, where: Coordinates) -> ApiRequest:
        """An Update-By-Reference call; fields the producer left null are left out of the body.

        `where` is unused: every route takes the record's coordinates (a publish derives missing ids from them).
        """
        body: dict[str, Any] = {}
        if event.output is not None:
            body["output"] = event.output
        if event.error is not None:
            body["error"] = event.error
        if event.duration is not None:
            body["duration"] = event.duration
        return ApiRequest(
            endpoint=Endpoint.UPDATE_LOG,
            method="PATCH",
            url=f"{self.base_url}/logs",
            params=(("reference_id", event.reference_id),),
            body=to_json(body),
            key=log_key(event),
        )


def log_key(event: LogUpdate) -> str:
    """What an Update-By-Reference call addresses: one log."""
    return event.reference_id


def log_update_decoder(schema: ParsedSchema) -> Callable[[AvroRecord], LogUpdate]:
    """Turns `LogUpdate` records into events; `schema` is unused (the record has no config to convert)."""
    del schema

    def decode(record: AvroRecord) -> LogUpdate:
        reference_id = record.id("reference_id")
        output, error, duration = record["output"], record["error"], _duration(record["duration"])
        if output is None and error is None and duration is None:
            # An update that sets nothing is a producer bug (or another schema's bytes), not a no-op to send.
            raise DecodeError("a LogUpdate must set at least one of output, error, duration", reason="missing-field")
        return LogUpdate(reference_id=reference_id, output=output, error=error, duration=duration)

    return decode


def _duration(seconds: float | None) -> float | None:
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise DecodeError(f"duration must be finite seconds >= 0, not {seconds!r}", reason="invalid-field")
    return seconds
