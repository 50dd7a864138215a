"""What every settings section shares: strictness, and secrets that may come from files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Final, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.config.credentials import SecretFileError, read_secret_file

BOTH_SET = "secret_value_and_file"
NON_FINITE_JSON = "non_finite_json"
_PATHS_SHOWN = 3

# Upper bounds (`le=`) of the duration settings, so that start-up refuses a value the service could not use
# instead of failing or stalling later. A huge finite value passes `allow_inf_nan`, but at run time a 1e300 s
# HTTP timeout stops the pyreqwest client from being built (a timedelta holds at most about 8.6e13 s;
# service/http/reqwest.py), a dead-letter send timeout above 2,147,483 s overflows the produce request's int32
# timeout in ms (every DLQ write fails; service/kafka/clients.py, build_durable_producer), and a retry pause,
# linger or drain that long never ends. One day is far above any sane timeout, pause or interval, and below
# every such limit (86,400,000 ms fits an int32).
DAY_S: Final = 86_400.0
DAY_MS: Final = DAY_S * 1000
INT32_MAX: Final = 2**31 - 1
"""Kafka's int settings are 32-bit: a larger session timeout or fetch size cannot be encoded in its request."""


class Section(BaseModel):
    """A settings section: frozen, unknown fields and non-finite numbers refused, secrets optionally read from files."""

    # A typo must fail loudly, not be ignored: in a variable's name it is caught before validation
    # (service/config/settings.py, _unknown_variables), in a section given as JSON
    # (BRIDGE_KAFKA='{"bootsrap_servers": ...}') it is caught here.
    # Every float setting is a duration, a size or a rate: `inf`, `nan` and overflowing literals
    # (`1e309` reads as inf) would pass `gt=0` or fail it with a misleading bound, so they are refused
    # here for every section at once ("Input should be a finite number").
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # Secret fields that may come from a file instead: the sibling `<name>_file` holds the path,
    # and the file is read here so `<name>` holds the secret either way and its readers need not care.
    _file_backed: ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="after")
    @classmethod
    def _json_finite(cls, value: Any) -> Any:
        # Python's JSON reader (which pydantic-settings uses) takes NaN, Infinity and -Infinity, and reads an
        # overflowing literal (1e309) as Infinity; `allow_inf_nan` above refuses them only where a float is
        # declared. Inside free-form JSON (the Openlayer configs: dict[str, Any]) they would be kept, and the API
        # payload encoder (orjson, service/apis/json.py) writes them as null: the API would get a config other
        # than the one given, silently. So they are refused here, for every JSON setting, with where they are.
        if not isinstance(value, dict | list):
            return value
        found = list(_non_finite(value, ""))
        if not found:
            return value
        shown = ", ".join(f"{_json_literal(number)} at {path}" for path, number in found[:_PATHS_SHOWN])
        more = f" and {len(found) - _PATHS_SHOWN} more" if len(found) > _PATHS_SHOWN else ""
        raise PydanticCustomError(
            NON_FINITE_JSON,
            "JSON numbers must be finite, got {found}: NaN, Infinity and -Infinity (and literals too large for a "
            "double, such as 1e309) would reach the API as null",
            {"found": shown + more},
        )

    @model_validator(mode="wrap")
    @classmethod
    def _read_secret_files(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        if not cls._file_backed or not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        problems: list[InitErrorDetails] = []
        unreadable: set[str] = set()
        for name in cls._file_backed:
            file_field = f"{name}_file"
            path = data.get(file_field)
            if path is None or path == "":
                data[file_field] = None  # an empty variable (a template's blank) means unset
                continue
            if data.get(name) is not None:
                problems.append(
                    InitErrorDetails(
                        type=PydanticCustomError(BOTH_SET, "set only one of the value and the file", {"value": name}),
                        loc=(file_field,),
                        input=str(path),
                    )
                )
                continue
            try:
                data[name] = read_secret_file(Path(path))
            except SecretFileError as exc:
                unreadable.add(name)
                problems.append(
                    InitErrorDetails(
                        type=PydanticCustomError("secret_file", "{problem}", {"problem": str(exc)}),
                        loc=(file_field,),
                        input=str(path),
                    )
                )
        if not problems:
            return handler(data)
        # Report the file problems together with every other problem of the section (one message
        # for all, see load_settings), minus the "missing" that an unreadable file would cause.
        try:
            handler(data)
        except ValidationError as exc:
            # Rebuilt as custom errors with their type and message: pydantic rebuilds only its own error types
            # from their details, and a validator's own (a TLS file's) raised a KeyError here instead.
            problems.extend(
                InitErrorDetails(
                    type=PydanticCustomError(error["type"], "{message}", {"message": error["msg"]}),
                    loc=error["loc"],
                    input=error["input"],
                )
                for error in exc.errors()
                if not (error["type"] == "missing" and len(error["loc"]) == 1 and error["loc"][0] in unreadable)
            )
        raise ValidationError.from_exception_data(cls.__name__, problems)


def _non_finite(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """Every NaN or infinite float in a JSON value, with its path (`["pipe-1"]["temperature"]`, on one line)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{path}[{json.dumps(key)}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{path}[{index}]")


def _json_literal(number: float) -> str:
    """How JSON (Python's reader) spells a non-finite number."""
    return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")


def http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in urlsplit(value).netloc:
        # A password in a URL ends up in logs and in check-config's output; secrets have their own fields.
        raise ValueError("must not carry credentials (user:password@); use the USERNAME/PASSWORD settings")
    return value.rstrip("/")
