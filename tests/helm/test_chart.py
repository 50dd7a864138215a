"""Chart tests: render helm/inference-bridge with `helm template` and check the objects a platform team relies on.

Two value sets: the defaults with only the required values, and tests/helm/values-full.yaml with every feature
on and every setting set. The rendered environment is fed back to the service's own `load_settings`, so a
setting the chart misses, misspells or formats wrongly fails here, not at a pod's start; alert expressions are
checked against the metrics `service.ops.metrics` really exports. Every rendered object is validated strictly
(no unknown field) against the Kubernetes 1.27, 1.31 and 1.34 API schemas that PyPI's kubernetes-validate ships,
offline; custom resources (KEDA, Prometheus Operator) have no schema there and are skipped by name. helm comes
from `make helm` (.cache/bin/helm): without it these tests fail, they never skip.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import re
import subprocess
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from service.config.settings import ENV_DELIMITER, ENV_PREFIX, Settings, load_settings
from service.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".cache" / "bin" / "helm"
CHART = ROOT / "helm" / "inference-bridge"
FULL_VALUES = Path(__file__).with_name("values-full.yaml")
VALUES_SCHEMA = CHART / "values.schema.json"
DOCKERFILE = ROOT / "Dockerfile"
NAMESPACE = "streaming"
RELEASE = "test"
REQUIRED = ("--set", "config.kafka.bootstrapServers=kafka:9092", "--set", "secrets.existingSecret=bridge-keys")
# A fixed cluster version: what the chart renders must not depend on how helm was built.
KUBE_VERSION = "1.31.0"
# The oldest the chart supports (Chart.yaml kubeVersion), one in the middle, and the newest helm v3.19 knows.
SCHEMA_KUBE_VERSIONS = ("1.27", "1.31", "1.34")
# Custom resources: kubernetes-validate ships the built-in API only. Skipped by name (and only these: any
# other object without a schema fails); the tests below check their content.
CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# The value sets whose objects are validated: the defaults, the full values, and the full values with the CPU/
# memory HPA in place of KEDA (the only way the HorizontalPodAutoscaler is rendered with every setting).
HPA_INSTEAD_OF_KEDA = ("--set", "keda.enabled=false", "--set", "autoscaling.enabled=true")
VALUE_SETS: dict[str, tuple[str, ...]] = {
    "default": REQUIRED,
    "full": ("-f", str(FULL_VALUES)),
    "full-hpa": ("-f", str(FULL_VALUES), *HPA_INSTEAD_OF_KEDA),
    "traced": (
        *REQUIRED,
        "--set",
        "tracing.enabled=true",
        "--set",
        "tracing.endpoint=http://otel:4318",
        "--set",
        "networkPolicy.enabled=true",
    ),
}
SERVICE_DEFAULT_DRAIN_S = 20.0
# Each numeric bound pydantic keeps in a Field's metadata (Field(ge=...) -> annotated_types.Ge(ge=...)), with the
# JSON Schema keyword that says the same.
BOUND_KEYWORDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
# Where the chart's schema is deliberately stricter than the setting: the service takes port 0 as "pick a free
# port" (tests), but a pod's probes and Service need a fixed one (templates/_helpers.tpl refuses 0).
CHART_STRICTER: dict[str, dict[str, float]] = {"config.observability.httpPort": {"minimum": 1}}

Manifest = dict[str, Any]


# --- helpers -------------------------------------------------------------------------------------------------


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(
            f"{HELM.relative_to(ROOT)} is missing: run `make helm` first (chart tests never skip)", pytrace=False
        )
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False, timeout=120)


def template(*args: str, kube_version: str = KUBE_VERSION) -> subprocess.CompletedProcess[str]:
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version, *args)


def render(*args: str, kube_version: str = KUBE_VERSION) -> list[Manifest]:
    result = template(*args, kube_version=kube_version)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in docs:
        assert isinstance(doc, dict), doc
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    return docs


def render_error(*args: str) -> str:
    result = template(*args)
    assert result.returncode != 0, f"helm template {' '.join(args)} should have failed, rendered:\n{result.stdout}"
    return result.stderr


def by_kind(docs: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[Manifest], kind: str) -> Manifest:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: Iterable[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: Iterable[Manifest]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["bridge"]
    return containers[0]


def env_of(docs: Iterable[Manifest]) -> dict[str, dict[str, Any]]:
    entries: list[dict[str, Any]] = container(docs)["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate environment variables: {names}"
    return {entry["name"]: entry for entry in entries}


def bridge_env(docs: Iterable[Manifest]) -> dict[str, dict[str, Any]]:
    return {name: entry for name, entry in env_of(docs).items() if name.upper().startswith(ENV_PREFIX)}


def stand_in(secret: str, key: str) -> str:
    return f"from-secret-{secret}-{key}"


def secret_file(docs: Iterable[Manifest], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in the container: it must be an item of a mounted Secret volume."""
    docs = list(docs)
    volumes = {volume["name"]: volume for volume in pod_spec(docs)["volumes"]}
    for mount in container(docs)["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        secret = volumes[mount["name"]].get("secret")
        if secret is None or not path.startswith(directory):
            continue
        assert mount.get("readOnly") is True, f"{mount['mountPath']} holds secrets and is writable"
        # A subPath mount is never updated by the kubelet: a rotated key would need a restart.
        assert "subPath" not in mount, f"{mount['mountPath']} is a subPath mount"
        relative = path.removeprefix(directory)
        items = {item["path"]: item["key"] for item in secret.get("items", [])}
        key = items.get(relative) if items else relative
        assert key is not None, f"{path}: no item of Secret {secret['secretName']} is mounted there"
        return secret["secretName"], key
    raise AssertionError(f"{path} is not in a mounted Secret volume")


KAFKA_TLS_FILES = frozenset(f"BRIDGE_KAFKA__SSL_{name}" for name in ("CAFILE", "CERTFILE", "KEYFILE"))


def resolved_environ(docs: Iterable[Manifest], files: Path) -> dict[str, str]:
    """The BRIDGE_* environment the pod would see, with a stand-in for each Secret value.

    A `*_FILE` variable, and a Kafka TLS file, must point into a mounted Secret; it is pointed at a stand-in file
    under `files` instead, since the service reads (or checks) the file while loading its settings.
    """
    docs = list(docs)
    environ = {}
    for name, entry in bridge_env(docs).items():
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            environ[name] = stand_in(ref["name"], ref["key"])
        elif name.endswith("_FILE") or name in KAFKA_TLS_FILES:
            secret, key = secret_file(docs, entry["value"])
            local = files / f"{secret}.{key}"
            local.write_text(stand_in(secret, key) + "\n")
            environ[name] = str(local)
        else:
            environ[name] = entry["value"]
    return environ


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def settings_env_names() -> dict[str, bool]:
    """Every BRIDGE_* variable service/config/ reads, mapped to whether it is a secret."""
    names: dict[str, bool] = {}
    for section, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name, sub in annotation.model_fields.items():
                names[f"{ENV_PREFIX}{section}{ENV_DELIMITER}{name}".upper()] = _is_secret(sub.annotation)
        else:
            names[f"{ENV_PREFIX}{section}".upper()] = _is_secret(annotation)
    return names


def file_backed_secrets() -> set[str]:
    """The secret variables the service can also read from a file named by `<variable>_FILE`."""
    names = settings_env_names()
    return {name for name, secret in names.items() if secret and f"{name}_FILE" in names}


def exported_series() -> dict[str, set[str]]:
    """Series names service.ops.metrics exports, each with its label names."""
    series: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        for family in metric.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            for suffix in suffixes:
                series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def drain_timeout(docs: Iterable[Manifest]) -> float:
    value = bridge_env(docs).get("BRIDGE_DELIVERY__DRAIN_TIMEOUT_S")
    return float(value["value"]) if value else SERVICE_DEFAULT_DRAIN_S


class ChartSetting(NamedTuple):
    """A chart value under `config.<section>`, its schema in values.schema.json and the settings field it sets."""

    value: str
    schema: dict[str, Any]
    setting: str
    field: FieldInfo


def _snake(key: str) -> str:
    """A chart key as the chart's `snakecase` spells it in the variable's name (templates/_helpers.tpl)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def chart_settings() -> list[ChartSetting]:
    """Every chart value of a settings section, with the field of Settings it becomes (BRIDGE_<SECTION>__<FIELD>)."""
    schema = json.loads(VALUES_SCHEMA.read_text())
    found = []
    for section, section_schema in schema["properties"]["config"]["properties"].items():
        section_name = _snake(section)
        section_field = Settings.model_fields.get(section_name)
        assert section_field is not None, f"config.{section} sets no section of Settings"
        model = section_field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue  # a top-level setting (config.schemasDir): a path, no bounds
        for key, value_schema in section_schema["properties"].items():
            name = _snake(key)
            field = model.model_fields.get(name)
            assert field is not None, f"config.{section}.{key} sets no field of {model.__name__}"
            found.append(ChartSetting(f"config.{section}.{key}", value_schema, f"{section_name}.{name}", field))
    return found


def field_bounds(field: FieldInfo) -> dict[str, float]:
    """A field's numeric bounds (ge/gt/le/lt), under their JSON Schema keywords."""
    bounds: dict[str, float] = {}
    for constraint in field.metadata:
        for attribute, keyword in BOUND_KEYWORDS.items():
            number = getattr(constraint, attribute, None)
            if number is not None:
                bounds[keyword] = number
    return bounds


def schema_bounds(value_schema: dict[str, Any]) -> dict[str, float]:
    return {keyword: value_schema[keyword] for keyword in BOUND_KEYWORDS.values() if keyword in value_schema}


def literal_choices(field: FieldInfo) -> set[Any]:
    """The values a Literal field (or an optional one) accepts; empty for any other field."""
    parts = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is not Literal else ()
    literals = [part for part in (field.annotation, *parts) if typing.get_origin(part) is Literal]
    return {choice for literal in literals for choice in typing.get_args(literal)}


def _above_maximum_cases() -> list[Any]:
    """One case per chart value whose setting has an upper bound, with a value the setting refuses."""
    cases = []
    for setting in chart_settings():
        bounds = field_bounds(setting.field)
        if "maximum" in bounds:
            cases.append(pytest.param(setting.value, bounds["maximum"] + 1, id=setting.value))
        elif "exclusiveMaximum" in bounds:
            cases.append(pytest.param(setting.value, bounds["exclusiveMaximum"], id=setting.value))
    return cases


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_docs() -> list[Manifest]:
    return render(*REQUIRED)


@pytest.fixture(scope="module")
def full_docs() -> list[Manifest]:
    return render("-f", str(FULL_VALUES))


@pytest.fixture(scope="module", params=["default", "full"])
def docs(request: pytest.FixtureRequest, default_docs: list[Manifest], full_docs: list[Manifest]) -> list[Manifest]:
    return default_docs if request.param == "default" else full_docs


@functools.cache
def rendered_for(values: str, kube: str) -> list[Manifest]:
    """A value set of VALUE_SETS rendered for a Kubernetes minor version (cached: collection and tests share it)."""
    return render(*VALUE_SETS[values], kube_version=f"{kube}.0")


# --- what is rendered ----------------------------------------------------------------------------------------


def test_default_values_render_only_the_core_objects(default_docs: list[Manifest]) -> None:
    kinds = sorted(doc["kind"] for doc in default_docs)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert one(default_docs, "Deployment")["spec"]["replicas"] == 2


def test_full_values_render_every_optional_object(full_docs: list[Manifest]) -> None:
    kinds = {doc["kind"] for doc in full_docs}
    assert kinds == {
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    }
    # KEDA owns the replica count: a fixed one would fight its HPA on every upgrade.
    assert "replicas" not in one(full_docs, "Deployment")["spec"]


def test_objects_are_named_labelled_and_namespaced(docs: list[Manifest]) -> None:
    for doc in docs:
        meta = doc["metadata"]
        assert len(meta["name"]) <= 63
        assert meta["namespace"] == NAMESPACE
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/name"] == "inference-bridge"


# --- the pod -------------------------------------------------------------------------------------------------


def _dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert len(users) == 1, "the Dockerfile's final stage must set one numeric USER uid:gid"
    return int(users[0][0]), int(users[0][1])


def test_security_context_is_restricted_and_matches_the_image_user(docs: list[Manifest]) -> None:
    uid, gid = _dockerfile_user()
    pod = pod_spec(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid == 10001
    assert pod["securityContext"]["runAsGroup"] == gid == 10001
    assert pod["securityContext"]["fsGroup"] == gid
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # A Service named bridge-* would otherwise inject BRIDGE_* variables the service rejects as unknown.
    assert pod["enableServiceLinks"] is False
    ctx = container(docs)["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == uid
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}


def test_tmp_is_the_only_writable_mount(docs: list[Manifest]) -> None:
    pod = pod_spec(docs)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    mounts = {mount["mountPath"]: mount for mount in container(docs)["volumeMounts"]}
    assert mounts["/tmp"]["name"] == "tmp"
    for path, mount in mounts.items():
        assert path == "/tmp" or mount.get("readOnly") is True, f"{path} is mounted writable"


def test_probes_use_the_health_endpoints_on_the_operations_port(docs: list[Manifest]) -> None:
    c = container(docs)
    port = int(bridge_env(docs)["BRIDGE_OBSERVABILITY__HTTP_PORT"]["value"])
    assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # The startup probe, not a long initial delay, covers a slow first join.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_resources_are_requested_and_memory_is_limited(docs: list[Manifest]) -> None:
    resources = container(docs)["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_image_defaults_to_the_app_version_or_pins_a_digest(
    default_docs: list[Manifest], full_docs: list[Manifest]
) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(default_docs)["image"] == f"inference-bridge:{chart['appVersion']}"
    assert container(full_docs)["image"].startswith("registry.example.com/ml/inference-bridge@sha256:")


def test_exposed_port_and_schemas_dir_agree_with_the_image() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^EXPOSE 8080$", dockerfile, flags=re.MULTILINE)
    assert "BRIDGE_SCHEMAS_DIR=/app/schemas" in dockerfile
    assert "COPY schemas/ /app/schemas/" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "service"]' in dockerfile


def _instructions(stage: str) -> list[tuple[str, str]]:
    lines = re.sub(r"\\\n\s*", " ", stage).splitlines()
    return [(line.split()[0].upper(), line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_build_metadata_comes_last_so_a_new_build_date_rebuilds_no_layer() -> None:
    global_args, *stages = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert [stage.split()[0] for stage in stages] == ["${PYTHON_BASE}", "${PYTHON_BASE}"], "both stages use the pin"
    assert "ARG PYTHON_BASE=${PYTHON_IMAGE}${PYTHON_IMAGE_DIGEST:+@}${PYTHON_IMAGE_DIGEST}" in global_args
    builder, runtime = (_instructions(stage) for stage in stages)
    per_build = re.compile(r"^ARG (VERSION|REVISION|CREATED)\b|\$\{?(VERSION|REVISION|CREATED)\b")
    assert not [line for _, line in builder if per_build.search(line)]
    first_arg = next(i for i, (op, line) in enumerate(runtime) if op == "ARG" and per_build.search(line))
    assert {op for op, _ in runtime[first_arg:]} <= {"ARG", "LABEL"}, runtime[first_arg:]
    label = next(line for op, line in runtime if op == "LABEL")
    assert 'org.opencontainers.image.base.name="${PYTHON_IMAGE}"' in label
    assert 'org.opencontainers.image.base.digest="${PYTHON_IMAGE_DIGEST}"' in label
    assert 'org.opencontainers.image.created="${CREATED}"' in label


# --- settings and secrets ------------------------------------------------------------------------------------


def test_default_environment_is_accepted_by_the_service(default_docs: list[Manifest], tmp_path: Path) -> None:
    settings = load_settings(resolved_environ(default_docs, tmp_path))
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.observability.http_port == 8080
    assert settings.openlayer.api_key.get_secret_value() == stand_in("bridge-keys", "openlayer-api-key")
    assert settings.humanloop.api_key.get_secret_value() == stand_in("bridge-keys", "humanloop-api-key")


def test_full_values_reach_every_setting(full_docs: list[Manifest]) -> None:
    expected = settings_env_names()
    rendered = bridge_env(full_docs)
    # A secret is set either as a value or as a file, never both (the service refuses both).
    alternatives = {f"{name}_FILE": name for name in file_backed_secrets()}
    reached = set(rendered) | {alternatives[name] for name in rendered if name in alternatives}
    reached |= {file for file, name in alternatives.items() if name in rendered}
    missing = sorted(expected.keys() - reached)
    unknown = sorted(rendered.keys() - expected.keys())
    both = sorted(name for file, name in alternatives.items() if {file, name} <= rendered.keys())
    assert not missing, f"settings the chart cannot set (add them to values.yaml/schema/values-full): {missing}"
    assert not unknown, f"variables the service does not know (it would refuse to start): {unknown}"
    assert not both, f"secrets set both as a value and as a file: {both}"


def test_full_environment_is_accepted_by_the_service_with_the_values_given(
    full_docs: list[Manifest], tmp_path: Path
) -> None:
    settings = load_settings(resolved_environ(full_docs, tmp_path))
    assert settings.kafka.fetch_max_bytes == 16777216  # not 1.6777216e+07
    assert settings.kafka.commit_interval_s == 2.5
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "from-secret-inference-bridge-keys-kafka-password"
    environ = bridge_env(full_docs)
    assert environ["BRIDGE_KAFKA__SSL_CAFILE"]["value"] == "/etc/inference-bridge/kafka-tls/ca.crt"
    assert settings.kafka.ssl_cafile == str(
        tmp_path / "{}.{}".format(*secret_file(full_docs, "/etc/inference-bridge/kafka-tls/ca.crt"))
    )
    assert settings.topics.dead_letter_topic("prod.inferences") == "prod.inferences.dlq"
    assert settings.topics.dead_letter_topic("prod.log-updates") == "prod.log-updates.dead"
    assert settings.openlayer.pipeline_configs["pipeline-123"]["inferenceIdColumnName"] == "id"
    assert settings.openlayer.default_config == {"outputColumnName": "output"}
    assert settings.delivery.drain_timeout_s == 45.5
    assert settings.schema_registry.wire_format == "confluent"
    assert settings.observability.http_port == 9464
    assert str(settings.schemas_dir) == "/app/schemas"


def test_secrets_come_only_from_the_secret(docs: list[Manifest]) -> None:
    secret_names = {name for name, secret in settings_env_names().items() if secret}
    env = bridge_env(docs)
    for name in secret_names & env.keys():
        entry = env[name]
        assert "value" not in entry, f"{name} is set in clear"
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] in {"bridge-keys", "inference-bridge-keys"}
    for name in {f"{name}_FILE" for name in secret_names} & env.keys():
        secret, _ = secret_file(docs, env[name]["value"])
        assert secret in {"bridge-keys", "inference-bridge-keys"}
    assert not by_kind(docs, "Secret"), "the chart must not create Secrets: keys never pass through values"


MOUNT = "/var/run/secrets/inference-bridge"


def test_api_keys_are_mounted_files_by_default(default_docs: list[Manifest]) -> None:
    env = bridge_env(default_docs)
    assert env["BRIDGE_OPENLAYER__API_KEY_FILE"] == {
        "name": "BRIDGE_OPENLAYER__API_KEY_FILE",
        "value": f"{MOUNT}/openlayer-api-key",
    }
    assert env["BRIDGE_HUMANLOOP__API_KEY_FILE"]["value"] == f"{MOUNT}/humanloop-api-key"
    assert not {"BRIDGE_OPENLAYER__API_KEY", "BRIDGE_HUMANLOOP__API_KEY"} & env.keys()
    # No SASL or registry password configured: no variable for them, nothing extra mounted.
    assert not {name for name in env if "PASSWORD" in name}
    volumes = {volume["name"]: volume for volume in pod_spec(default_docs)["volumes"]}
    assert volumes["bridge-secrets"]["secret"] == {
        "secretName": "bridge-keys",
        "defaultMode": 0o440,
        "items": [
            {"key": "humanloop-api-key", "path": "humanloop-api-key"},
            {"key": "openlayer-api-key", "path": "openlayer-api-key"},
        ],
    }
    mounts = [mount for mount in container(default_docs)["volumeMounts"] if mount["name"] == "bridge-secrets"]
    assert mounts == [{"name": "bridge-secrets", "mountPath": MOUNT, "readOnly": True}]


def test_configured_passwords_are_mounted_files_too(full_docs: list[Manifest]) -> None:
    env = bridge_env(full_docs)
    expected = {
        "BRIDGE_OPENLAYER__API_KEY_FILE": "openlayer",
        "BRIDGE_HUMANLOOP__API_KEY_FILE": "humanloop",
        "BRIDGE_KAFKA__SASL_PASSWORD_FILE": "kafka-password",
        "BRIDGE_SCHEMA_REGISTRY__PASSWORD_FILE": "schema-registry-password",
    }
    for name, key in expected.items():
        assert secret_file(full_docs, env[name]["value"]) == ("inference-bridge-keys", key), name
    # A username is not a secret and has no file variable: it stays a secretKeyRef.
    assert env["BRIDGE_KAFKA__SASL_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == "kafka-username"


def test_mount_path_can_be_moved() -> None:
    docs = render(*REQUIRED, "--set", "secrets.mountPath=/etc/bridge-keys/")
    env = bridge_env(docs)
    assert env["BRIDGE_OPENLAYER__API_KEY_FILE"]["value"] == "/etc/bridge-keys/openlayer-api-key"
    assert secret_file(docs, env["BRIDGE_OPENLAYER__API_KEY_FILE"]["value"]) == ("bridge-keys", "openlayer-api-key")


def test_one_key_used_twice_is_mounted_once() -> None:
    docs = render(*REQUIRED, "--set", "secrets.keys.humanloopApiKey=openlayer-api-key")
    volumes = {volume["name"]: volume for volume in pod_spec(docs)["volumes"]}
    assert volumes["bridge-secrets"]["secret"]["items"] == [{"key": "openlayer-api-key", "path": "openlayer-api-key"}]


def test_secrets_can_be_environment_variables_instead(tmp_path: Path) -> None:
    docs = render("-f", str(FULL_VALUES), "--set", "secrets.mountAsFiles=false")
    env = bridge_env(docs)
    assert not [name for name in env if name.endswith("_FILE")]
    assert "bridge-secrets" not in {volume["name"] for volume in pod_spec(docs)["volumes"]}
    for name in file_backed_secrets():
        assert "secretKeyRef" in env[name]["valueFrom"], name
    settings = load_settings(resolved_environ(docs, tmp_path))
    assert settings.openlayer.api_key.get_secret_value() == stand_in("inference-bridge-keys", "openlayer")
    assert settings.openlayer.api_key_file is None


def test_kafka_tls_files_come_from_a_read_only_secret_volume(full_docs: list[Manifest]) -> None:
    volumes = {volume["name"]: volume for volume in pod_spec(full_docs)["volumes"]}
    assert volumes["kafka-tls"]["secret"]["secretName"] == "kafka-client-tls"
    env = bridge_env(full_docs)
    for var, key in [("SSL_CAFILE", "ca.crt"), ("SSL_CERTFILE", "tls.crt"), ("SSL_KEYFILE", "tls.key")]:
        assert env[f"BRIDGE_KAFKA__{var}"]["value"] == f"/etc/inference-bridge/kafka-tls/{key}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "replicaCount=three"), "/replicaCount"),
        (("--set", "replicas=3"), "'replicas' not allowed"),
        (("--set", "config.kafka.bootstrapSevers=typo:9092"), "'bootstrapSevers' not allowed"),
        (("--set", "config.openlayer.apiKey=sk-in-clear"), "'apiKey' not allowed"),
        (("--set", "config.kafka.saslPassword=in-clear"), "'saslPassword' not allowed"),
        (("--set", "config.kafka.securityProtocol=TLS"), "/config/kafka/securityProtocol"),
        (("--set", "config.delivery.drainTimeoutS=-1"), "/config/delivery/drainTimeoutS"),
        (("--set", "config.observability.httpPort=70000"), "/config/observability/httpPort"),
        (("--set", "extraEnv[0].name=BRIDGE_OPENLAYER__API_KEY", "--set", "extraEnv[0].value=x"), "/extraEnv/0/name"),
        (("--set", "image.pullPolicy=Sometimes"), "/image/pullPolicy"),
    ],
)
def test_schema_rejects_wrong_values(args: tuple[str, ...], message: str) -> None:
    error = render_error(*REQUIRED, *args)
    assert "values don't meet the specifications of the schema" in error
    assert message in error


def test_schema_bounds_are_the_settings_bounds() -> None:
    # The schema is written by hand: without this a bound added to a setting (or changed) leaves the chart
    # accepting a value the pod refuses at start-up, after `helm install` said yes.
    settings = chart_settings()
    differ = {}
    for setting in settings:
        expected = field_bounds(setting.field) | CHART_STRICTER.get(setting.value, {})
        if schema_bounds(setting.schema) != expected:
            differ[setting.value] = f"schema {schema_bounds(setting.schema)}, setting {field_bounds(setting.field)}"
    assert not differ, f"values.schema.json bounds differ from the settings' Field bounds: {differ}"
    reached = {setting.setting for setting in settings}
    bounded = {
        f"{section}.{name}"
        for section, section_field in Settings.model_fields.items()
        if isinstance(model := section_field.annotation, type) and issubclass(model, BaseModel)
        for name, field in model.model_fields.items()
        if field_bounds(field)
    }
    assert "kafka.session_timeout_ms" in bounded, "no bound read from the settings: did the Field metadata change?"
    assert not bounded - reached, f"bounded settings no chart value sets: {sorted(bounded - reached)}"
    by_value = {setting.value: setting for setting in settings}
    for value, stricter in CHART_STRICTER.items():
        own = field_bounds(by_value[value].field)
        for keyword, number in stricter.items():
            if keyword in own:
                tighter = number > own[keyword] if keyword.endswith("inimum") else number < own[keyword]
                assert tighter, f"{value}: {keyword} {number} is not stricter than the setting's {own}: drop it"


def test_schema_choices_are_the_settings_choices() -> None:
    differ = {}
    for setting in chart_settings():
        choices = literal_choices(setting.field)
        enum = set(setting.schema.get("enum", [])) - {None}  # null: the service's default
        if choices != enum:
            differ[setting.value] = f"schema {sorted(enum)}, setting {sorted(choices)}"
    assert not differ, f"values.schema.json enums differ from the settings' Literal choices: {differ}"


EXAMPLES_NOT_DEFAULTS = frozenset({"config.kafka.saslMechanism", "config.kafka.saslUsername"})
"""Commented lines of values.yaml's config that show a value to set, not the one the service uses unset."""


def commented_config_values() -> dict[str, Any]:
    """The `# key: value` lines under values.yaml's `config.<section>`: what the chart tells users the service uses."""
    found: dict[str, Any] = {}
    in_config, section = False, None
    for line in (CHART / "values.yaml").read_text().splitlines():
        if re.match(r"[^\s#]", line):  # a top-level key
            in_config, section = line.startswith("config:"), None
        elif in_config and (opened := re.fullmatch(r"  (\w+):.*", line)):
            section = opened.group(1)
        elif section is not None and (commented := re.fullmatch(r"    # (\w+): (.*?)(?:\s+#.*)?", line)):
            found[f"config.{section}.{commented.group(1)}"] = yaml.safe_load(commented.group(2))
    return found


def test_values_yaml_shows_the_settings_defaults_in_its_comments() -> None:
    settings = {setting.value: setting.field for setting in chart_settings()}
    shown = {key: value for key, value in commented_config_values().items() if key not in EXAMPLES_NOT_DEFAULTS}
    assert "config.delivery.httpClient" in shown  # the parse found the lines it checks
    assert "config.kafka.sessionTimeoutMs" in shown
    defaults = {key: field.get_default(call_default_factory=True) for key, field in settings.items()}
    differ = {
        key: f"values.yaml says {value!r}, the service uses {defaults[key]!r}"
        for key, value in shown.items()
        # `""` is values.yaml's placeholder for an optional string that has no default (the registry's url, username).
        if key in defaults and defaults[key] != value and not (defaults[key] is None and value == "")
    }
    assert not differ, f"values.yaml comments that are not the service's defaults: {differ}"


@pytest.mark.parametrize(("value", "above"), _above_maximum_cases())
def test_schema_rejects_a_value_above_its_settings_maximum(value: str, above: float) -> None:
    # --set-json: a number stays a number (plain --set passes 86401.0 as a string, refused for its type instead).
    error = render_error(*REQUIRED, "--set-json", f"{value}={json.dumps(above)}")
    assert "values don't meet the specifications of the schema" in error
    assert f"at '/{value.replace('.', '/')}': maximum" in error, error


def test_values_at_their_settings_maximum_are_rendered_and_accepted(tmp_path: Path) -> None:
    # All at once, but the heartbeat: it must stay below the session timeout (service/config/settings.py).
    maxima = {
        setting.value: field_bounds(setting.field)["maximum"]
        for setting in chart_settings()
        if "maximum" in field_bounds(setting.field) and setting.value != "config.kafka.heartbeatIntervalMs"
    }
    args = [arg for value, number in maxima.items() for arg in ("--set-json", f"{value}={json.dumps(number)}")]
    settings = load_settings(resolved_environ(render(*REQUIRED, *args), tmp_path))
    assert settings.kafka.session_timeout_ms == 2**31 - 1
    assert settings.delivery.drain_timeout_s == 86_400
    assert settings.batch.linger_ms == 86_400_000


def test_required_values_are_named_when_missing() -> None:
    error = render_error()
    assert "/config/kafka/bootstrapServers" in error
    assert "/secrets/existingSecret" in error


def test_a_null_setting_keeps_the_service_default() -> None:
    docs = render(*REQUIRED, "--set", "config.kafka.groupId=null", "--set", "config.delivery.drainTimeoutS=null")
    env = bridge_env(docs)
    assert "BRIDGE_KAFKA__GROUP_ID" not in env
    assert "BRIDGE_DELIVERY__DRAIN_TIMEOUT_S" not in env
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > SERVICE_DEFAULT_DRAIN_S


# --- shutdown and availability -------------------------------------------------------------------------------


def test_grace_period_outlasts_the_drain(docs: list[Manifest]) -> None:
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert grace >= math.ceil(drain_timeout(docs)) + 10


def test_grace_period_follows_a_longer_drain() -> None:
    # --set-json: plain --set passes 90.5 as a string, which the schema rejects.
    docs = render(*REQUIRED, "--set-json", "config.delivery.drainTimeoutS=90.5")
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 91 + 15


def test_grace_period_shorter_than_the_drain_fails() -> None:
    error = render_error(*REQUIRED, "--set", "terminationGracePeriodSeconds=20")
    assert "must be above the drain timeout" in error


def test_pod_disruption_budget_selects_the_pods(docs: list[Manifest]) -> None:
    pdb = one(docs, "PodDisruptionBudget")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])


