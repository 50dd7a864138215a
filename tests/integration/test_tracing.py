"""Tracing end to end: the real service on the real broker, a real OTLP/HTTP receiver decoding what it exports.

A traced producer (the OpenTelemetry SDK, exporting to the same receiver) writes records with a `traceparent`; the
receiver must then hold the whole chain, producer -> record -> HTTP call, with its attributes, and the fake API must
have received the `traceparent` of that HTTP call. A collector that is down must not slow delivery, and the spans it
costs are counted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from functools import partial

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.cases import CASES, Case, is_marked
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import Topics, running_bridge
from tests.support.fake_apis import FakeApiServer, Fault, ReceivedRequest
from tests.support.kafka_broker import free_port
from tests.support.kafka_io import all_committed, eventually, produce, read_all
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.kafka

ENCODER = AvroEncoder()
LOG_CASE = next(c for c in CASES if c.endpoint == "update_log")
ROW_CASE = next(c for c in CASES if c.endpoint == "update_row")
INFERENCE_CASE = next(c for c in CASES if c.endpoint == "publish")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as found:
        yield found


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> OtlpReceiver:
    """Tracing on for the service run in this process: the standard variables, as an operator sets them."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "bridge-under-test")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    return receiver


class Producer:
    """A producer instrumented with the SDK: each record is sent under a PRODUCER span, its context in the headers."""

    def __init__(self, endpoint: str) -> None:
        self._provider = TracerProvider(resource=Resource({"service.name": "test-producer"}), shutdown_on_exit=False)
        self._provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
        self._tracer = self._provider.get_tracer("tests")
        self.spans: dict[int, tuple[str, str]] = {}
        """record number -> (trace id, span id) of the span it was sent under."""
        self.traceparents: dict[int, str] = {}

    async def send(
        self, bootstrap: str, topic: str, values: list[bytes], *, partition: int | None = None, state: str = ""
    ) -> None:
        for n, value in enumerate(values):
            span = self._tracer.start_span(f"send {topic}", kind=SpanKind.PRODUCER)
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier, set_span_in_context(span))
            headers = [(k, v.encode()) for k, v in carrier.items()]
            if state:
                headers.append(("tracestate", state.encode()))
            await produce(bootstrap, topic, [value], partition=partition, headers=headers)
            span.end()
            self.traceparents[n] = carrier["traceparent"]
            ctx = span.get_span_context()
            self.spans[n] = (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")

    def close(self) -> None:
        self._provider.shutdown()


@pytest.fixture
def producer(receiver: OtlpReceiver) -> Iterator[Producer]:
    made = Producer(receiver.endpoint)
    yield made
    made.close()


def _traceparent(request: ReceivedRequest) -> tuple[str, str]:
    version, trace_id, span_id, flags = request.headers["traceparent"].split("-")
    assert version == "00"
    assert int(flags, 16) & 1, "sampled"
    return trace_id, span_id


def _named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def _has(count: int, name: str) -> partial[bool]:
    return partial(lambda spans: len(_named(spans, name)) >= count)


async def _spans(receiver: OtlpReceiver, count: int, name: str) -> list[ReceivedSpan]:
    return await asyncio.to_thread(receiver.wait_for, _has(count, name), 30.0, f"{count} {name!r} spans")


@pytest.mark.parametrize("client", ["aiohttp", "pyreqwest"])
async def test_an_update_is_one_trace_from_the_producer_through_the_record_to_the_api_call(
    client: str,
    kafka_bootstrap: str,
    topics: Topics,
    fake_apis: FakeApiServer,
    bridge_env: dict[str, str],
    traced: OtlpReceiver,
    producer: Producer,
) -> None:
    topic = LOG_CASE.topic_of(topics)
    await producer.send(
        kafka_bootstrap, topic, [ENCODER.plain("log_update", LOG_CASE.datum(i, False)) for i in range(3)], state="v=1"
    )
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge({**bridge_env, "BRIDGE_DELIVERY__HTTP_CLIENT": client}):
        await eventually(partial(all_committed, kafka_bootstrap, group, topic), what="drained")
        spans = await _spans(traced, 3, "PATCH update_log")

    records = {s.trace_id: s for s in _named(spans, f"process {topic}")}
    calls = {s.trace_id: s for s in _named(spans, "PATCH update_log")}
    sent = {s.trace_id: s for s in _named(spans, f"send {topic}")}
    requests = {_traceparent(r)[0]: r for r in fake_apis.requests("update_log")}
    assert len(requests) == 3
    for trace_id, producer_span_id in producer.spans.values():
        assert sent[trace_id].kind == "PRODUCER"
        assert sent[trace_id].resource["service.name"] == "test-producer"
        record = records[trace_id]
        assert record.parent_span_id == producer_span_id, "the record continues the producer's trace"
        assert record.kind == "CONSUMER"
        assert record.resource["service.name"] == "bridge-under-test"
        assert record.resource["deployment.environment"] == "test"
        assert record.scope == "inference-bridge"
        assert record.trace_state == "v=1"
        attributes = record.attributes
        assert attributes["messaging.system"] == "kafka"
        assert attributes["messaging.operation.name"] == attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == topic
        assert attributes["messaging.destination.partition.id"] in {"0", "1", "2"}
        assert isinstance(attributes["messaging.kafka.offset"], int)
        assert attributes["messaging.consumer.group.name"] == group
        assert attributes["bridge.outcome"] == "delivered"
        call = calls[trace_id]
        assert call.parent_span_id == record.span_id, "the HTTP call is a child of the record"
        assert call.kind == "CLIENT"
        assert call.attributes["http.request.method"] == "PATCH"
        assert call.attributes["http.response.status_code"] == 200
        assert call.attributes["server.address"] == "127.0.0.1"
        assert call.attributes["server.port"] == fake_apis.port
        reference = requests[trace_id].query["reference_id"]
        assert call.attributes["url.full"] == f"{fake_apis.humanloop_base_url}/logs?reference_id={reference}"
        assert _traceparent(requests[trace_id]) == (trace_id, call.span_id), "the API got the call's traceparent"
        assert requests[trace_id].headers["tracestate"] == "v=1"
        assert record.start_ns <= call.start_ns <= call.end_ns <= record.end_ns
    assert traced.bad_requests == []


async def test_a_batched_publish_is_one_call_span_linked_to_the_spans_of_its_rows(
    kafka_bootstrap: str,
    topics: Topics,
    fake_apis: FakeApiServer,
    bridge_env: dict[str, str],
    traced: OtlpReceiver,
    producer: Producer,
) -> None:
    topic = INFERENCE_CASE.topic_of(topics)
    values = [ENCODER.plain("inference", INFERENCE_CASE.datum(i, False)) for i in range(4)]
    await producer.send(kafka_bootstrap, topic, values, partition=0)
    # A longer linger than the default, so the four rows share a call however the fetches fall.
    env = {**bridge_env, "BRIDGE_BATCH__LINGER_MS": "500"}
    group = env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(env):
        await eventually(partial(all_committed, kafka_bootstrap, group, topic), what="drained")
        spans = await _spans(traced, 4, f"process {topic}")
        spans = await _spans(traced, 1, "POST publish")

    records = {s.trace_id: s for s in _named(spans, f"process {topic}")}
    assert {(r.trace_id, r.parent_span_id) for r in records.values()} == set(producer.spans.values())
    assert all(r.attributes["bridge.outcome"] == "delivered" for r in records.values())
    [batch] = _named(spans, "publish batch")
    assert batch.parent_span_id == "", "a batch is a trace of its own, linked to its rows"
    assert {(link.trace_id, link.span_id) for link in batch.links} == {
        (r.trace_id, r.span_id) for r in records.values()
    }
    assert batch.attributes["messaging.batch.message_count"] == 4
    assert batch.attributes["bridge.outcome"] == "delivered"
    [call] = _named(spans, "POST publish")
    assert call.trace_id == batch.trace_id
    assert call.parent_span_id == batch.span_id
    assert call.attributes["http.response.status_code"] == 200
    [request] = fake_apis.requests("publish")
    assert len(request.json["rows"]) == 4
    assert _traceparent(request) == (call.trace_id, call.span_id)


async def test_a_dead_letter_keeps_the_trace_headers_and_its_log_line_and_span_say_so(
    kafka_bootstrap: str,
    topics: Topics,
    fake_apis: FakeApiServer,
    bridge_env: dict[str, str],
    traced: OtlpReceiver,
    producer: Producer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = ROW_CASE.topic_of(topics)
    fake_apis.reject_when("update_row", is_marked, Fault(status=422))
    await producer.send(kafka_bootstrap, topic, [ENCODER.plain("row_update", ROW_CASE.datum(0, True))], state="v=2")
    group = bridge_env["BRIDGE_KAFKA__GROUP_ID"]
    caplog.set_level(logging.INFO)
    async with running_bridge(bridge_env):
        await eventually(partial(all_committed, kafka_bootstrap, group, topic), what="drained")
        spans = await _spans(traced, 1, f"process {topic}")

    trace_id, producer_span_id = producer.spans[0]
    [letter] = await read_all(kafka_bootstrap, topics.dlq(topic))
    headers = {name: value.decode() for name, value in letter.headers}
    assert headers["traceparent"] == producer.traceparents[0], "the producer's context, unchanged"
    assert producer.traceparents[0].startswith(f"00-{trace_id}-{producer_span_id}-")
    assert headers["tracestate"] == "v=2"
    assert headers["bridge.reason"] == "http-422"
    [record] = _named(spans, f"process {topic}")
    assert record.trace_id == trace_id
    assert record.attributes["bridge.outcome"] == "dead-lettered"
    assert record.attributes["bridge.reason"] == record.attributes["error.type"] == "http-422"
    assert record.status == "ERROR"
    [call] = _named(spans, "PUT update_row")
    assert call.parent_span_id == record.span_id
    assert call.attributes["http.response.status_code"] == 422
    [line] = [r for r in caplog.records if r.getMessage() == "dead-lettered"]
    assert vars(line)["trace_id"] == trace_id
    assert vars(line)["span_id"] == record.span_id
    assert vars(line)["offset"] == letter_offset(headers)


def letter_offset(headers: dict[str, str]) -> int:
    return int(headers["__connect.errors.offset"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _dropped(port: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "bridge_trace_spans_dropped_total"
    }


async def _drain(
    kafka_bootstrap: str, env: dict[str, str], case: Case, topic: str, count: int, *, traced: bool
) -> dict[str, float]:
    """Spans dropped, by reason, in one run of the service that delivered and committed `count` records and then
    stopped cleanly (`running_bridge` guards the stop: a stop held by the collector fails it)."""
    port = free_port()
    env = {**env, "BRIDGE_OBSERVABILITY__HTTP_PORT": str(port)}
    values = [ENCODER.plain(case.kind, case.datum(i, False)) for i in range(count)]
    await produce(kafka_bootstrap, topic, values, keys=[f"k{i}".encode() for i in range(count)])
    group = env["BRIDGE_KAFKA__GROUP_ID"]
    async with running_bridge(env):
        await eventually(partial(all_committed, kafka_bootstrap, group, topic), what="drained")
        if traced:  # an export fails only after its retries, a few seconds in

            async def export_failed() -> bool:
                return (await _dropped(port)).get("export_failed", 0) > 0

            await eventually(export_failed, timeout_s=30, what="a failed export counted")
        return await _dropped(port)


async def test_a_collector_that_is_down_never_holds_delivery_and_the_lost_spans_are_counted(
    kafka_bootstrap: str,
    topics: Topics,
    fake_apis: FakeApiServer,
    bridge_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every record is delivered and committed while no span can be exported, and the spans that did not fit the
    queue were dropped and counted rather than waited for: delivery never waits on the exporter. What tracing costs
    when the collector is up is `make bench`'s `tracing_cost` line."""
    count = 1500
    # A fake API that takes 20 ms per call, so the drain takes a while and the exporter's retries overlap it.
    fake_apis.set_latency(0.02)
    off = await _drain(kafka_bootstrap, bridge_env, LOG_CASE, LOG_CASE.topic_of(topics), count, traced=False)
    assert off == {}, "tracing off: no tracing series"

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "256")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    # The same group (the log updates stay done) on the other update topic.
    dropped = await _drain(kafka_bootstrap, bridge_env, ROW_CASE, ROW_CASE.topic_of(topics), count, traced=True)
    assert set(dropped) == {"queue_full", "export_failed"}, "both series are exported from the start"
    assert dropped["export_failed"] > 0
    assert dropped["queue_full"] > 0, "3,000 spans, a queue of 256 that cannot drain"
    assert len([r for r in fake_apis.requests("update_log") if r.status == 200]) == count
    assert len([r for r in fake_apis.requests("update_row") if r.status == 200]) == count
