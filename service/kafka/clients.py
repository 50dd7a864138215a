"""Builds the aiokafka consumer and the dead-letter producer from settings; the only aiokafka factory.

Security (SASL, TLS with a custom CA, mutual TLS) is mapped here once, for both clients.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from service.config.kafka import KafkaSettings
from service.core.errors import TransientError
from service.core.records import SourceRecord
from service.kafka.deadletter import DeadLetter, DeadLetterTooLarge

log = logging.getLogger("service.deadletter")  # the dead-letter writer's: log queries filter on it


def to_source_record(record: ConsumerRecord[bytes, bytes]) -> SourceRecord:
    """A fetched record as the plain value the rest of the service uses (header values as bytes, or None: Kafka
    allows a header without a value, and `bytes(None)` stopped the service on such a record, on every restart)."""
    # Once per record: positional, and no generator for the common record without headers.
    headers = (
        tuple((name, None if value is None else bytes(value)) for name, value in record.headers)
        if record.headers
        else ()
    )
    return SourceRecord(
        record.topic, record.partition, record.offset, record.key, record.value, headers, record.timestamp
    )


def security_options(settings: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.ssl_cafile)
        if settings.ssl_certfile:

            def _encrypted_key() -> str:
                # Without a callback OpenSSL prompts for a passphrase on the terminal: start-up blocks
                # on a TTY, and without one fails with a bare "[Errno 22] Invalid argument".
                raise OSError(
                    f"the client key {settings.ssl_keyfile or settings.ssl_certfile} is encrypted; "
                    "BRIDGE_KAFKA__SSL_KEYFILE must be an unencrypted PEM key"
                )

            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, password=_encrypted_key)
        options["ssl_context"] = context
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return options


AIOKAFKA_REQUEST_TIMEOUT_MS: Final = 40_000
"""aiokafka's own default request timeout: what every request but JoinGroup needs, kept as the floor."""
JOIN_GROUP_MARGIN_MS: Final = 5_000
"""How much longer than the rebalance timeout a JoinGroup is waited for (Kafka's Java client waits as long)."""


def group_timeouts(settings: KafkaSettings) -> dict[str, int]:
    """The consumer's rebalance timeout, and a request timeout that outlasts it.

    The broker holds a JoinGroup response until every member has rejoined or the rebalance timeout has
    passed: a member still draining the partitions it gives up (up to the delivery drain timeout), or one
    killed with -9 and waited for until its session expires. aiokafka (0.14) has no JoinGroup timeout of
    its own: every request on a connection, JoinGroup included, is given up after `request_timeout_ms`.
    With aiokafka's defaults (40 s, against a rebalance timeout that is the session timeout, 45 s here) a
    rebalance that waits longer than 40 s times the JoinGroup out: aiokafka closes the coordinator
    connection, marks the coordinator dead, logs an ERROR, finds it again and sends the JoinGroup again.
    So the request timeout is the rebalance timeout plus a margin, as Kafka's Java client waits for a
    JoinGroup. The rebalance timeout stays what aiokafka makes it by default, the session timeout, and is
    passed explicitly because the request timeout is derived from it. Only a member of the same group with
    a longer rebalance timeout (a replica with a longer session timeout) can still make the broker hold
    the response longer.
    """
    rebalance_timeout_ms = settings.session_timeout_ms
    return {
        "rebalance_timeout_ms": rebalance_timeout_ms,
        "request_timeout_ms": max(AIOKAFKA_REQUEST_TIMEOUT_MS, rebalance_timeout_ms + JOIN_GROUP_MARGIN_MS),
    }


REJOIN_MARGIN_S: Final = 5.0
"""What a member giving up partitions keeps of the rebalance timeout for its commit and its JoinGroup."""


def revoke_drain_s(settings: KafkaSettings, drain_timeout_s: float) -> float:
    """How long a revoke waits for the revoked partitions' calls in flight: the drain timeout, but never so long that
    the member misses the rebalance.

    The broker waits for a member giving up partitions at most the rebalance timeout (`group_timeouts`), and the
    member rejoins only after draining and committing them (service/kafka/consumer.py `release`). Past that
    timeout the group goes on without it, its commit is refused, everything it finished is delivered again by
    the next owner, and its rejoining starts another rebalance. With the default session timeout (45 s) the
    whole drain (20 s) fits; with a short one (6 s, for a quick failover) the revoke drains for 1 s: calls
    still in flight then are cancelled and read again by the partition's next owner, as after any drain.
    A stop (SIGTERM) leaves the group afterwards and drains for the whole `drain_timeout_s`.
    """
    budget_s = group_timeouts(settings)["rebalance_timeout_ms"] / 1000 - REJOIN_MARGIN_S
    return max(0.0, min(drain_timeout_s, budget_s))


def build_consumer(settings: KafkaSettings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group_id,
        client_id=settings.client_id,
        enable_auto_commit=False,  # offsets are committed only after a durable outcome
        auto_offset_reset=settings.auto_offset_reset,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=settings.max_poll_records,
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        **group_timeouts(settings),
        **security_options(settings),
    )


def build_reader(settings: KafkaSettings, *, role: str, group_id: str | None = None) -> AIOKafkaConsumer:
    """A consumer for the tools: it is assigned partitions and seeks, it never subscribes (no rebalance to wait for).

    Without `group_id` it cannot commit (aiokafka refuses to commit without a group id), which read-only tools
    want. With one, the group gives the committed start position and a place to commit progress by hand.
    """
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=f"{settings.client_id}-{role}",
        enable_auto_commit=False,  # a tool commits only what it finished, if anything
        auto_offset_reset="earliest",  # a fresh group starts at the oldest record
        # aiokafka reads read_uncommitted by default: a dead letter in an aborted transaction (a DLQ written by
        # another, transactional tool) was never written, and must be neither counted nor replayed.
        isolation_level="read_committed",
        max_poll_records=settings.max_poll_records,
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        **security_options(settings),
    )


