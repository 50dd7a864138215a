"""Upper bounds: start-up refuses a huge but finite duration or Kafka size, naming its variable, instead of the
service failing on it later (a client that cannot be built, a Kafka request that cannot be encoded, a pause that
never ends); see docs/configuration.md, "Upper bounds", and service/config/section.py."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.config.section import INT32_MAX
from service.config.settings import ENV_DELIMITER, ENV_PREFIX, Settings, SettingsError, load_settings

CONFIGURATION = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"

REQUIRED = {
    "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9092",
    "BRIDGE_OPENLAYER__API_KEY": "ol-key-0b6e",
    "BRIDGE_HUMANLOOP__API_KEY": "hl-key-4a1c",
}


def _settings_fields() -> dict[str, FieldInfo]:
    """Every setting of every section, by its variable, found from the model so that a new one is covered too."""
    fields = {}
    for section, info in Settings.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                fields[f"{ENV_PREFIX}{section}{ENV_DELIMITER}{name}".upper()] = field
    return fields


def _upper_bound(field: FieldInfo) -> float | None:
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Le):
            return float(constraint.le)  # type: ignore[arg-type]
        if isinstance(constraint, annotated_types.Lt):
            return float(constraint.lt)  # type: ignore[arg-type]
    return None


FIELDS = _settings_fields()
DURATIONS = sorted(name for name in FIELDS if name.endswith(("_S", "_MS")))
COMPARED_ONLY = frozenset({"BRIDGE_DELIVERY__NOT_FOUND_GRACE_S"})
"""Compared with a record's age, never waited for nor sent: its bound may exceed Kafka's 32-bit ms."""


def _problems(name: str, value: str) -> str:
    """The settings error's message for one variable set to `value`, or "" when the settings load."""
    try:
        load_settings({**REQUIRED, name: value})
    except SettingsError as error:
        return str(error)
    return ""


def _read(name: str, value: str) -> object:
    section, field = name.removeprefix(ENV_PREFIX).lower().split(ENV_DELIMITER)
    return getattr(getattr(load_settings({**REQUIRED, name: value}), section), field)


# --- every duration has a bound, and the bound is usable ------------------------------------------------------


def test_the_duration_settings_are_found() -> None:
    # The parametrized tests below would pass vacuously with none.
    assert {
        "BRIDGE_DELIVERY__READ_TIMEOUT_S",
        "BRIDGE_DELIVERY__DRAIN_TIMEOUT_S",
        "BRIDGE_BATCH__LINGER_MS",
        "BRIDGE_KAFKA__SESSION_TIMEOUT_MS",
        "BRIDGE_DEAD_LETTER__SEND_TIMEOUT_S",
    } <= set(DURATIONS)


@pytest.mark.parametrize("name", DURATIONS)
def test_every_duration_setting_has_an_upper_bound(name: str) -> None:
    assert _upper_bound(FIELDS[name]) is not None, (
        f"{name} has no upper bound: give it `le=` (service/config/section.py says which) so that start-up refuses "
        "a value the service cannot use"
    )


@pytest.mark.parametrize("name", DURATIONS)
def test_every_duration_bound_fits_what_its_readers_can_hold(name: str) -> None:
    bound = _upper_bound(FIELDS[name])
    assert bound is not None
    ms = bound * 1000 if name.endswith("_S") else bound
    # pyreqwest takes a timedelta, which the connect + 2 x read timeout backstop must fit (it raises if not).
    timedelta(milliseconds=3 * ms)
    if name not in COMPARED_ONLY:
        # Kafka carries durations as 32-bit counts of ms (the produce request's timeout, a JoinGroup's session
        # timeout), and the event loop's timers are given these too.
        assert ms <= INT32_MAX


# --- both sides of the bounds ---------------------------------------------------------------------------------

