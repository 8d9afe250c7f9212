"""A Faust agent on the real broker decodes with the core codec and dead-letters malformed messages.

Runs Faust in-process: ``await app.start()`` on the test's event loop (no worker subprocess), with
the catalogue under a unique topic prefix and a unique app id (consumer group).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from meltica.domain import Trade
from meltica.infra.kafka import KafkaEndpoint
from meltica.messaging import Catalogue, Codec, DeadLetter, market_key
from meltica.messaging.admin import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TS = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def _trade(i: int) -> Trade:
    return Trade(
        exchange="binance",
        symbol="BTC/USDT",
        trade_id=f"t{i}",
        price=Decimal("65000.000000001") + i,
        quantity=Decimal("0.001"),
        ts=TS,
    )


def test_agent_dead_letters_bad_messages_and_keeps_running(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from streams.app import make_app
    from streams.topics import StreamTopics

    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("t") + ".")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    trades_topic = catalogue.topic_name("md.trades")
    key = market_key("binance", "BTC/USDT").encode()

    good = [codec.encode("md.trades", _trade(i)) for i in range(3)]
    good_envelope = json.loads(good[0])
    del good_envelope["data"]["trade_id"]
    bad = [
        b"{this is not json",  # non-JSON
        codec.encode("fills", _fill()),  # wrong schema
        json.dumps(good_envelope).encode(),  # missing field
    ]
    nan_price = good[0].replace(b'"price":"65000.000000001"', b'"price":NaN')
    assert nan_price != good[0]
    bad.append(nan_price)  # float NaN price
    expected = [
        ("invalid_json", "invalid JSON"),
        ("wrong_schema", "schema: got 'AccountFill'"),
        ("validation_error", "data.trade_id: Field required"),
        ("validation_error", "data.price: Value error, NaN and infinity are not allowed"),
    ]
    # interleaved: good, bad, good, bad, good, bad, bad
    first_batch = [good[0], bad[0], good[1], bad[1], good[2], bad[2], bad[3]]

    async def scenario() -> tuple[list[Trade], list[DeadLetter], dict[tuple[str, str], int], float]:
        app = make_app(bootstrap, unique_name("test-dlq-app"))
        topics = StreamTopics(app, catalogue=catalogue, codec=codec)
        processed: list[Trade] = []

        @app.agent(topics["md.trades"])
        async def trades(stream: Any) -> None:
            async for event in stream.events():
                model = await topics.decode_event("md.trades", event)
                if model is not None:
                    processed.append(model)

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for value in first_batch:
                await producer.send_and_wait(trades_topic, key=key, value=value)
            t0 = time.monotonic()
            await app.start()
            try:
                async with asyncio.timeout(45):
                    while len(processed) < 3 or topics.dead_letters.total < 4:
                        await asyncio.sleep(0.1)
                started_in = time.monotonic() - t0
                # still alive after the bad ones: one more good message is processed
                late = codec.encode("md.trades", _trade(99))
                await producer.send_and_wait(trades_topic, key=key, value=late)
                async with asyncio.timeout(20):
                    while len(processed) < 4:
                        await asyncio.sleep(0.05)
            finally:
                await app.stop()
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            catalogue.topic_name("dlq"),
            bootstrap_servers=bootstrap,
            group_id=unique_name("test-dlq-reader"),
            auto_offset_reset="earliest",
        )
        await consumer.start()
        letters: list[DeadLetter] = []
        try:
            async with asyncio.timeout(20):
                while len(letters) < 4:
                    batch = await consumer.getmany(timeout_ms=500)
                    for messages in batch.values():
                        for message in messages:
                            assert message.key == trades_topic.encode()
                            letters.append(codec.decode("dlq", message.value))
        finally:
            await consumer.stop()
        return processed, letters, topics.dead_letter_counts, started_in

    processed, letters, counts, started_in = asyncio.run(scenario())
    print(f"faust in-process: app.start() to 3 processed + 4 dead letters in {started_in:.1f}s")

    assert [t.trade_id for t in processed] == ["t0", "t1", "t2", "t99"]
    assert processed[0].price == Decimal("65000.000000001")
    letters.sort(key=lambda d: d.offset)
    assert [d.offset for d in letters] == [1, 3, 5, 6]
    for letter, (error_type, reason), raw in zip(letters, expected, bad, strict=True):
        assert letter.topic == trades_topic
        assert letter.error_type == error_type
        assert reason in letter.reason, letter.reason
        assert letter.original_bytes() == raw
        assert letter.key == "binance:BTC/USDT"
    assert counts == {
        (trades_topic, "invalid_json"): 1,
        (trades_topic, "wrong_schema"): 1,
        (trades_topic, "validation_error"): 2,
    }


def _fill() -> Any:
    from meltica.domain import Fill, Side
    from meltica.messaging import AccountFill

    return AccountFill(
        account="acc1",
        strategy="s1",
        fill=Fill(
            fill_id="f1",
            client_order_id="mlt-x",
            exchange="binance",
            symbol="BTC/USDT",
            side=Side.BUY,
            price=Decimal("1"),
            quantity=Decimal("1"),
            ts=TS,
        ),
    )
