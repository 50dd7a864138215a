"""Dead letters keep the original record byte for byte, add Kafka Connect's context and the HTTP evidence with
secrets removed, and are acknowledged before anyone commits; a write that keeps failing is fatal."""

from __future__ import annotations

import pytest

from service.core.errors import (
    DeadLetterWriteError,
    DecodeError,
    HttpEvidence,
    InternalError,
    RecordError,
    RejectedError,
    RouteError,
    TransientError,
)
from service.core.records import SourceRecord
from service.kafka.deadletter import DeadLetter, DeadLetterTooLarge, DeadLetterWriter, build_dead_letter
from service.ops.redaction import REDACTED, Redactor

OL_KEY = "sk-ol-0123456789abcdef"
HL_KEY = "hl_sk_fedcba9876543210"
GROUP = "bridge-group"
NOW_MS = 1_800_000_000_123

RECORD = SourceRecord(
    topic="inferences",
    partition=2,
    offset=4711,
    key=b"\x00key-bytes",
    value=b"\x00\x00\x00\x00\x07avro-bytes\xff",
    headers=(("traceparent", b"00-abc-01"), ("producer", b"svc-a"), ("traceparent", b"dup")),
    timestamp_ms=1_700_000_000_000,
)

EVIDENCE = HttpEvidence(
    method="POST",
    url="https://openlayer.test/v1/inference-pipelines/p-1/data-stream",
    status=422,
    body='{"code":422,"error":"bad row"}',
    attempts=3,
    retry_after_s=None,
    headers={"content-type": "application/json", "x-request-id": "req-9"},
)


def letter_for(
    error: RecordError,
    *,
    record: SourceRecord = RECORD,
    dlq_partitions: int = 6,
    redact: Redactor | None = None,
) -> DeadLetter:
    return build_dead_letter(
        record,
        error,
        dlq_topic="inferences.dlq",
        dlq_partitions=dlq_partitions,
        group_id=GROUP,
        redact=redact or Redactor([OL_KEY, HL_KEY]),
        now_ms=NOW_MS,
    )


def added_headers(letter: DeadLetter, record: SourceRecord = RECORD) -> dict[str, str]:
    """The headers the bridge added (after the original ones), decoded."""
    assert letter.headers[: len(record.headers)] == record.headers
    added = letter.headers[len(record.headers) :]
    names = [name for name, _ in added]
    assert len(names) == len(set(names)), f"duplicate headers: {names}"
    return {name: (value or b"").decode() for name, value in added}


# --- the record itself ----------------------------------------------------------------------------------------


def test_the_original_record_is_kept_untouched() -> None:
    letter = letter_for(DecodeError("not avro"))

    assert letter.topic == "inferences.dlq"
    assert letter.key == RECORD.key
    assert letter.value == RECORD.value
    assert letter.timestamp_ms == RECORD.timestamp_ms
    assert letter.headers[: len(RECORD.headers)] == RECORD.headers


def test_a_tombstone_and_a_keyless_record_stay_so() -> None:
    record = SourceRecord("log-updates", 0, 1, key=None, value=None, headers=(), timestamp_ms=5)

    letter = letter_for(DecodeError("empty"), record=record)

    assert (letter.key, letter.value, letter.timestamp_ms) == (None, None, 5)


@pytest.mark.parametrize(
    ("source_partition", "dlq_partitions", "expected"),
    [
        pytest.param(2, 6, 2, id="dlq-has-more"),
        pytest.param(2, 3, 2, id="dlq-has-just-enough"),
        pytest.param(2, 2, None, id="dlq-has-exactly-that-many"),
        pytest.param(5, 1, None, id="dlq-has-fewer"),
        pytest.param(0, 1, 0, id="single-partition"),
        pytest.param(0, 0, None, id="unknown-count"),
    ],
)
def test_partition_is_kept_only_when_the_dlq_has_it(
    source_partition: int, dlq_partitions: int, expected: int | None
) -> None:
    record = SourceRecord("inferences", source_partition, 1, b"k", b"v", (), 1)

    letter = letter_for(DecodeError("x"), record=record, dlq_partitions=dlq_partitions)

    assert letter.partition == expected


