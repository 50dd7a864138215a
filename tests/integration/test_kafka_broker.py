"""The Kafka fixtures give a real broker: produce, consume, commit, and survive a broker restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.support.kafka_broker import LocalKafkaBroker, create_topics

pytestmark = pytest.mark.kafka


async def _produce(bootstrap: str, topic: str, values: list[bytes], partitions: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, partition=i % partitions)
    finally:
        await producer.stop()


async def _consume(consumer: AIOKafkaConsumer, count: int) -> list[bytes]:
    values: list[bytes] = []
    async with asyncio.timeout(60):  # a hang guard, not a speed assertion
        while len(values) < count:
            batches = await consumer.getmany(timeout_ms=500)
            values += [record.value for records in batches.values() for record in records]
    return values


async def _committed(bootstrap: str, group: str, partitions: list[TopicPartition]) -> dict[int, int | None]:
    # A fresh consumer: proves the offsets live in the broker, not in the consumer that committed them.
    fresh = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await fresh.start()
    try:
        return {tp.partition: await fresh.committed(tp) for tp in partitions}
    finally:
        await fresh.stop()


async def test_produce_consume_commit(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> None:
    topic, group = unique_name("fixture"), unique_name("group")
    await create_topics(kafka_bootstrap, {topic: 3})
    await _produce(kafka_bootstrap, topic, [b"a", b"b", b"c"], partitions=3)

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        assert sorted(await _consume(consumer, 3)) == [b"a", b"b", b"c"]
        await consumer.commit()
    finally:
        await consumer.stop()

    partitions = [TopicPartition(topic, p) for p in range(3)]
    assert await _committed(kafka_bootstrap, group, partitions) == {0: 1, 1: 1, 2: 1}


async def test_restart_keeps_topics_and_offsets(kafka_jars_dir: Path, unique_name: Callable[[str], str]) -> None:
    # Its own broker: restarting the session broker would disturb every other test.
    with LocalKafkaBroker(kafka_jars_dir) as broker:
        bootstrap, topic, group = broker.bootstrap_servers, unique_name("restart"), unique_name("group")
        tp = TopicPartition(topic, 0)
        await create_topics(bootstrap, {topic: 1})
        await _produce(bootstrap, topic, [b"one", b"two", b"three"], partitions=1)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.commit({tp: 2})  # as if "one" and "two" were delivered
        finally:
            await consumer.stop()

        await asyncio.to_thread(broker.restart)
        assert broker.bootstrap_servers == bootstrap

        assert await _committed(bootstrap, group, [tp]) == {0: 2}
        reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await reader.start()
        try:
            reader.assign([tp])
            assert await _consume(reader, 3) == [b"one", b"two", b"three"]
        finally:
            await reader.stop()
        resumed = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await resumed.start()
        try:
            assert await _consume(resumed, 1) == [b"three"]
        finally:
            await resumed.stop()
