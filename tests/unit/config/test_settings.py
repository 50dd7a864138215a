"""Settings come from `BRIDGE_*` variables only, fail with one message naming every problem, and never print secrets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from service.config.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[3]

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


def _problems(environ: dict[str, str]) -> str:
    """The settings error's message, or "" when the settings load."""
    try:
        load_settings(environ)
    except SettingsError as error:
        return str(error)
    return ""


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

    assert message.startswith(f"1 setting(s) invalid:\n  {name}: unknown setting"), message


@pytest.mark.parametrize(
    ("name", "parent"),
    [
        pytest.param("BRIDGE_KAFKA__BOOTSTRAP_SERVERS__X", "BRIDGE_KAFKA__BOOTSTRAP_SERVERS", id="beneath-a-set-one"),
        pytest.param("BRIDGE_KAFKA__GROUP_ID__X", "BRIDGE_KAFKA__GROUP_ID", id="beneath-an-unset-one"),
        pytest.param("BRIDGE_SCHEMAS_DIR__X", "BRIDGE_SCHEMAS_DIR", id="beneath-a-top-level-one"),
        pytest.param("BRIDGE_DELIVERY__MAX_CONNECTIONS__0", "BRIDGE_DELIVERY__MAX_CONNECTIONS", id="beneath-a-number"),
    ],
)
def test_a_variable_beneath_a_setting_is_an_error_naming_it(name: str, parent: str) -> None:
    message = load_error(env(**{name: "foo"}))

    # One problem: the variable itself, not the setting it sits beneath (whose value is fine or its default).
    assert message == (
        f"1 setting(s) invalid:\n  {name}: unknown setting ({parent} takes its whole value; nothing is read beneath it)"
    )


@pytest.mark.parametrize(
    ("name", "parent"),
    [
        pytest.param("BRIDGE_TOPICS__DLQ_OVERRIDES__INFERENCES", "BRIDGE_TOPICS__DLQ_OVERRIDES", id="topic-map"),
        pytest.param("BRIDGE_OPENLAYER__PIPELINE_CONFIGS__P1", "BRIDGE_OPENLAYER__PIPELINE_CONFIGS", id="configs"),
        pytest.param("bridge_openlayer__default_config__outputName", "BRIDGE_OPENLAYER__DEFAULT_CONFIG", id="key"),
    ],
)
def test_a_variable_beneath_a_map_is_an_error_pointing_at_its_json(name: str, parent: str) -> None:
    # Read as a map entry, its key would be folded to lower case (names are case-insensitive): a mixed-case topic
    # or a camelCase config key would silently not match.
    message = load_error(env(**{name: "foo"}))

    assert message == (
        f"1 setting(s) invalid:\n  {name.upper()}: unknown setting "
        f"({parent} takes its whole value as JSON; nothing is read beneath it)"
    )


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        pytest.param("BRIDGE_KAFKA__BOOTSRAP_SERVERS", "BRIDGE_KAFKA__BOOTSTRAP_SERVERS", id="letter-missing"),
        pytest.param("BRIDGE_KAFKA_BOOTSTRAP_SERVERS", "BRIDGE_KAFKA__BOOTSTRAP_SERVERS", id="single-underscore"),
        pytest.param("BRIDGE_TOPIC__INFERENCES", "BRIDGE_TOPICS__INFERENCES", id="singular-section"),
        pytest.param("BRIDGE_OPENLAYER__APIKEY", "BRIDGE_OPENLAYER__API_KEY", id="underscore-missing"),
        pytest.param("BRIDGE_SCHEMA_DIR", "BRIDGE_SCHEMAS_DIR", id="top-level"),
    ],
)
def test_a_misspelt_variable_names_the_nearest_setting(name: str, meant: str) -> None:
    message = load_error(env(**{name: "1"}))

    assert f"  {name}: unknown setting (did you mean {meant}?)" in message


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("BRIDGE_DELIVERY__MAX_RETRIES", id="no-such-setting"),
        pytest.param("BRIDGE_KAFKA__", id="empty-setting"),
        pytest.param("BRIDGE_RETRIES", id="no-such-section"),
    ],
)
def test_an_unknown_variable_far_from_any_setting_suggests_none(name: str) -> None:
    message = load_error(env(**{name: "1"}))

    assert f"  {name}: unknown setting" in message
    assert "did you mean" not in message


