"""The chart's dashboard and alerts proven on a real Prometheus scraping the real service.

The service runs on the real broker with the fake APIs through a short demo-like run: records on all three
topics in a few waves, some refused by the API (dead letters), some that are not Avro, some 503s that are
retried. A Prometheus started here scrapes its /metrics every second, with the target labels a ServiceMonitor
gives (namespace, job, pod), and loads the PrometheusRule that `helm template` renders. Then, through
Prometheus's HTTP API:
- the dashboard's namespace/job/pod variables resolve to this release;
- every panel query of the rendered dashboard, with Grafana's variables substituted, runs without error and
  returns series, both as an instant query and over the run as a range query;
- every metric a panel or an alert names is one Prometheus scraped, and each alert's selectors match series;
- every alert expression evaluates without error, and Prometheus evaluated every loaded rule healthily.

prometheus comes from `make prometheus` (.cache/bin/prometheus; PROMETHEUS_BIN overrides it) and helm from
`make helm`: without them this test fails, it never skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helm.test_dashboard import (
    ENABLED,
    LABEL_VALUES,
    NAMESPACE,
    REQUIRED,
    ROOT,
    helm_template,
    query_variables,
    rendered_dashboard,
    selectors,
    substitute,
    targets,
    variable_query,
)
from tests.integration.cases import CASES, is_marked
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import Topics, running_bridge
from tests.support.fake_apis import FakeApiServer, Fault
from tests.support.kafka_broker import free_port
from tests.support.kafka_io import all_committed, eventually, produce

pytestmark = pytest.mark.kafka

PROMETHEUS = Path(os.environ.get("PROMETHEUS_BIN") or ROOT / ".cache" / "bin" / "prometheus")
JOB = "test-inference-bridge"
"""The job a ServiceMonitor of release "test" produces, which the rendered alerts select."""
POD = "test-inference-bridge-6d5f8b7c9-x2x4q"
SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "15s"
"""$__rate_interval for a 1 s scrape: Grafana takes at least four scrape intervals; 15 s spans the waves."""
WAVES = 3
ENCODER = AvroEncoder()


# --- Prometheus -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def prometheus(workdir: Path, target_port: int, rules: Path) -> Iterator[tuple[str, Callable[[], str | None]]]:
    """A throwaway Prometheus scraping 127.0.0.1:`target_port` and evaluating `rules`: (its URL, a function that
    returns its log once it has exited, else None)."""
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} is missing: run `make prometheus` first (this test never skips)", pytrace=False)
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{target_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def exited() -> str | None:
        return None if process.poll() is None else log_path.read_text()

    try:
        yield f"http://127.0.0.1:{port}", exited
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_ready(prom: httpx.AsyncClient, exited: Callable[[], str | None]) -> None:
    async def ready() -> bool:
        log = exited()
        assert log is None, f"prometheus exited:\n{log}"
        with contextlib.suppress(httpx.TransportError):
            return (await prom.get("/-/ready")).status_code == 200
        return False

    await eventually(ready, timeout_s=30, what="prometheus ready")


async def api(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    """The `data` of a successful API answer; an AssertionError with Prometheus's error otherwise."""
    answer = await client.get(f"/api/v1/{path}", params=params)
    body = answer.json()
    assert answer.status_code == 200, f"{path} {params}: HTTP {answer.status_code} {body.get('error')}"
    assert body["status"] == "success", f"{path} {params}: {body}"
    return body["data"]


