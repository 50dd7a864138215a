"""Kafka settings: the cluster and its security, and the topics (`BRIDGE_KAFKA__*`, `BRIDGE_TOPICS__*`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.config.section import DAY_S, INT32_MAX, Section


class KafkaSettings(Section):
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
    # The broker's group.max.session.timeout.ms (30 min by default) is the real ceiling of the session timeout; the
    # bound here is only what a JoinGroup request can carry (INT32_MAX).
    session_timeout_ms: int = Field(
        default=45_000, ge=1_000, le=INT32_MAX, description="a silent member leaves the group after this"
    )
    heartbeat_interval_ms: int = Field(
        default=3_000,
        ge=100,
        le=INT32_MAX,
        description="group heartbeat period; below session_timeout_ms, a third of it at most advised",
    )
    max_poll_interval_ms: int = Field(
        default=300_000,
        ge=1_000,
        le=INT32_MAX,
        description="longest gap between polls; the loop polls even while paused",
    )
    max_poll_records: int = Field(default=500, ge=1, description="records per poll")
    fetch_max_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, le=INT32_MAX, description="bytes per fetch response"
    )
    max_partition_fetch_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=INT32_MAX, description="bytes per partition per fetch"
    )
    commit_interval_s: float = Field(default=1.0, gt=0, le=DAY_S, description="how often done offsets are committed")

    _file_backed = ("sasl_password",)

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile", mode="after")
    @classmethod
    def _tls_file_readable(cls, value: str | None) -> str | None:
        # The files are opened only when the Kafka clients are built (service/kafka/clients.py), where a missing
        # one failed `run` with a bare "[Errno 2] No such file or directory" (exit 1) and passed check-config.
        # Opened here, a problem is a settings error like any other: exit 2, a line naming the variable (the
        # field is the error's location, see service/config/settings.py `_describe`) and the path, never content.
        if value:
            problem = tls_file_problem(Path(value))
            if problem is not None:
                raise PydanticCustomError("tls_file", "{problem}", {"problem": problem})
        return value

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


def tls_file_problem(path: Path) -> str | None:
    """Why the TLS file at `path` cannot be used (names the path, never the content), or None when it can be read."""
    try:
        # Opened, not just stat()ed: a file the service's user may not read exists but fails later all the same.
        # O_NONBLOCK so that a FIFO at the path fails the check below instead of hanging start-up in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or type(exc).__name__}"
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_size == 0:
        return f"{path} is empty"  # an empty key of a mounted Secret: TLS would fail with an OpenSSL error
    return None


class TopicSettings(Section):
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
