"""Delivery over the real `HttpxClient` (and its exception conversion) with an `httpx.MockTransport` as the wire.

Backoffs and breaker pauses are a millisecond or so, so retries cost nothing; durations are never asserted, except
one lower bound that the code guarantees (a Retry-After pause cannot end early).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

import httpx
import pytest

from service.config.delivery import DeliverySettings
from service.core.errors import RejectedError
from service.core.events import Event, LogUpdate, NewInference, RowUpdate
from service.core.requests import ApiRequest, Destination, Endpoint, RecordCoordinates
from service.http import delivery as delivery_module
from service.http.breaker import BreakerSettings, BreakerState, Fault
from service.http.classify import backoff_s
from service.http.client import HttpxClient
from service.http.delivery import Delivery, DeliveryReport, Guard, build_guard
from service.ops.metrics import Metrics
from service.streams import Router

OL = "https://openlayer.test/v1"
HL = "https://humanloop.test/v4"
OL_KEY = "ol-test-key-1234"
HL_KEY = "hl-test-key-5678"
PIPE = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
NOW = 1_800_000_000.0
WHERE = RecordCoordinates("inferences", 0, 42, int(NOW * 1000))
ROUTER = Router(
    openlayer_base_url=OL,
    humanloop_base_url=HL,
    pipeline_configs={},
    default_config={"outputColumnName": "output"},
    inference_id_column="inference_id",
)

PUBLISH = NewInference(pipeline_id=PIPE, row={"output": "42"})
UPDATE_ROW = RowUpdate(pipeline_id=PIPE, inference_id="inf-1", row={"label": 1})
UPDATE_LOG = LogUpdate(reference_id="ref-1", output="Paris", duration=1.5)

Step = httpx.Response | Exception | Callable[[httpx.Request], Awaitable[httpx.Response]]


def req(event: Event) -> ApiRequest:
    return ROUTER.route(event, WHERE)


class Wire:
    """The other end of the MockTransport: answers with scripted steps (the last one repeats) and records calls."""

    def __init__(self, *steps: Step) -> None:
        assert steps
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []
        self.sent_at: list[float] = []
        self._arrived = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.sent_at.append(time.monotonic())
        self._arrived.set()
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, httpx.Response):
            return step
        if isinstance(step, Exception):
            raise step
        return await step(request)

    async def reached(self, count: int) -> None:
        """Return once `count` requests have arrived (guarded, so a hang fails instead of blocking)."""

        async def wait() -> None:
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(wait(), 10)

    @property
    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests]


def mocked_httpx_client(wire: Wire) -> HttpxClient:
    """The real `HttpxClient` over a MockTransport instead of a connection pool."""
    return HttpxClient(
        connect_timeout_s=5.0, read_timeout_s=30.0, max_connections=64, transport=httpx.MockTransport(wire)
    )


class Key:
    """A `KeySource` whose file holds `next_value` once set: what a rotated Secret looks like to delivery."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.next_value: str | None = None
        self.reloads = 0

    def reload(self) -> bool:
        self.reloads += 1
        if self.next_value is None or self.next_value == self.value:
            return False
        self.value = self.next_value
        return True


