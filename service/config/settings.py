"""Settings: one frozen pydantic-settings root, read from `BRIDGE_*` environment variables at start-up.

This is the only module that reads the environment. Sections nest with a double underscore
(`BRIDGE_KAFKA__BOOTSTRAP_SERVERS`); API keys and Kafka passwords are `SecretStr` so they never
print. Each secret may instead come from a file (`BRIDGE_OPENLAYER__API_KEY_FILE`), read here at
start-up, so a Kubernetes Secret can be mounted as files; the path is kept for re-reading (see
service/credentials.py). `load_settings` turns pydantic's errors into one message that names every
bad setting by its environment variable, so an operator fixes them all in one go instead of one per
restart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from service.config.credentials import SecretFileError, read_secret_file

ENV_PREFIX = "BRIDGE_"
ENV_DELIMITER = "__"
DEFAULT_SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
"""Where the repository keeps the `.avsc` files; deployments may point elsewhere (BRIDGE_SCHEMAS_DIR)."""


_BOTH_SET = "secret_value_and_file"


class _Section(BaseModel):
    # A typo in a nested variable (BRIDGE_KAFKA__BOOTSRAP_SERVERS) must fail loudly, not be ignored.
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Secret fields that may come from a file instead: the sibling `<name>_file` holds the path,
    # and the file is read here so `<name>` holds the secret either way and its readers need not care.
    _file_backed: ClassVar[tuple[str, ...]] = ()

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
                        type=PydanticCustomError(_BOTH_SET, "set only one of the value and the file", {"value": name}),
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
            problems.extend(
                error  # type: ignore[misc]
                for error in exc.errors()
                if not (error["type"] == "missing" and len(error["loc"]) == 1 and error["loc"][0] in unreadable)
            )
        raise ValidationError.from_exception_data(cls.__name__, problems)


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in urlsplit(value).netloc:
        # A password in a URL ends up in logs and in check-config's output; secrets have their own fields.
        raise ValueError("must not carry credentials (user:password@); use the USERNAME/PASSWORD settings")
    return value.rstrip("/")


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(min_length=1, description="host:port[,host:port...]")
    group_id: str = Field(default="inference-bridge", min_length=1, description="consumer group; replicas share it")
    client_id: str = Field(default="inference-bridge", description="client id in broker logs and quotas")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest", description="where a group without commits starts; latest skips the backlog"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="how to reach the brokers"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="required with SASL_*"
    )
    sasl_username: str | None = Field(default=None, description="required with SASL_*")
    sasl_password: SecretStr | None = Field(default=None, description="secret; required with SASL_*")
    sasl_password_file: Path | None = Field(
        default=None, description="file holding sasl_password (read at start-up); instead of SASL_PASSWORD"
    )
    ssl_cafile: str | None = Field(default=None, description="PEM CA bundle for a private CA (else the system CAs)")
    ssl_certfile: str | None = Field(default=None, description="PEM client certificate, for mutual TLS")
    ssl_keyfile: str | None = Field(default=None, description="PEM client key, for mutual TLS")
    session_timeout_ms: int = Field(default=45_000, ge=1_000, description="a silent member leaves the group after this")
    heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="group heartbeat period")
    max_poll_interval_ms: int = Field(
        default=300_000, ge=1_000, description="longest gap between polls; the loop polls even while paused"
    )
    max_poll_records: int = Field(default=500, ge=1, description="records per poll")
    fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="bytes per fetch response")
    max_partition_fetch_bytes: int = Field(default=1024 * 1024, ge=1024, description="bytes per partition per fetch")
    commit_interval_s: float = Field(default=1.0, gt=0, description="how often done offsets are committed")

    _file_backed = ("sasl_password",)

    @model_validator(mode="after")
    def _tls_consistent(self) -> KafkaSettings:
        tls_files = {"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile}
        given = [name for name, value in tls_files.items() if value]
        if given and self.security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(
                f"{', '.join(given)} set but security_protocol is {self.security_protocol}, which has no TLS"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("mutual TLS needs both ssl_certfile and ssl_keyfile")
        return self

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        return self


class TopicSettings(_Section):
    inferences: str = Field(default="inferences", min_length=1, description="new inferences -> Publish records")
    row_updates: str = Field(default="inference-row-updates", min_length=1, description="row updates -> Update record")
    log_updates: str = Field(default="log-updates", min_length=1, description="log updates -> Update By Reference")
    dlq_suffix: str = Field(default=".dlq", min_length=1, description="dead-letter topic = source topic + suffix")
    dlq_overrides: dict[str, str] = Field(
        default_factory=dict, description="source topic -> dead-letter topic, when <topic><suffix> won't do"
    )

    # Every field but the dead-letter ones names one stream's source topic (service/streams.py, `setting`).
    _not_sources: ClassVar[frozenset[str]] = frozenset({"dlq_suffix", "dlq_overrides"})

    @classmethod
    def source_settings(cls) -> list[str]:
        """The names of the fields that hold a source topic, in declaration order."""
        return [name for name in cls.model_fields if name not in cls._not_sources]

    @model_validator(mode="after")
    def _distinct(self) -> TopicSettings:
        names = [getattr(self, name) for name in self.source_settings()]
        if len(set(names)) != len(names):
            raise ValueError(f"the {len(names)} topics must be distinct, got {names}")
        return self

    def dead_letter_topic(self, topic: str) -> str:
        return self.dlq_overrides.get(topic, topic + self.dlq_suffix)


class OpenlayerSettings(_Section):
    base_url: str = Field(default="https://api.openlayer.com/v1", description="Openlayer API root")
    api_key: SecretStr = Field(description="secret; sent as Authorization: Bearer; or from API_KEY_FILE")
    api_key_file: Path | None = Field(
        default=None, description="file holding the key, instead of API_KEY; re-read when the API answers 401/403"
    )
    pipeline_configs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="pipeline id -> Publish-records config (camelCase JSON), used when a record has none",
    )
    default_config: dict[str, Any] | None = Field(
        default=None, description="config for pipelines not in pipeline_configs (camelCase JSON)"
    )
    inference_id_column: str = Field(
        default="inference_id",
        min_length=1,
        description="column that carries the inference id when the config names none",
    )

    _file_backed = ("api_key",)
    _check_url = field_validator("base_url")(_http_url)

    @field_validator("api_key")
    @classmethod
    def _key_present(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value


class HumanloopSettings(_Section):
    base_url: str = Field(default="https://api.humanloop.com/v4", description="Humanloop v4 API root")
    api_key: SecretStr = Field(description="secret; sent as X-API-KEY; or from API_KEY_FILE")
    api_key_file: Path | None = Field(
        default=None, description="file holding the key, instead of API_KEY; re-read when the API answers 401/403"
    )

    _file_backed = ("api_key",)
    _check_url = field_validator("base_url")(_http_url)
    _key_present = field_validator("api_key")(OpenlayerSettings._key_present.__func__)  # type: ignore[attr-defined]


class SchemaRegistrySettings(_Section):
    url: str | None = Field(default=None, description="Confluent-compatible registry root, for framed records")
    username: str | None = Field(default=None, description="registry basic-auth user")
    password: SecretStr | None = Field(default=None, description="secret; registry basic-auth password")
    password_file: Path | None = Field(
        default=None, description="file holding the password (read at start-up); instead of PASSWORD"
    )
    wire_format: Literal["auto", "plain", "confluent"] = Field(
        default="auto",
        description="auto: Confluent framing (magic byte 0) when a registry is configured, else plain Avro",
    )

    _file_backed = ("password",)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None or value == "" else _http_url(value)

    @model_validator(mode="after")
    def _confluent_needs_registry(self) -> SchemaRegistrySettings:
        if self.wire_format == "confluent" and self.url is None:
            raise ValueError("wire_format=confluent needs BRIDGE_SCHEMA_REGISTRY__URL")
        return self


class DeliverySettings(_Section):
    connect_timeout_s: float = Field(default=5.0, gt=0, description="per attempt")
    read_timeout_s: float = Field(
        default=30.0, gt=0, description="longest attempt; attempts are cut sooner once latency is known, see next"
    )
    min_attempt_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="shortest attempt timeout; an attempt may take 4x its endpoint's recent p99 latency, "
        "within this and read_timeout_s",
    )
    initial_backoff_s: float = Field(default=0.5, gt=0, description="first retry delay (doubles, jittered)")
    max_backoff_s: float = Field(default=30.0, gt=0, description="longest retry delay and breaker pause")
    retry_after_cap_s: float = Field(default=60.0, gt=0, description="longest server-requested pause honoured")
    conflict_retries: int = Field(default=2, ge=0, description="409 retries before the record is rejected")
    not_found_grace_s: float = Field(
        default=600.0, ge=0, description="how long a 404 on an update is retried, from the record's timestamp"
    )
    evidence_body_bytes: int = Field(
        default=4096, ge=0, le=65536, description="response body bytes kept in a dead letter's headers"
    )
    max_connections: int = Field(
        default=512, ge=1, description="ceiling of the adaptive limit on concurrent calls per destination"
    )
    max_in_flight_per_partition: int = Field(
        default=1000, ge=1, description="records of one partition started and not yet done (calls and batched rows)"
    )
    max_in_flight_total: int = Field(
        default=4096, ge=1, description="records started and not yet done across all partitions of this member"
    )
    max_buffered_per_partition: int = Field(
        default=2000, ge=1, description="records taken from Kafka and not yet done; above it the partition pauses"
    )
    max_uncommitted_per_partition: int = Field(
        default=50_000,
        ge=1,
        description="records from the oldest one not done on (what a crash repeats); above it the partition pauses",
    )
    drain_timeout_s: float = Field(default=20.0, gt=0, description="bounded wait for in-flight calls on stop")
    breaker_failure_rate: float = Field(
        default=0.5, gt=0, le=1, description="share of failed calls in the last 10 s that opens a destination's breaker"
    )
    breaker_min_calls: int = Field(
        default=20, ge=1, description="calls in the last 10 s before the failure rate counts"
    )
    http_client: Literal["pyreqwest", "aiohttp", "httpx"] = Field(
        default="pyreqwest",
        description="HTTP client library; pyreqwest (Rust reqwest) sends about 2.5x the calls per CPU-second of "
        "aiohttp, and aiohttp about 30x httpx (make bench)",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="event loop; uvloop carries more records per core, asyncio is the standard library's",
    )


class BatchSettings(_Section):
    """Publish-records batching of new inferences (rows of one pipeline and config share a call)."""

    max_rows: int = Field(default=500, ge=1, le=10_000, description="rows per Publish-records call")
    max_bytes: int = Field(default=1_000_000, ge=1024, description="row JSON bytes per call")
    linger_ms: float = Field(default=20.0, ge=0, description="how long a batch waits for more rows")


class DeadLetterSettings(_Section):
    send_attempts: int = Field(default=5, ge=1, description="tries before a failed DLQ write stops the service")
    send_timeout_s: float = Field(default=30.0, gt=0, description="per dead-letter write attempt")


class ObservabilitySettings(_Section):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="root log level")
    log_format: Literal["json", "text"] = Field(default="json", description="one JSON object per line, or text")
    http_host: str = Field(default="0.0.0.0", description="where /metrics, /livez and /readyz listen")
    http_port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port (tests)")


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


class SettingsError(Exception):
    """Start-up cannot go on; the message names every problem by its environment variable."""


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(part).upper() for part in loc)


def _unknown_sections(environ: Mapping[str, str]) -> list[str]:
    # pydantic-settings silently ignores BRIDGE_* names that match no section; a typo there would
    # leave a default in force without a word, so name it.
    known = {name.upper() for name in Settings.model_fields}
    lines = []
    for key in environ:
        upper = key.upper()
        if upper.startswith(ENV_PREFIX):
            section = upper[len(ENV_PREFIX) :].split(ENV_DELIMITER, 1)[0]
            if section not in known:
                lines.append(f"  {upper}: unknown setting (sections: {', '.join(sorted(known))})")
    return lines


def _describe(loc: tuple[int | str, ...], kind: str, message: str, ctx: dict[str, Any] | None) -> str:
    name = _env_name(loc)
    if kind == _BOTH_SET and ctx is not None:
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
    lines = _unknown_sections(source)
    settings: Settings | None = None
    try:
        settings = Settings() if environ is None else _from_mapping(environ)
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
    """Validate an explicit mapping with the same parsing rules as the real environment."""

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