def test_every_setting_variable_is_known() -> None:
    # The check for unknown names must not refuse a real one: any value gives valid settings or other problems.
    names = [f"BRIDGE_{section}".upper() for section in Settings.model_fields]
    for section, info in Settings.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names += [f"BRIDGE_{section}__{name}".upper() for name in info.annotation.model_fields]
    assert len(names) > 50, names

    for name in names:
        assert "unknown setting" not in _problems(env(**{name: "x"})), name


def test_a_whole_section_can_still_be_given_as_json() -> None:
    settings = load_settings(env(BRIDGE_DELIVERY='{"max_connections": 7, "read_timeout_s": 2.5}'))

    assert (settings.delivery.max_connections, settings.delivery.read_timeout_s) == (7, 2.5)


def test_an_unknown_variable_in_the_process_environment_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    for name, value in env(BRIDGE_KAFKA__BOOTSTRAP_SERVERS__X="foo").items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError) as info:
        load_settings()

    assert str(info.value).startswith("1 setting(s) invalid:\n  BRIDGE_KAFKA__BOOTSTRAP_SERVERS__X: unknown setting")


def test_an_empty_api_key_is_rejected() -> None:
    message = load_error(env(BRIDGE_OPENLAYER__API_KEY="   "))

    assert "BRIDGE_OPENLAYER__API_KEY" in message


@pytest.mark.parametrize("key", ["ol-key-1\nol-key-2", "ol-key\t1", "\u201col-key\u201d", "ol-key\x7f"])
def test_an_api_key_no_http_header_can_carry_is_refused_without_being_shown(key: str) -> None:
    message = load_error(env(BRIDGE_OPENLAYER__API_KEY=key))

    assert "BRIDGE_OPENLAYER__API_KEY" in message
    assert "no HTTP header can carry" in message
    assert "ol-key" not in message


def test_an_api_key_file_no_http_header_can_carry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("hl-key-1\nhl-key-2\n")
    environ = {k: v for k, v in env().items() if k != "BRIDGE_HUMANLOOP__API_KEY"}

    message = load_error({**environ, "BRIDGE_HUMANLOOP__API_KEY_FILE": str(path)})

    assert "BRIDGE_HUMANLOOP__API_KEY" in message
    assert "no HTTP header can carry" in message
    assert "hl-key" not in message


def test_an_api_keys_surrounding_whitespace_is_dropped_as_a_files_is() -> None:
    """A Secret made from a file keeps the file's newline when it is set as an environment variable."""
    settings = load_settings(env(BRIDGE_OPENLAYER__API_KEY=" ol-key-1\n"))

    assert settings.openlayer.api_key.get_secret_value() == "ol-key-1"


def test_the_three_topics_must_be_distinct() -> None:
    message = load_error(env(BRIDGE_TOPICS__ROW_UPDATES="inferences"))

    assert "BRIDGE_TOPICS" in message


# --- numbers are finite ------------------------------------------------------------------------------------


def _float_variables() -> list[str]:
    """Every variable of a float setting, found from the model so that a new one is covered too."""
    names = []
    for section, info in Settings.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                if field.annotation is float or field.annotation == float | None:
                    names.append(f"BRIDGE_{section}__{name}".upper())
    return names


FLOAT_VARIABLES = _float_variables()


def test_the_float_settings_are_found() -> None:
    # The parametrized tests below would pass vacuously with none.
    assert {"BRIDGE_DELIVERY__READ_TIMEOUT_S", "BRIDGE_BATCH__LINGER_MS", "BRIDGE_KAFKA__COMMIT_INTERVAL_S"} <= set(
        FLOAT_VARIABLES
    )


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "1e309", "-1e309"])
@pytest.mark.parametrize("name", FLOAT_VARIABLES)
def test_a_float_setting_must_be_finite(name: str, value: str) -> None:
    message = load_error(env(**{name: value}))

    assert message == f"1 setting(s) invalid:\n  {name}: Input should be a finite number"


