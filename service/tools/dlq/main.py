"""Dead-letter inspection: what sits in a DLQ, why, since when, and what the records hold. Read-only.

`python -m service dlq` reads dead-letter topics (the three configured topics' DLQs, or `--from`) from their
beginning to the end offsets seen at start, with a consumer that has no group: it is assigned the partitions
and never commits, so it moves no group's position (neither the bridge's nor a replay's). Topics are looked
up by listing them, never by name, because a metadata request that names a topic creates it on brokers that
auto-create. It summarises by reason, stage, HTTP status, source topic and age (from `bridge.failed.at.ms`);
`--show N` prints the N most recent dead letters with their value decoded from Avro to JSON through the
service's own codec and the source topic's schema (hex when it does not decode), every header and the HTTP
evidence. Headers were redacted when written; everything printed passes through the redactor again, with the
secrets configured now. Reading a header is pure (`Letter.of`); Kafka is touched only by `_scan`.
"""

from __future__ import annotations

import asyncio
import sys
import time

from service.config.settings import Settings
from service.core.errors import BridgeError
from service.ops.redaction import Redactor
from service.tools.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ParserExit,
)
from service.tools.dlq.cli import parse_options
from service.tools.dlq.letters import InspectUsageError
from service.tools.dlq.reader import inspect
from service.tools.dlq.render import render


def main(argv: list[str], settings: Settings, redact: Redactor) -> int:
    """`python -m service dlq ...`: prints the report and returns the exit code."""
    try:
        options = parse_options(argv, now_ms=int(time.time() * 1000))
        report = asyncio.run(inspect(settings, options))
    except ParserExit as exc:
        return exc.status
    except InspectUsageError as exc:
        print(f"dlq: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        print(f"dlq: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    print(render(report, options, redact))
    return EXIT_OK
