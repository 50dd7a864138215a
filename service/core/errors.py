"""The error tree: every failure is classified once, by stage and by what the service does about it.

    BridgeError
    ├── RecordError            permanent for this record: dead-letter it, commit, move on
    │   ├── DecodeError        the bytes are not a valid event (stage: decode)
    │   ├── RouteError         a valid event the API cannot take (stage: route)
    │   ├── RejectedError      the API refused the request for good (stage: deliver)
    │   └── InternalError      our own bug met this record: dead-letter it rather than crash
    ├── TransientError         an outage, not a bad record: wait and retry, never dead-letter
    │   ├── RegistryUnavailable    the schema registry did not answer
    │   └── RetryableDeliveryError a network error or a retryable status
    └── FatalError             the service cannot keep its promise: stop without committing
        └── DeadLetterWriteError   the dead-letter topic did not acknowledge

Third-party exceptions are converted at the module that talks to the third party
(`raise ... from exc`), so nothing past codec, delivery or deadletter sees fastavro, httpx or aiokafka.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Stage(StrEnum):
    """Where a record failed, in Kafka Connect's vocabulary so existing DLQ tooling reads it."""

    DECODE = "VALUE_CONVERTER"
    ROUTE = "TRANSFORMATION"
    DELIVER = "TASK_PUT"


@dataclass(frozen=True, slots=True)
class HttpEvidence:
    """What the API said, kept for the dead-letter headers and the logs. Never holds a secret."""

    method: str
    url: str
    """The request URL with its query (record ids, never credentials: those travel in headers)."""
    status: int | None
    """None when no response arrived (connect error, timeout, reset)."""
    body: str = ""
    """The response body, truncated to the configured size. Not redacted, and a secret echoed across the cut
    would be only partly in it: a dead letter is built from `body_window` instead."""
    attempts: int = 1
    retry_after_s: float | None = None
    """The server's Retry-After / retry-after-ms, in seconds, when it sent one."""
    headers: dict[str, str] = field(default_factory=dict)
    """A few response headers worth keeping (request ids, content type)."""
    body_window: str | None = None
    """The response body cut `EVIDENCE_REDACTION_MARGIN_BYTES` past the configured size, so that it can be redacted
    before it is cut to `body_limit`; None when `body` is all there is."""
    body_limit: int | None = None
    """How many bytes of the redacted body a dead letter keeps; None keeps it whole."""


EVIDENCE_REDACTION_MARGIN_BYTES = 4096
"""How much of a response body is kept past the evidence limit until it is redacted: more than any secret (an API
key is under 200 characters, even escaped), so a secret that starts before the cut is whole when redacted."""


class BridgeError(Exception):
    """Base of every error the service raises on purpose."""

    reason: str = "error"
    """A short, stable, machine-readable code (the DLQ's reason header, a metric label)."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class RecordError(BridgeError):
    """This record can never succeed as it is: dead-letter it."""

    stage: Stage = Stage.DELIVER


class DecodeError(RecordError):
    stage = Stage.DECODE
    reason = "decode-failed"


class RouteError(RecordError):
    stage = Stage.ROUTE
    reason = "unroutable"


class RejectedError(RecordError):
    """The API answered with a permanent refusal; the evidence goes to the DLQ."""

    stage = Stage.DELIVER
    reason = "rejected"

    def __init__(self, message: str, evidence: HttpEvidence, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.evidence = evidence


class InternalError(RecordError):
    """An unexpected exception while handling one record. The service never crashes on a record:
    the record is dead-lettered with the exception, and the log says it is a bug to report."""

    reason = "internal-error"


class TransientError(BridgeError):
    """An outage: the same record will succeed later. Retried without limit, never dead-lettered."""

    reason = "transient"


class RegistryUnavailable(TransientError):
    reason = "registry-unavailable"


class RetryableDeliveryError(TransientError):
    reason = "retryable"

    def __init__(self, message: str, evidence: HttpEvidence, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.evidence = evidence


class FatalError(BridgeError):
    """The service cannot keep its delivery promise; stop without committing and exit non-zero."""

    reason = "fatal"


class DeadLetterWriteError(FatalError):
    reason = "dlq-write-failed"
