"""Dead-letter replay: re-produce dead letters to their source topic, so the bridge tries them again.

`python -m service replay --from <topic>.dlq` reads the dead-letter topic with its own consumer group,
from that group's committed position up to the end offsets seen at start (so it terminates even while
the bridge keeps dead-lettering), and re-produces each dead letter's original key, value bytes, headers
and timestamp to the topic named by `__connect.errors.topic`, to the original partition when the
source topic still has it. The dead-letter evidence (`__connect.errors.*`, `bridge.*`) is stripped and
`bridge.replay.count` is carried forward plus one, so a record that keeps failing is refused after
`--max-replays` rounds instead of cycling forever. Progress is committed only after the broker
acknowledged the replayed record (acks=all, idempotent producer): a crash replays at least once,
never loses. The decisions are pure functions (plan.py), Kafka is touched only by runner.py, and cli.py
turns the arguments into options.
"""

from __future__ import annotations

import asyncio
import sys

from service.config.settings import Settings
from service.core.errors import BridgeError
from service.tools.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ParserExit
from service.tools.replay.cli import parse_options
from service.tools.replay.runner import ReplayUsageError, replay


def main(argv: list[str], settings: Settings) -> int:
    """`python -m service replay ...`: prints the summary line and returns the exit code."""
    try:
        options = parse_options(argv, default_group=f"{settings.kafka.group_id}-replay")
        summary = asyncio.run(replay(settings, options))
    except ParserExit as exc:
        return exc.status
    except ReplayUsageError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(summary.line())
    return EXIT_OK
