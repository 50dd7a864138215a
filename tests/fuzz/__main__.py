"""`make fuzz`: push a million mutated records through decode + route and judge every outcome.

Each record is a seed (tests/fuzz/mutate.py) mutated, decoded by the codec (auto wire format with the in-memory
registry, or, for 15% of them, without a registry), routed, and its request judged by the fake APIs' own
validation (tests/fuzz/rig.py). Prints a count per outcome: `request:<endpoint>` for records that became a
request the API accepts, the `bridge.reason` of the others. Findings are counted apart and make the exit code 1:
crashes (an exception other than a RecordError), unclassified refusals (a reason the documentation does not
list) and spec violations (a request the API would refuse). The first few of each are saved under .cache/fuzz/
with a replay command; a finding belongs in a regular test (tests/unit/test_fuzz_*.py) once understood.

    python -m tests.fuzz [--records N] [--seed S] [--seeds N]
    python -m tests.fuzz --replay .cache/fuzz/crash-1-inference-registry.bin
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from service.core.errors import RecordError
from service.core.events import EventKind
from tests.fuzz.mutate import Mutator, seeds
from tests.fuzz.rig import ROOT, Rig, SpecJudge, undocumented

FINDINGS_DIR: Final = ROOT / ".cache" / "fuzz"
SAVED_PER_KIND: Final = 5
NO_REGISTRY_SHARE: Final = 0.15
FINDING_KINDS: Final = ("crash", "unclassified", "spec-violation")


class Run:
    def __init__(self, rig: Rig, judge: SpecJudge) -> None:
        self.rig = rig
        self.judge = judge
        self.outcomes: Counter[str] = Counter()
        self.findings: Counter[str] = Counter()
        self.notes: list[str] = []

    async def one(self, kind: EventKind, value: bytes, registry: bool) -> tuple[str, str] | None:
        """Judge one record: None when its outcome is acceptable, else (finding kind, description)."""
        try:
            event, request = await self.rig.adecode_and_route(kind, value, registry=registry)
        except RecordError as error:
            self.outcomes[error.reason] += 1
            problem = undocumented(error)
            return None if problem is None else ("unclassified", problem)
        except Exception as exc:  # noqa: BLE001 - that is what a fuzzer looks for
            self.outcomes[f"crash:{type(exc).__name__}"] += 1
            return "crash", "".join(traceback.format_exception(exc)).rstrip()
        problem = await self.judge.problem(request, event)
        if problem is not None:
            self.outcomes["spec-violation"] += 1
            return "spec-violation", problem
        self.outcomes[f"request:{request.endpoint.value}"] += 1
        return None

    def found(self, finding: str, description: str, kind: EventKind, value: bytes, registry: bool, how: str) -> None:
        self.findings[finding] += 1
        number = self.findings[finding]
        if number > SAVED_PER_KIND:
            return
        FINDINGS_DIR.mkdir(parents=True, exist_ok=True)
        path = FINDINGS_DIR / f"{finding}-{number}-{kind.value}-{'registry' if registry else 'plain'}.bin"
        path.write_bytes(value)
        self.notes.append(
            f"{finding} #{number} ({how}, {kind.value}, {len(value)} bytes): {description}\n"
            f"  replay: python -m tests.fuzz --replay {path.relative_to(ROOT)}"
        )


async def fuzz(records: int, seed: int, seed_count: int) -> int:
    rng = random.Random(seed)
    started = time.perf_counter()
    corpus = seeds(rng, seed_count)
    mutator = Mutator(rng, corpus)
    rig, judge = Rig(), SpecJudge()
    run = Run(rig, judge)
    print(
        f"fuzz: {records:,} mutated records through decode + route + API spec check "
        f"(seed {seed}, {len(corpus):,} seed records)",
        flush=True,
    )
    step = max(records // 10, 1)
    for index in range(1, records + 1):
        kind, value, how = mutator.next()
        registry = rng.random() >= NO_REGISTRY_SHARE
        finding = await run.one(kind, value, registry)
        if finding is not None:
            run.found(*finding, kind, value, registry, how)
        if index % step == 0:
            elapsed = time.perf_counter() - started
            print(f"  ... {index:,} records, {elapsed:.0f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    await rig.aclose()

    width = max(len(name) for name in run.outcomes)
    print(f"  {'outcome':<{width}}  {'records':>9}")
    requests = sorted(name for name in run.outcomes if name.startswith("request:"))
    refusals = sorted(name for name in run.outcomes if name not in requests)
    for name in [*requests, *refusals]:
        print(f"  {name:<{width}}  {run.outcomes[name]:>9,}")
    for note in run.notes:
        print(note, file=sys.stderr)
    print(
        f"crashes: {run.findings['crash']}, unclassified errors: {run.findings['unclassified']}, "
        f"spec violations: {run.findings['spec-violation']}"
    )
    print(f"{records:,} records in {elapsed:.1f} s ({records / elapsed:,.0f} records/s), seed {seed}")
    return 1 if sum(run.findings.values()) else 0


async def replay(path: Path) -> int:
    _, kind_name, mode = path.stem.rsplit("-", 2)  # <finding>-<n>-<kind>-<registry|plain>
    kind = EventKind(kind_name)
    value = path.read_bytes()  # noqa: ASYNC240 - one small file before anything runs
    rig, judge = Rig(), SpecJudge()
    run = Run(rig, judge)
    print(f"replaying {path} ({len(value)} bytes) as {kind.value}, {mode}: {value[:64].hex()}")
    finding = await run.one(kind, value, registry=mode == "registry")
    await rig.aclose()
    if finding is None:
        print(f"fine now: {dict(run.outcomes)}")
        return 0
    print(f"{finding[0]}: {finding[1]}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="records to fuzz (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument("--seeds", type=int, default=2_000, help="valid seed records to mutate (default 2,000)")
    parser.add_argument("--replay", type=Path, help="judge one saved finding again")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return asyncio.run(replay(args.replay))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    return asyncio.run(fuzz(args.records, seed, args.seeds))


if __name__ == "__main__":
    sys.exit(main())
