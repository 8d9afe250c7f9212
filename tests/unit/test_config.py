from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest

from meltica.config import ENVIRONMENTS, environment_file, load_settings, mask_url, masked_settings
from meltica.errors import ConfigurationError

LIVE_PROD = """
environment: prod
trading_mode: live
accounts:
  - name: main
    exchange: binance
    api_key: env:BINANCE_API_KEY
    api_secret: encrypted:gAAAAABexample
risk:
  max_order_notional: 1000
  max_gross_exposure: 10000
  daily_loss_limit: 500
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("MELTICA_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | None = None, env: str | None = None) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        load_settings(env=env, config_file=path)
    return info.value


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_packaged_environment_files_are_valid(env: str) -> None:
    assert environment_file(env).exists()
    settings = load_settings(env)
    assert settings.environment == env


def test_selection_by_meltica_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().environment == "dev"
    monkeypatch.setenv("MELTICA_ENV", "paper")
    assert load_settings().trading_mode == "paper"
    monkeypatch.setenv("MELTICA_ENV", "qa")
    err = error_of()
    assert err.field == "environment"
    assert "MELTICA_ENV: environment: unknown environment 'qa'" in str(err)


def test_env_vars_override_file_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "risk:\n  max_order_notional: 1000\n  daily_loss_limit: 50\nlog_level: info\n")
    monkeypatch.setenv("MELTICA_RISK__MAX_ORDER_NOTIONAL", "250.5")
    monkeypatch.setenv("MELTICA_TRADING_MODE", "paper")
    monkeypatch.setenv("MELTICA_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("MELTICA_SYMBOLS", '["ETH/USDT"]')
    settings = load_settings(config_file=path)
    assert settings.risk.max_order_notional == Decimal("250.5")
    assert settings.risk.daily_loss_limit == Decimal(50)  # untouched sibling survives the merge
    assert settings.trading_mode == "paper"
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.symbols == ["ETH/USDT"]
    assert settings.log_level == "INFO"


def test_bad_type_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "risk:\n  max_order_notional: lots\n")
    err = error_of(path)
    assert (err.source, err.field) == (str(path), "risk.max_order_notional")
    assert str(err) == f"{path}: risk.max_order_notional: 'lots' is not a decimal number"


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MELTICA_RISK__MAX_OPEN_ORDERS", "-3")
    err = error_of(write(tmp_path, "{}"))
    assert err.source == "environment variable MELTICA_RISK__MAX_OPEN_ORDERS"
    assert err.field == "risk.max_open_orders"
    assert "greater than or equal to 0" in str(err)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "risk:\n  max_order_notionl: 5\naccounts:\n  - {name: a, exchange: binance, sanbox: true}\n")
    err = error_of(path)
    lines = str(err).splitlines()
    assert f"{path}: risk.max_order_notionl: unknown setting (not part of the schema)" in lines
    assert f"{path}: accounts[0].sanbox: unknown setting (not part of the schema)" in lines


def test_yaml_syntax_error_has_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "environment: dev\nrisk:\n  max_order_notional: [1, 2\nsymbols: []\n")
    err = error_of(path)
    assert str(err).startswith(f"{path}: line ")
    assert "YAML syntax error" in str(err)
    assert err.details["line"] in (3, 4)


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "- a\n- b\n"))
    assert "expected a mapping of settings, got list" in str(err)
    missing = tmp_path / "absent.yaml"
    assert str(error_of(missing)).startswith(f"{missing}: cannot read configuration file")


def test_environment_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "environment: prod\n")
    err = error_of(path, env="dev")
    assert err.field == "environment"
    monkeypatch.setenv("MELTICA_ENVIRONMENT", "dev")
    err = error_of(write(tmp_path, LIVE_PROD, "p.yaml"))
    assert err.source == "environment variable MELTICA_ENVIRONMENT"


def test_prod_live_requires_risk_limits(tmp_path: Path) -> None:
    assert load_settings(config_file=write(tmp_path, LIVE_PROD)).trading_mode == "live"
    path = write(
        tmp_path,
        LIVE_PROD.replace("  daily_loss_limit: 500\n", "").replace("  max_gross_exposure: 10000\n", ""),
        "p.yaml",
    )
    err = error_of(path)
    assert err.field == "risk.max_gross_exposure" or err.field == "risk.daily_loss_limit"
    text = str(err)
    assert f"{path}: risk.daily_loss_limit: required in prod, whatever the trading mode" in text
    assert f"{path}: risk.max_gross_exposure: required in prod, whatever the trading mode" in text


def test_prod_requires_risk_limits_whatever_the_trading_mode(tmp_path: Path) -> None:
    """A paper prod deployment is one setting away from live: it needs its limits too."""
    paper = LIVE_PROD.replace("trading_mode: live", "trading_mode: paper")
    assert load_settings(config_file=write(tmp_path, paper)).trading_mode == "paper"
    path = write(tmp_path, paper.replace("  daily_loss_limit: 500\n", ""), "p.yaml")
    assert f"{path}: risk.daily_loss_limit: required in prod, whatever the trading mode" in str(error_of(path))
    # outside prod, no such rule
    assert load_settings(config_file=write(tmp_path, paper.replace("environment: prod", "environment: dev"), "d.yaml"))


def test_prod_refuses_plain_secrets_and_sandbox(tmp_path: Path) -> None:
    text = LIVE_PROD.replace("api_key: env:BINANCE_API_KEY", "api_key: AbCdEf0123456789").replace(
        "exchange: binance", "exchange: binance\n    sandbox: true"
    )
    path = write(tmp_path, text)
    err = error_of(path)
    message = str(err)
    assert f"{path}: accounts[0].api_key: plain-text secret is not allowed in prod" in message
    assert f"{path}: accounts[0].sandbox: sandbox/testnet accounts are not allowed in prod" in message
    assert "AbCdEf0123456789" not in message
    # The same file is fine outside prod.
    assert load_settings(config_file=write(tmp_path, text.replace("environment: prod", "environment: dev"), "d.yaml"))


def test_duplicate_accounts_and_bad_symbol(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "accounts:\n  - {name: a, exchange: binance}\n  - {name: a, exchange: okx}\n"))
    assert err.field == "accounts"
    err = error_of(write(tmp_path, "symbols: [BTCUSDT]\n", "s.yaml"))
    assert err.field == "symbols"
    assert "not a ccxt unified symbol" in str(err)


def test_masked_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELTICA_DATABASE_URL", "postgresql://meltica:pw-123@db.internal:5432/meltica")
    text = (
        "accounts:\n  - {name: a, exchange: binance, api_key: plainkey,"
        " api_secret: 'encrypted:gAAAA', password: env:PASS}\n"
    )
    data = masked_settings(load_settings(config_file=write(tmp_path, text)))
    assert data["database_url"] == "postgresql://meltica:****@db.internal:5432/meltica"
    account = data["accounts"][0]
    assert (account["api_key"], account["api_secret"], account["password"]) == ("****", "encrypted:****", "env:PASS")
    assert mask_url("postgresql://localhost/db") == "postgresql://localhost/db"
    assert mask_url("host=db password=x") == "****"


def test_empty_env_var_means_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MELTICA_RISK__DAILY_LOSS_LIMIT", "")
    settings = load_settings(config_file=write(tmp_path, "risk:\n  daily_loss_limit: 5\n"))
    assert settings.risk.daily_loss_limit == Decimal(5)


def test_plain_secret_from_env_in_prod_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELTICA_ACCOUNTS", '[{"name": "x", "exchange": "binance", "api_key": "PLAINKEY123"}]')
    err = error_of(env="prod")
    assert err.source == "environment variable MELTICA_ACCOUNTS"
    assert err.field == "accounts[0].api_key"
    assert "PLAINKEY123" not in str(err)


def test_a_candles_only_worker_batches_its_outputs_and_a_trading_worker_does_not() -> None:
    from pydantic import ValidationError

    from meltica.config.settings import MARKET_DATA_LINGER_MS, LiveWorker

    assert LiveWorker(name="candles", stages=["candles"]).linger_ms() == MARKET_DATA_LINGER_MS == 2.0
    assert LiveWorker(name="pipeline", stages=["candles", "strategies"]).linger_ms() == 0.0
    assert LiveWorker(name="execution", stages=["execution"]).linger_ms() == 0.0
    assert LiveWorker(name="x", stages=["execution"], producer_linger_ms=1.5).linger_ms() == 1.5
    assert LiveWorker(name="x", stages=["candles"], producer_linger_ms=0).linger_ms() == 0.0
    with pytest.raises(ValidationError, match="producer_linger_ms"):
        LiveWorker(name="x", stages=["candles"], producer_linger_ms=-1)
