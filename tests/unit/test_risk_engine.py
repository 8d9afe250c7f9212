"""RiskEngine pre- and post-trade checks: at the limit passes, just above is refused, the reason names both."""

from __future__ import annotations

import itertools
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from meltica.config.settings import RiskLimits
from meltica.domain import Fill, Instrument, OrderIntent, OrderType, Side
from meltica.errors import RiskRejectedError
from meltica.portfolio import Portfolio
from meltica.risk import (
    InMemoryKillSwitchStore,
    InMemoryRecorder,
    InMemoryRiskStateStore,
    KillSwitch,
    KillSwitchMode,
    RiskEngine,
)
from tests.kit import ManualClock, OutageRecorder

D = Decimal
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count()


def btc(**kw: Any) -> Instrument:
    base = {"exchange": "binance", "symbol": "BTC/USDT", "base": "BTC", "quote": "USDT"}
    return Instrument(**{**base, "tick_size": "0.01", "step_size": "0.001", "min_notional": "10", **kw})


def eth() -> Instrument:
    return Instrument(
        exchange="binance", symbol="ETH/USDT", base="ETH", quote="USDT", tick_size="0.01", step_size="0.001"
    )


def intent(
    qty: str | Decimal = "0.01",
    price: str | None = "20000",
    side: Side = Side.BUY,
    *,
    symbol: str = "BTC/USDT",
    account: str = "main",
    strategy: str = "mm",
    **kw: Any,
) -> OrderIntent:
    kind = kw.pop("type", OrderType.LIMIT if price is not None else OrderType.MARKET)
    return OrderIntent(
        intent_id=f"i-{next(_ids)}",
        account=account,
        strategy=strategy,
        exchange="binance",
        symbol=symbol,
        side=side,
        type=kind,
        quantity=D(qty),
        price=None if price is None else D(price),
        created_at=T0,
        **kw,
    )


def make(
    portfolio: Portfolio | None = None, clock: ManualClock | None = None, **limits: Any
) -> tuple[RiskEngine, ManualClock, InMemoryRecorder]:
    clock = clock or ManualClock(T0)
    recorder = InMemoryRecorder()
    engine = RiskEngine(
        RiskLimits.model_validate(limits),
        portfolio,
        clock=clock,
        instruments={("binance", "BTC/USDT"): btc(), ("binance", "ETH/USDT"): eth()},
        kill_switch=KillSwitch(InMemoryKillSwitchStore(), clock=clock),
        recorder=recorder,
    )
    engine.on_market("binance", "BTC/USDT", D(20000))
    engine.on_market("binance", "ETH/USDT", D(1000))
    return engine, clock, recorder


def fill_of(order: OrderIntent, qty: str | Decimal | None = None, price: str | None = None, n: int = 0) -> Fill:
    return Fill(
        fill_id=f"{order.intent_id}-f{n}",
        client_order_id=order.client_order_id,
        exchange=order.exchange,
        symbol=order.symbol,
        side=order.side,
        price=D(price) if price else (order.price or D(20000)),
        quantity=D(qty) if qty is not None else order.quantity,
        ts=T0,
    )


def assert_rejected(decision: Any, rule: str, *fragments: str) -> None:
    assert not decision.approved, decision
    assert decision.rule == rule
    for fragment in fragments:
        assert fragment in decision.reason, decision.reason


# --- pre-trade, one check at a time -------------------------------------------------------------


def test_max_order_quantity_at_limit_passes_above_is_refused_naming_the_symbol_override() -> None:
    engine, _, _ = make(symbols={"BTC/USDT": {"max_order_quantity": "0.05"}})
    assert engine.check(intent("0.05")).approved
    assert_rejected(
        engine.check(intent("0.051")),
        "max_order_quantity",
        "order quantity 0.051",
        "max_order_quantity 0.05",
        "risk.symbols.BTC/USDT.max_order_quantity",
    )


