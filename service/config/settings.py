"""Settings: one frozen pydantic-settings root, read from `BRIDGE_*` environment variables at start-up.

This is the only module that reads the environment. Sections nest with a double underscore
(`BRIDGE_KAFKA__BOOTSTRAP_SERVERS`); API keys and Kafka passwords are `SecretStr` so they never
print. Each secret may instead come from a file (`BRIDGE_OPENLAYER__API_KEY_FILE`), read at start-up
(service/config/section.py), so a Kubernetes Secret can be mounted as files; the path is kept for
re-reading (service/config/credentials.py). The sections live in kafka.py,
apis.py and delivery.py. `load_settings` turns pydantic's errors into one message that names every
bad setting by its environment variable, so an operator fixes them all in one go instead of one per
restart; a `BRIDGE_*` variable that names no setting is one of those problems.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from service.config.apis import HumanloopSettings, OpenlayerSettings, SchemaRegistrySettings
from service.config.delivery import BatchSettings, DeadLetterSettings, DeliverySettings, ObservabilitySettings
from service.config.kafka import KafkaSettings, TopicSettings
from service.config.section import BOTH_SET

ENV_PREFIX = "BRIDGE_"
ENV_DELIMITER = "__"
DEFAULT_SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
"""Where the repository keeps the `.avsc` files; deployments may point elsewhere (BRIDGE_SCHEMAS_DIR)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    schemas_dir: Path = Field(default=DEFAULT_SCHEMA_DIR, description="directory of the .avsc files")
    kafka: KafkaSettings
    topics: TopicSettings = TopicSettings()
    openlayer: OpenlayerSettings
    humanloop: HumanloopSettings
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    delivery: DeliverySettings = DeliverySettings()
    batch: BatchSettings = BatchSettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    observability: ObservabilitySettings = ObservabilitySettings()

    @model_validator(mode="before")
    @classmethod
    def _sections_present(cls, data: Any) -> Any:
        # An absent section would be reported as "BRIDGE_KAFKA is required"; validating an empty
        # one instead names the variables the operator actually has to set.
        if isinstance(data, dict):
            data = dict(data)
            for name in ("kafka", "openlayer", "humanloop"):
                data.setdefault(name, {})
        return data

    @model_validator(mode="after")
    def _group_timeouts(self) -> Settings:
        # Checks between settings; they run once every section is valid on its own. Here and not in KafkaSettings:
        # the Kafka client factory's tests (tests/unit/kafka/test_clients.py) build sections with any session.
        problems = _group_timeout_problems(self)
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self


def _group_timeout_problems(settings: Settings) -> list[InitErrorDetails]:
    kafka = settings.kafka
    session_ms, heartbeat_ms = kafka.session_timeout_ms, kafka.heartbeat_interval_ms
    problems = []
    # At or above the session timeout the broker expires the member between two heartbeats. Kafka recommends at
    # most a third (a heartbeat or two may be late or lost), but that is advice, not a failure: above a third and
    # below the session, a member whose heartbeats all arrive stays, so it is documented, not refused.
    if heartbeat_ms >= session_ms:
        problems.append(
            _problem(
                ("kafka", "heartbeat_interval_ms"),
                "{heartbeat} ms must be below BRIDGE_KAFKA__SESSION_TIMEOUT_MS ({session} ms), or the broker drops "
                "this member from the group between two heartbeats; Kafka recommends at most a third of it",
                heartbeat=heartbeat_ms,
                session=session_ms,
            )
        )
    return problems


def _problem(loc: tuple[str, ...], message: str, **values: object) -> InitErrorDetails:
    """One problem of the settings, named by the variable at `loc` (see `_describe`)."""
    return InitErrorDetails(
        type=PydanticCustomError("settings_conflict", message, values),
        loc=loc,
        input=None,
    )


class SettingsError(Exception):
    """Start-up cannot go on; the message names every problem by its environment variable."""


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(part).upper() for part in loc)


def _section_model(name: str) -> type[BaseModel] | None:
    """The section model of the top-level field `name`, or None for a plain value (schemas_dir)."""
    model = Settings.model_fields[name].annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _variables() -> tuple[list[str], list[str]]:
    """The variables a setting is read from: (whole sections as JSON, one setting each), upper case."""
    sections, settings = [], []
    for name in Settings.model_fields:
        model = _section_model(name)
        if model is None:
            settings.append(_env_name((name,)))
        else:
            sections.append(_env_name((name,)))
            settings += [_env_name((name, field)) for field in model.model_fields]
    return sections, settings


