"""The service as a child process (chaos scenarios, crash tests, the demo) runs on what its caller gives it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bridge import BridgeProcess


def test_the_child_takes_no_service_setting_from_the_shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A BRIDGE_DELIVERY__* exported where `make chaos` runs would change the settings every scenario says are the
    defaults; an OTEL_* would turn tracing on."""
    monkeypatch.setenv("BRIDGE_DELIVERY__INITIAL_BACKOFF_S", "0.05")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("PATH_FOR_THE_TEST", "kept")

    child = BridgeProcess({"BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}, tmp_path / "log")

    assert child.environ["BRIDGE_KAFKA__BOOTSTRAP_SERVERS"] == "127.0.0.1:1"
    assert "BRIDGE_DELIVERY__INITIAL_BACKOFF_S" not in child.environ
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in child.environ
    assert child.environ["PATH_FOR_THE_TEST"] == "kept"
