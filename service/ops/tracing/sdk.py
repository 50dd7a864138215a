"""The SDK pipeline from the environment: sampler, resource, BatchSpanProcessor (with this service's queue defaults)
and OTLP/HTTP exporter. Imported only when tracing is on (`service.ops.tracing.api.build_tracing` calls `build`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Final

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from .api import OnDropped
from .exporter import FastOtlpExporter, count_queue_drops
from .tracer import OtelTracing

log = logging.getLogger("service.otel")  # its name before the move: log queries filter on it


MAX_QUEUE_SIZE: Final = 16384
"""Spans queued for export when OTEL_BSP_MAX_QUEUE_SIZE is not set (the SDK's default is 2,048): four batches,
about 10 MiB at most."""
MAX_EXPORT_BATCH_SIZE: Final = 4096
"""Spans per export when OTEL_BSP_MAX_EXPORT_BATCH_SIZE is not set (the SDK's default is 512). An export costs the
exporter's HTTP client about 1.3 ms of CPU whatever its size, on the service's core: 2.6 µs a span in 512-span
exports, 0.3 µs in 4,096-span ones (measured on the development machine; in tests.support.tracing_cost, 1.8 µs per
row update at 2,048 spans, 0.9 at 4,096)."""


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
    version: str,
) -> OtelTracing:
    """The SDK pipeline from the environment (see `service.ops.tracing.api.build_tracing`)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION
    from opentelemetry.sdk.trace import SpanLimits
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    if SERVICE_VERSION not in resource.attributes:
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