def test_max_order_notional() -> None:
    engine, _, _ = make(max_order_notional=1000)
    assert engine.check(intent("0.05")).approved  # 0.05 × 20000 = 1000
    decision = engine.check(intent("0.051"))
    assert_rejected(
        decision, "max_order_notional", "order notional 1020", "max_order_notional 1000", "(risk.max_order_notional)"
    )
    assert decision.details == {"value": "1020.000", "limit": "1000", "source": "risk.max_order_notional"}


def test_market_order_notional_is_valued_at_the_mid() -> None:
    engine, _, _ = make(max_order_notional=1000)
    engine.on_market("binance", "BTC/USDT", D(20000), bid=D(19990), ask=D(20010))
    assert engine.check(intent("0.05", None)).approved
    assert_rejected(engine.check(intent("0.051", None)), "max_order_notional", "1020")


def test_market_order_without_any_price_is_refused() -> None:
    engine, _, _ = make(max_order_notional=1000)
    assert_rejected(engine.check(intent("1", None, symbol="SOL/USDT")), "instrument", "no instrument")
    engine._instruments[("binance", "XRP/USDT")] = btc(symbol="XRP/USDT", min_notional=None)
    assert_rejected(engine.check(intent("1", None, symbol="XRP/USDT")), "reference_price", "no last trade or mid")


def test_price_band_against_mid_and_last() -> None:
    engine, _, _ = make(price_band_bps=100)
    assert engine.check(intent("0.01", "20200")).approved  # exactly 100 bps from last 20000
    assert_rejected(
        engine.check(intent("0.01", "20200.01")), "price_band_bps", "from the last 20000", "price_band_bps 100"
    )
    engine.on_market("binance", "BTC/USDT", D(20000), bid=D(20100), ask=D(20300))  # mid 20200
    assert engine.check(intent("0.01", "20402")).approved  # 100 bps above the mid
    assert_rejected(engine.check(intent("0.01", "19997.99")), "price_band_bps", "from the mid 20200")


def test_price_band_without_reference_is_refused() -> None:
    engine, _, _ = make(price_band_bps=100)
    engine._instruments[("binance", "XRP/USDT")] = btc(symbol="XRP/USDT")
    assert_rejected(engine.check(intent("1", "20", symbol="XRP/USDT")), "price_band_bps", "no last trade or mid")


def test_max_open_orders_counts_approved_until_closed() -> None:
    engine, _, _ = make(max_open_orders=2)
    first, second = intent(), intent()
    assert engine.check(first).approved
    assert engine.check(second).approved
    assert_rejected(
        engine.check(intent()), "max_open_orders", "2 orders already open for account main", "max_open_orders 2"
    )
    engine.on_order_closed(first.client_order_id)
    assert engine.check(intent()).approved


def test_max_open_orders_of_a_strategy_counts_only_that_strategy() -> None:
    engine, _, _ = make(max_open_orders=10, strategies={"mm": {"max_open_orders": 1}})
    assert engine.check(intent(strategy="mm")).approved
    assert_rejected(
        engine.check(intent(strategy="mm")), "max_open_orders", "strategy mm", "risk.strategies.mm.max_open_orders"
    )
    assert engine.check(intent(strategy="trend")).approved


def test_order_rate_sliding_window_on_the_simulated_clock() -> None:
    engine, clock, _ = make(orders_per_minute=3)
    for _ in range(3):
        assert engine.check(intent()).approved
        clock.advance(seconds=10)  # approvals at 0 s, 10 s, 20 s
    assert_rejected(
        engine.check(intent()), "orders_per_minute", "3 orders approved in the last 60 s", "orders_per_minute 3"
    )
    clock.now = T0 + timedelta(seconds=59, microseconds=999_999)
    assert not engine.check(intent()).approved  # the first is still inside the window
    clock.now = T0 + timedelta(seconds=60)
    assert engine.check(intent()).approved  # the first has left it
    assert not engine.check(intent()).approved


def test_rejections_do_not_count_towards_the_rate() -> None:
    engine, _, _ = make(orders_per_minute=1, max_order_quantity=1)
    assert not engine.check(intent("2")).approved
    assert engine.check(intent()).approved