@pytest.mark.parametrize("name", FLOAT_VARIABLES)
def test_a_float_setting_refuses_a_huge_finite_number_naming_it(name: str) -> None:
    # Finite, so `allow_inf_nan` takes it: each float setting's upper bound must refuse it (tests/unit/config/
    # test_bounds.py has the bounds themselves).
    message = load_error(env(**{name: "1e300"}))

    assert re.fullmatch(rf"1 setting\(s\) invalid:\n  {name}: Input should be less than or equal to [0-9]+", message)


def test_a_non_finite_number_in_a_section_given_as_json_is_named() -> None:
    # Python's JSON reader takes Infinity and NaN.
    message = load_error(env(BRIDGE_DELIVERY='{"read_timeout_s": Infinity, "drain_timeout_s": NaN}'))

    assert "BRIDGE_DELIVERY__READ_TIMEOUT_S: Input should be a finite number" in message
    assert "BRIDGE_DELIVERY__DRAIN_TIMEOUT_S: Input should be a finite number" in message


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


def test_a_password_inside_the_registry_url_is_refused_and_not_printed() -> None:
    message = load_error(env(BRIDGE_SCHEMA_REGISTRY__URL=f"https://reader:{REGISTRY_PASSWORD}@registry.test"))

    assert "BRIDGE_SCHEMA_REGISTRY__URL" in message
    assert "credentials" in message  # USERNAME and PASSWORD are the way
    assert REGISTRY_PASSWORD not in message


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


NON_FINITE_TAIL = (
    ": NaN, Infinity and -Infinity (and literals too large for a double, such as 1e309) would reach the API as null"
)


@pytest.mark.parametrize(
    ("literal", "read_as"),
    [
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("1e309", "Infinity"),
        ("-2e400", "-Infinity"),
    ],
)
@pytest.mark.parametrize(
    ("name", "template", "path"),
    [
        pytest.param(
            "BRIDGE_OPENLAYER__PIPELINE_CONFIGS",
            '{"pipe-1": {"outputColumnName": "o", "prompt": [{"role": "user", "temperature": %s}]}}',
            '["pipe-1"]["prompt"][0]["temperature"]',
            id="pipeline-configs",
        ),
        pytest.param("BRIDGE_OPENLAYER__DEFAULT_CONFIG", '{"threshold": %s}', '["threshold"]', id="default-config"),
    ],
)
def test_a_non_finite_number_in_a_json_config_is_refused_with_its_path(
    name: str, template: str, path: str, literal: str, read_as: str
) -> None:
    # Python's JSON reader takes these; orjson would send them to the API as null (service/apis/json.py).
    message = load_error(env(**{name: template % literal}))

    assert (
        message
        == f"1 setting(s) invalid:\n  {name}: JSON numbers must be finite, got {read_as} at {path}{NON_FINITE_TAIL}"
    )


def test_a_non_finite_number_in_a_config_of_a_section_given_as_json_is_named() -> None:
    message = load_error(env(BRIDGE_OPENLAYER=json.dumps({"default_config": {"a": [1, 2]}}).replace("2", "NaN")))

    assert message == (
        f"1 setting(s) invalid:\n  BRIDGE_OPENLAYER__DEFAULT_CONFIG: JSON numbers must be finite, got NaN at "
        f'["a"][1]{NON_FINITE_TAIL}'
    )


def test_every_non_finite_number_is_counted_and_the_first_ones_shown() -> None:
    configs = '{"p1": {"a": NaN, "b": 1.5, "c": Infinity}, "p2": {"line\\nbreak": -Infinity, "e": NaN, "f": NaN}}'

    message = load_error(env(BRIDGE_OPENLAYER__PIPELINE_CONFIGS=configs))

    assert message == (
        "1 setting(s) invalid:\n  BRIDGE_OPENLAYER__PIPELINE_CONFIGS: JSON numbers must be finite, got "
        'NaN at ["p1"]["a"], Infinity at ["p1"]["c"], -Infinity at ["p2"]["line\\nbreak"] and 2 more'
        f"{NON_FINITE_TAIL}"
    )


