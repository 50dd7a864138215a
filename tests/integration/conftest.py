"""Fixtures for end-to-end tests: fresh topics per test, a fake API server, the bridge's environment."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.integration.cases import HUMANLOOP_KEY, OPENLAYER_KEY, PARTITIONS
from tests.support.bridge import Topics, bridge_environment
from tests.support.fake_apis import FakeApiServer
from tests.support.kafka_broker import create_topics


@pytest.fixture
def fake_apis() -> Iterator[FakeApiServer]:
    with FakeApiServer(openlayer_key=OPENLAYER_KEY, humanloop_key=HUMANLOOP_KEY) as server:
        yield server


@pytest.fixture
async def topics(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Topics:
    names = Topics(unique_name("inferences"), unique_name("row-updates"), unique_name("log-updates"))
    await create_topics(kafka_bootstrap, {t: PARTITIONS for t in names.all() + [names.dlq(t) for t in names.all()]})
    return names


@pytest.fixture
def bridge_env(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, unique_name: Callable[[str], str]
) -> dict[str, str]:
    return bridge_environment(
        bootstrap=kafka_bootstrap,
        group=unique_name("bridge"),
        topics=topics,
        openlayer_url=fake_apis.openlayer_base_url,
        humanloop_url=fake_apis.humanloop_base_url,
        openlayer_key=OPENLAYER_KEY,
        humanloop_key=HUMANLOOP_KEY,
    )
