"""The per-record logic end to end in memory: a fake decoder, the real Router, a real Delivery over a MockTransport
and a real DeadLetterWriter over an in-memory producer. Every record ends delivered or dead-lettered."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any

import httpx
import pytest

from service.apis.openlayer import stable_inference_id
from service.config.delivery import DeliverySettings
from service.config.kafka import TopicSettings
from service.core.errors import DeadLetterWriteError, DecodeError, RegistryUnavailable, RouteError, TransientError
from service.core.events import Event, EventKind, LogUpdate, NewInference, RowUpdate
from service.core.records import SourceRecord
from service.core.requests import Destination, RecordCoordinates
from service.http.batching import Batcher
from service.http.breaker import BreakerSettings
from service.http.client import HttpxClient
from service.http.delivery import Delivery, build_guard
from service.kafka.deadletter import DeadLetter, DeadLetterWriter
from service.ops.metrics import Metrics
from service.ops.redaction import Redactor
from service.pipeline import Pipeline, publish_batch
from service.streams import Router, by_topic

OL = "https://openlayer.test/v1"
HL = "https://humanloop.test/v4"
OL_KEY = "sk-ol-pipeline-test-key"
HL_KEY = "hl-pipeline-test-key"
PIPE = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
STREAMS = by_topic(TopicSettings())
KINDS = {topic: stream.kind for topic, stream in STREAMS.items()}
TOPIC_OF = {kind: topic for topic, kind in KINDS.items()}
TS_MS = 1_800_000_000_000

Outcome = Event | Exception


class FakeDecoder:
    """The Decoder Protocol in memory: returns or raises the scripted outcomes in order (the last one repeats)."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[EventKind, bytes | None]] = []

    async def decode(self, kind: EventKind, value: bytes | None) -> Event:
        self.calls.append((kind, value))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class FakeProducer:
    def __init__(self, *, failures: int = 0, gate: asyncio.Event | None = None) -> None:
        self.failures = failures
        self.gate = gate
        """When set, every send waits for it: a slow dead-letter topic."""
        self.sending = asyncio.Event()
        self.cancelled = asyncio.Event()
        """Set when a send waiting for the gate was cancelled."""
        self.acknowledged: list[DeadLetter] = []

    async def send(self, letter: DeadLetter) -> None:
        self.sending.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if self.failures:
            self.failures -= 1
            raise TransientError("broker unreachable")
        self.acknowledged.append(letter)

    async def partition_count(self, topic: str) -> int:
        return 3


def mocked_httpx_client(handler: Callable[[httpx.Request], httpx.Response]) -> HttpxClient:
    """The real `HttpxClient` over a MockTransport instead of a connection pool."""
    return HttpxClient(
        connect_timeout_s=5.0, read_timeout_s=30.0, max_connections=64, transport=httpx.MockTransport(handler)
    )


class Api:
    """Answers every call with the scripted responses in order (the last one repeats), or with `handler`,
    and records the calls."""

    def __init__(
        self,
        *responses: httpx.Response | Exception,
        handler: Callable[[httpx.Request], httpx.Response] | None = None,
    ) -> None:
        self.responses = list(responses) or [httpx.Response(200, json={"success": True})]
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.called = asyncio.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.called.set()
        if self.handler is not None:
            return self.handler(request)
        step = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(step, Exception):
            raise step
        return step


class Key:
    """A fixed API key (no file behind it)."""

    def __init__(self, value: str) -> None:
        self.value = value

    def reload(self) -> bool:
        return False


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _x_api_key(key: str) -> dict[str, str]:
    return {"x-api-key": key}


class _NoParking:
    """The consumer loop's lender, for records that never wait (these tests' APIs never answer "not yet")."""

    def park(self, offset: int) -> None:
        raise AssertionError("no record here parks")

    async def resume(self, offset: int) -> None:
        raise AssertionError("no record here parks")


LENDER = _NoParking()


