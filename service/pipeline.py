"""The per-record logic: decode, route, deliver, or dead-letter; the Kafka loop sees only `Work`.

`prepare` runs in offset order per partition and decides the record's ordering key; `Work.start`
brings it to a durable outcome. A schema registry outage is waited out inside `prepare` (it is
not the record's fault), so records behind it simply wait, uncommitted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine, Hashable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol, cast

from opentelemetry.trace import Span

from service.core.errors import InternalError, RecordError, TransientError
from service.core.events import Event, EventKind
from service.core.records import Lender, SourceRecord, Work
from service.core.requests import ApiRequest, PublishRow
from service.http.batching import Batcher
from service.http.classify import backoff_s
from service.http.delivery import Delivery
from service.kafka.deadletter import DeadLetterWriter
from service.ops.instrumentation import Instrumentation
from service.ops.tracing import Tracing, log_fields
from service.streams import Router, Stream

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
        streams: Mapping[str, Stream[Any, Any]],
        *,
        rng: random.Random,
        initial_backoff_s: float,
        max_backoff_s: float,
        instrumentation: Instrumentation,
        tracing: Tracing | None = None,
    ) -> None:
        self._instrumentation = instrumentation
        self._tracing = tracing or Tracing()
        self._decoder = decoder
        self._router = router
        self._delivery = delivery
        self._dead_letters = dead_letters
        self._batcher = batcher
        self._streams = streams
        self._rng = rng
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._tasks: set[asyncio.Task[None]] = set()

    async def prepare(self, record: SourceRecord) -> Work:
        # The record's span (None when tracing is off) goes with it to its outcome, as a parameter.
        span = self._tracing.start_record(record)
        try:
            stream = self._streams[record.topic]
            event = await self._decode(stream.kind, record, span)
            api = self._router.api(stream.destination)
            if stream.batch_row is not None:
                row = stream.batch_row(api, event, record)
                # Rows keep their order inside the batcher, so they need no key, and they batch.
                return Work(key=None, start=partial(self._start_publish, record, row, span))
            request = stream.route(api, event, record)
            key = stream.ordering_key(event)
        except RecordError as exc:
            return self._dead_work(record, exc, span)
        except Exception as exc:  # noqa: BLE001  # a bug must not stop the partition; _bug logs it
            return self._dead_work(record, _bug(record, exc, "preparing", span), span)
        return Work(key=key, start=partial(self._start_deliver, record, request, span))

    async def _decode(self, kind: EventKind, record: SourceRecord, span: Span | None) -> Event:
        attempt = 0
        while True:
            try:
                return await self._decoder.decode(kind, record.value)
            except TransientError as exc:  # a registry outage: wait it out, the record is not at fault
                attempt += 1
                log.warning(
                    "decoding needs a service that is down, will retry",
                    extra={**_where(record, span), "error": str(exc)},
                )
                pause = backoff_s(attempt - 1, self._initial_backoff_s, self._max_backoff_s, self._rng)
                await asyncio.sleep(pause)

    def _dead_work(self, record: SourceRecord, error: RecordError, span: Span | None) -> Work:
        # Nothing else depends on a dead-lettered record, so it waits for nothing.
        return Work(key=None, start=partial(self._start_dead_work, record, error, span))

    def _start_deliver(
        self, record: SourceRecord, request: ApiRequest, span: Span | None, lender: Lender
    ) -> asyncio.Future[None]:
        # Not `_traced`: `_deliver` ends the span itself, which costs less than a done callback on the hot path.
        return self._start(self._deliver(record, request, _Parking(lender, record.offset), span))

    def _start_dead_work(
        self, record: SourceRecord, error: RecordError, span: Span | None, lender: Lender
    ) -> asyncio.Future[None]:
        return self._traced(span, self._start_dead_letter(record, error, span))

    def _start_dead_letter(self, record: SourceRecord, error: RecordError, span: Span | None) -> asyncio.Future[None]:
        return self._start(self._dead_letter(record, error, span))

    def _traced(self, span: Span | None, outcome: asyncio.Future[None]) -> asyncio.Future[None]:
        """`outcome`, ending the record's span when it completes."""
        if span is not None:
            outcome.add_done_callback(partial(self._tracing.end_record, span))
        return outcome

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.get_running_loop().create_task(work)  # not ensure_future: its checks cost per record
        # The loop keeps only weak references to tasks; this set keeps them running.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_publish(
        self, record: SourceRecord, row: PublishRow, span: Span | None, lender: Lender
    ) -> asyncio.Future[None]:
        # The hot path of new inferences: no task per row. The row's own future settles the
        # record's outcome; only a refused row needs a task, to write its dead letter.
        sent = self._batcher.add(row.batch_key, row.row_json, span)
        outcome = _Withdrawing(loop=sent.get_loop())
        outcome.row = sent
        sent.add_done_callback(partial(self._published, record, outcome, span))
        return self._traced(span, outcome)

    def _published(
        self, record: SourceRecord, outcome: asyncio.Future[None], span: Span | None, sent: asyncio.Future[None]
    ) -> None:
        if outcome.done():  # the record was cancelled (stop or revoke); it will be read again
            if not sent.cancelled():
                sent.exception()  # retrieved, so asyncio does not report it as lost
            return
        if sent.cancelled():
            outcome.cancel()
            return
        exc = sent.exception()
        if exc is None:
            self._instrumentation.record_delivered(record.topic)
            if span is not None:
                self._tracing.delivered(span)
            outcome.set_result(None)
            return
        error = exc if isinstance(exc, RecordError) else _bug(record, exc, "publishing", span)
        writing = self._start_dead_letter(record, error, span)
        writing.add_done_callback(partial(_settle, outcome))
        # As for any other record: cancelling it (stop, revoke) cancels its dead-letter write, so the write
        # does not go on waiting (its retries, a slow topic) after the partition is gone. A letter the producer
        # already queued may still be written, and written again by the partition's next owner: at least once.
        outcome.add_done_callback(partial(_cancel_if_cancelled, writing))

    async def _deliver(
        self, record: SourceRecord, request: ApiRequest, parking: _Parking, span: Span | None = None
    ) -> None:
        ended: BaseException | None = None
        try:
            try:
                report = await self._delivery.deliver(request, record.timestamp_ms, parking, trace=span)
            except RecordError as exc:
                await self._dead_letter(record, exc, span)
                return
            except Exception as exc:  # noqa: BLE001  # a bug must not stop the partition; _bug logs it
                await self._dead_letter(record, _bug(record, exc, "delivering", span), span)
                return
            self._instrumentation.record_delivered(record.topic)
            if span is not None:
                self._tracing.delivered(span)
            if log.isEnabledFor(logging.DEBUG):  # the context dict costs more than the call it describes
                log.debug(
                    "delivered",
                    extra={
                        **_where(record, span),
                        "endpoint": request.endpoint.value,
                        "status": report.status,
                        "attempts": report.attempts,
                    },
                )
        except BaseException as exc:  # cancelled (stop, revoke), or a dead letter that could not be written
            ended = exc
            raise
        finally:
            if span is not None:
                self._tracing.finish(span, ended)

    async def _dead_letter(self, record: SourceRecord, error: RecordError, span: Span | None = None) -> None:
        await self._dead_letters.write(record, error)
        self._instrumentation.record_dead_lettered(record.topic, error.reason)
        if span is not None:
            self._tracing.dead_lettered(span, error)
        status = getattr(getattr(error, "evidence", None), "status", None)
        log.warning(
            "dead-lettered",
            extra={
                **_where(record, span),
                "reason": error.reason,
                "stage": error.stage.value,
                "status": status,
                "error": str(error),
            },
        )