# (variable, the largest value taken as written in the message, a value just above it)
BOUNDS = [
    ("BRIDGE_DELIVERY__CONNECT_TIMEOUT_S", "86400", "86400.001"),
    ("BRIDGE_DELIVERY__READ_TIMEOUT_S", "86400", "86400.001"),
    ("BRIDGE_DELIVERY__MIN_ATTEMPT_TIMEOUT_S", "86400", "86401"),
    ("BRIDGE_DELIVERY__INITIAL_BACKOFF_S", "86400", "86401"),
    ("BRIDGE_DELIVERY__MAX_BACKOFF_S", "86400", "86400.5"),
    ("BRIDGE_DELIVERY__RETRY_AFTER_CAP_S", "86400", "86400.5"),
    ("BRIDGE_DELIVERY__DRAIN_TIMEOUT_S", "86400", "86400.5"),
    ("BRIDGE_DELIVERY__NOT_FOUND_GRACE_S", "315360000", "315360000.5"),
    ("BRIDGE_DELIVERY__MAX_CONNECTIONS", "65535", "65536"),
    ("BRIDGE_BATCH__LINGER_MS", "86400000", "86400000.5"),
    # The first value Kafka could not carry as a timeout in ms: every dead-letter write failed.
    ("BRIDGE_DEAD_LETTER__SEND_TIMEOUT_S", "86400", "2147483.648"),
    ("BRIDGE_KAFKA__COMMIT_INTERVAL_S", "86400", "86400.5"),
    ("BRIDGE_KAFKA__SESSION_TIMEOUT_MS", "2147483647", "2147483648"),
    ("BRIDGE_KAFKA__MAX_POLL_INTERVAL_MS", "2147483647", "2147483648"),
    ("BRIDGE_KAFKA__FETCH_MAX_BYTES", "2147483647", "2147483648"),
    ("BRIDGE_KAFKA__MAX_PARTITION_FETCH_BYTES", "2147483647", "2147483648"),
]


@pytest.mark.parametrize(("name", "bound", "above"), BOUNDS, ids=[name for name, _, _ in BOUNDS])
def test_a_setting_takes_its_upper_bound(name: str, bound: str, above: str) -> None:
    assert _read(name, bound) == float(bound)


@pytest.mark.parametrize(("name", "bound", "above"), BOUNDS, ids=[name for name, _, _ in BOUNDS])
def test_a_setting_above_its_upper_bound_is_refused_naming_it(name: str, bound: str, above: str) -> None:
    assert _problems(name, above) == f"1 setting(s) invalid:\n  {name}: Input should be less than or equal to {bound}"


@pytest.mark.parametrize(("name", "bound", "above"), BOUNDS, ids=[name for name, _, _ in BOUNDS])
def test_a_huge_finite_value_is_refused_naming_it(name: str, bound: str, above: str) -> None:
    huge = "1e300" if "." in above or name.endswith("_S") else "1" + "0" * 300
    assert _problems(name, huge) == f"1 setting(s) invalid:\n  {name}: Input should be less than or equal to {bound}"


def test_the_heartbeat_interval_has_kafkas_bound_before_the_session_check() -> None:
    # It cannot reach its own bound (it must stay below the session timeout), but a section validated alone
    # (tests/unit/kafka/test_clients.py builds them) must not carry a value Kafka cannot hold.
    name = "BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS"
    assert _problems(name, "2147483648") == (
        f"1 setting(s) invalid:\n  {name}: Input should be less than or equal to 2147483647"
    )


def test_a_huge_value_in_a_section_given_as_json_is_named() -> None:
    message = _problems("BRIDGE_DELIVERY", '{"read_timeout_s": 1e300, "drain_timeout_s": 20}')

    assert message == (
        "1 setting(s) invalid:\n  BRIDGE_DELIVERY__READ_TIMEOUT_S: Input should be less than or equal to 86400"
    )


def test_every_bound_at_once_is_named() -> None:
    environ = {**REQUIRED, **{name: above for name, _, above in BOUNDS}}
    with pytest.raises(SettingsError) as info:
        load_settings(environ)

    assert str(info.value).splitlines()[0] == f"{len(BOUNDS)} setting(s) invalid:"


# --- the documentation ----------------------------------------------------------------------------------------


def _documented_bounds() -> dict[str, float]:
    text = CONFIGURATION.read_text()
    section = text.split("\n## Upper bounds\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(BRIDGE_\w+)` \| `([0-9.]+)` \|", section, flags=re.MULTILINE)
    return {name: float(bound) for name, bound in rows}


def test_the_documented_bounds_are_the_models() -> None:
    model = {name: bound for name, field in FIELDS.items() if (bound := _upper_bound(field)) is not None}

    assert _documented_bounds() == model, "docs/configuration.md's Upper bounds table differs from the settings model"