def test_finite_numbers_in_json_configs_are_kept() -> None:
    default = {"big": 1e308, "small": -1e-308, "zero": 0.0, "nested": [{"x": 1.5}], "none": None}

    settings = load_settings(env(BRIDGE_OPENLAYER__DEFAULT_CONFIG=json.dumps(default)))

    assert settings.openlayer.default_config == default


def _json_setting_variables() -> list[str]:
    """Every variable of a dict or list setting, found from the model so that a new one is covered too."""
    names = []
    for section, info in Settings.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                if "dict[" in str(field.annotation) or "list[" in str(field.annotation):
                    names.append(f"BRIDGE_{section}__{name}".upper())
    return names


JSON_VARIABLES = _json_setting_variables()


def test_the_json_settings_are_found() -> None:
    assert {
        "BRIDGE_OPENLAYER__PIPELINE_CONFIGS",
        "BRIDGE_OPENLAYER__DEFAULT_CONFIG",
        "BRIDGE_TOPICS__DLQ_OVERRIDES",
    } <= set(JSON_VARIABLES)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309"])
@pytest.mark.parametrize("name", JSON_VARIABLES)
def test_no_json_setting_takes_a_non_finite_number(name: str, literal: str) -> None:
    # Wherever the number sits (a map's value, or one level down for a map of configs), the variable is named.
    for value in (f'{{"k": {literal}}}', f'{{"k": {{"k": {literal}}}}}'):
        message = load_error(env(**{name: value}))

        assert message.startswith("1 setting(s) invalid:\n  " + name), message


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


# --- the consumer group's timeouts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("session", "heartbeat"),
    [
        pytest.param(45_000, 45_000, id="equal"),
        pytest.param(45_000, 45_001, id="just-above"),
        pytest.param(6_000, 60_000, id="far-above"),
        pytest.param(1_000, 3_000, id="short-session-default-heartbeat"),
    ],
)
def test_a_heartbeat_interval_not_below_the_session_timeout_is_refused_naming_both(
    session: int, heartbeat: int
) -> None:
    message = load_error(
        env(BRIDGE_KAFKA__SESSION_TIMEOUT_MS=str(session), BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS=str(heartbeat))
    )

    assert message == (
        f"1 setting(s) invalid:\n  BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS: {heartbeat} ms must be below "
        f"BRIDGE_KAFKA__SESSION_TIMEOUT_MS ({session} ms), or the broker drops this member from the group between "
        "two heartbeats; Kafka recommends at most a third of it"
    )


def test_a_heartbeat_interval_of_a_section_given_as_json_is_checked_too() -> None:
    message = load_error(env(BRIDGE_KAFKA='{"bootstrap_servers": "b:9092", "session_timeout_ms": 2000}'))

    assert (
        "  BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS: 3000 ms must be below BRIDGE_KAFKA__SESSION_TIMEOUT_MS (2000 ms)"
        in (message)
    )


@pytest.mark.parametrize(
    ("session", "heartbeat"),
    [
        pytest.param(45_000, 44_999, id="just-below"),
        pytest.param(45_000, 15_001, id="above-a-third-is-advice-only"),
        pytest.param(6_000, 500, id="tests-support-bridge"),
        pytest.param(46_000, 500, id="test-restart-logs"),
    ],
)
def test_a_heartbeat_interval_below_the_session_timeout_loads(session: int, heartbeat: int) -> None:
    kafka = load_settings(
        env(BRIDGE_KAFKA__SESSION_TIMEOUT_MS=str(session), BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS=str(heartbeat))
    ).kafka

    assert (kafka.session_timeout_ms, kafka.heartbeat_interval_ms) == (session, heartbeat)


def test_the_default_group_timeouts_load() -> None:
    kafka = load_settings(env()).kafka

    assert (kafka.session_timeout_ms, kafka.heartbeat_interval_ms) == (45_000, 3_000)


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


def test_check_config_refuses_an_infinite_timeout_naming_it() -> None:
    done = _run_cli(env(BRIDGE_DELIVERY__READ_TIMEOUT_S="inf"), "check-config")

    assert done.returncode == 2
    assert done.stderr == (
        "inference-bridge: 1 setting(s) invalid:\n  BRIDGE_DELIVERY__READ_TIMEOUT_S: Input should be a finite number\n"
    )
    assert done.stdout == ""