async def publish_batch(
    router: Router, delivery: Delivery, key: Hashable, rows: Sequence[bytes], *, trace: Span | None = None
) -> None:
    """The batcher's flush: one Publish-records call for rows that share a pipeline and a config."""
    pipeline_id, config_json = cast(tuple[str, bytes], key)
    # A 404 on publish means a wrong pipeline id, never "not yet", so no record timestamp is needed.
    await delivery.deliver(router.publish_request(pipeline_id, config_json, rows), record_timestamp_ms=0, trace=trace)


async def publish_linked_batch(
    router: Router,
    delivery: Delivery,
    tracing: Tracing,
    key: Hashable,
    rows: Sequence[bytes],
    traces: Sequence[object],
) -> None:
    """The batcher's flush with tracing on: the call gets one span, linked to the spans of its rows."""
    span = tracing.start_batch(cast(tuple[str, bytes], key)[0], traces)
    if span is None:
        await publish_batch(router, delivery, key, rows)
        return
    try:
        await publish_batch(router, delivery, key, rows, trace=span)
    except BaseException as exc:
        tracing.end_batch(span, exc)
        raise
    tracing.end_batch(span, None)


class _Parking:
    """One record's way to give back its in-flight slots while it waits (delivery's `Parking`)."""

    __slots__ = ("_lender", "_offset")

    def __init__(self, lender: Lender, offset: int) -> None:
        self._lender = lender
        self._offset = offset

    def park(self) -> None:
        self._lender.park(self._offset)

    async def resume(self) -> None:
        await self._lender.resume(self._offset)


def _settle(target: asyncio.Future[None], source: asyncio.Future[None]) -> None:
    """Give `target` the outcome of `source`."""
    if target.done():
        if not source.cancelled():
            source.exception()  # retrieved, so asyncio does not report it as lost
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(None)


class _Withdrawing(asyncio.Future[None]):
    """A new inference's outcome: cancelling it (a stop, a revoke) withdraws its row from the batcher as well, so that
    the row is not sent for a record its partition's next reader reads again (service/http/batching.py). A subclass
    rather than a done callback: only a cancellation pays for it, not every row."""

    __slots__ = ("row",)
    row: asyncio.Future[None]

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        self.row.cancel()
        return True


def _cancel_if_cancelled(work: asyncio.Future[None], outcome: asyncio.Future[None]) -> None:
    if outcome.cancelled():
        work.cancel()


def _bug(record: SourceRecord, exc: BaseException, doing: str, span: Span | None = None) -> InternalError:
    """Our own bug met this record: log it loudly, and dead-letter the record rather than crash."""
    # exc_info=exc, not log.exception: this also runs in done callbacks, outside any `except`.
    log.error(f"unexpected error {doing} a record", exc_info=exc, extra=_where(record, span))
    return InternalError(f"{type(exc).__name__}: {exc}")


def _where(record: SourceRecord, span: Span | None = None) -> dict[str, object]:
    """A log line's record coordinates, and its trace and span id when tracing is on."""
    where: dict[str, object] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
    if span is not None:
        where.update(log_fields(span))
    return where
