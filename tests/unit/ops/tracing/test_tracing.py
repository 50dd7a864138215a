"""Tracing: off costs nothing and makes no span; on, the producer's context is continued, spans carry what they
should, the wire encoding is the SDK's, the `traceparent` sent is the call's, and lost spans are counted."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import httpx
import pytest
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import service
from service.config.delivery import DeliverySettings
from service.core.errors import DecodeError
from service.core.events import EventKind, NewInference
from service.core.records import SourceRecord
from service.core.requests import ApiRequest, Destination, Endpoint
from service.http.batching import Batcher
from service.http.breaker import BreakerSettings
from service.http.delivery import Delivery, build_guard
from service.kafka.deadletter import DeadLetterWriter
from service.ops.logging import JsonFormatter
from service.ops.metrics import Metrics
from service.ops.redaction import Redactor
from service.ops.tracing import Tracing, build_tracing, log_fields, tracing_endpoint
from service.ops.tracing.encoder import Encoder, reference_encode
from service.ops.tracing.propagation import producer_context
from service.ops.tracing.sdk import queue_limits
from service.ops.tracing.spans import LeanSpan
from service.ops.tracing.tracer import OtelTracing
from service.pipeline import Pipeline, publish_batch, publish_linked_batch
from service.streams import Router
from tests.unit.test_pipeline import (
    HL,
    HL_KEY,
    LENDER,
    OL,
    OL_KEY,
    PIPE,
    PUBLISH,
    STREAMS,
    TOPIC_OF,
    UPDATE_LOG,
    UPDATE_ROW,
    Api,
    FakeDecoder,
    FakeProducer,
    Key,
    Outcome,
    _bearer,
    _x_api_key,
    mocked_httpx_client,
)

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PRODUCER_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-01"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def source(
    kind: EventKind = EventKind.ROW_UPDATE,
    *,
    offset: int = 10,
    headers: Sequence[tuple[str, bytes]] = (("traceparent", TRACEPARENT.encode()),),
) -> SourceRecord:
    return SourceRecord(TOPIC_OF[kind], 1, offset, b"k", b"\x00avro", tuple(headers), 1_800_000_000_000)


def tracing_to_memory(sampler: Any = None) -> tuple[OtelTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing = OtelTracing(
        SimpleSpanProcessor(exporter),
        sampler or ParentBased(ALWAYS_ON),
        Resource({"service.name": "inference-bridge"}),
        group_id="bridge",
        max_links=500,
        version="0.1.0",
    )
    return tracing, exporter


class Wired:
    """The pipeline wired as app.py wires it, with the given tracing, over a mocked API and a fake DLQ."""

    def __init__(self, tracing: Tracing, *outcomes: Outcome, api: Api | None = None) -> None:
        self.api = api or Api()
        self.producer = FakeProducer()
        self.metrics = Metrics()
        settings = DeliverySettings(initial_backoff_s=0.001, max_backoff_s=0.01, conflict_retries=0)
        rng = random.Random(9)
        fast = BreakerSettings(initial_pause_s=0.001, max_pause_s=0.01)
        guards = {
            Destination.OPENLAYER: build_guard(
                Destination.OPENLAYER, settings, Key(OL_KEY), _bearer, rng=rng, breaker=fast
            ),
            Destination.HUMANLOOP: build_guard(
                Destination.HUMANLOOP, settings, Key(HL_KEY), _x_api_key, rng=rng, breaker=fast
            ),
        }
        delivery = Delivery(
            mocked_httpx_client(self.api),
            settings,
            guards,
            rng=rng,
            instrumentation=self.metrics,
            wall_clock=lambda: 1_800_000_000.0,
            tracing=tracing,
        )
        router = Router(
            openlayer_base_url=OL,
            humanloop_base_url=HL,
            pipeline_configs={PIPE: {"outputColumnName": "output"}},
            default_config=None,
            inference_id_column="inference_id",
        )
        dead_letters = DeadLetterWriter(
            self.producer,
            topic_for=lambda topic: f"{topic}.dlq",
            group_id="bridge",
            redact=Redactor([OL_KEY, HL_KEY]),
            attempts=3,
        )
        self.batcher = Batcher(
            partial(publish_batch, router, delivery),
            max_rows=50,
            max_bytes=1_000_000,
            linger_s=0.005,
            linked_flush=partial(publish_linked_batch, router, delivery, tracing) if tracing.enabled else None,
        )
        self.pipeline = Pipeline(
            FakeDecoder(*outcomes),
            router,
            delivery,
            dead_letters,
            self.batcher,
            STREAMS,
            rng=rng,
            initial_backoff_s=0.001,
            max_backoff_s=0.001,
            instrumentation=self.metrics,
            tracing=tracing,
        )

    async def process(self, *records: SourceRecord) -> None:
        started = [(await self.pipeline.prepare(r)).start(LENDER) for r in records]
        await asyncio.gather(*started)


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def offset_of(span: ReadableSpan) -> int:
    offset = dict(span.attributes or {})["messaging.kafka.offset"]
    assert isinstance(offset, int)
    return offset


def ctx(span: ReadableSpan | Span) -> SpanContext:
    found = span.get_span_context()
    assert found is not None
    return found


# --- off --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="no endpoint"),
        pytest.param({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, id="no endpoint, other OTEL_*"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, id="SDK disabled"
        ),
    ],
)
def test_tracing_is_off_unless_an_endpoint_is_set(environ: dict[str, str]) -> None:
    tracing = build_tracing(group_id="g", max_batch_rows=500, environ=environ)
    assert type(tracing) is Tracing
    assert not tracing.enabled
    consumer = object()
    assert tracing.watch(consumer) is consumer, "the Kafka loop gets the consumer itself"
    assert tracing.start_record(source()) is None
    assert tracing.start_batch(PIPE, [None]) is None


def test_the_endpoint_comes_from_the_standard_variables() -> None:
    assert tracing_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    assert tracing_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://c:4318/v1/traces"
    # The signal-specific variable is used verbatim, and wins.
    both = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/x"}
    assert tracing_endpoint(both) == "http://t:9/x"
    assert tracing_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}) is None


def test_with_tracing_off_the_sdk_is_not_even_imported() -> None:
    code = (
        "import sys\n"
        "from service.ops.tracing import build_tracing\n"
        "import service.app, service.pipeline, service.http.delivery\n"
        "t = build_tracing(group_id='g', max_batch_rows=500, environ={})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'service.ops.tracing.'))\n"
        "    and m != 'service.ops.tracing.api'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class Spy(Tracing):
    """Tracing off, noting which of its methods the service calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if callable(value) and not name.startswith("__"):
            super().__getattribute__("calls").append(name)
        return value


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        pytest.param(PUBLISH, EventKind.INFERENCE, id="publish"),
        pytest.param(UPDATE_ROW, EventKind.ROW_UPDATE, id="update-row"),
        pytest.param(UPDATE_LOG, EventKind.LOG_UPDATE, id="update-log"),
        pytest.param(DecodeError("bad", reason="garbage-bytes"), EventKind.LOG_UPDATE, id="dead-letter"),
    ],
)
async def test_with_tracing_off_a_record_costs_one_call_and_sends_no_trace_header(
    event: Outcome, kind: EventKind
) -> None:
    spy = Spy()
    wired = Wired(spy, event)
    await wired.process(source(kind))
    assert spy.calls == ["start_record"], "nothing else is called for a record: no span, no header, no callback"
    assert all("traceparent" not in r.headers for r in wired.api.requests)
    await wired.batcher.aclose()


