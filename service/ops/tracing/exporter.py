"""From an ended span to the collector: straight into the BatchSpanProcessor's queue, then encoded by this package's
encoder and sent by the SDK's OTLP/HTTP exporter's own client (so the OTEL_EXPORTER_OTLP_* settings: endpoint,
headers, timeout, compression, certificates, and its retries apply unchanged); what never arrives is counted.
Imported only when tracing is on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from .api import OnDropped
from .encoder import Encoder

log = logging.getLogger("service.otel")  # its name before the move: log queries filter on it


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
    SDK 1.45 (requirements.lock pins it), else its `on_end`.

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
