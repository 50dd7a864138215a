"""Settings come from `BRIDGE_*` variables only, fail with one message naming every problem, and never print secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]

OL_KEY = "ol-key-5d1f0c2a"
HL_KEY = "hl-key-91b7e3aa"
SASL_PASSWORD = "sasl-pw-7e0d44c1"
REGISTRY_PASSWORD = "registry-pw-3c9b2f10"

REQUIRED = {
    "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9092",
    "BRIDGE_OPENLAYER__API_KEY": OL_KEY,
    "BRIDGE_HUMANLOOP__API_KEY": HL_KEY,
}


def env(**overrides: str) -> dict[str, str]:
    """The required variables plus `overrides`, whose keyword names are the variable names."""
    return {**REQUIRED, **overrides}


def load_error(environ: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(environ)
    return str(info.value)


# --- every documented variable name takes effect ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "read"),
    [
        pytest.param(
            "BRIDGE_KAFKA__BOOTSTRAP_SERVERS",
            "b1:9092,b2:9093",
            lambda s: s.kafka.bootstrap_servers,
            id="kafka-bootstrap",
        ),
        pytest.param("BRIDGE_KAFKA__GROUP_ID", "bridge-blue", lambda s: s.kafka.group_id, id="kafka-group"),
        pytest.param("BRIDGE_TOPICS__INFERENCES", "t-inf", lambda s: s.topics.inferences, id="topic-inferences"),
        pytest.param("BRIDGE_TOPICS__ROW_UPDATES", "t-rows", lambda s: s.topics.row_updates, id="topic-rows"),
        pytest.param("BRIDGE_TOPICS__LOG_UPDATES", "t-logs", lambda s: s.topics.log_updates, id="topic-logs"),
        pytest.param(
            "BRIDGE_OPENLAYER__BASE_URL",
            "http://openlayer.test:8080/v1",
            lambda s: s.openlayer.base_url,
            id="openlayer-url",
        ),
        pytest.param(
            "BRIDGE_OPENLAYER__API_KEY",
            "ol-other-key-0001",
            lambda s: s.openlayer.api_key.get_secret_value(),
            id="openlayer-key",
        ),
        pytest.param(
            "BRIDGE_HUMANLOOP__BASE_URL",
            "https://humanloop.test/v4",
            lambda s: s.humanloop.base_url,
            id="humanloop-url",
        ),
        pytest.param(
            "BRIDGE_HUMANLOOP__API_KEY",
            "hl-other-key-0002",
            lambda s: s.humanloop.api_key.get_secret_value(),
            id="humanloop-key",
        ),
        pytest.param(
            "BRIDGE_SCHEMA_REGISTRY__URL",
            "http://registry.test:8081",
            lambda s: s.schema_registry.url,
            id="registry-url",
        ),
    ],
)
def test_each_documented_variable_takes_effect(name: str, value: str, read: Callable[[Settings], object]) -> None:
    assert read(load_settings(env())) != value, "the test value must differ from the default"

    assert read(load_settings(env(**{name: value}))) == value


def test_variable_names_are_case_insensitive() -> None:
    settings = load_settings(env(bridge_kafka__group_id="lower-case-group"))

    assert settings.kafka.group_id == "lower-case-group"


def test_an_explicit_mapping_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_KAFKA__GROUP_ID", "from-process-env")

    assert load_settings(env()).kafka.group_id == "inference-bridge"


def test_variables_without_the_prefix_are_ignored() -> None:
    settings = load_settings(env(PATH="/usr/bin", KAFKA_BOOTSTRAP_SERVERS="elsewhere:9092", BRIDGEX="1"))

    assert settings.kafka.bootstrap_servers == "broker-1:9092"


def test_base_urls_lose_a_trailing_slash() -> None:
    settings = load_settings(
        env(BRIDGE_OPENLAYER__BASE_URL="https://ol.test/v1/", BRIDGE_HUMANLOOP__BASE_URL="https://hl.test/v4/")
    )

    assert (settings.openlayer.base_url, settings.humanloop.base_url) == ("https://ol.test/v1", "https://hl.test/v4")


# --- failures: one error, every problem named -----------------------------------------------------------------


def test_missing_required_settings_are_all_named_in_one_error() -> None:
    message = load_error({})

    for name in REQUIRED:
        assert f"{name}: is required but not set" in message
    assert message.startswith("3 setting(s) invalid")


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_each_required_setting_is_required(missing: str) -> None:
    environ = {k: v for k, v in REQUIRED.items() if k != missing}

    message = load_error(environ)

    assert missing in message
    assert all(other not in message for other in REQUIRED if other != missing)


def test_several_bad_values_are_all_named_in_one_error() -> None:
    bad = {
        "BRIDGE_KAFKA__SESSION_TIMEOUT_MS": "forty-five",
        "BRIDGE_KAFKA__AUTO_OFFSET_RESET": "middle",
        "BRIDGE_OPENLAYER__BASE_URL": "ftp://openlayer.test",
        "BRIDGE_DELIVERY__MAX_CONNECTIONS": "0",
        "BRIDGE_DELIVERY__EVIDENCE_BODY_BYTES": "1000000",
        "BRIDGE_OBSERVABILITY__LOG_LEVEL": "CHATTY",
    }

    message = load_error(env(**bad))

    for name in bad:
        assert name in message, name
    assert message.startswith(f"{len(bad)} setting(s) invalid")


def test_missing_and_bad_and_unknown_settings_share_one_error() -> None:
    message = load_error({"BRIDGE_DELIVERY__MAX_CONNECTIONS": "-1", "BRIDGE_KAFKAA__GROUP_ID": "g"})

    for name in [*REQUIRED, "BRIDGE_DELIVERY__MAX_CONNECTIONS", "BRIDGE_KAFKAA__GROUP_ID"]:
        assert name in message, name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("BRIDGE_KAFKAA__GROUP_ID", id="misspelt-section"),
        pytest.param("BRIDGE_TOPIC__INFERENCES", id="singular-section"),
        pytest.param("BRIDGE_KAFKA_BOOTSTRAP_SERVERS", id="single-underscore"),
        pytest.param("BRIDGE_RETRIES", id="no-such-top-level"),
    ],
)
def test_an_unknown_section_is_an_error(name: str) -> None:
    message = load_error(env(**{name: "x"}))

    assert f"{name}: unknown setting" in message


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("BRIDGE_KAFKA__BOOTSRAP_SERVERS", id="kafka-typo"),
        pytest.param("BRIDGE_TOPICS__INFERENCE", id="topics-typo"),
        pytest.param("BRIDGE_DELIVERY__MAX_RETRIES", id="delivery-unknown"),
        pytest.param("BRIDGE_OPENLAYER__APIKEY", id="openlayer-typo"),
    ],
)
def test_an_unknown_nested_key_is_an_error(name: str) -> None:
    message = load_error(env(**{name: "1"}))

    assert name in message


def test_an_empty_api_key_is_rejected() -> None:
    message = load_error(env(BRIDGE_OPENLAYER__API_KEY="   "))

    assert "BRIDGE_OPENLAYER__API_KEY" in message


def test_the_three_topics_must_be_distinct() -> None:
    message = load_error(env(BRIDGE_TOPICS__ROW_UPDATES="inferences"))

    assert "BRIDGE_TOPICS" in message


# --- secrets ------------------------------------------------------------------------------------------------


def _with_every_secret() -> dict[str, str]:
    return env(
        BRIDGE_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        BRIDGE_KAFKA__SASL_MECHANISM="SCRAM-SHA-512",
        BRIDGE_KAFKA__SASL_USERNAME="bridge",
        BRIDGE_KAFKA__SASL_PASSWORD=SASL_PASSWORD,
        BRIDGE_SCHEMA_REGISTRY__URL="https://registry.test",
        BRIDGE_SCHEMA_REGISTRY__USERNAME="reader",
        BRIDGE_SCHEMA_REGISTRY__PASSWORD=REGISTRY_PASSWORD,
    )


def test_secrets_are_secret_strings_with_their_values() -> None:
    settings = load_settings(_with_every_secret())

    secrets = {
        OL_KEY: settings.openlayer.api_key,
        HL_KEY: settings.humanloop.api_key,
        SASL_PASSWORD: settings.kafka.sasl_password,
        REGISTRY_PASSWORD: settings.schema_registry.password,
    }
    for value, secret in secrets.items():
        assert isinstance(secret, SecretStr)
        assert secret.get_secret_value() == value


@pytest.mark.parametrize(
    "render",
    [
        pytest.param(lambda s: json.dumps(s.model_dump(mode="json")), id="model_dump-json"),
        pytest.param(lambda s: s.model_dump_json(), id="model_dump_json"),
        pytest.param(repr, id="repr"),
        pytest.param(str, id="str"),
    ],
)
def test_secrets_never_appear_when_settings_are_rendered(render: Callable[[Settings], str]) -> None:
    text = render(load_settings(_with_every_secret()))

    for secret in (OL_KEY, HL_KEY, SASL_PASSWORD, REGISTRY_PASSWORD):
        assert secret not in text
    assert "bridge" in text, "non-secret values are still shown"


def test_a_password_inside_the_registry_url_is_not_printed() -> None:
    try:
        settings = load_settings(env(BRIDGE_SCHEMA_REGISTRY__URL=f"https://reader:{REGISTRY_PASSWORD}@registry.test"))
    except SettingsError:
        return  # refusing credentials in the URL (use USERNAME/PASSWORD) is an equally good fix
    assert REGISTRY_PASSWORD not in json.dumps(settings.model_dump(mode="json"))


def test_a_secret_in_a_bad_value_is_not_echoed_in_the_error() -> None:
    message = load_error(env(BRIDGE_KAFKA__SESSION_TIMEOUT_MS=OL_KEY, BRIDGE_HUMANLOOP__BASE_URL=HL_KEY))

    assert OL_KEY not in message
    assert HL_KEY not in message


# --- structured values --------------------------------------------------------------------------------------


def test_json_pipeline_configs_parse() -> None:
    configs = {
        "pipe-1": {"outputColumnName": "output", "inputVariableNames": ["q"], "prompt": [{"role": "user"}]},
        "pipe-2": {"classNames": ["neg", "pos"], "textColumnName": "text"},
    }
    default = {"outputColumnName": "answer", "metadata": {"team": "ml"}}

    settings = load_settings(
        env(
            BRIDGE_OPENLAYER__PIPELINE_CONFIGS=json.dumps(configs),
            BRIDGE_OPENLAYER__DEFAULT_CONFIG=json.dumps(default),
        )
    )

    assert settings.openlayer.pipeline_configs == configs
    assert settings.openlayer.default_config == default


def test_pipeline_configs_default_to_none_configured() -> None:
    settings = load_settings(env())

    assert settings.openlayer.pipeline_configs == {}
    assert settings.openlayer.default_config is None


def test_malformed_json_is_a_settings_error_naming_the_variable() -> None:
    message = load_error(env(BRIDGE_OPENLAYER__PIPELINE_CONFIGS="{not json"))

    assert "BRIDGE_OPENLAYER" in message


@pytest.mark.parametrize(
    "sasl",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"BRIDGE_KAFKA__SASL_MECHANISM": "PLAIN"}, id="mechanism-only"),
        pytest.param({"BRIDGE_KAFKA__SASL_MECHANISM": "PLAIN", "BRIDGE_KAFKA__SASL_USERNAME": "u"}, id="no-password"),
        pytest.param({"BRIDGE_KAFKA__SASL_USERNAME": "u", "BRIDGE_KAFKA__SASL_PASSWORD": "pw"}, id="no-mechanism"),
        pytest.param(
            {
                "BRIDGE_KAFKA__SASL_MECHANISM": "PLAIN",
                "BRIDGE_KAFKA__SASL_USERNAME": "u",
                "BRIDGE_KAFKA__SASL_PASSWORD": "",
            },
            id="empty-password",
        ),
    ],
)
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
def test_sasl_without_complete_credentials_fails(protocol: str, sasl: dict[str, str]) -> None:
    message = load_error(env(BRIDGE_KAFKA__SECURITY_PROTOCOL=protocol, **sasl))

    assert "BRIDGE_KAFKA" in message
    assert "sasl" in message


def test_sasl_with_complete_credentials_loads() -> None:
    settings = load_settings(_with_every_secret())

    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_username == "bridge"


def test_confluent_wire_format_without_a_registry_fails() -> None:
    message = load_error(env(BRIDGE_SCHEMA_REGISTRY__WIRE_FORMAT="confluent"))

    assert "BRIDGE_SCHEMA_REGISTRY__URL" in message


@pytest.mark.parametrize(
    ("extra", "wire_format", "url"),
    [
        pytest.param({}, "auto", None, id="auto-no-registry"),
        pytest.param({"BRIDGE_SCHEMA_REGISTRY__URL": ""}, "auto", None, id="empty-url-is-none"),
        pytest.param({"BRIDGE_SCHEMA_REGISTRY__WIRE_FORMAT": "plain"}, "plain", None, id="plain"),
        pytest.param(
            {"BRIDGE_SCHEMA_REGISTRY__WIRE_FORMAT": "confluent", "BRIDGE_SCHEMA_REGISTRY__URL": "http://r.test/"},
            "confluent",
            "http://r.test",
            id="confluent-with-registry",
        ),
    ],
)
def test_wire_format_combinations_that_load(extra: dict[str, str], wire_format: str, url: str | None) -> None:
    registry = load_settings(env(**extra)).schema_registry

    assert (registry.wire_format, registry.url) == (wire_format, url)


@pytest.mark.parametrize(
    ("extra", "topic", "expected"),
    [
        pytest.param({}, "inferences", "inferences.dlq", id="default-suffix"),
        pytest.param({}, "log-updates", "log-updates.dlq", id="default-suffix-logs"),
        pytest.param({"BRIDGE_TOPICS__DLQ_SUFFIX": "-dead"}, "inferences", "inferences-dead", id="custom-suffix"),
        pytest.param(
            {"BRIDGE_TOPICS__DLQ_OVERRIDES": '{"inferences": "dlq.inferences.v2"}'},
            "inferences",
            "dlq.inferences.v2",
            id="override",
        ),
        pytest.param(
            {"BRIDGE_TOPICS__DLQ_OVERRIDES": '{"inferences": "dlq.inferences.v2"}'},
            "inference-row-updates",
            "inference-row-updates.dlq",
            id="override-is-per-topic",
        ),
    ],
)
def test_dead_letter_topic(extra: dict[str, str], topic: str, expected: str) -> None:
    assert load_settings(env(**extra)).topics.dead_letter_topic(topic) == expected


def test_settings_are_frozen() -> None:
    settings = load_settings(env())

    with pytest.raises(ValueError, match="frozen"):
        settings.kafka.group_id = "changed"  # type: ignore[misc]


# --- python -m service check-config ----------------------------------------------------------------------------


def _run_cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**base, **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_prints_the_settings_as_json_without_secrets() -> None:
    done = _run_cli({**_with_every_secret(), "BRIDGE_KAFKA__GROUP_ID": "cli-group"}, "check-config")

    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["kafka"]["group_id"] == "cli-group"
    assert printed["kafka"]["bootstrap_servers"] == "broker-1:9092"
    for secret in (OL_KEY, HL_KEY, SASL_PASSWORD, REGISTRY_PASSWORD):
        assert secret not in done.stdout
        assert secret not in done.stderr


def test_check_config_with_missing_settings_exits_2_naming_them() -> None:
    done = _run_cli({"BRIDGE_OPENLAYER__API_KEY": OL_KEY}, "check-config")

    assert done.returncode == 2
    assert "BRIDGE_KAFKA__BOOTSTRAP_SERVERS" in done.stderr
    assert "BRIDGE_HUMANLOOP__API_KEY" in done.stderr
    assert "BRIDGE_OPENLAYER__API_KEY" not in done.stderr
    assert OL_KEY not in done.stdout + done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        pytest.param({"BRIDGE_KAFKA__SSL_CAFILE": "/ca.pem"}, "has no TLS", id="tls-file-without-tls"),
        pytest.param(
            {"BRIDGE_KAFKA__SECURITY_PROTOCOL": "SSL", "BRIDGE_KAFKA__SSL_KEYFILE": "/k.pem"},
            "both ssl_certfile and ssl_keyfile",
            id="key-without-cert",
        ),
        pytest.param(
            {"BRIDGE_KAFKA__SECURITY_PROTOCOL": "SSL", "BRIDGE_KAFKA__SSL_CERTFILE": "/c.pem"},
            "both ssl_certfile and ssl_keyfile",
            id="cert-without-key",
        ),
    ],
)
def test_inconsistent_tls_settings_are_refused(overrides: dict[str, str], fragment: str) -> None:
    message = load_error(env(**overrides))
    assert "BRIDGE_KAFKA" in message
    assert fragment in message


def test_mutual_tls_settings_are_accepted() -> None:
    settings = load_settings(
        env(
            BRIDGE_KAFKA__SECURITY_PROTOCOL="SSL",
            BRIDGE_KAFKA__SSL_CAFILE="/ca.pem",
            BRIDGE_KAFKA__SSL_CERTFILE="/c.pem",
            BRIDGE_KAFKA__SSL_KEYFILE="/k.pem",
        )
    )
    assert (settings.kafka.ssl_certfile, settings.kafka.ssl_keyfile) == ("/c.pem", "/k.pem")
