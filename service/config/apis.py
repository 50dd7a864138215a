"""The APIs' and the schema registry's settings.

`BRIDGE_OPENLAYER__*`, `BRIDGE_HUMANLOOP__*` and `BRIDGE_SCHEMA_REGISTRY__*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from service.config.credentials import header_problem
from service.config.section import Section, http_url


class OpenlayerSettings(Section):
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
    _check_url = field_validator("base_url")(http_url)

    @field_validator("pipeline_configs")
    @classmethod
    def _pipeline_configs_name_their_id_column(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for pipeline_id, config in value.items():
            _id_column_named(config, f"pipeline {pipeline_id!r}: ")
        return value

    @field_validator("default_config")
    @classmethod
    def _default_config_names_its_id_column(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _id_column_named(value, "")
        return value

    @field_validator("api_key")
    @classmethod
    def _key_present(cls, value: SecretStr) -> SecretStr:
        # Without surrounding whitespace, as a key file is read: a Secret made from a file with its newline and
        # set as an environment variable carries that newline.
        key = value.get_secret_value().strip()
        if not key:
            raise ValueError("must not be empty")
        if problem := header_problem(key):
            raise ValueError(f"the key {problem}")
        return SecretStr(key)


def _id_column_named(config: dict[str, Any], where: str) -> None:
    """An operator's config that names its inference-id column names one: otherwise every record of its pipelines
    would be dead-lettered (`invalid-config`, service/apis/openlayer.py) for the operator's mistake, not theirs."""
    if "inferenceIdColumnName" not in config:
        return  # BRIDGE_OPENLAYER__INFERENCE_ID_COLUMN
    column = config["inferenceIdColumnName"]
    if not isinstance(column, str) or not column:
        raise ValueError(f"{where}inferenceIdColumnName must be a column name, got {column!r}")


class HumanloopSettings(Section):
    base_url: str = Field(default="https://api.humanloop.com/v4", description="Humanloop v4 API root")
    api_key: SecretStr = Field(description="secret; sent as X-API-KEY; or from API_KEY_FILE")
    api_key_file: Path | None = Field(
        default=None, description="file holding the key, instead of API_KEY; re-read when the API answers 401/403"
    )

    _file_backed = ("api_key",)
    _check_url = field_validator("base_url")(http_url)
    _key_present = field_validator("api_key")(OpenlayerSettings._key_present.__func__)  # type: ignore[attr-defined]


class SchemaRegistrySettings(Section):
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
        return None if value is None or value == "" else http_url(value)

    @model_validator(mode="after")
    def _confluent_needs_registry(self) -> SchemaRegistrySettings:
        if self.wire_format == "confluent" and self.url is None:
            raise ValueError("wire_format=confluent needs BRIDGE_SCHEMA_REGISTRY__URL")
        return self
