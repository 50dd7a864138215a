"""`python -m tests.chaos [--scenario NAME ...] [--records N]`: run fault scenarios, one result line each.

Each scenario prints exactly one line on stdout,

    scenario=<name> produced=<n> delivered=<n> duplicates=<n> duplicate_deliveries=<n> duplicate_dead_letters=<n>
    dead_lettered=<n> expected_dead_lettered=<n> valid_dead_lettered=<n> lost=<n> [<figure>=<v> <target>=<t> ...]
    result=<pass|fail>

(on one line), and its notes, problems and duration on stderr. `duplicates` is the sum of the two duplicate
counts. The scenarios that measure speed add their figures before `result`, each with its target, e.g.
`share=0.83 target=0.5` (a share of a healthy run of the same records) or `share_429=0.04 max_429=0.1`; a value
printed as `<0.05` or `>60` is a bound, from a measurement that gave up. A scenario fails when a record is lost,
a valid record is dead-lettered, the dead letters differ from the planted poison, an invariant breaks or a figure
misses its target. The exit status is 1 when any scenario failed. The broker is `KAFKA_BOOTSTRAP_SERVERS` when
set, else a local one from the Kafka jars (`make kafka-jars`); `broker-restart` needs a broker it can restart, so
with an external one it starts its own.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from pathlib import Path

from tests.chaos.scenarios import SCENARIOS, ChaosEnvironment, ChaosOptions, ScenarioResult, run_scenario
from tests.support.bridge import REPO
from tests.support.kafka_broker import kafka_endpoint


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run this scenario (repeatable); default: all, in the order listed",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help="records per scenario over the three topics (default: each scenario's own, 21,000 unless it names one)",
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument("--kills", type=int, default=6, help="kill9: SIGKILLs per run (at least 5 by the spec)")
    parser.add_argument("--outage-s", type=float, default=60.0, help="outage: how long the API answers nothing")
    parser.add_argument("--seed", type=int, default=None, help="replay the random choices of an earlier run")
    parser.add_argument("--jars", type=Path, default=REPO / ".cache" / "kafka" / "jars", help="the Kafka jars")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="service logs (default .cache/chaos/<time>, kept for reading)"
    )
    return parser.parse_args(argv)


def _report(result: ScenarioResult) -> None:
    print(result.line(), flush=True)
    for note in result.notes:
        print(f"  [{result.name}] {note}", file=sys.stderr)
    for problem in [*result.problems, *result.missed]:
        print(f"  [{result.name}] PROBLEM: {problem}", file=sys.stderr)
    print(f"  [{result.name}] took {result.duration_s:.1f}s", file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace) -> int:
    names = args.scenario or list(SCENARIOS)
    log_dir = args.log_dir or REPO / ".cache" / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"chaos: service logs in {log_dir}", file=sys.stderr, flush=True)
    options = ChaosOptions(
        records=args.records, partitions=args.partitions, kills=args.kills, outage_s=args.outage_s, seed=args.seed
    )
    failed = 0
    with kafka_endpoint(args.jars) as endpoint:
        env = ChaosEnvironment(endpoint.bootstrap_servers, log_dir, endpoint.local, args.jars)
        for name in names:
            try:
                result = await run_scenario(name, env, options)
            except Exception as exc:  # noqa: BLE001 - one scenario's harness failure must not hide the others
                detail = "".join(traceback.format_exception(exc))
                result = ScenarioResult(name, 0, problems=(f"the scenario itself failed:\n{detail}",))
            _report(result)
            failed += not result.passed
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_run(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
