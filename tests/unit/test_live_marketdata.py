"""Core market data of the live pipeline: trades → 1-minute candles (on real recorded trades), late and
duplicate trades, snapshot/restore, end of replay, and the replay tally."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from meltica.domain import Bar, Trade
from meltica.live.marketdata import (
    CandleAggregator,
    CandleProcessor,
    MarketDataIngest,
    Subscription,
    aggregate,
    closed_bars,
)
from meltica.live.processor import Incoming, Processor
from meltica.marketdata.replay import ReplayTally, replay_speed
from meltica.marketdata.series import BarSeries, TradeSeries
from meltica.messaging.schemas import EndOfReplayCommand, KillSwitchCommand, SubscribeCommand

FREQTRADE = Path(__file__).resolve().parents[1] / "data" / "freqtrade"
XRP_TRADES = FREQTRADE / "XRP_ETH-trades.json.gz"
XRP_KLINES = FREQTRADE / "XRP_ETH-1m.feather"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
KEY = "x:A/B"


@pytest.fixture(scope="module")
def xrp_trades() -> list[Trade]:
    return TradeSeries.from_file(XRP_TRADES, exchange="binance", symbol="XRP/ETH").trades()


def _trade(seconds: float, tid: str, price: str = "10", qty: str = "1") -> Trade:
    return Trade(
        exchange="x", symbol="A/B", trade_id=tid, price=Decimal(price), quantity=Decimal(qty),
        ts=T0 + timedelta(seconds=seconds),
    )  # fmt: skip


def _ohlcv(bar: Bar) -> tuple[object, ...]:
    return (bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume)


def test_real_trades_aggregate_to_the_exchange_klines(xrp_trades: list[Trade]) -> None:
    """12,477 recorded XRP/ETH trades give exactly the 2,469 recorded 1m klines of the same two days."""
    klines = BarSeries.from_file(XRP_KLINES, exchange="binance", symbol="XRP/ETH", timeframe="1m").bars()
    bars = aggregate(xrp_trades)
    assert len(xrp_trades) == 12_477 and len(klines) == 2_469
    assert [_ohlcv(b) for b in bars] == [_ohlcv(k) for k in klines]
    assert all(b.timeframe == "1m" and (b.exchange, b.symbol) == ("binance", "XRP/ETH") for b in bars)
    # empty minutes produce no bar: the series has holes, exactly where no trade happened
    minutes_with_trades = {t.ts.replace(second=0, microsecond=0) for t in xrp_trades}
    span = (bars[-1].ts - bars[0].ts) // timedelta(minutes=1) + 1
    assert {b.ts for b in bars} == minutes_with_trades and len(bars) < span


def test_window_closes_on_a_later_minute_only() -> None:
    agg = CandleAggregator()
    assert agg.add(_trade(1, "a", "10")) == []
    assert agg.add(_trade(30, "b", "12", "2")) == []
    assert agg.add(_trade(59.999, "c", "9")) == []
    closed = agg.add(_trade(185, "d", "11"))  # minute 3: minutes 1 and 2 had no trade, no bar
    assert len(closed) == 1
    bar = closed[0]
    assert (bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume) == (
        T0, Decimal(10), Decimal(12), Decimal(9), Decimal(9), Decimal(4)
    )  # fmt: skip
    assert [b.ts for b in agg.flush(KEY)] == [T0 + timedelta(minutes=3)]
    assert agg.flush(KEY) == []


def test_out_of_order_inside_the_window_follows_event_time() -> None:
    agg = CandleAggregator()
    agg.add(_trade(20, "b", "11"))
    agg.add(_trade(5, "a", "10"))  # earlier in the same minute: the open
    agg.add(_trade(40, "d", "13"))
    agg.add(_trade(30, "c", "12"))  # earlier than d: not the close
    (bar,) = agg.flush(KEY)
    assert (bar.open, bar.close, bar.high, bar.low) == (Decimal(10), Decimal(13), Decimal(13), Decimal(10))


def test_late_trades_are_counted_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    agg = CandleAggregator()
    agg.add(_trade(61, "a"))  # opens minute 1
    with caplog.at_level(logging.WARNING, logger="meltica.live.marketdata"):
        assert agg.add(_trade(59, "late1", "99")) == []  # minute 0 < open window
    assert agg.market(KEY).late == 1
    assert "late trade late1" in caplog.text
    agg.flush(KEY)  # minute 1 closed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meltica.live.marketdata"):
        assert agg.add(_trade(70, "late2", "99")) == []  # minute 1 is closed: never re-opened
    assert agg.late == 2 and "late trade late2" in caplog.text
    assert agg.open_window(KEY) is None
    agg.add(_trade(125, "b"))
    (bar,) = agg.flush(KEY)
    assert bar.high == Decimal(10)  # 99 never entered any bar


def test_duplicates_in_the_open_window_are_dropped() -> None:
    agg = CandleAggregator()
    for tid in ("a", "b", "a", "b", "c"):
        agg.add(_trade(10, tid, qty="2"))
    (bar,) = agg.flush(KEY)
    assert bar.volume == Decimal(6)
    assert agg.market(KEY).duplicates == 2 and agg.market(KEY).trades == 3


def test_close_until_watermark() -> None:
    agg = CandleAggregator()
    agg.add(_trade(10, "a"))
    assert agg.close_until(T0 + timedelta(seconds=59)) == []
    assert [b.ts for b in agg.close_until(T0 + timedelta(seconds=60))] == [T0]


def test_markets_are_independent() -> None:
    agg = CandleAggregator()
    other = _trade(10, "z").model_copy(update={"symbol": "C/D"})
    agg.add(_trade(10, "a"))
    agg.add(other)
    closed = agg.add(_trade(70, "b"))
    assert [(b.symbol, b.ts) for b in closed] == [("A/B", T0)]
    assert agg.open_window("x:C/D") is not None


def _incoming(trade: Trade, offset: int = -1, partition: int = 0) -> Incoming:
    return Incoming("md.trades", f"{trade.exchange}:{trade.symbol}", trade, partition=partition, offset=offset)


async def _run(processor: CandleProcessor, messages: list[Incoming]) -> list[Bar]:
    out: list[Bar] = []
    for message in messages:
        for o in await processor.handle(message):
            assert o.topic == "md.candles.1m"
            assert isinstance(o.value, Bar) and o.key == f"{o.value.exchange}:{o.value.symbol}"
            out.append(o.value)
    return out


def _end(count: int, last_ts: datetime | None, exchange: str = "binance", symbol: str = "XRP/ETH") -> Incoming:
    command = EndOfReplayCommand(
        command_id="end-1", actor="test", ts=T0, exchange=exchange, symbol=symbol, last_ts=last_ts, count=count
    )
    return Incoming("control", f"{exchange}:{symbol}", command)


def test_processor_snapshot_restore_mid_minute_equals_uninterrupted(xrp_trades: list[Trade]) -> None:
    trades = xrp_trades[:3000]
    messages = [_incoming(t, offset=i) for i, t in enumerate(trades)]
    expected = aggregate(trades)

    async def scenario() -> tuple[list[Bar], dict[str, object]]:
        first = CandleProcessor()
        assert isinstance(first, Processor)
        cut = 1234
        bars = await _run(first, messages[:cut])
        key = "binance:XRP/ETH"
        assert first.aggregator.open_window(key) is not None  # stopped inside a minute
        state = json.loads(json.dumps(first.snapshot(key)))  # what the shell's table stores
        second = CandleProcessor()
        second.restore(key, state)
        # at-least-once: the 100 messages before the cut come again, then the rest
        bars += await _run(second, messages[cut - 100 :])
        assert second.redelivered == 100
        bars += await _run(second, [_end(len(trades), trades[-1].ts)])
        return bars, state

    bars, state = asyncio.run(scenario())
    assert [_ohlcv(b) for b in bars] == [_ohlcv(b) for b in expected]
    window = state["windows"]["window"]  # type: ignore[index]
    assert window["trade_ids"] and state["offset"] == 1233


def test_end_of_replay_waits_for_the_replays_trades() -> None:
    """The command travels on control and may overtake the last trades: it flushes once they are in."""
    trades = [_trade(s, f"t{i}") for i, s in enumerate((1, 2, 61, 62, 62))]
    key = ("x", "A/B")

    async def scenario() -> list[tuple[str, list[Bar]]]:
        processor = CandleProcessor()
        log: list[tuple[str, list[Bar]]] = []
        for i, t in enumerate(trades[:3]):
            log.append((t.trade_id, await _run(processor, [_incoming(t, offset=i)])))
        log.append(("end", await _run(processor, [_end(5, trades[-1].ts, *key)])))
        for i, t in enumerate(trades[3:], start=3):
            log.append((t.trade_id, await _run(processor, [_incoming(t, offset=i)])))
        # an end whose trades are all in flushes at once (and nothing is left afterwards)
        log.append(("end-again", await _run(processor, [_end(5, trades[-1].ts, *key)])))
        return log

    log = asyncio.run(scenario())
    emitted = {label: [b.ts for b in bars] for label, bars in log}
    assert emitted == {
        "t0": [], "t1": [], "t2": [T0], "end": [], "t3": [], "t4": [T0 + timedelta(minutes=1)], "end-again": [],
    }  # fmt: skip


def test_end_of_replay_after_the_trades_flushes_at_once_and_ignores_other_commands() -> None:
    async def scenario() -> tuple[list[Bar], list[Bar], list[Bar]]:
        processor = CandleProcessor()
        await _run(processor, [_incoming(_trade(1, "a"), offset=0)])
        kill = KillSwitchCommand(command_id="k", actor="t", ts=T0, mode="halt", reason="test")
        other = await _run(processor, [Incoming("control", "global", kill)])
        unknown_market = await _run(processor, [_end(3, None, "y", "Q/R")])
        flushed = await _run(processor, [_end(1, _trade(1, "a").ts, "x", "A/B")])
        return other, unknown_market, flushed

    other, unknown_market, flushed = asyncio.run(scenario())
    assert other == [] and unknown_market == []
    assert [b.ts for b in flushed] == [T0]


def test_processor_restore_refuses_unknown_state_version() -> None:
    with pytest.raises(ValueError, match="state version"):
        CandleProcessor().restore(KEY, {"version": 99})


def test_closed_bars_yields_each_candle_in_its_last_state() -> None:
    def bar(minute: int, close: str) -> Bar:
        p = Decimal(close)
        return Bar(
            exchange="x", symbol="A/B", timeframe="1m", ts=T0 + timedelta(minutes=minute),
            open=p, high=p, low=p, close=p, volume=Decimal(1),
        )  # fmt: skip

    updates = [bar(0, "1"), bar(0, "2"), bar(1, "3"), bar(0, "9"), bar(1, "4"), bar(2, "5")]

    async def source() -> AsyncIterator[Bar]:
        for u in updates:
            yield u

    async def collect() -> list[Bar]:
        return [b async for b in closed_bars(source())]

    closed = asyncio.run(collect())
    assert [(b.ts, b.close) for b in closed] == [(T0, Decimal(2)), (T0 + timedelta(minutes=1), Decimal(4))]


def test_ingest_subscriptions_snapshot_and_commands() -> None:
    command = SubscribeCommand(
        command_id="s1", actor="t", ts=T0, exchange="binance", symbol="BTC/USDT", channels=("trades", "book")
    )
    subs = Subscription.of(command)
    assert [(s.channel, s.topic, s.key) for s in subs] == [
        ("trades", "md.trades", "binance:BTC/USDT"),
        ("book", "md.book", "binance:BTC/USDT"),
    ]

    async def scenario() -> tuple[frozenset[Subscription], frozenset[Subscription], dict[str, object] | None]:
        ingest = MarketDataIngest({})  # not started: commands change what is wanted, no stream runs
        assert isinstance(ingest, Processor)
        await ingest.handle(Incoming("control", "ingest", command))
        after_subscribe = ingest.subscriptions
        state = ingest.snapshot("ingest")
        stop_book = command.model_copy(update={"channels": ("book",), "subscribe": False})
        await ingest.handle(Incoming("control", "ingest", stop_book))
        return after_subscribe, ingest.subscriptions, state

    after_subscribe, after_unsubscribe, state = asyncio.run(scenario())
    assert after_subscribe == frozenset(subs)
    assert after_unsubscribe == frozenset(subs[:1])
    assert state is not None
    restored = MarketDataIngest({})
    restored.restore("ingest", json.loads(json.dumps(state)))
    assert restored.subscriptions == frozenset(subs)


def test_replay_speed_and_tally() -> None:
    assert replay_speed(0) is None and replay_speed(None) is None and replay_speed(float("inf")) is None
    assert replay_speed(60) == 60.0
    with pytest.raises(ValueError, match="speed"):
        replay_speed(-1)
    tally = ReplayTally()
    for t in (_trade(1, "a"), _trade(2, "b"), _trade(3, "c").model_copy(update={"symbol": "C/D"})):
        tally.add(t)
    ends = tally.end_commands(actor="me", run_id="r1")
    assert [(e.exchange, e.symbol, e.count, e.last_ts) for e in ends] == [
        ("x", "A/B", 2, T0 + timedelta(seconds=2)),
        ("x", "C/D", 1, T0 + timedelta(seconds=3)),
    ]
    assert ends[0].command_id == "end-of-replay:r1:x:A/B" and ends[0].actor == "me"