def test_instrument_precision_and_min_notional() -> None:
    engine, _, _ = make()
    assert_rejected(engine.check(intent("0.0105")), "instrument", "not a multiple of step_size 0.001")
    assert_rejected(engine.check(intent("0.01", "20000.005")), "instrument", "not a multiple of tick_size 0.01")
    assert engine.check(intent("0.001", "10000")).approved  # notional 10 = min_notional
    assert_rejected(engine.check(intent("0.001", "9999.99")), "instrument", "below min_notional 10")
    assert_rejected(engine.check(intent("0.0005", None)), "instrument", "step_size")
    engine.on_market("binance", "BTC/USDT", D(9000))
    assert_rejected(
        engine.check(intent("0.001", None)),
        "instrument",
        "notional 9.000 at the reference price 9000 is below min_notional 10",
    )


def test_max_position_notional_counts_open_orders_as_filled() -> None:
    engine, _, _ = make(max_position_notional=1000)
    first = intent("0.03")
    assert engine.check(first).approved
    assert engine.check(intent("0.02")).approved  # 0.05 × 20000 = 1000: at the limit
    assert_rejected(
        engine.check(intent("0.001")),
        "max_position_notional",
        "worst-case position 0.051",
        "max_position_notional 1000",
    )
    # a sell does not grow the long side: it passes (and its worst case, -0.05 short... no position yet)
    assert engine.check(intent("0.05", side=Side.SELL)).approved
    assert_rejected(engine.check(intent("0.001", side=Side.SELL)), "max_position_notional", "-0.051")
    engine.on_fill(fill_of(first), account="main", strategy="mm")  # filled: still counted, now as position
    assert engine.worst_case_position("main", "binance", "BTC/USDT") == (D("0.03"), D("0.05"), D("-0.02"))
    assert not engine.check(intent("0.001")).approved
    engine.on_order_closed(first.client_order_id)  # closing a filled order releases nothing more
    assert not engine.check(intent("0.001")).approved


def test_position_limit_per_strategy_is_measured_on_the_strategy() -> None:
    engine, _, _ = make(max_position_notional=5000, strategies={"mm": {"max_position_notional": 400}})
    assert engine.check(intent("0.02", strategy="mm")).approved
    assert_rejected(
        engine.check(intent("0.001", strategy="mm")), "max_position_notional", "strategy mm", "risk.strategies.mm"
    )
    assert engine.check(intent("0.2", strategy="trend")).approved  # account: 0.22 × 20000 = 4400


def test_gross_and_net_exposure_across_symbols_and_strategies() -> None:
    engine, _, _ = make(max_gross_exposure=3000, max_net_exposure=1000)
    assert engine.check(intent("0.05", strategy="a")).approved  # +1000 BTC
    assert_rejected(
        engine.check(intent("0.001", strategy="b")), "max_net_exposure", "would be 1020", "max_net_exposure 1000"
    )
    sell = intent("1", "1000", Side.SELL, symbol="ETH/USDT", strategy="b")
    assert engine.check(sell).approved
    # worst case: the ETH sell may be cancelled, so it does not offset the BTC buy yet
    assert not engine.check(intent("0.001", strategy="c")).approved
    engine.on_fill(fill_of(sell), account="main", strategy="b")  # −1000 ETH held: net 0
    assert engine.check(intent("0.05", strategy="c")).approved  # gross 3000, net 1000
    assert_rejected(
        engine.check(intent("0.001", strategy="c")), "max_gross_exposure", "would be 3020", "max_gross_exposure 3000"
    )
    assert engine.exposure("main") == (D(3000), D(1000))


def test_exposure_limits_come_from_the_account_override() -> None:
    engine, _, _ = make(max_gross_exposure=100_000, accounts={"small": {"max_gross_exposure": 200}})
    assert_rejected(
        engine.check(intent("0.011", account="small")), "max_gross_exposure", "risk.accounts.small.max_gross_exposure"
    )
    assert engine.check(intent("0.011", account="main")).approved


