"""Replay 5,000 real bars to a real broker at max speed and read them back, exactly and in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from meltica.domain import Bar
from meltica.infra.kafka import KafkaEndpoint
from meltica.marketdata.replay import load_bars, replay
from meltica.messaging import Catalogue, Codec, market_key
from meltica.messaging.admin import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
N = 5000


def test_replay_5000_real_bars_round_trip(kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]) -> None:
    from aiokafka import AIOKafkaConsumer

    from streams.replay import ReplayPublisher

    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("replay") + ".")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    topic = catalogue.topic_name("md.candles.1m")
    bars = load_bars(DATA, exchange="binanceusdm", symbol="BTC/USDT:USDT", limit=N)
    assert len(bars) == N
    key = market_key("binanceusdm", "BTC/USDT:USDT").encode()

    async def scenario() -> tuple[list[tuple[int, int, bytes, Bar]], float]:
        async with ReplayPublisher(bootstrap, codec=codec, batch_messages=1000) as publisher:
            stats = await publisher.publish(replay(bars, speed=None))
        assert stats.messages == N
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=unique_name("replay-reader"),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        got: list[tuple[int, int, bytes, Bar]] = []
        try:
            async with asyncio.timeout(20):
                while len(got) < N:
                    batch = await consumer.getmany(timeout_ms=500, max_records=N)
                    for messages in batch.values():
                        for m in messages:
                            got.append((m.partition, m.offset, m.key, codec.decode("md.candles.1m", m.value)))
            extra = await consumer.getmany(timeout_ms=300)
            assert not any(extra.values()), "more messages than published"
        finally:
            await consumer.stop()
        return got, stats.rate

    got, rate = asyncio.run(scenario())
    print(f"replay publisher: {N} bars at {rate:,.0f} msg/s")

    assert len(got) == N
    assert {k for _, _, k, _ in got} == {key}
    assert len({p for p, _, _, _ in got}) == 1  # one key, one partition
    offsets = [o for _, o, _, _ in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == N
    decoded = [b for _, _, _, b in got]
    assert [b.ts for b in decoded] == [b.ts for b in bars]
    for sent, received in zip(bars, decoded, strict=True):
        assert received == sent
        for name in ("open", "high", "low", "close", "volume"):
            a, b = getattr(sent, name), getattr(received, name)
            assert a == b and str(a) == str(b), (name, a, b)  # exact Decimal, same digits
