"""Market data through the real pieces: the project's Binance emulator replays recorded trades, ccxt's
own ``binance`` (pro) class streams them through ``MarketDataIngest`` into real Kafka (``md.trades``),
the Faust candle agent aggregates them into ``md.candles.1m``; a ``SubscribeCommand`` on ``control``
starts and stops the flow. And a replay sourced from the database.

Faust runs in-process (``await app.start()`` on the test's loop) with a unique topic prefix and app id.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from meltica.cli.demo_cmd import DEMO_DATASET
from meltica.domain import Bar, Trade
from meltica.infra.kafka import KafkaEndpoint
from meltica.live.marketdata import MarketDataIngest, aggregate
from meltica.messaging import Catalogue, Codec, market_key
from meltica.messaging.admin import create_topics
from meltica.messaging.schemas import EndOfReplayCommand, SubscribeCommand

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

XRP_TRADES = Path(__file__).resolve().parents[1] / "data" / "freqtrade" / "XRP_ETH-trades.json.gz"
BTC_PERP = DEMO_DATASET  # the demo dataset that ships inside the package
N = 600  # recorded trades streamed while subscribed (about 2h50 of XRP/ETH: ~150 minutes with trades)
AFTER = 150  # replayed after the unsubscribe: must not reach Kafka
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _write_trades_parquet(path: Path, rows: list[list[Any]]) -> None:
    """The freqtrade recording ([ms, id, type, side, price, amount, cost]) in the emulator's parquet shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "timestamp": pa.array([r[0] for r in rows], pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            "trade_id": pa.array([int(r[1]) for r in rows], pa.int64()),
            "price": pa.array([r[4] for r in rows], pa.float64()),
            "quantity": pa.array([r[5] for r in rows], pa.float64()),
            "buyer_maker": pa.array([r[3] == "sell" for r in rows]),
        }
    )
    pq.write_table(table, path)