# --- every level's limit holds: a more specific level only tightens ------------------------------


def test_an_account_position_limit_holds_when_a_strategy_sets_a_larger_one() -> None:
    engine, _, _ = make(
        accounts={"main": {"max_position_notional": 3000}}, strategies={"mm": {"max_position_notional": 5000}}
    )
    assert engine.check(intent("0.1", strategy="mm")).approved  # mm 2000, account 2000
    assert engine.check(intent("0.05", strategy="trend")).approved  # account 3000: at its limit
    assert_rejected(
        engine.check(intent("0.001", strategy="mm")),  # mm would be 2020 (under its 5000), the account 3020
        "max_position_notional",
        "(account main) would be worth 3020",
        "max_position_notional 3000 (risk.accounts.main.max_position_notional)",
    )
    assert engine.worst_case_position("main", "binance", "BTC/USDT") == (D(0), D("0.15"), D(0))
    # the strategy's own limit still holds on the strategy
    engine, _, _ = make(max_position_notional=5000, strategies={"mm": {"max_position_notional": 400}})
    assert engine.check(intent("0.02", strategy="mm")).approved
    assert_rejected(
        engine.check(intent("0.001", strategy="mm")), "max_position_notional", "(strategy mm)", "risk.strategies.mm"
    )


def test_the_default_position_limit_holds_on_the_account_whatever_the_strategy_and_symbol_set() -> None:
    engine, _, _ = make(
        max_position_notional=1000,
        strategies={"mm": {"max_position_notional": 9000}},
        symbols={"BTC/USDT": {"max_position_notional": 8000}},
        max_position_notional_by_symbol={"BTC/USDT": 7000},
    )
    assert engine.check(intent("0.05", strategy="mm")).approved  # 1000: at the default
    assert_rejected(
        engine.check(intent("0.001", strategy="mm")),
        "max_position_notional",
        "would be worth 1020",
        "(risk.max_position_notional)",
    )


def test_a_symbol_position_limit_tighter_than_the_account_binds_on_the_account() -> None:
    engine, _, _ = make(max_position_notional=5000, symbols={"BTC/USDT": {"max_position_notional": 1000}})
    assert engine.check(intent("0.03", strategy="mm")).approved
    assert engine.check(intent("0.02", strategy="trend")).approved  # the account's BTC: 1000
    assert_rejected(
        engine.check(intent("0.001", strategy="arb")),
        "max_position_notional",
        "(account main)",
        "risk.symbols.BTC/USDT.max_position_notional",
    )


def test_an_account_open_order_limit_holds_when_a_strategy_sets_a_larger_one() -> None:
    engine, _, _ = make(accounts={"main": {"max_open_orders": 2}}, strategies={"mm": {"max_open_orders": 10}})
    assert engine.check(intent(strategy="mm")).approved
    assert engine.check(intent(strategy="trend")).approved
    assert_rejected(
        engine.check(intent(strategy="mm")),
        "max_open_orders",
        "2 orders already open for account main",
        "risk.accounts.main.max_open_orders",
    )
    assert engine.open_order_count() == 2


def test_a_symbol_open_order_limit_counts_the_accounts_orders_in_that_symbol_on_top_of_the_account() -> None:
    engine, _, _ = make(max_open_orders=3, symbols={"BTC/USDT": {"max_open_orders": 1}})
    assert engine.check(intent(strategy="mm")).approved
    assert_rejected(
        engine.check(intent(strategy="trend")),
        "max_open_orders",
        "1 orders already open for BTC/USDT in account main",
        "risk.symbols.BTC/USDT.max_open_orders",
    )
    assert engine.check(intent("1", "1000", symbol="ETH/USDT")).approved
    assert engine.check(intent("1", "1000", symbol="ETH/USDT")).approved
    assert_rejected(
        engine.check(intent("1", "1000", symbol="ETH/USDT")), "max_open_orders", "account main", "risk.max_open_orders"
    )


