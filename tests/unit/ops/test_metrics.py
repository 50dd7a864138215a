"""The metrics' promises: Prometheus names (`bridge_` prefix, `_total` counters, base units), one registry per
`Metrics` (two never clash), and the per-call and per-record helpers count what they say."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.ops.instrumentation import Instrumentation
from service.ops.metrics import Metrics, status_class


@pytest.mark.parametrize(
    ("status", "expected"), [(None, "error"), (200, "2xx"), (204, "2xx"), (301, "3xx"), (429, "4xx"), (503, "5xx")]
)
def test_status_class(status: int | None, expected: str) -> None:
    assert status_class(status) == expected


def test_two_instances_have_their_own_registries() -> None:
    first, second = Metrics(), Metrics()  # a shared (global) registry would refuse the second's names
    first.record_delivered("inferences")

    assert first.registry.get_sample_value("bridge_records_delivered_total", {"topic": "inferences"}) == 1.0
    assert second.registry.get_sample_value("bridge_records_delivered_total", {"topic": "inferences"}) is None


def test_record_delivered_counts_per_topic() -> None:
    metrics = Metrics()
    for topic in ("inferences", "inferences", "log-updates"):
        metrics.record_delivered(topic)

    sample = metrics.registry.get_sample_value
    assert sample("bridge_records_delivered_total", {"topic": "inferences"}) == 2.0
    assert sample("bridge_records_delivered_total", {"topic": "log-updates"}) == 1.0


def test_a_call_is_counted_by_endpoint_and_status_class_and_timed_by_endpoint() -> None:
    metrics = Metrics()
    metrics.call("publish", "openlayer", 200, 0.02)
    metrics.call("publish", "openlayer", 201, 0.03)
    metrics.call("publish", "openlayer", 503, 0.5)
    metrics.call("publish", "openlayer", None, 1.0)
    metrics.call("update-log", "humanloop", 200, 0.01)

    sample = metrics.registry.get_sample_value
    assert sample("bridge_api_calls_total", {"endpoint": "publish", "status_class": "2xx"}) == 2.0
    assert sample("bridge_api_calls_total", {"endpoint": "publish", "status_class": "5xx"}) == 1.0
    assert sample("bridge_api_calls_total", {"endpoint": "publish", "status_class": "error"}) == 1.0
    assert sample("bridge_api_call_duration_seconds_count", {"endpoint": "publish"}) == 4.0
    assert sample("bridge_api_call_duration_seconds_sum", {"endpoint": "publish"}) == pytest.approx(1.55)
    assert sample("bridge_api_call_duration_seconds_count", {"endpoint": "update-log"}) == 1.0


def test_only_a_2xx_answer_marks_the_destinations_last_success() -> None:
    metrics = Metrics()
    last_success = "bridge_api_last_success_timestamp_seconds"
    metrics.call("publish", "openlayer", 503, 0.1)
    metrics.call("publish", "openlayer", None, 0.1)
    metrics.call("update-row", "openlayer", 302, 0.1)
    assert metrics.registry.get_sample_value(last_success, {"destination": "openlayer"}) is None

    metrics.call("update-log", "humanloop", 200, 0.1)
    assert metrics.registry.get_sample_value(last_success, {"destination": "humanloop"}) is not None
    assert metrics.registry.get_sample_value(last_success, {"destination": "openlayer"}) is None


def _families(metrics: Metrics) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(metrics.render().decode())}


def test_every_family_is_ours_or_the_process_and_gc_collectors() -> None:
    families = _families(Metrics())

    ours = {name for name in families if name.startswith("bridge_")}
    assert ours, "no bridge_ metric rendered"
    assert {name for name in families if not name.startswith(("bridge_", "process_", "python_gc_"))} == set()
    assert "process_resident_memory_bytes" in families, "sizing a pod is judged by the process collector"


def test_counters_render_with_total_and_durations_in_seconds() -> None:
    metrics = Metrics()
    metrics.consumed.labels("t").inc()
    metrics.record_delivered("t")
    metrics.dead_lettered.labels("t", "schema-mismatch").inc()
    metrics.retries.labels("publish", "timeout").inc()
    metrics.trace_spans_dropped.labels("queue_full").inc()
    metrics.call("publish", "openlayer", 200, 0.1)
    metrics.commit_seconds.observe(0.01)
    text = metrics.render().decode()

    for family in text_string_to_metric_families(text):
        if family.name.startswith("bridge_") and family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.name.startswith("bridge_") and family.type == "histogram" and "duration" in family.name:
            assert family.name.endswith("_seconds"), family.name


# --- the Instrumentation the record path reports through -------------------------------------------------------------


def test_metrics_count_what_the_consumer_loop_reports() -> None:
    metrics = Metrics()
    instrumentation: Instrumentation = metrics  # mypy checks Metrics has every method of the protocol
    instrumentation.record_consumed("inferences", 500)
    instrumentation.record_consumed("inferences", 20)
    instrumentation.record_backlog(in_flight=7, parked=2)
    instrumentation.record_commit(0.004)

    sample = metrics.registry.get_sample_value
    assert sample("bridge_records_consumed_total", {"topic": "inferences"}) == 520.0
    assert (sample("bridge_records_in_flight"), sample("bridge_records_parked")) == (7.0, 2.0)
    assert sample("bridge_commit_duration_seconds_count") == 1.0
    assert sample("bridge_commit_duration_seconds_bucket", {"le": "0.005"}) == 1.0


def test_a_forgotten_partition_stops_reporting_its_lag_and_the_others_keep_theirs() -> None:
    metrics = Metrics()
    metrics.record_lag("inferences", 0, 12)
    metrics.record_lag("inferences", 1, 3)

    metrics.forget_partition("inferences", 0)
    metrics.forget_partition("inferences", 7)  # never reported: nothing to forget, and no error

    sample = metrics.registry.get_sample_value
    assert sample("bridge_consumer_lag", {"topic": "inferences", "partition": "0"}) is None
    assert sample("bridge_consumer_lag", {"topic": "inferences", "partition": "1"}) == 3.0


def test_dead_letters_and_retries_are_counted_by_their_reason() -> None:
    metrics = Metrics()
    metrics.record_dead_lettered("inferences", "schema-mismatch")
    metrics.record_dead_lettered("inferences", "schema-mismatch")
    metrics.record_dead_lettered("inferences", "rejected")
    metrics.record_retry("publish", "timeout")

    sample = metrics.registry.get_sample_value
    assert sample("bridge_records_dead_lettered_total", {"topic": "inferences", "reason": "schema-mismatch"}) == 2.0
    assert sample("bridge_records_dead_lettered_total", {"topic": "inferences", "reason": "rejected"}) == 1.0
    assert sample("bridge_api_retries_total", {"endpoint": "publish", "reason": "timeout"}) == 1.0