def test_check_config_refuses_a_huge_finite_timeout_naming_it() -> None:
    done = _run_cli(env(BRIDGE_DELIVERY__READ_TIMEOUT_S="1e300"), "check-config")

    assert done.returncode == 2
    assert done.stderr == (
        "inference-bridge: 1 setting(s) invalid:\n"
        "  BRIDGE_DELIVERY__READ_TIMEOUT_S: Input should be less than or equal to 86400\n"
    )
    assert done.stdout == ""


TLS_FILES = {
    "BRIDGE_KAFKA__SSL_CAFILE": "ca.pem",
    "BRIDGE_KAFKA__SSL_CERTFILE": "c.pem",
    "BRIDGE_KAFKA__SSL_KEYFILE": "k.pem",
}
# Stand-ins: the settings check that each file can be read, not what it holds (the Kafka client factory does,
# tests/unit/kafka/test_clients.py, with real certificates).
PEM_STAND_IN = "-----BEGIN CERTIFICATE-----\nnot-checked-here\n-----END CERTIFICATE-----\n"


def _tls_files(tmp_path: Path, *names: str) -> dict[str, str]:
    """The variables `names` (of TLS_FILES), each pointing at a real readable file under `tmp_path`."""
    paths = {name: tmp_path / TLS_FILES[name] for name in names}
    for path in paths.values():
        path.write_text(PEM_STAND_IN)
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize(
    ("protocol", "names", "fragment"),
    [
        pytest.param("PLAINTEXT", ["BRIDGE_KAFKA__SSL_CAFILE"], "has no TLS", id="tls-file-without-tls"),
        pytest.param("SSL", ["BRIDGE_KAFKA__SSL_KEYFILE"], "both ssl_certfile and ssl_keyfile", id="key-without-cert"),
        pytest.param("SSL", ["BRIDGE_KAFKA__SSL_CERTFILE"], "both ssl_certfile and ssl_keyfile", id="cert-without-key"),
    ],
)
def test_inconsistent_tls_settings_are_refused(tmp_path: Path, protocol: str, names: list[str], fragment: str) -> None:
    message = load_error(env(BRIDGE_KAFKA__SECURITY_PROTOCOL=protocol, **_tls_files(tmp_path, *names)))
    assert "BRIDGE_KAFKA" in message
    assert fragment in message


def test_mutual_tls_settings_are_accepted(tmp_path: Path) -> None:
    files = _tls_files(tmp_path, *TLS_FILES)

    settings = load_settings(env(BRIDGE_KAFKA__SECURITY_PROTOCOL="SSL", **files))

    assert settings.kafka.ssl_cafile == files["BRIDGE_KAFKA__SSL_CAFILE"]
    assert (settings.kafka.ssl_certfile, settings.kafka.ssl_keyfile) == (
        files["BRIDGE_KAFKA__SSL_CERTFILE"],
        files["BRIDGE_KAFKA__SSL_KEYFILE"],
    )


def _fifo(directory: Path) -> Path:
    path = directory / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(lambda d: d / "absent.pem", "cannot read {path}: No such file or directory", id="missing"),
        pytest.param(lambda d: d / "absent" / "ca.pem", "cannot read {path}: No such file or directory", id="no-dir"),
        pytest.param(lambda d: d, "{path} is not a regular file", id="directory"),
        pytest.param(_fifo, "{path} is not a regular file", id="fifo"),
        pytest.param(lambda d: _secret_file(d, "", "empty.pem"), "{path} is empty", id="empty"),
    ],
)
@pytest.mark.parametrize("name", list(TLS_FILES))
def test_an_unusable_tls_file_is_one_line_naming_the_variable_and_the_path(
    tmp_path: Path, name: str, make: Callable[[Path], Path], problem: str
) -> None:
    files = _tls_files(tmp_path, *TLS_FILES)
    path = make(tmp_path)

    message = load_error(env(BRIDGE_KAFKA__SECURITY_PROTOCOL="SSL", **{**files, name: str(path)}))

    assert message == f"1 setting(s) invalid:\n  {name}: {problem.format(path=path)}"