def test_with_tracing_off_no_span_or_context_is_made() -> None:
    """Off, a record and a batch get no span (the pipeline then skips every other tracing call, as the test above
    shows), and no trace context is set for the code that runs after. What it costs is `make bench`'s to measure."""
    tracing = Tracing()

    assert tracing.start_record(source()) is None
    assert tracing.start_batch("pipe", [b"row"]) is None
    assert not get_current_span().get_span_context().is_valid


# --- the producer's context -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("traceparent", TRACEPARENT)],
        [("traceparent", TRACEPARENT), ("tracestate", "vendor=abc,other=x-1")],
        [("traceparent", TRACEPARENT), ("tracestate", " vendor=abc ,, other=x-1\t")],
        [("traceparent", TRACEPARENT), ("tracestate", "vendor=abc,Not Valid")],
        [("traceparent", TRACEPARENT), ("tracestate", "vendor=abc,vendor=def")],
        [("traceparent", TRACEPARENT), ("tracestate", ",".join(f"k{n}=v" for n in range(33)))],
        [("traceparent", TRACEPARENT), ("tracestate", ",".join(f"k{n}=v" for n in range(32)))],
        [("traceparent", f"00-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-00")],  # not sampled
        [("traceparent", f"01-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-01-future")],  # a later version may add fields
        [("traceparent", f"00-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-01-extra")],  # version 00 may not
        [("traceparent", f"ff-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-01")],
        [("traceparent", f"00-{0:032x}-{PRODUCER_SPAN:016x}-01")],
        [("traceparent", f"00-{TRACE_ID:032x}-{0:016x}-01")],
        [("traceparent", f"00-{TRACE_ID:032X}-{PRODUCER_SPAN:016x}-01")],  # upper case is invalid
        [("traceparent", f"  00-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-01  ")],
        [("traceparent", "garbage")],
        [("traceparent", "")],
        [("traceparent", TRACEPARENT + " " * 600)],
        [("tracestate", "vendor=abc")],
        [("origin", "x")],
        [],
    ],
)
def test_the_producer_context_is_read_as_the_w3c_propagator_reads_it(headers: list[tuple[str, str]]) -> None:
    carrier = {name: value for name, value in headers}
    expected = get_current_span(TraceContextTextMapPropagator().extract(carrier, Context())).get_span_context()
    found = producer_context([(name, value.encode()) for name, value in headers])
    if not expected.is_valid:
        assert found is None
    else:
        assert found == expected
        assert found is not None
        assert found.trace_state == expected.trace_state