async def query(client: httpx.AsyncClient, expr: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(error, result) of an instant query: Prometheus's error text, or None and the series."""
    answer = await client.get("/api/v1/query", params={"query": expr})
    body = answer.json()
    if body.get("status") != "success":
        return f"{body.get('errorType')}: {body.get('error')}", []
    return None, body["data"]["result"]


async def scalar(client: httpx.AsyncClient, expr: str) -> float:
    error, result = await query(client, expr)
    if error or not result:
        return math.nan
    return float(result[0]["value"][1])


# --- the run ----------------------------------------------------------------------------------------------------


def rendered(workdir: Path) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """The chart as a platform team would install it, with alerts and dashboard on: (rules file, dashboard, alerts)."""
    docs = helm_template(*REQUIRED, *ENABLED, "--set", "prometheusRule.enabled=true")
    (rule,) = [doc for doc in docs if doc["kind"] == "PrometheusRule"]
    path = workdir / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    return path, rendered_dashboard(docs), alerts


async def demo_traffic(bootstrap: str, topics: Topics, wave: int) -> int:
    """One wave: per topic a few good records, one the API refuses and, on log updates, one that is not Avro."""
    produced = 0
    for case in CASES:
        values = [ENCODER.plain(case.kind, case.datum(wave * 10 + i, i == 2)) for i in range(4)]
        if case.kind == "log_update":
            values.append(b"\x01not avro")
        await produce(bootstrap, case.topic_of(topics), values)
        produced += len(values)
    return produced


async def test_dashboard_queries_and_alert_expressions_run_on_a_real_prometheus(
    kafka_bootstrap: str,
    topics: Topics,
    fake_apis: FakeApiServer,
    bridge_env: dict[str, str],
    tmp_path: Path,
) -> None:
    rules_path, dashboard, alerts = rendered(tmp_path)
    metrics_port = free_port()
    env = {**bridge_env, "BRIDGE_OBSERVABILITY__HTTP_PORT": str(metrics_port)}
    for case in CASES:
        fake_apis.reject_when(case.endpoint, is_marked, Fault(status=422))
    # A few 503s: retried (bridge_api_retries_total), never dead-lettered.
    fake_apis.script("update_row", [Fault(status=503), Fault(status=503)])
    fake_apis.script("update_log", [Fault(status=503)])
    group = env["BRIDGE_KAFKA__GROUP_ID"]
    started = time.time()

    with prometheus(tmp_path, metrics_port, rules_path) as (url, exited):
        async with running_bridge(env), httpx.AsyncClient(base_url=url, timeout=10) as prom:
            await wait_ready(prom, exited)
            produced = 0
            for wave in range(WAVES):
                produced += await demo_traffic(kafka_bootstrap, topics, wave)
                await eventually(partial(all_committed, kafka_bootstrap, group, *topics.all()), what=f"wave {wave}")
                await asyncio.sleep(2 * SCRAPE_INTERVAL_S)

            async def scraped_everything() -> bool:
                # The last scrape saw the drained state, and there are enough samples for rate() over the window.
                consumed = await scalar(prom, f'sum(bridge_records_consumed_total{{job="{JOB}"}})')
                samples = await scalar(prom, f'count_over_time(up{{job="{JOB}"}}[{RATE_INTERVAL}])')
                return consumed == produced and samples >= 5

            await eventually(scraped_everything, what="prometheus scraped the whole run")
            problems = await check_dashboard(prom, dashboard, started)
            problems += await check_what_the_run_shows(prom, dashboard, topics)
            problems += await check_alerts(prom, alerts)

    assert not problems, "\n".join(problems)


async def check_dashboard(prom: httpx.AsyncClient, dashboard: dict[str, Any], started: float) -> list[str]:
    problems: list[str] = []
    # The variables, resolved as Grafana does: label_values(selector, label) over the series API.
    values: dict[str, str] = {}
    for variable in query_variables(dashboard):
        match = LABEL_VALUES.match(substitute(variable_query(variable), values))
        assert match, variable
        found = await api(prom, f"label/{match['label']}/values", **{"match[]": match["selector"]})
        expected = {"namespace": NAMESPACE, "job": JOB, "pod": POD}[variable["name"]]
        if found != [expected]:
            problems.append(f"variable {variable['name']}: {found}, expected [{expected!r}]")
        values[variable["name"]] = expected
    elapsed_s = math.ceil(time.time() - started) + 5
    grafana = {"__rate_interval": RATE_INTERVAL, "__interval": f"{SCRAPE_INTERVAL_S}s", "__range": f"{elapsed_s}s"}
    scraped = set(await api(prom, "label/__name__/values"))
    # Each query twice: the pod variable at the one pod, and at All (".*").
    for pod in (POD, ".*"):
        for panel, target in targets(dashboard):
            expr = substitute(target["expr"], {**values, "pod": pod, **grafana})
            where = f"panel {panel['title']!r} {target['refId']} (pod={pod})"
            if "$" in expr:
                problems.append(f"{where}: unsubstituted variable in {expr}")
                continue
            missing = {metric for metric, _ in selectors(expr)} - scraped
            if missing:
                problems.append(f"{where}: metrics Prometheus never scraped: {missing}")
            error, result = await query(prom, expr)
            if error:
                problems.append(f"{where}: {error}\n    {expr}")
            elif not result:
                problems.append(f"{where}: no series\n    {expr}")
            if target.get("range", True):
                end = time.time()
                answer = await prom.get(
                    "/api/v1/query_range",
                    params={"query": expr, "start": started, "end": end, "step": f"{SCRAPE_INTERVAL_S}s"},
                )
                body = answer.json()
                if body.get("status") != "success":
                    problems.append(f"{where}: range query: {body.get('error')}")
                elif not body["data"]["result"]:
                    problems.append(f"{where}: range query: no series")
    return problems


async def check_what_the_run_shows(prom: httpx.AsyncClient, dashboard: dict[str, Any], topics: Topics) -> list[str]:
    """The demo run's events, as the panels show them over the whole run."""
    variables = {"namespace": NAMESPACE, "job": JOB, "pod": ".*", "__rate_interval": "10m", "__range": "10m"}
    exprs = {
        (panel["title"], target["refId"]): substitute(target["expr"], variables) for panel, target in targets(dashboard)
    }
    expected = {
        ("Records consumed per topic", "A"): ("topic", set(topics.all())),
        ("Dead letters by reason", "A"): ("reason", {"http-422", "truncated"}),
        ("API calls by endpoint and status class", "A"): ("status_class", {"2xx", "4xx", "5xx"}),
        ("Retries by endpoint and reason", "A"): ("reason", {"retry"}),
        ("Breaker open and destination paused", "A"): ("destination", {"openlayer", "humanloop"}),
        ("Concurrency limit per destination", "A"): ("destination", {"openlayer", "humanloop"}),
    }
    problems = []
    for key, (label, values) in expected.items():
        assert key in exprs, f"no panel {key}"
        _, result = await query(prom, exprs[key])
        seen = {series["metric"].get(label) for series in result}
        if not values <= seen:
            problems.append(f"panel {key[0]!r}: {label} {sorted(map(str, seen))}, expected at least {sorted(values)}")
    return problems


async def check_alerts(prom: httpx.AsyncClient, alerts: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    scraped = set(await api(prom, "label/__name__/values"))
    for alert in alerts:
        name, expr = alert["alert"], alert["expr"]
        error, _ = await query(prom, expr)
        if error:
            problems.append(f"alert {name}: {error}\n    {expr}")
        for metric, matchers in selectors(expr):
            if metric not in scraped:
                problems.append(f"alert {name}: Prometheus never scraped {metric}")
                continue
            # The alert's own selector (namespace and job of the release) must find the service's series.
            error, result = await query(prom, f"count({metric}{{{matchers}}})")
            if error or not result:
                problems.append(f"alert {name}: {metric}{{{matchers}}} selects nothing ({error})")

    # The rules Prometheus loaded from the rendered file: every one evaluated, none failed.
    async def evaluated() -> bool:
        groups = (await api(prom, "rules"))["groups"]
        return all(not r["lastEvaluation"].startswith("0001") for g in groups for r in g["rules"])

    await eventually(evaluated, timeout_s=30, what="every rule evaluated")
    loaded = [r for g in (await api(prom, "rules"))["groups"] for r in g["rules"]]
    if sorted(r["name"] for r in loaded) != sorted(a["alert"] for a in alerts):
        problems.append(f"prometheus loaded {[r['name'] for r in loaded]}")
    problems += [f"rule {r['name']}: {r['health']} {r.get('lastError')}" for r in loaded if r["health"] != "ok"]
    return problems
