"""JSON log lines: context fields are kept, and secrets are removed even where JSON escaping would hide them."""

from __future__ import annotations

import json
import logging

import pytest

from service.deadletter import Redactor
from service.observability import JsonFormatter


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("service.test", logging.WARNING, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_line_is_one_json_object_with_its_context() -> None:
    line = JsonFormatter(Redactor([])).format(_record("dead-lettered", topic="t", partition=2, offset=7))
    entry = json.loads(line)
    assert (entry["msg"], entry["topic"], entry["partition"], entry["offset"]) == ("dead-lettered", "t", 2, 7)
    assert entry["level"] == "warning"


@pytest.mark.parametrize("secret", ['pa"ss\\word', "plain-secret-1", "tab\tsecret"])
def test_secrets_are_redacted_even_when_json_escaping_would_change_them(secret: str) -> None:
    formatter = JsonFormatter(Redactor([secret]))
    line = formatter.format(_record(f"auth failed with {secret}", error=f"key={secret}", nested={"k": secret}))
    assert secret not in line
    assert json.dumps(secret)[1:-1] not in line
    assert "[REDACTED]" in json.loads(line)["msg"]
