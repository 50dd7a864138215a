"""The chart's Grafana dashboard: an opt-in ConfigMap for Grafana's dashboard sidecar, holding
dashboards/inference-bridge.json untouched, and a dashboard whose every query picks the data source from its
variable, selects the release with the namespace/job/pod variables, rates over $__rate_interval and uses only
metrics and labels the service exports. Whether each query runs and returns series on a real Prometheus scraping
the real service is tests/integration/test_prometheus.py's job; the helpers here are shared with it.
helm comes from `make helm` (.cache/bin/helm): without it these tests fail, they never skip."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".cache" / "bin" / "helm"
CHART = ROOT / "helm" / "inference-bridge"
DASHBOARD_FILE = CHART / "dashboards" / "inference-bridge.json"
NAMESPACE = "streaming"
RELEASE = "test"
REQUIRED = ("--set", "config.kafka.bootstrapServers=kafka:9092", "--set", "secrets.existingSecret=bridge-keys")
ENABLED = ("--set", "grafanaDashboard.enabled=true")
KUBE_VERSION = "1.31.0"
RELEASE_MATCHERS = ('namespace=~"$namespace"', 'job=~"$job"', 'pod=~"$pod"')
"""Every selector of every panel query carries these: the variables pick one release's pods."""
TARGET_LABELS = {"namespace", "job", "pod", "instance"}
"""Labels Prometheus (the Operator's ServiceMonitor) puts on every series it scrapes."""

Manifest = dict[str, Any]


# --- helpers (tests/integration/test_prometheus.py uses them too) ------------------------------------------------


