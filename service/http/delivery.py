"""Delivery: one API request to its final outcome, through retries, rate limits, pauses and the breaker.

`Delivery.deliver` returns when the API accepted the request and raises `RejectedError` when it
refused it for good. It never gives up on the API's own trouble: 5xx, timeouts, 429, a refused key
and "not ingested yet" wait, each in its own way, and only answers that say something about this
record end in a dead letter. Per destination (`Guard`) it keeps:

- a breaker (service/breaker.py) that pauses the destination in an outage or while its key is refused;
- an adaptive concurrency limit (service/limiter.py), which also carries Retry-After pauses;
- per-endpoint attempt timeouts from recent latency (service/timeouts.py), so a hung call is cut
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
from urllib.parse import urlencode

from opentelemetry.trace import Span

from service.config.delivery import DeliverySettings
from service.core.errors import HttpEvidence, RejectedError
from service.core.requests import ApiRequest, Destination, Endpoint
from service.http.breaker import Breaker, BreakerSettings, BreakerState, Fault
from service.http.classify import Verdict, backoff_s, classify, retry_after_s
from service.http.client import HttpClient, HttpResponse, TransportFailure
from service.http.limiter import ConcurrencyLimit, LimitSettings
from service.http.timeouts import AttemptTimeout, TimeoutSettings
from service.ops.instrumentation import Instrumentation
from service.tracing import Tracing, log_fields

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
    """Lets a waiting record give back its in-flight slots (the consumer loop's, service/consumer.py)."""

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
        """`trace`: the span of the record (or batch) this call is for; each attempt gets a child span."""
        guard = self._guards[request.destination]
        breaker, limit = guard.breaker, guard.limit
        timeout = guard.timeouts[request.endpoint]
        endpoint, destination = request.endpoint.value, request.destination.value
        attempt = 0
        failures = 0  # attempts that failed for the API's own reasons: they set the backoff
        timeouts = 0  # attempts of this request cut by their timeout: each retry may take twice as long
        conflicts = 0
        while True:
            probe = await breaker.admit()
            attempt += 1
            if not limit.try_acquire():
                try:
                    await limit.acquire()
                except BaseException:
                    breaker.released(probe=probe)
                    raise
            seconds = min(timeout.ceiling_s, timeout.seconds * 2**timeouts)
            if probe:
                seconds = min(seconds, PROBE_TIMEOUT_S)
            headers, call = guard.headers, None
            if trace is not None:
                call = self._tracing.start_call(trace, request, attempt)
                headers = self._tracing.inject(call, headers)
            started = time.monotonic()
            try:
                response = await self._client.send(
                    request.method, request.url, request.params, headers, request.body, seconds
                )
            except TransportFailure as failure:
                if call is not None:
                    self._tracing.end_call(call, None, failure.kind)
                timeouts += failure.kind == "timeout"
                limit.release(None, backpressure=failure.kind == "timeout")
                self._instrumentation.call(endpoint, destination, None, time.monotonic() - started)
                self._instrumentation.record_retry(endpoint, failure.kind)
                breaker.failed(Fault.OUTAGE, probe=probe)
                failures += 1
                log.warning(
                    "call failed, will retry",
                    extra={"endpoint": endpoint, "error": str(failure), "attempt": attempt, **log_fields(trace)},
                )
                await self._after_failure(breaker, failures)
                continue
            except BaseException:
                if call is not None:
                    self._tracing.end_call(call, None, "cancelled")
                limit.cancelled()
                breaker.released(probe=probe)
                raise
            rtt = time.monotonic() - started
            status = response.status
            if call is not None:
                self._tracing.end_call(call, status, None)
            self._instrumentation.call(endpoint, destination, status, rtt)
            verdict = classify(status, request.endpoint, response.headers)
            if verdict is Verdict.SUCCESS:
                limit.release(rtt)
                timeout.observe(rtt)
                breaker.succeeded(probe=probe)
                return DeliveryReport(status=status, attempts=attempt)
            if verdict is Verdict.FORBIDDEN and breaker.recent_success():
                # Other calls with this key succeed: the key may not write this record's target.
                verdict = Verdict.REJECT
            if verdict is not Verdict.REJECT:
                self._instrumentation.record_retry(endpoint, verdict.value)
            if verdict is Verdict.THROTTLED:
                limit.release(None, throttled=True)
                breaker.released(probe=probe)
                pause = self._retry_after(response)
                if pause is not None:
                    limit.pause_until(time.monotonic() + pause)
                    continue
                failures += 1
                await self._backoff(failures)
                continue
            if verdict is Verdict.RETRY:
                limit.release(None, backpressure=status in _BACKPRESSURE_STATUSES)
                breaker.failed(Fault.OUTAGE, probe=probe)
                pause = self._retry_after(response)
                if pause is not None:
                    limit.pause_until(time.monotonic() + pause)
                log.warning(
                    "retryable status, will retry",
                    extra={"endpoint": endpoint, "status": status, "attempt": attempt, **log_fields(trace)},
                )
                failures += 1
                if pause is None:
                    await self._after_failure(breaker, failures)
                continue
            if verdict is Verdict.AUTH or verdict is Verdict.FORBIDDEN:
                limit.release(rtt)
                if guard.key.reload():
                    guard.refresh_headers()
                    breaker.released(probe=probe)
                    log.warning("API key changed on disk, retrying with it", extra={"destination": destination})
                    continue
                breaker.failed(Fault.AUTH, probe=probe)
                log.warning(
                    "API key refused, will retry",
                    extra={"endpoint": endpoint, "status": status, "attempt": attempt, **log_fields(trace)},
                )
                failures += 1
                await self._after_failure(breaker, failures)
                continue
            # The API answered about this record, so the destination itself is up.
            limit.release(rtt)
            breaker.answered(probe=probe)
            if verdict is Verdict.CONFLICT and conflicts < self._settings.conflict_retries:
                conflicts += 1
                await self._backoff(conflicts)
                continue
            if verdict is Verdict.NOT_YET and self._within_grace(record_timestamp_ms):
                await self._wait_parked(attempt, parking)
                continue
            raise self._rejection(request, response, attempt, verdict)

    def _retry_after(self, response: HttpResponse) -> float | None:
        pause = retry_after_s(response.headers, self._now())
        return None if pause is None else min(pause, self._settings.retry_after_cap_s)

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
        evidence = HttpEvidence(
            method=request.method,
            url=request.url + ("?" + urlencode(request.params) if request.params else ""),
            status=response.status,
            body=response.body[: self._settings.evidence_body_bytes].decode("utf-8", errors="replace"),
            attempts=attempts,
            headers={k: response.headers[k] for k in _KEPT_RESPONSE_HEADERS if k in response.headers},
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