class Parked:
    """A `Parking` that records what the record did with its slots."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def park(self) -> None:
        self.events.append("park")

    async def resume(self) -> None:
        self.events.append("resume")


def fast_settings(**overrides: Any) -> DeliverySettings:
    values: dict[str, Any] = {"initial_backoff_s": 0.001, "max_backoff_s": 0.01}
    return DeliverySettings(**{**values, **overrides})


FAST_BREAKER = BreakerSettings(initial_pause_s=0.001, max_pause_s=0.01, stall_s=0.0)
"""Opens after three failures in a row (the stall rule with no wait), pauses a millisecond."""


class Harness:
    def __init__(
        self,
        wire: Wire,
        settings: DeliverySettings,
        wall_clock: Callable[[], float],
        breaker: BreakerSettings = FAST_BREAKER,
    ) -> None:
        self.wire = wire
        self.client = mocked_httpx_client(wire)
        self.keys = {Destination.OPENLAYER: Key(OL_KEY), Destination.HUMANLOOP: Key(HL_KEY)}
        self.pauses: dict[Destination, list[float]] = {dest: [] for dest in Destination}
        self.paused = {dest: asyncio.Event() for dest in Destination}
        """Set once a destination's limit was paused (a Retry-After)."""
        self.breaker_changes: list[tuple[Destination, BreakerState, Fault | None]] = []
        signs = {
            Destination.OPENLAYER: lambda key: {"authorization": f"Bearer {key}"},
            Destination.HUMANLOOP: lambda key: {"x-api-key": key},
        }
        self.guards: dict[Destination, Guard] = {}
        for dest in Destination:
            guard = build_guard(
                dest,
                settings,
                self.keys[dest],
                signs[dest],
                rng=random.Random(5),
                breaker=breaker,
                on_breaker=partial(self._breaker_changed, dest),
            )
            self.guards[dest] = guard
            self._record_pauses(dest, guard)
        self.breakers = {dest: guard.breaker for dest, guard in self.guards.items()}
        self.delivery = Delivery(
            self.client, settings, self.guards, rng=random.Random(3), instrumentation=Metrics(), wall_clock=wall_clock
        )

    def _breaker_changed(self, dest: Destination, state: BreakerState, why: Fault | None) -> None:
        self.breaker_changes.append((dest, state, why))

    def _record_pauses(self, dest: Destination, guard: Guard) -> None:
        pause_until = guard.limit.pause_until

        def recording(moment: float) -> None:
            self.pauses[dest].append(moment - time.monotonic())
            pause_until(moment)
            self.paused[dest].set()

        guard.limit.pause_until = recording  # type: ignore[method-assign]

    async def deliver(
        self, request: ApiRequest, timestamp_ms: int = WHERE.timestamp_ms, parking: Parked | None = None
    ) -> DeliveryReport:
        # A guard, not a timing assertion: a delivery that hangs fails here instead of at the global timeout.
        return await asyncio.wait_for(self.delivery.deliver(request, timestamp_ms, parking), 20)

    async def rejected(self, request: ApiRequest, timestamp_ms: int = WHERE.timestamp_ms) -> RejectedError:
        with pytest.raises(RejectedError) as info:
            await self.deliver(request, timestamp_ms)
        return info.value


def harness(
    *steps: Step,
    wall_clock: Callable[[], float] = lambda: NOW,
    breaker: BreakerSettings = FAST_BREAKER,
    **settings: Any,
) -> Harness:
    return Harness(Wire(*steps), fast_settings(**settings), wall_clock, breaker)


def ok() -> httpx.Response:
    return httpx.Response(200, json={"success": True})


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> httpx.Response:
    return httpx.Response(code, headers=headers, content=body)


# --- success ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", [PUBLISH, UPDATE_ROW, UPDATE_LOG], ids=["publish", "update-row", "update-log"])
async def test_success_on_the_first_try(event: Event) -> None:
    h = harness(ok())
    request = req(event)

    report = await h.deliver(request)

    assert report == DeliveryReport(status=200, attempts=1)
    assert len(h.wire.requests) == 1
    sent = h.wire.requests[0]
    assert sent.method == request.method
    assert str(sent.url.copy_with(query=None)) == request.url
    assert list(sent.url.params.multi_items()) == list(request.params)
    assert sent.content == request.body


@pytest.mark.parametrize("code", [201, 204])
async def test_any_2xx_is_success(code: int) -> None:
    assert await harness(status(code)).deliver(req(UPDATE_LOG)) == DeliveryReport(status=code, attempts=1)


async def test_503_503_200_is_delivered_after_three_attempts_with_the_same_body() -> None:
    h = harness(status(503), status(503), ok())

    report = await h.deliver(req(PUBLISH))

    assert report == DeliveryReport(status=200, attempts=3)
    assert len(h.wire.requests) == 3
    bodies = h.wire.bodies
    assert bodies[0] == bodies[1] == bodies[2], "a retried publish must carry the same inference id"


@pytest.mark.parametrize("code", [408, 425, 429, 500, 502, 503, 504, 529, 599])
async def test_retryable_statuses_are_retried(code: int) -> None:
    h = harness(status(code), ok())

    assert await h.deliver(req(UPDATE_ROW)) == DeliveryReport(status=200, attempts=2)


