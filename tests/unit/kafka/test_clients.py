"""The one aiokafka factory: settings mapped to aiokafka's arguments (checked against aiokafka itself), TLS
contexts proven by a handshake with a server on 127.0.0.1, SASL passwords from values or files, no secret in a
repr or a log line, and the dead-letter producer's errors as `TransientError`. A real broker is in
tests/integration/test_kafka_security.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import ConsumerRecord

from service.config.kafka import KafkaSettings
from service.core.errors import TransientError
from service.core.records import SourceRecord
from service.kafka import clients
from service.kafka.clients import (
    KafkaDeadLetterProducer,
    build_consumer,
    build_durable_producer,
    build_reader,
    group_timeouts,
    revoke_drain_s,
    security_options,
    to_source_record,
)
from service.kafka.deadletter import DeadLetter, DeadLetterTooLarge
from tests.support.tls import TlsFiles, generate_tls

PASSWORD = "s3cr3t-kafka-password"  # a test value


def kafka(**values: Any) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers="broker-1:9092,broker-2:9092", **values)


def sasl(protocol: str = "SASL_PLAINTEXT", **values: Any) -> KafkaSettings:
    return kafka(
        security_protocol=protocol,
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="bridge",
        **({"sasl_password": PASSWORD} | values),
    )


# --- records ---------------------------------------------------------------------------------------------------------


def test_a_fetched_record_becomes_a_source_record_with_bytes_headers() -> None:
    fetched = ConsumerRecord(
        "inferences", 3, 42, 1_700_000_000_000, 0, b"k", b"v", None, 1, 1, (("a", bytearray(b"x")), ("b", b"y"))
    )

    record = to_source_record(fetched)

    assert record == SourceRecord("inferences", 3, 42, b"k", b"v", (("a", b"x"), ("b", b"y")), 1_700_000_000_000)
    assert all(type(value) is bytes for _, value in record.headers)


def test_a_header_without_a_value_stays_so() -> None:
    """Kafka allows one; `bytes(None)` stopped the service on such a record, on every restart."""
    fetched = ConsumerRecord("t", 0, 0, 5, 0, None, b"v", None, 0, 0, [("a", None), ("b", b"y")])

    assert to_source_record(fetched).headers == (("a", None), ("b", b"y"))


def test_a_record_without_headers_has_an_empty_tuple() -> None:
    fetched = ConsumerRecord("t", 0, 0, 5, 0, None, None, None, 0, 0, [])
    assert to_source_record(fetched).headers == ()


# --- security options ------------------------------------------------------------------------------------------------


def test_plaintext_is_only_the_protocol() -> None:
    assert security_options(kafka()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_passes_mechanism_user_and_the_password_itself_and_no_tls() -> None:
    assert security_options(sasl()) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "bridge",
        "sasl_plain_password": PASSWORD,
    }


def test_a_password_file_gives_the_same_options_as_the_value(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")  # as `echo` or an editor leaves it

    from_file = sasl(sasl_password=None, sasl_password_file=secret)

    assert security_options(from_file) == security_options(sasl())


def test_sasl_ssl_has_both_a_tls_context_and_the_sasl_options() -> None:
    options = security_options(sasl("SASL_SSL"))
    assert isinstance(options.pop("ssl_context"), ssl.SSLContext)
    assert options == security_options(sasl()) | {"security_protocol": "SASL_SSL"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return generate_tls(tmp_path_factory.mktemp("tls"))


class TlsServer:
    """A TLS listener on 127.0.0.1 with the test broker's certificate; records each client's certificate name."""

    def __init__(self, tls: TlsFiles, *, require_client_cert: bool) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_cert)
        self.context.load_cert_chain(tls.broker_cert, tls.broker_keystore)
        self.context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        self.clients: list[str] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        self.clients.append(dict(field[0] for field in peer.get("subject", ())).get("commonName", ""))
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    async def greeting(self, context: ssl.SSLContext) -> bytes:
        """Connect as the Kafka client would (TLS to the broker's host name) and read what the server says."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=context, server_hostname="localhost")
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def tls_server(tls: TlsFiles, *, require_client_cert: bool = False) -> AsyncIterator[TlsServer]:
    server = TlsServer(tls, require_client_cert=require_client_cert)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=server.context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


async def test_ssl_trusts_the_configured_ca(tls: TlsFiles) -> None:
    context = security_options(kafka(security_protocol="SSL", ssl_cafile=str(tls.ca_cert)))["ssl_context"]
    async with tls_server(tls) as server:
        assert await server.greeting(context) == b"hello"


async def test_ssl_without_a_ca_file_trusts_only_the_system_cas(tls: TlsFiles) -> None:
    context = security_options(kafka(security_protocol="SSL"))["ssl_context"]
    async with tls_server(tls) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await server.greeting(context)


async def test_ssl_checks_the_broker_certificate_against_the_ca(tls: TlsFiles) -> None:
    context = security_options(kafka(security_protocol="SSL", ssl_cafile=str(tls.other_ca_cert)))["ssl_context"]
    async with tls_server(tls) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await server.greeting(context)


async def test_mutual_tls_presents_the_client_certificate(tls: TlsFiles) -> None:
    settings = kafka(
        security_protocol="SSL",
        ssl_cafile=str(tls.ca_cert),
        ssl_certfile=str(tls.client_cert),
        ssl_keyfile=str(tls.client_key),
    )
    async with tls_server(tls, require_client_cert=True) as server:
        assert await server.greeting(security_options(settings)["ssl_context"]) == b"hello"
    assert server.clients == ["inference-bridge"]


def test_an_encrypted_client_key_fails_with_the_setting_to_fix_instead_of_prompting(tls: TlsFiles) -> None:
    settings = kafka(
        security_protocol="SSL",
        ssl_cafile=str(tls.ca_cert),
        ssl_certfile=str(tls.client_cert),
        ssl_keyfile=str(tls.client_key_encrypted),
    )
    with pytest.raises(OSError, match="BRIDGE_KAFKA__SSL_KEYFILE must be an unencrypted PEM key") as failure:
        security_options(settings)
    assert f"the client key {tls.client_key_encrypted} is encrypted" in str(failure.value)


# --- the clients -----------------------------------------------------------------------------------------------------


class Recorder:
    """Stands in for an aiokafka class: records the arguments, and builds the real one with them so a misspelt
    or refused argument fails here as it would in the service."""

    def __init__(self, real: type[Any]) -> None:
        self.real = real
        self.kwargs: dict[str, Any] = {}
        self.built: list[Any] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.kwargs = kwargs
        client = self.real(**kwargs)
        self.built.append(client)
        return client

    async def close(self) -> None:
        for client in self.built:
            await client.stop()


@pytest.fixture
async def consumer_class(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Recorder]:
    recorder = Recorder(AIOKafkaConsumer)
    monkeypatch.setattr(clients, "AIOKafkaConsumer", recorder)
    yield recorder
    await recorder.close()


@pytest.fixture
async def producer_class(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Recorder]:
    recorder = Recorder(AIOKafkaProducer)
    monkeypatch.setattr(clients, "AIOKafkaProducer", recorder)
    yield recorder
    await recorder.close()


async def test_the_consumer_never_auto_commits_and_takes_every_group_and_fetch_setting(
    consumer_class: Recorder,
) -> None:
    settings = sasl(
        group_id="g",
        client_id="c",
        auto_offset_reset="latest",
        session_timeout_ms=30_000,
        heartbeat_interval_ms=2_000,
        max_poll_interval_ms=60_000,
        max_poll_records=77,
        fetch_max_bytes=4096,
        max_partition_fetch_bytes=2048,
    )

    build_consumer(settings)

    assert consumer_class.kwargs == {
        "bootstrap_servers": "broker-1:9092,broker-2:9092",
        "group_id": "g",
        "client_id": "c",
        "enable_auto_commit": False,
        "auto_offset_reset": "latest",
        "session_timeout_ms": 30_000,
        "heartbeat_interval_ms": 2_000,
        "max_poll_interval_ms": 60_000,
        "max_poll_records": 77,
        "fetch_max_bytes": 4096,
        "max_partition_fetch_bytes": 2048,
        "rebalance_timeout_ms": 30_000,
        "request_timeout_ms": 40_000,
        **security_options(settings),
    }


@pytest.mark.parametrize("session_timeout_ms", [1_000, 6_000, 35_000, 45_000, 46_000, 120_000])
async def test_a_join_group_held_for_the_whole_rebalance_timeout_does_not_time_out_on_the_client(
    consumer_class: Recorder, session_timeout_ms: int
) -> None:
    """Read from the consumer aiokafka built: the rebalance timeout its JoinGroup requests carry (the broker
    may hold the response that long) and the one timeout its connections give every request, JoinGroup
    included. The second must outlast the first by Kafka's Java client's margin (5 s), and never drop
    below aiokafka's own default, which the other requests (fetch, commit, heartbeat) keep."""
    aiokafka_default = inspect.signature(AIOKafkaConsumer).parameters["request_timeout_ms"].default

    build_consumer(kafka(session_timeout_ms=session_timeout_ms))

    consumer = consumer_class.built[-1]
    rebalance_timeout_ms = consumer._rebalance_timeout_ms
    request_timeout_ms = consumer._client._request_timeout_ms
    assert rebalance_timeout_ms == session_timeout_ms  # aiokafka's default for it, unchanged
    assert request_timeout_ms >= rebalance_timeout_ms + 5_000
    assert request_timeout_ms == max(aiokafka_default, rebalance_timeout_ms + 5_000)


@pytest.mark.parametrize(
    ("session_timeout_ms", "drain_timeout_s", "expected_s"),
    [
        (45_000, 20.0, 20.0),  # the defaults: the whole drain fits the rebalance
        (45_000, 60.0, 40.0),  # a longer drain is cut to what the rebalance leaves after the rejoin margin
        (6_000, 20.0, 1.0),  # a short session for a quick failover: a short revoke drain
        (6_000, 0.5, 0.5),
        (5_000, 20.0, 0.0),  # no time left for a drain at all: calls in flight are cancelled at once
        (1_000, 20.0, 0.0),
    ],
)
def test_a_revoke_drains_only_as_long_as_the_rebalance_waits_for_the_member(
    session_timeout_ms: int, drain_timeout_s: float, expected_s: float
) -> None:
    settings = kafka(session_timeout_ms=session_timeout_ms)
    drain_s = revoke_drain_s(settings, drain_timeout_s)

    assert drain_s == pytest.approx(expected_s)
    assert drain_s <= drain_timeout_s
    rebalance_s = group_timeouts(settings)["rebalance_timeout_ms"] / 1000
    assert drain_s == 0.0 or drain_s + 5.0 <= rebalance_s  # room left to commit and rejoin


async def test_a_reader_joins_no_group_and_reads_from_the_start(consumer_class: Recorder) -> None:
    build_reader(kafka(client_id="c", auto_offset_reset="latest"), role="replay")

    assert consumer_class.kwargs["group_id"] is None  # aiokafka refuses a commit without a group
    assert consumer_class.kwargs["client_id"] == "c-replay"
    assert consumer_class.kwargs["auto_offset_reset"] == "earliest"
    assert consumer_class.kwargs["enable_auto_commit"] is False


async def test_the_durable_producer_is_idempotent_and_waits_for_all_replicas(producer_class: Recorder) -> None:
    build_durable_producer(sasl("SASL_SSL", client_id="c"), role="dlq", send_timeout_s=2.5)

    kwargs = producer_class.kwargs
    assert (kwargs["acks"], kwargs["enable_idempotence"]) == ("all", True)
    assert kwargs["request_timeout_ms"] == 2500
    assert kwargs["client_id"] == "c-dlq"
    assert kwargs["sasl_plain_password"] == PASSWORD
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


async def test_no_secret_in_the_settings_repr_or_in_what_building_the_clients_logs(
    consumer_class: Recorder, producer_class: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sasl("SASL_SSL")
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)

    with caplog.at_level(logging.DEBUG):
        build_consumer(settings)
        build_reader(settings, role="replay")
        build_durable_producer(settings, role="dlq", send_timeout_s=1.0)
        for client in consumer_class.built + producer_class.built:
            await client.stop()

    assert caplog.records, "nothing logged at DEBUG: the check would prove nothing"
    assert not [r for r in caplog.records if PASSWORD in r.getMessage() or PASSWORD in str(r.__dict__)]


# --- the dead-letter producer ----------------------------------------------------------------------------------------


class FakeBatch:
    """aiokafka's BatchBuilder: takes a record with neither key nor value, as the real one does."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, *, timestamp: int, key: bytes | None, value: bytes | None, headers: list[Any]) -> object:
        self.records.append({"value": value, "key": key, "timestamp_ms": timestamp, "headers": headers})
        return object()


class FakeProducer:
    """aiokafka's producer methods the dead-letter producer calls; each can be told to raise."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.error: Exception | None = None
        """Raised by `send` itself, as aiokafka refuses before sending."""
        self.broker_error: Exception | None = None
        """The acknowledgement's failure, as the broker answers."""
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, **kwargs: Any) -> asyncio.Future[None]:
        assert not (kwargs["value"] is None and kwargs["key"] is None), "Need at least one: key or value"  # aiokafka
        if self.error is not None:
            raise self.error
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.broker_error is not None:
            ack.set_exception(self.broker_error)
        else:
            self.sent.append((topic, kwargs))
            ack.set_result(None)
        return ack

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[None]:
        if self.error is not None:
            raise self.error
        [record] = batch.records
        self.sent.append((topic, {**record, "partition": partition}))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    async def partitions_for(self, topic: str) -> set[int]:
        if self.error is not None:
            raise self.error
        return {0, 1, 2}


