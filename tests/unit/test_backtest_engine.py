"""Hand-checked scenarios of the backtest engine: release rule, fees, slippage, volume cap, gaps, risk."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any, ClassVar

import pytest

from meltica.backtest import BacktestConfig, BarSeries, default_instrument, run_backtest
from meltica.backtest.results import BacktestResult
from meltica.domain import Bar, Fill, Order, OrderIntent, OrderStatus, OrderType, Side
from meltica.errors import ConfigurationError
from meltica.risk import RiskConfig, RiskEngine
from meltica.strategies import Strategy, StrategyParams

SYMBOL = "BTC/USDT"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def bars(*ohlcv: tuple[str, str, str, str, str]) -> BarSeries:
    return BarSeries.from_bars(
        Bar(
            exchange="binance",
            symbol=SYMBOL,
            timeframe="1m",
            ts=T0 + timedelta(minutes=i),
            open=D(o),
            high=D(h),
            low=D(lo),
            close=D(c),
            volume=D(v),
        )
        for i, (o, h, lo, c, v) in enumerate(ohlcv)
    )


class ScriptParams(StrategyParams):
    pass


Action = Callable[["Script", Any], None]


class Script(Strategy[ScriptParams]):
    """Runs ``on_bar_actions[i]`` on bar i and ``on_fill_actions`` on each fill; records what it saw."""

    name: ClassVar[str] = "script"
    Params: ClassVar[type[ScriptParams]] = ScriptParams
    on_bar_actions: ClassVar[dict[int, Action]] = {}
    on_fill_action: ClassVar[Action | None] = None

    def __init__(self, params: ScriptParams, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.i = -1
        self.seen: list[tuple[str, Any]] = []

    def on_bar(self, bar: Bar) -> None:
        self.i += 1
        self.seen.append(("bar", bar.ts))
        action = self.on_bar_actions.get(self.i)
        if action is not None:
            action(self, bar)

    def on_fill(self, fill: Fill) -> None:
        self.seen.append(("fill", fill))
        if self.on_fill_action is not None:
            type(self).on_fill_action(self, fill)  # type: ignore[misc]

    def on_order(self, order: Order) -> None:
        self.seen.append(("order", order.status))


def script(actions: dict[int, Action], on_fill: Action | None = None) -> type[Script]:
    return type("S", (Script,), {"on_bar_actions": actions, "on_fill_action": on_fill})


def run(strategy: type[Script], series: BarSeries, **config: Any) -> BacktestResult:
    values: dict[str, Any] = {
        "strategy": "script",
        "symbol": SYMBOL,
        "maker_fee_bps": 0,
        "taker_fee_bps": 0,
        "initial_balances": {"USDT": D(10_000)},
        **config,
    }
    return run_backtest(BacktestConfig.model_validate(values), series, strategy=strategy)


def buy(qty: str) -> Action:
    return lambda s, bar: s.ctx.buy(SYMBOL, D(qty))


def test_a_decision_on_a_bars_close_fills_at_the_next_bars_open_never_inside_it() -> None:
    # Bar 0 closes at 100 and trades down to 90 inside; the decision on its close must not see any of it.
    series = bars(
        ("100", "101", "90", "100", "10"),
        ("105", "106", "104", "105", "10"),
        ("105", "105", "105", "105", "10"),
    )
    result = run(script({0: buy("1")}), series)
    assert len(result.fills) == 1
    fill = result.fills[0]
    assert fill.price == D(105)  # bar 1's open, not bar 0's close (100) nor its low (90)
    assert fill.ts == T0 + timedelta(minutes=1)  # bar 1's open time
    assert fill.ts >= T0 + timedelta(minutes=1)  # strictly after the deciding bar closed
    # Equity at bar 0's close is untouched; at bar 1's close: cash 10000 - 105, 1 BTC at 105.
    assert result.equity[0].equity == D(10_000)
    assert result.equity[1].cash == D(9_895)
    assert result.equity[1].equity == D(10_000)


def test_a_limit_decided_on_a_bar_cannot_fill_on_that_bars_own_path() -> None:
    # A buy limit at 95 decided on bar 0 (which traded down to 90): fills only on bar 2's dip to 94.
    series = bars(
        ("100", "101", "90", "100", "10"),
        ("100", "101", "96", "100", "10"),
        ("100", "101", "94", "100", "10"),
    )
    result = run(script({0: lambda s, bar: s.ctx.buy(SYMBOL, D(1), price=D(95))}), series)
    assert [(f.price, f.ts) for f in result.fills] == [(D(95), T0 + timedelta(minutes=3))]


def test_fees_and_slippage_are_charged_exactly_as_configured() -> None:
    # 10 bps slippage: buy at open 100 -> 100.10 (first synthetic ask, 10 bps up); sell at open 110 ->
    # 109.89. Taker fee 25 bps of the notional, in USDT: 0.25025 and 0.2747250.
    series = bars(
        ("100", "100", "100", "100", "10"),
        ("100", "100", "100", "100", "10"),
        ("110", "110", "110", "110", "10"),
        ("110", "110", "110", "110", "10"),
    )
    strategy = script({0: buy("1"), 1: lambda s, bar: s.ctx.sell(SYMBOL, D(1))})
    result = run(strategy, series, slippage_bps=10, taker_fee_bps=25, maker_fee_bps=5)
    buy_fill, sell_fill = result.fills
    assert (buy_fill.side, buy_fill.price, buy_fill.fee, buy_fill.fee_currency) == (
        Side.BUY,
        D("100.10"),
        D("0.250250"),
        "USDT",
    )
    assert (sell_fill.side, sell_fill.price, sell_fill.fee) == (Side.SELL, D("109.89"), D("0.274725"))
    expected = D(10_000) - D("100.10") - D("0.250250") + D("109.89") - D("0.274725")
    assert result.metrics.final_equity == expected
    assert result.metrics.fees == D("0.250250") + D("0.274725")
    assert result.round_trips[0].pnl == D("109.89") - D("100.10") - D("0.250250") - D("0.274725")


def test_a_market_order_fills_at_most_the_configured_share_of_the_bars_volume() -> None:
    # share 0.1 of bar 1's volume 50 = 5: a market buy of 8 gets 5 (walking 5 synthetic levels, 1 each),
    # the rest expires; no slippage, so the levels are 100.00, 100.01, ... 100.04.
    series = bars(
        ("100", "100", "100", "100", "50"),
        ("100", "100", "100", "100", "50"),
    )
    result = run(script({0: buy("8")}), series, bar_volume_share="0.1")
    assert sum(f.quantity for f in result.fills) == D(5)
    assert [f.price for f in result.fills] == [D("100.00"), D("100.01"), D("100.02"), D("100.03"), D("100.04")]
    (order,) = result.orders
    assert (order.status, order.filled_quantity) == ("expired", D(5))


def test_a_resting_limit_fills_at_most_the_configured_share_of_the_bars_volume() -> None:
    series = bars(
        ("100", "100", "100", "100", "50"),
        ("100", "100", "100", "100", "50"),
        ("100", "100", "90", "95", "50"),
    )
    result = run(script({0: lambda s, bar: s.ctx.buy(SYMBOL, D(8), price=D(98))}), series, bar_volume_share="0.1")
    assert [(f.price, f.quantity) for f in result.fills] == [(D(98), D(5))]
    assert (result.orders[0].status, result.orders[0].reason) == ("open_at_end", "partially_filled when the data ended")
    assert result.orders[0].filled_quantity == D(5)


def test_a_stop_the_market_gaps_through_fills_at_the_open_the_worse_price() -> None:
    # Long 1 from bar 1's open (100); a sell stop at 95 is placed on the fill (reaches the venue at bar 2's
    # open); bar 3 opens at 90, below the stop: it fills at 90, not at 95.
    series = bars(
        ("100", "100", "100", "100", "10"),
        ("100", "101", "99", "100", "10"),
        ("100", "101", "96", "100", "10"),
        ("90", "92", "88", "91", "10"),
    )

    def protect(s: Script, fill: Fill) -> None:
        if fill.side is Side.BUY:
            s.ctx.submit(symbol=SYMBOL, side=Side.SELL, type=OrderType.STOP_MARKET, quantity=D(1), trigger_price=D(95))

    result = run(script({0: buy("1")}, on_fill=protect), series)
    entry, stop = result.fills
    assert (entry.price, stop.side, stop.price) == (D(100), Side.SELL, D(90))
    # Fills on a bar's path are stamped when the bar is known: its close time.
    assert stop.ts == T0 + timedelta(minutes=4)


def test_a_stop_inside_a_bar_fills_at_its_stop_price_before_the_favourable_extreme() -> None:
    # Bar 3 opens at 100, nearer extreme is the low 94 (through the stop at 95), then the high 110.
    series = bars(
        ("100", "100", "100", "100", "10"),
        ("100", "101", "99", "100", "10"),
        ("100", "101", "96", "100", "10"),
        ("100", "110", "94", "105", "10"),
    )

    def protect(s: Script, fill: Fill) -> None:
        if fill.side is Side.BUY:
            s.ctx.submit(symbol=SYMBOL, side=Side.SELL, type=OrderType.STOP_MARKET, quantity=D(1), trigger_price=D(95))

    result = run(script({0: buy("1")}, on_fill=protect), series)
    assert [f.price for f in result.fills] == [D(100), D(95)]


def test_latency_below_a_bar_delays_the_order_to_the_open_after_its_arrival() -> None:
    series = bars(
        ("100", "100", "100", "100", "10"),
        ("101", "101", "101", "101", "10"),
        ("102", "102", "102", "102", "10"),
    )
    result = run(script({0: buy("1")}, None), series, latency_ms=30_000)
    assert [(f.price, f.ts) for f in result.fills] == [(D(102), T0 + timedelta(minutes=2))]


def test_an_order_still_held_when_the_data_ends_is_never_sent() -> None:
    series = bars(("100", "100", "100", "100", "10"), ("100", "100", "100", "100", "10"))
    result = run(script({1: buy("1")}), series)
    assert result.fills == ()
    assert [(o.status, o.reason) for o in result.orders] == [("cancelled", "end of data: never sent")]


def test_risk_max_order_notional_rejects_in_the_backtest_exactly_as_live() -> None:
    series = bars(
        ("100", "100", "100", "100", "10"),
        ("100", "100", "100", "100", "10"),
        ("100", "100", "100", "100", "10"),
    )
    limits = RiskConfig(max_order_notional=D(150))
    result = run(script({0: buy("2"), 1: buy("1")}), series, risk=limits)
    rejected, accepted = result.orders
    assert rejected.status == "rejected" and accepted.status == "filled"
    assert [f.quantity for f in result.fills] == [D(1)]
    # The same intent through a live RiskEngine (same limits, same last price) gives the same decision.
    instrument = default_instrument("binance", SYMBOL)
    live = RiskEngine(limits, clock=lambda: T0 + timedelta(minutes=1), instruments={("binance", SYMBOL): instrument})
    live.on_market("binance", SYMBOL, D(100))
    intent = OrderIntent(
        intent_id="script:1",
        account="backtest",
        strategy="script",
        exchange="binance",
        symbol=SYMBOL,
        side=Side.BUY,
        type=OrderType.MARKET,
        quantity=D(2),
        created_at=T0 + timedelta(minutes=1),
    )
    decision = live.check(intent)
    assert not decision.approved
    assert rejected.reason == f"risk: {decision.rule}: {decision.reason}"
    assert rejected.client_order_id == intent.client_order_id


def test_strategy_hears_of_orders_and_fills_after_its_callback_and_position_includes_fills() -> None:
    positions: list[D] = []
    series = bars(*[("100", "100", "100", "100", "10")] * 3)
    strategy = script({0: buy("1"), 2: lambda s, bar: positions.append(s.ctx.position(SYMBOL).quantity)})
    result = run(strategy, series)
    assert positions == [D(1)]
    assert result.orders[0].status == "filled"


def test_configuration_errors_name_the_field() -> None:
    with pytest.raises(ConfigurationError) as err:
        BacktestConfig.create(strategy="momentum", slippage_bps=-1)
    assert err.value.field == "slippage_bps"
    with pytest.raises(ConfigurationError) as err:
        BacktestConfig.create(strategy="momentum", params={"fast": 50, "slow": 10})
    assert err.value.field is not None and err.value.field.startswith("params")
    with pytest.raises(ConfigurationError) as err:
        BacktestConfig.create(strategy="no-such-strategy")
    assert err.value.field == "strategy"


def test_equity_curve_has_one_point_per_bar_at_the_bar_close() -> None:
    series = bars(*[("100", "100", "100", "100", "10")] * 4)
    result = run(script({}), series)
    assert [p.ts for p in result.equity] == [T0 + timedelta(minutes=i + 1) for i in range(4)]
    assert {p.equity for p in result.equity} == {D(10_000)}
    assert result.orders == () and OrderStatus.FILLED  # nothing traded


def test_strategy_symbol_defaults_to_the_backtest_symbol_and_a_mismatch_is_refused() -> None:
    from meltica.backtest.config import BacktestConfig
    from meltica.errors import ConfigurationError

    bound = BacktestConfig.create(strategy="momentum", params={}, symbol="BTC/USDT:USDT")
    assert bound.params["symbol"] == "BTC/USDT:USDT"
    with pytest.raises(ConfigurationError, match="would never trade") as err:
        BacktestConfig.create(strategy="momentum", params={"symbol": "ETH/USDT"}, symbol="BTC/USDT:USDT")
    assert err.value.field == "params.symbol"