def test_every_unusable_tls_file_is_named_with_every_other_problem(tmp_path: Path) -> None:
    environ = {name: str(tmp_path / f"absent-{file}") for name, file in TLS_FILES.items()}

    message = load_error({**environ, "BRIDGE_KAFKA__SECURITY_PROTOCOL": "SSL", "BRIDGE_DELIVERY__MAX_CONNECTIONS": "0"})

    assert message.startswith("7 setting(s) invalid"), message
    for name, path in environ.items():
        assert f"  {name}: cannot read {path}: No such file or directory" in message.splitlines()
    for name in ("BRIDGE_KAFKA__BOOTSTRAP_SERVERS", "BRIDGE_DELIVERY__MAX_CONNECTIONS", "BRIDGE_OPENLAYER__API_KEY"):
        assert name in message, name


def test_a_tls_file_content_never_appears_in_an_error(tmp_path: Path) -> None:
    # A readable key file in a section with another problem: the error names the problem, not what the file holds.
    secret = "tls-key-material-4e8a1f"
    key = _secret_file(tmp_path, f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n", "k.pem")
    files = _tls_files(tmp_path, "BRIDGE_KAFKA__SSL_CERTFILE")

    message = load_error(
        env(BRIDGE_KAFKA__SECURITY_PROTOCOL="SSL", BRIDGE_KAFKA__SSL_KEYFILE=str(key), BRIDGE_KAFKA__SSL_CAFILE="/no")
        | files
    )

    assert "BRIDGE_KAFKA__SSL_CAFILE: cannot read /no" in message
    assert secret not in message


def test_check_config_refuses_a_missing_tls_file_naming_the_variable_and_the_path(tmp_path: Path) -> None:
    # The reviewer's case: a typo in the CA path passed check-config and `run` exited 1 naming nothing.
    cafile = tmp_path / "ca-typo.pem"

    done = _run_cli(env(BRIDGE_KAFKA__SECURITY_PROTOCOL="SSL", BRIDGE_KAFKA__SSL_CAFILE=str(cafile)), "check-config")

    assert done.returncode == 2
    assert done.stderr == (
        f"inference-bridge: 1 setting(s) invalid:\n  BRIDGE_KAFKA__SSL_CAFILE: cannot read {cafile}: "
        "No such file or directory\n"
    )
    assert done.stdout == ""


# --- secrets from files (a Kubernetes Secret mounted as a volume) --------------------------------------------

FILE_BACKED = [
    pytest.param("BRIDGE_OPENLAYER__API_KEY", lambda s: (s.openlayer.api_key, s.openlayer.api_key_file), id="ol"),
    pytest.param("BRIDGE_HUMANLOOP__API_KEY", lambda s: (s.humanloop.api_key, s.humanloop.api_key_file), id="hl"),
    pytest.param(
        "BRIDGE_KAFKA__SASL_PASSWORD", lambda s: (s.kafka.sasl_password, s.kafka.sasl_password_file), id="sasl"
    ),
    pytest.param(
        "BRIDGE_SCHEMA_REGISTRY__PASSWORD",
        lambda s: (s.schema_registry.password, s.schema_registry.password_file),
        id="registry",
    ),
]
SecretAndFile = Callable[[Settings], tuple[SecretStr | None, Path | None]]


def _without(name: str, environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k != name}


def _secret_file(tmp_path: Path, content: str, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


@pytest.mark.parametrize(("name", "read"), FILE_BACKED)
def test_a_secret_can_come_from_a_file_and_the_path_is_kept(tmp_path: Path, name: str, read: SecretAndFile) -> None:
    path = _secret_file(tmp_path, "from-file-0f3a9c\n")

    settings = load_settings({**_without(name, _with_every_secret()), f"{name}_FILE": str(path)})

    secret, kept = read(settings)
    assert secret is not None
    assert secret.get_secret_value() == "from-file-0f3a9c", "the trailing newline is not part of the secret"
    assert kept == path


@pytest.mark.parametrize(("name", "read"), FILE_BACKED)
def test_a_secret_set_directly_has_no_file(name: str, read: SecretAndFile) -> None:
    secret, kept = read(load_settings(_with_every_secret()))

    assert secret is not None
    assert kept is None


@pytest.mark.parametrize(("name", "read"), FILE_BACKED)
def test_a_secret_set_both_ways_names_both_variables(tmp_path: Path, name: str, read: SecretAndFile) -> None:
    path = _secret_file(tmp_path, "from-file-0f3a9c")

    message = load_error({**_with_every_secret(), f"{name}_FILE": str(path)})

    assert f"{name} and {name}_FILE are both set" in message
    assert message.startswith("1 setting(s) invalid")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(lambda d: d / "absent", "No such file or directory", id="missing"),
        pytest.param(lambda d: _secret_file(d, ""), "is empty", id="empty"),
        pytest.param(lambda d: _secret_file(d, " \n\t\n"), "is empty", id="whitespace-only"),
        pytest.param(lambda d: d, "Is a directory", id="directory"),
        pytest.param(lambda d: _secret_file(d, "k" * 70_000), "larger than", id="huge"),
    ],
)
@pytest.mark.parametrize("name", ["BRIDGE_OPENLAYER__API_KEY", "BRIDGE_HUMANLOOP__API_KEY"])
def test_an_unusable_key_file_is_one_line_naming_the_variable_and_the_path(
    tmp_path: Path, name: str, make: Callable[[Path], Path], problem: str
) -> None:
    path = make(tmp_path)

    message = load_error({**_without(name, REQUIRED), f"{name}_FILE": str(path)})

    assert message.startswith("1 setting(s) invalid"), message
    (line,) = message.splitlines()[1:]
    assert line.startswith(f"  {name}_FILE: ")
    assert str(path) in line
    assert problem in line
    assert "required" not in line, "an unreadable file is the problem, not a missing key"