class Bench:
    def __init__(
        self,
        decoder: FakeDecoder,
        api: Api,
        producer: FakeProducer,
        dlq_attempts: int = 3,
        backoff_s: tuple[float, float] = (0.001, 0.001),
    ) -> None:
        self.decoder = decoder
        self.api = api
        self.producer = producer
        self.metrics = Metrics()
        settings = DeliverySettings(initial_backoff_s=0.001, max_backoff_s=0.01, conflict_retries=0)
        rng = random.Random(9)
        fast = BreakerSettings(initial_pause_s=0.001, max_pause_s=0.01)
        guards = {
            Destination.OPENLAYER: build_guard(
                Destination.OPENLAYER, settings, Key(OL_KEY), _bearer, rng=rng, breaker=fast
            ),
            Destination.HUMANLOOP: build_guard(
                Destination.HUMANLOOP, settings, Key(HL_KEY), _x_api_key, rng=rng, breaker=fast
            ),
        }
        delivery = Delivery(
            mocked_httpx_client(api),
            settings,
            guards,
            rng=rng,
            instrumentation=self.metrics,
            wall_clock=lambda: 1_800_000_000.0,
        )
        router = Router(
            openlayer_base_url=OL,
            humanloop_base_url=HL,
            pipeline_configs={PIPE: {"outputColumnName": "output"}},
            default_config=None,
            inference_id_column="inference_id",
        )
        dead_letters = DeadLetterWriter(
            producer,
            topic_for=lambda topic: f"{topic}.dlq",
            group_id="bridge",
            redact=Redactor([OL_KEY, HL_KEY]),
            attempts=dlq_attempts,
            clock_ms=lambda: 1_800_000_000_000,
        )
        # Wired as app.py wires it: new inferences go through the batcher, whose flush is one Publish-records call.
        self.batcher = Batcher(
            partial(publish_batch, router, delivery), max_rows=50, max_bytes=1_000_000, linger_s=0.005
        )
        # By default registry retries pause about a millisecond.
        self.pipeline = Pipeline(
            decoder,
            router,
            delivery,
            dead_letters,
            self.batcher,
            STREAMS,
            rng=rng,
            initial_backoff_s=backoff_s[0],
            max_backoff_s=backoff_s[1],
            instrumentation=self.metrics,
        )

    async def process(self, record: SourceRecord) -> Hashable:
        """Prepare and run `record` as the consumer loop would; returns the work's ordering key."""
        work = await self.pipeline.prepare(record)
        await work.start(LENDER)
        return work.key

    def counted(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def dead_letter(self) -> dict[str, str]:
        [letter] = self.producer.acknowledged
        return {name: (value or b"").decode() for name, value in letter.headers}


def bench(*outcomes: Outcome, api: Api | None = None, producer: FakeProducer | None = None, **kw: Any) -> Bench:
    return Bench(FakeDecoder(*outcomes), api or Api(), producer or FakeProducer(), **kw)


def record(kind: EventKind = EventKind.INFERENCE, *, offset: int = 10, topic: str | None = None) -> SourceRecord:
    return SourceRecord(
        topic=topic or TOPIC_OF[kind],
        partition=1,
        offset=offset,
        key=b"k",
        value=b"\x00avro",
        headers=(("origin", b"test"),),
        timestamp_ms=TS_MS,
    )


PUBLISH = NewInference(pipeline_id=PIPE, row={"output": "42"}, inference_id="inf-1")
UPDATE_ROW = RowUpdate(pipeline_id=PIPE, inference_id="inf-1", row={"label": 1})
UPDATE_LOG = LogUpdate(reference_id="ref-1", output="Paris")


# --- delivered ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "kind", "method", "key"),
    [
        # Rows are ordered inside the batcher, so each gets a key of its own and rows can share a call.
        pytest.param(PUBLISH, EventKind.INFERENCE, "POST", None, id="publish"),
        pytest.param(UPDATE_ROW, EventKind.ROW_UPDATE, "PUT", f"{PIPE}/inf-1", id="update-row"),
        pytest.param(UPDATE_LOG, EventKind.LOG_UPDATE, "PATCH", "ref-1", id="update-log"),
    ],
)
async def test_a_good_record_is_delivered_and_keyed_by_what_it_addresses(
    event: Event, kind: EventKind, method: str, key: Hashable
) -> None:
    b = bench(event)

    work_key = await b.process(record(kind))

    assert work_key == key
    assert b.decoder.calls == [(kind, b"\x00avro")]
    assert [r.method for r in b.api.requests] == [method]
    assert b.producer.acknowledged == []
    assert b.counted("bridge_records_delivered_total", topic=TOPIC_OF[kind]) == 1


async def test_a_published_row_reaches_the_wire_with_its_id_and_config() -> None:
    b = bench(NewInference(pipeline_id=PIPE, row={"output": "42"}))

    await b.process(record(offset=10))

    [request] = b.api.requests
    assert request.url == f"{OL}/inference-pipelines/{PIPE}/data-stream"
    assert json.loads(request.content) == {
        "rows": [{"output": "42", "inference_id": stable_inference_id(RecordCoordinates("inferences", 1, 10, TS_MS))}],
        "config": {"outputColumnName": "output", "inferenceIdColumnName": "inference_id"},
    }


