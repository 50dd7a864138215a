"""Restarts are not errors: the real service, as a child process, logs nothing at ERROR through a broker
restart, members joining and leaving its group, a member killed with -9 and replaced, and a SIGTERM stop.

aiokafka logs these moments at ERROR; the service lowers the expected ones to WARNING with an `expected`
field (service.ops.logging.ExpectedKafkaErrors). Each test also checks that such a lowered line was
written, so it cannot pass because the disruption never reached the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaError

from tests.integration.cases import CASES, HUMANLOOP_KEY, OPENLAYER_KEY, PARTITIONS
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import BridgeProcess, Topics, bridge_environment
from tests.support.fake_apis import FakeApiServer
from tests.support.kafka_broker import LocalKafkaBroker, create_topics
from tests.support.kafka_io import all_committed, eventually, produce

pytestmark = pytest.mark.kafka

ENCODER = AvroEncoder()
ALL_PARTITIONS = len(CASES) * PARTITIONS
JOIN_GROUP_SEND_FAILED = "Error sending JoinGroupRequest to node"


def _entries(log: Path) -> list[dict[str, Any]]:
    """The log's complete lines, each parsed; a line that is not a JSON object is kept as its text."""
    text = log.read_text(errors="replace") if log.exists() else ""
    entries: list[dict[str, Any]] = []
    for line in text[: text.rfind("\n") + 1].splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"level": "not-json", "msg": line})
    return entries


def _assignments(log: Path) -> list[list[str]]:
    return [e["partitions"] for e in _entries(log) if e.get("msg") == "partitions assigned"]


def _took_everything_back(log: Path, assignments_before: int) -> bool:
    """Since `assignments_before`, a share for the newcomer, then every partition once it left."""
    assignments = _assignments(log)
    return len(assignments) > assignments_before + 1 and len(assignments[-1]) == ALL_PARTITIONS


def _errors(*logs: Path) -> list[str]:
    """Every line at ERROR or above, and every line that is not one JSON object (a traceback, say)."""
    bad = {"error", "critical", "not-json"}
    return [f"{log.name}: {orjson.dumps(e).decode()}" for log in logs for e in _entries(log) if e.get("level") in bad]


def _lowered(log: Path, contains: str = "") -> list[dict[str, Any]]:
    return [e for e in _entries(log) if "expected" in e and e.get("level") == "warning" and contains in e["msg"]]


async def _holds(check: Callable[[], bool]) -> bool:
    return check()


async def _drained(bootstrap: str, group: str, topics: Topics) -> bool:
    with contextlib.suppress(KafkaError, OSError, TimeoutError):  # the broker may still be settling
        return await all_committed(bootstrap, group, *topics.all())
    return False