def test_a_file_problem_is_reported_with_every_other_problem(tmp_path: Path) -> None:
    environ = {
        "BRIDGE_OPENLAYER__API_KEY_FILE": str(tmp_path / "absent"),
        "BRIDGE_OPENLAYER__BASE_URL": "ftp://openlayer.test",
        "BRIDGE_HUMANLOOP__API_KEY_FILE": str(_secret_file(tmp_path, "")),
        "BRIDGE_DELIVERY__MAX_CONNECTIONS": "0",
    }

    message = load_error(environ)

    for name in [*environ, "BRIDGE_KAFKA__BOOTSTRAP_SERVERS"]:
        assert name in message, name
    assert message.startswith("5 setting(s) invalid"), message


def test_a_file_content_never_appears_in_an_error_or_a_rendering(tmp_path: Path) -> None:
    # The key file is fine but the section has another problem: the error must not echo the key.
    key = _secret_file(tmp_path, OL_KEY)
    environ = {**_without("BRIDGE_OPENLAYER__API_KEY", REQUIRED), "BRIDGE_OPENLAYER__API_KEY_FILE": str(key)}

    message = load_error({**environ, "BRIDGE_OPENLAYER__BASE_URL": "ftp://openlayer.test"})
    settings = load_settings(environ)

    assert OL_KEY not in message
    for text in (message, repr(settings), settings.model_dump_json(), json.dumps(settings.model_dump(mode="json"))):
        assert OL_KEY not in text
    assert str(key) in settings.model_dump_json(), "the path is shown: it tells the operator where the key is read"


def test_a_missing_key_names_its_file_variable_too() -> None:
    message = load_error(_without("BRIDGE_HUMANLOOP__API_KEY", REQUIRED))

    assert "BRIDGE_HUMANLOOP__API_KEY: is required but not set" in message
    assert "BRIDGE_HUMANLOOP__API_KEY_FILE" in message


def test_an_empty_file_variable_means_unset() -> None:
    settings = load_settings(env(BRIDGE_OPENLAYER__API_KEY_FILE="", BRIDGE_KAFKA__SASL_PASSWORD_FILE=""))

    assert settings.openlayer.api_key.get_secret_value() == OL_KEY
    assert (settings.openlayer.api_key_file, settings.kafka.sasl_password_file) == (None, None)