def build_admin(settings: KafkaSettings, *, role: str) -> AIOKafkaAdminClient:
    """An admin client, for the tools' topic listings."""
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-{role}",
        **security_options(settings),
    )


async def list_partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    """Every topic's partition count. It lists all topics rather than asking for one by name, because a
    metadata request that names a topic auto-creates it on brokers that allow that."""
    described: list[dict[str, Any]] = await admin.describe_topics()
    return {topic["topic"]: len(topic["partitions"]) for topic in described if topic["error_code"] == 0}


MAX_REQUEST_BYTES: Final = 104_857_600
"""The producer's max_request_size: the broker's own request limit (socket.request.max.bytes, 100 MiB by default),
so that any record a broker took in fits again as a dead letter, its evidence trimmed if need be, and the DLQ
topic's max.message.bytes is the limit that decides. aiokafka's default, 1 MiB, refused a letter for a record of
just under 1 MiB on a topic that takes more, and nothing but a new build could change it."""


def build_durable_producer(settings: KafkaSettings, *, role: str, send_timeout_s: float) -> AIOKafkaProducer:
    """An idempotent acks=all producer, for writes that must be on the broker before an offset moves."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-{role}",
        acks="all",
        enable_idempotence=True,  # a retried send must not duplicate the record
        max_request_size=MAX_REQUEST_BYTES,
        request_timeout_ms=int(send_timeout_s * 1000),
        **security_options(settings),
    )


class KafkaDeadLetterProducer:
    """A durable producer whose `send` returns only once the broker has the dead letter."""

    def __init__(self, settings: KafkaSettings, send_timeout_s: float) -> None:
        self._settings = settings
        self._send_timeout_s = send_timeout_s
        self._producer = self._build()

    def _build(self) -> AIOKafkaProducer:
        return build_durable_producer(self._settings, role="dlq", send_timeout_s=self._send_timeout_s)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, letter: DeadLetter) -> None:
        producer = self._producer
        try:
            ack = await queue_record(
                producer,
                letter.topic,
                key=letter.key,
                value=letter.value,
                partition=letter.partition,
                timestamp_ms=letter.timestamp_ms,
                headers=list(letter.headers),
            )
        except (MessageSizeTooLargeError, RecordTooLargeError) as exc:
            # Refused by aiokafka before sending (over max_request_size): nothing left the process.
            raise self._too_large(letter, exc) from exc
        except KafkaError as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        try:
            await ack
        except (MessageSizeTooLargeError, RecordTooLargeError) as exc:
            # Refused by the broker (over the topic's max.message.bytes). The idempotent producer gave that batch a
            # sequence number, and the broker would refuse its next batch to the partition as out of order
            # (OutOfOrderSequenceNumber, for good): a new producer, with a new producer id, starts afresh.
            await self._renew(producer)
            raise self._too_large(letter, exc) from exc
        except KafkaError as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _too_large(letter: DeadLetter, exc: Exception) -> DeadLetterTooLarge:
        # The same letter fails the same way every time: no outage to wait out.
        return DeadLetterTooLarge(f"{type(exc).__name__}: {exc}", size=letter_size(letter), limit=MAX_REQUEST_BYTES)

    async def _renew(self, refused: AIOKafkaProducer) -> None:
        """Replace `refused` (unless another send did already). Letters it still holds fail or go through; a
        failure is retried by the writer, on the new producer."""
        if self._producer is not refused:
            return
        fresh = self._build()
        await fresh.start()
        self._producer = fresh
        try:
            await refused.stop()
        except KafkaError as exc:
            log.warning("the refused dead-letter producer did not stop cleanly", extra={"error": str(exc)})

    async def partition_count(self, topic: str) -> int:
        try:
            partitions = await self._producer.partitions_for(topic)
        except KafkaError as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        return len(partitions)


def letter_size(letter: DeadLetter) -> int:
    """The letter's size as aiokafka counts it against max_request_size."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(letter.key, letter.value, list(letter.headers))
    return size


async def queue_record(
    producer: AIOKafkaProducer,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    partition: int | None,
    timestamp_ms: int,
    headers: list[tuple[str, bytes | None]],
) -> asyncio.Future[Any]:
    """Queue a record as it was (a dead letter, a replay); returns the broker's acknowledgement to await, as
    `AIOKafkaProducer.send` does.

    aiokafka's `send` refuses a record with neither key nor value (`assert not (value is None and key is None)`),
    which Kafka accepts and a source topic may hold; a batch of one record does not, and the record stays as it
    was (a null value, not an empty one). A batch needs a partition: a keyless record has no order to keep, so when
    none is given the topic's first partition does.
    """
    if key is not None or value is not None:
        ack: asyncio.Future[Any] = await producer.send(
            topic, value=value, key=key, partition=partition, timestamp_ms=timestamp_ms, headers=headers
        )
        return ack
    if partition is None:
        partition = min(await producer.partitions_for(topic))
    batch = producer.create_batch()
    if batch.append(key=None, value=None, timestamp=timestamp_ms, headers=headers) is None:
        # Only a closed batch refuses its first record, whatever its size; said as aiokafka says a refusal.
        raise RecordTooLargeError("a record with no key and no value did not fit an empty batch")
    queued: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
    return queued
