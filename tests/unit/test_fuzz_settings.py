"""Fuzzing the settings with hypothesis: any environment gives valid settings or a `SettingsError` whose message
names the bad variables; never another exception (which would be a traceback instead of exit code 2).

Variables are drawn from every name service/config/ reads (so values reach every validator), from
misspellings and unknown sections, and from anything with the BRIDGE_ prefix; values are any text, JSON (for
the JSON-typed settings), numbers in every spelling, and file paths for the *_FILE settings.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from service.config.settings import ENV_DELIMITER, ENV_PREFIX, Settings, SettingsError, load_settings
from tests.fuzz import strategies as fs


def _variable_names() -> list[str]:
    names = []
    for section, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += [f"{ENV_PREFIX}{section}{ENV_DELIMITER}{name}".upper() for name in annotation.model_fields]
            names.append(f"{ENV_PREFIX}{section}".upper())  # a whole section as JSON
        else:
            names.append(f"{ENV_PREFIX}{section}".upper())
    return sorted(names)


KNOWN = _variable_names()
REQUIRED = {
    "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092",
    "BRIDGE_OPENLAYER__API_KEY": "ol-key",
    "BRIDGE_HUMANLOOP__API_KEY": "hl-key",
}
names = (
    st.sampled_from(KNOWN)
    | st.sampled_from(KNOWN).map(str.lower)
    | st.sampled_from(KNOWN).map(lambda name: name + "X")
    | st.builds(lambda tail: ENV_PREFIX + tail, st.text(string.ascii_letters + "_", max_size=30))
)
json_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | fs.odd_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(fs.odd_text, inner, max_size=3),
    max_leaves=8,
).map(json.dumps)
numbers = st.sampled_from(["0", "-1", "1e309", "nan", "inf", "-inf", "0x10", "1_000", " 5 ", "9" * 5000, "", "true"])
values = st.text(max_size=60) | json_text | numbers | fs.huge_text


def _safe_path(value: str) -> bool:
    # A *_FILE value is opened: keep to paths that cannot block (a FIFO, a terminal) or read the machine's secrets.
    return not value.startswith(("/dev", "/proc", "/sys", "/run", "/var/run"))


def assert_loads_or_explains(environ: dict[str, str]) -> None:
    try:
        load_settings(environ)
    except SettingsError as error:
        message = str(error)
        first, _, rest = message.partition("\n")
        assert first.endswith("setting(s) invalid:"), message
        # One line per problem, each naming its variable (a JSON key with a line break in it spans two lines).
        problems = int(first.split()[0])
        assert problems >= 1, message
        assert rest.count(f"  {ENV_PREFIX}") + rest.count("  a BRIDGE_") >= problems, message


@fs.examples(1.0)
@given(extra=st.dictionaries(names, values.filter(_safe_path), max_size=6), keep_required=st.booleans())
def test_any_environment_loads_or_names_its_problems(extra: dict[str, str], keep_required: bool) -> None:
    assert_loads_or_explains({**(REQUIRED if keep_required else {}), **extra})


@pytest.mark.parametrize("name", KNOWN)
@fs.examples(0.1)
@given(value=values.filter(_safe_path))
def test_every_variable_takes_any_value(name: str, value: str) -> None:
    assert_loads_or_explains({**REQUIRED, name: value})


@given(path=st.text(max_size=40).filter(_safe_path))
def test_secret_files_anywhere(path: str) -> None:
    environ = dict(REQUIRED)
    del environ["BRIDGE_OPENLAYER__API_KEY"]
    assert_loads_or_explains({**environ, "BRIDGE_OPENLAYER__API_KEY_FILE": path})


def test_a_secret_file_that_is_not_text(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"\xff\xfe\x00 not utf-8")
    environ = {name: value for name, value in REQUIRED.items() if name != "BRIDGE_HUMANLOOP__API_KEY"}
    assert_loads_or_explains({**environ, "BRIDGE_HUMANLOOP__API_KEY_FILE": str(key)})


# --- what the fuzzer found --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["BRIDGE_OPENLAYER__DEFAULT_CONFIG", "BRIDGE_TOPICS__DLQ_OVERRIDES", "BRIDGE_KAFKA"])
def test_deeply_nested_json_is_a_settings_error(name: str) -> None:
    # An environment value can hold 128 KiB; 100,000 brackets are a valid (if absurd) variable.
    assert_loads_or_explains({**REQUIRED, name: "[" * 100_000})
