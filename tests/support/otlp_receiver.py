"""A real OTLP/HTTP trace receiver for tests: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.

It decodes each request with opentelemetry-proto's own message classes and keeps the spans as plain values
(`ReceivedSpan`), with their resource's attributes, so a test can follow a trace from the producer through the
record to the HTTP call. `python -m tests.support.otlp_receiver --port N` runs one alone, as a separate process (for
measuring the service's tracing cost with a collector that costs the service nothing): it prints
`receiving OTLP/HTTP traces on <url>` once it listens, and answers `GET /__count` with
`{"spans": ..., "requests": ..., "bad_requests": ...}` so a measurement can check that the spans arrived.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.support.fake_apis import ServerThread, ThreadedServer

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True, slots=True)
class ReceivedLink:
    trace_id: str
    span_id: str


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as the collector received it; ids as lower-case hex, as in a `traceparent`."""

    trace_id: str
    span_id: str
    parent_span_id: str
    """"" for a root span."""
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str
    status_message: str
    links: tuple[ReceivedLink, ...]
    trace_state: str
    scope: str
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def traceparent_suffix(self) -> str:
        """`<trace-id>-<span-id>`: what a `traceparent` naming this span holds between version and flags."""
        return f"{self.trace_id}-{self.span_id}"


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None if which is None else getattr(value, which)


def _attributes(values: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in values}


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one `ExportTraceServiceRequest`; raises on bytes that are not one."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=KINDS[span.kind],
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        status=STATUS[span.status.code],
                        status_message=span.status.message,
                        links=tuple(ReceivedLink(link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        trace_state=span.trace_state,
                        scope=scope_spans.scope.name,
                        resource=resource,
                    )
                )
    return spans


def _count(body: bytes) -> int:
    """How many spans one request holds, without making values of them (fast enough for measurements)."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


class OtlpReceiver(ThreadedServer):
    """Serves `POST /v1/traces` (protobuf) on 127.0.0.1 from its own thread; thread-safe recordings."""

    def __init__(self, *, port: int = 0, keep: bool = True) -> None:
        """`keep=False` counts spans without keeping them (long measurements)."""
        self._keep = keep
        self._server = ServerThread(self._build_app, port=port, name="otlp-receiver")
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._count = 0
        self.requests = 0
        self.bad_requests: list[str] = []
        self.headers: list[Mapping[str, str]] = []

    @property
    def endpoint(self) -> str:
        """The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_get("/__count", self._count_json)
        return app

    async def _count_json(self, request: web.Request) -> web.Response:
        with self._lock:
            counts = {"spans": self._count, "requests": self.requests, "bad_requests": len(self.bad_requests)}
        return web.json_response(counts)

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.content_type != "application/x-protobuf":
            with self._lock:
                self.bad_requests.append(f"content type {request.content_type}")
            return web.Response(status=415)
        try:
            spans = decode(body) if self._keep else []
            count = len(spans) if self._keep else _count(body)
        except Exception as exc:  # noqa: BLE001  # recorded for the test, answered as a collector would
            with self._lock:
                self.bad_requests.append(f"undecodable: {exc}")
            return web.Response(status=400)
        with self._lock:
            self.requests += 1
            self.headers.append(dict(request.headers))
            self._count += count
            self._spans.extend(spans)
            self._lock.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 30.0, what: str = "spans"
    ) -> list[ReceivedSpan]:
        """Block until `predicate(spans)` holds (call it from a thread, or use `await asyncio.to_thread`)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the collector did not receive {what} in {timeout_s}s: {self._spans}")
                self._lock.wait(left)
            return list(self._spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318, help="0: any free port (the printed URL names it)")
    args = parser.parse_args()
    with OtlpReceiver(port=args.port, keep=False) as receiver:
        print(f"receiving OTLP/HTTP traces on {receiver.endpoint}/v1/traces", flush=True)
        while True:  # until SIGTERM or SIGINT; GET /__count tells how many spans arrived
            time.sleep(3600)


if __name__ == "__main__":
    main()
