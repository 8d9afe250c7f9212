"""Risk limits in the configuration: overrides per account, strategy and symbol, validated."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from meltica.config import load_settings
from meltica.config.settings import ENVIRONMENTS, RiskLimits
from meltica.errors import ConfigurationError
from meltica.risk import resolve_limits


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_packaged_environments_load_with_the_new_risk_keys(env: str) -> None:
    risk = load_settings(env).risk
    assert risk.max_drawdown_pct is not None and risk.max_net_exposure is not None
    assert risk.breach_action == "halt" and risk.daily_reset_utc == "00:00"
    assert risk.symbols["BTC/USDT"].max_order_quantity is not None


def test_every_level_applies_a_more_specific_one_only_tightens_and_each_names_its_source() -> None:
    limits = RiskLimits.model_validate(
        {
            "max_order_notional": 1000,
            "max_open_orders": 20,
            "max_position_notional": 5000,
            "max_position_notional_by_symbol": {"ETH/USDT": 2000},
            "strategy_loss_limit": 80,
            "breach_action": "reduce_only",
            "accounts": {"main": {"max_order_notional": 800, "max_gross_exposure": 9000, "breach_action": "halt"}},
            "strategies": {
                "mm": {"max_order_notional": 600, "max_open_orders": 5, "strategy_loss_limit": 50},
                "trend": {"max_order_notional": 900, "max_open_orders": 40, "strategy_loss_limit": 120},
            },
            "symbols": {
                "BTC/USDT": {"max_order_notional": 400, "max_order_quantity": "0.5", "max_position_notional": 9000}
            },
        }
    )
    btc = resolve_limits(limits, "main", "mm", "BTC/USDT")
    assert btc.max_order_notional is not None and btc.max_order_notional.value == Decimal(400)
    assert btc.max_order_notional.source == "risk.symbols.BTC/USDT.max_order_notional"
    # measured limits: every level's, each on its own scope; a looser symbol position limit does not apply
    assert [(lim.source, lim.scope) for lim in btc.max_open_orders] == [
        ("risk.max_open_orders", "account"),
        ("risk.strategies.mm.max_open_orders", "strategy"),
    ]
    assert [(lim.source, lim.value) for lim in btc.max_position_notional] == [
        ("risk.max_position_notional", Decimal(5000))
    ]
    assert btc.on_account("max_position_notional") == btc.max_position_notional[0]
    assert btc.orders_per_minute == () and btc.on_account("orders_per_minute") is None
    assert (
        btc.max_gross_exposure is not None and btc.max_gross_exposure.source == "risk.accounts.main.max_gross_exposure"
    )
    assert (
        btc.strategy_loss_limit is not None
        and btc.strategy_loss_limit.source == "risk.strategies.mm.strategy_loss_limit"
    )
    assert btc.breach_action == "halt" and btc.strategy_breach_action == "halt"
    eth = resolve_limits(limits, "main", "trend", "ETH/USDT")
    assert (
        eth.max_order_notional is not None and eth.max_order_notional.source == "risk.accounts.main.max_order_notional"
    )
    assert [(lim.value, lim.scope) for lim in eth.max_position_notional] == [(Decimal(2000), "account")]
    assert [lim.source for lim in eth.max_open_orders] == [
        "risk.max_open_orders",
        "risk.strategies.trend.max_open_orders",
    ]
    assert eth.strategy_loss_limit is not None and eth.strategy_loss_limit.source == "risk.strategy_loss_limit"
    other = resolve_limits(limits, "other", "arb", "SOL/USDT")
    assert other.max_order_notional is not None and other.max_order_notional.source == "risk.max_order_notional"
    assert other.breach_action == "reduce_only"
    assert limits.position_limit("ETH/USDT") == Decimal(2000)
    assert limits.position_limit("BTC/USDT") == Decimal(5000)  # the symbol's 9000 cannot loosen the default


def test_overrides_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "risk:\n  symbols:\n    BTC/USDT:\n      max_gross_exposure: 5\n")
    with pytest.raises(ConfigurationError) as err:
        load_settings(config_file=path)
    assert f"{path}: risk.symbols.BTC/USDT.max_gross_exposure: unknown setting (not part of the schema)" in str(
        err.value
    )

    path = write(tmp_path, "risk:\n  daily_reset_utc: '25:00'\n  max_drawdown_pct: 150\n  breach_action: panic\n")
    with pytest.raises(ConfigurationError) as err:
        load_settings(config_file=path)
    text = str(err.value)
    assert "risk.daily_reset_utc: '25:00' is not a UTC time of day as HH:MM" in text
    assert "risk.max_drawdown_pct: a percentage of the equity peak: must be below 100" in text
    assert "risk.breach_action:" in text

    path = write(tmp_path, "risk:\n  strategies:\n    mm:\n      max_order_quantity: -1\n")
    with pytest.raises(ConfigurationError) as err:
        load_settings(config_file=path)
    assert "risk.strategies.mm.max_order_quantity: must be > 0, got -1" in str(err.value)


def test_limits_for_an_unknown_account_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "accounts:\n  - {name: main, exchange: binance}\nrisk:\n  accounts:\n    mian: {max_gross_exposure: 5}\n",
    )
    with pytest.raises(ConfigurationError) as err:
        load_settings(config_file=path)
    assert f"{path}: risk.accounts.mian: no configured account is named 'mian' (accounts: main)" in str(err.value)


def test_environment_variables_reach_nested_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELTICA_RISK__MAX_DRAWDOWN_PCT", "7.5")
    settings = load_settings(
        config_file=write(tmp_path, "risk:\n  strategies:\n    market_making: {max_open_orders: 3}\n")
    )
    assert settings.risk.max_drawdown_pct == Decimal("7.5")
    assert settings.risk.strategies["market_making"].max_open_orders == 3


SCOPED = """
symbols: [BTC/USDT]
accounts:
  - {name: main, exchange: binance}