def helm_template(*args: str) -> list[Manifest]:
    if not HELM.exists():
        pytest.fail(
            f"{HELM.relative_to(ROOT)} is missing: run `make helm` first (chart tests never skip)", pytrace=False
        )
    result = subprocess.run(
        [str(HELM), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def dashboard_configmaps(docs: list[Manifest]) -> list[Manifest]:
    return [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]


def rendered_dashboard(docs: list[Manifest]) -> dict[str, Any]:
    (configmap,) = dashboard_configmaps(docs)
    (text,) = configmap["data"].values()
    dashboard: dict[str, Any] = json.loads(text)
    return dashboard


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data, rows' nested panels (collapsed rows) included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def targets(dashboard: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel["targets"]:
            yield panel, target


def query_variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Grafana's variable forms ($name, ${name}, ${name:regex}, [[name]]) replaced by `values` (longest names first,
    so $__rate_interval is not read as $__rate)."""
    for name in sorted(values, key=len, reverse=True):
        value = values[name]
        literal = value.replace("\\", "\\\\")  # re.sub reads backslashes in a replacement
        expr = re.sub(r"\$\{" + re.escape(name) + r"(:[a-z]+)?\}", literal, expr)
        expr = expr.replace(f"[[{name}]]", value)
        expr = re.sub(r"\$" + re.escape(name) + r"\b", literal, expr)
    return expr


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, matchers) of each `metric{...}` in a PromQL expression."""
    return SELECTOR.findall(expr)


def exported_series() -> dict[str, set[str]]:
    """Series names the service exports (service.ops.metrics and its process and GC collectors), with their labels."""
    metrics = Metrics()
    # A labelled metric has no sample until it is used: its label names come from the metric object.
    declared = {
        family.name: set(metric._labelnames)
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    }
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = declared.get(family.name, {label for sample in family.samples for label in sample.labels} - {"le"})
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


# --- the ConfigMap -----------------------------------------------------------------------------------------------


def test_the_dashboard_is_off_by_default() -> None:
    assert dashboard_configmaps(helm_template(*REQUIRED)) == []


def test_enabled_it_is_a_configmap_the_grafana_sidecar_picks_up() -> None:
    docs = helm_template(*REQUIRED, *ENABLED)
    (configmap,) = dashboard_configmaps(docs)
    meta = configmap["metadata"]
    assert meta["name"] == "test-inference-bridge-dashboard"
    assert meta["namespace"] == NAMESPACE
    assert meta["labels"]["grafana_dashboard"] == "1", "kube-prometheus-stack's sidecar label"
    assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert "annotations" not in meta
    assert list(configmap["data"]) == ["inference-bridge.json"]
    # .Files.Get is not templated: the file arrives byte for byte, Grafana's {{topic}} legends included.
    assert configmap["data"]["inference-bridge.json"] == DASHBOARD_FILE.read_text().rstrip("\n")


def test_label_namespace_and_annotations_are_configurable() -> None:
    docs = helm_template(
        *REQUIRED,
        *ENABLED,
        "--set",
        "grafanaDashboard.label=grafana.example.com/dashboard",
        "--set",
        "grafanaDashboard.labelValue=streaming",
        "--set",
        "grafanaDashboard.namespace=monitoring",
        "--set",
        "grafanaDashboard.labels.team=ml-platform",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=Streaming",
    )
    (configmap,) = dashboard_configmaps(docs)
    meta = configmap["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["grafana.example.com/dashboard"] == "streaming"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["labels"]["team"] == "ml-platform"
    assert meta["annotations"] == {"grafana_folder": "Streaming"}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("grafanaDashboard.label=not a label", "/grafanaDashboard/label"),
        ("grafanaDashboard.labelValue=-x-", "/grafanaDashboard/labelValue"),
        ("grafanaDashboard.folder=x", "additional properties 'folder' not allowed"),
        ("grafanaDashboard.enabled=yes please", "/grafanaDashboard/enabled"),
    ],
)
def test_the_schema_rejects_wrong_values(setting: str, message: str) -> None:
    result = subprocess.run(
        [str(HELM), "template", RELEASE, str(CHART), *REQUIRED, "--set", setting],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_helm_lint_is_clean_with_the_dashboard() -> None:
    result = subprocess.run(
        [str(HELM), "lint", "--strict", str(CHART), *REQUIRED, *ENABLED],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the dashboard -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return rendered_dashboard(helm_template(*REQUIRED, *ENABLED))


def test_it_is_provisionable_as_it_is(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "inference-bridge"
    assert dashboard["title"] == "inference-bridge"
    assert dashboard["schemaVersion"] >= 39
    # File provisioning does not resolve an export's inputs: no __inputs, no ${DS_...} placeholders.
    assert "__inputs" not in dashboard
    assert "${DS_" not in json.dumps(dashboard)
    assert "id" not in dashboard or dashboard["id"] is None


def test_the_data_source_is_a_variable_every_query_uses(dashboard: dict[str, Any]) -> None:
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert (datasource["name"], datasource["query"]) == ("datasource", "prometheus")
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel, target in targets(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert target["datasource"] == expected, panel["title"]
    for variable in query_variables(dashboard):
        assert variable["datasource"] == expected, variable["name"]


def test_namespace_job_and_pod_variables_chain(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in query_variables(dashboard)}
    assert list(variables) == ["namespace", "job", "pod"]
    for name, variable in variables.items():
        match = LABEL_VALUES.match(variable_query(variable))
        assert match, variable
        assert match["label"] == name
        assert variable["refresh"] == 2, "refresh on time range change"
    assert 'namespace=~"$namespace"' in variable_query(variables["job"])
    assert 'job=~"$job"' in variable_query(variables["pod"])
    pod = variables["pod"]
    assert (pod["multi"], pod["includeAll"], pod["allValue"]) == (True, True, ".*")


def test_every_panel_is_titled_described_and_has_a_unit(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for p in panels(dashboard) if p not in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(dashboard):
        assert panel["title"], panel
        assert panel.get("description"), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_query_selects_the_release_and_rates_over_the_rate_interval(dashboard: dict[str, Any]) -> None:
    for panel, target in targets(dashboard):
        expr = target["expr"]
        found = selectors(expr)
        assert found, f"{panel['title']}: no selector in {expr}"
        for metric, matchers in found:
            for matcher in RELEASE_MATCHERS:
                assert matcher in matchers, f"{panel['title']}: {metric} lacks {matcher}"
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range"), f"{panel['title']}: fixed window [{window}]"
        assert "rate(" not in expr or "$__rate_interval" in expr, panel["title"]


def test_queries_use_metrics_and_labels_the_service_exports(dashboard: dict[str, Any]) -> None:
    series = exported_series()
    assert "process_resident_memory_bytes" in series
    for panel, target in targets(dashboard):
        expr = target["expr"]
        used = {metric for metric, _ in selectors(expr)}
        unknown = used - series.keys() - {"up"}
        assert not unknown, f"{panel['title']} uses metrics the service does not export: {unknown}"
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        allowed = set().union(*(series.get(metric, set()) for metric in used)) | TARGET_LABELS
        assert grouped <= allowed, f"{panel['title']} groups by labels no series has: {grouped - allowed}"
        for legend_label in re.findall(r"\{\{\s*([a-zA-Z_]+)\s*\}\}", target.get("legendFormat", "")):
            assert legend_label in grouped, f"{panel['title']}: legend {{{{{legend_label}}}}} is not kept by the query"


def test_the_panels_the_operators_asked_for_are_there(dashboard: dict[str, Any]) -> None:
    exprs = [target["expr"] for _, target in targets(dashboard)]

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    assert shown(r"sum by \(topic\) \(rate\(bridge_records_consumed_total")
    assert shown(r"sum by \(topic\) \(rate\(bridge_records_delivered_total")
    assert shown(r"sum by \(topic\) \(rate\(bridge_records_dead_lettered_total")
    assert shown(r"sum by \(reason\) \(rate\(bridge_records_dead_lettered_total")
    assert shown(r"sum by \(endpoint, status_class\) \(rate\(bridge_api_calls_total")
    assert shown(r"histogram_quantile\(0\.5, sum by \(le, endpoint\) \(rate\(bridge_api_call_duration_seconds_bucket")
    assert shown(r"histogram_quantile\(0\.99, sum by \(le, endpoint\) \(rate\(bridge_api_call_duration_seconds_bucket")
    assert shown(r"bridge_consumer_lag\{")
    assert shown(r"max by \(destination\) \(bridge_breaker_open\{")
    assert shown(r"bridge_concurrency_limit\{")
    assert shown(r"bridge_records_in_flight\{")
    assert shown(r"bridge_records_parked\{")
    assert shown(r"process_resident_memory_bytes\{")


def test_substitute_handles_grafanas_variable_forms() -> None:
    values = {"job": "j", "__rate_interval": "15s", "__range": "5m"}
    assert substitute('x{job=~"$job"}[$__rate_interval]', values) == 'x{job=~"j"}[15s]'
    assert substitute('x{job=~"${job}"}[${__range}] [[job]] ${job:regex}', values) == 'x{job=~"j"}[5m] j j'
    assert substitute("$jobs", values) == "$jobs", "a longer name is another variable"