async def test_a_long_outage_is_waited_out_never_rejected() -> None:
    # Far beyond the breaker threshold: the breaker opens, probes, re-opens, and still nothing is rejected.
    steps: list[Step] = []
    steps += [status(503)] * 12
    steps += [httpx.ConnectError("refused")] * 5
    steps += [status(502)] * 5
    steps.append(ok())
    h = harness(*steps)

    report = await h.deliver(req(UPDATE_LOG))

    assert report == DeliveryReport(status=200, attempts=23)
    assert h.breakers[Destination.HUMANLOOP].state is BreakerState.CLOSED
    changes = [(state, why) for _, state, why in h.breaker_changes]
    assert (BreakerState.OPEN, Fault.OUTAGE) in changes
    assert changes[-1] == (BreakerState.CLOSED, None)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(httpx.ConnectError("connection refused"), id="connect-error"),
        pytest.param(httpx.ConnectTimeout("connect timed out"), id="connect-timeout"),
        pytest.param(httpx.ReadTimeout("read timed out"), id="read-timeout"),
        pytest.param(httpx.ReadError("connection reset by peer"), id="reset"),
        pytest.param(httpx.RemoteProtocolError("server disconnected"), id="disconnect"),
        pytest.param(httpx.WriteError("broken pipe"), id="write-error"),
    ],
)
async def test_transport_failures_are_retried_then_succeed(failure: Exception) -> None:
    h = harness(failure, failure, ok())

    report = await h.deliver(req(PUBLISH))

    assert report == DeliveryReport(status=200, attempts=3)
    assert h.pauses[Destination.OPENLAYER] == [], "no Retry-After, no destination pause"


# --- Retry-After --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "pause"),
    [
        pytest.param({"retry-after": "0.05"}, 0.05, id="seconds"),
        pytest.param({"retry-after-ms": "50"}, 0.05, id="milliseconds"),
    ],
)
async def test_429_retry_after_is_honoured(headers: dict[str, str], pause: float) -> None:
    h = harness(status(429, headers), ok())

    report = await h.deliver(req(UPDATE_ROW))

    assert report == DeliveryReport(status=200, attempts=2)
    assert h.pauses[Destination.OPENLAYER] == [pytest.approx(pause, abs=0.005)]
    assert h.breakers[Destination.OPENLAYER].state is BreakerState.CLOSED, "a rate limit is not an outage"
    # A lower bound only, which the limiter guarantees: the retry cannot leave before the pause is over.
    assert h.wire.sent_at[1] - h.wire.sent_at[0] >= pause