def _scaled(budget: int | str, pods: int) -> int:
    """A budget value for `pods` pods, as the disruption controller reads it: percentages round up."""
    if isinstance(budget, str) and budget.endswith("%"):
        return math.ceil(int(budget[:-1]) * pods / 100)
    return int(budget)


def fewest_pods(docs: Iterable[Manifest]) -> int:
    """The fewest pods the rendered Deployment may run, whoever owns the replica count."""
    docs = list(docs)
    for scaled in by_kind(docs, "ScaledObject"):
        # KEDA's 0 is "idle": scaled to zero, nothing to drain; when it runs, it may run one pod.
        return max(1, int(scaled["spec"].get("minReplicaCount", 0)))
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        return int(hpa["spec"].get("minReplicas", 1))
    return int(one(docs, "Deployment")["spec"]["replicas"])


def evictable(pdb: Manifest, pods: int) -> int:
    spec = pdb["spec"]
    if "minAvailable" in spec:
        return pods - _scaled(spec["minAvailable"], pods)
    return min(pods, _scaled(spec["maxUnavailable"], pods))


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_pod_disruption_budget_never_blocks_a_node_drain(values: str) -> None:
    docs = rendered_for(values, KUBE_VERSION.rsplit(".", 1)[0])
    pods = fewest_pods(docs)
    assert evictable(one(docs, "PodDisruptionBudget"), pods) >= 1, f"{values}: no pod evictable at {pods} pod(s)"


