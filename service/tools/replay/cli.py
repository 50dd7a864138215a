"""The replay's command line: its help, its arguments, and the options they make."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service.tools.cli import CommandParser, non_empty, whole_number
from service.tools.replay.plan import DEFAULT_MAX_REPLAYS
from service.tools.replay.runner import ReplayOptions, ReplayUsageError

_DESCRIPTION = """\
Re-produce dead letters to their source topic (header __connect.errors.topic) with the original key, value,
headers and timestamp, to the original partition when the topic still has it. Dead-letter headers are
stripped and bridge.replay.count is incremented; records already replayed --max-replays times are refused.
Reads from the group's committed position (earliest if none) up to the end offsets seen at start, and
commits after each acknowledged write, so an interrupted replay resumes where it stopped."""

_EPILOG = """\
A filtered replay consumes what it skips: progress past records that do not match --reason (and past
refused records) is committed, so a later run with the same group will not see them again. Run with
--dry-run first to see what would happen (it produces and commits nothing), and pass a fresh --group to
re-scan the whole topic. Do not run two replays with the same group at once.
Exit codes: 0 done, 1 Kafka failed mid-way (acknowledged progress is committed), 2 bad arguments or no
such dead-letter topic."""


def build_parser(default_group: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        usage_error=ReplayUsageError,
        prog="python -m service replay",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from", dest="dlq_topic", required=True, type=non_empty, metavar="TOPIC", help="dead-letter topic"
    )
    parser.add_argument(
        "--reason",
        dest="reasons",
        action="append",
        type=non_empty,
        default=[],
        metavar="REASON",
        help="replay only dead letters with this bridge.reason (repeatable); others are skipped and consumed",
    )
    parser.add_argument("--limit", type=whole_number(1), metavar="N", help="stop after N replayed records")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would happen; produce nothing, commit nothing"
    )
    parser.add_argument(
        "--max-replays",
        type=whole_number(1),
        default=DEFAULT_MAX_REPLAYS,
        metavar="N",
        help="refuse records whose bridge.replay.count is already N or more (default %(default)s)",
    )
    parser.add_argument(
        "--group",
        type=non_empty,
        default=default_group,
        metavar="GROUP",
        help="consumer group that keeps the replay's progress (default %(default)s); a fresh one re-scans",
    )
    return parser


def parse_options(argv: Sequence[str], *, default_group: str) -> ReplayOptions:
    """Raises `ReplayUsageError` on bad arguments and `ParserExit` after --help."""
    args = build_parser(default_group).parse_args(list(argv))
    return ReplayOptions(
        dlq_topic=args.dlq_topic,
        group_id=args.group,
        reasons=frozenset(args.reasons),
        limit=args.limit,
        dry_run=args.dry_run,
        max_replays=args.max_replays,
    )
