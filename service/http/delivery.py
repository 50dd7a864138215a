"""Delivery: one API request to its final outcome, through retries, rate limits, pauses and the breaker.

`Delivery.deliver` returns when the API accepted the request and raises `RejectedError` when it
refused it for good. It never gives up on the API's own trouble: 5xx, timeouts, 429, a refused key
and "not ingested yet" wait, each in its own way, and only answers that say something about this
record end in a dead letter. Per destination (`Guard`) it keeps:

- a breaker (service/http/breaker.py) that pauses the destination in an outage or while its key is refused;
- an adaptive concurrency limit (service/http/limiter.py), which also carries Retry-After pauses;
- per-endpoint attempt timeouts from recent latency (service/http/timeouts.py), so a hung call is cut
  in seconds and retried, and a breaker probe is cut sooner still;
- the API key, re-read from its file when the API answers 401/403 (a rotated Secret).

A 404 "not yet" gives back the record's in-flight slots while it waits (`Parking`), so records of
other keys flow past it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

from opentelemetry.trace import Span

from service.config.delivery import DeliverySettings
from service.core.errors import EVIDENCE_REDACTION_MARGIN_BYTES, HttpEvidence, RejectedError
from service.core.requests import ApiRequest, Destination, Endpoint
from service.http.breaker import Breaker, BreakerSettings, BreakerState, Fault
from service.http.classify import Verdict, backoff_s, classify, retry_after_s
from service.http.client import HttpClient, HttpResponse, TransportFailure
from service.http.limiter import ConcurrencyLimit, LimitSettings
from service.http.timeouts import AttemptTimeout, TimeoutSettings, escalated
from service.ops.instrumentation import Instrumentation
from service.ops.tracing import Tracing, log_fields

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.delivery")

_KEPT_RESPONSE_HEADERS = ("content-type", "x-request-id", "request-id", "retry-after", "retry-after-ms")
_BACKPRESSURE_STATUSES = frozenset({503})
"""Retryable statuses that say "too much" (429 has its own verdict); other 5xx say "broken"."""
BREAKER_MAX_PAUSE_S = 10.0
PROBE_TIMEOUT_S = 5.0
"""A breaker probe's attempt timeout at most: one hung probe must not hold a recovering destination."""


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What a successful delivery took, for metrics and logs."""

    status: int
    attempts: int


class KeySource(Protocol):
    """An API key that may change while the service runs (a rotated Secret file)."""

    @property
    def value(self) -> str: ...

    def reload(self) -> bool:
        """Read the key again; True when it changed."""
        ...


class Parking(Protocol):
    """Lets a waiting record give back its in-flight slots (the consumer loop's, service/kafka/worker.py)."""

    def park(self) -> None: ...

    async def resume(self) -> None: ...


@dataclass(slots=True)
class Guard:
    """Everything delivery keeps per destination."""

    breaker: Breaker
    limit: ConcurrencyLimit
    key: KeySource
    sign: Callable[[str], Mapping[str, str]]
    """The auth headers for a key."""
    timeouts: Mapping[Endpoint, AttemptTimeout]
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refresh_headers()

    def refresh_headers(self) -> None:
        self.headers = {"content-type": "application/json", "accept": "application/json", **self.sign(self.key.value)}


def build_guard(
    destination: Destination,
    settings: DeliverySettings,
    key: KeySource,
    sign: Callable[[str], Mapping[str, str]],
    *,
    rng: random.Random,
    on_breaker: Callable[[BreakerState, Fault | None], None] = lambda state, why: None,
    on_limit: Callable[[int], None] = lambda limit: None,
    breaker: BreakerSettings | None = None,
) -> Guard:
    """One destination's guard from the delivery settings (`breaker` replaces the derived breaker settings)."""
    breaker = breaker or BreakerSettings(
        min_calls=settings.breaker_min_calls,
        failure_rate=settings.breaker_failure_rate,
        # At least a second: it bounds how often the breaker can change state.
        initial_pause_s=max(1.0, settings.initial_backoff_s),
        # At most 10 s: a probe costs three calls, and a longer pause is time lost after the API is back.
        max_pause_s=max(1.0, min(BREAKER_MAX_PAUSE_S, settings.max_backoff_s)),
    )
    timeouts = TimeoutSettings(ceiling_s=settings.read_timeout_s, floor_s=settings.min_attempt_timeout_s)
    return Guard(
        breaker=Breaker(destination.value, breaker, rng=rng, on_change=on_breaker),
        limit=ConcurrencyLimit(
            LimitSettings(
                ceiling=settings.max_connections,
                initial=min(32, settings.max_connections),
                floor=min(4, settings.max_connections),
            ),
            on_change=on_limit,
        ),
        key=key,
        sign=sign,
        timeouts={e: AttemptTimeout(timeouts) for e in Endpoint if e.destination is destination},
    )


@dataclass(slots=True)
class _Delivering:
    """One request on its way: what each attempt needs, and what the attempts so far have counted."""

    request: ApiRequest
    guard: Guard
    record_timestamp_ms: int
    parking: Parking | None
    trace: Span | None
    attempt: int = 0
    failures: int = 0
    """Attempts that failed for the API's own reasons: they set the backoff."""
    slow: int = 0
    """Attempts cut by their timeout while the endpoint answered no other call: each doubles the next timeout."""
    hung: int = 0
    """Attempts cut while the endpoint answered other calls: each but the first doubles the next timeout."""
    answered_before: int = 0
    """How many answers the endpoint had given when the current attempt was sent (`AttemptTimeout.answered`)."""
    sent_headers: Mapping[str, str] | None = None
    """The destination's headers (its key) the current attempt was sent with."""
    conflicts: int = 0
    probe: bool = False
    """Whether the current attempt is the breaker's probe."""


class Delivery:
    def __init__(
        self,
        client: HttpClient,
        settings: DeliverySettings,
        guards: Mapping[Destination, Guard],
        *,
        rng: random.Random,
        instrumentation: Instrumentation,
        wall_clock: Callable[[], float] = time.time,
        tracing: Tracing | None = None,
    ) -> None:
        self._instrumentation = instrumentation
        self._tracing = tracing or Tracing()
        self._client = client
        self._settings = settings
        self._guards = guards
        self._rng = rng
        self._now = wall_clock

    async def deliver(
        self, request: ApiRequest, record_timestamp_ms: int, parking: Parking | None = None, trace: Span | None = None
    ) -> DeliveryReport:
        """`trace`: the span of the record (or batch) this call is for; each attempt gets a child span.

        Attempts go on until the API accepts the request (the report) or answers about the record in a way
        no retry changes (a `RejectedError`); outages, throttling and refused keys are waited out.
        """
        call = _Delivering(request, self._guards[request.destination], record_timestamp_ms, parking, trace)
        while True:
            await self._admit(call)
            answer = await self._attempt(call)
            if answer is None:  # no answer: a transport failure, already counted and backed off from
                continue
            report = await self._answered(call, *answer)
            if report is not None:
                return report

    async def _admit(self, call: _Delivering) -> None:
        """Wait for the breaker to let an attempt through, then for a slot of the destination's limit."""
        breaker, limit = call.guard.breaker, call.guard.limit
        call.probe = await breaker.admit()
        call.attempt += 1
        if not limit.try_acquire():
            try:
                await limit.acquire()
            except BaseException:
                breaker.released(probe=call.probe)
                raise

    async def _attempt(self, call: _Delivering) -> tuple[HttpResponse, float] | None:
        """One HTTP attempt: the response and its round trip, or None after a transport failure."""
        request, guard = call.request, call.guard
        timeout = guard.timeouts[request.endpoint]
        # A sporadic hang on an API that answers everyone else says nothing about how long this request
        # needs, so its retry keeps the timeout; a request slower than the others is cut again, and from
        # then on it doubles as any other, so it pays one attempt more to reach the read timeout.
        seconds = escalated(timeout.seconds, timeout.ceiling_s, call.slow + max(0, call.hung - 1))
        call.answered_before = timeout.answered
        if call.probe:
            seconds = min(seconds, PROBE_TIMEOUT_S)
        headers, span = guard.headers, None
        call.sent_headers = headers
        if call.trace is not None:
            span = self._tracing.start_call(call.trace, request, call.attempt)
            headers = self._tracing.inject(span, headers)
        started = time.monotonic()
        try:
            response = await self._client.send(
                request.method, request.url, request.params, headers, request.body, seconds
            )
        except TransportFailure as failure:
            if span is not None:
                self._tracing.end_call(span, None, failure.kind)
            await self._transport_failed(call, failure, started)
            return None
        except BaseException:
            if span is not None:
                self._tracing.end_call(span, None, "cancelled")
            guard.limit.cancelled()
            guard.breaker.released(probe=call.probe)
            raise
        rtt = time.monotonic() - started
        timeout.answer()
        if span is not None:
            self._tracing.end_call(span, response.status, None)
        self._instrumentation.call(request.endpoint.value, request.destination.value, response.status, rtt)
        return response, rtt

    async def _transport_failed(self, call: _Delivering, failure: TransportFailure, started: float) -> None:
        endpoint = call.request.endpoint.value
        if failure.kind == "timeout":
            if call.guard.timeouts[call.request.endpoint].answered > call.answered_before:
                call.hung += 1
            else:
                call.slow += 1
        call.guard.limit.release(None, backpressure=failure.kind == "timeout")
        self._instrumentation.call(endpoint, call.request.destination.value, None, time.monotonic() - started)
        self._instrumentation.record_retry(endpoint, failure.kind)
        call.guard.breaker.failed(Fault.OUTAGE, probe=call.probe)
        call.failures += 1
        log.warning(
            "call failed, will retry",
            extra={"endpoint": endpoint, "error": str(failure), "attempt": call.attempt, **log_fields(call.trace)},
        )
        await self._after_failure(call.guard.breaker, call.failures)

    async def _answered(self, call: _Delivering, response: HttpResponse, rtt: float) -> DeliveryReport | None:
        """What an answer means: the report on success, None to try again, or a `RejectedError`."""
        request, guard = call.request, call.guard
        verdict = classify(response.status, request.endpoint, response.headers)
        if verdict is Verdict.SUCCESS:
            guard.limit.release(rtt)
            guard.timeouts[request.endpoint].observe(rtt)
            guard.breaker.succeeded(probe=call.probe)
            return DeliveryReport(status=response.status, attempts=call.attempt)
        if verdict is Verdict.AUTH or verdict is Verdict.FORBIDDEN:
            guard.limit.release(rtt)
            if self._key_changed(call):  # a rotated key, the old one revoked: not the record's fault, nor an outage
                self._instrumentation.record_retry(request.endpoint.value, verdict.value)
                guard.breaker.released(probe=call.probe)
                log.warning("API key changed, retrying with it", extra={"destination": request.destination.value})
                return None
            if verdict is Verdict.FORBIDDEN and guard.breaker.recent_success():
                # Other calls with this key succeed: the key may not write this record's target.
                guard.breaker.answered(probe=call.probe)
                raise self._rejection(request, response, call.attempt, verdict)
        if verdict is not Verdict.REJECT:
            self._instrumentation.record_retry(request.endpoint.value, verdict.value)
        if verdict is Verdict.THROTTLED:
            await self._throttled(call, response)
        elif verdict is Verdict.RETRY:
            await self._retryable(call, response)
        elif verdict is Verdict.AUTH or verdict is Verdict.FORBIDDEN:
            await self._key_refused(call, response)
        else:
            await self._about_the_record(call, response, rtt, verdict)
        return None

    async def _throttled(self, call: _Delivering, response: HttpResponse) -> None:
        call.guard.limit.release(None, throttled=True)
        call.guard.breaker.released(probe=call.probe)
        pause = self._retry_after(response)
        if pause is not None:
            call.guard.limit.pause_until(time.monotonic() + pause)
            return
        call.failures += 1
        await self._backoff(call.failures)

    async def _retryable(self, call: _Delivering, response: HttpResponse) -> None:
        status = response.status
        call.guard.limit.release(None, backpressure=status in _BACKPRESSURE_STATUSES)
        call.guard.breaker.failed(Fault.OUTAGE, probe=call.probe)
        pause = self._retry_after(response)
        if pause is not None:
            call.guard.limit.pause_until(time.monotonic() + pause)
        log.warning(
            "retryable status, will retry",
            extra={
                "endpoint": call.request.endpoint.value,
                "status": status,
                "attempt": call.attempt,
                # Where a redirect points: a base URL that moved says so here.
                **(
                    {"location": _without_secrets(response.headers["location"])}
                    if "location" in response.headers
                    else {}
                ),
                **log_fields(call.trace),
            },
        )
        call.failures += 1
        if pause is None:
            await self._after_failure(call.guard.breaker, call.failures)

    @staticmethod
    def _key_changed(call: _Delivering) -> bool:
        """Whether the key this attempt was sent with is no longer the one to use: another call found a new one
        in the key's file since (every call in flight then is refused alike), or the file holds a new one now."""
        guard = call.guard
        if call.sent_headers is not guard.headers:
            return True
        if guard.key.reload():
            guard.refresh_headers()
            return True
        return False

    async def _key_refused(self, call: _Delivering, response: HttpResponse) -> None:
        """The key was refused and none other is known (the limit's slot is already given back)."""
        guard = call.guard
        guard.breaker.failed(Fault.AUTH, probe=call.probe)
        log.warning(
            "API key refused, will retry",
            extra={
                "endpoint": call.request.endpoint.value,
                "status": response.status,
                "attempt": call.attempt,
                **log_fields(call.trace),
            },
        )
        call.failures += 1
        await self._after_failure(guard.breaker, call.failures)

    async def _about_the_record(self, call: _Delivering, response: HttpResponse, rtt: float, verdict: Verdict) -> None:
        """The API answered about this record, so the destination itself is up: wait and retry, or reject."""
        call.guard.limit.release(rtt)
        call.guard.breaker.answered(probe=call.probe)
        if verdict is Verdict.CONFLICT and call.conflicts < self._settings.conflict_retries:
            call.conflicts += 1
            await self._backoff(call.conflicts)
            return
        if verdict is Verdict.NOT_YET and self._within_grace(call.record_timestamp_ms):
            await self._wait_parked(call.attempt, call.parking)
            return
        raise self._rejection(call.request, response, call.attempt, verdict)

    def _retry_after(self, response: HttpResponse) -> float | None:
        """The server's pause, capped; None for none, and for a pause of nothing (`Retry-After: 0`, a date already
        past): honoured as given, it would skip the backoff and retry at once, for as long as the server says so."""
        pause = retry_after_s(response.headers, self._now())
        return None if pause is None or pause <= 0 else min(pause, self._settings.retry_after_cap_s)

    async def _after_failure(self, breaker: Breaker, failures: int) -> None:
        """Back off before the next attempt, unless the breaker is open: then it does the waiting, and
        every caller goes as soon as it closes rather than sleeping out a backoff grown during the outage."""
        if breaker.state is BreakerState.CLOSED:
            await self._backoff(failures)

    async def _backoff(self, attempt: int) -> None:
        s = self._settings
        await asyncio.sleep(backoff_s(attempt - 1, s.initial_backoff_s, s.max_backoff_s, self._rng))

    async def _wait_parked(self, attempt: int, parking: Parking | None) -> None:
        """Wait for a not-yet record without holding in-flight slots that other keys could use."""
        if parking is None:
            await self._backoff(attempt)
            return
        parking.park()
        await self._backoff(attempt)  # a record cancelled here stays parked: the loop knows it holds no slots
        await parking.resume()

    def _within_grace(self, record_timestamp_ms: int) -> bool:
        return self._now() - record_timestamp_ms / 1000.0 < self._settings.not_found_grace_s

    def _rejection(self, request: ApiRequest, response: HttpResponse, attempts: int, verdict: Verdict) -> RejectedError:
        limit = self._settings.evidence_body_bytes
        evidence = HttpEvidence(
            method=request.method,
            url=request.url + ("?" + urlencode(request.params) if request.params else ""),
            status=response.status,
            body=response.body[:limit].decode("utf-8", errors="replace"),
            attempts=attempts,
            headers={k: response.headers[k] for k in _KEPT_RESPONSE_HEADERS if k in response.headers},
            # The dead letter cuts to size only after redacting (service/kafka/deadletter.py): a secret echoed
            # across the cut must be whole when the redactor looks for it.
            body_window=response.body[: limit + EVIDENCE_REDACTION_MARGIN_BYTES].decode("utf-8", errors="replace"),
            body_limit=limit,
        )
        reason = {
            Verdict.CONFLICT: "conflict",
            Verdict.NOT_YET: "not-found-after-grace",
        }.get(verdict, f"http-{response.status}")
        return RejectedError(
            f"{request.method} {request.endpoint.value} answered {response.status} after {attempts} attempt(s)",
            evidence,
            reason=reason,
        )


def _without_secrets(url: str) -> str:
    """A URL with what may carry a credential left out (userinfo, query, fragment): a redirect to a sign-in page
    or a signed URL would otherwise put a token in the logs, which the redactor does not know."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