# --- context headers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "stage", "class_name", "reason"),
    [
        pytest.param(DecodeError("bad magic byte"), "VALUE_CONVERTER", "DecodeError", "decode-failed", id="decode"),
        pytest.param(
            DecodeError("no such schema", reason="unknown-schema-id"),
            "VALUE_CONVERTER",
            "DecodeError",
            "unknown-schema-id",
            id="decode-with-reason",
        ),
        pytest.param(
            RouteError("no config", reason="no-config"), "TRANSFORMATION", "RouteError", "no-config", id="route"
        ),
        pytest.param(InternalError("KeyError: 'x'"), "TASK_PUT", "InternalError", "internal-error", id="internal"),
        pytest.param(
            RejectedError("PATCH answered 422", EVIDENCE, reason="http-422"),
            "TASK_PUT",
            "RejectedError",
            "http-422",
            id="rejected",
        ),
    ],
)
def test_kafka_connect_context_headers(error: RecordError, stage: str, class_name: str, reason: str) -> None:
    headers = added_headers(letter_for(error))

    connect = {name: value for name, value in headers.items() if name.startswith("__connect.errors.")}
    assert connect == {
        "__connect.errors.topic": "inferences",
        "__connect.errors.partition": "2",
        "__connect.errors.offset": "4711",
        "__connect.errors.connector.name": GROUP,
        "__connect.errors.stage": stage,
        "__connect.errors.class.name": "inference-bridge",
        "__connect.errors.exception.class.name": class_name,
        "__connect.errors.exception.message": str(error),
    }
    assert headers["bridge.reason"] == reason
    assert headers["bridge.failed.at.ms"] == str(NOW_MS)


def test_errors_without_a_response_carry_no_http_headers() -> None:
    headers = added_headers(letter_for(RouteError("row-empty")))

    assert not [name for name in headers if name.startswith("bridge.http.")]


def test_rejected_error_adds_the_http_evidence() -> None:
    headers = added_headers(letter_for(RejectedError("POST publish answered 422", EVIDENCE, reason="http-422")))

    http = {name: value for name, value in headers.items() if name.startswith("bridge.http.")}
    assert http == {
        "bridge.http.method": "POST",
        "bridge.http.url": EVIDENCE.url,
        "bridge.http.status": "422",
        "bridge.http.attempts": "3",
        "bridge.http.response.body": EVIDENCE.body,
        "bridge.http.response.header.content-type": "application/json",
        "bridge.http.response.header.x-request-id": "req-9",
    }


def test_evidence_without_a_status_has_an_empty_status_header() -> None:
    evidence = HttpEvidence(method="PUT", url="https://x.test/rows", status=None, attempts=7)

    headers = added_headers(letter_for(RejectedError("no answer", evidence)))

    assert headers["bridge.http.status"] == ""
    assert headers["bridge.http.attempts"] == "7"


def test_text_no_encoder_takes_is_written_replaced_not_raised() -> None:
    """A client may hand over a header value with lone surrogates (aiohttp keeps bytes that are not UTF-8 so): the
    letter must still be written, or the service stops on a record, again after every restart."""
    evidence = HttpEvidence(
        method="POST", url="https://x.test/rows", status=400, headers={"content-type": "text/plain; charset=\udce9"}
    )

    headers = added_headers(letter_for(RejectedError("refused", evidence, reason="http-400")))

    assert headers["bridge.http.response.header.content-type"] == "text/plain; charset=?"


def test_a_long_exception_message_is_truncated() -> None:
    headers = added_headers(letter_for(InternalError("x" * 10_000)))

    assert headers["__connect.errors.exception.message"] == "x" * 2000


# --- redaction ------------------------------------------------------------------------------------------------------


def test_secrets_are_removed_from_message_url_body_and_headers() -> None:
    evidence = HttpEvidence(
        method="PATCH",
        url=f"https://humanloop.test/v4/logs?api_key={HL_KEY}",
        status=401,
        body=f'{{"error": "key {OL_KEY} is not valid for {HL_KEY}"}}',
        attempts=1,
        headers={"x-request-id": f"echo-{OL_KEY}"},
    )
    error = RejectedError(f"refused with Authorization: Bearer {OL_KEY}", evidence, reason="http-401")

    letter = letter_for(error)

    for name, value in letter.headers:
        for secret in (OL_KEY, HL_KEY):
            assert secret.encode() not in (value or b""), name
    headers = added_headers(letter)
    assert headers["__connect.errors.exception.message"] == f"refused with Authorization: Bearer {REDACTED}"
    assert headers["bridge.http.url"] == f"https://humanloop.test/v4/logs?api_key={REDACTED}"
    assert headers["bridge.http.response.body"] == f'{{"error": "key {REDACTED} is not valid for {REDACTED}"}}'
    assert headers["bridge.http.response.header.x-request-id"] == f"echo-{REDACTED}"


