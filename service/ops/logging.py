"""Structured logs: one JSON object per line, with the record's coordinates and no secrets.

Log calls pass context through `extra=`; the formatter writes those fields next to the message.
Every line goes through the `Redactor`, so an API key that reached a message by accident (an
exception text, an echoed response body) is replaced before it leaves the process.

A broker restart or a group rebalance is not an error: `ExpectedKafkaErrors` lowers the few aiokafka
ERROR records those cause to WARNING and says why, so ERROR stays meaningful for alerting.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

# Attributes every LogRecord has; anything else was passed through `extra=` and is context.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Redact before encoding too: JSON escaping would hide a secret that contains " or \.
        scrubbed = self._scrub(entry)
        return self._redact(orjson.dumps(scrubbed, default=lambda v: self._redact(str(v))).decode())

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value


COORDINATOR_MOVED: Final = "group coordinator moved or restarted; aiokafka reconnects"
BROKER_UNREACHABLE: Final = "broker restarting or briefly unreachable; aiokafka reconnects"

# aiokafka (0.14) ERROR records, by (logger, message template), that a broker restart, a group rebalance or
# a dead member's replacement joining cause every time, and that aiokafka recovers from by itself:
# - a coordinator request failing in transport ("Error sending JoinGroupRequest ... marking coordinator
#   dead"): the broker went away mid-request. aiokafka finds the coordinator again and rejoins. (A
#   JoinGroup held for a kill -9'd member no longer times out: service/kafka/clients.py sets the
#   request timeout above the rebalance timeout.);
# - connection failures while the broker is down. These are expected only for a while: see OUTAGE_AFTER_S.
# Matching is by exact template, so a record aiokafka words differently passes through unchanged.
EXPECTED_KAFKA_RECORDS: Final[Mapping[tuple[str, str], str]] = {
    ("aiokafka.consumer.group_coordinator", "Error sending %s to node %s [%s] -- marking coordinator dead"): (
        COORDINATOR_MOVED
    ),
    ("aiokafka.consumer.group_coordinator", "Heartbeat send request failed: %s. Will retry."): COORDINATOR_MOVED,
    ("aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s"): BROKER_UNREACHABLE,
    ("aiokafka", "Unable connect to node with id %s: %s"): BROKER_UNREACHABLE,
    ("aiokafka", "Unable to update metadata from %s"): BROKER_UNREACHABLE,
    ("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s"): BROKER_UNREACHABLE,
}
OUTAGE_AFTER_S: Final = 60.0
"""A broker unreachable for longer than this is an outage, not a restart: its records stay at ERROR."""
_QUIET_S: Final = 10.0
"""aiokafka retries every 100 ms while the broker is down; this long without a failure means it came back."""


class ExpectedKafkaErrors(logging.Filter):
    """Lowers the aiokafka ERROR records of a restart or rebalance to WARNING with an `expected` field.

    Connection failures are lowered only during the first `outage_after_s` of a run of them (one run ends
    after `_QUIET_S` without one); past that the records keep ERROR and say for how long Kafka has been
    unreachable. Any other record passes unchanged. Records lowered below `level` are dropped, as they
    would have been had aiokafka logged them at WARNING. Install it on the handler: a logger's filters do
    not see its children's records. It changes the record in place (Python 3.11 filters cannot replace
    it), after the handlers of the `aiokafka` loggers have seen it.
    """

    def __init__(self, level: int = logging.NOTSET, *, outage_after_s: float = OUTAGE_AFTER_S) -> None:
        super().__init__()
        self._level = level
        self._outage_after_s = outage_after_s
        self._unreachable_since: float | None = None
        self._last_unreachable = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR or not isinstance(record.msg, str):
            return True
        why = EXPECTED_KAFKA_RECORDS.get((record.name, record.msg))
        if why is None:
            return True
        if why == BROKER_UNREACHABLE:
            if self._unreachable_since is None or record.created - self._last_unreachable > _QUIET_S:
                self._unreachable_since = record.created
            self._last_unreachable = record.created
            unreachable_s = record.created - self._unreachable_since
            record.kafka_unreachable_s = round(unreachable_s, 1)
            if unreachable_s >= self._outage_after_s:
                return True
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.expected = why
        return record.levelno >= self._level


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        context = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        line = super().format(record)
        return self._redact(f"{line} {context}" if context else line)


def configure_logging(level: str, fmt: str, redact: Callable[[str], str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    root.setLevel(level)
    handler.addFilter(ExpectedKafkaErrors(root.level))
    root.handlers[:] = [handler]
    # aiokafka logs every reconnect at ERROR/WARNING; keep them (the expected ones lowered to WARNING by
    # ExpectedKafkaErrors), but not its INFO chatter.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpx").setLevel(logging.WARNING)