@pytest.mark.parametrize("tracestate", ["vendor=abc,Not Valid", "a=1,a=2", ",".join(f"k{n}=v" for n in range(33))])
def test_a_malformed_tracestate_is_dropped_without_a_log_line(
    tracestate: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer that writes it on every record must not make a warning per record."""
    caplog.set_level(logging.DEBUG)

    found = producer_context([("traceparent", TRACEPARENT.encode()), ("tracestate", tracestate.encode())])

    assert found is not None
    assert len(found.trace_state) == 0
    assert caplog.records == []


async def test_a_record_span_continues_the_producer_trace_and_says_where_the_record_came_from() -> None:
    tracing, memory = tracing_to_memory()
    wired = Wired(tracing, UPDATE_ROW)

    await wired.process(source(EventKind.ROW_UPDATE, offset=42))

    spans = by_name(memory.get_finished_spans())
    [record] = spans["process inference-row-updates"]
    assert record.kind is SpanKind.CONSUMER
    assert ctx(record).trace_id == TRACE_ID
    assert record.parent is not None
    assert record.parent.span_id == PRODUCER_SPAN
    assert record.parent.is_remote
    assert dict(record.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "inference-row-updates",
        "messaging.destination.partition.id": "1",
        "messaging.consumer.group.name": "bridge",
        "messaging.kafka.offset": 42,
        "bridge.outcome": "delivered",
    }
    assert record.status.status_code is StatusCode.UNSET
    [call] = spans["PUT update_row"]
    assert call.kind is SpanKind.CLIENT
    assert call.parent == ctx(record)
    assert dict(call.attributes or {}) == {
        "http.request.method": "PUT",
        "server.address": "openlayer.test",
        "bridge.endpoint": "update_row",
        "url.full": f"{OL}/inference-pipelines/{PIPE}/rows?inferenceId=inf-1",
        "http.response.status_code": 200,
    }
    assert record.start_time is not None
    assert call.start_time is not None
    assert record.end_time is not None
    assert record.start_time <= call.start_time <= (call.end_time or 0) <= record.end_time
    [request] = wired.api.requests
    assert request.headers["traceparent"] == f"00-{TRACE_ID:032x}-{ctx(call).span_id:016x}-01"
    await wired.batcher.aclose()


async def test_without_a_traceparent_a_record_starts_a_trace_of_its_own() -> None:
    tracing, memory = tracing_to_memory()
    wired = Wired(tracing, UPDATE_LOG)
    await wired.process(source(EventKind.LOG_UPDATE, headers=[("origin", b"x")]))
    [record] = by_name(memory.get_finished_spans())["process log-updates"]
    assert record.parent is None
    assert ctx(record).trace_id != TRACE_ID
    assert ctx(record).trace_flags.sampled
    [request] = wired.api.requests
    assert request.headers["traceparent"].startswith(f"00-{ctx(record).trace_id:032x}-")
    await wired.batcher.aclose()


async def test_tracestate_travels_from_the_producer_to_the_api() -> None:
    tracing, memory = tracing_to_memory()
    wired = Wired(tracing, UPDATE_LOG)
    headers = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"vendor=abc,other=x-1")]
    await wired.process(source(EventKind.LOG_UPDATE, headers=headers))
    [request] = wired.api.requests
    assert request.headers["tracestate"] == "vendor=abc,other=x-1"
    assert all(
        ctx(s).trace_state == TraceState([("vendor", "abc"), ("other", "x-1")]) for s in memory.get_finished_spans()
    )
    await wired.batcher.aclose()


async def test_a_producer_that_did_not_sample_is_followed_nothing_is_recorded_and_the_api_is_told() -> None:
    tracing, memory = tracing_to_memory()
    wired = Wired(tracing, UPDATE_LOG)
    unsampled = f"00-{TRACE_ID:032x}-{PRODUCER_SPAN:016x}-00"
    await wired.process(source(EventKind.LOG_UPDATE, headers=[("traceparent", unsampled.encode())]))
    assert memory.get_finished_spans() == ()
    [request] = wired.api.requests
    assert request.headers["traceparent"].startswith(f"00-{TRACE_ID:032x}-")
    assert request.headers["traceparent"].endswith("-00")
    await wired.batcher.aclose()


async def test_the_configured_sampler_decides_for_records_without_a_sampled_parent() -> None:
    tracing, memory = tracing_to_memory(ParentBased(TraceIdRatioBased(0.0)))
    wired = Wired(tracing, UPDATE_LOG)
    await wired.process(source(EventKind.LOG_UPDATE, headers=[]))
    assert memory.get_finished_spans() == ()
    await wired.process(source(EventKind.LOG_UPDATE, offset=11))  # a sampled producer still wins
    assert {s.name for s in memory.get_finished_spans()} == {"process log-updates", "PATCH update_log"}
    await wired.batcher.aclose()


def test_the_sampler_comes_from_otel_traces_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracing = build_tracing(
        group_id="g", max_batch_rows=500, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    )
    assert isinstance(tracing, OtelTracing)
    span = tracing.start_record(source(headers=[]))
    assert not ctx(span).trace_flags.sampled
    assert not span.is_recording()
    asyncio.run(tracing.aclose())


def test_service_name_and_resource_attributes_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,k8s.pod.name=bridge-0")
    tracing = build_tracing(group_id="g", max_batch_rows=500, environ=endpoint)
    span = tracing.start_record(source())
    assert isinstance(span, LeanSpan)
    attributes = span.resource.attributes
    assert attributes["service.name"] == "inference-bridge", "the default name, not unknown_service"
    assert attributes["deployment.environment"] == "prod"
    assert attributes["k8s.pod.name"] == "bridge-0"
    asyncio.run(tracing.aclose())
    monkeypatch.setenv("OTEL_SERVICE_NAME", "bridge-eu")
    tracing = build_tracing(group_id="g", max_batch_rows=500, environ=endpoint)
    span = tracing.start_record(source())
    assert isinstance(span, LeanSpan)
    assert span.resource.attributes["service.name"] == "bridge-eu"
    asyncio.run(tracing.aclose())


def test_the_version_on_spans_is_service_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # A version no installed distribution has: only `service.__version__` can put it on the spans.
    monkeypatch.setattr(service, "__version__", "9.8.7+probe")
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    tracing = build_tracing(group_id="g", max_batch_rows=500, environ=endpoint)
    span = tracing.start_record(source())
    assert isinstance(span, LeanSpan)
    assert span.resource.attributes["service.version"] == "9.8.7+probe"
    assert span.instrumentation_scope.version == "9.8.7+probe"
    asyncio.run(tracing.aclose())
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.version=2.0.0-eu")
    tracing = build_tracing(group_id="g", max_batch_rows=500, environ=endpoint)
    span = tracing.start_record(source())
    assert isinstance(span, LeanSpan)
    assert span.resource.attributes["service.version"] == "2.0.0-eu", "the environment's, as for service.name"
    asyncio.run(tracing.aclose())


# --- outcomes ---------------------------------------------------------------------------------------------------------


async def test_a_dead_lettered_record_says_why_keeps_its_trace_headers_and_logs_its_trace_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracing, memory = tracing_to_memory()
    wired = Wired(tracing, UPDATE_LOG, api=Api(httpx.Response(422, json={"detail": "no"})))
    headers = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"vendor=abc")]
    with caplog.at_level(logging.WARNING, logger="service.pipeline"):
        await wired.process(source(EventKind.LOG_UPDATE, headers=headers))

    spans = by_name(memory.get_finished_spans())
    [record] = spans["process log-updates"]
    attributes = dict(record.attributes or {})
    assert attributes["bridge.outcome"] == "dead-lettered"
    assert attributes["bridge.reason"] == attributes["error.type"] == "http-422"
    assert attributes["bridge.stage"] == "TASK_PUT"
    assert record.status.status_code is StatusCode.ERROR
    [call] = spans["PATCH update_log"]
    assert dict(call.attributes or {})["http.response.status_code"] == 422
    assert dict(call.attributes or {})["error.type"] == "422"
    assert call.status.status_code is StatusCode.ERROR
    [letter] = wired.producer.acknowledged
    assert ("traceparent", TRACEPARENT.encode()) in letter.headers
    assert ("tracestate", b"vendor=abc") in letter.headers
    [line] = [r for r in caplog.records if r.getMessage() == "dead-lettered"]
    assert vars(line)["trace_id"] == f"{TRACE_ID:032x}"
    assert vars(line)["span_id"] == f"{ctx(record).span_id:016x}"
    await wired.batcher.aclose()


async def test_an_undecodable_record_gets_a_span_with_its_reason() -> None:
    tracing, memory = tracing_to_memory()
    wired = Wired(tracing, DecodeError("bad bytes", reason="garbage-bytes"))
    await wired.process(source(EventKind.LOG_UPDATE))
    [record] = memory.get_finished_spans()
    assert dict(record.attributes or {})["bridge.reason"] == "garbage-bytes"
    assert dict(record.attributes or {})["bridge.stage"] == "VALUE_CONVERTER"
    assert ctx(record).trace_id == TRACE_ID
    await wired.batcher.aclose()


async def test_retries_are_calls_of_their_own_under_the_record() -> None:
    tracing, memory = tracing_to_memory()
    api = Api(httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(200, json={}))
    wired = Wired(tracing, UPDATE_LOG, api=api)
    await wired.process(source(EventKind.LOG_UPDATE))
    spans = by_name(memory.get_finished_spans())
    [record] = spans["process log-updates"]
    calls = sorted(spans["PATCH update_log"], key=lambda s: s.start_time or 0)
    assert [dict(c.attributes or {}).get("http.request.resend_count") for c in calls] == [None, 1, 2]
    assert [dict(c.attributes or {}).get("error.type") for c in calls] == ["503", "connect", None]
    assert all(c.parent == ctx(record) for c in calls)
    sent = [r.headers["traceparent"] for r in api.requests]
    assert sent == [f"00-{TRACE_ID:032x}-{ctx(c).span_id:016x}-01" for c in calls], "each attempt names itself"
    await wired.batcher.aclose()


async def test_a_cancelled_record_ends_its_span_as_cancelled() -> None:
    tracing, memory = tracing_to_memory()
    called = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        called.set()
        await asyncio.Event().wait()
        raise AssertionError("never answers")

    wired = Wired(tracing, UPDATE_LOG, api=Api(handler=hang))  # type: ignore[arg-type]  # httpx awaits it
    work = await wired.pipeline.prepare(source(EventKind.LOG_UPDATE))
    outcome = work.start(LENDER)
    await called.wait()
    outcome.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome
    [record] = by_name(memory.get_finished_spans())["process log-updates"]
    assert dict(record.attributes or {})["bridge.outcome"] == "cancelled"
    await wired.batcher.aclose()


# --- batches ----------------------------------------------------------------------------------------------------------


async def test_a_batched_publish_is_one_span_linked_to_its_rows() -> None:
    tracing, memory = tracing_to_memory()
    wired = Wired(tracing, PUBLISH)
    parents = [random.Random(i).getrandbits(64) for i in range(3)]
    records = [
        source(EventKind.INFERENCE, offset=i, headers=[("traceparent", f"00-{TRACE_ID:032x}-{p:016x}-01".encode())])
        for i, p in enumerate(parents)
    ]
    await wired.process(*records)

    spans = by_name(memory.get_finished_spans())
    rows = sorted(spans["process inferences"], key=offset_of)
    assert [r.parent.span_id if r.parent else None for r in rows] == parents
    assert all(dict(r.attributes or {})["bridge.outcome"] == "delivered" for r in rows)
    [batch] = spans["publish batch"]
    assert batch.parent is None
    assert batch.kind is SpanKind.INTERNAL
    assert [link.context for link in batch.links] == [ctx(r) for r in rows]
    assert dict(batch.attributes or {}) == {
        "bridge.endpoint": "publish",
        "messaging.batch.message_count": 3,
        "bridge.pipeline_id": PIPE,
        "bridge.outcome": "delivered",
    }
    [call] = spans["POST publish"]
    assert call.parent == ctx(batch)
    [request] = wired.api.requests
    assert request.headers["traceparent"] == f"00-{ctx(batch).trace_id:032x}-{ctx(call).span_id:016x}-03"
    assert ctx(batch).trace_flags.random_trace_id, "a trace started here has a random id, and says so"
    await wired.batcher.aclose()


async def test_a_bisected_batch_is_a_call_per_half_each_linked_to_its_own_rows() -> None:
    tracing, memory = tracing_to_memory()

    def refuse_the_marked(request: httpx.Request) -> httpx.Response:
        rows = json.loads(request.content)["rows"]
        return httpx.Response(422 if any(r.get("output") == "bad" for r in rows) else 200, json={})

    good = NewInference(pipeline_id=PIPE, row={"output": "good"}, inference_id="i0")
    bad = NewInference(pipeline_id=PIPE, row={"output": "bad"}, inference_id="i1")
    wired = Wired(tracing, good, bad, api=Api(handler=refuse_the_marked))
    await wired.process(source(EventKind.INFERENCE, offset=0), source(EventKind.INFERENCE, offset=1))
    spans = by_name(memory.get_finished_spans())
    rows = {offset_of(r): r for r in spans["process inferences"]}
    batches = spans["publish batch"]
    assert sorted(len(b.links) for b in batches) == [1, 1, 2]
    outcomes = sorted((len(b.links), dict(b.attributes or {})["bridge.outcome"]) for b in batches)
    assert outcomes == [(1, "delivered"), (1, "rejected"), (2, "rejected")]
    assert dict(rows[0].attributes or {})["bridge.outcome"] == "delivered"
    assert dict(rows[1].attributes or {})["bridge.outcome"] == "dead-lettered"
    await wired.batcher.aclose()


async def test_the_batcher_hands_each_rows_trace_to_the_linked_flush_in_row_order() -> None:
    plain: list[list[bytes]] = []
    linked: list[tuple[list[bytes], list[object]]] = []

    async def flush(key: object, rows: Sequence[bytes]) -> None:
        plain.append(list(rows))

    async def linked_flush(key: object, rows: Sequence[bytes], traces: Sequence[object]) -> None:
        linked.append((list(rows), list(traces)))

    batcher = Batcher(flush, max_rows=3, max_bytes=10_000, linger_s=1, linked_flush=linked_flush)
    await asyncio.gather(*(batcher.add("k", bytes([n]), f"span-{n}") for n in range(3)))
    await asyncio.gather(*(batcher.add("k", bytes([n])) for n in range(3)))
    assert linked == [([b"\x00", b"\x01", b"\x02"], ["span-0", "span-1", "span-2"])]
    assert plain == [[b"\x00", b"\x01", b"\x02"]], "rows without a trace (tracing off) take the plain flush"
    await batcher.aclose()


def test_links_go_only_to_sampled_rows_and_up_to_the_limit() -> None:
    tracing, _ = tracing_to_memory()
    sampled = tracing.start_record(source())
    unsampled = tracing.start_record(source(headers=[("traceparent", TRACEPARENT[:-2].encode() + b"00")]))
    assert not isinstance(unsampled, LeanSpan), "an unsampled record is only its context"
    batch = tracing.start_batch(PIPE, [sampled, unsampled, sampled])
    assert isinstance(batch, LeanSpan)
    assert [link.context for link in batch.links] == [ctx(sampled), ctx(sampled)]
    assert dict(batch.attributes or {})["messaging.batch.message_count"] == 3
    few = OtelTracing(
        SimpleSpanProcessor(InMemorySpanExporter()), ALWAYS_ON, Resource({}), group_id="g", max_links=1
    ).start_batch(PIPE, [sampled, sampled])
    assert isinstance(few, LeanSpan)
    assert len(few.links) == 1
    assert few.dropped_links == 1


# --- logs -------------------------------------------------------------------------------------------------------------


def test_log_fields_are_the_hex_ids_and_nothing_when_off() -> None:
    tracing, _ = tracing_to_memory()
    span = tracing.start_record(source())
    assert log_fields(None) == {}
    assert log_fields(span) == {"trace_id": f"{TRACE_ID:032x}", "span_id": f"{ctx(span).span_id:016x}"}
    line = logging.LogRecord("service.pipeline", logging.WARNING, __file__, 1, "dead-lettered", None, None)
    for name, value in {"topic": "t", "partition": 1, "offset": 2, **log_fields(span)}.items():
        setattr(line, name, value)
    formatted = json.loads(JsonFormatter(lambda text: text).format(line))
    assert formatted["trace_id"] == f"{TRACE_ID:032x}"
    assert formatted["span_id"] == f"{ctx(span).span_id:016x}"


# --- the wire ---------------------------------------------------------------------------------------------------------


def _lean_spans() -> list[ReadableSpan]:
    tracing, memory = tracing_to_memory()
    records = [
        tracing.start_record(source(offset=1)),
        tracing.start_record(source(offset=2, headers=[])),
        tracing.start_record(
            source(offset=3, headers=[("traceparent", TRACEPARENT.encode()), ("tracestate", b"v=1,w=two")])
        ),
    ]
    request = ApiRequest(Endpoint.UPDATE_LOG, "PATCH", f"{HL}/logs", (("reference_id", "a b/é"),), b"{}", "k")
    for n, record in enumerate(records):
        call = tracing.start_call(record, request, n + 1)
        tracing.end_call(call, [200, 503, None][n], None if n < 2 else "timeout")
    tracing.delivered(records[0])
    tracing.dead_lettered(records[1], DecodeError("no", reason="garbage-bytes"))
    batch = tracing.start_batch(PIPE, records)
    tracing.end_batch(batch, None)
    for record in records:
        record.end()
    return list(memory.get_finished_spans())


def _sdk_spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "sdk", "n": 3, "f": 1.5, "ok": True}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests", "9.9", schema_url="https://opentelemetry.io/schemas/1.30.0")
    remote = SpanContext(TRACE_ID, PRODUCER_SPAN, True, TraceFlags(1), TraceState([("a", "b")]))
    with tracer.start_as_current_span("outer", kind=SpanKind.SERVER, attributes={"list": [1, 2], "neg": -5}) as outer:
        outer.add_event("something", {"why": "because", "big": 2**40})
        outer.set_status(Status(StatusCode.ERROR, "it broke"))
        with tracer.start_as_current_span("inner", links=[Link(remote, {"l": "x"})]) as inner:
            inner.set_attribute("bytes", b"\x00\x01")
            inner.set_status(Status(StatusCode.OK))
    return list(memory.get_finished_spans())


@pytest.mark.parametrize("make", [_lean_spans, _sdk_spans], ids=["this service's spans", "SDK spans"])
def test_the_encoder_writes_the_same_bytes_as_the_sdk(make: Any) -> None:
    spans = make()
    assert len(spans) >= 2
    encoder = Encoder()
    for _ in range(2):  # the second time from its caches
        assert encoder.encode(spans) == reference_encode(spans)
    parsed = ExportTraceServiceRequest()
    parsed.ParseFromString(encoder.encode(spans))
    assert sum(len(s.spans) for r in parsed.resource_spans for s in r.scope_spans) == len(spans)


def test_the_encoder_stops_caching_values_that_never_repeat() -> None:
    tracing, memory = tracing_to_memory()
    for offset in range(2000):
        span = tracing.start_record(source(offset=offset))
        tracing.delivered(span)
        span.end()
    spans = list(memory.get_finished_spans())
    encoder = Encoder()
    assert encoder.encode(spans) == reference_encode(spans)
    assert encoder.cached_span_values("messaging.kafka.offset") is None, "offsets are unique: their cache was dropped"
    assert encoder.cached_span_values("bridge.outcome") == 1
    # Once not cached, ints of every varint length (1 to 10 bytes) are still written as the SDK writes them.
    large = [2**7 - 1, 2**7, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**28, 2**35, 2**49, 2**63 - 1]
    for offset in large:
        span = tracing.start_record(source(offset=offset))
        tracing.delivered(span)
        span.end()
    spans = list(memory.get_finished_spans())[-len(large) :]
    assert encoder.encode(spans) == reference_encode(spans)


# --- a collector that is down -----------------------------------------------------------------------------------------


def test_spans_that_cannot_be_exported_are_counted_and_ending_spans_never_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dropped: list[tuple[int, str]] = []
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    tracing = build_tracing(
        group_id="g",
        max_batch_rows=500,
        on_dropped=lambda count, reason: dropped.append((count, reason)),
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"},
    )
    assert isinstance(tracing, OtelTracing)
    # Ending a span only queues it: with the collector unreachable, spans beyond the queue are dropped (counted
    # below as queue_full), never waited for.
    for offset in range(2000):
        tracing.start_record(source(offset=offset)).end()
    deadline = time.monotonic() + 10
    while not any(reason == "export_failed" for _, reason in dropped) and time.monotonic() < deadline:
        time.sleep(0.05)
    reasons = {reason for _, reason in dropped}
    assert reasons == {"queue_full", "export_failed"}
    assert sum(count for count, reason in dropped if reason == "queue_full") >= 2000 - 64 - 16 * 4
    asyncio.run(tracing.aclose())  # returns although the collector never answered (its wait is bounded)


@pytest.mark.parametrize(
    ("environ", "limits"),
    [
        pytest.param({}, (16384, 4096), id="this service's defaults"),
        pytest.param({"OTEL_BSP_MAX_QUEUE_SIZE": "1000"}, (1000, 1000), id="a smaller queue takes a smaller batch"),
        pytest.param({"OTEL_BSP_MAX_QUEUE_SIZE": "64", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16"}, (64, 16), id="both"),
        pytest.param({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"}, (16384, 512), id="the SDK's batch"),
        pytest.param({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20000"}, (20000, 20000), id="a larger batch, a larger queue"),
        pytest.param({"OTEL_BSP_MAX_QUEUE_SIZE": "many"}, (16384, 4096), id="not a number: the default"),
    ],
)
def test_the_export_queue_and_batch_come_from_otel_bsp_variables_else_this_services_defaults(
    environ: dict[str, str], limits: tuple[int, int]
) -> None:
    assert queue_limits(environ) == limits
