"""Backtest corners: an impossible order is rejected and reported, never fatal (also after the last bar);
parameters that can only fail are refused up front; the fill model and fills say when fills happen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any, ClassVar

import pytest

from meltica.backtest import BacktestConfig, BarSeries, run_backtest
from meltica.domain import Bar, Order, OrderStatus, OrderType, Side
from meltica.errors import ConfigurationError
from meltica.strategies.base import Strategy, StrategyParams

SYMBOL = "BTC/USDT"
T0 = datetime(2024, 3, 1, tzinfo=UTC)


def flat_bars(n: int) -> BarSeries:
    return BarSeries.from_bars(
        Bar(
            exchange="binance",
            symbol=SYMBOL,
            timeframe="1m",
            ts=T0 + timedelta(minutes=i),
            open=D(100),
            high=D(101),
            low=D(99),
            close=D(100),
            volume=D(50),
        )
        for i in range(n)
    )


class EntryThenStop(Strategy[StrategyParams]):
    """Buys on every bar; when an entry ends it asks for a stop at ``stop_price`` (negative: impossible) and,
    for good measure, a valid resting limit. On the last bar the entry never reaches the venue: the end of
    the data cancels it, and the reaction to that cancel must not end the run either."""

    name: ClassVar[str] = "entry_then_stop"
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    stop_price: ClassVar[D] = D(-5)

    def __init__(self, params: StrategyParams, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.entries: set[str] = set()
        self.seen: list[Order] = []

    def on_bar(self, bar: Bar) -> None:
        self.entries.add(self.ctx.buy(SYMBOL, D(1)))

    def on_order(self, order: Order) -> None:
        self.seen.append(order)
        if order.client_order_id in self.entries and order.status.is_terminal:
            self.entries.discard(order.client_order_id)
            self.ctx.submit(
                symbol=SYMBOL, side=Side.SELL, type=OrderType.STOP_MARKET, quantity=D(1), trigger_price=self.stop_price
            )
            self.ctx.buy(SYMBOL, D(1), price=D(50))


def run(n: int) -> Any:
    config = BacktestConfig.model_validate(
        {"strategy": "entry_then_stop", "symbol": SYMBOL, "initial_balances": {"USDT": D(100_000)}}
    )
    return run_backtest(config, flat_bars(n), strategy=EntryThenStop)


def test_an_impossible_stop_is_rejected_with_time_field_and_value_and_the_run_goes_on() -> None:
    result = run(4)
    assert len(result.equity) == 4
    invalid = [o for o in result.orders if o.status == "rejected"]
    assert invalid and all(o.reason is not None and o.reason.startswith("INVALID_INTENT") for o in invalid)
    assert result.rejections["INVALID_INTENT"] == len(invalid)
    first = result.invalid_orders[0]
    assert first["field"] == "trigger_price"
    assert D(str(first["value"])) == D(-5)
    # decided when the first entry filled, at the second bar's open
    assert first["ts"] == T0 + timedelta(minutes=1)
    assert any("impossible order" in w for w in result.warnings)


def test_the_reaction_to_the_end_of_data_cancel_is_rejected_or_cancelled_never_left_pending() -> None:
    result = run(1)  # the only entry is decided on the last bar: cancelled by the end of the data
    statuses = {o.order_type: o.status for o in result.orders}
    assert statuses["market"] == "cancelled"
    assert statuses["stop_market"] == "rejected"  # the reaction to that cancel: impossible, rejected
    assert statuses["limit"] == "cancelled"  # asked for after the data ended: never sent
    assert all(o.status != OrderStatus.PENDING_SUBMIT.value for o in result.orders)


def test_a_quantity_below_the_lot_size_is_refused_up_front_naming_the_parameter() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BacktestConfig.create(strategy="momentum", symbol=SYMBOL, params={"quantity": "0.000001"})
    assert caught.value.field == "params.quantity"


def test_a_long_grid_whose_step_reaches_the_centre_is_refused_up_front() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BacktestConfig.create(strategy="grid", symbol=SYMBOL, params={"center": "100", "step": "100", "levels": 2})
    assert "step" in str(caught.value)


def test_a_latency_below_one_bar_says_it_moves_fills_a_bar_later() -> None:
    config = BacktestConfig.create(strategy="momentum", symbol=SYMBOL, latency_ms=1000)
    description = config.fill_model_info(bar=timedelta(minutes=1))["description"]
    assert "whole bar later" in description
    assert "whole bar later" not in BacktestConfig.create(strategy="momentum").fill_model_description(
        timedelta(minutes=1)
    )


class BuyProtectBuy(Strategy[StrategyParams]):
    """Buys on bar 0 and bar 2; protects the first entry with a stop at 95 (bar 2's path goes through it)."""

    name: ClassVar[str] = "buy_protect_buy"
    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, params: StrategyParams, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.i = -1
        self.protected = False

    def on_bar(self, bar: Bar) -> None:
        self.i += 1
        if self.i in (0, 2):
            self.ctx.buy(SYMBOL, D(1))

    def on_fill(self, fill: Any) -> None:
        if not self.protected:
            self.protected = True
            self.ctx.submit(
                symbol=SYMBOL, side=Side.SELL, type=OrderType.STOP_MARKET, quantity=D(1), trigger_price=D(95)
            )


def test_a_next_open_fill_and_an_intrabar_stop_at_the_same_timestamp_say_where_they_happened(tmp_path: Any) -> None:
    rows = [
        ("100", "101", "99", "100"),
        ("100", "101", "99", "100"),
        ("100", "101", "90", "96"),
        ("96", "97", "95.5", "96"),
    ]
    series = BarSeries.from_bars(
        Bar(exchange="binance", symbol=SYMBOL, timeframe="1m", ts=T0 + timedelta(minutes=i), open=D(o), high=D(h),
            low=D(lo), close=D(c), volume=D(50))
        for i, (o, h, lo, c) in enumerate(rows)
    )  # fmt: skip
    config = BacktestConfig.model_validate(
        {"strategy": "buy_protect_buy", "symbol": SYMBOL, "initial_balances": {"USDT": D(100_000)}}
    )
    result = run_backtest(config, series, strategy=BuyProtectBuy)
    got = [(f.ts - T0, result.fill_phases[f.fill_id], f.side.value) for f in result.fills]
    minute = timedelta(minutes=1)
    assert got == [(minute, "bar_open", "buy"), (3 * minute, "bar_path", "sell"), (3 * minute, "bar_open", "buy")]
    result.write_files(tmp_path)
    header, *lines = (tmp_path / "fills.csv").read_text().splitlines()
    assert header.startswith("ts,at,") and [line.split(",")[1] for line in lines] == [
        "bar_open",
        "bar_path",
        "bar_open",
    ]
