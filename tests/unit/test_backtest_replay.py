"""Hand-checked trade and L2 book replays: release rule on events, resting fills, book walking."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any, ClassVar

import pytest

from meltica.backtest import BacktestConfig, run_backtest
from meltica.backtest.engine import BAR, BOOK, TRADE, merge_events
from meltica.domain import BookLevel, LiquiditySide, OrderBookSnapshot, Side, Trade
from meltica.errors import BookGapError
from meltica.marketdata.series import BookSeries, TradeSeries
from meltica.strategies import Strategy, StrategyParams

SYMBOL = "BTC/USDT"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


class P(StrategyParams):
    pass


Action = Callable[["Replay", Any], object]


class Replay(Strategy[P]):
    """Runs ``actions[k]`` on the k-th market event (trade or book) it sees."""

    name: ClassVar[str] = "replay-script"
    Params: ClassVar[type[P]] = P
    actions: ClassVar[dict[int, Action]] = {}

    def __init__(self, params: P, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.k = -1

    def _event(self, item: Any) -> None:
        self.k += 1
        action = self.actions.get(self.k)
        if action is not None:
            action(self, item)

    def on_trade(self, trade: Trade) -> None:
        self._event(trade)

    def on_book(self, book: OrderBookSnapshot) -> None:
        self._event(book)


def script(actions: dict[int, Action]) -> type[Replay]:
    return type("Scripted", (Replay,), {"actions": actions})


def config(**kw: Any) -> BacktestConfig:
    values: dict[str, Any] = {
        "strategy": "replay-script",
        "symbol": SYMBOL,
        "maker_fee_bps": 0,
        "taker_fee_bps": 0,
        "initial_balances": {"USDT": D(100_000), "BTC": D(10)},
    }
    values.update(kw)
    return BacktestConfig.model_validate(values)


def trades(*rows: tuple[float, str, str, Side | None]) -> TradeSeries:
    return TradeSeries.from_trades(
        Trade(
            exchange="binance",
            symbol=SYMBOL,
            trade_id=str(i),
            price=D(p),
            quantity=D(q),
            aggressor_side=side,
            ts=T0 + timedelta(seconds=s),
        )
        for i, (s, p, q, side) in enumerate(rows)
    )


def book(seconds: float, bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> OrderBookSnapshot:
    return OrderBookSnapshot(
        exchange="binance",
        symbol=SYMBOL,
        ts=T0 + timedelta(seconds=seconds),
        bids=tuple(BookLevel(price=D(p), quantity=D(q)) for p, q in bids),
        asks=tuple(BookLevel(price=D(p), quantity=D(q)) for p, q in asks),
    )


def test_resting_limit_fills_only_from_a_later_trade_through_it() -> None:
    strategy = script({0: lambda s, t: s.ctx.buy(SYMBOL, D(1), price=D(99))})
    data = trades(
        (0, "100", "1", Side.BUY),  # decision
        (1, "99.5", "1", Side.SELL),  # the order arrives after this print and rests (the market is above it)
        (2, "99", "3", Side.SELL),  # at the price, not through it: no fill (fill_on_touch off)
        (3, "98.5", "0.3", Side.SELL),  # through: 0.3 at the limit price
        (4, "98.6", "4", Side.BUY),  # a buyer took: cannot fill a resting buy
        (5, "98", "5", Side.SELL),  # the remaining 0.7
    )
    result = run_backtest(config(), trades=data, strategy=strategy)
    fills = [(f.ts, f.price, f.quantity, f.liquidity) for f in result.fills]
    assert fills == [
        (T0 + timedelta(seconds=3), D(99), D("0.3"), LiquiditySide.MAKER),
        (T0 + timedelta(seconds=5), D(99), D("0.7"), LiquiditySide.MAKER),
    ]
    assert [p.ts for p in result.equity] == [T0 + timedelta(seconds=s) for s in range(6)]
    last = result.equity[-1]
    assert last.cash == D(100_000) - D(99)
    assert last.position_value == D(11) * D(98)


def test_market_order_fills_at_the_next_event_not_at_the_decision_price() -> None:
    strategy = script({0: lambda s, t: s.ctx.buy(SYMBOL, D("0.1"))})
    data = trades((0, "100", "1", None), (1, "101", "1", None), (2, "102", "1", None))
    result = run_backtest(config(), trades=data, strategy=strategy)
    assert [(f.ts, f.price, f.quantity, f.liquidity) for f in result.fills] == [
        (T0 + timedelta(seconds=1), D(101), D("0.1"), LiquiditySide.TAKER)
    ]
    # latency 1.5 s: arrives between trades 1 and 2, goes out at trade 2
    late = run_backtest(config(latency_ms=1500), trades=data, strategy=strategy)
    assert [(f.ts, f.price) for f in late.fills] == [(T0 + timedelta(seconds=2), D(102))]
    # slippage 10 bps: the synthetic book's first ask is 10 bps above the last trade, rounded up to the tick
    slipped = run_backtest(config(slippage_bps=10), trades=data, strategy=strategy)
    assert [f.price for f in slipped.fills] == [D("101.11")]  # 101 x 1.001 = 101.101 -> 101.11


def test_equal_timestamps_still_wait_for_the_next_event() -> None:
    strategy = script({0: lambda s, t: s.ctx.sell(SYMBOL, D("0.2"))})
    data = trades((0, "100", "1", None), (0, "97", "1", None), (1, "105", "1", None))
    result = run_backtest(config(), trades=data, strategy=strategy)
    assert [(f.ts, f.price) for f in result.fills] == [(T0, D(97))]
    assert len(result.equity) == 2  # one point per timestamp


def test_market_order_walks_the_recorded_book_across_levels() -> None:
    strategy = script({0: lambda s, b: s.ctx.buy(SYMBOL, D("1.2"))})
    books = BookSeries.from_snapshots(
        [
            book(0, [("99", "1")], [("100", "5")]),  # decision: 1.2 would fill at 100 here
            book(1, [("99", "1")], [("100.5", "0.5"), ("101", "0.4"), ("103", "5")]),
        ]
    )
    result = run_backtest(config(), book=books, strategy=strategy)
    fills = [(f.price, f.quantity) for f in result.fills]
    assert fills == [(D("100.5"), D("0.5")), (D("101"), D("0.4")), (D("103"), D("0.3"))]
    notional = sum((f.price * f.quantity for f in result.fills), D(0))
    assert notional == D("121.55")
    assert notional / D("1.2") == D("121.55") / D("1.2")  # VWAP 101.2916…
    assert all(f.ts == T0 + timedelta(seconds=1) for f in result.fills)


def test_merge_order_is_by_time_then_book_trade_bar() -> None:
    from meltica.backtest import BarSeries
    from meltica.domain import Bar

    bars = BarSeries.from_bars(
        [
            Bar(exchange="binance", symbol=SYMBOL, timeframe="1m", ts=T0 - timedelta(minutes=1),
                open=D(1), high=D(1), low=D(1), close=D(1), volume=D(1)),
        ]
    )  # fmt: skip
    t = trades((0, "100", "1", None), (0, "101", "1", None))
    b = BookSeries.from_snapshots([book(0, [("99", "1")], [("100", "1")])])
    assert [(k, i) for _, k, i in merge_events(bars, t, b)] == [(BOOK, 0), (TRADE, 0), (TRADE, 1), (BAR, 0)]


def _write_depth(path: Path, rows: list[str]) -> Path:
    path.write_text("symbol,timestamp,first_update_id,last_update_id,side,update_type,price,qty,pu\n" + "\n".join(rows))
    return path


def test_binance_depth_csv_through_the_synchronizer(tmp_path: Path) -> None:
    snap = _write_depth(
        tmp_path / "snap.csv",
        [
            "BTCUSDT,1704067200000,100,100,b,snap,99.00,1.0,-1",
            "BTCUSDT,1704067200000,100,100,a,snap,100.00,1.0,-1",
            "BTCUSDT,1704067200000,100,100,a,snap,101.00,2.0,-1",
        ],
    )
    upd = _write_depth(
        tmp_path / "upd.csv",
        [
            "BTCUSDT,1704067199000,90,95,a,set,100.00,9.0,-1",  # before the snapshot: contained in it, dropped
            "BTCUSDT,1704067201000,98,103,a,set,100.00,0.4,-1",  # straddles 101: applied
            "BTCUSDT,1704067202000,104,104,a,set,100.50,0.1,-1",
            "BTCUSDT,1704067203000,200,201,a,set,100.00,0,-1",  # gap
        ],
    )
    series = BookSeries.from_binance_csv(snap, upd, exchange="binance", symbol=SYMBOL)
    assert [e.snapshot for e in series.events] == [True, False, False]
    assert (series.gaps, series.dropped) == (1, 2)  # the gap; the gap + the diff before any snapshot
    assert series.events[-1].book.asks == (
        BookLevel(price=D(100), quantity=D("0.4")),
        BookLevel(price=D("100.5"), quantity=D("0.1")),
        BookLevel(price=D(101), quantity=D(2)),
    )
    with pytest.raises(BookGapError):
        BookSeries.from_binance_csv(snap, upd, exchange="binance", symbol=SYMBOL, on_gap="raise")
    # a market buy of 1 decided on the snapshot walks the book after the first diff: 0.4 @ 100, 0.6 @ 101
    strategy = script({0: lambda s, b: s.ctx.buy(SYMBOL, D(1))})
    result = run_backtest(config(), book=series, strategy=strategy)
    assert [(f.price, f.quantity) for f in result.fills] == [(D(100), D("0.4")), (D(101), D("0.6"))]


def test_trade_files_csv_and_json(tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(
        "timestamp,price,qty,is_buyer_maker\n1704067201000,100.5,0.2,true\n1704067200000,100,0.1,false\n"
    )
    series = TradeSeries.from_file(csv_path, exchange="binance", symbol=SYMBOL)
    assert list(series.price) == [D(100), D("100.5")]  # sorted by time
    assert list(series.side) == [Side.BUY, Side.SELL]
    json_path = tmp_path / "t.json"
    json_path.write_text('[[1704067200000, "7", null, "sell", 0.5, 2.0, 1.0]]')
    j = TradeSeries.from_file(json_path, exchange="binance", symbol=SYMBOL)
    assert (j.ts[0], j.price[0], j.quantity[0], j.side[0], j.trade_id[0]) == (T0, D("0.5"), D("2.0"), Side.SELL, "7")