async def test_rows_running_together_share_one_call_in_offset_order() -> None:
    events = [NewInference(pipeline_id=PIPE, row={"n": n}, inference_id=f"inf-{n}") for n in range(5)]
    b = bench(*events)
    works = [await b.pipeline.prepare(record(offset=offset)) for offset in range(5)]

    await asyncio.gather(*(work.start(LENDER) for work in works))

    [request] = b.api.requests
    assert [row["n"] for row in json.loads(request.content)["rows"]] == [0, 1, 2, 3, 4]
    assert b.producer.acknowledged == []


async def test_in_a_shared_call_only_the_refused_row_is_dead_lettered() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        rows = json.loads(request.content)["rows"]
        if any(row.get("bad") for row in rows):
            return httpx.Response(422, json={"code": 422, "error": "bad row"})
        return httpx.Response(200, json={"success": True})

    events = [NewInference(pipeline_id=PIPE, row={"bad": n == 2}, inference_id=f"inf-{n}") for n in range(4)]
    b = bench(*events, api=Api(handler=api))
    works = [await b.pipeline.prepare(record(offset=offset)) for offset in range(4)]

    await asyncio.gather(*(work.start(LENDER) for work in works))

    [letter] = b.producer.acknowledged
    headers = {name: (value or b"").decode() for name, value in letter.headers}
    assert headers["__connect.errors.offset"] == "2"
    assert headers["bridge.http.status"] == "422"
    calls = [json.loads(r.content)["rows"] for r in b.api.requests]
    accepted = [row["inference_id"] for rows in calls if not any(row["bad"] for row in rows) for row in rows]
    assert sorted(accepted) == ["inf-0", "inf-1", "inf-3"]


async def test_prepare_only_decides_and_run_makes_the_call() -> None:
    b = bench(PUBLISH)

    work = await b.pipeline.prepare(record())
    assert b.api.requests == []

    await work.start(LENDER)
    assert len(b.api.requests) == 1


async def test_registry_retries_back_off_from_the_configured_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded(delay: float) -> None:
        pauses.append(delay)
        await real_sleep(0)

    outage = [RegistryUnavailable(f"registry: 503 #{n}") for n in range(4)]
    b = bench(*outage, UPDATE_LOG, backoff_s=(0.2, 0.5))
    monkeypatch.setattr(asyncio, "sleep", recorded)

    await b.pipeline.prepare(record(EventKind.LOG_UPDATE))

    # BRIDGE_DELIVERY__INITIAL_BACKOFF_S doubling up to MAX_BACKOFF_S, each jittered to 75-100%.
    for pause, base in zip(pauses, [0.2, 0.4, 0.5, 0.5], strict=True):
        assert 0.75 * base <= pause <= base


async def test_registry_unavailable_is_waited_out_not_dead_lettered() -> None:
    b = bench(RegistryUnavailable("registry: connect refused"), RegistryUnavailable("registry: 503"), UPDATE_LOG)

    key = await b.process(record(EventKind.LOG_UPDATE))

    assert len(b.decoder.calls) == 3
    assert key == "ref-1"
    assert len(b.api.requests) == 1
    assert b.producer.acknowledged == []


async def test_a_retryable_status_is_retried_not_dead_lettered() -> None:
    b = bench(PUBLISH, api=Api(httpx.Response(503), httpx.Response(200, json={"success": True})))

    await b.process(record())

    assert len(b.api.requests) == 2
    assert b.producer.acknowledged == []


# --- dead-lettered --------------------------------------------------------------------------------------------------


async def test_a_decode_error_dead_letters_without_a_call() -> None:
    b = bench(DecodeError("not an Avro record", reason="garbage-bytes"))

    key = await b.process(record(EventKind.ROW_UPDATE, offset=77))

    assert key is None  # waits for nothing and nothing waits for it
    assert b.api.requests == []
    headers = b.dead_letter()
    assert headers["bridge.reason"] == "garbage-bytes"
    assert headers["__connect.errors.stage"] == "VALUE_CONVERTER"
    assert headers["__connect.errors.exception.class.name"] == "DecodeError"
    assert headers["__connect.errors.offset"] == "77"
    letter = b.producer.acknowledged[0]
    assert (letter.topic, letter.value, letter.key) == ("inference-row-updates.dlq", b"\x00avro", b"k")
    labels = {"topic": "inference-row-updates", "reason": "garbage-bytes"}
    assert b.counted("bridge_records_dead_lettered_total", **labels) == 1


