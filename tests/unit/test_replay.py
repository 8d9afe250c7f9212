"""Core replay: time order, merging bars and trades, pacing against an injected clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from meltica.domain import Bar, Trade
from meltica.marketdata.replay import (
    Pacer,
    event_time,
    load_bars,
    merge_streams,
    pace_delay,
    replay,
)

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _bar(minute: int) -> Bar:
    p = Decimal("100.5") + minute
    return Bar(
        exchange="x", symbol="A/B", timeframe="1m", ts=T0 + timedelta(minutes=minute),
        open=p, high=p, low=p, close=p, volume=Decimal(1),
    )  # fmt: skip


def _trade(seconds: float, tid: str) -> Trade:
    return Trade(
        exchange="x", symbol="A/B", trade_id=tid, price=Decimal("1.1"), quantity=Decimal("0.5"),
        ts=T0 + timedelta(seconds=seconds),
    )  # fmt: skip


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def _collect(it: object) -> list[object]:
    return [e async for e in it]  # type: ignore[attr-defined]


def test_loads_real_bars_exactly() -> None:
    bars = load_bars(DATA, exchange="binanceusdm", symbol="BTC/USDT:USDT", limit=3)
    assert len(bars) == 3
    assert bars[0].ts == datetime(2021, 12, 31, 23, 1, tzinfo=UTC)
    assert (bars[0].open, bars[0].volume) == (Decimal("46319.0"), Decimal("2300413.7295"))
    assert [b.ts for b in bars] == sorted(b.ts for b in bars)


def test_event_time_is_bar_close() -> None:
    assert event_time(_bar(0)) == T0 + timedelta(minutes=1)
    assert event_time(_trade(5, "t")) == T0 + timedelta(seconds=5)


def test_merge_orders_by_event_time_bars_first_on_ties() -> None:
    bars = [_bar(0), _bar(1)]  # close at 60 s and 120 s
    trades = [_trade(30, "a"), _trade(60, "b"), _trade(90, "c"), _trade(150, "d")]
    merged = list(merge_streams(bars, trades))
    labels = [e.trade_id if isinstance(e, Trade) else f"bar{(e.ts - T0).seconds // 60}" for e in merged]
    assert labels == ["a", "bar0", "b", "c", "bar1", "d"]


def test_merge_rejects_time_travel() -> None:
    with pytest.raises(ValueError, match="back in time"):
        list(merge_streams([_trade(10, "a"), _trade(5, "b")]))


def test_pace_delay() -> None:
    assert pace_delay(T0, T0 + timedelta(seconds=60), 10.0, 10.0, 60.0) == pytest.approx(1.0)
    assert pace_delay(T0, T0 + timedelta(seconds=60), 10.0, 12.0, 60.0) == 0.0
    assert pace_delay(T0, T0 + timedelta(days=1), 0.0, 0.0, None) == 0.0
    with pytest.raises(ValueError, match="speed"):
        pace_delay(T0, T0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="speed"):
        Pacer(speed=-1)


def test_paced_replay_sleeps_scaled_gaps() -> None:
    fake = FakeTime()
    events = [_trade(0, "a"), _trade(10, "b"), _trade(10, "c"), _trade(40, "d")]
    out = asyncio.run(_collect(replay(events, speed=10, clock=fake.clock, sleep=fake.sleep)))
    assert out == events
    assert fake.sleeps == [pytest.approx(1.0), pytest.approx(3.0)]
    assert fake.now == pytest.approx(1004.0)


def test_max_speed_never_sleeps() -> None:
    fake = FakeTime()
    bars = [_bar(i) for i in range(100)]
    out = asyncio.run(_collect(replay(bars, speed=None, clock=fake.clock, sleep=fake.sleep)))
    assert out == bars
    assert fake.sleeps == []


def test_slow_consumer_catches_up_without_sleeping() -> None:
    fake = FakeTime()
    events = [_trade(0, "a"), _trade(1, "b"), _trade(2, "c")]

    async def run() -> None:
        async for e in Pacer(speed=1, clock=fake.clock, sleep=fake.sleep).paced(events):
            if isinstance(e, Trade) and e.trade_id == "a":
                fake.now += 5  # the consumer took 5 s: b and c are late, no sleep

    asyncio.run(run())
    assert fake.sleeps == []


def test_merge_rejects_time_travel_in_any_stream() -> None:
    with pytest.raises(ValueError, match="stream 1 goes back in time"):
        list(merge_streams([_bar(0)], [_trade(10, "a"), _trade(5, "b")]))


def test_publisher_topic_for() -> None:
    from streams.replay import topic_for

    assert topic_for(_bar(0)) == "md.candles.1m"
    assert topic_for(_trade(0, "a")) == "md.trades"
    five = _bar(0).model_copy(update={"timeframe": "5m"})
    with pytest.raises(ValueError, match="only 1m"):
        topic_for(five)