def test_an_account_order_rate_holds_when_a_strategy_sets_a_larger_one() -> None:
    engine, clock, _ = make(orders_per_minute=2, strategies={"mm": {"orders_per_minute": 100}})
    assert engine.check(intent(strategy="mm")).approved
    assert engine.check(intent(strategy="trend")).approved
    assert_rejected(
        engine.check(intent(strategy="mm")),
        "orders_per_minute",
        "2 orders approved in the last 60 s for account main",
        "(risk.orders_per_minute)",
    )
    clock.advance(seconds=60)
    assert engine.check(intent(strategy="mm")).approved


def test_per_order_limits_take_the_tightest_level() -> None:
    engine, _, _ = make(
        max_order_quantity="0.05",
        accounts={"main": {"max_order_notional": 500}},
        strategies={"mm": {"max_order_quantity": 1, "price_band_bps": 10}},
        symbols={"BTC/USDT": {"max_order_quantity": 2, "max_order_notional": 5000, "price_band_bps": 1000}},
    )
    assert engine.check(intent("0.02", "20000")).approved
    assert_rejected(engine.check(intent("0.051", "20000")), "max_order_quantity", "(risk.max_order_quantity)")
    assert_rejected(
        engine.check(intent("0.03", "20000")), "max_order_notional", "risk.accounts.main.max_order_notional"
    )
    assert_rejected(engine.check(intent("0.01", "20030")), "price_band_bps", "risk.strategies.mm.price_band_bps")
    assert engine.check(intent("0.01", "20030", strategy="trend")).approved  # its band: the symbol's 1000


def test_reduce_only_intent_must_reduce_the_position() -> None:
    engine, _, _ = make()
    assert_rejected(engine.check(intent("0.01", side=Side.SELL, reduce_only=True)), "reduce_only", "position 0")
    buy = intent("0.02")
    engine.check(buy)
    engine.on_fill(fill_of(buy), account="main", strategy="mm")
    assert engine.check(intent("0.015", side=Side.SELL, reduce_only=True)).approved
    # with 0.015 already on its way out, only 0.005 more reduces
    assert_rejected(engine.check(intent("0.006", side=Side.SELL, reduce_only=True)), "reduce_only", "open sells 0.015")
    assert engine.check(intent("0.005", side=Side.SELL, reduce_only=True)).approved
    assert_rejected(engine.check(intent("0.01", reduce_only=True)), "reduce_only", "buy 0.01 would not reduce")


def test_kill_switch_halt_blocks_everything_and_reduce_only_lets_reductions_pass() -> None:
    engine, _, _ = make()
    buy = intent("0.02")
    engine.check(buy)
    engine.on_fill(fill_of(buy), account="main", strategy="mm")
    engine.kill_switch.engage("halt", "test", "tester")
    assert_rejected(engine.check(intent("0.01", side=Side.SELL)), "kill_switch", "halt (global)")
    engine.kill_switch.engage("reduce_only", "calmer", "tester")
    assert engine.check(intent("0.01", side=Side.SELL)).approved
    assert_rejected(engine.check(intent("0.01")), "kill_switch", "reduce_only (global)")
    engine.kill_switch.release("tester", "done")
    assert engine.check(intent("0.01")).approved


def test_kill_switch_scopes_account_and_strategy() -> None:
    engine, _, _ = make()
    engine.kill_switch.engage("halt", "strategy misbehaves", "tester", scope="strategy:mm")
    assert_rejected(engine.check(intent(strategy="mm")), "kill_switch", "strategy:mm")
    assert engine.check(intent(strategy="trend")).approved
    engine.kill_switch.engage("halt", "account", "tester", scope="account:other")
    assert not engine.check(intent(account="other", strategy="trend")).approved
    assert engine.check(intent(account="main", strategy="trend")).approved


