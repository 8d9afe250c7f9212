"""The dev broker is a real Apache Kafka: topics, keyed partitioning, consumer groups, committed offsets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from meltica.infra.kafka import KafkaEndpoint

pytestmark = pytest.mark.integration

PARTITIONS = 6


def _create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="meltica-test-admin")
    try:
        admin.create_topics([NewTopic(name=topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, items: list[tuple[str, str]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for key, value in items:
            producer.send(topic, key=key.encode(), value=value.encode())
        producer.flush(timeout=30)
    finally:
        producer.close()


def _consume(consumer: KafkaConsumer, want: int, timeout: float = 60.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(records)
    return got


def _consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )


def test_topic_with_partitions_and_keyed_consumer_group_resume(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    assert kafka_endpoint.kind == "apache-kafka"
    bootstrap = kafka_endpoint.bootstrap_servers
    topic, group = unique_name("test-trades"), unique_name("test-group")
    _create_topic(bootstrap, topic)

    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + 30
        partitions = probe.partitions_for_topic(topic)
        while (not partitions or len(partitions) < PARTITIONS) and time.monotonic() < deadline:
            time.sleep(0.2)
            probe.close()
            probe = KafkaConsumer(bootstrap_servers=bootstrap)
            partitions = probe.partitions_for_topic(topic)
        assert partitions == set(range(PARTITIONS))
    finally:
        probe.close()

    keys = [f"BTC/USDT-{i}" for i in range(12)]
    first = [(keys[i % len(keys)], f"first-{i}") for i in range(300)]
    _produce(bootstrap, topic, first)

    consumer = _consumer(bootstrap, topic, group)
    try:
        records = _consume(consumer, len(first))
        assert sorted(r.value.decode() for r in records) == sorted(v for _, v in first)
        partition_of: dict[str, set[int]] = {}
        for r in records:
            partition_of.setdefault(r.key.decode(), set()).add(r.partition)
        assert all(len(parts) == 1 for parts in partition_of.values()), partition_of
        assert len({next(iter(p)) for p in partition_of.values()}) > 1  # keys spread over partitions
        # per key, messages arrive in the order they were produced
        for key in keys:
            seq = [int(r.value.decode().split("-")[1]) for r in records if r.key.decode() == key]
            assert seq == sorted(seq)
        consumer.commit()
    finally:
        consumer.close()

    second = [(keys[i % len(keys)], f"second-{i}") for i in range(50)]
    _produce(bootstrap, topic, second)

    resumed = _consumer(bootstrap, topic, group)
    try:
        records = _consume(resumed, len(second))
        records += _consume(resumed, 1, timeout=2.0)  # nothing beyond the new messages
        assert sorted(r.value.decode() for r in records) == sorted(v for _, v in second)
    finally:
        resumed.close()


def test_aiokafka_round_trip(kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    bootstrap = kafka_endpoint.bootstrap_servers
    topic = unique_name("test-aiokafka")
    _create_topic(bootstrap, topic, partitions=3)

    async def round_trip() -> list[tuple[bytes, bytes]]:
        # idempotent producer: needs InitProducerId, which a real broker supports (Faust exactly_once)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            for i in range(20):
                await producer.send_and_wait(topic, key=f"k{i % 4}".encode(), value=f"v{i}".encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=unique_name("test-aio-group"),
            auto_offset_reset="earliest",
        )
        await consumer.start()
        got: list[tuple[bytes, bytes]] = []
        try:
            async with asyncio.timeout(60):
                while len(got) < 20:
                    batch = await consumer.getmany(timeout_ms=500)
                    got.extend((m.key, m.value) for msgs in batch.values() for m in msgs)
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(round_trip())
    assert sorted(v for _, v in got) == sorted(f"v{i}".encode() for i in range(20))
