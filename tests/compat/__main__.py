"""`python -m tests.compat [--fast] VERSION ... [-- PYTEST_ARGS]`: the end-to-end tests on each Kafka version.

For each version, pytest runs the end-to-end tests in a child process whose brokers (the session broker and the
ones the restart and security tests start themselves) come from `<jars-root>/<version>/jars`, which `make compat`
fills from Maven Central. `KAFKA_BROKER=local` makes the session use that broker even when
`KAFKA_BOOTSTRAP_SERVERS` is set or a Docker engine answers, so a version's line is about that version. Each
version prints one line on stdout,

    compat: kafka=3.7.2 result=pass tests=50 security=yes seconds=158

and, when it fails, the failed tests and the path of its full pytest log on stderr. A version passes when pytest
passed and nothing was skipped (Kafka tests never skip). The exit status is 1 when any version failed.

The suites: `--fast` (what CI runs) is the bridge end to end (every record reaches its API as documented,
rejected and undecodable records are dead-lettered with their evidence, committed offsets equal what was done),
the broker fixture (commit, restart), the Confluent format with a schema registry, DLQ replay, the kill -9 crash
test and the security tests (SASL_SSL with SCRAM and PLAIN, TLS, mTLS). The default adds the fast fault
scenarios (kill -9 three times, poison, per-key ordering), the logs of broker restarts, rebalances and a
replaced member, and the metrics, probes and breaker tests. The security tests need SCRAM users created at
format time (KIP-900), so they run on 3.5 and later.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from tests.support.bridge import REPO
from tests.support.kafka_broker import kafka_version, supports_scram_at_format

INTEGRATION = "tests/integration"
CORE = (
    "test_kafka_broker.py",  # produce, consume, commit; topics and offsets survive a broker restart
    "test_bridge.py",  # every kind end to end, dead letters with evidence, committed offsets, retries
    "test_confluent_format.py",  # Confluent-framed records and a schema registry
    "test_replay.py",  # dead-letter replay
    "test_crash.py",  # kill -9 mid-stream
)
SECURITY = ("test_kafka_security.py",)
MORE = (
    "test_chaos_fast.py",  # kill -9 three times, poison, per-key ordering under retries
    "test_restart_logs.py",  # broker restart, rebalance, a replaced member: no ERROR
    "test_operability.py",  # metrics, probes, the breaker
)


@dataclass(frozen=True, slots=True)
class Outcome:
    version: str
    passed: bool
    tests: int
    failed: int
    skipped: int
    security: bool
    seconds: float
    log: Path

    def line(self) -> str:
        out = f"compat: kafka={self.version} result={'pass' if self.passed else 'fail'} tests={self.tests}"
        if self.failed:
            out += f" failed={self.failed}"
        if self.skipped:
            out += f" skipped={self.skipped}"
        return out + f" security={'yes' if self.security else 'no'} seconds={self.seconds:.0f}"


def suite_files(version: tuple[int, ...], fast: bool) -> tuple[list[str], bool]:
    """The test files for a version, and whether the security tests are among them."""
    security = supports_scram_at_format(version)
    names = [*CORE, *(SECURITY if security else ()), *(() if fast else MORE)]
    return [f"{INTEGRATION}/{name}" for name in names], security


def _counts(junit: Path) -> tuple[int, int, int]:
    """(tests, failed or errored, skipped) from pytest's JUnit XML; all zero when there is none."""
    if not junit.exists():
        return 0, 0, 0
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = failed = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total, failed, skipped


def run_version(version: str, jars_root: Path, log_dir: Path, fast: bool, pytest_args: list[str]) -> Outcome:
    jars = jars_root / version / "jars"
    log = log_dir / f"kafka-{version}.log"
    junit = log_dir / f"kafka-{version}.xml"
    junit.unlink(missing_ok=True)
    try:
        found = kafka_version(jars)
    except FileNotFoundError:
        log.write_text(f"no Kafka jars in {jars}: `make compat KAFKA_VERSIONS={version}` fetches them\n")
        return Outcome(version, False, 0, 0, 0, False, 0.0, log)
    if ".".join(map(str, found)) != version:
        log.write_text(f"{jars} holds Kafka {'.'.join(map(str, found))}, not {version}\n")
        return Outcome(version, False, 0, 0, 0, False, 0.0, log)
    files, security = suite_files(found, fast)
    env = {key: value for key, value in os.environ.items() if key != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(KAFKA_BROKER="local", KAFKA_JARS_DIR=str(jars.resolve()))
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit}"]
    print(f"compat: kafka={version} running {len(files)} test files, log {log}", file=sys.stderr, flush=True)
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.run(
            [*cmd, *files, *pytest_args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode
    seconds = time.monotonic() - started
    tests, failed, skipped = _counts(junit)
    passed = code == 0 and tests > 0 and failed == 0 and skipped == 0
    return Outcome(version, passed, tests - skipped, failed, skipped, security, seconds, log)


def _failures(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    found = [line for line in lines if line.startswith(("FAILED ", "ERROR ", "SKIPPED "))]
    return found or lines[-15:]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.compat", description=__doc__.split("\n\n")[0], epilog="PYTEST_ARGS after `--`"
    )
    parser.add_argument("versions", nargs="+", metavar="VERSION", help="Kafka versions, e.g. 3.7.2 3.9.2 4.4.0")
    parser.add_argument("--fast", action="store_true", help="the CI subset (see the module's docstring)")
    parser.add_argument("--jars-root", type=Path, default=REPO / ".cache" / "kafka", help="<root>/<version>/jars")
    parser.add_argument("--log-dir", type=Path, default=REPO / ".cache" / "compat", help="pytest logs and XML")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, pytest_args = _parse(argv[:cut]), argv[cut + 1 :]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for version in args.versions:
        outcome = run_version(version, args.jars_root, args.log_dir, args.fast, pytest_args)
        print(outcome.line(), flush=True)
        if not outcome.passed:
            failed = True
            print("\n".join([*_failures(outcome.log), f"log: {outcome.log}"]), file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