async def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0, poll: float = 0.05) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(poll)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _read_all(
    bootstrap: str, codec: Codec, catalogue: Catalogue, name: str, group: str
) -> list[tuple[bytes, Any]]:
    """Every message of a topic now (key, decoded value), per partition in offset order."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        catalogue.topic_name(name),
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[tuple[bytes, Any]] = []
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=400)
            if not any(batch.values()):
                idle += 1 if consumer.assignment() else 0
                continue
            idle = 0
            for messages in batch.values():
                out.extend((m.key, codec.decode(name, m.value)) for m in messages)
    finally:
        await consumer.stop()
    return out


def _book_sequence(book: Any) -> int:
    """The venue update id a book message ends at (a snapshot's ``sequence``, a delta's ``last_sequence``)."""
    return int(getattr(book, "last_sequence", None) or getattr(book, "sequence", None) or 0)


def _ohlcv(bar: Bar) -> tuple[object, ...]:
    return (bar.exchange, bar.symbol, bar.timeframe, bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume)


def test_ingest_from_emulator_to_kafka_and_faust_candles(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaProducer

    from meltica.adapters.ccxt.adapter import StreamPolicy
    from meltica.adapters.registry import create_adapter
    from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
    from meltica.marketdata.series import TradeSeries
    from streams.app import make_app
    from streams.marketdata import register_candle_agents, register_ingest
    from streams.topics import StreamTopics

    rows = json.loads(gzip.decompress(XRP_TRADES.read_bytes()))[: N + AFTER]
    data = tmp_path / "xrpeth-trades.parquet"
    _write_trades_parquet(data, rows)
    recorded = TradeSeries.from_file(data, exchange="binance", symbol="XRP/ETH").trades()
    assert len(recorded) == N + AFTER

    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("ingest") + ".")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    control_topic = catalogue.topic_name("control")
    market = market_key("binance", "XRP/ETH")

    def command(subscribe: bool, channels: tuple[str, ...]) -> bytes:
        return codec.encode(
            "control",
            SubscribeCommand(
                command_id=unique_name("sub"), actor="test", ts=T0, exchange="binance", symbol="XRP/ETH",
                channels=channels, subscribe=subscribe,  # type: ignore[arg-type]
            ),
        )  # fmt: skip

    async def scenario() -> dict[str, Any]:
        emulator = EmulatorServer(EmulatorConfig.single("k", "s", symbols=["XRPETH"], data=[data]))
        await emulator.start()
        adapter = create_adapter(
            "binance",
            account="market-data",
            urls={"api": emulator.ccxt_urls()},
            options=CCXT_OPTIONS,
            streams=StreamPolicy(stale_after=None),
        )
        app = make_app(bootstrap, unique_name("test-md-app"))
        topics = StreamTopics(app, catalogue=catalogue, codec=codec)
        candles = register_candle_agents(app, topics)
        ingest = MarketDataIngest({"binance": adapter})
        ingest_agents = register_ingest(app, topics, ingest)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        await app.start()
        try:
            # 1. subscribe at runtime through control: trades, and the book (a second stream on the same
            #    websocket, used below to see that the emulator's later events did arrive)
            await producer.send_and_wait(control_topic, key=b"ingest", value=command(True, ("trades", "book")))
            await _wait(lambda: len(ingest.active) == 2, "both streams running", timeout=60)
            await _wait(lambda: emulator.hub.has_subscribers("xrpeth@trade"), "the trade subscription")
            await _wait(
                lambda: any(s.startswith("xrpeth@depth") for s in emulator.hub.subscribed()), "the book subscription"
            )
            # one recorded trade at a time: ccxt pro resolves a watch only for a message that arrives while
            # it is awaited (what arrives in between waits for the next message), so a burst's tail would
            # wait for more data that never comes in a test
            for i in range(1, N + 1):
                await emulator.step(1)
                await _wait(lambda i=i: ingest.counts["trades"] >= i, f"trade {i} through ingest", poll=0.001)
            # 2. end of the replayed part: the candle agent flushes the last minute once all N are in
            end = EndOfReplayCommand(
                command_id="end-1", actor="test", ts=T0, exchange="binance", symbol="XRP/ETH",
                last_ts=recorded[N - 1].ts, count=N,
            )  # fmt: skip
            await producer.send_and_wait(control_topic, key=market.encode(), value=codec.encode("control", end))
            expected_bars = aggregate(recorded[:N])
            await _wait(lambda: candles.published == len(expected_bars), "every candle", timeout=60)
            # 3. unsubscribe the trades: the stream stops, the book goes on
            await producer.send_and_wait(control_topic, key=b"ingest", value=command(False, ("trades",)))
            await _wait(lambda: {s.channel for s in ingest.active} == {"book"}, "the trade stream to stop")
            books_before = ingest.counts["book"]
            await emulator.step(AFTER)
            # the book moves with the replayed trades; its updates follow the trades on the same socket
            await _wait(lambda: ingest.counts["book"] > books_before, "book updates after the unsubscribe")
            await _wait(lambda: emulator.events_left == 0, "the emulator to replay everything")
            # The trades of those events, had they been wanted, were on the socket before the book update of
            # the last event: once that update is on Kafka, a late trade could no longer arrive.
            final_update = emulator.book_update_id("XRPETH")
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                published = await _read_all(bootstrap, codec, catalogue, "md.book", unique_name("barrier"))
                if any(_book_sequence(b) >= final_update for _, b in published):
                    break
                assert asyncio.get_running_loop().time() < deadline, "the last book update never reached Kafka"
            counts = dict(ingest.counts)
            sent = ingest_agents.service.sent
        finally:
            await app.stop()
            await producer.stop()
            await emulator.stop()
        assert not ingest.active, "stopping the app stops the ingest streams"
        trades = await _read_all(bootstrap, codec, catalogue, "md.trades", unique_name("r1"))
        bars = await _read_all(bootstrap, codec, catalogue, "md.candles.1m", unique_name("r2"))
        books = await _read_all(bootstrap, codec, catalogue, "md.book", unique_name("r3"))
        return {
            "trades": trades,
            "bars": bars,
            "books": books,
            "counts": counts,
            "sent": sent,
            "late": candles.processor.aggregator.late,
            "dups": candles.processor.aggregator.duplicates,
            "expected": expected_bars,
            "commands": ingest_agents.commands,
        }

    got = asyncio.run(scenario())
    trades: list[tuple[bytes, Trade]] = got["trades"]
    bars: list[tuple[bytes, Bar]] = got["bars"]
    expected: list[Bar] = got["expected"]

    # ingest → md.trades: exactly the N recorded trades while subscribed, in order, keyed by market
    assert got["counts"]["trades"] == N
    assert {k for k, _ in trades} == {market.encode()}
    assert [t.trade_id for _, t in trades] == [t.trade_id for t in recorded[:N]]
    for (_, received), original in zip(trades, recorded[:N], strict=True):
        assert (received.price, received.quantity, received.ts) == (original.price, original.quantity, original.ts)
        assert received.aggressor_side == original.aggressor_side
    # the book stream went on after the trades stopped
    assert got["counts"]["book"] > 0 and len(got["books"]) == got["counts"]["book"]
    assert got["sent"] == N + got["counts"]["book"]
    assert got["commands"] == 2

    # Faust candle agent → md.candles.1m: the core aggregator applied to the same trades
    assert len(expected) > 100
    assert {k for k, _ in bars} == {market.encode()}
    assert [_ohlcv(b) for _, b in bars] == [_ohlcv(b) for b in expected]
    assert [_ohlcv(b) for _, b in bars] == [_ohlcv(b) for b in aggregate(t for _, t in trades)]
    assert got["late"] == 0 and got["dups"] == 0


def test_replay_from_the_database_paced_with_end_of_replay(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str], fresh_database: Engine
) -> None:
    from meltica.marketdata.candle_files import read_candle_file
    from meltica.marketdata.replay import load_bars_from_database
    from meltica.storage.candles import load_candles
    from streams.replay import ReplayPublisher

    rows = read_candle_file(BTC_PERP, "1m").rows[:300]
    load_candles(fresh_database, rows, exchange="binanceusdm", symbol="BTC/USDT:USDT", timeframe="1m")
    bars = load_bars_from_database(fresh_database, exchange="binanceusdm", symbol="BTC/USDT:USDT", limit=240)
    assert len(bars) == 240 and bars[0].ts == rows[0].ts and bars[-1].close == rows[239].close

    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("dbreplay") + ".")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    sleeps: list[float] = []
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    async def scenario() -> tuple[Any, list[tuple[bytes, Any]], list[tuple[bytes, Any]]]:
        async with ReplayPublisher(bootstrap, codec=codec, batch_messages=100) as publisher:
            result = await publisher.replay(bars, speed=600, run_id="db-test", clock=lambda: now[0], sleep=fake_sleep)
        published = await _read_all(bootstrap, codec, catalogue, "md.candles.1m", unique_name("r"))
        control = await _read_all(bootstrap, codec, catalogue, "control", unique_name("c"))
        return result, published, control

    result, published, control = asyncio.run(scenario())
    # paced at 600x: 239 recorded minutes between the first and the last bar close = 23.9 s of sleeping
    assert sum(sleeps) == pytest.approx(239 * 60 / 600)
    assert result.stats.messages == 240
    assert [b for _, b in published] == bars
    assert all(str(a.volume) == str(b.volume) for (_, a), b in zip(published, bars, strict=True))
    assert len(control) == 1
    key, end = control[0]
    assert key == market_key("binanceusdm", "BTC/USDT:USDT").encode()
    assert isinstance(end, EndOfReplayCommand) and end == result.end_commands[0]
    assert (end.count, end.last_ts, end.exchange, end.symbol) == (240, bars[-1].ts, "binanceusdm", "BTC/USDT:USDT")
    assert end.command_id == "end-of-replay:db-test:binanceusdm:BTC/USDT:USDT"


def test_candle_agent_restart_continues_the_open_minute_from_its_table(
    kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    """A worker stops mid-minute; a new one (same group) restores the window from the changelogged table."""
    from meltica.marketdata.series import TradeSeries
    from streams.app import make_app
    from streams.marketdata import register_candle_agents
    from streams.replay import ReplayPublisher
    from streams.topics import StreamTopics

    trades = TradeSeries.from_file(XRP_TRADES, exchange="binance", symbol="XRP/ETH").trades()[:2000]
    cut = next(i for i in range(1500, 2000) if trades[i - 1].ts.minute == trades[i].ts.minute)
    first, rest = trades[:cut], trades[cut:]  # the first worker stops inside a minute
    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("restart") + ".")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    app_id = unique_name("test-candles-restart")
    expected = aggregate(trades)

    async def run_worker(until: Callable[[Any], bool]) -> Any:
        app = make_app(bootstrap, app_id)
        shell = register_candle_agents(app, StreamTopics(app, catalogue=catalogue, codec=codec))
        await app.start()
        try:
            await _wait(lambda: until(shell), "the candle agent", timeout=60)
        finally:
            await app.stop()
        return shell

    async def scenario() -> tuple[Any, Any, list[tuple[bytes, Any]]]:
        async with ReplayPublisher(bootstrap, codec=codec) as publisher:
            await publisher.replay(first, end_of_replay=False)
            one = await run_worker(lambda shell: shell.handled == len(first))
            assert one.table.get("binance:XRP/ETH") is not None  # the open minute, stored
            result = await publisher.replay(rest)  # its end of replay counts both parts
            assert result.end_commands[0].count == len(trades)
        two = await run_worker(lambda shell: shell.published == len(expected) - one.published)
        bars = await _read_all(bootstrap, codec, catalogue, "md.candles.1m", unique_name("r"))
        return one, two, bars

    one, two, bars = asyncio.run(scenario())
    assert 0 < one.published < len(expected)
    # At least once: the new worker starts at the first one's last commit, so it may see a few of the first
    # worker's trades again (dropped as redeliveries, by partition/offset); it must see every later one.
    assert two.handled >= len(rest)
    assert [_ohlcv(b) for _, b in bars] == [_ohlcv(b) for b in expected]
