"""The consumer's unit of work, as plain values: what the Kafka loop hands to the pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import NamedTuple, Protocol


# NamedTuples, not frozen dataclasses: as immutable, and about four times cheaper to build, which
# counts for values made once per record (a frozen dataclass sets each field through object.__setattr__).
class SourceRecord(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    """As the producer wrote them: Kafka allows a header without a value (None)."""
    timestamp_ms: int


class Lender(Protocol):
    """The consumer loop's side of a record's in-flight slots, for work that must wait a while.

    `park(offset)` gives the record's slots back while it waits (records of other keys take them);
    `resume(offset)` takes them back, in turn, before it works again. Later records of its key still
    wait behind it, and it still holds its partition's commit point.
    """

    def park(self, offset: int) -> None: ...

    async def resume(self, offset: int) -> None: ...


class Work(NamedTuple):
    """A prepared record: its ordering key and how to start bringing it to a durable outcome.

    Records of one partition with equal keys run one after another in offset order; different
    keys, and work whose key is None, may overlap. `start(lender)` begins the work and returns a future
    that completes once the record is delivered or dead-lettered; it fails only when the service
    must stop (a `FatalError`). A future rather than a coroutine lets work that is already under
    way elsewhere (a row waiting in a batch) run without a task of its own per record.
    """

    key: Hashable | None
    start: Callable[[Lender], asyncio.Future[None]]


Prepare = Callable[[SourceRecord], Awaitable[Work]]
"""Decides a record's `Work`, in offset order per partition (`service.pipeline.Pipeline.prepare`)."""