async def test_retry_after_as_an_http_date_is_read_against_the_wall_clock() -> None:
    date = "Fri, 15 Jan 2027 08:00:01 GMT"  # 1_800_000_001
    h = harness(status(503, {"retry-after": date}), ok(), wall_clock=lambda: NOW + 0.97)

    await h.deliver(req(UPDATE_LOG))

    assert h.pauses[Destination.HUMANLOOP] == [pytest.approx(0.03, abs=0.005)]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"retry-after": "3600"}, id="seconds"),
        pytest.param({"retry-after-ms": "3600000"}, id="milliseconds"),
        pytest.param({"retry-after": "Sat, 01 Jan 2050 00:00:00 GMT"}, id="far-date"),
    ],
)
async def test_retry_after_is_capped(headers: dict[str, str]) -> None:
    h = harness(status(429, headers), ok(), retry_after_cap_s=0.02)

    report = await h.deliver(req(PUBLISH))

    assert report.attempts == 2
    assert h.pauses[Destination.OPENLAYER] == [pytest.approx(0.02, abs=0.005)]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"retry-after": "0"}, id="zero"),
        pytest.param({"retry-after-ms": "0"}, id="zero-ms"),
        pytest.param({"retry-after": "-5"}, id="negative"),
        pytest.param({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}, id="past-date"),
    ],
)
async def test_a_retry_after_of_nothing_backs_off_instead_of_retrying_at_once(
    headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    backoffs: list[int] = []

    def counted(attempt: int, initial_s: float, cap_s: float, rng: random.Random) -> float:
        backoffs.append(attempt)
        return backoff_s(attempt, initial_s, cap_s, rng)

    monkeypatch.setattr(delivery_module, "backoff_s", counted)
    h = harness(*[status(429, headers)] * 3, ok())

    assert await h.deliver(req(UPDATE_ROW)) == DeliveryReport(status=200, attempts=4)
    assert h.pauses[Destination.OPENLAYER] == [], "no pause of nothing"
    assert backoffs == [0, 1, 2], "each 429 backed off, growing, as one without a Retry-After"


async def test_retry_after_holds_the_whole_destination_but_not_the_other() -> None:
    h = harness(status(429, {"retry-after": "3600"}), ok(), retry_after_cap_s=3600)
    first = asyncio.create_task(h.delivery.deliver(req(PUBLISH), WHERE.timestamp_ms))
    await h.wire.reached(1)
    await asyncio.wait_for(h.paused[Destination.OPENLAYER].wait(), 10)  # the 429 reached the destination's limit

    held = asyncio.create_task(h.delivery.deliver(req(UPDATE_ROW), WHERE.timestamp_ms))
    other = await h.deliver(req(UPDATE_LOG))

    assert other == DeliveryReport(status=200, attempts=1)
    # Paused for an hour: from here on nothing can reach Openlayer within this test, however the loop turns.
    assert h.guards[Destination.OPENLAYER].limit.paused
    assert h.pauses[Destination.OPENLAYER] == [pytest.approx(3600, abs=60)]
    assert not first.done()
    assert not held.done(), "a call to the paused destination went out during its Retry-After"
    assert [r.url.host for r in h.wire.requests] == ["openlayer.test", "humanloop.test"]
    for task in (first, held):
        task.cancel()
    await asyncio.gather(first, held, return_exceptions=True)


# --- permanent refusals --------------------------------------------------------------------------------------------


async def test_422_is_rejected_with_evidence() -> None:
    detail = {"detail": [{"loc": ["body", "duration"], "msg": "x" * 5000, "type": "value_error"}]}
    raw = json.dumps(detail).encode()
    response = httpx.Response(
        422,
        content=raw,
        headers={
            "content-type": "application/json",
            "x-request-id": "req-77",
            "set-cookie": "session=abc",
            "x-internal": "no",
        },
    )
    h = harness(response, evidence_body_bytes=100)
    request = req(UPDATE_LOG)

    error = await h.rejected(request)

    assert error.reason == "http-422"
    evidence = error.evidence
    assert evidence.status == 422
    assert evidence.method == "PATCH"
    assert evidence.url == f"{HL}/logs?reference_id=ref-1"
    assert evidence.attempts == 1
    assert evidence.body == raw[:100].decode()
    assert evidence.headers == {"content-type": "application/json", "x-request-id": "req-77"}
    assert "422" in str(error)
    assert len(h.wire.requests) == 1


async def test_evidence_truncation_never_breaks_on_a_split_character() -> None:
    h = harness(status(400, body="é".encode() * 10), evidence_body_bytes=5)

    error = await h.rejected(req(PUBLISH))

    assert error.evidence.body.startswith("éé")
    assert len(error.evidence.body) == 3  # two whole characters and a replacement for the cut one


@pytest.mark.parametrize("code", [400, 413, 422, 501, 505])
@pytest.mark.parametrize("event", [PUBLISH, UPDATE_ROW, UPDATE_LOG], ids=["publish", "update-row", "update-log"])
async def test_permanent_statuses_are_rejected_at_once(code: int, event: Event) -> None:
    h = harness(status(code))

    error = await h.rejected(req(event))

    assert (error.reason, error.evidence.status, error.evidence.attempts) == (f"http-{code}", code, 1)
    assert len(h.wire.requests) == 1


async def test_x_should_retry_false_rejects_a_503_at_once() -> None:
    h = harness(status(503, {"x-should-retry": "false"}))

    error = await h.rejected(req(PUBLISH))

    assert (error.reason, error.evidence.attempts) == ("http-503", 1)


async def test_x_should_retry_true_retries_a_400() -> None:
    h = harness(status(400, {"x-should-retry": "true"}), ok())

    assert (await h.deliver(req(PUBLISH))).attempts == 2


async def test_a_redirect_is_not_followed_and_waited_out_not_dead_lettered(caplog: pytest.LogCaptureFixture) -> None:
    # Following it would hand the API key to whatever host the Location names; it says nothing about the record
    # (a base URL that moved, a maintenance page), so it is retried as an outage is, its Location in the log.
    # Its query and userinfo are left out of the log: a signed URL or a sign-in page's token is no one's business.
    h = harness(status(302, {"location": "https://u:pw@elsewhere.test:8443/steal?token=t0k3n#x"}), ok())

    report = await h.deliver(req(PUBLISH))

    assert report == DeliveryReport(status=200, attempts=2)
    assert [r.url.host for r in h.wire.requests] == ["openlayer.test", "openlayer.test"]
    [line] = [r for r in caplog.records if r.getMessage() == "retryable status, will retry"]
    assert (line.status, line.location) == (302, "https://elsewhere.test:8443/steal")  # type: ignore[attr-defined]


# --- 409 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 1, 2, 4])
async def test_409_is_retried_conflict_retries_times_then_rejected(retries: int) -> None:
    h = harness(status(409, body=b'{"code":409,"error":"lock timeout"}'), conflict_retries=retries)

    error = await h.rejected(req(UPDATE_ROW))

    assert error.reason == "conflict"
    assert error.evidence.status == 409
    assert error.evidence.attempts == retries + 1
    assert len(h.wire.requests) == retries + 1


async def test_409_then_success_is_delivered() -> None:
    h = harness(status(409), ok(), conflict_retries=2)

    assert await h.deliver(req(PUBLISH)) == DeliveryReport(status=200, attempts=2)


# --- 404 ----------------------------------------------------------------------------------------------------------


class SteppingClock:
    """A wall clock that the fake API moves forward by `step_s` on every call it answers."""

    def __init__(self, start: float, step_s: float) -> None:
        self.now = start
        self.step_s = step_s

    def __call__(self) -> float:
        return self.now

    def answer(self, response: httpx.Response) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
        async def step(_: httpx.Request) -> httpx.Response:
            self.now += self.step_s
            return response

        return step


@pytest.mark.parametrize("event", [UPDATE_ROW, UPDATE_LOG], ids=["update-row", "update-log"])
async def test_404_on_an_update_is_retried_within_the_grace_window_then_rejected(event: Event) -> None:
    # The record was written at NOW; each answer takes 100 s; the grace is 250 s: answers at +100, +200 are
    # inside it, the one at +300 is not.
    clock = SteppingClock(NOW, 100.0)
    h = Harness(
        Wire(clock.answer(status(404, body=b'{"code":404,"error":"no such row"}'))),
        fast_settings(not_found_grace_s=250.0),
        clock,
    )

    error = await h.rejected(req(event), timestamp_ms=int(NOW * 1000))

    assert error.reason == "not-found-after-grace"
    assert error.evidence.status == 404
    assert error.evidence.attempts == 3
    assert len(h.wire.requests) == 3


async def test_404_on_an_update_then_success_within_grace_is_delivered() -> None:
    h = harness(status(404), status(404), ok(), not_found_grace_s=600.0)

    assert await h.deliver(req(UPDATE_ROW)) == DeliveryReport(status=200, attempts=3)


async def test_404_on_an_update_older_than_the_grace_is_rejected_at_once() -> None:
    h = harness(status(404), ok(), not_found_grace_s=600.0, wall_clock=lambda: NOW + 601)

    error = await h.rejected(req(UPDATE_LOG), timestamp_ms=int(NOW * 1000))

    assert (error.reason, error.evidence.attempts) == ("not-found-after-grace", 1)


async def test_404_on_publish_is_rejected_at_once_even_for_a_fresh_record() -> None:
    h = harness(status(404), ok(), not_found_grace_s=600.0)

    error = await h.rejected(req(PUBLISH), timestamp_ms=int(NOW * 1000))

    assert (error.reason, error.evidence.attempts) == ("http-404", 1)
    assert len(h.wire.requests) == 1


# --- what reaches the wire -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "present", "absent"),
    [
        pytest.param(PUBLISH, {"authorization": f"Bearer {OL_KEY}"}, "x-api-key", id="publish-bearer"),
        pytest.param(UPDATE_ROW, {"authorization": f"Bearer {OL_KEY}"}, "x-api-key", id="update-row-bearer"),
        pytest.param(UPDATE_LOG, {"x-api-key": HL_KEY}, "authorization", id="update-log-api-key"),
    ],
)
async def test_auth_and_content_headers_reach_the_wire(event: Event, present: dict[str, str], absent: str) -> None:
    h = harness(ok())

    await h.deliver(req(event))

    headers = h.wire.requests[0].headers
    for name, value in present.items():
        assert headers[name] == value
    assert absent not in headers
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"


