"""Tracing: the `Tracing` seam (off unless an OTLP endpoint is set) and, only when it is on, the OpenTelemetry SDK.

    api          the seam, tracing off, and `build_tracing` from the OTEL_* variables (no SDK import)
    tracer       tracing on: `OtelTracing`, the spans of records, calls and batches
    spans        `LeanSpan`, the span itself
    propagation  the producer's traceparent/tracestate from a record's headers
    fetch        when each record was fetched (its span's start)
    exporter     from an ended span to the collector, and counting what never arrives
    encoder      OTLP protobuf encoding
    sdk          the SDK pipeline from the environment

Only `api` is imported here: the rest loads the OpenTelemetry SDK and is imported when tracing is on.
"""

from .api import OnDropped, Tracing, build_tracing, log_fields, tracing_endpoint

__all__ = ["OnDropped", "Tracing", "build_tracing", "log_fields", "tracing_endpoint"]
