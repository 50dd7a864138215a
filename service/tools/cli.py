"""What the two operator commands that read dead-letter topics share (`replay` and `dlq`): exit codes,
reading the bridge's headers back, and an argument parser that reports instead of calling `sys.exit`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from aiokafka.errors import KafkaError

from service.core.errors import BridgeError

Headers = tuple[tuple[str, bytes | None], ...]
"""A record's headers: Kafka allows a header without a value (None)."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def last_header(headers: Headers, name: str) -> bytes | None:
    """The last value of `name`: the bridge appends its evidence after the original headers, so it wins."""
    for key, value in reversed(headers):
        if key == name:
            return value
    return None


def header_text(value: bytes | None) -> str | None:
    """A header value as text, or None when it is absent or not UTF-8."""
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


class ParserExit(Exception):
    """argparse wants to exit (after --help): returned as a status, since main() must not call sys.exit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors raise the command's usage error (a `BridgeError`) instead of exiting."""

    def __init__(self, *args: object, usage_error: type[BridgeError], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._usage_error = usage_error

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, file=sys.stderr, end="")
        raise ParserExit(status)

    def error(self, message: str) -> NoReturn:
        raise self._usage_error(f"{message}\n{self.format_usage().rstrip()}")


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse `type` for integers of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            limit = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
            raise argparse.ArgumentTypeError(f"{limit}, got {value}")
        return value

    return parse


def non_empty(text: str) -> str:
    """An argparse `type` for names that must not be blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def describe_error(exc: BaseException) -> str:
    """aiokafka's messages often start with the class name already; don't say it twice."""
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"


@contextlib.contextmanager
def kafka_errors(what: str, error: type[BridgeError]) -> Iterator[None]:
    """The boundary: nothing above the command sees an aiokafka exception, only `error` saying `what` failed."""
    try:
        yield
    except KafkaError as exc:
        raise error(f"{what}: {describe_error(exc)}") from exc
