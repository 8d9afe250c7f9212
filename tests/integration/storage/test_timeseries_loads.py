"""Loads of any size and shape keep the maintained 1h roll-up equal to a pandas resample — on whichever
flavour the server is (plain PostgreSQL here in CI; the same tests run against TimescaleDB elsewhere)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, text

from meltica.cli.demo_cmd import DEMO_DATASET
from meltica.domain.market_data import CandleRow
from meltica.marketdata.candle_files import read_candle_file
from meltica.storage import candles, timeseries

pytestmark = pytest.mark.integration

EXCHANGE = "binance"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def demo_rows() -> list[CandleRow]:
    return read_candle_file(DEMO_DATASET, "1m").rows


def _between(rows: list[CandleRow], first: datetime, last: datetime) -> list[CandleRow]:
    return [r for r in rows if first <= r.ts <= last]


def _resample(rows: list[CandleRow]) -> list[tuple[object, ...]]:
    frame = pd.DataFrame(
        {"open": [r.open for r in rows], "high": [r.high for r in rows], "low": [r.low for r in rows],
         "close": [r.close for r in rows], "volume": [r.volume for r in rows]},
        index=pd.DatetimeIndex([r.ts for r in rows]),
    ).sort_index()  # fmt: skip
    grouped = frame.resample("1h", label="left", closed="left")
    out = pd.DataFrame(
        {
            "open": grouped["open"].first(),
            "high": grouped["high"].max(),
            "low": grouped["low"].min(),
            "close": grouped["close"].last(),
            "volume": grouped["volume"].sum(),
            "bars": grouped["open"].count(),
        }
    )
    out = out[out["bars"] > 0]
    return [
        (ts.to_pydatetime(), r.open, r.high, r.low, r.close, Decimal(r.volume), int(r.bars)) for ts, r in out.iterrows()
    ]


def _hourly(engine: Engine, symbol: str) -> list[tuple[object, ...]]:
    rows = candles.read_candles(engine, exchange=EXCHANGE, symbol=symbol, timeframe="1h")  # the maintained view
    return [(r.ts, r.open, r.high, r.low, r.close, r.volume, r.bar_count) for r in rows]


def _at(day: int, hour: int, minute: int) -> datetime:
    return datetime(2022, 1, day, hour, minute, tzinfo=UTC)


def test_a_load_starting_and_ending_mid_hour_rolls_up_every_hour(
    migrated_database: Engine, demo_rows: list[CandleRow]
) -> None:
    rows = _between(demo_rows, _at(5, 10, 7), _at(5, 14, 52))
    result = candles.load_candles(migrated_database, rows, exchange=EXCHANGE, symbol="MID/HOUR", timeframe="1m")
    assert result.inserted == len(rows)
    hourly = _hourly(migrated_database, "MID/HOUR")
    assert hourly == _resample(rows)
    assert [h[0] for h in hourly] == [_at(5, h, 0) for h in range(10, 15)]  # the partial first and last hours too


def test_a_ten_bar_load_inside_one_hour(migrated_database: Engine, demo_rows: list[CandleRow]) -> None:
    rows = _between(demo_rows, _at(6, 11, 5), _at(6, 11, 14))
    assert len(rows) == 10
    result = candles.load_candles(migrated_database, rows, exchange=EXCHANGE, symbol="TEN/BARS", timeframe="1m")
    assert result.inserted == 10
    assert _hourly(migrated_database, "TEN/BARS") == _resample(rows)
    assert _hourly(migrated_database, "TEN/BARS")[0][-1] == 10


def test_a_two_bar_load_across_an_hour_boundary(migrated_database: Engine, demo_rows: list[CandleRow]) -> None:
    rows = _between(demo_rows, _at(6, 11, 59), _at(6, 12, 0))
    candles.load_candles(migrated_database, rows, exchange=EXCHANGE, symbol="TWO/BARS", timeframe="1m")
    assert _hourly(migrated_database, "TWO/BARS") == _resample(rows)
    assert len(_hourly(migrated_database, "TWO/BARS")) == 2


def test_refresh_with_open_ended_windows(migrated_database: Engine, demo_rows: list[CandleRow]) -> None:
    rows = _between(demo_rows, _at(7, 3, 30), _at(7, 4, 10))
    candles.load_candles(
        migrated_database, rows, exchange=EXCHANGE, symbol="OPEN/WINDOW", timeframe="1m", refresh_rollups=False
    )
    candles.refresh(migrated_database, start=None, end=None)  # the ingest gap-refetch path
    candles.refresh(migrated_database, start=None, end=_at(7, 4, 10))
    candles.refresh(migrated_database, start=_at(7, 3, 30), end=None)
    assert _hourly(migrated_database, "OPEN/WINDOW") == _resample(rows)


def test_a_reload_overlapping_stored_history_adds_only_the_new_bars(
    migrated_database: Engine, demo_rows: list[CandleRow]
) -> None:
    first = _between(demo_rows, _at(8, 0, 0), _at(8, 5, 59))
    second = _between(demo_rows, _at(8, 3, 30), _at(8, 9, 15))  # 2.5 h overlap, then new bars
    loaded = candles.load_candles(migrated_database, first, exchange=EXCHANGE, symbol="OVER/LAP", timeframe="1m")
    again = candles.load_candles(migrated_database, second, exchange=EXCHANGE, symbol="OVER/LAP", timeframe="1m")
    union = {r.ts: r for r in first + second}
    assert loaded.inserted == len(first)
    assert again.inserted == len(union) - len(first)
    assert again.already_stored == len(second) - again.inserted
    assert _hourly(migrated_database, "OVER/LAP") == _resample(sorted(union.values(), key=lambda r: r.ts))


def test_reloading_repairs_a_rollup_whose_refresh_failed(migrated_database: Engine, demo_rows: list[CandleRow]) -> None:
    """The rows of a load are committed before the roll-up refresh; if that refresh fails, loading the same
    file again stores nothing new but must still bring the roll-up up to date."""
    rows = _between(demo_rows, _at(9, 20, 10), _at(9, 21, 40))
    candles.load_candles(
        migrated_database, rows, exchange=EXCHANGE, symbol="RE/PAIR", timeframe="1m", refresh_rollups=False
    )  # the state a failed refresh leaves
    again = candles.load_candles(migrated_database, rows, exchange=EXCHANGE, symbol="RE/PAIR", timeframe="1m")
    assert again.inserted == 0
    assert _hourly(migrated_database, "RE/PAIR") == _resample(rows)


def test_reload_into_compressed_history_loses_nothing(
    migrated_database: Engine, demo_rows: list[CandleRow], capsys: pytest.CaptureFixture[str]
) -> None:
    """TimescaleDB only: compressed chunks, then a reload overlapping them (2.17 dropped rows here)."""
    with migrated_database.connect() as conn:
        flavour = timeseries.detect_flavour(conn)
    if flavour is not timeseries.Flavour.TIMESCALEDB:
        with capsys.disabled():
            print("\n  [skip reason] compressed chunks exist only on TimescaleDB; this server is plain PostgreSQL")
        pytest.skip("compressed chunks exist only on TimescaleDB; this server is plain PostgreSQL")
    part = _between(demo_rows, _at(12, 0, 0), _at(12, 23, 59))
    full = _between(demo_rows, _at(11, 0, 0), _at(13, 23, 59))
    candles.load_candles(migrated_database, part, exchange=EXCHANGE, symbol="COMP/RESSED", timeframe="1m")
    with migrated_database.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('candles') c"))
    again = candles.load_candles(migrated_database, full, exchange=EXCHANGE, symbol="COMP/RESSED", timeframe="1m")
    assert again.inserted == len(full) - len(part)
    with migrated_database.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM candles WHERE symbol = 'COMP/RESSED'")).scalar_one()
    assert stored == len(full)
    assert _hourly(migrated_database, "COMP/RESSED") == _resample(full)


def _meltica(engine: Engine, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MELTICA_") or k == "MELTICA_STATE_DIR"}
    environment.update(MELTICA_DATABASE_URL=engine.url.render_as_string(hide_password=False), COLUMNS="200")
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "meltica", *args], capture_output=True, text=True, env=environment, cwd=REPO, timeout=120
    )


def test_a_database_error_in_data_load_is_one_line(fresh_database: Engine, tmp_path: Path) -> None:
    with gzip.open(DEMO_DATASET, "rt") as handle:
        head = [next(handle) for _ in range(11)]
    small = tmp_path / "ten.csv"
    small.write_text("".join(head))
    with fresh_database.begin() as conn:
        conn.execute(text("ALTER TABLE candles RENAME TO candles_elsewhere"))  # at head, but the table is gone
    loaded = _meltica(
        fresh_database, "data", "load", str(small), "--exchange", "binance", "--symbol", "BTC/USDT", "--timeframe", "1m"
    )
    assert loaded.returncode == 1, loaded.stderr
    assert "Traceback" not in loaded.stderr
    lines = [line for line in loaded.stderr.splitlines() if line.strip()]
    assert lines == [
        'error: storing binance BTC/USDT 1m candles: the database refused it: relation "candles" does not exist'
    ], loaded.stderr


def test_db_upgrade_sets_exactly_the_configured_retention(fresh_database: Engine) -> None:
    with fresh_database.connect() as conn:
        flavour = timeseries.detect_flavour(conn)
    up = _meltica(fresh_database, "db", "upgrade", env={"MELTICA_STORAGE__RETENTION": '{"trades": "365 days"}'})
    assert up.returncode == 0, up.stderr
    if flavour is timeseries.Flavour.POSTGRES:
        assert "retention of trades (365 days) is not enforced: plain PostgreSQL keeps every row" in up.stdout
    else:
        assert "retention of trades: chunks older than 365 days are dropped" in up.stdout
        with fresh_database.connect() as conn:
            jobs = conn.execute(
                text("SELECT hypertable_name FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'")
            ).scalars()
            assert set(jobs) == {"trades"}
