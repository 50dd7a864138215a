"""When each record was fetched: the start of its span is the poll that handed it over, not the moment it was
prepared. Imported only when tracing is on."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from service.core.records import SourceRecord


class FetchNotes:
    """Per partition, (first offset, last offset, when fetched in ns) of the polls whose records are not yet all
    prepared; `FetchClock` notes them, `OtelTracing.start_record` takes them."""

    def __init__(self) -> None:
        self._fetches: dict[tuple[str, int], deque[tuple[int, int, int]]] = {}

    def note(self, topic: str, partition: int, first: int, last: int, at_ns: int) -> None:
        polls = self._fetches.get((topic, partition))
        if polls is None:
            polls = self._fetches[(topic, partition)] = deque()
        elif polls and first <= polls[-1][1]:
            polls.clear()  # read again from an earlier offset (a rebalance, a seek): older notes are stale
        polls.append((first, last, at_ns))

    def fetched_at(self, record: SourceRecord) -> int | None:
        polls = self._fetches.get((record.topic, record.partition))
        offset = record.offset
        while polls:
            first, last, at_ns = polls[0]
            if offset > last:
                polls.popleft()  # records are prepared in offset order: that poll is all prepared
                continue
            return at_ns if offset >= first else None
        return None


class FetchClock:
    """The consumer as the Kafka loop uses it, noting when each poll's records were handed over.

    Only `getmany` is intercepted; everything else goes straight to the consumer. The note is per poll and
    partition, not per record, and `OtelTracing.start_record` takes it as the record span's start.
    """

    def __init__(self, consumer: Any, note: Callable[[str, int, int, int, int], None]) -> None:
        self._consumer = consumer
        self._note = note

    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        batches = await self._consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        if batches:
            now = time.time_ns()
            for tp, records in batches.items():
                if records:
                    self._note(tp.topic, tp.partition, records[0].offset, records[-1].offset, now)
        return batches

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)