def test_duplicate_intent_while_open_is_not_reserved_twice() -> None:
    engine, _, _ = make(max_open_orders=5)
    order = intent()
    assert engine.check(order).approved
    again = engine.check(order)
    assert again.approved and again.details["duplicate"] is True
    assert engine.open_order_count() == 1


def test_every_decision_is_recorded_with_its_reason_and_rejection_raises_terminal() -> None:
    engine, _, recorder = make(max_order_quantity=1)
    ok, bad = engine.check(intent()), engine.check(intent("2"))
    assert recorder.decisions == [ok, bad]
    assert ok.reason == "all checks passed" and ok.as_row()["decision"] == "approved"
    row = bad.as_row()
    assert (row["decision"], row["rule"], row["account"], row["symbol"]) == (
        "rejected",
        "max_order_quantity",
        "main",
        "BTC/USDT",
    )
    ok.raise_if_rejected()
    with pytest.raises(RiskRejectedError) as err:
        bad.raise_if_rejected()
    assert err.value.reason == "max_order_quantity"


def fixed_scenario_decisions() -> list[tuple[bool, str | None, str | None]]:
    """Twelve intents against rate, size and open-order limits: compared across processes with different
    hash seeds in ``test_determinism_across_processes.py``."""
    global _ids
    _ids = itertools.count()
    engine, clock, _ = make(max_order_notional=500, max_position_notional=800, orders_per_minute=4, max_open_orders=3)
    out = []
    for n in range(12):
        clock.advance(seconds=7)
        d = engine.check(intent(str(D("0.01") * (n % 4 + 1)), side=Side.BUY if n % 3 else Side.SELL))
        out.append((d.approved, d.rule, d.reason))
        if n % 2:
            engine.on_order_closed(f"missing-{n}")
    return out


# --- post-trade ----------------------------------------------------------------------------------


def loss_setup(**limits: Any) -> tuple[RiskEngine, Portfolio, ManualClock, InMemoryRecorder]:
    clock = ManualClock(T0)
    portfolio = Portfolio(clock=clock)
    engine, _, recorder = make(portfolio, clock, **limits)
    return engine, portfolio, clock, recorder


def buy_and_fill(engine: RiskEngine, portfolio: Portfolio, qty: str, price: str, strategy: str = "mm") -> list[Any]:
    order = intent(qty, price, strategy=strategy)
    assert engine.check(order).approved
    fill = fill_of(order)
    portfolio.apply_fill(fill, account="main", strategy=strategy)
    return engine.on_fill(fill, account="main", strategy=strategy)


def test_daily_loss_breach_trips_the_account_kill_switch_and_is_recorded() -> None:
    engine, portfolio, _, recorder = loss_setup(daily_loss_limit=100, breach_action="reduce_only")
    assert buy_and_fill(engine, portfolio, "0.1", "20000") == []
    portfolio.mark("binance", "BTC/USDT", D(19000))  # unrealized −100: at the limit
    assert engine.on_market("binance", "BTC/USDT", D(19000)) == []
    portfolio.mark("binance", "BTC/USDT", D("18999.9"))
    (breach,) = engine.on_market("binance", "BTC/USDT", D("18999.9"))
    assert breach.rule == "daily_loss_limit" and breach.scope == "account:main"
    assert "lost 100.01" in breach.reason and "daily_loss_limit 100" in breach.reason
    assert recorder.breaches == [breach]
    state = engine.kill_switch.state_of("account:main")
    assert state.mode is KillSwitchMode.REDUCE_ONLY and state.actor == "risk-engine"
    assert engine.on_market("binance", "BTC/USDT", D("18999")) == []  # reported once
    assert not engine.check(intent("0.01", "19000")).approved
    assert engine.check(intent("0.01", "19000", Side.SELL)).approved