async def test_query_values_are_encoded_on_the_wire() -> None:
    h = harness(ok())

    await h.deliver(req(RowUpdate(pipeline_id=PIPE, inference_id="a&b=c d/é", row={"x": 1})))

    url = h.wire.requests[0].url
    assert url.params["inferenceId"] == "a&b=c d/é"
    assert url.path == f"/v1/inference-pipelines/{PIPE}/rows"


async def test_evidence_never_holds_an_api_key() -> None:
    h = harness(status(400, {"content-type": "application/json"}, b'{"code":400,"error":"bad request"}'))

    error = await h.rejected(req(PUBLISH))

    assert OL_KEY not in repr(error.evidence)
    assert OL_KEY not in str(error)


# --- breaker bookkeeping --------------------------------------------------------------------------------------------


async def test_a_cancelled_probe_releases_the_breaker() -> None:
    gate = asyncio.Event()

    async def hang(_: httpx.Request) -> httpx.Response:
        await gate.wait()
        return ok()

    h = harness(httpx.ConnectError("refused"), hang, ok(), breaker=replace(FAST_BREAKER, stall_failures=1, probes=1))
    breaker = h.breakers[Destination.OPENLAYER]
    first = asyncio.create_task(h.delivery.deliver(req(PUBLISH), WHERE.timestamp_ms))
    await h.wire.reached(2)  # the failure opened the breaker; the second call is its probe
    assert h.breaker_changes == [(Destination.OPENLAYER, BreakerState.OPEN, Fault.OUTAGE)]

    first.cancel()
    await asyncio.gather(first, return_exceptions=True)

    # Its turn passes on: the next caller goes through as the probe (with one probe allowed, a leaked
    # turn would hold this caller forever, and the harness's guard would fail the test).
    assert await h.deliver(req(UPDATE_ROW)) == DeliveryReport(status=200, attempts=1)
    assert breaker.state is BreakerState.CLOSED


