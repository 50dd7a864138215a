"""The composition root: builds every part once from `Settings`, runs the loop, tears down in order.

Nothing else constructs clients or reads settings. Teardown runs in reverse through one
`AsyncExitStack`: the loop drains and commits first, then the consumer leaves its group, then the
dead-letter producer flushes, then the HTTP clients close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from functools import partial

import httpx
from aiokafka.errors import KafkaError

from service.avro.codec import AvroCodec
from service.avro.registry import SchemaRegistry
from service.config.credentials import ApiKey
from service.config.settings import Settings
from service.core.errors import FatalError
from service.core.requests import Destination
from service.http.batching import Batcher
from service.http.breaker import BreakerState, Fault
from service.http.client import build_http_client
from service.http.delivery import Delivery, Guard, build_guard
from service.kafka.clients import KafkaDeadLetterProducer, build_consumer
from service.kafka.consumer import ConsumerLoop, LoopSettings
from service.kafka.deadletter import DeadLetterWriter, Redactor
from service.ops.health import HealthState, OpsServer
from service.ops.metrics import Metrics
from service.pipeline import Pipeline, publish_batch, publish_linked_batch
from service.streams import Router, by_topic, schema_set
from service.tracing import build_tracing

log = logging.getLogger(__name__)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the process knows, for the redactor."""
    values = [settings.openlayer.api_key.get_secret_value(), settings.humanloop.api_key.get_secret_value()]
    for secret in (settings.kafka.sasl_password, settings.schema_registry.password):
        if secret is not None:
            values.append(secret.get_secret_value())
    return values


def build_guards(
    settings: Settings, metrics: Metrics, redact: Redactor, rng: random.Random
) -> dict[Destination, Guard]:
    """Delivery's per-destination state, with its metrics exported from the start: an absent gauge
    would read as "no data" rather than "closed"."""
    keys = {
        Destination.OPENLAYER: (settings.openlayer.api_key, settings.openlayer.api_key_file, _bearer),
        Destination.HUMANLOOP: (settings.humanloop.api_key, settings.humanloop.api_key_file, _x_api_key),
    }
    guards = {}
    for dest, (secret, path, sign) in keys.items():
        for reason in Fault:
            metrics.destination_paused.labels(dest.value, reason.value).set(0)
        metrics.breaker_open.labels(dest.value).set(0)
        limit_gauge = metrics.concurrency_limit.labels(dest.value)
        guards[dest] = guard = build_guard(
            dest,
            settings.delivery,
            ApiKey(dest.value, secret.get_secret_value(), path, on_change=redact.add),
            sign,
            rng=rng,
            on_breaker=partial(_breaker_changed, metrics, dest),
            on_limit=limit_gauge.set,
        )
        limit_gauge.set(guard.limit.limit)
    return guards


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _x_api_key(key: str) -> dict[str, str]:
    return {"x-api-key": key}