def test_daily_reset_at_the_configured_utc_time() -> None:
    engine, portfolio, clock, _ = loss_setup(daily_loss_limit=100, daily_reset_utc="13:30")
    buy_and_fill(engine, portfolio, "0.1", "20000")
    portfolio.mark("binance", "BTC/USDT", D(19500))
    assert engine.on_market("binance", "BTC/USDT", D(19500)) == []  # −50 today
    clock.now = T0.replace(hour=13, minute=30)  # the reset: −50 is yesterday's
    assert engine.evaluate("main", "mm") == []  # any call after the reset time rolls the day
    portfolio.mark("binance", "BTC/USDT", D(18600))  # −90 since the reset
    assert engine.on_market("binance", "BTC/USDT", D(18600)) == []
    portfolio.mark("binance", "BTC/USDT", D(18400))  # −110 since the reset
    (breach,) = engine.on_market("binance", "BTC/USDT", D(18400))
    assert breach.rule == "daily_loss_limit" and "since 2024-03-01T13:30:00+00:00" in breach.reason
    assert engine.day_start_for(T0.replace(hour=13, minute=29)) == datetime(2024, 2, 29, 13, 30, tzinfo=UTC)


def test_drawdown_breaker_trips_the_kill_switch_and_the_peak_is_persisted() -> None:
    from meltica.domain import Balance

    state = InMemoryRiskStateStore()
    clock = ManualClock(T0)
    portfolio = Portfolio(clock=clock)
    portfolio.set_balances("main", "binance", {"USDT": Balance(asset="USDT", free=D(10_000))})
    engine = RiskEngine(
        RiskLimits(max_drawdown_pct=D(10)),
        portfolio,
        clock=clock,
        instruments={("binance", "BTC/USDT"): btc()},
        state_store=state,
    )
    engine.on_market("binance", "BTC/USDT", D(20000))
    buy_and_fill(engine, portfolio, "0.5", "20000")  # 10 000 USDT → 0.5 BTC
    portfolio.mark("binance", "BTC/USDT", D(22000))  # equity 11 000: the new peak
    assert engine.on_market("binance", "BTC/USDT", D(22000)) == []
    assert state.get("equity_peak:main") is not None
    assert D(state.values["equity_peak:main"]["peak"]) == D(11000)
    portfolio.mark("binance", "BTC/USDT", D(19800))  # equity 9 900: exactly 10 % below
    assert engine.on_market("binance", "BTC/USDT", D(19800)) == []
    portfolio.mark("binance", "BTC/USDT", D(19790))
    (breach,) = engine.on_market("binance", "BTC/USDT", D(19790))
    assert breach.rule == "max_drawdown_pct" and "below its peak 11000" in breach.reason
    assert engine.kill_switch.state_of("account:main").mode is KillSwitchMode.HALT
    # a new engine on the same state store remembers the peak
    again = RiskEngine(RiskLimits(max_drawdown_pct=D(10)), portfolio, clock=clock, state_store=state)
    assert again.evaluate("main")[0].rule == "max_drawdown_pct"


def test_strategy_loss_limit_trips_the_strategy_scope() -> None:
    engine, portfolio, _, _ = loss_setup(
        strategy_loss_limit=1000, strategies={"mm": {"strategy_loss_limit": 50, "breach_action": "halt"}}
    )
    buy_and_fill(engine, portfolio, "0.1", "20000", strategy="mm")
    buy_and_fill(engine, portfolio, "0.1", "20000", strategy="trend")
    portfolio.mark("binance", "BTC/USDT", D(19400))  # each lost 60
    breaches = engine.on_market("binance", "BTC/USDT", D(19400))
    assert [(b.rule, b.scope) for b in breaches] == [("strategy_loss_limit", "strategy:mm")]
    assert engine.kill_switch.state_of("strategy:mm").mode is KillSwitchMode.HALT
    assert engine.check(intent("0.01", "19400", strategy="trend")).approved
    assert not engine.check(intent("0.01", "19400", strategy="mm")).approved