def test_the_original_record_is_not_redacted() -> None:
    # The DLQ must replay exactly what the producer wrote, even if it (wrongly) contains a secret.
    record = SourceRecord("inferences", 0, 1, OL_KEY.encode(), OL_KEY.encode(), (("h", OL_KEY.encode()),), 1)

    letter = letter_for(DecodeError("x"), record=record)

    assert (letter.key, letter.value, letter.headers[0]) == (OL_KEY.encode(), OL_KEY.encode(), ("h", OL_KEY.encode()))


@pytest.mark.parametrize(
    ("secrets", "text", "expected"),
    [
        pytest.param(["abcd1234"], "x abcd1234 y abcd1234", f"x {REDACTED} y {REDACTED}", id="every-occurrence"),
        pytest.param(["abcd", "abcd1234"], "abcd1234", REDACTED, id="longest-first"),
        pytest.param(["abc"], "abc abc", "abc abc", id="too-short-to-redact"),
        pytest.param(["", "abcd"], "abcd", REDACTED, id="empty-secret-ignored"),
        pytest.param([], "nothing to hide", "nothing to hide", id="no-secrets"),
        pytest.param(["s3cret!"], "no match here", "no match here", id="absent"),
    ],
)
def test_redactor(secrets: list[str], text: str, expected: str) -> None:
    assert Redactor(secrets)(text) == expected


# --- the writer -----------------------------------------------------------------------------------------------------


class FakeProducer:
    """The DeadLetterProducer Protocol in memory: fails the first `failures` sends, like an unreachable broker."""

    def __init__(self, *, failures: int = 0, partitions: dict[str, int] | None = None) -> None:
        self.failures = failures
        self.partitions = {} if partitions is None else partitions
        self.attempts = 0
        self.acknowledged: list[DeadLetter] = []

    async def send(self, letter: DeadLetter) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise TransientError(f"NotLeaderForPartitionError (attempt {self.attempts})")
        self.acknowledged.append(letter)

    async def partition_count(self, topic: str) -> int:
        if topic not in self.partitions:
            raise TransientError(f"UnknownTopicOrPartitionError: {topic}")
        return self.partitions[topic]


