"""OpenTelemetry tracing: one span per record from fetch to its durable outcome, a child span per HTTP call.

`Tracing` is the seam the pipeline, delivery and the batcher talk to. `build_tracing` (called once, in app.py) makes
it from the standard OTEL_* environment, as one of two things:

- `Tracing` itself when no OTLP endpoint is set: every method does nothing and no span object is ever made. The
  pipeline gets `None` for a record's span and passes `None` on, so the hot path pays one method call per record
  and a few `is not None` tests; the SDK is not even imported.
- `service.ops.tracing.tracer.OtelTracing` when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is
  set (and OTEL_SDK_DISABLED is not true): the SDK's sampler, resource, BatchSpanProcessor and OTLP/HTTP exporter.

The spans are this service's own, not the contrib instrumentations': aiokafka's ends its receive spans before
`getmany` returns and leaves nothing current for the per-record tasks, and aiohttp's takes its parent from the
calling task's context, which for a batched publish is whichever row happened to close the batch (nor would it
cover the pyreqwest client). So a record's span is passed along explicitly, as a parameter, never through
context variables:

- record: `process <topic>` (CONSUMER), child of the producer's `traceparent`/`tracestate` from the record's
  headers (a new trace without one), from the poll that fetched it to delivered or dead-lettered;
- HTTP call: `<METHOD> <endpoint>` (CLIENT), one per attempt, child of the record's span (or the batch's), its
  `traceparent` injected into the request;
- batched Publish-records call: `publish batch` (INTERNAL), a root span linked to the spans of its rows and parent
  of its HTTP attempts (each half of a bisected batch is a call of its own).

Ending a span only appends it to the processor's bounded queue: a collector that is down or slow never slows
delivery. Spans the queue had no room for, and spans whose export failed, are counted
(`bridge_trace_spans_dropped_total{reason}`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.trace import Span

import service
from service.core.errors import RecordError
from service.core.records import SourceRecord
from service.core.requests import ApiRequest

log = logging.getLogger("service.tracing")  # its name before the move: log queries filter on it

C = TypeVar("C")
OnDropped = Callable[[int, str], None]
"""(spans, reason) for spans that will never reach the collector; reason is `queue_full` or `export_failed`."""

DEFAULT_SERVICE_NAME: Final = "inference-bridge"
DEFAULT_EXPORT_TIMEOUT_S: Final = 5.0
"""The exporter's timeout per export when OTEL_EXPORTER_OTLP(_TRACES)_TIMEOUT is not set (the SDK's is 10 s)."""
SHUTDOWN_TIMEOUT_S: Final = 3.0
"""How long a clean stop waits for the last spans to be exported; a collector that is down costs no more."""


def log_fields(span: Span | None) -> dict[str, str]:
    """The trace and span id of `span` for a log line's `extra=` (nothing when tracing is off)."""
    if span is None:
        return {}
    ctx = span.get_span_context()
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


class Tracing:
    """Tracing off: nothing is recorded, no span is made, and each method costs a call and nothing else.

    `OtelTracing` overrides every method. A span returned by `start_record` or `start_batch` is what callers pass on
    (as a parameter, never through context variables): to `Delivery.deliver(trace=...)`, to `Batcher.add(trace=...)`.
    """

    enabled: bool = False

    def watch(self, consumer: C) -> C:
        """The consumer for the Kafka loop; with tracing on it notes when each poll's records were fetched."""
        return consumer

    def start_record(self, record: SourceRecord) -> Span | None:
        return None

    def delivered(self, span: Span) -> None:
        pass

    def dead_lettered(self, span: Span, error: RecordError) -> None:
        pass

    def end_record(self, span: Span, outcome: asyncio.Future[None]) -> None:
        """Done callback of the record's outcome future: ends its span (delivered, dead-lettered or cancelled)."""

    def finish(self, span: Span, error: BaseException | None) -> None:
        """Ends the record's span: `error` None once it is delivered or dead-lettered, else why it stopped short."""

    def start_batch(self, pipeline_id: str, rows: Sequence[object]) -> Span | None:
        return None

    def end_batch(self, span: Span, error: BaseException | None) -> None:
        pass

    def start_call(self, parent: Span, request: ApiRequest, attempt: int) -> Span:
        return parent

    def inject(self, call: Span, headers: Mapping[str, str]) -> Mapping[str, str]:
        return headers

    def end_call(self, call: Span, status: int | None, error: str | None) -> None:
        pass

    async def aclose(self) -> None:
        pass


def tracing_endpoint(environ: Mapping[str, str]) -> str | None:
    """Where spans go, or None when tracing is off (no endpoint set, or OTEL_SDK_DISABLED=true)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return f"{base.rstrip('/')}/v1/traces" if base else None


def build_tracing(
    *,
    group_id: str,
    max_batch_rows: int,
    on_dropped: OnDropped = lambda count, reason: None,
    environ: Mapping[str, str] | None = None,
) -> Tracing:
    """Tracing from the standard OTEL_* variables; off (a `Tracing` that does nothing) unless an endpoint is set.

    The SDK reads the variables itself (it reads the process environment): OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT,
    _HEADERS, _TIMEOUT, _COMPRESSION and _CERTIFICATE; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
    OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on); OTEL_BSP_* for the queue
    and its exports; OTEL_SPAN_*_LIMIT. This function decides only whether tracing is on, and sets defaults the
    SDK's do not suit, each overridden by its standard variable: service.name `inference-bridge`, a 5 s export
    timeout, a queue of 16,384 spans exported 4,096 at a time (OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE;
    the SDK's 2,048 and 512 cost the event loop's core more per span, service/ops/tracing/sdk.py), and room for a
    link per row of the largest batch. The export protocol is always http/protobuf.
    """
    env = os.environ if environ is None else environ
    endpoint = tracing_endpoint(env)
    if endpoint is None:
        return Tracing()
    from .sdk import build  # the SDK and the exporter are imported only when tracing is on

    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            log.warning(f"{name}={protocol} is not supported: spans are exported with http/protobuf")
            break
    timeout = (
        None
        if env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
        else DEFAULT_EXPORT_TIMEOUT_S
    )
    tracing = build(
        endpoint,
        group_id=group_id,
        max_batch_rows=max_batch_rows,
        on_dropped=on_dropped,
        environ=env,
        export_timeout_s=timeout,
        service_name=DEFAULT_SERVICE_NAME,
        # The one source of the version (service/__init__.py, below every layer), read when tracing is built.
        version=service.__version__,
    )
    log.info("tracing on", extra={"endpoint": loggable_endpoint(endpoint)})
    return tracing


def loggable_endpoint(endpoint: str) -> str:
    """`endpoint` as it may be logged: scheme, host, port and path, without userinfo, query or fragment.

    The endpoint comes from OTEL_* variables, which this service does not validate (unlike its own URLs,
    service/config/section.py `http_url`), so it may carry a collector's `user:password@` or a token in its query;
    the redactor knows only the BRIDGE_* secrets (service/app.py), so the log line must not hold them at all.
    """
    parts = urlsplit(endpoint)
    # rpartition, not `hostname`/`port`: those lower-case the host, drop an IPv6 address's brackets and raise on a
    # bad port, and a log line meant to show what was configured should not fail or differ from it.
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