@pytest.mark.parametrize(
    ("args", "floor"),
    [
        (("--set", "replicaCount=1"), "replicaCount"),
        (("--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=1"), "autoscaling.minReplicas"),
        (("--set", "keda.enabled=true", "--set", "keda.minReplicaCount=0"), "keda.minReplicaCount"),
        (("--set", "keda.enabled=true", "--set", "keda.minReplicaCount=1"), "keda.minReplicaCount"),
    ],
)
def test_min_available_at_the_scalers_floor_is_refused(args: tuple[str, ...], floor: str) -> None:
    error = render_error(*REQUIRED, "--set", "podDisruptionBudget.minAvailable=1", *args)
    assert "podDisruptionBudget.minAvailable 1 blocks node drains" in error
    assert f"with {floor} the Deployment may run only 1 pod(s)" in error


def test_the_full_values_with_an_hpa_at_one_replica_are_refused() -> None:
    # The combination the full values used to allow: the HPA's default floor of 1 under minAvailable: 1.
    error = render_error("-f", str(FULL_VALUES), *HPA_INSTEAD_OF_KEDA, "--set", "autoscaling.minReplicas=1")
    assert "blocks node drains" in error


@pytest.mark.parametrize(
    ("budget", "replicas", "allowed"),
    [
        ("minAvailable=1", 2, True),
        ("minAvailable=50%", 2, True),
        ("minAvailable=51%", 2, False),
        ("minAvailable=2", 2, False),
        ("minAvailable=3", 4, True),
        ("maxUnavailable=1", 1, True),
        ("maxUnavailable=1%", 1, True),
        ("maxUnavailable=0", 3, False),
        ("maxUnavailable=0%", 3, False),
    ],
)
def test_budgets_are_checked_as_kubernetes_counts_them(budget: str, replicas: int, allowed: bool) -> None:
    args = (*REQUIRED, "--set", f"podDisruptionBudget.{budget}", "--set", f"replicaCount={replicas}")
    if allowed:
        docs = render(*args)
        assert evictable(one(docs, "PodDisruptionBudget"), fewest_pods(docs)) >= 1
    else:
        assert "blocks node drains" in render_error(*args)