async def test_an_unexpected_exception_is_not_swallowed() -> None:
    h = harness(RuntimeError("bug in a transport"))

    with pytest.raises(RuntimeError, match="bug in a transport"):
        await h.deliver(req(PUBLISH))


async def test_a_permanent_refusal_closes_an_open_breaker() -> None:
    # The API answered about the record, so the destination is healthy again.
    h = harness(status(503), status(422), breaker=replace(FAST_BREAKER, stall_failures=1))

    await h.rejected(req(UPDATE_LOG))

    assert h.breakers[Destination.HUMANLOOP].state is BreakerState.CLOSED


# --- the API's own trouble: hangs, rate limits, refused keys, not-yet rows ------------------------------------------


def attempt_timeouts(wire: Wire) -> list[float]:
    """The timeout each attempt was sent with, as httpx hands it to the transport (the client enforces it;
    tests/unit/http/test_client.py shows each client cutting a stalled answer at its timeout)."""
    return [float(r.extensions["timeout"]["read"]) for r in wire.requests]


async def test_before_latency_is_known_an_attempt_gets_the_cold_timeout() -> None:
    h = harness(ok())

    await h.deliver(req(UPDATE_LOG))

    assert attempt_timeouts(h.wire) == [5.0]


async def test_429_neither_opens_the_breaker_nor_dead_letters() -> None:
    h = harness(*[status(429)] * 10, ok())

    assert await h.deliver(req(UPDATE_ROW)) == DeliveryReport(status=200, attempts=11)
    assert h.breaker_changes == [], "a rate limit is not an outage"


async def test_401_pauses_the_destination_and_never_dead_letters() -> None:
    refused = status(401, {"content-type": "application/json"}, b'{"code":401,"error":"Invalid API key"}')
    h = harness(*[refused] * 8, ok())

    report = await h.deliver(req(PUBLISH))

    assert report == DeliveryReport(status=200, attempts=9)
    changes = [(dest, state, why) for dest, state, why in h.breaker_changes]
    assert changes[0] == (Destination.OPENLAYER, BreakerState.OPEN, Fault.AUTH)
    assert changes[-1] == (Destination.OPENLAYER, BreakerState.CLOSED, None)


async def test_a_key_rotated_in_its_file_is_used_on_the_next_attempt() -> None:
    seen: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["x-api-key"])
        return ok() if request.headers["x-api-key"] == "hl-new-key-0000" else status(401)

    h = harness(answer)
    h.keys[Destination.HUMANLOOP].next_value = "hl-new-key-0000"

    report = await h.deliver(req(UPDATE_LOG))

    assert report == DeliveryReport(status=200, attempts=2)
    assert seen == [HL_KEY, "hl-new-key-0000"]
    assert h.breaker_changes == [], "a key that changed is tried at once, not counted as a failure"


