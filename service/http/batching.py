"""Batching of new inferences: rows for the same pipeline and config share one Publish-records call.

A batch closes at `max_rows`, at `max_bytes` of row JSON, or `linger_s` after its first row,
whichever comes first. Batches go out as soon as they close, several of one key at a time: rows
carry their own ids and timestamps, so Publish-records calls need no order among themselves, and a
slow or hung call holds only its own rows (delivery's concurrency limit bounds how many are in
flight; the consumer loop commits only the done prefix of each partition). When the API refuses
a batch with a status that can be about single rows (400, 413, 422), the batch is split in halves
and each half retried, down to single rows:
good rows are delivered, and only the rows that are refused on their own fail, each with the
evidence of its own call. Each submitter awaits the outcome of its own row.

Cancelling a row's future withdraws the row: its record was cancelled (a stop, a revoke) and will be read
again. It leaves its open batch, it is not sent again when its batch is split, and a batch in flight whose rows are
all withdrawn is cancelled, so that during an outage each re-read of a partition does not leave one more copy of
its rows waiting to be sent. Per key, only the open batch is kept: a key (a pipeline and its config) whose batch
closed holds nothing, however many configs producers send.

With tracing on, each row carries its record's span (opaque here) and a batch goes to `linked_flush`, which
also gets those spans, so the call's span can link to them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field

from service.core.errors import RejectedError

SPLITTABLE_STATUSES = frozenset({400, 413, 422})
"""Refusals that one bad row (or a too-large body) can cause; others (401, 404, ...) hold for every row."""

Flush = Callable[[Hashable, Sequence[bytes]], Awaitable[None]]
LinkedFlush = Callable[[Hashable, Sequence[bytes], Sequence[object]], Awaitable[None]]
"""A flush that also gets each row's trace (the span of its record), in the order of the rows."""


class _Flight:
    """A batch sent or being sent: how many of its rows are still waiting for an outcome (neither withdrawn nor
    settled by a part of a split batch), and its task while it runs."""

    __slots__ = ("live", "task")

    def __init__(self, live: int) -> None:
        self.live = live
        self.task: asyncio.Task[None] | None = None

    def withdrawn(self) -> None:
        self.live -= 1
        if self.live <= 0 and self.task is not None:
            self.task.cancel()  # nobody waits for any of its rows any more


class _RowFuture(asyncio.Future[None]):
    """A row's outcome; cancelling it withdraws the row (see the module doc). A subclass rather than a done callback:
    only a cancellation pays for it, not every row."""

    __slots__ = ("flight",)
    flight: _Flight | None

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        flight = self.flight
        if flight is not None:
            self.flight = None
            flight.withdrawn()
        return True


@dataclass(slots=True)
class _Row:
    body: bytes
    outcome: _RowFuture
    trace: object = None


@dataclass(slots=True)
class _Open:
    rows: list[_Row] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(
        self,
        flush: Flush,
        *,
        max_rows: int,
        max_bytes: int,
        linger_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
        linked_flush: LinkedFlush | None = None,
    ) -> None:
        self._flush = flush
        self._linked_flush = linked_flush
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._linger_s = linger_s
        self._on_batch = on_batch
        self._open: dict[Hashable, _Open] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, taken at the first row

    async def submit(self, key: Hashable, body: bytes) -> None:
        """Add one row; return when it was delivered, raise `RejectedError` when it was refused."""
        await self.add(key, body)

    def add(self, key: Hashable, body: bytes, trace: object = None) -> asyncio.Future[None]:
        """Add one row; its future completes when it was delivered, or fails with `RejectedError`.

        `trace` is the span of the row's record when tracing is on (see `linked_flush`).
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Open()
        elif batch.size + len(body) > self._max_bytes:  # an open batch has rows: `_close` removes it
            self._close(key, batch)
            batch = self._open[key] = _Open()
        outcome = _RowFuture(loop=loop)
        outcome.flight = None
        row = _Row(body, outcome, trace)
        batch.rows.append(row)
        batch.size += len(body)
        if len(batch.rows) >= self._max_rows or batch.size >= self._max_bytes:
            self._close(key, batch)
        elif batch.timer is None:
            batch.timer = loop.call_later(self._linger_s, self._close, key, batch)
        return row.outcome

    def _close(self, key: Hashable, batch: _Open) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if self._open.get(key) is batch:
            del self._open[key]
        rows = [row for row in batch.rows if not row.outcome.done()]  # not withdrawn
        batch.rows, batch.size = [], 0
        if not rows:
            return
        self._on_batch(len(rows))
        flight = _Flight(len(rows))
        for row in rows:
            row.outcome.flight = flight
        task = flight.task = asyncio.create_task(self._send_rows(key, rows, flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_rows(self, key: Hashable, rows: list[_Row], flight: _Flight) -> None:
        try:
            await self._send(key, rows, flight)
        except asyncio.CancelledError:
            flight.task = None  # already cancelled: the rows' cancellation below must not cancel it again
            for row in rows:
                row.outcome.cancel()
            raise
        except Exception as exc:  # noqa: BLE001  # a bug: each row's submitter handles it as its own record's failure
            _fail(rows, exc)

    async def _send(self, key: Hashable, rows: list[_Row], flight: _Flight) -> None:
        if any(row.outcome.done() for row in rows):  # withdrawn since the batch closed, or since it was split
            rows = [row for row in rows if not row.outcome.done()]
            if not rows:
                return
        try:
            if self._linked_flush is not None and rows[0].trace is not None:  # tracing on: every row has one
                await self._linked_flush(key, [row.body for row in rows], [row.trace for row in rows])
            else:
                await self._flush(key, [row.body for row in rows])
        except RejectedError as exc:
            status = exc.evidence.status
            if len(rows) > 1 and status in SPLITTABLE_STATUSES:
                half = len(rows) // 2
                await self._send(key, rows[:half], flight)
                await self._send(key, rows[half:], flight)
                return
            flight.live -= _fail(rows, exc)
            return
        settled = 0
        for row in rows:
            if not row.outcome.done():
                row.outcome.set_result(None)
                settled += 1
        flight.live -= settled  # so that withdrawing the rest of a split batch gives up its remaining calls

    async def aclose(self) -> None:
        """Cancel batches still waiting or in flight; their rows stay uncommitted and are read again."""
        for batch in self._open.values():
            if batch.timer is not None:
                batch.timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _fail(rows: list[_Row], exc: BaseException) -> int:
    """Fail the rows still waiting; how many they were."""
    failed = 0
    for row in rows:
        if not row.outcome.done():
            row.outcome.set_exception(exc)
            failed += 1
    return failed