def test_min_available_below_the_scalers_floor_is_rendered() -> None:
    hpa = ("--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=2")
    docs = render(*REQUIRED, "--set", "podDisruptionBudget.minAvailable=1", *hpa)
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2


def test_hpa_is_optional_and_owns_the_replica_count() -> None:
    docs = render(*REQUIRED, "--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=4")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "test-inference-bridge",
    }
    assert hpa["spec"]["maxReplicas"] == 4
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_hpa_and_keda_are_exclusive() -> None:
    error = render_error(*REQUIRED, "--set", "autoscaling.enabled=true", "--set", "keda.enabled=true")
    assert "exclusive" in error


def test_keda_scales_on_the_lag_of_each_topic_of_the_group(full_docs: list[Manifest]) -> None:
    scaled = one(full_docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(full_docs, "Deployment")["metadata"]["name"]
    assert scaled["spec"]["maxReplicaCount"] == 12
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["topic"] for t in triggers] == [
        "prod.inferences",
        "prod.inference-row-updates",
        "prod.log-updates",
    ]
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == "inference-bridge-prod"
        assert meta["bootstrapServers"] == "kafka-0.kafka:9093,kafka-1.kafka:9093"
        assert meta["lagThreshold"] == "5000"
        assert meta["sasl"] == "scram_sha512"
        assert meta["tls"] == "enable"
        assert all(isinstance(value, str) for value in meta.values()), "KEDA metadata values are strings"
        assert trigger["authenticationRef"]["name"] == "bridge-kafka"
    auth = one(full_docs, "TriggerAuthentication")
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "username": ("inference-bridge-keys", "kafka-username"),
        "password": ("inference-bridge-keys", "kafka-password"),
        "ca": ("kafka-client-tls", "ca.crt"),
        "cert": ("kafka-client-tls", "tls.crt"),
        "key": ("kafka-client-tls", "tls.key"),
    }