async def test_403_while_other_calls_succeed_is_about_the_record() -> None:
    h = harness(ok(), status(403, body=b'{"code":403,"error":"forbidden pipeline"}'))
    await h.deliver(req(UPDATE_ROW))

    error = await h.rejected(req(PUBLISH))

    assert (error.reason, error.evidence.attempts) == ("http-403", 1)


async def test_403_while_other_calls_succeed_tries_a_key_rotated_on_disk_first() -> None:
    seen: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return ok() if request.headers["authorization"] == "Bearer ol-new-key-0000" else status(403)

    h = harness(ok(), answer)
    await h.deliver(req(UPDATE_ROW))  # a recent success with the old key
    h.keys[Destination.OPENLAYER].next_value = "ol-new-key-0000"  # rotated, and the old key revoked

    assert await h.deliver(req(PUBLISH)) == DeliveryReport(status=200, attempts=2)
    assert seen == [f"Bearer {OL_KEY}", "Bearer ol-new-key-0000"]
    assert h.breaker_changes == []


@pytest.mark.parametrize("refusal", [401, 403])
async def test_every_call_refused_in_flight_when_the_key_is_rotated_retries_with_the_new_key(refusal: int) -> None:
    # Two calls out with the old key; the key is rotated and the old one revoked while they wait. The first
    # refusal finds the new key in the file; the second must not be judged with a key it was not sent with.
    gate = asyncio.Event()
    seen: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"]
        seen.append(key)
        if key == "Bearer ol-new-key-0000":
            return ok()
        await gate.wait()
        return status(refusal)

    h = harness(ok(), answer)
    await h.deliver(req(UPDATE_ROW))  # a recent success with the old key
    first = asyncio.create_task(h.deliver(req(PUBLISH)))
    second = asyncio.create_task(h.deliver(req(UPDATE_ROW)))
    await h.wire.reached(3)
    h.keys[Destination.OPENLAYER].next_value = "ol-new-key-0000"
    gate.set()

    assert await first == DeliveryReport(status=200, attempts=2)
    assert await second == DeliveryReport(status=200, attempts=2)
    assert seen.count("Bearer ol-new-key-0000") == 2
    assert h.keys[Destination.OPENLAYER].reloads == 1, "the file is read once; the second call sees the new key"
    assert h.breaker_changes == []


async def test_403_while_nothing_succeeds_is_a_refused_key_and_waits() -> None:
    h = harness(*[status(403)] * 5, ok())

    assert await h.deliver(req(PUBLISH)) == DeliveryReport(status=200, attempts=6)
    assert (Destination.OPENLAYER, BreakerState.OPEN, Fault.AUTH) in h.breaker_changes


async def test_a_not_yet_record_gives_back_its_slots_while_it_waits() -> None:
    h = harness(status(404), status(404), ok(), not_found_grace_s=600.0)
    parked = Parked()

    assert await h.deliver(req(UPDATE_LOG), parking=parked) == DeliveryReport(status=200, attempts=3)
    assert parked.events == ["park", "resume", "park", "resume"]


def hang_while_another_is_answered(h: Harness) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
    """A step that waits for nothing while another record's call goes out and gets its answer (the next step)."""
    other = LogUpdate(reference_id="ref-2", output="Rome", duration=0.5)

    async def hang(_: httpx.Request) -> httpx.Response:
        with contextlib.suppress(RejectedError):  # an answer all the same
            await h.delivery.deliver(req(other), WHERE.timestamp_ms)
        raise httpx.ReadTimeout("no answer")

    return hang


def cut_at_the_floor(h: Harness) -> None:
    learned = h.guards[Destination.HUMANLOOP].timeouts[Endpoint.UPDATE_LOG]
    for _ in range(64):
        learned.observe(0.001)  # it was fast until now: attempts are cut at the 50 ms floor
    assert learned.seconds == pytest.approx(0.05)


def sent_timeouts(wire: Wire) -> list[tuple[str, float]]:
    """Each request's reference id with the timeout it was sent with."""
    timeouts = attempt_timeouts(wire)
    return [(r.url.params["reference_id"], round(t, 6)) for r, t in zip(wire.requests, timeouts, strict=True)]


