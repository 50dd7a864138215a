"""Tracing on: the OpenTelemetry SDK's sampler, resource, BatchSpanProcessor and OTLP/HTTP exporter, with lean spans.

Imported only when tracing is on (service/tracing.py builds it). The SDK makes a span through `Tracer.start_span`
at about 15 µs and encodes it for OTLP at about 35 µs, measured here: at two spans per record that more than doubled
the CPU an update costs (tests/support/tracing_cost.py). So this module keeps the SDK's pipeline and replaces the two
costly steps:

- `LeanSpan` implements the API's `Span` and the SDK's `ReadableSpan` without the SDK span's lock, attribute
  validation and bounded containers (every attribute here is a str or an int this module sets). The SDK's sampler
  decides for spans without a local parent (records, batches); a child (an HTTP call) follows its parent's
  decision, as every built-in sampler would. A sampled span is handed to the BatchSpanProcessor when it ends;
  an unsampled one is the API's NonRecordingSpan: only its context (for the `traceparent` and the logs).
- `encode` writes the OTLP `ExportTraceServiceRequest` protobuf directly, caching the encoding of repeated
  attributes; `FastOtlpExporter` sends it through the SDK exporter's own HTTP client, so the OTEL_EXPORTER_OTLP_*
  settings (endpoint, headers, timeout, compression, certificates) and its retries apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote, urlsplit

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
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
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH
from opentelemetry.util.types import AnyValue, Attributes

from service.core.errors import RecordError
from service.core.records import SourceRecord
from service.core.requests import ApiRequest, Endpoint
from service.tracing import SHUTDOWN_TIMEOUT_S, OnDropped, Tracing

log = logging.getLogger(__name__)

_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"
_FLAGS = [TraceFlags(bits) for bits in range(4)]
"""By (random trace id << 1) | sampled: a span is sampled or not, and keeps the random-trace-id flag of its trace
(W3C Trace Context level 2), set for the trace ids made here, as the SDK does."""
_FLAGS_HEX = [f"{bits:02x}" for bits in range(4)]
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)
_ROOT = Context()
"""An explicit empty parent: spans never take the ambient context."""


class LeanSpan(trace_api.Span, ReadableSpan):
    """A sampled span: a few attribute assignments to make, and one processor call to end.

    Its attributes are `base`, shared by every span of its kind and place (a partition's record spans, an
    endpoint's calls) and never changed, then its own `values`; the encoder encodes each `base` once. Its ids are
    plain ints: the API's SpanContext (and the parent's) is made only when asked for (a log line, the SDK's own
    encoder), not for every span.
    """

    # Slots for what every span sets: cheaper to set than dict entries. What few spans set (a status, links)
    # are class defaults, overridden in the instance's dict.
    __slots__ = (
        "_base",
        "_ctx",
        "_end_time",
        "_flags",
        "_kind",
        "_name",
        "_owner",
        "_parent_flags",
        "_parent_id",
        "_parent_remote",
        "_span_id",
        "_start_time",
        "_state",
        "_trace_id",
        "_values",
    )
    _events: Sequence[Any] = ()
    _instrumentation_info = None
    _links: Sequence[Link] = ()
    _status = _UNSET

    def __init__(
        self,
        owner: _Owner,
        name: str,
        kind: SpanKind,
        base: Mapping[str, AnyValue],
        values: dict[str, Any],
        trace_id: int,
        span_id: int,
        flags: int,
        state: TraceState | None,
        parent_id: int,
        parent_flags: int,
        parent_remote: bool,
        start_time: int,
    ) -> None:
        self._owner = owner
        self._name = name
        self._kind = kind
        self._base = base
        self._values: dict[str, Any] = values
        self._trace_id = trace_id
        self._span_id = span_id
        self._flags = flags
        self._state = state
        self._parent_id = parent_id  # 0: none
        self._parent_flags = parent_flags
        self._parent_remote = parent_remote
        self._start_time = start_time
        self._end_time: int | None = None
        self._ctx: SpanContext | None = None

    def get_span_context(self) -> SpanContext:
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = SpanContext(self._trace_id, self._span_id, False, _FLAGS[self._flags], self._state)
        return ctx

    # ReadableSpan's properties (what the SDK's exporters read), from this span's own fields.
    @property
    def context(self) -> SpanContext:
        return self.get_span_context()

    @property
    def parent(self) -> SpanContext | None:
        if not self._parent_id:
            return None
        flags = TraceFlags(self._parent_flags)
        return SpanContext(self._trace_id, self._parent_id, self._parent_remote, flags, self._state)

    @property
    def resource(self) -> Resource:
        return self._owner.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._owner.scope

    @property
    def dropped_attributes(self) -> int:
        return 0

    @property
    def attributes(self) -> Mapping[str, AnyValue]:
        values = {k: str(v) if type(v) is FullUrl else v for k, v in self._values.items()}
        return MappingProxyType({**self._base, **values})

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: AnyValue) -> None:
        self._values[key] = value

    def set_attributes(self, attributes: Mapping[str, AnyValue]) -> None:
        self._values.update(attributes)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if isinstance(status, StatusCode):
            status = Status(status, description)
        self._status = status

    def update_name(self, name: str) -> None:
        self._name = name

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        pass  # this service's spans carry no events

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.set_attribute("error.type", type(exception).__name__)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        self._owner.emit(self)


class _Owner:
    """What every span of one `OtelTracing` shares: one reference per span instead of three."""

    __slots__ = ("emit", "resource", "scope")

    def __init__(self, emit: Callable[[ReadableSpan], None], resource: Resource, scope: InstrumentationScope) -> None:
        self.emit = emit
        self.resource = resource
        self.scope = scope


class OtelTracing(Tracing):
    """Tracing on (see service/tracing.py for the spans and what they carry)."""

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
        self._owner = _Owner(emit, resource, InstrumentationScope("inference-bridge", version))
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
        # Per partition: (first offset, last offset, when fetched in ns) of polls not yet prepared.
        self._fetches: dict[tuple[str, int], deque[tuple[int, int, int]]] = {}
        self._calls: dict[Endpoint, tuple[str, str, dict[str, AnyValue]]] = {}

    def _start(
        self,
        name: str,
        parent: _Parent | None,
        kind: SpanKind,
        base: Mapping[str, AnyValue],
        values: dict[str, AnyValue],
        start_time: int | None = None,
        links: Sequence[Link] = (),
    ) -> trace_api.Span:
        """A span whose sampling the sampler decides (no local parent): a record's (maybe a remote parent's child)
        or a batch's. Unsampled, it is only its context (for the traceparent and the logs)."""
        trace_state: TraceState | None
        if parent is None:
            random_id, parent_id, parent_flags = 2, 0, 0
            if self._samples_roots:
                trace_id, sampled, trace_state = self._random.getrandbits(128) or 1, True, None
            else:
                trace_id = self._random.getrandbits(128) or 1
                sampled, trace_state = self._ask_sampler(_ROOT, trace_id, name, kind, base, values, links)
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
                sampled, trace_state = self._ask_sampler(parent_context, trace_id, name, kind, base, values, links)
        span_id = self._random.getrandbits(64) or 1
        flags = random_id | sampled
        if not sampled:
            return NonRecordingSpan(SpanContext(trace_id, span_id, False, _FLAGS[flags], trace_state))
        span = LeanSpan(
            self._owner,
            name,
            kind,
            base,
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
        return span

    def _ask_sampler(
        self,
        parent_context: Context,
        trace_id: int,
        name: str,
        kind: SpanKind,
        base: Mapping[str, AnyValue],
        values: dict[str, AnyValue],
        links: Sequence[Link],
    ) -> tuple[bool, TraceState | None]:
        """(sampled, trace state) from the configured sampler; the attributes it adds join the span's `values`."""
        attributes = {**base, **values}
        result = self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, links)
        sampled = result.decision is Decision.RECORD_AND_SAMPLE
        if sampled and result.attributes:
            values.update({k: v for k, v in result.attributes.items() if attributes.get(k) != v})
        return sampled, result.trace_state

    # --- the Kafka side ---------------------------------------------------------------------------------------

    def watch(self, consumer: Any) -> Any:
        return _FetchClock(consumer, self._fetched)

    def _fetched(self, topic: str, partition: int, first: int, last: int, at_ns: int) -> None:
        polls = self._fetches.get((topic, partition))
        if polls is None:
            polls = self._fetches[(topic, partition)] = deque()
        elif polls and first <= polls[-1][1]:
            polls.clear()  # read again from an earlier offset (a rebalance, a seek): older notes are stale
        polls.append((first, last, at_ns))

    def _fetched_at(self, record: SourceRecord) -> int | None:
        polls = self._fetches.get((record.topic, record.partition))
        offset = record.offset
        while polls:
            first, last, at_ns = polls[0]
            if offset > last:
                polls.popleft()  # records are prepared in offset order: that poll is all prepared
                continue
            return at_ns if offset >= first else None
        return None

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
            _producer(record.headers) if record.headers else None,
            SpanKind.CONSUMER,
            constant,
            {"messaging.kafka.offset": record.offset},
            self._fetched_at(record),
        )

    def delivered(self, span: trace_api.Span) -> None:
        if type(span) is LeanSpan:
            span._values["bridge.outcome"] = "delivered"

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
            {"messaging.batch.message_count": len(rows), "bridge.pipeline_id": pipeline_id},
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
        # Written out by the exporter's thread, with the batch (see `FullUrl`).
        values: dict[str, Any] = {"url.full": FullUrl(url, request.params) if request.params else url}
        if attempt > 1:
            values["http.request.resend_count"] = attempt - 1
        return LeanSpan(
            self._owner,
            known[1],
            SpanKind.CLIENT,
            known[2],
            values,
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
        traced = {**headers, _TRACEPARENT: f"00-{trace_id:032x}-{span_id:016x}-{_FLAGS_HEX[flags]}"}
        if state:
            traced[_TRACESTATE] = state.to_header()
        return traced

    def end_call(self, call: trace_api.Span, status: int | None, error: str | None) -> None:
        if type(call) is not LeanSpan:
            return  # not sampled: nothing to record
        if status is not None:
            call._values["http.response.status_code"] = status
            if status >= 400:
                error = str(status)
        if error is not None:
            call._values["error.type"] = error
            call._status = _ERROR
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


_TRACEPARENT_FORMAT = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_TRACEPARENT_MAX = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
_TRACESTATE_MAX = _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH


_Parent = tuple[int, int, int, TraceState | None]
"""A remote parent: (trace id, span id, trace flags, trace state)."""
_PLAIN_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})").fullmatch
"""What almost every producer writes: version 00, nothing after the flags, no blanks. A strict subset of what the
API's propagator accepts, so the general rules are needed only for the rest."""
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16


