"""Prometheus metrics: one registry per process, built in app.py and passed to whoever counts.

Names follow Prometheus conventions (`_total` counters, base units, `bridge_` prefix). Labels are
bounded sets (topic, partition, endpoint, destination, reason code, status class): never a record
key, URL or message, so cardinality stays flat however bad the input is.
"""

from __future__ import annotations

import contextlib
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Memory, CPU and collector runs of this process: what sizing a pod and the GC thresholds
        # in service/ops/runtime.py are judged by.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.consumed = Counter("bridge_records_consumed", "Records fetched from Kafka.", ["topic"], registry=r)
        self.delivered = Counter("bridge_records_delivered", "Records their API accepted.", ["topic"], registry=r)
        self.dead_lettered = Counter(
            "bridge_records_dead_lettered", "Records written to a dead-letter topic.", ["topic", "reason"], registry=r
        )
        self.calls = Counter(
            "bridge_api_calls", "HTTP calls by endpoint and status class.", ["endpoint", "status_class"], registry=r
        )
        self.call_seconds = Histogram(
            "bridge_api_call_duration_seconds",
            "HTTP call latency.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter("bridge_api_retries", "Calls that will be retried.", ["endpoint", "reason"], registry=r)
        self.breaker_open = Gauge(
            "bridge_breaker_open", "1 while a destination's breaker holds calls back.", ["destination"], registry=r
        )
        self.destination_paused = Gauge(
            "bridge_destination_paused",
            "1 while a destination is paused for this reason (outage: its breaker is open; auth: it refuses our key).",
            ["destination", "reason"],
            registry=r,
        )
        self.concurrency_limit = Gauge(
            "bridge_concurrency_limit",
            "The adaptive limit on concurrent calls to a destination (ceiling: BRIDGE_DELIVERY__MAX_CONNECTIONS).",
            ["destination"],
            registry=r,
        )
        self.parked = Gauge(
            "bridge_records_parked",
            "Records waiting out a not-yet answer without holding in-flight slots.",
            registry=r,
        )
        self.last_success = Gauge(
            "bridge_api_last_success_timestamp_seconds",
            "When a destination last accepted a call.",
            ["destination"],
            registry=r,
        )
        self.in_flight = Gauge("bridge_records_in_flight", "Records fetched and not yet done.", registry=r)
        self.batch_rows = Histogram(
            "bridge_publish_batch_rows", "Rows per Publish-records call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.commit_seconds = Histogram(
            "bridge_commit_duration_seconds", "Offset commit latency.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.lag = Gauge(
            "bridge_consumer_lag",
            "Records after the last done offset, per partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "bridge_trace_spans_dropped",
            "Trace spans that never reach the collector: queue_full (the bounded export queue had no room) or"
            " export_failed (the collector was unreachable or refused them). Delivery never waits for either.",
            ["reason"],
            registry=r,
        )
        self._call_children: dict[tuple[str, str], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self._delivered_children: dict[str, Counter] = {}
        self._success_children: dict[str, Gauge] = {}

    # --- service.ops.instrumentation.Instrumentation ---

    def record_consumed(self, topic: str, count: int) -> None:
        self.consumed.labels(topic).inc(count)

    def record_backlog(self, in_flight: int, parked: int) -> None:
        self.in_flight.set(in_flight)
        self.parked.set(parked)

    def record_lag(self, topic: str, partition: int, records: int) -> None:
        self.lag.labels(topic, str(partition)).set(records)

    def forget_partition(self, topic: str, partition: int) -> None:
        with contextlib.suppress(KeyError):  # never reported (no highwater yet)
            self.lag.remove(topic, str(partition))

    def record_commit(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)

    def record_dead_lettered(self, topic: str, reason: str) -> None:
        self.dead_lettered.labels(topic, reason).inc()

    def record_retry(self, endpoint: str, reason: str) -> None:
        self.retries.labels(endpoint, reason).inc()

    def record_delivered(self, topic: str) -> None:
        # Once per record on the hottest path: a cached child, not `.labels()` each time.
        counter = self._delivered_children.get(topic)
        if counter is None:
            counter = self._delivered_children[topic] = self.delivered.labels(topic)
        counter.inc()

    def call(self, endpoint: str, destination: str, status: int | None, seconds: float) -> None:
        # Children are cached: `.labels()` costs more than the increment on the per-call path.
        key = (endpoint, status_class(status))
        counter = self._call_children.get(key)
        if counter is None:
            counter = self._call_children[key] = self.calls.labels(*key)
        counter.inc()
        histogram = self._latency_children.get(endpoint)
        if histogram is None:
            histogram = self._latency_children[endpoint] = self.call_seconds.labels(endpoint)
        histogram.observe(seconds)
        if status is not None and 200 <= status < 300:
            gauge = self._success_children.get(destination)
            if gauge is None:
                gauge = self._success_children[destination] = self.last_success.labels(destination)
            gauge.set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