@pytest.mark.parametrize(
    ("event", "kind", "reason"),
    [
        pytest.param(
            RowUpdate(pipeline_id=PIPE, inference_id="i", row={}), EventKind.ROW_UPDATE, "row-empty", id="row"
        ),
        pytest.param(NewInference(pipeline_id="unknown", row={"a": 1}), EventKind.INFERENCE, "no-config", id="config"),
    ],
)
async def test_a_route_error_dead_letters_without_a_call(event: Event, kind: EventKind, reason: str) -> None:
    b = bench(event)

    key = await b.process(record(kind, offset=5))

    assert key is None  # a dead letter waits for nothing and nothing waits for it
    assert b.api.requests == []
    headers = b.dead_letter()
    assert headers["bridge.reason"] == reason
    assert headers["__connect.errors.stage"] == "TRANSFORMATION"


async def test_a_route_error_raised_by_the_decoder_dead_letters_too() -> None:
    b = bench(RouteError("config for task_type LLM has no outputColumnName", reason="invalid-config"))

    await b.process(record())

    assert b.dead_letter()["bridge.reason"] == "invalid-config"


async def test_a_422_dead_letters_with_the_evidence() -> None:
    answer = httpx.Response(
        422,
        json={"detail": [{"loc": ["body", "output"], "msg": "bad", "type": "x"}]},
        headers={"x-request-id": "req-1"},
    )
    b = bench(UPDATE_LOG, api=Api(answer))

    key = await b.process(record(EventKind.LOG_UPDATE))

    assert key == "ref-1"
    assert len(b.api.requests) == 1
    headers = b.dead_letter()
    assert headers["bridge.reason"] == "http-422"
    assert headers["__connect.errors.stage"] == "TASK_PUT"
    assert headers["__connect.errors.exception.class.name"] == "RejectedError"
    assert headers["bridge.http.status"] == "422"
    assert headers["bridge.http.method"] == "PATCH"
    assert headers["bridge.http.url"] == f"{HL}/logs?reference_id=ref-1"
    assert headers["bridge.http.response.header.x-request-id"] == "req-1"
    assert '"msg":"bad"' in headers["bridge.http.response.body"]
    assert all(HL_KEY.encode() not in (value or b"") for _, value in b.producer.acknowledged[0].headers)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(ValueError("fastavro blew up"), id="value-error"),
        pytest.param(KeyError("missing"), id="key-error"),
        pytest.param(AssertionError("invariant"), id="assertion"),
    ],
)
async def test_an_unexpected_decoder_exception_dead_letters_as_internal_error(failure: Exception) -> None:
    b = bench(failure)

    key = await b.process(record(offset=3))

    assert key is None
    headers = b.dead_letter()
    assert headers["bridge.reason"] == "internal-error"
    assert headers["__connect.errors.exception.class.name"] == "InternalError"
    assert headers["__connect.errors.exception.message"].startswith(f"{type(failure).__name__}: ")


async def test_a_record_from_an_unknown_topic_dead_letters_as_internal_error() -> None:
    b = bench(PUBLISH)

    await b.process(record(topic="surprise-topic"))

    assert b.decoder.calls == []
    assert b.dead_letter()["bridge.reason"] == "internal-error"
    assert b.producer.acknowledged[0].topic == "surprise-topic.dlq"


async def test_an_unexpected_exception_during_delivery_dead_letters_as_internal_error() -> None:
    b = bench(UPDATE_ROW, api=Api(RuntimeError("transport bug")))

    key = await b.process(record(EventKind.ROW_UPDATE))

    assert key == f"{PIPE}/inf-1"
    headers = b.dead_letter()
    assert headers["bridge.reason"] == "internal-error"
    assert "RuntimeError: transport bug" in headers["__connect.errors.exception.message"]


async def test_dead_letter_work_waits_for_no_other_record() -> None:
    b = bench(DecodeError("bad"))

    keys = {(await b.pipeline.prepare(record(offset=offset))).key for offset in range(5)}

    assert keys == {None}


