"""Crash test: kill -9 the running service mid-stream, twice, restart it, and account for every record.

Every produced record must end at its API (a 200) or in its dead-letter topic. Duplicates are
allowed (at-least-once: a call that succeeded just before the kill is repeated) and counted; loss is
not. Afterwards the group's commits cover every record.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest

from tests.integration.cases import CASES, is_marked
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import BridgeProcess, Topics
from tests.support.fake_apis import FakeApiServer, Fault
from tests.support.kafka_io import all_committed, eventually, produce, read_all

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PER_TOPIC = 300
REJECTED = frozenset(range(7, PER_TOPIC, 37))
GARBAGE = 5


async def _calls_at_least(fake: FakeApiServer, count: int) -> bool:
    return fake.count() >= count


async def test_kill_9_mid_stream_loses_nothing(
    kafka_bootstrap: str, topics: Topics, fake_apis: FakeApiServer, bridge_env: dict[str, str], tmp_path: Path
) -> None:
    encoder = AvroEncoder()
    expected: dict[tuple[str, str], tuple[str, str]] = {}  # (topic, key) -> (endpoint, identity) of its call
    for case in CASES:
        topic = case.topic_of(topics)
        keys = [f"{case.kind}-{i}".encode() for i in range(PER_TOPIC)]
        values = [encoder.plain(case.kind, case.datum(i, i in REJECTED)) for i in range(PER_TOPIC)]
        await produce(kafka_bootstrap, topic, values, keys=keys)
        for i, key in enumerate(keys):
            _method, _path, query, body = case.expected(i, i in REJECTED)
            expected[(topic, key.decode())] = (case.endpoint, case.identity(query, body))
        garbage_keys = [f"garbage-{j}".encode() for j in range(GARBAGE)]
        await produce(kafka_bootstrap, topic, [os.urandom(40) for _ in garbage_keys], keys=garbage_keys)
        for key in garbage_keys:
            expected[(topic, key.decode())] = ("", "")
        fake_apis.reject_when(case.endpoint, is_marked, Fault(status=422))

    # Slow calls and a small window keep the stream running long enough to be cut in the middle.
    fake_apis.set_latency(0.03)
    env = {
        **bridge_env,
        "BRIDGE_DELIVERY__MAX_IN_FLIGHT_PER_PARTITION": "2",
        "BRIDGE_OBSERVABILITY__LOG_LEVEL": "WARNING",
    }
    total = len(CASES) * PER_TOPIC
    log = tmp_path / "bridge.log"
    for kill_after in (total // 6, total // 2):
        process = BridgeProcess(env, log)
        process.start()
        await eventually(partial(_calls_at_least, fake_apis, kill_after), timeout_s=120, what=f"{kill_after} calls")
        process.kill()

    fake_apis.set_latency(0.0)
    process = BridgeProcess(env, log)
    process.start()
    try:
        group = env["BRIDGE_KAFKA__GROUP_ID"]
        await eventually(
            partial(all_committed, kafka_bootstrap, group, *topics.all()), timeout_s=180, what="everything committed"
        )
    finally:
        assert process.terminate() == 0, log.read_text()[-3000:]

    reached: dict[tuple[str, str], int] = {}
    for case in CASES:
        for request in fake_apis.requests(case.endpoint):
            if request.status == 200:
                for ident in case.identities(request.query, request.json):
                    reached[(case.endpoint, ident)] = reached.get((case.endpoint, ident), 0) + 1
    dead: set[tuple[str, str]] = set()
    for topic in topics.all():
        for letter in await read_all(kafka_bootstrap, topics.dlq(topic)):
            dead.add((topic, (letter.key or b"").decode()))

    lost = [where for where, ident in expected.items() if where not in dead and ident not in reached]
    duplicates = sum(n - 1 for n in reached.values())
    print(f"produced={len(expected)} delivered={len(reached)} dead_lettered={len(dead)} duplicates={duplicates}")
    assert lost == []
    assert len(reached) == len(CASES) * (PER_TOPIC - len(REJECTED))
    assert len(dead) == len(CASES) * (len(REJECTED) + GARBAGE)