@pytest.fixture
def made_producers(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    """Every producer built, in order."""
    made: list[FakeProducer] = []

    def build(**kwargs: Any) -> FakeProducer:
        made.append(FakeProducer(**kwargs))
        return made[-1]

    monkeypatch.setattr(clients, "AIOKafkaProducer", build)
    return made


@pytest.fixture
def fake_producer(made_producers: list[FakeProducer]) -> Callable[[], FakeProducer]:
    """The last producer built."""
    return lambda: made_producers[-1]


LETTER = DeadLetter(
    topic="inferences.dlq",
    partition=4,
    key=b"k",
    value=b"v",
    headers=(("bridge.reason", b"schema-mismatch"),),
    timestamp_ms=1_700_000_000_000,
)


async def test_a_dead_letter_is_sent_whole_to_its_partition(fake_producer: Callable[[], FakeProducer]) -> None:
    producer = KafkaDeadLetterProducer(kafka(), send_timeout_s=1.0)
    await producer.start()
    await producer.send(LETTER)
    await producer.stop()

    fake = fake_producer()
    assert (fake.started, fake.stopped) == (True, True)
    assert fake.sent == [
        (
            "inferences.dlq",
            {
                "value": b"v",
                "key": b"k",
                "partition": 4,
                "timestamp_ms": 1_700_000_000_000,
                "headers": [("bridge.reason", b"schema-mismatch")],
            },
        )
    ]
    assert await producer.partition_count("inferences.dlq") == 3


@pytest.mark.parametrize("error", [KafkaTimeoutError(), UnknownTopicOrPartitionError()])
async def test_kafka_errors_become_transient_errors_naming_the_error(
    fake_producer: Callable[[], FakeProducer], error: Exception
) -> None:
    producer = KafkaDeadLetterProducer(kafka(), send_timeout_s=1.0)
    fake_producer().error = error

    with pytest.raises(TransientError, match=type(error).__name__):
        await producer.send(LETTER)
    with pytest.raises(TransientError, match=type(error).__name__):
        await producer.partition_count("inferences.dlq")


async def test_an_error_that_is_not_kafkas_is_not_hidden(fake_producer: Callable[[], FakeProducer]) -> None:
    producer = KafkaDeadLetterProducer(kafka(), send_timeout_s=1.0)
    fake_producer().error = TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        await producer.send(LETTER)


@pytest.mark.parametrize(("partition", "sent_to"), [(4, 4), (None, 0)])
async def test_a_letter_with_neither_key_nor_value_is_sent_as_it_is(
    fake_producer: Callable[[], FakeProducer], partition: int | None, sent_to: int
) -> None:
    # aiokafka's send() asserts a key or a value; a batch of one takes the record as the source topic held it.
    producer = KafkaDeadLetterProducer(kafka(), send_timeout_s=1.0)
    letter = dataclasses.replace(LETTER, key=None, value=None, partition=partition)

    await producer.send(letter)

    assert fake_producer().sent == [
        (
            "inferences.dlq",
            {
                "value": None,
                "key": None,
                "partition": sent_to,  # the first partition when the DLQ has not the source's
                "timestamp_ms": 1_700_000_000_000,
                "headers": [("bridge.reason", b"schema-mismatch")],
            },
        )
    ]


@pytest.mark.parametrize("error", [MessageSizeTooLargeError(), RecordTooLargeError()])
async def test_a_letter_too_large_is_not_an_outage(fake_producer: Callable[[], FakeProducer], error: Exception) -> None:
    producer = KafkaDeadLetterProducer(kafka(), send_timeout_s=1.0)
    fake_producer().error = error
    big = dataclasses.replace(LETTER, value=b"v" * 2_000_000)

    with pytest.raises(DeadLetterTooLarge, match=type(error).__name__) as info:
        await producer.send(big)

    assert info.value.size > 2_000_000
    # The broker's request limit: the DLQ topic's max.message.bytes decides, not a client default of 1 MiB.
    assert info.value.limit == 104_857_600 == fake_producer().kwargs["max_request_size"]


async def test_a_letter_the_broker_refuses_as_too_large_renews_the_producer(made_producers: list[FakeProducer]) -> None:
    """The idempotent producer gave the refused batch a sequence number, and the broker would refuse its next
    batch to that partition as out of order, for good: a new producer (a new producer id) sends the rest."""
    producer = KafkaDeadLetterProducer(kafka(), send_timeout_s=1.0)
    await producer.start()
    refused = made_producers[-1]
    refused.broker_error = RecordTooLargeError()

    with pytest.raises(DeadLetterTooLarge):
        await producer.send(LETTER)
    await producer.send(LETTER)

    assert len(made_producers) == 2
    assert (refused.stopped, made_producers[1].started) == (True, True)
    assert [topic for topic, _ in made_producers[1].sent] == ["inferences.dlq"]


async def test_a_letter_refused_before_sending_keeps_the_producer(made_producers: list[FakeProducer]) -> None:
    producer = KafkaDeadLetterProducer(kafka(), send_timeout_s=1.0)
    await producer.start()
    made_producers[-1].error = MessageSizeTooLargeError()

    with pytest.raises(DeadLetterTooLarge):
        await producer.send(LETTER)

    assert len(made_producers) == 1
    assert not made_producers[0].stopped


async def test_a_reader_reads_only_committed_records(consumer_class: Recorder) -> None:
    build_reader(kafka(), role="dlq")

    assert consumer_class.kwargs["isolation_level"] == "read_committed"