def test_a_released_breach_trips_again_while_the_limit_is_still_broken() -> None:
    engine, portfolio, _, _ = loss_setup(daily_loss_limit=10)
    buy_and_fill(engine, portfolio, "0.1", "20000")
    portfolio.mark("binance", "BTC/USDT", D(19000))
    assert len(engine.on_market("binance", "BTC/USDT", D(19000))) == 1
    engine.kill_switch.release("ops", "looked at it", scope="account:main")
    assert len(engine.on_market("binance", "BTC/USDT", D(19000))) == 1
    assert engine.kill_switch.state_of("account:main").mode is KillSwitchMode.HALT


def test_restart_seeds_positions_from_the_portfolio() -> None:
    engine, portfolio, clock, _ = loss_setup(max_position_notional=1000)
    buy_and_fill(engine, portfolio, "0.04", "20000")
    fresh, _, _ = make(portfolio, clock, max_position_notional=1000)
    assert fresh.worst_case_position("main", "binance", "BTC/USDT") == (D("0.04"), D("0.04"), D("0.04"))
    assert fresh.check(intent("0.01")).approved
    assert not fresh.check(intent("0.001")).approved


# --- from surviving mutants (make mutation): the risk path's own failures, made to happen -------------------


def test_a_breach_the_recorder_cannot_store_halts_its_scope_and_is_stored_once_it_can(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, portfolio, _, _ = loss_setup(daily_loss_limit=100, breach_action="reduce_only")
    recorder = OutageRecorder()
    engine.recorder = recorder
    assert buy_and_fill(engine, portfolio, "0.1", "20000") == []
    recorder.down = True
    portfolio.mark("binance", "BTC/USDT", D(18000))
    with caplog.at_level(logging.WARNING, logger="meltica.risk.engine"):
        (breach,) = engine.on_market("binance", "BTC/USDT", D(18000))
        # reduce_only was configured, but a breach that cannot be recorded halts its scope
        state = engine.kill_switch.state_of("account:main")
        assert state.mode is KillSwitchMode.HALT
        assert state.reason == f"{breach.reason} (could not be recorded: ConnectionError)"
        assert engine.unrecorded == [breach]
        assert engine.retry_pending() == 1  # still down: it waits
        recorder.down = False
        assert engine.retry_pending() == 0
    assert recorder.breaches == [breach]
    assert engine.unrecorded == []
    assert engine.kill_switch.state_of("account:main").mode is KillSwitchMode.HALT  # the halt stays
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("risk breach ")]
    assert said == [
        ("CRITICAL", f"risk breach could not be recorded (database unavailable); it is retried: {breach.reason}"),
        ("CRITICAL", f"risk breach still not recorded (database unavailable), its halt holds: {breach.reason}"),
        ("WARNING", f"risk breach recorded after a failed write: {breach.reason}"),
    ]


class BrokenLedger(Portfolio):
    """A portfolio whose PnL cannot be computed (a corrupted ledger): the post-trade check fails for real."""

    broken = False

    def pnl(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            raise RuntimeError("ledger corrupted")
        return super().pnl(*args, **kwargs)


def test_a_post_trade_check_that_fails_halts_the_fills_account_says_why_and_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(T0)
    portfolio = BrokenLedger(clock=clock)
    engine, _, _ = make(portfolio, clock, daily_loss_limit=100)
    order = intent("0.1", "20000")
    assert engine.check(order).approved
    fill = fill_of(order)
    portfolio.apply_fill(fill, account="main", strategy="mm")
    portfolio.broken = True
    with caplog.at_level(logging.CRITICAL, logger="meltica.risk.engine"), pytest.raises(RuntimeError):
        engine.on_fill(fill, account="main", strategy="mm")
    what = f"post-trade check of fill {fill.fill_id}"
    reason = f"risk engine failure in {what}: RuntimeError: ledger corrupted"
    state = engine.kill_switch.state_of("account:main")
    assert (state.mode, state.reason, state.actor) == (KillSwitchMode.HALT, reason, "risk-engine")
    assert engine.kill_switch.state_of("global").mode is KillSwitchMode.OFF  # the fill's account, not all
    assert f"{reason}; halting account:main" in [r.getMessage() for r in caplog.records]
    assert not engine.check(intent("0.01", "20000")).approved
