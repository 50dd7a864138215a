"""JSON log lines: context fields are kept, secrets are removed even where JSON escaping would hide them, and
aiokafka's ERROR records of a broker restart or rebalance are lowered to WARNING while others stay."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import logging
from collections.abc import Iterator

import pytest

from service.ops.logging import (
    BROKER_UNREACHABLE,
    COORDINATOR_MOVED,
    EXPECTED_KAFKA_RECORDS,
    OUTAGE_AFTER_S,
    ExpectedKafkaErrors,
    JsonFormatter,
    configure_logging,
)
from service.ops.redaction import Redactor


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


# -- aiokafka's expected ERROR records ------------------------------------------------------------------------

COORDINATOR = "aiokafka.consumer.group_coordinator"
SEND_FAILED = "Error sending %s to node %s [%s] -- marking coordinator dead"
UNABLE_TO_CONNECT = "Unable connect to node with id %s: %s"
# One set of arguments per template, as the installed aiokafka logged them during a broker restart or rebalance.
OBSERVED_ARGS: dict[tuple[str, str], tuple[object, ...]] = {
    (COORDINATOR, SEND_FAILED): ("JoinGroupRequest", 1, "[Error 7] RequestTimedOutError"),
    (COORDINATOR, "Heartbeat send request failed: %s. Will retry."): ("NodeNotReadyError: node 1 not ready",),
    (COORDINATOR, "Group Coordinator Request failed: %s"): ("NodeNotReadyError: node 1 not ready",),
    ("aiokafka", UNABLE_TO_CONNECT): (1, "[Errno 111] Connection refused"),
    ("aiokafka", "Unable to update metadata from %s"): ([1],),
    ("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s"): (1, "KafkaConnectionError: closed"),
}


def _kafka_record(
    logger: str, template: str, args: tuple[object, ...], *, level: int = logging.ERROR, at: float = 1000.0
) -> logging.LogRecord:
    record = logging.LogRecord(logger, level, "aiokafka.py", 1, template, args, None)
    record.created = at
    return record


def test_every_lowered_template_has_observed_arguments() -> None:
    assert set(OBSERVED_ARGS) == set(EXPECTED_KAFKA_RECORDS)


@pytest.mark.parametrize(("logger", "template"), sorted(EXPECTED_KAFKA_RECORDS))
def test_the_templates_are_logged_at_error_by_the_installed_aiokafka(logger: str, template: str) -> None:
    """Matching is by exact template: an aiokafka upgrade that rewords one must fail here, not in production."""
    module = importlib.import_module("aiokafka.client" if logger == "aiokafka" else logger)
    source = ast.parse(inspect.getsource(module))
    assert logging.getLogger(logger) is module.log
    logged_at_error = {
        call.args[0].value
        for call in ast.walk(source)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "error"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "log"
        and call.args
        and isinstance(call.args[0], ast.Constant)
    }
    assert template in logged_at_error


@pytest.mark.parametrize(("logger", "template"), sorted(EXPECTED_KAFKA_RECORDS))
def test_expected_records_are_lowered_to_warning_and_say_why(logger: str, template: str) -> None:
    record = _kafka_record(logger, template, OBSERVED_ARGS[(logger, template)])
    message = record.getMessage()
    assert ExpectedKafkaErrors(logging.INFO).filter(record)
    entry = json.loads(JsonFormatter(Redactor([])).format(record))
    assert (entry["level"], entry["logger"], entry["msg"]) == ("warning", logger, message)
    assert entry["expected"] == EXPECTED_KAFKA_RECORDS[(logger, template)]
    assert entry["expected"] in (COORDINATOR_MOVED, BROKER_UNREACHABLE)


def test_the_join_group_timeout_of_a_restart_reads_as_expected() -> None:
    record = _kafka_record(COORDINATOR, SEND_FAILED, ("JoinGroupRequest", 1, "[Error 7] RequestTimedOutError"))
    ExpectedKafkaErrors().filter(record)
    entry = json.loads(JsonFormatter(Redactor([])).format(record))
    assert entry["msg"] == (
        "Error sending JoinGroupRequest to node 1 [[Error 7] RequestTimedOutError] -- marking coordinator dead"
    )
    assert (entry["level"], entry["expected"]) == (
        "warning",
        "group coordinator moved or restarted; aiokafka reconnects",
    )


@pytest.mark.parametrize(
    ("logger", "template", "args", "level"),
    [
        # aiokafka ERRORs that are not part of a restart or rebalance, or not seen in one
        (COORDINATOR, "Heartbeat session expired - marking coordinator dead", (), logging.ERROR),
        (
            COORDINATOR,
            "OffsetCommit failed for group %s due to group error (%s), will rejoin",
            ("g", "x"),
            logging.ERROR,
        ),
        (COORDINATOR, "Attempt to join group failed due to fatal error: %s", ("InvalidSessionTimeout",), logging.ERROR),
        ("aiokafka", 'Unable connect to "%s:%s": %s', ("kafka", 9092, "refused"), logging.ERROR),
        ("aiokafka.consumer.fetcher", "Unexpected error in fetcher routine", (), logging.ERROR),
        # a lowered template from another logger, e.g. the service's own
        ("service.kafka.consumer", UNABLE_TO_CONNECT, (1, "refused"), logging.ERROR),
        ("aiokafka.producer.sender", SEND_FAILED, ("X", 1, "y"), logging.ERROR),
        # the right template at another level
        (COORDINATOR, SEND_FAILED, ("JoinGroupRequest", 1, "timeout"), logging.WARNING),
        (COORDINATOR, SEND_FAILED, ("JoinGroupRequest", 1, "timeout"), logging.CRITICAL),
    ],
)
def test_other_records_pass_unchanged(logger: str, template: str, args: tuple[object, ...], level: int) -> None:
    record = _kafka_record(logger, template, args, level=level)
    before = dict(vars(record))
    assert ExpectedKafkaErrors(logging.INFO).filter(record)
    assert vars(record) == before


def test_a_message_that_is_not_a_string_passes_unchanged() -> None:
    record = _kafka_record("aiokafka", {"not": "hashable"}, ())  # type: ignore[arg-type]
    assert ExpectedKafkaErrors().filter(record)
    assert record.levelno == logging.ERROR
    assert not hasattr(record, "expected")


def test_a_broker_unreachable_past_the_restart_window_is_an_error_again() -> None:
    expected = ExpectedKafkaErrors()
    start = 5000.0
    levels = []
    for tick in range(int(OUTAGE_AFTER_S * 10) + 50):  # aiokafka retries every 100 ms
        record = _kafka_record("aiokafka", UNABLE_TO_CONNECT, (1, "refused"), at=start + tick / 10)
        assert expected.filter(record)
        levels.append((round(tick / 10, 1), record.levelname, getattr(record, "kafka_unreachable_s", None)))
    lowered = [at for at, level, _ in levels if level == "WARNING"]
    escalated = [(at, seconds) for at, level, seconds in levels if level == "ERROR"]
    assert lowered == [at for at, _, _ in levels if at < OUTAGE_AFTER_S]
    assert escalated[0] == (OUTAGE_AFTER_S, OUTAGE_AFTER_S)
    assert all(at >= OUTAGE_AFTER_S for at, _ in escalated)

    # A coordinator that moves during the outage is still expected: only connection failures escalate.
    moved = _kafka_record(COORDINATOR, SEND_FAILED, ("HeartbeatRequest", 1, "x"), at=start + OUTAGE_AFTER_S + 5)
    expected.filter(moved)
    assert moved.levelname == "WARNING"

    # The broker came back (no failure for a while); the next restart is expected again.
    later = start + len(levels) / 10 + 11
    record = _kafka_record("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", (1, "x"), at=later)
    expected.filter(record)
    assert (record.levelname, getattr(record, "kafka_unreachable_s", None)) == ("WARNING", 0.0)


def test_short_gaps_do_not_restart_the_window() -> None:
    expected = ExpectedKafkaErrors(outage_after_s=20.0)
    records = [_kafka_record("aiokafka", UNABLE_TO_CONNECT, (1, "refused"), at=100.0 + 5 * i) for i in range(6)]
    for record in records:
        expected.filter(record)
    assert [r.levelname for r in records] == ["WARNING"] * 4 + ["ERROR"] * 2


def test_lowered_records_below_the_configured_level_are_dropped() -> None:
    only_errors = ExpectedKafkaErrors(logging.ERROR)
    assert not only_errors.filter(_kafka_record(COORDINATOR, SEND_FAILED, ("JoinGroupRequest", 1, "timeout")))
    assert only_errors.filter(_kafka_record(COORDINATOR, "Heartbeat session expired - marking coordinator dead", ()))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    loggers = [logging.getLogger(), logging.getLogger("aiokafka"), logging.getLogger("httpx")]
    saved = [(logger, logger.level, logger.handlers[:]) for logger in loggers]
    yield
    for logger, level, handlers in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers


class _Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.levels: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.levels.append(record.levelname)


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_installs_the_filter_once(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json", Redactor([]))
    configure_logging("INFO", "json", Redactor([]))  # a second set-up replaces the first, with its filter
    (handler,) = logging.getLogger().handlers
    assert [type(f) for f in handler.filters] == [ExpectedKafkaErrors]
    seen = _Seen()  # as service.app's start-up handler: aiokafka's own handlers still see the ERROR
    logging.getLogger("aiokafka").addHandler(seen)
    try:
        coordinator = logging.getLogger(COORDINATOR)
        coordinator.error(SEND_FAILED, "JoinGroupRequest", 1, "[Error 7] RequestTimedOutError")
        coordinator.error("Heartbeat session expired - marking coordinator dead")
    finally:
        logging.getLogger("aiokafka").removeHandler(seen)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["level"], line.get("expected")) for line in lines] == [
        ("warning", COORDINATOR_MOVED),
        ("error", None),
    ]
    assert seen.levels == ["ERROR", "ERROR"]


@pytest.mark.usefixtures("restore_logging")
def test_text_format_shows_why_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING", "text", Redactor([]))
    logging.getLogger("aiokafka").error(UNABLE_TO_CONNECT, 1, "[Errno 111] Connection refused")
    err = capsys.readouterr().err
    assert " WARNING aiokafka Unable connect to node with id 1" in err
    assert BROKER_UNREACHABLE in err
