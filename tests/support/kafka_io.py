"""Kafka helpers for tests and the demo: produce, read a whole topic, read a group's commits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition


async def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | None],
    *,
    keys: Sequence[bytes | None] | None = None,
    partition: int | None = None,
    headers: Sequence[tuple[str, bytes | None]] = (),
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, value, key=None if keys is None else keys[i], partition=partition, headers=list(headers)
            )
            for i, value in enumerate(values)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record currently in `topic`, without joining a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topic)
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=500)
            for items in batch.values():
                records.extend(items)
        return records
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topic)
        ends = await consumer.end_offsets(partitions) if partitions else {}
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets for `topic` (partitions without a commit are left out)."""
    # A consumer that never subscribes does not join the group; it only fetches the group's offsets,
    # and unlike the admin client it waits for the group coordinator to be found.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        result = {}
        for tp in await _partitions(consumer, topic):
            offset = await consumer.committed(tp)
            if offset is not None and offset >= 0:
                result[tp.partition] = offset
        return result
    finally:
        await consumer.stop()


async def all_committed(bootstrap: str, group: str, *topics: str) -> bool:
    """Whether `group` has committed every record of `topics` (each non-empty partition to its end)."""
    for topic in topics:
        ends = await end_offsets(bootstrap, topic)
        if await committed(bootstrap, group, topic) != {p: o for p, o in ends.items() if o > 0}:
            return False
    return True


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    ids = consumer.partitions_for_topic(topic)
    if ids is None:
        await consumer._client.force_metadata_update()  # the public API has no "refresh" call
        ids = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(ids)]


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 60.0, what: str = "") -> None:
    """Wait until `check` holds. The timeout guards against a hang; it is not a speed assertion."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting after {timeout_s:.0f}s: {what}")
        await asyncio.sleep(0.1)
