"""Small versions of three `make chaos` scenarios, run inside `make test`: kill -9 mid-stream, poison of every
kind, and per-key ordering under retries and restarts. Each runs the real service as child processes, with its
default delivery settings, against the session broker (its own topics and group) and the fake APIs, then accounts
for every produced record (`tests.chaos.scenarios.account`): nothing lost, exactly the poison dead-lettered, each
with its reason, and every update key's first deliveries in produced order. The seed in the failure message
replays a failing run (`python -m tests.chaos --scenario NAME --records N --partitions 3 --seed S`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.scenarios import ChaosEnvironment, ChaosOptions, ScenarioResult, run_scenario

pytestmark = pytest.mark.kafka


async def _run(name: str, bootstrap: str, log_dir: Path, options: ChaosOptions) -> ScenarioResult:
    result = await run_scenario(name, ChaosEnvironment(bootstrap, log_dir), options)
    report = "\n".join([result.line(), *result.notes, *result.problems, *result.missed, f"service logs: {log_dir}"])
    print(report)
    assert result.lost == 0, report
    assert result.valid_dead_lettered == 0, report
    assert result.dead_lettered == result.expected_dead_lettered, report
    assert result.problems == (), report
    assert result.passed, report
    return result


async def test_kill_9_three_times_loses_nothing(kafka_bootstrap: str, tmp_path: Path) -> None:
    result = await _run("kill9", kafka_bootstrap, tmp_path, ChaosOptions(records=1500, partitions=3, kills=3))
    assert result.expected_dead_lettered > 0  # the workload carries poison, so dead letters are crash-tested too


async def test_poison_is_dead_lettered_with_its_reason_and_the_rest_flows(kafka_bootstrap: str, tmp_path: Path) -> None:
    result = await _run("poison", kafka_bootstrap, tmp_path, ChaosOptions(records=2000, partitions=3))
    assert result.delivered == result.produced - result.expected_dead_lettered


async def test_each_key_sees_its_updates_in_produced_order(kafka_bootstrap: str, tmp_path: Path) -> None:
    await _run("ordering", kafka_bootstrap, tmp_path, ChaosOptions(records=2000, partitions=3))
