"""The consumer's unit of work, as plain values: what the Kafka loop hands to the pipeline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Work:
    """A prepared record: its ordering key and the coroutine that brings it to a durable outcome.

    Records of one partition with equal keys run one after another in offset order; different
    keys may overlap. `run` returns once the record is delivered or dead-lettered, and raises only
    when the service must stop (a `FatalError`).
    """

    key: Hashable
    run: Callable[[], Awaitable[None]]


Prepare = Callable[[SourceRecord], Awaitable[Work]]
