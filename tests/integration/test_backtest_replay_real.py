"""Replays of the recorded real trades and depth files: the runs complete and their results are consistent."""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path
from typing import Any, ClassVar

from meltica.backtest import BacktestConfig, run_backtest
from meltica.domain import LiquiditySide, OrderBookSnapshot, Trade
from meltica.marketdata.series import BookSeries, TradeSeries
from meltica.strategies import Strategy, StrategyParams

DATA = Path(__file__).resolve().parents[1] / "data"
BINANCE = DATA / "binance"


class P(StrategyParams):
    size: D = D("0.001")
    every: int = 50
    offset_bps: D = D(2)


class PingPong(Strategy[P]):
    """Every ``every`` trades: flat -> market buy; long -> cancel and rest a sell a little above the last
    trade and a buy a little below it (both fill only from later prints through them)."""

    name: ClassVar[str] = "ping-pong"
    Params: ClassVar[type[P]] = P

    def __init__(self, params: P, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.n = 0

    def on_trade(self, trade: Trade) -> None:
        self.n += 1
        if self.n % self.params.every:
            return
        ctx = self.ctx
        ctx.cancel_all(trade.symbol)
        size = self.params.size
        if ctx.position(trade.symbol).quantity <= 0:
            ctx.buy(trade.symbol, size)
        else:
            k = self.params.offset_bps / D(10_000)
            ctx.sell(trade.symbol, size, price=trade.price * (1 + k))
            ctx.buy(trade.symbol, size, price=trade.price * (1 - k))

    def on_book(self, book: OrderBookSnapshot) -> None:
        if self.n == 0 and book.bids:
            self.n = 1
            self.ctx.sell(book.symbol, D(25))


def _check(result: Any, traded: D | None) -> None:
    ts = [p.ts for p in result.equity]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    filled = sum((f.quantity for f in result.fills), D(0))
    if traded is not None:
        assert filled <= traded
    assert all(result.equity[0].ts <= f.ts <= result.equity[-1].ts for f in result.fills)
    assert all(o.filled_quantity <= o.quantity for o in result.orders)
    by_order = sum((o.filled_quantity for o in result.orders), D(0))
    assert by_order == filled


def test_real_btcusdt_trades() -> None:
    series = TradeSeries.from_file(BINANCE / "btcusdt-trades.parquet", exchange="binance", symbol="BTC/USDT")
    assert len(series) == 2001
    config = BacktestConfig.model_validate(
        {"strategy": "ping-pong", "symbol": "BTC/USDT", "initial_balances": {"USDT": D(10_000)}}
    )
    result = run_backtest(config, trades=series, strategy=PingPong)
    _check(result, series.total_quantity)
    assert result.fills
    makers = [f for f in result.fills if f.liquidity is LiquiditySide.MAKER]
    by_ts: dict[Any, list[D]] = {}
    for t, p in zip(series.ts, series.price, strict=True):
        by_ts.setdefault(t, []).append(p)
    for f in makers:  # a recorded print went through the resting price at that instant
        prices = by_ts[f.ts]
        assert any(p > f.price for p in prices) if f.side.value == "sell" else any(p < f.price for p in prices)
    takers = [f for f in result.fills if f.liquidity is LiquiditySide.TAKER]
    for f in takers:  # market orders fill at the print of the event they reached the venue on
        assert f.price in by_ts[f.ts]
    final = result.equity[-1]
    assert final.equity == final.cash + final.position_value
    # deterministic
    again = run_backtest(config, trades=series, strategy=PingPong)
    assert [(f.ts, f.price, f.quantity) for f in again.fills] == [(f.ts, f.price, f.quantity) for f in result.fills]


def test_real_xrpeth_trades() -> None:
    path = DATA / "freqtrade" / "XRP_ETH-trades.json.gz"
    series = TradeSeries.from_file(path, exchange="binance", symbol="XRP/ETH")
    assert len(series) == 12_477
    config = BacktestConfig.model_validate({"strategy": "ping-pong", "symbol": "XRP/ETH", "params": {"size": "10"}})
    result = run_backtest(config, trades=series, strategy=PingPong)
    _check(result, series.total_quantity)
    assert result.fills


def test_real_depth_files_walk_the_book() -> None:
    book = BookSeries.from_binance_csv(
        BINANCE / "btcusdt-depth-snap.csv",
        BINANCE / "btcusdt-depth-update.csv",
        exchange="binance",
        symbol="BTC/USDT",
        on_gap="apply",  # the recorded diff does not continue the snapshot's update id
    )
    assert len(book) == 2 and book.gaps == 1
    config = BacktestConfig.model_validate(
        {"strategy": "ping-pong", "symbol": "BTC/USDT", "initial_balances": {"BTC": D(30), "USDT": D(0)}}
    )
    result = run_backtest(config, book=book, strategy=PingPong)
    _check(result, None)
    bids = book.events[-1].book.bids
    expected: list[tuple[D, D]] = []
    left = D(25)
    for level in bids:
        take = min(left, level.quantity)
        expected.append((level.price, take))
        left -= take
        if not left:
            break
    assert [(f.price, f.quantity) for f in result.fills] == expected
    assert len(expected) > 1  # the sell walked more than one level
    strict = BookSeries.from_binance_csv(
        BINANCE / "btcusdt-depth-snap.csv", BINANCE / "btcusdt-depth-update.csv", exchange="binance", symbol="BTC/USDT"
    )
    assert (len(strict), strict.gaps, strict.dropped) == (1, 1, 1)
