"""The per-record logic: decode, route, deliver, or dead-letter; the Kafka loop sees only `Work`.

`prepare` runs in offset order per partition and decides the record's ordering key; `Work.run`
brings it to a durable outcome. A schema registry outage is waited out inside `prepare` (it is
not the record's fault), so records behind it simply wait, uncommitted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from typing import Protocol, cast

from .batching import Batcher
from .classify import backoff_s
from .deadletter import DeadLetterWriter
from .delivery import Delivery
from .errors import InternalError, RecordError, TransientError
from .events import Event, EventKind, NewInference
from .metrics import Metrics
from .records import SourceRecord, Work
from .routes import ApiRequest, PublishRow, RecordCoordinates, Router

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
        batcher: Batcher,
        kinds: Mapping[str, EventKind],
        *,
        rng: random.Random,
        max_backoff_s: float,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._decoder = decoder
        self._router = router
        self._delivery = delivery
        self._dead_letters = dead_letters
        self._batcher = batcher
        self._kinds = kinds
        self._rng = rng
        self._max_backoff_s = max_backoff_s

    async def prepare(self, record: SourceRecord) -> Work:
        try:
            event = await self._decode(record)
            where = RecordCoordinates(record.topic, record.partition, record.offset, record.timestamp_ms)
            if isinstance(event, NewInference):
                row = self._router.publish_row(event, where)
                # Rows keep their order inside the batcher; a key of their own lets them batch.
                return Work(key=("row", record.offset), run=partial(self._publish, record, row))
            request = self._router.route(event, where)
        except RecordError as exc:
            return self._dead_work(record, exc)
        except Exception as exc:  # noqa: BLE001  # a bug must not stop the partition; _bug logs it
            return self._dead_work(record, _bug(record, exc, "preparing"))
        return Work(key=request.key, run=partial(self._deliver, record, request))

    async def _decode(self, record: SourceRecord) -> Event:
        kind = self._kinds[record.topic]
        attempt = 0
        while True:
            try:
                return await self._decoder.decode(kind, record.value)
            except TransientError as exc:  # a registry outage: wait it out, the record is not at fault
                attempt += 1
                log.warning(
                    "decoding needs a service that is down, will retry", extra={**_where(record), "error": str(exc)}
                )
                await asyncio.sleep(backoff_s(attempt - 1, 0.5, self._max_backoff_s, self._rng))

    def _dead_work(self, record: SourceRecord, error: RecordError) -> Work:
        # Nothing else depends on a dead-lettered record, so it gets a key of its own.
        return Work(key=("dead-letter", record.offset), run=partial(self._dead_letter, record, error))

    async def _publish(self, record: SourceRecord, row: PublishRow) -> None:
        try:
            await self._batcher.submit(row.batch_key, row.row_json)
            self._metrics.delivered.labels(record.topic).inc()
        except RecordError as exc:
            await self._dead_letter(record, exc)
        except Exception as exc:  # noqa: BLE001  # a bug must not stop the partition; _bug logs it
            await self._dead_letter(record, _bug(record, exc, "publishing"))

    async def _deliver(self, record: SourceRecord, request: ApiRequest) -> None:
        try:
            report = await self._delivery.deliver(request, record.timestamp_ms)
        except RecordError as exc:
            await self._dead_letter(record, exc)
            return
        except Exception as exc:  # noqa: BLE001  # a bug must not stop the partition; _bug logs it
            await self._dead_letter(record, _bug(record, exc, "delivering"))
            return
        self._metrics.delivered.labels(record.topic).inc()
        if log.isEnabledFor(logging.DEBUG):  # the context dict costs more than the call it describes
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
        self._metrics.dead_lettered.labels(record.topic, error.reason).inc()
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


async def publish_batch(router: Router, delivery: Delivery, key: Hashable, rows: Sequence[bytes]) -> None:
    """The batcher's flush: one Publish-records call for rows that share a pipeline and a config."""
    pipeline_id, config_json = cast(tuple[str, bytes], key)
    # A 404 on publish means a wrong pipeline id, never "not yet", so no record timestamp is needed.
    await delivery.deliver(router.publish_request(pipeline_id, config_json, rows), record_timestamp_ms=0)


def _bug(record: SourceRecord, exc: Exception, doing: str) -> InternalError:
    """Our own bug met this record: log it loudly, and dead-letter the record rather than crash."""
    log.exception(f"unexpected error {doing} a record", extra=_where(record))
    return InternalError(f"{type(exc).__name__}: {exc}")


def _where(record: SourceRecord) -> dict[str, object]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
