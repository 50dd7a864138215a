"""The per-record logic: decode, route, deliver, or dead-letter; the Kafka loop sees only `Work`.

`prepare` runs in offset order per partition and decides the record's ordering key; `Work.run`
brings it to a durable outcome. A schema registry outage is waited out inside `prepare` (it is
not the record's fault), so records behind it simply wait, uncommitted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from functools import partial
from typing import Protocol

from .classify import backoff_s
from .deadletter import DeadLetterWriter
from .delivery import Delivery
from .errors import InternalError, RecordError, RegistryUnavailable
from .events import Event, EventKind
from .records import SourceRecord, Work
from .routes import ApiRequest, RecordCoordinates, Router

log = logging.getLogger(__name__)


class Decoder(Protocol):
    async def decode(self, kind: EventKind, value: bytes | None) -> Event: ...


class Pipeline:
    def __init__(
        self,
        decoder: Decoder,
        router: Router,
        delivery: Delivery,
        dead_letters: DeadLetterWriter,
        kinds: Mapping[str, EventKind],
        *,
        rng: random.Random,
        max_backoff_s: float,
    ) -> None:
        self._decoder = decoder
        self._router = router
        self._delivery = delivery
        self._dead_letters = dead_letters
        self._kinds = kinds
        self._rng = rng
        self._max_backoff_s = max_backoff_s

    async def prepare(self, record: SourceRecord) -> Work:
        try:
            event = await self._decode(record)
            request = self._router.route(
                event, RecordCoordinates(record.topic, record.partition, record.offset, record.timestamp_ms)
            )
        except RecordError as exc:
            return self._dead_work(record, exc)
        except Exception as exc:  # a bug must not stop the partition: dead-letter, say so
            log.exception("unexpected error preparing a record", extra=_where(record))
            return self._dead_work(record, InternalError(f"{type(exc).__name__}: {exc}"))
        return Work(key=request.key, run=partial(self._deliver, record, request))

    async def _decode(self, record: SourceRecord) -> Event:
        kind = self._kinds[record.topic]
        attempt = 0
        while True:
            try:
                return await self._decoder.decode(kind, record.value)
            except RegistryUnavailable as exc:
                attempt += 1
                log.warning("schema registry unavailable, will retry", extra={**_where(record), "error": str(exc)})
                await asyncio.sleep(backoff_s(attempt - 1, 0.5, self._max_backoff_s, self._rng))

    def _dead_work(self, record: SourceRecord, error: RecordError) -> Work:
        # Nothing else depends on a dead-lettered record, so it gets a key of its own.
        return Work(key=("dead-letter", record.offset), run=partial(self._dead_letter, record, error))

    async def _deliver(self, record: SourceRecord, request: ApiRequest) -> None:
        try:
            report = await self._delivery.deliver(request, record.timestamp_ms)
        except RecordError as exc:
            await self._dead_letter(record, exc)
            return
        except Exception as exc:  # a bug must not stop the partition: dead-letter, say so
            log.exception("unexpected error delivering a record", extra=_where(record))
            await self._dead_letter(record, InternalError(f"{type(exc).__name__}: {exc}"))
            return
        log.debug(
            "delivered",
            extra={
                **_where(record),
                "endpoint": request.endpoint.value,
                "status": report.status,
                "attempts": report.attempts,
            },
        )

    async def _dead_letter(self, record: SourceRecord, error: RecordError) -> None:
        await self._dead_letters.write(record, error)
        status = getattr(getattr(error, "evidence", None), "status", None)
        log.warning(
            "dead-lettered",
            extra={
                **_where(record),
                "reason": error.reason,
                "stage": error.stage.value,
                "status": status,
                "error": str(error),
            },
        )


def _where(record: SourceRecord) -> dict[str, object]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
