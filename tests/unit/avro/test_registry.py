"""The schema registry client: one request per id, shared in-flight lookups, and how answers are classified."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest

from service.avro.registry import ACCEPT, SchemaRegistry
from service.core.errors import DecodeError, RegistryUnavailable

SCHEMA = {
    "type": "record",
    "name": "LogUpdate",
    "namespace": "ai.inference_bridge",
    "fields": [{"name": "reference_id", "type": "string"}],
}
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def found(schema: object = SCHEMA, **extra: object) -> httpx.Response:
    text = schema if isinstance(schema, str) else orjson.dumps(schema).decode()
    return httpx.Response(200, json={"schema": text, **extra})


class Recorder:
    """A MockTransport handler that records requests and answers with `respond` (replaceable per test)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.respond: Handler = self._found

    async def _found(self, request: httpx.Request) -> httpx.Response:
        return found()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.respond(request)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(recorder: Recorder) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder)) as client:
        yield client


@pytest.fixture
def registry(client: httpx.AsyncClient) -> SchemaRegistry:
    return SchemaRegistry(client, "http://registry.test/base/")


def answer(response: httpx.Response) -> Handler:
    async def respond(request: httpx.Request) -> httpx.Response:
        return response

    return respond


def fail_with(exc: Exception) -> Handler:
    async def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    return respond


async def test_lookup_sends_the_documented_request(registry: SchemaRegistry, recorder: Recorder) -> None:
    parsed = await registry.writer_schema(7)
    assert parsed["name"] == "ai.inference_bridge.LogUpdate"
    (request,) = recorder.requests
    assert request.method == "GET"
    assert str(request.url) == "http://registry.test/base/schemas/ids/7"
    assert request.headers["Accept"] == ACCEPT
    assert "Authorization" not in request.headers


async def test_basic_auth_is_sent_when_configured(client: httpx.AsyncClient, recorder: Recorder) -> None:
    registry = SchemaRegistry(client, "http://registry.test", username="svc", password="s3cret")
    await registry.writer_schema(1)
    expected = "Basic " + base64.b64encode(b"svc:s3cret").decode()
    assert recorder.requests[0].headers["Authorization"] == expected


async def test_each_id_is_fetched_once(registry: SchemaRegistry, recorder: Recorder) -> None:
    first = await registry.writer_schema(1)
    for _ in range(3):
        assert await registry.writer_schema(1) is first
    await registry.writer_schema(2)
    assert [r.url.path for r in recorder.requests] == ["/base/schemas/ids/1", "/base/schemas/ids/2"]


async def test_concurrent_lookups_of_one_id_share_one_request(registry: SchemaRegistry, recorder: Recorder) -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return found()

    recorder.respond = slow
    waiters = [asyncio.create_task(registry.writer_schema(5)) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters)
    assert len(recorder.requests) == 1
    assert all(result is results[0] for result in results)


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup(
    registry: SchemaRegistry, recorder: Recorder
) -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return found()

    recorder.respond = slow
    impatient = asyncio.create_task(registry.writer_schema(5))
    patient = asyncio.create_task(registry.writer_schema(5))
    await asyncio.sleep(0)
    impatient.cancel()
    release.set()
    assert (await patient)["name"] == "ai.inference_bridge.LogUpdate"
    assert impatient.cancelled()
    assert len(recorder.requests) == 1


async def test_concurrent_failures_reach_every_caller_and_are_not_cached(
    registry: SchemaRegistry, recorder: Recorder
) -> None:
    recorder.respond = answer(httpx.Response(503, text="down"))
    results = await asyncio.gather(*(registry.writer_schema(9) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(result, RegistryUnavailable) for result in results)
    assert len(recorder.requests) == 1
    recorder.respond = answer(found())
    assert (await registry.writer_schema(9))["type"] == "record"
    assert len(recorder.requests) == 2


async def test_unknown_id_is_a_decode_error(registry: SchemaRegistry, recorder: Recorder) -> None:
    recorder.respond = answer(httpx.Response(404, json={"error_code": 40403, "message": "Schema not found"}))
    with pytest.raises(DecodeError) as caught:
        await registry.writer_schema(42)
    assert caught.value.reason == "unknown-schema-id"
    assert "42" in caught.value.message
    assert "Schema not found" in caught.value.message


async def test_a_404_from_something_that_is_not_a_registry_is_retryable(
    registry: SchemaRegistry, recorder: Recorder
) -> None:
    # A mistyped registry URL must not dead-letter the whole topic as "unknown schema id".
    recorder.respond = answer(httpx.Response(404, text="<html>Not Found</html>"))
    with pytest.raises(RegistryUnavailable) as caught:
        await registry.writer_schema(42)
    assert "404" in caught.value.message


@pytest.mark.parametrize("status", [500, 502, 503, 504, 401, 403, 429])
async def test_statuses_that_are_not_the_records_fault_are_retryable(
    registry: SchemaRegistry, recorder: Recorder, status: int
) -> None:
    recorder.respond = answer(httpx.Response(status, text="nope"))
    with pytest.raises(RegistryUnavailable) as caught:
        await registry.writer_schema(3)
    assert str(status) in caught.value.message
    assert not isinstance(caught.value, DecodeError)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
    ids=lambda exc: type(exc).__name__,
)
async def test_transport_failures_are_retryable(
    registry: SchemaRegistry, recorder: Recorder, exc: httpx.RequestError
) -> None:
    recorder.respond = fail_with(exc)
    with pytest.raises(RegistryUnavailable) as caught:
        await registry.writer_schema(3)
    assert caught.value.__cause__ is exc


async def test_messages_never_show_credentials_from_the_url(client: httpx.AsyncClient, recorder: Recorder) -> None:
    registry = SchemaRegistry(client, "http://svc:hunter2@registry.test")
    recorder.respond = answer(httpx.Response(503))
    with pytest.raises(RegistryUnavailable) as caught:
        await registry.writer_schema(3)
    assert "hunter2" not in caught.value.message
    assert "registry.test" in caught.value.message


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>proxy login</html>"),
        httpx.Response(200, json={"id": 3}),
        found(schemaType="PROTOBUF"),
        found(schemaType="JSON"),
        found(references=[{"name": "Other", "subject": "other", "version": 1}]),
        found("{not json"),
        found({"type": "record", "name": "Broken", "fields": [{"name": "x", "type": "no_such_type"}]}),
        found('"string"'),
    ],
    ids=["html", "no-schema", "protobuf", "json-schema", "references", "bad-text", "bad-avro", "not-a-record"],
)
async def test_answers_that_hold_no_usable_avro_record_are_unsupported(
    registry: SchemaRegistry, recorder: Recorder, response: httpx.Response
) -> None:
    recorder.respond = answer(response)
    with pytest.raises(DecodeError) as caught:
        await registry.writer_schema(3)
    assert caught.value.reason == "unsupported-schema"
    assert "3" in caught.value.message
