"""Delivery: one API request to its final outcome, through retries, Retry-After and the breaker.

`Delivery.deliver` returns when the API accepted the request and raises `RejectedError` when it
refused it for good. It never gives up on an outage: retryable failures go through the
destination's breaker and wait as long as the outage lasts (the caller cancels on shutdown). The
only failures that end in a dead letter are the ones that say something about this record.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from .breaker import Breaker
from .classify import Verdict, backoff_s, classify, retry_after_s
from .errors import HttpEvidence, RejectedError
from .httpclient import HttpClient, HttpResponse, TransportFailure
from .metrics import Metrics
from .routes import ApiRequest, Destination
from .settings import DeliverySettings
from .slots import Slots

log = logging.getLogger(__name__)

_KEPT_RESPONSE_HEADERS = ("content-type", "x-request-id", "request-id", "retry-after", "retry-after-ms")


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What a successful delivery took, for metrics and logs."""

    status: int
    attempts: int


class Delivery:
    def __init__(
        self,
        client: HttpClient,
        settings: DeliverySettings,
        auth_headers: Mapping[Destination, Mapping[str, str]],
        breakers: Mapping[Destination, Breaker],
        *,
        rng: random.Random,
        metrics: Metrics,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._client = client
        self._settings = settings
        self._headers = {
            dest: {"content-type": "application/json", "accept": "application/json", **auth}
            for dest, auth in auth_headers.items()
        }
        self._breakers = breakers
        # Calls wait here rather than in the client's pool: a pool wait that timed out would look
        # like an API failure and count against the destination's breaker.
        self._slots = {dest: Slots(settings.max_connections) for dest in auth_headers}
        self._rng = rng
        self._now = wall_clock

    async def deliver(self, request: ApiRequest, record_timestamp_ms: int) -> DeliveryReport:
        breaker = self._breakers[request.destination]
        headers = self._headers[request.destination]
        endpoint, destination = request.endpoint.value, request.destination.value
        attempt = 0
        conflicts = 0
        while True:
            probe = await breaker.admit()
            attempt += 1
            started = time.monotonic()
            try:
                slots = self._slots[request.destination]
                if not slots.try_take():
                    await slots.take()
                try:
                    response = await self._client.send(
                        request.method, request.url, request.params, headers, request.body
                    )
                finally:
                    slots.release()
            except TransportFailure as exc:
                self._metrics.call(endpoint, destination, None, time.monotonic() - started)
                self._metrics.retries.labels(endpoint, exc.kind).inc()
                breaker.failed(None, probe=probe)
                log.warning(
                    "call failed, will retry",
                    extra={"endpoint": endpoint, "error": str(exc), "attempt": attempt},
                )
                await self._pause(attempt, breaker_open=probe)
                continue
            except BaseException:
                if probe:
                    breaker.released()
                raise
            self._metrics.call(endpoint, destination, response.status, time.monotonic() - started)
            verdict = classify(response.status, request.endpoint, response.headers)
            if verdict is Verdict.SUCCESS:
                breaker.succeeded()
                return DeliveryReport(status=response.status, attempts=attempt)
            if verdict is not Verdict.REJECT:
                self._metrics.retries.labels(endpoint, verdict.value).inc()
            if verdict is Verdict.RETRY:
                pause = self._retry_after(response)
                breaker.failed(pause, probe=probe)
                log.warning(
                    "retryable status, will retry",
                    extra={"endpoint": endpoint, "status": response.status, "attempt": attempt},
                )
                if pause is None:
                    await self._pause(attempt, breaker_open=probe)
                continue
            # The API answered about this record, so the destination itself is healthy.
            breaker.succeeded()
            if verdict is Verdict.CONFLICT and conflicts < self._settings.conflict_retries:
                conflicts += 1
                await self._pause(conflicts, breaker_open=False)
                continue
            if verdict is Verdict.NOT_YET and self._within_grace(record_timestamp_ms):
                await self._pause(attempt, breaker_open=False)
                continue
            raise self._rejection(request, response, attempt, verdict)

    def _retry_after(self, response: HttpResponse) -> float | None:
        pause = retry_after_s(response.headers, self._now())
        return None if pause is None else min(pause, self._settings.retry_after_cap_s)

    async def _pause(self, attempt: int, *, breaker_open: bool) -> None:
        # While the breaker is open it does the waiting; a sleep here would only add to it.
        if not breaker_open:
            s = self._settings
            await asyncio.sleep(backoff_s(attempt - 1, s.initial_backoff_s, s.max_backoff_s, self._rng))

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
