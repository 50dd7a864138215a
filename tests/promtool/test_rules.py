"""The chart's alerts under promtool: `promtool check rules` on the PrometheusRule as `helm template` renders it,
and `promtool test rules` with the unit tests beside this file, one file per alert, each with series that fire the
alert (after its `for`) and series that must not. The unit tests assume the chart's default values for release
"test" in namespace "streaming" (selector namespace="streaming",job="test-inference-bridge").

promtool comes from `make prometheus` (.cache/bin/promtool; PROMTOOL_BIN overrides it) and helm from `make helm`:
without them these tests fail, they never skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.test_dashboard import REQUIRED, ROOT, helm_template

PROMTOOL = Path(os.environ.get("PROMTOOL_BIN") or ROOT / ".cache" / "bin" / "promtool")
UNIT_TESTS = sorted(Path(__file__).parent.glob("*.yml"))
FULL_VALUES = ROOT / "tests" / "helm" / "values-full.yaml"
RULES_ON = ("--set", "prometheusRule.enabled=true")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.exists():
        pytest.fail(f"{PROMTOOL} is missing: run `make prometheus` first (these tests never skip)", pytrace=False)
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, check=False, timeout=120, cwd=cwd)


def rule_file(*helm_args: str) -> dict[str, Any]:
    """The PrometheusRule's spec: a Prometheus rule file as it is."""
    (rule,) = [doc for doc in helm_template(*helm_args) if doc["kind"] == "PrometheusRule"]
    spec: dict[str, Any] = rule["spec"]
    return spec


def alerts(rules: dict[str, Any]) -> list[str]:
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def default_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rules.yml as the unit tests name it, in a folder of its own that the unit test files are copied into."""
    folder = tmp_path_factory.mktemp("promtool")
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump(rule_file(*REQUIRED, *RULES_ON), sort_keys=False))
    return path


@pytest.mark.parametrize("values", ["default", "full"])
def test_rendered_rules_pass_promtool_check(values: str, tmp_path: Path) -> None:
    args = (*REQUIRED, *RULES_ON) if values == "default" else ("-f", str(FULL_VALUES))
    rules = rule_file(*args)
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))

    checked = promtool("check", "rules", "--lint=all", "--lint-fatal", str(path))

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts(rules))} rules found" in checked.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not(default_rules: Path) -> None:
    fires: dict[str, set[str]] = {}
    silent: dict[str, set[str]] = {}
    for path in UNIT_TESTS:
        unit = yaml.safe_load(path.read_text())
        assert unit["rule_files"] == ["rules.yml"], path.name
        for case in unit["tests"]:
            for check in case.get("alert_rule_test", []):
                into = fires if check.get("exp_alerts") else silent
                into.setdefault(check["alertname"], set()).add(path.name)
    rendered = alerts(yaml.safe_load(default_rules.read_text()))
    assert set(rendered) == set(fires) | set(silent), "unit tests name only the chart's alerts"
    for alert in rendered:
        assert alert in fires, f"no unit test expects {alert} to fire"
        assert alert in silent, f"no unit test expects {alert} to stay silent"


@pytest.mark.parametrize("unit", UNIT_TESTS, ids=[path.stem for path in UNIT_TESTS])
def test_alert_unit_tests_pass(unit: Path, default_rules: Path) -> None:
    # promtool reads rule_files relative to the test file: put it beside the rendered rules.yml.
    copy = default_rules.parent / unit.name
    shutil.copyfile(unit, copy)

    tested = promtool("test", "rules", copy.name, cwd=default_rules.parent)

    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
