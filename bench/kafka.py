"""Kafka for the bench: a pinned local broker, a fast bulk producer, a paced producer, progress checks.

The broker is the test suite's single-node KRaft broker (`python -m tests.support.kafka_broker`),
started under `taskset` so the JVM and all its threads stay off the service's core. The bulk
producer fills topics before the service starts: it builds record batches itself (aiokafka's
`create_batch`), round-robin over partitions, no compression, so a million records take seconds.
The paced producer sends at a fixed rate while the service runs, stamping each record's
CreateTime, which is where produce-to-API latency is measured from.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.support.kafka_broker import create_topics

_BATCH_BYTES = 512 * 1024


@contextlib.contextmanager
def pinned_broker(jars: Path, cpus: str, log_path: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """A local broker pinned to `cpus`; yields its bootstrap address and stops it (by pid) on exit."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, sys.executable, "-m", "tests.support.kafka_broker", "--jars", str(jars)],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        bootstrap = ""
        while not bootstrap:
            line = proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"the Kafka broker exited before it was ready; see {log_path}")
            if line.startswith("KAFKA_BOOTSTRAP_SERVERS="):
                bootstrap = line.strip().split("=", 1)[1]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Kafka broker was not ready after {timeout_s:.0f}s; see {log_path}")
        yield bootstrap
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the wrapper stops the JVM cleanly and removes its data
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def make_topics(bootstrap: str, topics: Iterable[str], partitions: int) -> None:
    await create_topics(bootstrap, dict.fromkeys(topics, partitions))


async def delete_topics(bootstrap: str, topics: Iterable[str]) -> None:
    """Best effort: a bench on an external broker should not leave its topics behind."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(Exception):
            await admin.delete_topics(list(topics))
    finally:
        await admin.close()


async def bulk_produce(bootstrap: str, topic: str, partitions: int, values: Iterable[bytes]) -> int:
    """Send every value, round-robin over partitions in large batches; returns the count once acked."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=0, max_batch_size=_BATCH_BYTES, max_request_size=4 * _BATCH_BYTES
    )
    await producer.start()
    sent = 0
    try:
        pending: list[asyncio.Future[object]] = []
        batch = producer.create_batch()
        partition = 0
        for value in values:
            if batch.append(key=None, value=value, timestamp=None) is None:
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                partition = (partition + 1) % partitions
                batch = producer.create_batch()
                batch.append(key=None, value=value, timestamp=None)
            sent += 1
            if len(pending) >= 64:
                await asyncio.gather(*pending)
                pending.clear()
        if batch.record_count():
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


async def paced_produce(
    bootstrap: str, topic: str, values: Iterable[tuple[str, bytes]], rate_per_s: float, seconds: float
) -> dict[str, float]:
    """Send `(id, value)` pairs at `rate_per_s` for `seconds`; returns each id's CreateTime (epoch seconds)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    await producer.start()
    stamps: dict[str, float] = {}
    try:
        source = iter(values)
        started = time.monotonic()
        pending: list[asyncio.Future[object]] = []
        sent = 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(rate_per_s * elapsed) - sent
            for _ in range(due):
                record_id, value = next(source)
                now_ms = int(time.time() * 1000)
                stamps[record_id] = now_ms / 1000
                pending.append(await producer.send(topic, value, timestamp_ms=now_ms))
                sent += 1
            if len(pending) > 1000:  # drop the acknowledged ones; never stall the pacing on acks
                pending = [future for future in pending if not future.done()]
            await asyncio.sleep(0.002)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return stamps


class Progress:
    """The group's committed offsets against the topic's end offsets, without joining the group."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]

    async def __aenter__(self) -> Progress:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def remaining(self) -> int:
        """Records not yet committed by the group (end offset minus committed offset, summed)."""
        ends = await self._consumer.end_offsets(self._tps)
        left = 0
        for tp in self._tps:
            committed = await self._consumer.committed(tp)
            left += ends[tp] - (committed if committed is not None and committed >= 0 else 0)
        return left
