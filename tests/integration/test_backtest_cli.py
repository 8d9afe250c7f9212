"""``meltica backtest`` end to end: a subprocess on a candle file, and a run stored in PostgreSQL."""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine

from meltica.backtest import BacktestConfig, BacktestResult, BarSeries, run_backtest

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
SYMBOL = "BTC/USDT:USDT"
FILES = ("metrics.json", "orders.csv", "fills.csv", "equity.csv", "trades.csv", "report.html", "equity.png",
         "drawdown.png", "positions.png")  # fmt: skip


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with gzip.open(DATA, "rt") as src:
        path.write_text("".join(itertools.islice(src, 2001)))
    return path


def meltica(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meltica", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_backtest_on_a_file_writes_every_output_without_the_database(slice_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = meltica(
        "backtest", "--strategy", "momentum", "--param", f"symbol={SYMBOL}", "--param", "fast=10",
        "--param", "slow=50", "--param", "quantity=0.1", "--symbol", SYMBOL, "--data", str(slice_file),
        "--fees-bps", "10", "--slippage-bps", "2", "--latency-ms", "0", "--output", str(out), "--no-store",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in FILES:
        assert (out / name).is_file(), name
    document = json.loads((out / "metrics.json").read_text())
    assert document["run"]["strategy"] == "momentum"
    assert document["run"]["fill_model"]["slippage_bps"] == "2"
    assert int(document["metrics"]["periods"]) == 2000
    assert "final_equity" in proc.stdout


def test_cli_backtest_reports_a_bad_parameter_by_name(slice_file: Path, tmp_path: Path) -> None:
    proc = meltica(
        "backtest", "--strategy", "momentum", "--param", "fast=60", "--param", "slow=50", "--symbol", SYMBOL,
        "--data", str(slice_file), "--output", str(tmp_path / "x"), "--no-store",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "fast" in proc.stderr


@pytest.fixture
def database(fresh_database: Engine) -> Engine:
    return fresh_database


def test_a_run_is_stored_and_loads_back(slice_file: Path, database: Engine) -> None:
    series = BarSeries.from_file(slice_file, exchange="binance", symbol=SYMBOL, timeframe="1m")
    config = BacktestConfig.create(strategy="momentum", params={"symbol": SYMBOL, "quantity": "0.1"}, symbol=SYMBOL)
    result = run_backtest(config, series)
    result.save(database)
    loaded = BacktestResult.load(database, result.run_id)
    assert loaded.metrics == result.metrics
    assert [(p.ts, p.equity) for p in loaded.equity] == [(p.ts, p.equity) for p in result.equity]
    assert len(loaded.round_trips) == len(result.round_trips)
    assert loaded.fill_model["slippage_bps"] == "0"


def test_cli_backtest_reads_the_database_and_stores_the_run(
    slice_file: Path, database: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meltica.marketdata.candle_files import read_candle_file
    from meltica.storage import candles

    candles.load_candles(
        database, read_candle_file(slice_file, "1m").rows, exchange="binance", symbol=SYMBOL, timeframe="1m"
    )
    env_url = database.url.render_as_string(hide_password=False)
    monkeypatch.setenv("MELTICA_DATABASE_URL", env_url)
    out = tmp_path / "db-run"
    proc = subprocess.run(
        [sys.executable, "-m", "meltica", "backtest", "--strategy", "momentum", "--param", f"symbol={SYMBOL}",
         "--symbol", SYMBOL, "--exchange", "binance", "--timeframe", "5m", "--start", "2022-01-01T00:00:00Z",
         "--end", "2022-01-02T00:00:00Z", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads((out / "metrics.json").read_text())["run"]["run_id"]
    stored = BacktestResult.load(database, run_id)
    assert stored.timeframe == "5m"
    assert stored.metrics.periods == len(stored.equity) > 0
    assert stored.metrics.initial_equity == Decimal(10_000)
