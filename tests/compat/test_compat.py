"""What `make compat` relies on, without a broker: the version read from the jars, the properties and format flags
each version needs, the suites per version and the reading of pytest's results."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.__main__ import CORE, MORE, SECURITY, _counts, suite_files
from tests.support.kafka_broker import kafka_version, server_properties, supports_dynamic_quorum

PORTS = {"port": 9092, "cport": 9093, "xport": 9094, "xport2": 9095, "xport3": 9096}


def _jars(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_the_version_comes_from_the_core_jar(tmp_path: Path) -> None:
    jars = _jars(tmp_path, "kafka-clients-3.7.2.jar", "kafka_2.13-3.7.2.jar", "kafka-server-3.7.2.jar")
    assert kafka_version(jars) == (3, 7, 2)


def test_no_core_jar_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make kafka-jars"):
        kafka_version(_jars(tmp_path, "kafka-clients-4.4.0.jar"))


@pytest.mark.parametrize(
    ("version", "dynamic"), [((3, 7, 2), False), ((3, 8, 1), False), ((3, 9, 2), True), ((4, 4, 0), True)]
)
def test_the_quorum_of_one_is_the_kind_the_version_can_format(version: tuple[int, ...], dynamic: bool) -> None:
    props = server_properties(version, Path("/data"), PORTS, {})
    assert supports_dynamic_quorum(version) is dynamic
    if dynamic:  # formatted with --standalone, which refuses controller.quorum.voters
        assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
        assert "controller.quorum.voters" not in props
    else:  # before KIP-853: a static voter set, formatted without a flag
        assert props["controller.quorum.voters"] == "1@127.0.0.1:9093"
        assert "controller.quorum.bootstrap.servers" not in props


def test_share_group_settings_only_from_4_0_and_extra_properties_win() -> None:
    extra = {"listeners": "PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{xport}", "num.io.threads": "4"}
    old = server_properties((3, 9, 2), Path("/data"), PORTS, extra)
    new = server_properties((4, 1, 1), Path("/data"), PORTS, extra)
    assert not any(key.startswith("share.") for key in old)
    assert new["share.coordinator.state.topic.replication.factor"] == "1"
    for props in (old, new):
        assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,SASL_SSL://127.0.0.1:9094"
        assert props["num.io.threads"] == "4"
        assert props["log.dirs"] == "/data"


def test_suites_per_version() -> None:
    full, security = suite_files((3, 7, 2), fast=False)
    assert security
    assert [Path(f).name for f in full] == [*CORE, *SECURITY, *MORE]
    fast, _ = suite_files((4, 4, 0), fast=True)
    assert [Path(f).name for f in fast] == [*CORE, *SECURITY]
    before_scram, security = suite_files((3, 4, 1), fast=False)  # no SCRAM users at format time before 3.5
    assert not security
    assert not any(Path(f).name in SECURITY for f in before_scram)
    assert all(Path(f).exists() for f in full), "a compat suite names a test file that is gone"


def test_counts_come_from_the_junit_report(tmp_path: Path) -> None:
    junit = tmp_path / "report.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="40">'
        "</testsuite></testsuites>"
    )
    assert _counts(junit) == (40, 3, 3)
    assert _counts(tmp_path / "missing.xml") == (0, 0, 0)