class _Stream:
    """Produces a fresh batch of valid records to each topic, so every stage has work to commit."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._next = 0

    async def batch(self, count: int = 30) -> None:
        numbers = range(self._next, self._next + count)
        self._next += count
        for case in CASES:
            values = [ENCODER.plain(case.kind, case.datum(i, False)) for i in numbers]
            keys = [f"{case.kind}-{i}".encode() for i in numbers]
            await produce(self._bootstrap, case.topic_of(self._topics), values, keys=keys)


@contextlib.contextmanager
def _members() -> Iterator[list[BridgeProcess]]:
    """Service processes started in a test; whatever is still running at the end is killed."""
    started: list[BridgeProcess] = []
    try:
        yield started
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()


def _start(members: list[BridgeProcess], env: dict[str, str], log: Path) -> BridgeProcess:
    process = BridgeProcess(env, log)
    process.start()
    members.append(process)
    return process


async def test_a_broker_restart_and_a_rebalance_log_no_error(
    kafka_jars_dir: Path, fake_apis: FakeApiServer, tmp_path: Path, unique_name: Callable[[str], str]
) -> None:
    # Its own broker: restarting the session broker would disturb every other test.
    with LocalKafkaBroker(kafka_jars_dir) as broker, _members() as members:
        bootstrap = broker.bootstrap_servers
        topics = Topics(unique_name("inferences"), unique_name("row-updates"), unique_name("log-updates"))
        await create_topics(bootstrap, {t: PARTITIONS for t in topics.all() + [topics.dlq(t) for t in topics.all()]})
        env = bridge_environment(
            bootstrap=bootstrap,
            group=unique_name("bridge"),
            topics=topics,
            openlayer_url=fake_apis.openlayer_base_url,
            humanloop_url=fake_apis.humanloop_base_url,
            openlayer_key=OPENLAYER_KEY,
            humanloop_key=HUMANLOOP_KEY,
        )
        drained = partial(_drained, bootstrap, env["BRIDGE_KAFKA__GROUP_ID"], topics)
        stream = _Stream(bootstrap, topics)
        a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"

        await stream.batch()
        first = _start(members, env, a_log)
        await eventually(drained, timeout_s=60, what="the first batch committed")

        # The broker goes away under a member that is fetching and committing, and comes back.
        await asyncio.to_thread(broker.restart)
        await stream.batch()
        await eventually(drained, timeout_s=90, what="the batch after the broker restart committed")
        await eventually(
            partial(_holds, lambda: bool(_lowered(a_log))), timeout_s=10, what="a lowered line from the restart"
        )

        # A second member joins, takes its share, and leaves on SIGTERM; the first takes everything back.
        held_before = len(_assignments(a_log))
        second = _start(members, env, b_log)
        await eventually(partial(_holds, lambda: bool(_assignments(b_log))), timeout_s=60, what="b's partitions")
        await stream.batch()
        await eventually(drained, timeout_s=60, what="the batch shared by two members committed")
        assert second.terminate() == 0, b_log.read_text()[-3000:]
        await eventually(
            partial(_holds, lambda: _took_everything_back(a_log, held_before)),
            timeout_s=60,
            what="a to take every partition back",
        )
        await stream.batch()
        await eventually(drained, timeout_s=60, what="the last batch committed")
        assert first.terminate() == 0, a_log.read_text()[-3000:]

    assert _errors(a_log, b_log) == []


@pytest.mark.slow
async def test_a_member_killed_and_replaced_logs_no_error(
    kafka_bootstrap: str, topics: Topics, bridge_env: dict[str, str], tmp_path: Path
) -> None:
    """kill -9 one member and start its replacement, with the production session timeout.

    The rebalance waits for the dead member until its session expires. aiokafka gives JoinGroup no
    timeout of its own, only the client's request timeout, so service/kafka/clients.py sets that above the
    rebalance timeout (the session timeout): the join is held, not timed out and resent ("Error sending
    JoinGroupRequest ... marking coordinator dead"). 46 s (45 s is the default) with a heartbeat every
    0.5 s keeps the join waiting past aiokafka's default 40 s request timeout, which it used to outlast.
    """
    env = {**bridge_env, "BRIDGE_KAFKA__SESSION_TIMEOUT_MS": "46000", "BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS": "500"}
    drained = partial(_drained, kafka_bootstrap, env["BRIDGE_KAFKA__GROUP_ID"], topics)
    stream = _Stream(kafka_bootstrap, topics)
    a_log, b_log, c_log = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "c.log"
    with _members() as members:
        await stream.batch()
        first = _start(members, env, a_log)
        await eventually(partial(_holds, lambda: bool(_assignments(a_log))), timeout_s=60, what="a's partitions")
        doomed = _start(members, env, b_log)
        await eventually(partial(_holds, lambda: bool(_assignments(b_log))), timeout_s=60, what="b's partitions")
        await eventually(drained, timeout_s=60, what="the first batch committed")

        doomed.kill()
        replacement = _start(members, env, c_log)
        await eventually(
            partial(_holds, lambda: bool(_assignments(c_log))), timeout_s=120, what="the replacement's partitions"
        )
        await stream.batch()
        await eventually(drained, timeout_s=60, what="the batch after the replacement committed")
        assert replacement.terminate() == 0, c_log.read_text()[-3000:]
        assert first.terminate() == 0, a_log.read_text()[-3000:]

    assert _lowered(a_log, JOIN_GROUP_SEND_FAILED) + _lowered(c_log, JOIN_GROUP_SEND_FAILED) == []
    assert _errors(a_log, b_log, c_log) == []