async def run(settings: Settings, stop: asyncio.Event, redact: Redactor | None = None) -> None:
    """Run until `stop` is set; raises `FatalError` if the service cannot keep its delivery promise.

    `redact` is the redactor the logs use, so that a key rotated at run time is redacted there too.
    """
    rng = random.Random()
    redact = redact or Redactor(secrets_of(settings))
    d = settings.delivery
    streams = by_topic(settings.topics)
    metrics = Metrics()
    # The loop beats at least every poll; silence this long means it is stuck, not busy.
    health = HealthState(stale_after_s=max(60.0, 3 * d.drain_timeout_s))
    async with AsyncExitStack() as stack:
        obs = settings.observability
        ops = OpsServer(health, metrics, obs.http_host, obs.http_port)
        await ops.start()
        stack.push_async_callback(ops.stop)
        # From the OTEL_* environment; off (costing nothing) unless an OTLP endpoint is set. Closed after
        # everything that ends spans, so a clean stop exports the last of them (bounded: the collector may be down).
        tracing = build_tracing(
            group_id=settings.kafka.group_id,
            max_batch_rows=settings.batch.max_rows,
            on_dropped=lambda count, reason: metrics.trace_spans_dropped.labels(reason).inc(count),
        )
        stack.push_async_callback(tracing.aclose)
        if tracing.enabled:
            for reason in ("queue_full", "export_failed"):
                metrics.trace_spans_dropped.labels(reason)
        http = build_http_client(
            d.http_client,
            connect_timeout_s=d.connect_timeout_s,
            read_timeout_s=d.read_timeout_s,
            max_connections=d.max_connections * len(Destination),
        )
        stack.push_async_callback(http.aclose)

        registry = None
        sr = settings.schema_registry
        if sr.url is not None:
            registry_http = httpx.AsyncClient(timeout=httpx.Timeout(d.read_timeout_s, connect=d.connect_timeout_s))
            stack.push_async_callback(registry_http.aclose)
            registry = SchemaRegistry(
                registry_http,
                sr.url,
                username=sr.username,
                password=sr.password.get_secret_value() if sr.password else None,
            )
        codec = AvroCodec(schema_set(settings.schemas_dir), registry, sr.wire_format)

        delivery = Delivery(
            http, d, build_guards(settings, metrics, redact, rng), rng=rng, metrics=metrics, tracing=tracing
        )
        router = Router.from_settings(settings)

        producer = KafkaDeadLetterProducer(settings.kafka, settings.dead_letter.send_timeout_s)
        stack.push_async_callback(producer.stop)  # before start: a half-started client still needs closing
        await _start_kafka_client(producer.start(), settings.kafka.bootstrap_servers)
        dead_letters = DeadLetterWriter(
            producer,
            topic_for=settings.topics.dead_letter_topic,
            group_id=settings.kafka.group_id,
            redact=redact,
            attempts=settings.dead_letter.send_attempts,
        )
        await dead_letters.prepare(streams)

        b = settings.batch
        batcher = Batcher(
            partial(publish_batch, router, delivery),
            max_rows=b.max_rows,
            max_bytes=b.max_bytes,
            linger_s=b.linger_ms / 1000,
            on_batch=metrics.batch_rows.observe,
            linked_flush=partial(publish_linked_batch, router, delivery, tracing) if tracing.enabled else None,
        )
        stack.push_async_callback(batcher.aclose)
        pipeline = Pipeline(
            codec,
            router,
            delivery,
            dead_letters,
            batcher,
            streams,
            rng=rng,
            initial_backoff_s=d.initial_backoff_s,
            max_backoff_s=d.max_backoff_s,
            metrics=metrics,
            tracing=tracing,
        )
        consumer = build_consumer(settings.kafka)
        stack.push_async_callback(consumer.stop)
        await _start_kafka_client(consumer.start(), settings.kafka.bootstrap_servers)
        loop = ConsumerLoop(
            tracing.watch(consumer),  # with tracing on, notes when records were fetched (a span's start)
            pipeline.prepare,
            LoopSettings(
                max_in_flight_per_partition=d.max_in_flight_per_partition,
                max_in_flight_total=d.max_in_flight_total,
                max_buffered_per_partition=d.max_buffered_per_partition,
                max_uncommitted_per_partition=d.max_uncommitted_per_partition,
                commit_interval_s=settings.kafka.commit_interval_s,
                drain_timeout_s=d.drain_timeout_s,
                max_poll_records=settings.kafka.max_poll_records,
            ),
            metrics,
            health,
        )
        loop.subscribe(list(streams))
        running_on = type(asyncio.get_running_loop())
        log.info(
            "running",
            extra={
                "topics": list(streams),
                "group_id": settings.kafka.group_id,
                "event_loop": f"{running_on.__module__}.{running_on.__qualname__}",
            },
        )
        try:
            await loop.run(stop)
        except BaseException as exc:
            health.fatal = str(exc)
            raise
        log.info(
            "stopped cleanly",
            extra={"committed": {f"{tp.topic}-{tp.partition}": o for tp, o in loop.committed.items()}},
        )


class _LastError(logging.Handler):
    """Keeps aiokafka's last error line: its exceptions say "unable to bootstrap", its log says why."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


async def _start_kafka_client(starting: Awaitable[None], bootstrap: str) -> None:
    """Start a Kafka client; an unreachable or refusing cluster is a clear start-up error, not a traceback."""
    cause = _LastError()
    kafka_log = logging.getLogger("aiokafka")
    kafka_log.addHandler(cause)
    try:
        await starting
    except KafkaError as exc:
        why = f" ({cause.message})" if cause.message else ""
        raise FatalError(f"cannot start a Kafka client against {bootstrap}: {exc}{why}") from exc
    finally:
        kafka_log.removeHandler(cause)


def _breaker_changed(metrics: Metrics, destination: Destination, state: BreakerState, why: Fault | None) -> None:
    closed = state is BreakerState.CLOSED
    metrics.breaker_open.labels(destination.value).set(0 if closed else 1)
    for reason in Fault:
        metrics.destination_paused.labels(destination.value, reason.value).set(int(reason is why))
    if closed:
        log.warning("breaker closed, calls flow again", extra={"destination": destination.value})
    elif why is Fault.AUTH:
        log.warning(
            "breaker opened: the API refuses our key; nothing is dead-lettered, delivery resumes once the key"
            " file holds a key it accepts",
            extra={"destination": destination.value, "reason": why.value},
        )
    else:
        log.warning(
            "breaker opened: the API is failing; calls wait",
            extra={"destination": destination.value, "reason": why.value if why else None},
        )


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT ask for a clean stop; a second one while draining is not needed (the drain is bounded)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
