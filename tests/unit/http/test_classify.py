"""The status table of service/http/classify.py, Retry-After parsing and the backoff's bounds."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from service.core.requests import Endpoint
from service.http.classify import Verdict, backoff_s, classify, retry_after_s

ALL_ENDPOINTS = list(Endpoint)
UPDATES = [Endpoint.UPDATE_ROW, Endpoint.UPDATE_LOG]

# status -> verdict for every endpoint, except 404 which depends on the endpoint (below).
STATUS_TABLE = [
    (200, Verdict.SUCCESS),
    (201, Verdict.SUCCESS),
    (202, Verdict.SUCCESS),
    (204, Verdict.SUCCESS),
    (400, Verdict.REJECT),
    (401, Verdict.AUTH),
    (402, Verdict.REJECT),
    (403, Verdict.FORBIDDEN),
    (405, Verdict.REJECT),
    (413, Verdict.REJECT),
    (422, Verdict.REJECT),
    (408, Verdict.RETRY),
    (425, Verdict.RETRY),
    (429, Verdict.THROTTLED),
    (409, Verdict.CONFLICT),
    (500, Verdict.RETRY),
    (502, Verdict.RETRY),
    (503, Verdict.RETRY),
    (504, Verdict.RETRY),
    (507, Verdict.RETRY),
    (529, Verdict.RETRY),
    (599, Verdict.RETRY),
    (501, Verdict.REJECT),
    (505, Verdict.REJECT),
    # Redirects are not followed, and a 1xx is no answer: the destination's state, never the record's fault.
    (101, Verdict.RETRY),
    (301, Verdict.RETRY),
    (302, Verdict.RETRY),
    (307, Verdict.RETRY),
    (308, Verdict.RETRY),
]


@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
@pytest.mark.parametrize(("status", "verdict"), [pytest.param(s, v, id=str(s)) for s, v in STATUS_TABLE])
def test_status_table(status: int, verdict: Verdict, endpoint: Endpoint) -> None:
    assert classify(status, endpoint, {}) is verdict


@pytest.mark.parametrize(
    ("endpoint", "verdict"),
    [
        pytest.param(Endpoint.PUBLISH, Verdict.REJECT, id="publish-wrong-pipeline"),
        pytest.param(Endpoint.UPDATE_ROW, Verdict.NOT_YET, id="update-row-not-ingested-yet"),
        pytest.param(Endpoint.UPDATE_LOG, Verdict.NOT_YET, id="update-log-not-ingested-yet"),
    ],
)
def test_404_depends_on_the_endpoint(endpoint: Endpoint, verdict: Verdict) -> None:
    assert classify(404, endpoint, {}) is verdict


@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
@pytest.mark.parametrize("status", [400, 404, 409, 422, 501])
def test_x_should_retry_true_makes_any_failure_retryable(status: int, endpoint: Endpoint) -> None:
    assert classify(status, endpoint, {"x-should-retry": "true"}) is Verdict.RETRY


@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
@pytest.mark.parametrize("status", [404, 408, 409, 500, 503, 529])
def test_x_should_retry_false_makes_any_failure_permanent(status: int, endpoint: Endpoint) -> None:
    assert classify(status, endpoint, {"x-should-retry": "false"}) is Verdict.REJECT


@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
@pytest.mark.parametrize(
    ("status", "verdict"), [(401, Verdict.AUTH), (403, Verdict.FORBIDDEN), (429, Verdict.THROTTLED)]
)
@pytest.mark.parametrize("value", ["true", "false"])
def test_x_should_retry_never_overrides_the_destination_states(
    status: int, verdict: Verdict, value: str, endpoint: Endpoint
) -> None:
    # A refused key or a rate limit is the API's own state: never a reason to dead-letter a record.
    assert classify(status, endpoint, {"x-should-retry": value}) is verdict


@pytest.mark.parametrize("value", ["true", "false"])
def test_x_should_retry_never_turns_a_success_into_a_failure(value: str) -> None:
    assert classify(200, Endpoint.PUBLISH, {"x-should-retry": value}) is Verdict.SUCCESS


@pytest.mark.parametrize("value", ["", "maybe", "1"])
def test_an_unrecognised_x_should_retry_leaves_the_status_in_charge(value: str) -> None:
    headers = {"x-should-retry": value}

    assert classify(503, Endpoint.PUBLISH, headers) is Verdict.RETRY
    assert classify(422, Endpoint.PUBLISH, headers) is Verdict.REJECT


# --- retry_after_s ----------------------------------------------------------------------------------------------

NOW = datetime(2026, 5, 7, 12, 0, 0, tzinfo=UTC)


def http_date(moment: datetime) -> str:
    return format_datetime(moment, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, None, id="none"),
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="ms"),
        pytest.param({"retry-after-ms": "0"}, 0.0, id="ms-zero"),
        pytest.param({"retry-after-ms": "2.5"}, 0.0025, id="ms-float"),
        pytest.param({"retry-after-ms": "-20"}, 0.0, id="ms-negative-is-zero"),
        pytest.param({"retry-after-ms": "250", "retry-after": "9"}, 0.25, id="ms-wins-over-seconds"),
        pytest.param({"retry-after-ms": "soon", "retry-after": "9"}, 9.0, id="garbage-ms-falls-back"),
        pytest.param({"retry-after": "120"}, 120.0, id="integer-seconds"),
        pytest.param({"retry-after": " 7 "}, 7.0, id="padded-seconds"),
        pytest.param({"retry-after": "1.5"}, 1.5, id="float-seconds"),
        pytest.param({"retry-after": "0"}, 0.0, id="zero-seconds"),
        pytest.param({"retry-after": "-5"}, 0.0, id="negative-is-zero"),
        pytest.param({"retry-after": http_date(NOW + timedelta(seconds=30))}, 30.0, id="http-date-future"),
        pytest.param({"retry-after": http_date(NOW - timedelta(seconds=30))}, 0.0, id="http-date-past-is-zero"),
        pytest.param({"retry-after": "Thu, 07 May 2026 12:02:00 GMT"}, 120.0, id="http-date-literal"),
        pytest.param({"retry-after": "tomorrow-ish"}, None, id="garbage"),
        pytest.param({"retry-after": ""}, None, id="empty"),
        pytest.param({"retry-after": "Thu, 99 Foo 2026 12:02:00 GMT"}, None, id="broken-date"),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers, NOW.timestamp()) == expected


def test_retry_after_date_is_relative_to_the_injected_now() -> None:
    headers = {"retry-after": http_date(NOW + timedelta(seconds=100))}

    assert retry_after_s(headers, NOW.timestamp()) == 100.0
    assert retry_after_s(headers, NOW.timestamp() + 60) == 40.0
    assert retry_after_s(headers, NOW.timestamp() + 500) == 0.0


# --- backoff_s --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "cap"),
    [
        pytest.param(0.5, 30.0, id="defaults"),
        pytest.param(0.5, 8.0, id="sdk-like"),
        pytest.param(1.0, 1.0, id="cap-equals-initial"),
        pytest.param(2.0, 0.5, id="cap-below-initial"),
    ],
)
def test_backoff_stays_within_jitter_bounds_and_the_cap(initial: float, cap: float) -> None:
    for seed in range(20):
        rng = random.Random(seed)
        for attempt in range(0, 80):
            base = min(cap, initial * 2.0**attempt)

            delay = backoff_s(attempt, initial, cap, rng)

            assert 0.75 * base <= delay <= base, (seed, attempt, delay)
            assert delay <= cap


def test_backoff_grows_exponentially_until_the_cap() -> None:
    # The lower bound of attempt n+1 (0.75 * 2b) is above the upper bound of attempt n (b), so growth is strict.
    rng = random.Random(7)
    delays = [backoff_s(n, 0.1, 100.0, rng) for n in range(8)]

    assert delays == sorted(delays)
    assert len(set(delays)) == len(delays)


def test_backoff_jitter_spreads_values() -> None:
    rng = random.Random(11)

    delays = {backoff_s(3, 1.0, 100.0, rng) for _ in range(200)}

    assert len(delays) > 100
    assert min(delays) < 7.0 < max(delays)  # both halves of [6, 8] are used


def test_backoff_is_reproducible_with_the_same_seed() -> None:
    first = [backoff_s(n, 0.5, 30.0, random.Random(3)) for n in range(10)]
    second = [backoff_s(n, 0.5, 30.0, random.Random(3)) for n in range(10)]

    assert first == second