def test_keda_defaults_follow_the_service_settings() -> None:
    docs = render(*REQUIRED, "--set", "keda.enabled=true")
    triggers = one(docs, "ScaledObject")["spec"]["triggers"]
    assert [t["metadata"]["topic"] for t in triggers] == ["inferences", "inference-row-updates", "log-updates"]
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {"inference-bridge"}
    assert {t["metadata"]["tls"] for t in triggers} == {"disable"}
    assert not by_kind(docs, "TriggerAuthentication")


def test_keda_reads_a_plain_sasl_username_from_the_container_and_the_password_from_the_secret() -> None:
    sasl = ("--set", "config.kafka.securityProtocol=SASL_PLAINTEXT", "--set", "config.kafka.saslMechanism=PLAIN")
    user = ("--set", "config.kafka.saslUsername=bridge", "--set", "keda.enabled=true")
    docs = render(*REQUIRED, *sasl, *user, "--set", "secrets.keys.kafkaSaslPassword=kafka-password")
    auth = one(docs, "TriggerAuthentication")
    assert auth["spec"]["env"] == [
        {"parameter": "username", "name": "BRIDGE_KAFKA__SASL_USERNAME", "containerName": "bridge"}
    ]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "bridge-keys", "key": "kafka-password"}
    ]
    assert {t["metadata"]["sasl"] for t in one(docs, "ScaledObject")["spec"]["triggers"]} == {"plaintext"}
    error = render_error(*REQUIRED, *sasl, *user)
    assert "secrets.keys.kafkaSaslPassword" in error