def writer(producer: FakeProducer, *, attempts: int = 5) -> DeadLetterWriter:
    return DeadLetterWriter(
        producer,
        topic_for=lambda topic: f"{topic}.dlq",
        group_id=GROUP,
        redact=Redactor([OL_KEY]),
        attempts=attempts,
        clock_ms=lambda: NOW_MS,
    )


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the writer's pauses instead of waiting them out (2 s, 4 s, ... would make the tests slow).

    `service.kafka.deadletter.asyncio` is the asyncio module itself, so this patches `asyncio.sleep` for the
    duration of the test; nothing else in these tests sleeps."""
    pauses: list[float] = []

    async def no_sleep(delay: float) -> None:
        pauses.append(delay)

    monkeypatch.setattr("service.kafka.deadletter.asyncio.sleep", no_sleep)
    return pauses


async def test_write_sends_one_acknowledged_letter() -> None:
    producer = FakeProducer()

    await writer(producer).write(RECORD, DecodeError("not avro"))

    assert producer.attempts == 1
    [letter] = producer.acknowledged
    assert letter.topic == "inferences.dlq"
    assert letter.value == RECORD.value
    assert added_headers(letter)["bridge.failed.at.ms"] == str(NOW_MS)


async def test_without_prepare_the_partition_is_left_to_the_producer() -> None:
    producer = FakeProducer()

    await writer(producer).write(RECORD, DecodeError("x"))

    assert producer.acknowledged[0].partition is None


@pytest.mark.parametrize(("dlq_partitions", "expected"), [(6, 2), (2, None)])
async def test_prepare_learns_the_dlq_partition_counts(dlq_partitions: int, expected: int | None) -> None:
    producer = FakeProducer(partitions={"inferences.dlq": dlq_partitions, "log-updates.dlq": 1})
    w = writer(producer)

    await w.prepare(["inferences", "log-updates"])
    await w.write(RECORD, DecodeError("x"))

    assert producer.acknowledged[0].partition == expected


async def test_prepare_fails_when_a_dlq_is_not_usable() -> None:
    producer = FakeProducer(partitions={"inferences.dlq": 3})

    with pytest.raises(DeadLetterWriteError, match=r"log-updates\.dlq"):
        await writer(producer).prepare(["inferences", "log-updates"])


async def test_write_retries_then_succeeds(sleeps: list[float]) -> None:
    producer = FakeProducer(failures=2)

    await writer(producer, attempts=5).write(RECORD, RouteError("x"))

    assert producer.attempts == 3
    assert len(producer.acknowledged) == 1
    assert sleeps == [2.0, 4.0]


async def test_a_write_that_keeps_failing_is_fatal(sleeps: list[float]) -> None:
    producer = FakeProducer(failures=1000)

    with pytest.raises(DeadLetterWriteError) as info:
        await writer(producer, attempts=7).write(RECORD, RouteError("x"))

    assert producer.attempts == 7
    assert producer.acknowledged == []
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert isinstance(info.value.__cause__, TransientError)
    assert "inferences-2@4711" in str(info.value)
    assert "inferences.dlq" in str(info.value)


async def test_a_single_attempt_fails_without_waiting(sleeps: list[float]) -> None:
    producer = FakeProducer(failures=1)

    with pytest.raises(DeadLetterWriteError):
        await writer(producer, attempts=1).write(RECORD, RouteError("x"))

    assert producer.attempts == 1
    assert sleeps == []


# --- letters the producer refuses ------------------------------------------------------------------------------------


class RefusingProducer(FakeProducer):
    """Raises `errors` in turn on the first sends (an exception the producer should not raise, or a size refusal)."""

    def __init__(self, *errors: Exception) -> None:
        super().__init__()
        self.errors = list(errors)
        self.sent: list[DeadLetter] = []

    async def send(self, letter: DeadLetter) -> None:
        self.attempts += 1
        self.sent.append(letter)
        if self.errors:
            raise self.errors.pop(0)
        self.acknowledged.append(letter)


REJECTED = RejectedError(
    "PATCH update-log answered 422 after 3 attempt(s): " + "m" * 3000,
    HttpEvidence(method="PATCH", url="https://h.test/logs", status=422, body="b" * 4096, attempts=3),
    reason="http-422",
)


def too_large(size: int) -> DeadLetterTooLarge:
    return DeadLetterTooLarge("RecordTooLargeError: too big", size=size, limit=104_857_600)


async def test_an_exception_that_is_not_a_bridge_error_names_the_record_and_is_not_retried(
    sleeps: list[float],
) -> None:
    producer = RefusingProducer(AssertionError("Need at least one: key or value"))

    with pytest.raises(DeadLetterWriteError, match=r"inferences-2@4711.*AssertionError") as info:
        await writer(producer).write(RECORD, DecodeError("x", reason="empty-value"))

    assert producer.attempts == 1
    assert sleeps == []
    assert isinstance(info.value.__cause__, AssertionError)


async def test_a_letter_too_large_is_sent_again_at_once_with_its_evidence_trimmed(sleeps: list[float]) -> None:
    producer = RefusingProducer(too_large(1_050_000))

    await writer(producer).write(RECORD, REJECTED)

    assert producer.attempts == 2
    assert sleeps == []  # no backoff: the size is no outage
    full, trimmed = (added_headers(letter) for letter in producer.sent)
    assert "bridge.http.response.body" in full
    assert "bridge.evidence.trimmed" not in full
    assert "bridge.http.response.body" not in trimmed
    assert trimmed["bridge.evidence.trimmed"] == "true"
    assert len(trimmed["__connect.errors.exception.message"]) == 200
    for kept in ("bridge.reason", "__connect.errors.stage", "bridge.http.status", "__connect.errors.offset"):
        assert trimmed[kept] == full[kept]
    assert producer.acknowledged[0].value == RECORD.value  # the record itself is never trimmed


async def test_a_letter_too_large_even_trimmed_is_fatal_with_the_sizes_to_raise(sleeps: list[float]) -> None:
    producer = RefusingProducer(too_large(2_000_500), too_large(2_000_100))

    with pytest.raises(DeadLetterWriteError) as info:
        await writer(producer).write(RECORD, REJECTED)

    assert producer.attempts == 2
    assert sleeps == []
    message = str(info.value)
    assert "inferences-2@4711" in message
    assert "2000100 bytes" in message
    assert "max.message.bytes to at least 2000100" in message
    assert "'inferences.dlq'" in message
