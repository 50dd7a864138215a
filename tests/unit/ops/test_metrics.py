"""The metrics' promises: Prometheus names (`bridge_` prefix, `_total` counters, base units), one registry per
`Metrics` (two never clash), the per-call and per-record helpers count what they say, and labels are bounded."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

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
    text = metrics.render().decode()

    for family in text_string_to_metric_families(text):
        if family.name.startswith("bridge_") and family.type == "counter":
            assert f"# TYPE {family.name}_total counter" in text or f"# TYPE {family.name} counter" in text
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.name.startswith("bridge_") and family.type == "histogram" and "duration" in family.name:
            assert family.name.endswith("_seconds"), family.name


def test_labels_never_carry_a_record_key_url_or_message() -> None:
    allowed = {"topic", "partition", "endpoint", "destination", "reason", "status_class"}
    for family in Metrics().registry.collect():
        if family.name.startswith("bridge_"):
            for sample in family.samples:
                assert set(sample.labels) - {"le"} <= allowed, family.name
    # Label names are fixed at construction: the children made so far carry only these.
    metrics = Metrics()
    metrics.call("publish", "openlayer", 200, 0.1)
    metrics.dead_lettered.labels("inferences", "schema-mismatch").inc()
    names = {
        name for family in metrics.registry.collect() if family.name.startswith("bridge_") for s in family.samples
        for name in s.labels
    }
    assert names - {"le"} <= allowed
