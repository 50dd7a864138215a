"""What the record path reports as it goes: the one seam between the service's work and how it is observed.

The consumer loop, the pipeline and delivery call these methods and nothing else of an observer, so Prometheus
metrics (`service.ops.metrics.Metrics`) implement it today and tracing can implement it next without touching
the three. Every method runs on the hot path: an implementation must not block and must not raise.
"""

from __future__ import annotations

from typing import Protocol


class Instrumentation(Protocol):
    # --- the consumer loop (service/kafka/consumer.py) ---
    def record_consumed(self, topic: str, count: int) -> None:
        """`count` records of `topic` were fetched."""

    def record_backlog(self, in_flight: int, parked: int) -> None:
        """Records fetched and not yet done, and how many of them wait out a not-yet answer without slots."""

    def record_lag(self, topic: str, partition: int, records: int) -> None:
        """Records after the last done offset of a partition this member owns."""

    def forget_partition(self, topic: str, partition: int) -> None:
        """This member no longer owns the partition: stop reporting its lag."""

    def record_commit(self, seconds: float) -> None:
        """An offset commit took `seconds`."""

    # --- the pipeline (service/pipeline.py) ---
    def record_delivered(self, topic: str) -> None:
        """A record's API accepted it."""

    def record_dead_lettered(self, topic: str, reason: str) -> None:
        """A record was written to its dead-letter topic with this reason code."""

    # --- delivery (service/http/delivery.py) ---
    def call(self, endpoint: str, destination: str, status: int | None, seconds: float) -> None:
        """One HTTP attempt ended with `status` (None: no answer) after `seconds`."""

    def record_retry(self, endpoint: str, reason: str) -> None:
        """An attempt failed in a way that will be retried (`reason`: the failure kind or the verdict)."""