def test_sasl_is_complete_with_a_password_file(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, SASL_PASSWORD)
    environ = {**_without("BRIDGE_KAFKA__SASL_PASSWORD", _with_every_secret())}

    assert "sasl" in load_error(environ)
    settings = load_settings({**environ, "BRIDGE_KAFKA__SASL_PASSWORD_FILE": str(path)})

    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SASL_PASSWORD


def test_key_files_are_read_from_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BRIDGE_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9092")
    monkeypatch.setenv("BRIDGE_OPENLAYER__API_KEY_FILE", str(_secret_file(tmp_path, OL_KEY, "ol")))
    monkeypatch.setenv("BRIDGE_HUMANLOOP__API_KEY_FILE", str(_secret_file(tmp_path, HL_KEY, "hl")))

    settings = load_settings()

    assert settings.openlayer.api_key.get_secret_value() == OL_KEY
    assert settings.humanloop.api_key.get_secret_value() == HL_KEY
    assert settings.humanloop.api_key_file == tmp_path / "hl"


def test_check_config_reads_key_files_and_prints_their_paths_only(tmp_path: Path) -> None:
    ol, hl = _secret_file(tmp_path, OL_KEY + "\n", "ol"), _secret_file(tmp_path, HL_KEY, "hl")
    environ = {
        "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9092",
        "BRIDGE_OPENLAYER__API_KEY_FILE": str(ol),
        "BRIDGE_HUMANLOOP__API_KEY_FILE": str(hl),
    }

    done = _run_cli(environ, "check-config")

    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["openlayer"]["api_key_file"] == str(ol)
    assert printed["humanloop"]["api_key_file"] == str(hl)
    for secret in (OL_KEY, HL_KEY):
        assert secret not in done.stdout + done.stderr


@pytest.mark.parametrize("column", ["null", '""', "7", '["id"]'])
@pytest.mark.parametrize("variable", ["BRIDGE_OPENLAYER__PIPELINE_CONFIGS", "BRIDGE_OPENLAYER__DEFAULT_CONFIG"])
def test_an_operator_config_must_name_a_real_inference_id_column(variable: str, column: str) -> None:
    """Else every record of its pipelines would be dead-lettered as invalid-config, for the operator's mistake."""
    config = f'{{"outputColumnName": "output", "inferenceIdColumnName": {column}}}'
    value = f'{{"pipeline-1": {config}}}' if variable.endswith("PIPELINE_CONFIGS") else config

    message = load_error(env(**{variable: value}))

    assert variable in message
    assert "inferenceIdColumnName must be a column name" in message


def test_an_operator_config_may_leave_the_inference_id_column_to_its_setting() -> None:
    settings = load_settings(
        env(
            BRIDGE_OPENLAYER__PIPELINE_CONFIGS='{"p": {"outputColumnName": "o", "inferenceIdColumnName": "id"}}',
            BRIDGE_OPENLAYER__DEFAULT_CONFIG='{"outputColumnName": "o"}',
        )
    )

    assert settings.openlayer.pipeline_configs["p"]["inferenceIdColumnName"] == "id"
    assert settings.openlayer.default_config == {"outputColumnName": "o"}


def test_an_unreadable_secret_file_and_a_bad_tls_file_are_both_named(tmp_path: Path) -> None:
    """Found by tests/unit/test_fuzz_settings.py: with a secret file problem, the section's other problems are
    gathered with it, and a TLS file's own error type made that raise a KeyError instead of a settings error."""
    message = load_error(
        env(
            BRIDGE_KAFKA__SASL_PASSWORD_FILE=str(tmp_path / "no-password"),
            BRIDGE_KAFKA__SSL_CAFILE=str(tmp_path / "no-ca.pem"),
        )
    )

    assert f"BRIDGE_KAFKA__SASL_PASSWORD_FILE: cannot read {tmp_path / 'no-password'}" in message
    assert f"BRIDGE_KAFKA__SSL_CAFILE: cannot read {tmp_path / 'no-ca.pem'}" in message