async def test_a_timed_out_request_is_retried_with_twice_the_timeout_up_to_the_read_timeout() -> None:
    cut = httpx.ReadTimeout("no answer")
    h = harness(cut, cut, cut, cut, cut, ok(), min_attempt_timeout_s=0.05, read_timeout_s=0.5)
    cut_at_the_floor(h)

    assert await h.deliver(req(UPDATE_LOG)) == DeliveryReport(status=200, attempts=6)
    assert attempt_timeouts(h.wire) == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])


async def test_a_call_that_hung_while_others_were_answered_keeps_its_timeout_once() -> None:
    h = harness(ok(), min_attempt_timeout_s=0.05, read_timeout_s=0.5)
    hang, cut_alone = hang_while_another_is_answered(h), httpx.ReadTimeout("no answer")
    h.wire.steps = [hang, status(422), hang, ok(), cut_alone, ok()]
    cut_at_the_floor(h)

    assert await h.deliver(req(UPDATE_LOG)) == DeliveryReport(status=200, attempts=4)
    assert sent_timeouts(h.wire) == [
        ("ref-1", 0.05),
        ("ref-2", 0.05),  # refused for good: an answer, so the endpoint is not slow
        ("ref-1", 0.05),  # the first hang while others were answered: the same timeout
        ("ref-2", 0.05),
        ("ref-1", 0.1),  # the second doubles it
        ("ref-1", 0.2),  # cut while nothing else was answered: the endpoint is slow, double again
    ]


async def test_a_request_slower_than_the_others_still_reaches_the_read_timeout() -> None:
    h = harness(ok(), min_attempt_timeout_s=0.05, read_timeout_s=0.5)
    hang = hang_while_another_is_answered(h)
    steps: list[Step] = [hang, ok()] * 6
    h.wire.steps = [*steps, ok()]
    cut_at_the_floor(h)

    assert await h.deliver(req(UPDATE_LOG)) == DeliveryReport(status=200, attempts=7)
    mine = [seconds for reference, seconds in sent_timeouts(h.wire) if reference == "ref-1"]
    assert mine == [0.05, 0.05, 0.1, 0.2, 0.4, 0.5, 0.5]


async def test_a_record_that_failed_through_an_outage_goes_as_soon_as_the_breaker_closes() -> None:
    # A backoff of a minute after each failure would outlast the harness's guard; while the breaker is open it
    # does the waiting instead (a millisecond here), so the record goes with the first probe after the outage.
    h = harness(
        *[status(503)] * 9,
        ok(),
        initial_backoff_s=60.0,
        max_backoff_s=60.0,
        breaker=replace(FAST_BREAKER, stall_failures=1),
    )

    assert await h.deliver(req(UPDATE_LOG)) == DeliveryReport(status=200, attempts=10)
    assert (Destination.HUMANLOOP, BreakerState.OPEN, Fault.OUTAGE) in h.breaker_changes


# --- evidence and redaction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut_into_key", [1, 8, len(OL_KEY) - 1])
async def test_a_key_echoed_across_the_evidence_cut_leaves_no_prefix_in_the_dead_letter(cut_into_key: int) -> None:
    # The API echoes the key; the evidence limit falls inside it. Cut first and redacted after, the prefix
    # before the cut would no longer be the key, and the redactor would let it through.
    from service.core.records import SourceRecord
    from service.kafka.deadletter import build_dead_letter
    from service.ops.redaction import REDACTED, Redactor

    before = '{"error":"key '
    body = (before + OL_KEY + ' is not allowed"}').encode()
    h = harness(status(422, body=body), evidence_body_bytes=len(before) + cut_into_key)

    error = await h.rejected(req(PUBLISH))
    letter = build_dead_letter(
        SourceRecord("inferences", 0, 1, b"k", b"v", (), 1),
        error,
        dlq_topic="inferences.dlq",
        dlq_partitions=1,
        group_id="g",
        redact=Redactor([OL_KEY]),
        now_ms=2,
    )

    kept = (dict(letter.headers)["bridge.http.response.body"] or b"").decode()
    assert OL_KEY[:cut_into_key] not in kept[len(before) :]
    # Cut to the limit after redaction.
    assert kept == (before + REDACTED + ' is not allowed"}')[: len(before) + cut_into_key]