def _unknown_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The BRIDGE_* variables that name no setting, each with the line that says so.

    pydantic-settings ignores a name that matches no section, and one beneath a setting that is
    itself set (BRIDGE_KAFKA__BOOTSTRAP_SERVERS__X); it blames the setting, not the variable, for
    one beneath a setting that is not; and it reads one beneath a map (BRIDGE_TOPICS__DLQ_OVERRIDES__X)
    as an entry with its key folded to lower case (names are case-insensitive), which would quietly
    miss a mixed-case topic or a camelCase config key. Each would leave a setting other than the
    operator meant, so every name must be exactly one of the variables.
    """
    sections, settings = _variables()
    known = {*sections, *settings}
    unknown = {}
    for key in environ:
        upper = key.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            unknown[key] = f"  {upper}: unknown setting{_hint(upper, settings)}"
    return unknown


def _hint(name: str, settings: list[str]) -> str:
    """What the unknown variable `name` may have meant, in brackets, or nothing when no guess is good."""
    parent = next((setting for setting in settings if name.startswith(setting + ENV_DELIMITER)), None)
    if parent is not None:
        whole = "its whole value as JSON" if parent in _json_variables() else "its whole value"
        return f" ({parent} takes {whole}; nothing is read beneath it)"
    # Compared without the prefix that every name shares, which would make any two look alike.
    close = difflib.get_close_matches(
        name.removeprefix(ENV_PREFIX), [setting.removeprefix(ENV_PREFIX) for setting in settings], n=1, cutoff=0.8
    )
    if close:
        return f" (did you mean {ENV_PREFIX}{close[0]}?)"
    section = name.removeprefix(ENV_PREFIX).split(ENV_DELIMITER, 1)[0]
    if section.lower() not in Settings.model_fields:
        return f" (sections: {', '.join(sorted(field.upper() for field in Settings.model_fields))})"
    return ""


def _describe(loc: tuple[int | str, ...], kind: str, message: str, ctx: dict[str, Any] | None) -> str:
    name = _env_name(loc)
    if kind == BOTH_SET and ctx is not None:
        return f"{_env_name((*loc[:-1], ctx['value']))} and {name} are both set; set only one of them"
    if kind == "missing":
        section = Settings.model_fields[str(loc[0])].annotation if len(loc) == 2 else None
        if isinstance(section, type) and issubclass(section, BaseModel) and f"{loc[1]}_file" in section.model_fields:
            return f"{name}: is required but not set (set it, or {name}_FILE to a file holding it)"
        return f"{name}: is required but not set"
    return f"{name}: {message}"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the settings; `environ` replaces the process environment (tests, check-config)."""
    source = os.environ if environ is None else environ
    unknown = _unknown_variables(source)
    lines = list(unknown.values())
    # An unknown name is reported once, above, and not read: pydantic would otherwise report it
    # again or blame the setting it sits beneath.
    known = {key: value for key, value in source.items() if key.upper().startswith(ENV_PREFIX) and key not in unknown}
    settings: Settings | None = None
    try:
        settings = _from_mapping(known)
    except PydanticSettingsError as exc:
        # Raised before validation when a JSON-typed variable is not JSON; it names the field.
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{field.group(1).upper()}{ENV_DELIMITER}..." if field else "a BRIDGE_* variable"
        lines.append(f"  {name}: {exc.__cause__ or exc}")
    except ValidationError as exc:
        for err in exc.errors():
            lines.append(f"  {_describe(tuple(err['loc']), err['type'], err['msg'], err.get('ctx'))}")
    except RecursionError:
        # JSON nested deeper than the parser's recursion limit, in some JSON-typed variable; the
        # parser does not say which, so name the ones that take JSON.
        lines.append(
            f"  a {ENV_PREFIX}* variable holds JSON nested too deeply to read (a section, or one of "
            f"{', '.join(_json_variables())})"
        )
    if lines or settings is None:
        raise SettingsError(f"{len(lines)} setting(s) invalid:\n" + "\n".join(lines))
    return settings


def _json_variables() -> list[str]:
    """The variables whose values are JSON (dicts and lists), for an error that cannot name the one at fault."""
    names = []
    for section, info in Settings.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                text = str(field.annotation)
                if text.startswith(("dict", "list")) or "dict[" in text:
                    names.append(_env_name((section, name)))
    return names


def _from_mapping(environ: Mapping[str, str]) -> Settings:
    """Validate a mapping (the process environment or a given one) with the real environment's parsing rules."""

    class _Explicit(Settings):
        @classmethod
        def settings_customise_sources(  # type: ignore[no-untyped-def]
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            source = EnvSettingsSource(
                settings_cls,
                env_prefix=ENV_PREFIX,
                env_nested_delimiter=ENV_DELIMITER,
                case_sensitive=False,
            )
            source.env_vars = {k.lower(): v for k, v in environ.items()}
            return (source,)

    return _Explicit()
