"""Tracing on: `OtelTracing`, the spans of records, HTTP calls and batched publishes (service/ops/tracing/api.py says
what each carries), made as `LeanSpan`s under the SDK's sampler and handed to its BatchSpanProcessor.

The SDK's sampler decides for spans without a local parent (records, batches); a child (an HTTP call) follows its
parent's decision, as every built-in sampler would, and the samplers of OTEL_TRACES_SAMPLER whose answer is known
(always_on; parentbased_always_on for a record with a producer parent or without) are not asked. A sampled span is
queued when it ends; an unsampled one is the API's NonRecordingSpan: only its context (for the `traceparent` and the
logs). Imported only when tracing is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased, Sampler
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.util.types import AnyValue

from service.core.errors import RecordError
from service.core.records import SourceRecord
from service.core.requests import ApiRequest, Endpoint

from .api import SHUTDOWN_TIMEOUT_S, Tracing
from .exporter import queue_emit
from .fetch import FetchClock, FetchNotes
from .propagation import TRACEPARENT, TRACESTATE, Parent, producer_parent
from .spans import ERROR, FLAGS, FullUrl, LeanSpan, Owner

log = logging.getLogger("service.otel")  # its name before the move: log queries filter on it

_FLAGS_HEX = [f"{bits:02x}" for bits in range(4)]
_ROOT = Context()
"""An explicit empty parent: spans never take the ambient context."""


class OtelTracing(Tracing):
    """Tracing on (see service/ops/tracing/api.py for the spans and what they carry)."""

    enabled = True

    def __init__(
        self,
        processor: SpanProcessor,
        sampler: Sampler,
        resource: Resource,
        *,
        group_id: str,
        max_links: int,
        version: str | None = None,
    ) -> None:
        self._processor = processor
        emit = queue_emit(processor)
        self._emit = emit
        self._sampler = sampler
        self._owner = Owner(emit, resource, InstrumentationScope("inference-bridge", version))
        self._group_id = group_id
        self._max_links = max_links
        # The sampler's answer for a remote parent, without asking it, when it is one of the parentbased_* samplers
        # of OTEL_TRACES_SAMPLER: those follow the parent's sampled flag and keep its trace state.
        self._follows_remote_parent = (
            isinstance(sampler, ParentBased)
            and getattr(sampler, "_remote_parent_sampled", None) is ALWAYS_ON
            and getattr(sampler, "_remote_parent_not_sampled", None) is ALWAYS_OFF
        )
        # Likewise for a new trace when it is always sampled (the default, parentbased_always_on, and always_on),
        # and for any record under always_on, which samples everything and keeps a parent's trace state.
        self._samples_all = sampler is ALWAYS_ON
        self._samples_roots = self._samples_all or (
            isinstance(sampler, ParentBased) and getattr(sampler, "_root", None) is ALWAYS_ON
        )
        self._random = random.Random()
        # Per partition: the record span's name and constant attributes.
        self._partitions: dict[tuple[str, int], tuple[str, dict[str, AnyValue]]] = {}
        self._fetches = FetchNotes()
        self._calls: dict[Endpoint, tuple[str, str, dict[str, AnyValue]]] = {}

    def _start(
        self,
        name: str,
        parent: Parent | None,
        kind: SpanKind,
        base: Mapping[str, AnyValue],
        own: tuple[str, AnyValue, str],
        values: dict[str, AnyValue] | None,
        start_time: int | None = None,
        links: Sequence[Link] = (),
    ) -> trace_api.Span:
        """A span whose sampling the sampler decides (no local parent): a record's (maybe a remote parent's child)
        or a batch's; `own` is its `key`, its value and its `key2` (see LeanSpan). Unsampled, it is only its
        context (for the traceparent and the logs)."""
        trace_state: TraceState | None
        added: Mapping[str, AnyValue] | None = None
        if parent is None:
            random_id, parent_id, parent_flags = 2, 0, 0
            if self._samples_roots:
                trace_id, sampled, trace_state = self._random.getrandbits(128) or 1, True, None
            else:
                trace_id = self._random.getrandbits(128) or 1
                attributes = {**base, own[0]: own[1], **(values or {})}
                sampled, trace_state, added = self._ask_sampler(_ROOT, trace_id, name, kind, attributes, links)
        else:
            trace_id, parent_id, parent_flags, trace_state = parent
            random_id = parent_flags & 2
            if self._samples_all:
                sampled = True
            elif self._follows_remote_parent:
                sampled = bool(parent_flags & 1)
            else:
                remote = SpanContext(trace_id, parent_id, True, TraceFlags(parent_flags), trace_state)
                parent_context = set_span_in_context(NonRecordingSpan(remote), _ROOT)
                attributes = {**base, own[0]: own[1], **(values or {})}
                sampled, trace_state, added = self._ask_sampler(parent_context, trace_id, name, kind, attributes, links)
        span_id = self._random.getrandbits(64) or 1
        flags = random_id | sampled
        if not sampled:
            return NonRecordingSpan(SpanContext(trace_id, span_id, False, FLAGS[flags], trace_state))
        span = LeanSpan(
            self._owner,
            name,
            kind,
            base,
            own[0],
            own[1],
            own[2],
            values,
            trace_id,
            span_id,
            flags,
            trace_state,
            parent_id,
            parent_flags,
            True,
            start_time if start_time is not None else time.time_ns(),
        )
        if links:
            span._links = links
        if added:
            span.set_attributes(added)
        return span

    def _ask_sampler(
        self,
        parent_context: Context,
        trace_id: int,
        name: str,
        kind: SpanKind,
        attributes: dict[str, AnyValue],
        links: Sequence[Link],
    ) -> tuple[bool, TraceState | None, Mapping[str, AnyValue] | None]:
        """(sampled, trace state, the attributes it adds) from the configured sampler."""
        result = self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, links)
        sampled = result.decision is Decision.RECORD_AND_SAMPLE
        added = None
        if sampled and result.attributes:
            added = {k: v for k, v in result.attributes.items() if attributes.get(k) != v}
        return sampled, result.trace_state, added

    # --- the Kafka side ---------------------------------------------------------------------------------------

    def watch(self, consumer: Any) -> Any:
        return FetchClock(consumer, self._fetches.note)

    def start_record(self, record: SourceRecord) -> trace_api.Span:
        where = (record.topic, record.partition)
        known = self._partitions.get(where)
        if known is None:
            known = self._partitions[where] = (
                f"process {record.topic}",
                {
                    "messaging.system": "kafka",
                    "messaging.operation.name": "process",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": record.topic,
                    "messaging.destination.partition.id": str(record.partition),
                    "messaging.consumer.group.name": self._group_id,
                },
            )
        name, constant = known
        return self._start(
            name,
            producer_parent(record.headers) if record.headers else None,
            SpanKind.CONSUMER,
            constant,
            ("messaging.kafka.offset", record.offset, "bridge.outcome"),
            None,
            self._fetches.fetched_at(record),
        )

    def delivered(self, span: trace_api.Span) -> None:
        if type(span) is LeanSpan:
            span._value2 = "delivered"  # its key2

    def dead_lettered(self, span: trace_api.Span, error: RecordError) -> None:
        span.set_attributes(
            {
                "bridge.outcome": "dead-lettered",
                "bridge.reason": error.reason,
                "bridge.stage": error.stage.value,
                "error.type": error.reason,
            }
        )
        # The reason code, not the message: messages may quote a response body, and spans pass no redactor.
        span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {error.reason}"))

    def end_record(self, span: trace_api.Span, outcome: asyncio.Future[None]) -> None:
        self.finish(span, asyncio.CancelledError() if outcome.cancelled() else outcome.exception())

    def finish(self, span: trace_api.Span, error: BaseException | None) -> None:
        if type(span) is not LeanSpan:
            return  # not sampled: nothing to record
        if error is None:  # delivered or dead-lettered: the hot path, without `end`'s checks
            if span._end_time is None:
                span._end_time = time.time_ns()
                self._emit(span)
            return
        if isinstance(error, asyncio.CancelledError):
            # Stopped or revoked first: the record is read again, and gets a new span then.
            span.set_attribute("bridge.outcome", "cancelled")
        else:  # the service stops (a dead letter that could not be written)
            span.set_attributes({"bridge.outcome": "failed", "error.type": type(error).__name__})
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    # --- batches ----------------------------------------------------------------------------------------------

    def start_batch(self, pipeline_id: str, rows: Sequence[object]) -> trace_api.Span:
        found = []
        for row in rows:
            if isinstance(row, trace_api.Span):
                ctx = row.get_span_context()
                if ctx.trace_flags.sampled:  # an unsampled row's span is never exported: nothing to link to
                    found.append(Link(ctx))
        links = BoundedList.from_seq(self._max_links, found)
        return self._start(
            "publish batch",
            None,
            SpanKind.INTERNAL,
            _BATCH,
            ("messaging.batch.message_count", len(rows), "bridge.outcome"),
            {"bridge.pipeline_id": pipeline_id},
            links=links,
        )

    def end_batch(self, span: trace_api.Span, error: BaseException | None) -> None:
        if error is None:
            span.set_attribute("bridge.outcome", "delivered")
        elif isinstance(error, asyncio.CancelledError):
            span.set_attribute("bridge.outcome", "cancelled")
        else:
            kind = error.reason if isinstance(error, RecordError) else type(error).__name__
            span.set_attributes({"bridge.outcome": "rejected", "error.type": kind})
            span.set_status(Status(StatusCode.ERROR, kind))
        span.end()

    # --- HTTP calls -------------------------------------------------------------------------------------------

    def start_call(self, parent: trace_api.Span, request: ApiRequest, attempt: int) -> trace_api.Span:
        """A child of the record's (or batch's) span; it follows that span's sampling decision."""
        if type(parent) is not LeanSpan:  # not sampled: only a context, for the traceparent
            up = parent.get_span_context()
            trace_id, _, _, flags, state, _ = up  # a SpanContext is a tuple
            return NonRecordingSpan(SpanContext(trace_id, self._random.getrandbits(64) or 1, False, flags, state))
        url = request.url
        known = self._calls.get(request.endpoint)
        if known is None or not url.startswith(known[0]):
            known = self._calls[request.endpoint] = _call_kind(request)
        return LeanSpan(
            self._owner,
            known[1],
            SpanKind.CLIENT,
            known[2],
            "url.full",
            # Written out by the exporter's thread, with the batch (see `FullUrl`).
            FullUrl(url, request.params) if request.params else url,
            "http.response.status_code",
            {"http.request.resend_count": attempt - 1} if attempt > 1 else None,
            parent._trace_id,
            self._random.getrandbits(64) or 1,
            parent._flags,
            parent._state,
            parent._span_id,
            parent._flags,
            False,
            time.time_ns(),
        )

    def inject(self, call: trace_api.Span, headers: Mapping[str, str]) -> Mapping[str, str]:
        """`headers` plus the call span's `traceparent` (and `tracestate`), as W3C Trace Context writes them."""
        if type(call) is LeanSpan:
            trace_id, span_id, flags, state = call._trace_id, call._span_id, call._flags, call._state
        else:
            trace_id, span_id, _, flags, state, _ = call.get_span_context()
        traced = {**headers, TRACEPARENT: f"00-{trace_id:032x}-{span_id:016x}-{_FLAGS_HEX[flags]}"}
        if state:
            traced[TRACESTATE] = state.to_header()
        return traced

    def end_call(self, call: trace_api.Span, status: int | None, error: str | None) -> None:
        if type(call) is not LeanSpan:
            return  # not sampled: nothing to record
        if status is not None:
            call._value2 = status  # its key2
            if status >= 400:
                error = str(status)
        if error is not None:
            call.set_attribute("error.type", error)
            call._status = ERROR
        if call._end_time is None:
            call._end_time = time.time_ns()
            self._emit(call)

    # --- shutdown ---------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Export what is queued, for at most `SHUTDOWN_TIMEOUT_S`: a collector that is down never holds a stop."""
        done = asyncio.get_running_loop().create_future()

        def shut_down() -> None:
            try:
                self._processor.shutdown()
            finally:
                _tell(done)

        # A daemon thread, not the loop's executor: the executor's threads are joined at exit, this one is not.
        threading.Thread(target=shut_down, name="otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning("trace export did not finish at stop; the spans still queued are dropped")
            # Ends the exporter's retries; the worker thread is a daemon and ends with the process.
            exporter = getattr(self._processor, "span_exporter", None)
            if exporter is not None:
                exporter.shutdown()


_BATCH: Mapping[str, AnyValue] = MappingProxyType({"bridge.endpoint": "publish"})


def _call_kind(request: ApiRequest) -> tuple[str, str, dict[str, AnyValue]]:
    """(scheme and authority, span name, constant attributes) of the calls to `request`'s endpoint."""
    parts = urlsplit(request.url)
    base: dict[str, AnyValue] = {
        "http.request.method": request.method,
        "server.address": parts.hostname or "",
        "bridge.endpoint": request.endpoint.value,
    }
    if parts.port is not None:
        base["server.port"] = parts.port
    return f"{parts.scheme}://{parts.netloc}/", f"{request.method} {request.endpoint.value}", base


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _tell(done: asyncio.Future[None]) -> None:
    """From the shutdown thread: `done` is done (its loop may be gone by then, after a timeout)."""
    with contextlib.suppress(RuntimeError):
        done.get_loop().call_soon_threadsafe(_set_done, done)