def _producer(headers: Sequence[tuple[str, bytes]]) -> _Parent | None:
    """The producer's trace from a record's W3C `traceparent`/`tracestate` headers, or None (see
    `producer_context`, which gives it as the API's SpanContext)."""
    traceparent = tracestate = None
    for name, value in headers:
        if name == _TRACEPARENT:
            traceparent = value
        elif name == _TRACESTATE:
            tracestate = value
    if traceparent is None:
        return None
    plain = _PLAIN_TRACEPARENT(traceparent)
    if plain is not None:
        trace_hex, span_hex, flags_hex = plain.groups()
        if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
            return None
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    else:
        found = _general_traceparent(traceparent)
        if found is None:
            return None
        trace_id, span_id, flags = found
    state = None
    if tracestate is not None and len(tracestate) <= _TRACESTATE_MAX:
        state = TraceState.from_header([tracestate.decode("latin-1")])
    return trace_id, span_id, flags, state


def _general_traceparent(traceparent: bytes) -> tuple[int, int, int] | None:
    """The rules of the API's TraceContextTextMapPropagator.extract (its header pattern, the all-zero ids, versions
    00 and ff, the length limit)."""
    if len(traceparent) > _TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT_FORMAT.search(traceparent.decode("latin-1"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16 or version == "ff" or (version == "00" and rest):
        return None
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


def producer_context(headers: Sequence[tuple[str, bytes]]) -> SpanContext | None:
    """The producer's span context from a record's W3C `traceparent`/`tracestate` headers, or None.

    The rules of the API's TraceContextTextMapPropagator.extract, without the Context and the non-recording span it
    wraps the result in. Header names are matched exactly, as OpenTelemetry's Kafka instrumentations write and read
    them.
    """
    found = _producer(headers)
    if found is None:
        return None
    trace_id, span_id, flags, state = found
    return SpanContext(trace_id, span_id, True, TraceFlags(flags), state)


_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


class FullUrl:
    """A call's `url.full`, its query written out only when the span is encoded (or its attributes read): on the
    exporter's thread, a batch at a time, rather than on the event loop for every call."""

    __slots__ = ("_params", "_url")

    def __init__(self, url: str, params: Sequence[tuple[str, str]]) -> None:
        self._url = url
        self._params = params

    def __str__(self) -> str:
        # Keys travel in headers only, and URLs with credentials are refused at start-up: no secret here.
        query = "&".join([f"{k}={v if _URL_SAFE(v) else quote(v, safe='')}" for k, v in self._params])
        return f"{self._url}?{query}"

    def __repr__(self) -> str:
        return repr(str(self))


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


class _FetchClock:
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


# --- counting what never reaches the collector -----------------------------------------------------------------


class _CountDrops:
    """The BatchSpanProcessor's own accounting hook (`ProcessorMetricsT`), counting the spans it drops."""

    def __init__(self, inner: Any, on_dropped: OnDropped) -> None:
        self._inner = inner
        self._on_dropped = on_dropped

    def register_queue_size(self, get_queue_size: Callable[[], int]) -> None:
        self._inner.register_queue_size(get_queue_size)

    def drop_items(self, count: int, error_type: str = "queue_full") -> None:
        self._on_dropped(count, error_type)
        self._inner.drop_items(count, error_type)

    def finish_items(self, count: int) -> None:
        self._inner.finish_items(count)


def queue_emit(processor: SpanProcessor) -> Callable[[ReadableSpan], None]:
    """What hands an ended span to `processor`: straight to a BatchSpanProcessor's queue when it has the queue of
    SDK 1.45 (service/otel.py is pinned to it by requirements.lock), else its `on_end`.

    The SDK's `on_end` checks again that the span is sampled, and its queue's `emit` asks the kernel for the
    process id, for a fork this service never makes: a span costs a deque append, a length test and, once a batch
    is queued, waking the exporter's thread. A full queue drops the oldest span and counts it, as the SDK's does;
    after shutdown the SDK's own `emit` refuses and counts.
    """
    batch = getattr(processor, "_batch_processor", None)
    if batch is None:
        return processor.on_end
    queue, awaken, size = (
        getattr(batch, name, None) for name in ("_queue", "_worker_awaken", "_max_export_batch_size")
    )
    if not (isinstance(queue, deque) and isinstance(awaken, threading.Event) and isinstance(size, int)):
        emit: Callable[[ReadableSpan], None] = batch.emit
        return emit
    full = queue.maxlen

    def emit_span(span: ReadableSpan) -> None:
        if batch._shutdown:
            batch.emit(span)
            return
        if len(queue) == full:
            batch._metrics.drop_items(1)  # the deque drops the oldest span as this one goes in
        queue.appendleft(span)
        if len(queue) >= size and not awaken.is_set():
            awaken.set()

    return emit_span


def count_queue_drops(processor: BatchSpanProcessor, on_dropped: OnDropped) -> bool:
    """Hook the processor's drop accounting (it drops the oldest span when its queue is full); False if it can't."""
    batch = getattr(processor, "_batch_processor", None)
    if batch is None or not hasattr(batch, "_metrics"):
        return False
    batch._metrics = _CountDrops(batch._metrics, on_dropped)
    return True


class FastOtlpExporter(SpanExporter):
    """Spans encoded by `encode`, sent by the SDK OTLP/HTTP exporter's own client; failed exports are counted."""

    def __init__(self, exporter: OTLPSpanExporter, on_dropped: OnDropped) -> None:
        self._exporter = exporter
        self._on_dropped = on_dropped
        self._encoder = Encoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._send(spans)
        except Exception:
            self._on_dropped(len(spans), "export_failed")
            raise
        if result is not SpanExportResult.SUCCESS:
            self._on_dropped(len(spans), "export_failed")
        return result

    def _send(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        exporter: Any = self._exporter
        client = getattr(exporter, "_client", None)
        if client is None or exporter._shutdown:
            return exporter.export(spans)  # type: ignore[no-any-return]
        data = self._encoder.encode(spans)
        limit = getattr(exporter, "_max_request_size", 0)
        if limit and len(data) > limit:
            log.warning(f"dropping {len(spans)} spans: the export would be {len(data)} bytes, over {limit}")
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS if client.export(data).success else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# --- OTLP protobuf encoding ------------------------------------------------------------------------------------
# opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto; field numbers in the comments.

_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_D = struct.Struct("<d")
_IDS = struct.Struct(">HQQHQ")  # trace_id (1) and span_id (2) with their tags and lengths: 0a 10 ..., 12 08 ...
_PARENT = struct.Struct(">HQ")  # parent_span_id (4): 22 08 ...
_TIMES = struct.Struct("<BQBQ")  # start (7) and end (8) time, fixed64
_LOW64 = (1 << 64) - 1
_KIND = {kind: b"\x30" + bytes((kind.value + 1,)) for kind in SpanKind}  # kind (6): SPAN_KIND_INTERNAL = 1 ...
_KIND_BY_VALUE = [_KIND[SpanKind(value)] for value in range(len(SpanKind))]
"""`_KIND` by the kind's value: indexing a list costs less than hashing an Enum (a Python-level __hash__)."""
_FLAGS_LOCAL = b"\x85\x01" + _I.pack(0x100)  # Span.flags (16, fixed32): HAS_IS_REMOTE, as the SDK encodes it
_FLAGS_REMOTE = b"\x85\x01" + _I.pack(0x300)  # HAS_IS_REMOTE | IS_REMOTE (the parent came from elsewhere)
_PER_KEY = 256
"""Encoded key-value pairs remembered per attribute key: constant values hit, unique ones (url.full) churn alone."""


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field; `tag` is (number << 3) | 2, below 128."""
    n = len(payload)
    if n < 0x80:  # most attributes: a one-byte length
        return bytes((tag, n)) + payload
    return bytes((tag,)) + _varint(n) + payload


def _any(value: Any) -> bytes:
    """An AnyValue (1 string, 2 bool, 3 int, 4 double, 5 array, 7 bytes)."""
    if isinstance(value, str):
        return _field(0x0A, value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _D.pack(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any(v)) for v in value))
    return _field(0x0A, str(value).encode("utf-8", "replace"))


class Encoder:
    """ReadableSpans to an OTLP `ExportTraceServiceRequest`, the same bytes as the SDK's encoder writes.

    What repeats is encoded once and remembered: span names, and key-value pairs with str and int values (per key,
    at most `_PER_KEY` values, so unique values such as url.full churn only their own key's entries). Other values
    take the general path (a mapping as a value, which this service never sets, is written as its str).
    tests/unit/test_tracing.py compares the output with the SDK's `encode_spans`.
    """

    def __init__(self) -> None:
        # tag -> key -> [encoded key, encoded key-values by value (None: not cached), times that cache filled up]
        self._keys: dict[int, dict[str, list[Any]]] = {}
        self._names: dict[str, bytes] = {}
        self._bases: dict[int, tuple[Mapping[str, Any], bytes]] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}

    def _attributes(self, tag: int, attributes: Mapping[str, Any] | None) -> bytes:
        """Repeated KeyValue{key (1), value (2)} fields numbered by `tag` ((number << 3) | 2)."""
        if not attributes:
            return b""
        keys = self._keys.get(tag)
        if keys is None:
            keys = self._keys[tag] = {}
        out = []
        for key, value in attributes.items():
            known = keys.get(key)
            if known is None:
                known = keys[key] = [_field(0x0A, key.encode("utf-8", "replace")), {}, 0]
            kind = type(value)
            # bool is an int subclass, not int: it takes the general path.
            if kind is str or kind is int:
                values = known[1]
                if values is not None:
                    encoded = values.get(value)
                    if encoded is None:
                        encoded = self._remember(tag, known, value)
                    out.append(encoded)
                    continue
                # Not cached (an offset, a URL): AnyValue{int_value (3)} or {string_value (1)}, without `_any`'s tests.
                if kind is int:
                    any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
                else:
                    any_value = _field(0x0A, value.encode("utf-8", "replace"))
            else:
                any_value = _any(value)
            out.append(_field(tag, known[0] + _field(0x12, any_value)))
        return b"".join(out)

    @staticmethod
    def _remember(tag: int, known: list[Any], value: str | int) -> bytes:
        """The key-value pair's encoding, kept in its key's cache; a key whose values hardly repeat (an offset, a
        URL) fills its cache three times, then stops caching."""
        encoded = _field(tag, known[0] + _field(0x12, _any(value)))
        values = known[1]
        if len(values) >= _PER_KEY:
            values.clear()
            known[2] += 1
            if known[2] > 2:
                known[1] = None
        else:
            values[value] = encoded
        return encoded

    def _resource(self, resource: Resource) -> bytes:
        known = self._resources.get(id(resource))
        if known is None or known[0] is not resource:
            # ResourceSpans.resource (1) = Resource{attributes (1)}
            body = _field(0x0A, self._attributes(0x0A, resource.attributes))
            known = self._resources[id(resource)] = (resource, body)
        return known[1]

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        known = self._scopes.get(id(scope))
        if known is None or known[0] is not scope:
            # ScopeSpans.scope (1) = InstrumentationScope{name (1), version (2), attributes (3)}
            inner = b""
            if scope is not None:
                inner = _field(0x0A, scope.name.encode())
                if scope.version:
                    inner += _field(0x12, scope.version.encode())
                inner += self._attributes(0x1A, scope.attributes)
            known = self._scopes[id(scope)] = (scope, _field(0x0A, inner))
        return known[1]

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        groups: dict[tuple[int, int], tuple[ReadableSpan, list[bytes]]] = {}
        span_field, lean_field = self._span_field, self._lean_span_field
        for span in spans:
            if type(span) is LeanSpan:
                where = (id(span._owner), 0)
            else:
                where = (id(span.resource), id(span.instrumentation_scope))
            group = groups.get(where)
            if group is None:
                group = groups[where] = (span, [])
            group[1].append(lean_field(span) if type(span) is LeanSpan else span_field(span))
        by_resource: dict[int, tuple[Resource, list[bytes]]] = {}
        for first, encoded in groups.values():
            scope = first.instrumentation_scope
            # ScopeSpans{scope (1), spans (2), schema_url (3)}
            scope_spans = self._scope(scope) + b"".join(encoded)
            if scope is not None and scope.schema_url:
                scope_spans += _field(0x1A, scope.schema_url.encode())
            resource = first.resource
            by_resource.setdefault(id(resource), (resource, []))[1].append(scope_spans)
        out = []
        for resource, scopes in by_resource.values():
            # ResourceSpans{resource (1), scope_spans (2), schema_url (3)}
            body = self._resource(resource) + b"".join(_field(0x12, s) for s in scopes)
            if resource.schema_url:
                body += _field(0x1A, resource.schema_url.encode())
            out.append(_field(0x0A, body))  # ExportTraceServiceRequest.resource_spans (1)
        return b"".join(out)

    def _span_field(self, span: ReadableSpan) -> bytes:
        """ScopeSpans.spans (2): one Span, tag and length included."""
        if type(span) is LeanSpan:
            return self._lean_span_field(span)
        ctx = span.get_span_context()
        assert ctx is not None
        parent = span.parent
        trace_id = ctx.trace_id
        # trace_id (1), span_id (2), trace_state (3), parent_span_id (4)
        parts = [_IDS.pack(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, ctx.span_id)]
        if ctx.trace_state:
            parts.append(_field(0x1A, ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode()))
        if parent is not None:
            parts.append(_PARENT.pack(0x2208, parent.span_id))
        # name (5), kind (6), start (7, fixed64), end (8, fixed64)
        name = self._names.get(span.name)
        if name is None:
            if len(self._names) >= _PER_KEY:
                self._names.clear()
            name = self._names[span.name] = _field(0x2A, span.name.encode("utf-8", "replace"))
        parts += (name, _KIND[span.kind], _TIMES.pack(0x39, span.start_time or 0, 0x41, span.end_time or 0))
        parts.append(self._attributes(0x4A, span.attributes))  # attributes (9)
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))  # dropped_attributes_count (10)
        for event in span.events:  # events (11): Event{time (1, fixed64), name (2), attributes (3)}
            body = b"\x09" + _Q.pack(event.timestamp) + _field(0x12, event.name.encode())
            body += self._attributes(0x1A, event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(0x5A, body))
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))  # dropped_events_count (12)
        for link in span.links:  # links (13): Link{trace_id (1), span_id (2), attributes (4), flags (6)}
            lc = link.context
            body = _IDS.pack(0x0A10, lc.trace_id >> 64, lc.trace_id & _LOW64, 0x1208, lc.span_id)
            body += self._attributes(0x22, link.attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + _I.pack(0x300 if lc.is_remote else 0x100)
            parts.append(_field(0x6A, body))
        if span.dropped_links:
            parts += (b"\x70", _varint(span.dropped_links))  # dropped_links_count (14)
        status = span.status  # status (15): Status{message (2), code (3)}, present even when unset (as the SDK's)
        if status.status_code is StatusCode.UNSET and not status.description:
            parts.append(b"\x7a\x00")
        else:
            body = _field(0x12, status.description.encode()) if status.description else b""
            if status.status_code.value:
                body += b"\x18" + _varint(status.status_code.value)
            parts.append(_field(0x7A, body))
        parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)  # flags (16)
        return _field(0x12, b"".join(parts))

    def _lean_span_field(self, span: LeanSpan) -> bytes:
        """`_span_field` for this module's spans: the same fields, read without ReadableSpan's properties."""
        trace_id, trace_state, parent_id = span._trace_id, span._state, span._parent_id
        # trace_id (1), span_id (2), trace_state (3), parent_span_id (4)
        parts = [_IDS.pack(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, span._span_id)]
        if trace_state:
            parts.append(_field(0x1A, ",".join(f"{k}={v}" for k, v in trace_state.items()).encode()))
        if parent_id:
            parts.append(_PARENT.pack(0x2208, parent_id))
        # name (5), kind (6), start (7, fixed64), end (8, fixed64)
        name = self._names.get(span._name)
        if name is None:
            if len(self._names) >= _PER_KEY:
                self._names.clear()
            name = self._names[span._name] = _field(0x2A, span._name.encode("utf-8", "replace"))
        # attributes (9): the shared part, encoded once, then the span's own
        base = self._bases.get(id(span._base))
        if base is None or base[0] is not span._base:
            if len(self._bases) >= _PER_KEY:
                self._bases.clear()
            base = self._bases[id(span._base)] = (span._base, self._attributes(0x4A, span._base))
        parts += (
            name,
            _KIND_BY_VALUE[span._kind._value_],
            _TIMES.pack(0x39, span._start_time, 0x41, span._end_time or 0),
            base[1],
            self._attributes(0x4A, span._values),
        )
        links = span._links
        if links:
            for link in links:  # links (13): Link{trace_id (1), span_id (2), attributes (4), flags (6)}
                lc = link.context
                body = _IDS.pack(0x0A10, lc.trace_id >> 64, lc.trace_id & _LOW64, 0x1208, lc.span_id)
                body += self._attributes(0x22, link.attributes)
                body += b"\x35" + _I.pack(0x300 if lc.is_remote else 0x100)
                parts.append(_field(0x6A, body))
            if isinstance(links, BoundedList) and links.dropped:
                parts += (b"\x70", _varint(links.dropped))  # dropped_links_count (14)
        status = span._status  # status (15): Status{message (2), code (3)}, present even when unset (as the SDK's)
        if status is _UNSET:
            parts.append(b"\x7a\x00")
        else:
            body = _field(0x12, status.description.encode()) if status.description else b""
            if status.status_code.value:
                body += b"\x18" + _varint(status.status_code.value)
            parts.append(_field(0x7A, body))
        parts.append(_FLAGS_REMOTE if parent_id and span._parent_remote else _FLAGS_LOCAL)  # flags (16)
        return _field(0x12, b"".join(parts))


def reference_encode(spans: Sequence[ReadableSpan]) -> bytes:
    """The SDK's own encoding of `spans` (what `Encoder` must agree with)."""
    return encode_spans(spans).SerializePartialToString()  # type: ignore[no-any-return]


MAX_QUEUE_SIZE: Final = 8192
"""Spans queued for export when OTEL_BSP_MAX_QUEUE_SIZE is not set (the SDK's default is 2,048)."""
MAX_EXPORT_BATCH_SIZE: Final = 2048
"""Spans per export when OTEL_BSP_MAX_EXPORT_BATCH_SIZE is not set (the SDK's default is 512). An export costs the
exporter's HTTP client about 1.3 ms of CPU whatever its size, on the service's core, so 512-span exports cost 2.6 µs
a span and 2,048-span ones 0.7 µs (measured on the development machine); the queue holds four such batches."""


def queue_limits(environ: Mapping[str, str]) -> tuple[int, int]:
    """(max_queue_size, max_export_batch_size) for the BatchSpanProcessor: OTEL_BSP_MAX_QUEUE_SIZE and
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE when set, else this service's defaults; a queue left to its default grows to
    hold a larger batch set alone, and a batch left to its default shrinks to fit a smaller queue."""
    queue = _positive(environ, "OTEL_BSP_MAX_QUEUE_SIZE")
    batch = _positive(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    if queue is None:
        queue = max(MAX_QUEUE_SIZE, batch or 0)
    if batch is None:
        batch = min(MAX_EXPORT_BATCH_SIZE, queue)
    return queue, batch  # a batch set above a queue set is refused by the SDK, as without these defaults


def _positive(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning(f"{name}={text} is not a positive integer: using this service's default")
        return None
    return value


def build(
    endpoint: str,
    *,
    group_id: str,
    max_batch_rows: int,
    on_dropped: OnDropped,
    environ: Mapping[str, str],
    export_timeout_s: float | None,
    service_name: str,
    version: str | None,
) -> OtelTracing:
    """The SDK pipeline from the environment (see `service.tracing.build_tracing`)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION
    from opentelemetry.sdk.trace import SpanLimits
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    if version is not None and SERVICE_VERSION not in resource.attributes:
        resource = resource.merge(Resource({SERVICE_VERSION: version}))
    max_links = SpanLimits().max_links if environ.get("OTEL_SPAN_LINK_COUNT_LIMIT") else None
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=export_timeout_s)
    queue_size, batch_size = queue_limits(os.environ)  # the SDK reads OTEL_BSP_* from the process environment
    processor = BatchSpanProcessor(
        FastOtlpExporter(exporter, on_dropped), max_queue_size=queue_size, max_export_batch_size=batch_size
    )
    if not count_queue_drops(processor, on_dropped):
        log.warning("this OpenTelemetry SDK hides its span queue: spans dropped for a full queue are not counted")
    return OtelTracing(
        processor,
        _get_from_env_or_default(),
        resource,
        group_id=group_id,
        max_links=max_links if max_links is not None else max(max_batch_rows, 128),
        version=version,
    )