# --- monitoring ----------------------------------------------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_endpoint(full_docs: list[Manifest]) -> None:
    monitor = one(full_docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service = one(full_docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def _alerts(docs: Iterable[Manifest]) -> dict[str, dict[str, Any]]:
    rule = one(docs, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_alerts_cover_lag_breaker_dead_letters_and_failing_calls(full_docs: list[Manifest]) -> None:
    alerts = _alerts(full_docs)
    assert "bridge_consumer_lag" in alerts["InferenceBridgeConsumerLagGrowing"]["expr"]
    assert "offset 15m" in alerts["InferenceBridgeConsumerLagGrowing"]["expr"]
    assert "bridge_breaker_open" in alerts["InferenceBridgeBreakerOpen"]["expr"]
    assert "bridge_records_dead_lettered_total" in alerts["InferenceBridgeDeadLetterRate"]["expr"]
    assert 'status_class="2xx"' in alerts["InferenceBridgeNoSuccessfulCall"]["expr"]
    assert "unless" in alerts["InferenceBridgeNoSuccessfulCall"]["expr"]
    assert 'reason="auth"' in alerts["InferenceBridgeDestinationAuthFailing"]["expr"]
    assert "bridge_destination_paused" in alerts["InferenceBridgeDestinationAuthFailing"]["expr"]
    assert "InferenceBridgeSlowCalls" in alerts  # additionalRules
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert re.fullmatch(r"\d+[smh]", alert["for"]), name
        assert alert["expr"].count("(") == alert["expr"].count(")"), name
    selector = 'namespace="streaming",job="bridge"'
    assert selector in alerts["InferenceBridgeBreakerOpen"]["expr"]


def test_alert_expressions_use_metrics_and_labels_the_service_exports(full_docs: list[Manifest]) -> None:
    series = exported_series()
    target_labels = {"namespace", "job", "instance", "pod"}
    for name, alert in _alerts(full_docs).items():
        expr = alert["expr"]
        used = set(re.findall(r"\bbridge_[a-z0-9_]+", expr))
        if not used:
            assert re.search(r"\bup\{", expr), f"{name} uses no metric of the service nor up"
            continue
        unknown = used - series.keys()
        assert not unknown, f"{name} uses metrics service.ops.metrics does not export: {unknown}"
        labels = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        labels |= set(re.findall(r"([a-z_]+)=\"", expr))
        allowed = set().union(*(series[metric] for metric in used)) | target_labels
        assert labels <= allowed, f"{name} uses labels no series has: {labels - allowed}"


def test_auth_alert_fires_after_two_minutes_of_a_paused_destination(full_docs: list[Manifest]) -> None:
    alert = _alerts(full_docs)["InferenceBridgeDestinationAuthFailing"]
    assert alert["expr"] == (
        'max by (namespace, destination) (bridge_destination_paused{namespace="streaming",job="bridge",reason="auth"})'
        " == 1"
    )
    assert alert["for"] == "2m"
    assert alert["labels"]["severity"] == "critical"
    assert "{{ $labels.destination }}" in alert["annotations"]["summary"]


def test_monitoring_is_off_by_default(default_docs: list[Manifest]) -> None:
    for kind in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy", "ScaledObject", "HorizontalPodAutoscaler"):
        assert not by_kind(default_docs, kind)


# --- network policy ------------------------------------------------------------------------------------------


def test_network_policy_admits_only_the_operations_port_and_needed_egress(full_docs: list[Manifest]) -> None:
    policy = one(full_docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == one(full_docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert [rule["ports"] for rule in spec["ingress"]] == [[{"port": "http", "protocol": "TCP"}]]
    egress_ports = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (9093, "TCP"), (443, "TCP"), (8081, "TCP"), (4317, "TCP")} == egress_ports


# --- tracing -------------------------------------------------------------------------------------------------

COLLECTOR = "http://otel-collector.observability:4318"
TRACED = (*REQUIRED, "--set", "tracing.enabled=true", "--set", f"tracing.endpoint={COLLECTOR}")


def test_tracing_is_off_by_default(docs: list[Manifest]) -> None:
    assert not [name for name in env_of(docs) if name.startswith("OTEL_")]


def test_tracing_sets_the_standard_otel_variables_and_the_sdk_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, _get_from_env_or_default

    from service.ops.tracing import tracing_endpoint

    docs = render(
        *TRACED,
        "--set",
        "tracing.sampler=parentbased_traceidratio",
        "--set",
        "tracing.samplerArg=0.1",
        "--set",
        "tracing.resourceAttributes.deployment\\.environment\\.name=prod",
    )
    entries: list[dict[str, Any]] = container(docs)["env"]
    env = env_of(docs)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == COLLECTOR
    assert env["OTEL_SERVICE_NAME"]["value"] == "inference-bridge"
    assert env["OTEL_K8S_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    names = [entry["name"] for entry in entries]
    # Kubernetes expands $(OTEL_K8S_POD_NAME) only from a variable defined before it.
    assert names.index("OTEL_K8S_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    plain = {name: entry["value"] for name, entry in env.items() if name.startswith("OTEL_") and "value" in entry}
    plain["OTEL_RESOURCE_ATTRIBUTES"] = plain["OTEL_RESOURCE_ATTRIBUTES"].replace("$(OTEL_K8S_POD_NAME)", "pod-0")
    assert tracing_endpoint(plain) == f"{COLLECTOR}/v1/traces"
    for name, value in plain.items():
        monkeypatch.setenv(name, value)
    sampler = _get_from_env_or_default()
    assert isinstance(sampler, ParentBasedTraceIdRatio)
    assert sampler._root.rate == 0.1  # type: ignore[attr-defined]
    resource = Resource.create().attributes
    assert resource["service.name"] == "inference-bridge"
    assert resource["k8s.namespace.name"] == NAMESPACE
    assert resource["k8s.pod.name"] == "pod-0"
    assert resource["k8s.deployment.name"] == one(docs, "Deployment")["metadata"]["name"]
    assert resource["deployment.environment.name"] == "prod"


def test_tracing_service_name_can_be_set() -> None:
    docs = render(*TRACED, "--set", "tracing.serviceName=bridge-eu")
    assert env_of(docs)["OTEL_SERVICE_NAME"]["value"] == "bridge-eu"
    assert "OTEL_TRACES_SAMPLER_ARG" not in env_of(docs), "no ratio unless one is given"


def test_tracing_needs_an_endpoint() -> None:
    assert "tracing.enabled needs tracing.endpoint" in render_error(*REQUIRED, "--set", "tracing.enabled=true")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "tracing.sampler=sometimes"), "/tracing/sampler"),
        (("--set", "tracing.samplerArg=2"), "/tracing/samplerArg"),
        (("--set", "tracing.endpoint=otel:4318"), "/tracing/endpoint"),
        (("--set", "tracing.resourceAttributes.team=a\\,b"), "/tracing/resourceAttributes/team"),
        (("--set", "tracing.exporter=grpc"), "'exporter' not allowed"),
    ],
)
def test_schema_rejects_wrong_tracing_values(args: tuple[str, ...], message: str) -> None:
    error = render_error(*REQUIRED, *args)
    assert message in error


def test_network_policy_lets_spans_out_to_the_collector_only_when_tracing_is_on() -> None:
    def egress_ports(*args: str) -> set[int]:
        policy = one(render(*args, "--set", "networkPolicy.enabled=true"), "NetworkPolicy")
        return {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}

    assert 4318 in egress_ports(*TRACED)
    assert 4318 not in egress_ports(*REQUIRED)


# --- lint ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["default", "full"])
def test_helm_lint_is_clean(values: str) -> None:
    args = list(REQUIRED) if values == "default" else ["-f", str(FULL_VALUES)]
    result = run_helm("lint", "--strict", str(CHART), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    findings = [line for line in result.stdout.splitlines() if re.match(r"\[(WARNING|ERROR)\]", line.strip())]
    assert not findings, findings


# --- Kubernetes API schemas ----------------------------------------------------------------------------------


def _schema_cases() -> list[Any]:
    """One case per rendered object, value set and Kubernetes version, named `<values>-k8s<version>-<Kind>/<name>`.

    Rendered at collection so each object is a test of its own. A render that fails here becomes one case that
    renders again in the test and fails with helm's message (chart tests never skip).
    """
    cases = []
    for values in VALUE_SETS:
        for kube in SCHEMA_KUBE_VERSIONS:
            docs: list[Manifest] = []
            if HELM.exists():
                with contextlib.suppress(AssertionError, subprocess.SubprocessError):
                    docs = rendered_for(values, kube)
            if not docs:
                cases.append(pytest.param(values, kube, -1, id=f"{values}-k8s{kube}-render"))
            for index, doc in enumerate(docs):
                name = f"{doc['kind']}/{doc['metadata']['name']}"
                cases.append(pytest.param(values, kube, index, id=f"{values}-k8s{kube}-{name}"))
    return cases


@pytest.mark.parametrize(("values", "kube", "index"), _schema_cases())
def test_rendered_objects_are_valid_kubernetes_objects(values: str, kube: str, index: int) -> None:
    docs = rendered_for(values, kube)
    assert index >= 0, "rendered now but not at collection: run the tests again"
    doc = docs[index]
    api_version, kind, name = doc["apiVersion"], doc["kind"], doc["metadata"]["name"]
    if (api_version, kind) in CUSTOM_RESOURCES:
        pytest.skip(f"custom resource {kind} ({api_version}) {name}: kubernetes-validate has no schema for it")
    try:
        validated = kubernetes_validate.validate(doc, kube, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{kind} {api_version} is not served by Kubernetes {kube} (removed or misspelled?)", pytrace=False)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path) or "(root)"
        pytest.fail(f"{kind}/{name} is invalid for Kubernetes {kube} at {path}: {error.message}", pytrace=False)
    # The schema of that very version, not an older one it fell back to.
    assert validated == kube


def test_schemas_cover_every_built_in_kind_the_chart_renders() -> None:
    kinds = {
        (doc["apiVersion"], doc["kind"])
        for values in VALUE_SETS
        for kube in SCHEMA_KUBE_VERSIONS
        for doc in rendered_for(values, kube)
    }
    assert kinds - CUSTOM_RESOURCES == {
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "ServiceAccount"),
        ("policy/v1", "PodDisruptionBudget"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
    }
    assert kinds >= CUSTOM_RESOURCES, "a custom resource listed as skipped is no longer rendered: drop it"


@pytest.mark.parametrize("kube", SCHEMA_KUBE_VERSIONS)
def test_strict_schema_rejects_an_unknown_field(kube: str) -> None:
    # Without strict schemas a misspelled field (here imagePullPolice) is accepted and silently ignored.
    deployment = copy.deepcopy(one(rendered_for("default", kube), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolice"):
        kubernetes_validate.validate(deployment, kube, strict=True)