async def test_a_dead_letter_that_is_never_acknowledged_stops_the_work() -> None:
    b = bench(DecodeError("bad"), producer=FakeProducer(failures=10), dlq_attempts=1)
    work = await b.pipeline.prepare(record())

    with pytest.raises(DeadLetterWriteError):
        await work.start(LENDER)

    assert b.producer.acknowledged == []


# --- batched rows whose record is cancelled or whose batch meets a bug --------------------------------------------


async def test_a_bug_in_a_batch_dead_letters_its_rows_as_internal_errors_with_the_traceback_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = bench(PUBLISH, api=Api(RuntimeError("the sink's client blew up")))

    await (await b.pipeline.prepare(record())).start(LENDER)

    assert b.dead_letter()["bridge.reason"] == "internal-error"
    [logged] = [r for r in caplog.records if r.getMessage() == "unexpected error publishing a record"]
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], RuntimeError)


async def test_a_row_cancelled_before_its_batch_closes_is_not_sent_nor_dead_lettered() -> None:
    # Refused with 422: were the cancelled row sent, it would be dead-lettered as well.
    events = [NewInference(pipeline_id=PIPE, row={"n": n}, inference_id=f"inf-{n}") for n in range(2)]
    b = bench(*events, api=Api(httpx.Response(422, json={"code": 422, "error": "bad row"})))
    cancelled = (await b.pipeline.prepare(record(offset=0))).start(LENDER)
    kept = (await b.pipeline.prepare(record(offset=1))).start(LENDER)

    cancelled.cancel()  # a stop or revoke before the batch closed: the record will be read again
    await asyncio.wait_for(kept, 10)
    await _quiet()

    assert [json.loads(r.content)["rows"] for r in b.api.requests] == [[{"n": 1, "inference_id": "inf-1"}]]
    assert [dict(letter.headers)["__connect.errors.offset"] for letter in b.producer.acknowledged] == [b"1"]


async def test_a_batch_in_flight_whose_records_were_all_cancelled_is_given_up() -> None:
    """Each revoke during an outage cancels the partition's records, and each re-read starts them again: the calls
    of the cancelled ones must not pile up, each waiting to send one more copy of the rows."""
    release = asyncio.Event()

    async def hung(request: httpx.Request) -> httpx.Response:  # an API that does not answer
        await release.wait()
        return httpx.Response(200, json={"success": True})

    b = bench(PUBLISH, api=Api(handler=hung))  # type: ignore[arg-type]
    for reads in range(1, 6):  # the partition read again after each revoke
        outcome = (await b.pipeline.prepare(record(offset=7))).start(LENDER)
        await asyncio.wait_for(_called(b, reads), 10)  # its batch's call is in flight
        outcome.cancel()
        await _quiet()  # the batch's task ended: nothing of the cancelled record is left running

    release.set()
    assert len(b.api.requests) == 5
    assert b.producer.acknowledged == []


async def _called(b: Bench, calls: int) -> None:
    while len(b.api.requests) < calls:
        await b.api.called.wait()
        b.api.called.clear()


async def test_cancelling_a_refused_row_cancels_its_dead_letter_write() -> None:
    gate = asyncio.Event()
    refusal = httpx.Response(422, json={"code": 422, "error": "bad row"})
    b = bench(PUBLISH, api=Api(refusal), producer=FakeProducer(gate=gate))
    outcome = (await b.pipeline.prepare(record())).start(LENDER)
    await asyncio.wait_for(b.producer.sending.wait(), 5)  # the dead-letter write is under way

    outcome.cancel()
    await asyncio.wait_for(b.producer.cancelled.wait(), 5)  # the write was cancelled where it waited
    gate.set()
    await _quiet()

    assert b.producer.acknowledged == []  # the write did not outlive its record


async def _sent(b: Bench) -> None:
    """Until the batch went out (its linger timer is no task to wait for)."""

    await asyncio.wait_for(b.api.called.wait(), 10)


async def _quiet() -> None:
    """Until no task but this test's is left and the callbacks of the last ones ran: whatever the records started
    has ended (a task still running, such as a dead-letter write outliving its record, fails the guard)."""

    test = asyncio.current_task()

    def others() -> set[asyncio.Task[Any]]:
        return asyncio.all_tasks() - {test, asyncio.current_task()}

    async def wait() -> None:
        while True:
            if running := others():
                await asyncio.wait(running)
            for _ in range(3):  # done callbacks, which may start new tasks
                await asyncio.sleep(0)
            if not others():
                return

    await asyncio.wait_for(wait(), 10)
