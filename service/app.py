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
from collections.abc import Awaitable, Mapping
from contextlib import AsyncExitStack
from functools import partial

from aiokafka.errors import KafkaError

from service.avro.codec import AvroCodec
from service.config.credentials import ApiKey
from service.config.settings import Settings
from service.core.errors import EVIDENCE_REDACTION_MARGIN_BYTES, FatalError
from service.core.requests import Destination
from service.http.batching import Batcher
from service.http.breaker import BreakerState, Fault
from service.http.client import build_http_client
from service.http.delivery import Delivery, Guard, build_guard
from service.kafka.clients import KafkaDeadLetterProducer, build_consumer, revoke_drain_s
from service.kafka.consumer import ConsumerLoop, LoopSettings
from service.kafka.deadletter import DeadLetterWriter
from service.ops.health import HealthState, OpsServer
from service.ops.metrics import Metrics
from service.ops.redaction import Redactor
from service.ops.tracing import Tracing, build_tracing
from service.pipeline import Pipeline, publish_batch, publish_linked_batch
from service.streams import Router, build_codec, by_topic, registry_client

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
    for destination, (secret, path, sign) in keys.items():
        for reason in Fault:
            metrics.destination_paused.labels(destination.value, reason.value).set(0)
        metrics.breaker_open.labels(destination.value).set(0)
        limit_gauge = metrics.concurrency_limit.labels(destination.value)
        guards[destination] = guard = build_guard(
            destination,
            settings.delivery,
            ApiKey(destination.value, secret.get_secret_value(), path, on_change=redact.add),
            sign,
            rng=rng,
            on_breaker=partial(_breaker_changed, metrics, destination),
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
    Each step registers its teardown on one stack, so everything stops in reverse order of starting.
    """
    rng = random.Random()
    redact = redact or Redactor(secrets_of(settings))
    streams = by_topic(settings.topics)
    metrics = Metrics()
    # The loop beats at least every poll; silence this long means it is stuck, not busy.
    health = HealthState(stale_after_s=max(60.0, 3 * settings.delivery.drain_timeout_s))
    async with AsyncExitStack() as stack:
        await start_ops_server(stack, settings, health, metrics)
        tracing = start_tracing(stack, settings, metrics)
        delivery = build_delivery(stack, settings, metrics, tracing, redact, rng)
        codec = start_codec(stack, settings)
        router = Router.from_settings(settings)
        dead_letters = await start_dead_letters(stack, settings, redact, streams)
        batcher = build_batcher(stack, settings, router, delivery, tracing, metrics)
        pipeline = Pipeline(
            codec,
            router,
            delivery,
            dead_letters,
            batcher,
            streams,
            rng=rng,
            initial_backoff_s=settings.delivery.initial_backoff_s,
            max_backoff_s=settings.delivery.max_backoff_s,
            instrumentation=metrics,
            tracing=tracing,
        )
        loop = await start_consumer_loop(stack, settings, pipeline, tracing, metrics, health)
        loop.subscribe(list(streams))
        _log_running(settings, list(streams))
        try:
            await loop.run(stop)
        except BaseException as exc:
            health.mark_fatal(str(exc))
            raise
        log.info(
            "stopped cleanly",
            extra={"committed": {f"{tp.topic}-{tp.partition}": o for tp, o in loop.committed.items()}},
        )


async def start_ops_server(stack: AsyncExitStack, settings: Settings, health: HealthState, metrics: Metrics) -> None:
    """/metrics, /livez and /readyz, up first so a probe sees the service start."""
    observability = settings.observability
    ops = OpsServer(health, metrics, observability.http_host, observability.http_port)
    await ops.start()
    stack.push_async_callback(ops.stop)


def start_tracing(stack: AsyncExitStack, settings: Settings, metrics: Metrics) -> Tracing:
    """Tracing from the OTEL_* environment; off (costing nothing) unless an OTLP endpoint is set."""
    tracing = build_tracing(
        group_id=settings.kafka.group_id,
        max_batch_rows=settings.batch.max_rows,
        on_dropped=lambda count, reason: metrics.trace_spans_dropped.labels(reason).inc(count),
    )
    # Closed after everything that ends spans, so a clean stop exports the last of them (bounded: the
    # collector may be down).
    stack.push_async_callback(tracing.aclose)
    if tracing.enabled:
        for reason in ("queue_full", "export_failed"):
            metrics.trace_spans_dropped.labels(reason)
    return tracing


def start_codec(stack: AsyncExitStack, settings: Settings) -> AvroCodec:
    """The streams' schemas and decoders, with the schema registry when one is configured."""
    registry_http = registry_client(settings)
    if registry_http is not None:
        stack.push_async_callback(registry_http.aclose)
    return build_codec(settings, registry_http)


def build_delivery(
    stack: AsyncExitStack,
    settings: Settings,
    metrics: Metrics,
    tracing: Tracing,
    redact: Redactor,
    rng: random.Random,
) -> Delivery:
    """The shared HTTP client and, per destination, its key, breaker and concurrency limit."""
    delivery = settings.delivery
    http = build_http_client(
        delivery.http_client,
        connect_timeout_s=delivery.connect_timeout_s,
        read_timeout_s=delivery.read_timeout_s,
        max_connections=delivery.max_connections * len(Destination),
        # All of a body delivery keeps: its evidence, and the margin it is redacted with before the cut.
        max_body_bytes=delivery.evidence_body_bytes + EVIDENCE_REDACTION_MARGIN_BYTES,
    )
    stack.push_async_callback(http.aclose)
    guards = build_guards(settings, metrics, redact, rng)
    return Delivery(http, delivery, guards, rng=rng, instrumentation=metrics, tracing=tracing)


async def start_dead_letters(
    stack: AsyncExitStack, settings: Settings, redact: Redactor, streams: Mapping[str, object]
) -> DeadLetterWriter:
    """The dead-letter producer, started, with every source topic's dead-letter topic checked."""
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
    return dead_letters


def build_batcher(
    stack: AsyncExitStack, settings: Settings, router: Router, delivery: Delivery, tracing: Tracing, metrics: Metrics
) -> Batcher:
    """Publish-records batching: rows that share a pipeline and a config go in one call."""
    batch = settings.batch
    batcher = Batcher(
        partial(publish_batch, router, delivery),
        max_rows=batch.max_rows,
        max_bytes=batch.max_bytes,
        linger_s=batch.linger_ms / 1000,
        on_batch=metrics.batch_rows.observe,
        linked_flush=partial(publish_linked_batch, router, delivery, tracing) if tracing.enabled else None,
    )
    stack.push_async_callback(batcher.aclose)
    return batcher


async def start_consumer_loop(
    stack: AsyncExitStack,
    settings: Settings,
    pipeline: Pipeline,
    tracing: Tracing,
    metrics: Metrics,
    health: HealthState,
) -> ConsumerLoop:
    """The Kafka consumer, started, and the loop that hands its records to the pipeline."""
    delivery = settings.delivery
    consumer = build_consumer(settings.kafka)
    stack.push_async_callback(consumer.stop)
    await _start_kafka_client(consumer.start(), settings.kafka.bootstrap_servers)
    return ConsumerLoop(
        tracing.watch(consumer),  # with tracing on, notes when records were fetched (a span's start)
        pipeline.prepare,
        LoopSettings(
            max_in_flight_per_partition=delivery.max_in_flight_per_partition,
            max_in_flight_total=delivery.max_in_flight_total,
            max_buffered_per_partition=delivery.max_buffered_per_partition,
            max_uncommitted_per_partition=delivery.max_uncommitted_per_partition,
            commit_interval_s=settings.kafka.commit_interval_s,
            drain_timeout_s=delivery.drain_timeout_s,
            revoke_drain_timeout_s=revoke_drain_s(settings.kafka, delivery.drain_timeout_s),
            max_poll_records=settings.kafka.max_poll_records,
        ),
        metrics,
        health,
    )


def _log_running(settings: Settings, topics: list[str]) -> None:
    running_on = type(asyncio.get_running_loop())
    log.info(
        "running",
        extra={
            "topics": topics,
            "group_id": settings.kafka.group_id,
            "event_loop": f"{running_on.__module__}.{running_on.__qualname__}",
        },
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
