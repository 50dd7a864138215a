"""How records are delivered, batched, dead-lettered and observed.

`BRIDGE_DELIVERY__*`, `BRIDGE_BATCH__*`, `BRIDGE_DEAD_LETTER__*` and `BRIDGE_OBSERVABILITY__*`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
)

from service.config.section import DAY_MS, DAY_S, Section

# Ten years: the grace is only compared with a record's age (now less its timestamp), and a replayed dead
# letter keeps its original timestamp (service/tools/replay/plan.py), so weeks-old records are normal input
# here; the bound refuses a typo, nothing a deployment would set.
NOT_FOUND_GRACE_MAX_S = 3650 * DAY_S
# Calls in flight to one destination, most on their own HTTP/1.1 connection: Linux's default ephemeral port
# range (about 28,000 ports per destination address) runs out well before this.
MAX_CONNECTIONS = 65_535


class DeliverySettings(Section):
    connect_timeout_s: float = Field(default=5.0, gt=0, le=DAY_S, description="per attempt")
    read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=DAY_S,
        description="longest attempt; attempts are cut sooner once latency is known, see next",
    )
    min_attempt_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=DAY_S,
        description="shortest attempt timeout; an attempt may take 4x its endpoint's recent p99 latency (5 s "
        "before 32 successful answers), within this and read_timeout_s",
    )
    initial_backoff_s: float = Field(
        default=0.5,
        gt=0,
        le=DAY_S,
        description="first retry delay (doubles, jittered); also a breaker's first pause, at least 1 s",
    )
    max_backoff_s: float = Field(
        default=30.0,
        gt=0,
        le=DAY_S,
        description="longest retry delay; a breaker's pause doubles up to this or 10 s, whichever is less "
        "(at least 1 s)",
    )
    retry_after_cap_s: float = Field(
        default=60.0, gt=0, le=DAY_S, description="longest server-requested pause honoured"
    )
    conflict_retries: int = Field(default=2, ge=0, description="409 retries before the record is rejected")
    not_found_grace_s: float = Field(
        default=600.0,
        ge=0,
        le=NOT_FOUND_GRACE_MAX_S,
        description="how long a 404 on an update is retried, from the record's timestamp",
    )
    evidence_body_bytes: int = Field(
        default=4096,
        ge=0,
        le=65536,
        description="response body bytes kept in a dead letter's headers; only this plus 4096 bytes of a body are "
        "read, the rest is left unread and its connection closed",
    )
    # 1,024 and not 512: at 50 ms of API latency the service on one core needs about 450-500 calls in flight, and
    # its own CPU queueing adds to the round trip, so 512 left it waiting on the ceiling (make bench: 50 ms vs 0 ms
    # at 0.85-0.91 with 512, 0.93-1.00 with 1,024). The adaptive limit, not this ceiling, keeps load off an API.
    max_connections: int = Field(
        default=1024,
        ge=1,
        le=MAX_CONNECTIONS,
        description="ceiling of the adaptive limit on concurrent calls per destination",
    )
    max_in_flight_per_partition: int = Field(
        default=1000, ge=1, description="records of one partition started and not yet done (calls and batched rows)"
    )
    max_in_flight_total: int = Field(
        default=4096, ge=1, description="records started and not yet done across all partitions of this member"
    )
    max_buffered_per_partition: int = Field(
        default=2000,
        ge=1,
        description="records taken from Kafka and not yet done; at it the partition is left out of polls",
    )
    max_uncommitted_per_partition: int = Field(
        default=50_000,
        ge=1,
        description="records from the oldest one not done on (what a crash repeats); above it the partition pauses",
    )
    drain_timeout_s: float = Field(
        default=20.0,
        gt=0,
        le=DAY_S,
        description="bounded wait for in-flight calls on stop; on a revoke at most the session timeout less 5 s",
    )
    breaker_failure_rate: float = Field(
        default=0.5, gt=0, le=1, description="share of failed calls in the last 10 s that opens a destination's breaker"
    )
    breaker_min_calls: int = Field(
        default=20, ge=1, description="calls in the last 10 s before the failure rate counts"
    )
    http_client: Literal["pyreqwest", "aiohttp", "httpx"] = Field(
        default="pyreqwest",
        description="HTTP client library; pyreqwest (Rust reqwest) sends about 2.5x the calls per CPU-second of "
        "aiohttp, and aiohttp about 30x httpx (make bench)",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="event loop; uvloop carries more records per core, asyncio is the standard library's",
    )


class BatchSettings(Section):
    """Publish-records batching of new inferences (rows of one pipeline and config share a call)."""

    max_rows: int = Field(default=500, ge=1, le=10_000, description="rows per Publish-records call")
    max_bytes: int = Field(default=1_000_000, ge=1024, description="row JSON bytes per call")
    linger_ms: float = Field(default=20.0, ge=0, le=DAY_MS, description="how long a batch waits for more rows")


class DeadLetterSettings(Section):
    send_attempts: int = Field(default=5, ge=1, description="tries before a failed DLQ write stops the service")
    send_timeout_s: float = Field(default=30.0, gt=0, le=DAY_S, description="per dead-letter write attempt")


class ObservabilitySettings(Section):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="root log level")
    log_format: Literal["json", "text"] = Field(default="json", description="one JSON object per line, or text")
    # Every interface by default: Kubernetes probes and Prometheus reach the pod on its own IP. The port serves
    # only metrics and probes, never data or secrets; NetworkPolicy (the chart's networkPolicy) limits who asks.
    http_host: str = Field(default="0.0.0.0", description="where /metrics, /livez and /readyz listen")  # noqa: S104
    http_port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port (tests)")
