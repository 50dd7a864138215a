"""The dlq command line: its help, its arguments (with --since's durations and times), and the options they make."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from service.tools.cli import (
    CommandParser,
    non_empty,
    whole_number,
)
from service.tools.dlq.letters import (
    NO_FILTER,
    Filter,
    InspectUsageError,
)

# --- the --since argument ---------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_DURATIONS = re.compile(r"(?:\d+(?:ms|s|m|h|d|w))+")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_since(text: str, now_ms: int) -> int:
    """`30m`, `2h`, `1d12h` (that long ago) or an ISO-8601 time (`2026-11-29T10:00:00Z`, a date, an offset) as
    epoch milliseconds; a time without a zone is UTC. Raises ValueError."""
    text = text.strip()
    if _DURATIONS.fullmatch(text):
        try:
            seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))
            return now_ms - int(seconds * 1000)
        except OverflowError:  # digits past a float's range: a usage error, not a traceback
            raise ValueError(f"{text!r} is too long a duration") from None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 2h, 7d) nor an ISO-8601 time (2026-11-29T10:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# --- options and the command line -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InspectOptions:
    topics: tuple[str, ...]
    """Dead-letter topics to read; empty: the DLQs of the three configured topics."""
    filter: Filter = NO_FILTER
    show: int = 0
    as_json: bool = False
    idle_timeout_s: float = 30.0
    """Give up when partitions behind their end offset deliver nothing for this long (broker gone)."""


_DESCRIPTION = """\
Summarise dead-letter topics by reason, stage, HTTP status, source topic and age, and with --show N print the
N most recent dead letters: the value decoded from Avro to JSON with the source topic's schema (hex when it
does not decode), every header and the HTTP evidence. Read-only: reads without a consumer group, from the
beginning to the end offsets seen at start, and commits nothing."""

_EPILOG = """\
--since takes a duration (30m, 2h, 7d: that long ago) or an ISO-8601 time (2026-11-29T10:00:00Z) and compares it
with bridge.failed.at.ms, when the record was dead-lettered. Then re-drive what you fixed with
`python -m service replay --from TOPIC --reason REASON`.
Exit codes: 0 done, 1 Kafka failed, 2 bad arguments or a named topic that does not exist."""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        usage_error=InspectUsageError,
        prog="python -m service dlq",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from",
        dest="topics",
        action="append",
        type=non_empty,
        default=[],
        metavar="TOPIC",
        help="dead-letter topic (repeatable; default: the DLQs of the three configured topics)",
    )
    parser.add_argument(
        "--reason",
        dest="reasons",
        action="append",
        type=non_empty,
        default=[],
        metavar="REASON",
        help="only dead letters with this bridge.reason (repeatable)",
    )
    parser.add_argument(
        "--since", metavar="WHEN", help="only dead letters dead-lettered since WHEN (30m, 2h, an ISO time)"
    )
    parser.add_argument(
        "--show",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="print the N most recent matching dead letters in full",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="one JSON object on stdout, for scripts")
    return parser


def parse_options(argv: Sequence[str], *, now_ms: int) -> InspectOptions:
    """Raises `InspectUsageError` on bad arguments and `ParserExit` after --help."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    since_ms = None
    if args.since is not None:
        try:
            since_ms = parse_since(args.since, now_ms)
        except ValueError as exc:
            parser.error(f"argument --since: {exc}")
    return InspectOptions(
        topics=tuple(dict.fromkeys(args.topics)),
        filter=Filter(reasons=frozenset(args.reasons), since_ms=since_ms),
        show=args.show,
        as_json=args.as_json,
    )
