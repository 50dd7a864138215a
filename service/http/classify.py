"""Failure classification and retry timing: pure functions, one table, no I/O.

Network errors, 1xx/3xx and 408/425/5xx (but 501/505) are outages and are retried without limit; 429 is a
rate limit, a signal about the destination rather than the call; 401 means the key is refused and
403 may mean the same (delivery decides, from whether other calls to the destination succeed); 409
gets a few retries; a 404 on an update means "not ingested yet" for a grace window; everything
else 4xx is the record's fault. A server's `x-should-retry` header (the Stainless convention
Openlayer's SDK obeys) overrides the status, except for 1xx/2xx/3xx, which are classified before the
header is read, and 401/403/429: those are the API's own state, never a reason to dead-letter a record.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from enum import Enum

from service.core.requests import Endpoint


class Verdict(Enum):
    SUCCESS = "success"
    RETRY = "retry"
    THROTTLED = "throttled"
    AUTH = "auth"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    NOT_YET = "not-yet"
    REJECT = "reject"


_NEVER_RETRY_5XX = frozenset({501, 505})
_RETRY_4XX = frozenset({408, 425})
_DESTINATION_STATES = {429: Verdict.THROTTLED, 401: Verdict.AUTH, 403: Verdict.FORBIDDEN}


def classify(status: int, endpoint: Endpoint, headers: Mapping[str, str]) -> Verdict:
    if 200 <= status < 300:
        return Verdict.SUCCESS
    if status < 200 or 300 <= status < 400:
        # Redirects are not followed (one to another host would carry the key along), and an interim status is
        # no answer: both are about the destination (a base URL that moved, a maintenance page), never about the
        # record, so they are waited out as an outage rather than dead-lettering every record.
        return Verdict.RETRY
    state = _DESTINATION_STATES.get(status)
    if state is not None:
        return state
    should_retry = headers.get("x-should-retry")
    if should_retry == "true":
        return Verdict.RETRY
    if should_retry == "false":
        return Verdict.REJECT
    if status >= 500:
        return Verdict.REJECT if status in _NEVER_RETRY_5XX else Verdict.RETRY
    if status in _RETRY_4XX:
        return Verdict.RETRY
    if status == 409:
        return Verdict.CONFLICT
    if status == 404 and endpoint.is_update:
        return Verdict.NOT_YET
    return Verdict.REJECT


def retry_after_s(headers: Mapping[str, str], now_epoch_s: float) -> float | None:
    """The server's requested pause in seconds: `retry-after-ms`, then `Retry-After` (seconds or date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now_epoch_s)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def backoff_s(attempt: int, initial_s: float, cap_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter in [75%, 100%], as both vendors' SDKs do.

    The jitter keeps partitions that failed together from retrying in lock-step.
    """
    base = min(cap_s, initial_s * (2.0 ** min(attempt, 30)))
    return base * (0.75 + 0.25 * rng.random())
