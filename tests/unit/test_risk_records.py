"""What the risk engine records and reports, exactly: the details of a denial and of a decision, a breach's row,
the valuation of markets no price was heard for yet, reservations released and moved, the day's strategy
anchors, the state a restart restores. Written from the mutants of ``make mutation`` that survived."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meltica.config.settings import RiskLimits
from meltica.domain import Side
from meltica.portfolio import Portfolio
from meltica.risk import (
    InMemoryKillSwitchStore,
    InMemoryRecorder,
    InMemoryRiskStateStore,
    KillSwitch,
    KillSwitchMode,
    RiskEngine,
)
from tests.kit import ManualClock
from tests.unit.test_risk_engine import (
    T0,
    BrokenLedger,
    btc,
    buy_and_fill,
    eth,
    fill_of,
    intent,
    loss_setup,
    make,
)

D = Decimal


def bare(**limits: Any) -> tuple[RiskEngine, ManualClock]:
    """An engine that has heard no market data at all."""
    clock = ManualClock(T0)
    engine = RiskEngine(
        RiskLimits.model_validate(limits),
        clock=clock,
        instruments={("binance", "BTC/USDT"): btc(), ("binance", "ETH/USDT"): eth()},
        kill_switch=KillSwitch(InMemoryKillSwitchStore(), clock=clock),
    )
    return engine, clock


# --- what a denial and a decision carry -------------------------------------------------------------------


def test_a_denial_carries_the_measured_value_the_limit_and_its_source() -> None:
    engine, _, _ = make(symbols={"BTC/USDT": {"max_order_quantity": "0.05"}})
    refused = engine.check(intent("0.051"))
    assert refused.details == {
        "value": "0.051",
        "limit": "0.05",
        "source": "risk.symbols.BTC/USDT.max_order_quantity",
    }
    assert (refused.account, refused.strategy, refused.exchange, refused.symbol) == (
        "main",
        "mm",
        "binance",
        "BTC/USDT",
    )
    ok = engine.check(intent("0.05", symbol="ETH/USDT", price="1000", strategy="arb"))
    assert ok.approved and (ok.account, ok.strategy, ok.exchange, ok.symbol) == ("main", "arb", "binance", "ETH/USDT")


def test_the_order_rate_denial_counts_the_order_it_refuses() -> None:
    engine, _clock, _ = make(orders_per_minute=2)
    assert engine.check(intent()).approved and engine.check(intent()).approved
    refused = engine.check(intent())
    assert refused.rule == "orders_per_minute"
    assert refused.reason.startswith("2 orders approved in the last 60 s for account main; this would be 3:")
    assert refused.details["value"] == "3"


def test_the_price_band_denial_says_how_far_the_price_is_and_names_the_limit_without_a_reference() -> None:
    engine, _, _ = make(price_band_bps=100)
    refused = engine.check(intent("0.01", "20300"))
    assert refused.reason.startswith("limit price 20300 is 150.00 bps from the last 20000:")
    assert refused.details["value"] == "150.00"
    blind, _ = bare(price_band_bps=100)
    no_ref = blind.check(intent("0.01", "20300"))
    assert no_ref.rule == "price_band_bps"
    assert no_ref.details == {"limit": "100", "source": "risk.price_band_bps"}


def test_a_market_order_above_the_instruments_max_notional_at_the_reference_says_above() -> None:
    clock = ManualClock(T0)
    engine = RiskEngine(
        RiskLimits(),
        clock=clock,
        instruments={("binance", "BTC/USDT"): btc(max_notional="1000")},
        kill_switch=KillSwitch(InMemoryKillSwitchStore(), clock=clock),
    )
    engine.on_market("binance", "BTC/USDT", D(20000))
    refused = engine.check(intent("0.1", None))
    assert refused.rule == "instrument"
    assert refused.reason == (
        "binance:BTC/USDT: notional 2000.0 at the reference price 20000 is above max_notional 1000"
    )
    assert refused.details == {"limit": "max_notional"}


def test_order_notional_counts_the_contract_size() -> None:
    clock = ManualClock(T0)
    engine = RiskEngine(
        RiskLimits(max_order_notional=D(1000)),
        clock=clock,
        instruments={("binance", "BTC/USDT"): btc(contract_size="10")},
        kill_switch=KillSwitch(InMemoryKillSwitchStore(), clock=clock),
    )
    engine.on_market("binance", "BTC/USDT", D(20000))
    assert engine.check(intent("0.005", "20000")).approved  # 0.005 x 20000 x 10 = 1000
    refused = engine.check(intent("0.006", "20000"))
    assert refused.rule == "max_order_notional" and refused.details["value"] == "1200.000"


def test_a_replayed_intent_gets_the_same_answer_naming_its_order_and_a_closed_one_is_checked_anew() -> None:
    engine, _, _ = make()
    first = intent()
    assert engine.check(first).approved
    again = engine.check(first)
    assert again.approved and again.details == {"duplicate": True, "client_order_id": first.client_order_id}
    engine.on_order_closed(first.client_order_id)
    fresh = engine.check(first)
    assert fresh.approved and fresh.details == {}  # a new reservation, not the closed one
    assert engine.open_order_count() == 1


def test_a_reservation_moved_to_the_order_it_amends_releases_the_replacements_intent() -> None:
    engine, _, _ = make()
    original, replacement = intent(), intent()
    assert engine.check(original).approved
    assert engine.check(replacement).approved
    engine.on_order_closed(original.client_order_id)
    engine.rekey(replacement.client_order_id, original.client_order_id, original.intent_id)
    assert engine.is_reserved(original.client_order_id) and not engine.is_reserved(replacement.client_order_id)
    again = engine.check(replacement)  # its reservation now belongs to the original
    assert again.approved and again.details == {}


# --- reduce-only: the scope that is engaged, and a buy that would flip a short ---------------------------


def test_an_account_reduce_only_measures_the_accounts_position_not_the_strategys() -> None:
    engine, _, _ = make()
    long = intent("0.1", "20000", strategy="a")
    assert engine.check(long).approved
    engine.on_fill(fill_of(long), account="main", strategy="a")
    engine.kill_switch.engage("reduce_only", "drill", "ops", scope="account:main")
    # strategy b holds nothing, but its sell reduces the account's long: it passes
    assert engine.check(intent("0.05", "20000", Side.SELL, strategy="b")).approved
    grows = engine.check(intent("0.01", "20000", Side.BUY, strategy="b"))
    assert grows.rule == "kill_switch"
    assert grows.details == {"scope": "account:main", "mode": "reduce_only"}


def test_a_reduce_only_buy_that_would_flip_a_short_is_refused() -> None:
    engine, _, _ = make()
    short = intent("0.01", "20000", Side.SELL)
    assert engine.check(short).approved
    engine.on_fill(fill_of(short), account="main", strategy="mm")
    assert engine.check(intent("0.01", "20000", reduce_only=True)).approved  # back to flat: reduces
    engine.on_order_closed(f"missing-{short.intent_id}")
    flips = engine.check(intent("0.011", "20000", reduce_only=True))  # with the open 0.01 it would be long
    assert flips.rule == "reduce_only"


# --- markets no price was heard for -------------------------------------------------------------------------


def test_a_first_order_in_an_unpriced_market_values_it_at_its_own_price() -> None:
    engine, _ = bare()
    assert engine.check(intent("0.1", "20000")).approved
    assert engine.exposure("main") == (D("2000.0"), D("2000.0"))
    assert engine.export_market("binance", "BTC/USDT") == {
        "last": None,
        "bid": None,
        "ask": None,
        "ref": None,
        "ref_kind": "last",
        "px": "20000",
    }


def test_an_order_found_open_on_start_in_an_unpriced_market_is_valued_at_its_price() -> None:
    engine, _ = bare()
    recovered = intent("0.1", "1000", symbol="ETH/USDT")
    engine.on_order_open(recovered.client_order_id, recovered)
    assert engine.exposure("main") == (D("100.0"), D("100.0"))


def test_a_fill_of_an_order_the_engine_never_approved_moves_the_position_at_the_fill_price() -> None:
    engine, _ = bare()
    stray = intent("0.1", "20000")  # never checked: an order placed before this process started
    engine.on_fill(fill_of(stray), account="main", strategy="mm")
    assert engine.worst_case_position("main", "binance", "BTC/USDT", "mm") == (D("0.1"), D("0.1"), D("0.1"))
    assert engine.exposure("main") == (D("2000.0"), D("2000.0"))


def test_market_prices_round_trip_and_a_first_snapshot_restores_only_the_valuation() -> None:
    engine, _, _ = make()
    engine.on_market("binance", "BTC/USDT", D(20000), bid=D(19990), ask=D(20010))
    exported = engine.export_market("binance", "BTC/USDT")
    assert exported == {
        "last": "20000",
        "bid": "19990",
        "ask": "20010",
        "ref": "20000",
        "ref_kind": "mid",
        "px": "20000",
    }
    assert exported is not None
    fresh, _ = bare()
    fresh.import_market("binance", "BTC/USDT", exported, newer=False, first=True)
    assert fresh.export_market("binance", "BTC/USDT") == {
        **exported,
        "last": None,
        "bid": None,
        "ask": None,
        "ref": None,
        "ref_kind": "last",
    }
    unpriced = {**exported, "px": None}
    other, _ = bare()
    other.import_market("binance", "BTC/USDT", unpriced, newer=True, first=True)
    assert other.export_market("binance", "BTC/USDT") == {**unpriced, "ref_kind": "mid"}


# --- post-trade: breaches, anchors, the peak -----------------------------------------------------------------


def test_a_breach_reports_what_it_measured_when_and_stores_as_one_row() -> None:
    engine, portfolio, clock, recorder = loss_setup(
        strategies={"mm": {"strategy_loss_limit": 50, "breach_action": "halt"}}
    )
    buy_and_fill(engine, portfolio, "0.1", "20000")
    clock.advance(seconds=30)
    portfolio.mark("binance", "BTC/USDT", D(19400))
    (breach,) = engine.on_market("binance", "BTC/USDT", D(19400))
    assert (breach.value, breach.limit, breach.ts) == (D("60.0"), D(50), clock())
    assert (breach.account, breach.strategy) == ("main", "mm")
    assert recorder.breaches == [breach]
    assert breach.as_row() == {
        "ts": clock(),
        "account": "main",
        "strategy": "mm",
        "symbol": None,
        "intent_id": None,
        "decision": "breach",
        "rule": "strategy_loss_limit",
        "reason": breach.reason,
        "details": {
            "scope": "strategy:mm",
            "value": D("60.0"),
            "limit": D(50),
            "source": "risk.strategies.mm.strategy_loss_limit",
            "action": "halt",
        },
        "actor": "risk-engine",
    }


def test_the_daily_reset_anchors_each_strategys_loss_at_the_reset() -> None:
    engine, portfolio, clock, _ = loss_setup(strategy_loss_limit=50, daily_reset_utc="13:30")
    buy_and_fill(engine, portfolio, "0.1", "20000")
    clock.now = T0.replace(hour=13, minute=30)
    assert engine.check(intent("0.001", "20000")).approved  # the first call after the reset rolls the day
    portfolio.mark("binance", "BTC/USDT", D(19400))  # −60 since the reset, before any evaluation
    (breach,) = engine.on_market("binance", "BTC/USDT", D(19400))
    assert (breach.rule, breach.scope) == ("strategy_loss_limit", "strategy:mm")


def test_a_post_trade_check_failing_on_a_market_move_halts_the_holding_account_only() -> None:
    clock = ManualClock(T0)
    portfolio = BrokenLedger(clock=clock)
    engine, _, _ = make(portfolio, clock, daily_loss_limit=100)
    buy_and_fill(engine, portfolio, "0.1", "20000")
    portfolio.broken = True
    with pytest.raises(RuntimeError, match="ledger corrupted"):
        engine.on_market("binance", "BTC/USDT", D(19000))
    assert engine.kill_switch.state_of("account:main").mode is KillSwitchMode.HALT
    assert engine.kill_switch.state_of("global").mode is KillSwitchMode.OFF


def test_the_equity_peak_is_exported_and_restored() -> None:
    from meltica.domain import Balance  # lazy: as in test_risk_engine's drawdown test

    clock = ManualClock(T0)
    portfolio = Portfolio(clock=clock)
    portfolio.set_balances("main", "binance", {"USDT": Balance(asset="USDT", free=D(10_000))})
    limits = RiskLimits(max_drawdown_pct=D(10))
    instruments = {("binance", "BTC/USDT"): btc()}
    engine = RiskEngine(limits, portfolio, clock=clock, instruments=instruments, state_store=InMemoryRiskStateStore())
    engine.on_market("binance", "BTC/USDT", D(20000))
    buy_and_fill(engine, portfolio, "0.5", "20000")
    portfolio.mark("binance", "BTC/USDT", D(22000))
    assert engine.on_market("binance", "BTC/USDT", D(22000)) == []
    state, _markets = engine.export_state("main")
    assert state["peak"] == "11000.0"
    fresh = RiskEngine(limits, portfolio, clock=clock, instruments=instruments, state_store=InMemoryRiskStateStore())
    fresh.import_state("main", state)
    assert fresh.export_state("main")[0]["peak"] == "11000.0"
    portfolio.mark("binance", "BTC/USDT", D(19790))  # more than 10 % below the restored peak
    assert [b.rule for b in fresh.evaluate("main")] == ["max_drawdown_pct"]


def test_resolved_limits_name_the_level_each_limit_comes_from() -> None:
    engine, _, _ = make(max_order_quantity="1", strategies={"mm": {"max_order_quantity": "0.5"}})
    limits = engine.resolved_limits("main", "mm", "binance", "BTC/USDT")
    assert limits.max_order_quantity is not None
    assert (limits.max_order_quantity.value, limits.max_order_quantity.source) == (
        D("0.5"),
        "risk.strategies.mm.max_order_quantity",
    )
    other = engine.resolved_limits("main", "other", "binance", "BTC/USDT").max_order_quantity
    assert other is not None and (other.value, other.source) == (D(1), "risk.max_order_quantity")


def test_a_strategys_own_order_rate_binds_on_that_strategy() -> None:
    engine, clock, _ = make(strategies={"mm": {"orders_per_minute": 2}})
    assert engine.check(intent(strategy="mm")).approved and engine.check(intent(strategy="mm")).approved
    refused = engine.check(intent(strategy="mm"))
    assert refused.rule == "orders_per_minute"
    assert refused.reason.startswith("2 orders approved in the last 60 s for strategy mm in account main")
    assert engine.check(intent(strategy="trend")).approved  # another strategy's orders are not counted
    clock.advance(seconds=60)
    assert engine.check(intent(strategy="mm")).approved


def test_a_max_price_below_one_still_bounds_the_price() -> None:
    clock = ManualClock(T0)
    cheap = btc(symbol="DOGE/USDT", base="DOGE", tick_size="0.0001", step_size="1", min_notional=None)
    engine = RiskEngine(
        RiskLimits(),
        clock=clock,
        instruments={("binance", "DOGE/USDT"): cheap.model_copy(update={"max_price": D("0.5")})},
        kill_switch=KillSwitch(InMemoryKillSwitchStore(), clock=clock),
    )
    assert engine.check(intent("100", "0.5", symbol="DOGE/USDT")).approved
    refused = engine.check(intent("100", "0.6", symbol="DOGE/USDT"))
    assert refused.rule == "instrument" and refused.details == {"limit": "max_price"}


def test_a_restart_seeds_each_strategys_position_once() -> None:
    engine, portfolio, clock, _ = loss_setup()
    buy_and_fill(engine, portfolio, "0.04", "20000", strategy="mm")
    buy_and_fill(engine, portfolio, "0.01", "20000", strategy="trend")
    fresh, _, _ = make(portfolio, clock)
    assert fresh.worst_case_position("main", "binance", "BTC/USDT") == (D("0.05"), D("0.05"), D("0.05"))
    assert fresh.worst_case_position("main", "binance", "BTC/USDT", "trend") == (D("0.01"), D("0.01"), D("0.01"))


def test_a_symbols_position_limit_is_measured_on_the_account() -> None:
    engine, _, _ = make(symbols={"BTC/USDT": {"max_position_notional": 500}})
    limits = engine.resolved_limits("main", "mm", "binance", "BTC/USDT")
    on_account = limits.on_account("max_position_notional")
    assert on_account is not None
    assert (on_account.value, on_account.source) == (D(500), "risk.symbols.BTC/USDT.max_position_notional")


def test_a_breach_halt_whose_listener_fails_stands_and_the_breach_is_recorded() -> None:
    """A kill-switch listener that fails (the switch logs it and raises after the change stands) must not make
    the engine think the halt failed: it used to log "could not be engaged", loosen the halt to reduce_only in
    the kill switch's record, and raise instead of recording the breach."""
    clock = ManualClock(T0)
    portfolio = Portfolio(clock=clock)
    changes = InMemoryKillSwitchStore()
    engine = RiskEngine(
        RiskLimits(daily_loss_limit=D(100), breach_action="halt"),
        portfolio,
        clock=clock,
        instruments={("binance", "BTC/USDT"): btc()},
        kill_switch=KillSwitch(changes, clock=clock),
        recorder=(recorder := InMemoryRecorder()),
    )
    engine.on_market("binance", "BTC/USDT", D(20000))
    buy_and_fill(engine, portfolio, "0.1", "20000")

    def broken_listener(change: Any) -> None:
        raise RuntimeError("listener broke")

    engine.kill_switch.subscribe(broken_listener)
    portfolio.mark("binance", "BTC/USDT", D(18000))
    (breach,) = engine.on_market("binance", "BTC/USDT", D(18000))
    assert recorder.breaches == [breach]
    assert [(c.scope, c.current.mode) for c in changes.changes] == [("account:main", KillSwitchMode.HALT)]
    assert engine.kill_switch.state_of("account:main").reason == breach.reason
