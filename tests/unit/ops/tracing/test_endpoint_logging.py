"""The "tracing on" line shows where spans go without the collector's credentials: OTEL_* URLs are not validated
like the service's own, and the redactor knows only the BRIDGE_* secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from service.ops.logging import JsonFormatter
from service.ops.redaction import Redactor
from service.ops.tracing import build_tracing
from service.ops.tracing.api import loggable_endpoint

PASSWORD = "collector-pw-5b1e9d"
TOKEN = "query-token-77c2a0"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What the service's JSON logging writes, with the redactor main() builds (it knows only BRIDGE_* secrets)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(Redactor(["sk-ol-key-0001", "hl_sk_key_0002"])))
    logger = logging.getLogger("service.tracing")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        pytest.param(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            f"https://tenant:{PASSWORD}@otel.example:4318",
            "https://otel.example:4318/v1/traces",
            id="base",
        ),
        pytest.param(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            f"http://tenant:{PASSWORD}@[::1]:4318/otlp/v1/traces?token={TOKEN}",
            "http://[::1]:4318/otlp/v1/traces",
            id="traces-ipv6-query",
        ),
    ],
)
async def test_tracing_on_logs_the_endpoint_without_its_credentials(
    log_lines: io.StringIO, name: str, value: str, shown: str
) -> None:
    tracing = build_tracing(group_id="g", max_batch_rows=10, environ={name: value})
    await tracing.aclose()

    out = log_lines.getvalue()
    assert PASSWORD not in out
    assert TOKEN not in out
    [line] = [json.loads(text) for text in out.splitlines() if '"tracing on"' in text]
    assert line["endpoint"] == shown


@pytest.mark.parametrize(
    ("endpoint", "shown"),
    [
        pytest.param("http://collector:4318/v1/traces", "http://collector:4318/v1/traces", id="plain"),
        pytest.param("https://user@Collector.Example/v1/traces", "https://Collector.Example/v1/traces", id="user"),
        pytest.param("https://u:p@w@c:4318/v1/traces", "https://c:4318/v1/traces", id="at-in-password"),
        pytest.param("http://c:4318/v1/traces#frag", "http://c:4318/v1/traces", id="fragment"),
    ],
)
def test_the_loggable_endpoint_keeps_scheme_host_port_and_path(endpoint: str, shown: str) -> None:
    assert loggable_endpoint(endpoint) == shown
