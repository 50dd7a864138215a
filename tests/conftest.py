"""Session-wide Kafka for the tests: a real broker, chosen by `tests.support.kafka_broker.kafka_endpoint`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.kafka_broker import KafkaEndpoint, LocalKafkaBroker, kafka_endpoint


@pytest.fixture(scope="session")
def kafka_jars_dir() -> Path:
    """Where `make kafka-jars` put the broker's classpath; KAFKA_JARS_DIR overrides it."""
    default = Path(__file__).resolve().parent.parent / ".cache" / "kafka" / "jars"
    return Path(os.environ.get("KAFKA_JARS_DIR") or default)


@pytest.fixture(scope="session")
def _kafka_session(kafka_jars_dir: Path) -> Iterator[KafkaEndpoint]:
    # Only started when a test asks for Kafka, so unit-test runs never pay the broker's start-up.
    with kafka_endpoint(kafka_jars_dir) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka_session: KafkaEndpoint) -> str:
    return _kafka_session.bootstrap_servers


@pytest.fixture(scope="session")
def kafka_broker(_kafka_session: KafkaEndpoint) -> LocalKafkaBroker | None:
    """The session's own broker, for tests that restart it; None when the broker is external."""
    return _kafka_session.local


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Topic and group names unique per call, so tests sharing the session broker never collide."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:12]}"