risk:
  max_order_notional: 1000
  symbols:
    %s: {max_order_quantity: 1}
  strategies:
    %s: {max_open_orders: 3}
live:
  instances:
    - {instance_id: momo-eth, strategy: momentum, account: main, symbols: [ETH/USDT], timeframe: 1m}
"""


def test_typos_under_risk_symbols_and_strategies_are_refused(tmp_path: Path) -> None:
    """An override for a symbol or strategy nothing trades is a typo that leaves the real one unprotected."""
    with pytest.raises(ConfigurationError) as info:
        load_settings(config_file=write(tmp_path, SCOPED % ("BTC/USTD", "momentun")))
    text = str(info.value)
    assert "risk.symbols.BTC/USTD: 'BTC/USTD' is not a configured symbol" in text
    assert "risk.strategies.momentun: no registered strategy or live instance is named 'momentun'" in text
    with pytest.raises(ConfigurationError, match=re.escape("risk.max_position_notional_by_symbol.XRP/USDT: ")):
        load_settings(
            config_file=write(
                tmp_path, "symbols: [BTC/USDT]\nrisk:\n  max_position_notional_by_symbol: {XRP/USDT: 5}\n"
            )
        )
    # configured symbols, symbols of live instances, registered strategies and instance ids are all known
    for symbol, strategy in (("BTC/USDT", "momentum"), ("ETH/USDT", "momo-eth")):
        settings = load_settings(config_file=write(tmp_path, SCOPED % (symbol, strategy)))
        assert settings.risk.symbols[symbol].max_order_quantity == 1
        assert settings.risk.strategies[strategy].max_open_orders == 3


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[2] / "meltica" / "config").glob("*/*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_configuration_files_load(path: Path) -> None:
    settings = load_settings(config_file=path)
    assert settings.risk.max_order_notional is not None
