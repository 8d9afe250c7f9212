"""Candle loads on real PostgreSQL: COPY of the real demo month, idempotent reloads, roll-ups vs pandas."""

from __future__ import annotations

import gzip
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, text

from meltica.cli.demo_cmd import DEMO_DATASET
from meltica.errors import DataValidationError
from meltica.marketdata.candle_files import read_candle_file
from meltica.storage import candles, timeseries

pytestmark = pytest.mark.integration

EXCHANGE, SYMBOL = "binance", "BTC/USDT:USDT"
XRP_FEATHER = Path(__file__).resolve().parents[2] / "data" / "freqtrade" / "XRP_ETH-5m.feather"


def _count(engine: Engine, **where: str) -> int:
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "true"
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM candles WHERE {clause}"), where).scalar_one())


@pytest.fixture(scope="module")
def loaded(migrated_database: Engine) -> Engine:
    parsed = read_candle_file(DEMO_DATASET, "1m")
    result = candles.load_candles(migrated_database, parsed.rows, exchange=EXCHANGE, symbol=SYMBOL, timeframe="1m")
    assert result.read == 45_031
    assert result.inserted == 45_031
    return migrated_database


@pytest.fixture(scope="module")
def reference_frame() -> pd.DataFrame:
    """The demo rows read independently of Meltica's reader: pandas, exact Decimals from the text."""
    with gzip.open(DEMO_DATASET, "rt") as handle:
        frame = pd.read_csv(handle, dtype=str)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    for column in ("open", "high", "low", "close", "volume"):
        frame[column] = frame[column].map(Decimal)
    return frame.set_index("timestamp").sort_index()


def _resample(frame: pd.DataFrame, rule: str) -> list[tuple[object, ...]]:
    grouped = frame.resample(rule, label="left", closed="left")
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


def _as_tuples(rows: list[candles.StoredCandle]) -> list[tuple[object, ...]]:
    return [(r.ts, r.open, r.high, r.low, r.close, r.volume, r.bar_count) for r in rows]


def test_copy_load_stores_every_bar_of_the_demo_month(loaded: Engine) -> None:
    assert _count(loaded, exchange=EXCHANGE, symbol=SYMBOL, timeframe="1m") == 45_031
    with loaded.connect() as conn:
        first = conn.execute(text("SELECT ts, open, volume FROM candles ORDER BY ts LIMIT 1")).one()
    assert first.ts.isoformat() == "2021-12-31T23:01:00+00:00"
    assert first.open == Decimal("46319.0")
    assert first.volume == Decimal("2300413.7295")  # exact: NUMERIC, not float


def test_reloading_the_same_file_adds_nothing(loaded: Engine) -> None:
    parsed = read_candle_file(DEMO_DATASET, "1m")
    again = candles.load_candles(loaded, parsed.rows, exchange=EXCHANGE, symbol=SYMBOL, timeframe="1m")
    assert (again.read, again.inserted, again.already_stored) == (45_031, 0, 45_031)
    assert _count(loaded) == 45_031


def test_one_hour_rollup_view_equals_pandas_resample(loaded: Engine, reference_frame: pd.DataFrame) -> None:
    hourly = candles.read_candles(loaded, exchange=EXCHANGE, symbol=SYMBOL, timeframe="1h")
    expected = _resample(reference_frame, "1h")
    assert len(hourly) == len(expected) == 751
    assert _as_tuples(hourly) == expected


@pytest.mark.parametrize("timeframe", ["5m", "1h", "1d"])
def test_on_the_fly_rollups_equal_pandas_resample(
    loaded: Engine, reference_frame: pd.DataFrame, timeframe: str
) -> None:
    rows = candles.read_candles(loaded, exchange=EXCHANGE, symbol=SYMBOL, timeframe=timeframe, use_view=False)
    rule = {"5m": "5min", "1h": "1h", "1d": "1D"}[timeframe]
    assert _as_tuples(rows) == _resample(reference_frame, rule)


def test_rollup_respects_half_open_range(loaded: Engine) -> None:
    from datetime import UTC, datetime

    start, end = datetime(2022, 1, 10, tzinfo=UTC), datetime(2022, 1, 11, tzinfo=UTC)
    rows = candles.read_candles(loaded, exchange=EXCHANGE, symbol=SYMBOL, timeframe="1h", start=start, end=end)
    assert len(rows) == 24
    assert rows[0].ts == start
    assert all(r.bar_count == 60 for r in rows)


def test_timeframe_that_is_not_a_multiple_is_refused(loaded: Engine) -> None:
    with pytest.raises(DataValidationError, match="not a multiple"):
        candles.read_candles(loaded, exchange=EXCHANGE, symbol=SYMBOL, timeframe="90s")


def test_malformed_row_is_reported_with_its_line_and_nothing_is_loaded(loaded: Engine, tmp_path: Path) -> None:
    with gzip.open(DEMO_DATASET, "rt") as handle:
        lines = handle.read().splitlines()[:2001]
    lines[1500] = lines[1500].replace(",", ",oops", 1)  # line 1501 of the file
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match=r"bad\.csv:1501: malformed row") as info:
        read_candle_file(bad, "1m")
    assert info.value.line == 1501
    assert _count(loaded, exchange="test") == 0


@pytest.mark.parametrize(
    ("replacement", "problem"),
    [
        ("2022-01-01 00:00:00,1,2,3,1.5,10", "OHLC out of order"),
        ("2022-01-01 00:00:30,1,2,0.5,1.5,10", "not aligned"),
        ("2022-01-01 00:00:00,1,2,0.5,1.5,-1", "volume must not be negative"),
        ("2022-01-01 00:00:00,1,2,0.5,1.5", "expected 6 fields"),
        ("not-a-time,1,2,0.5,1.5,10", "not ISO-8601"),
        ("2022-01-01 00:00:00,1,2,0.5,NaN,10", "not finite"),
    ],
)
def test_each_kind_of_malformed_row_names_its_problem(tmp_path: Path, replacement: str, problem: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(f"timestamp,open,high,low,close,volume\n2021-12-31 23:59:00,1,2,0.5,1.5,10\n{replacement}\n")
    with pytest.raises(DataValidationError, match=rf"bad\.csv:3: malformed row: .*{problem}"):
        read_candle_file(bad, "1m")


def test_database_refuses_what_the_reader_would(loaded: Engine) -> None:
    """The CHECK constraints hold even for a writer that bypasses the file reader."""
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), loaded.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO candles VALUES ('x', 'Y/Z', '1m', now(), 10, 5, 1, 2, 1)"  # high < open
            )
        )


def test_feather_candles_load_and_roll_up(loaded: Engine) -> None:
    parsed = read_candle_file(XRP_FEATHER, "5m")
    result = candles.load_candles(loaded, parsed.rows, exchange="binance", symbol="XRP/ETH", timeframe="5m")
    assert result.inserted == len(parsed.rows) > 0
    hourly = candles.read_candles(loaded, exchange="binance", symbol="XRP/ETH", timeframe="1h")
    assert sum(r.bar_count for r in hourly) == len(parsed.rows)
    assert hourly[0].open == parsed.rows[0].open


def test_timescaledb_path(loaded: Engine) -> None:
    with loaded.connect() as conn:
        available = timeseries.timescaledb_available(conn)
        flavour = timeseries.detect_flavour(conn)
    if not available:
        assert flavour is timeseries.Flavour.POSTGRES
        pytest.skip(
            "TimescaleDB extension is not installed on this PostgreSQL server "
            "(the plain-PostgreSQL path ran: date_bin roll-ups and a materialized view)"
        )
    assert flavour is timeseries.Flavour.TIMESCALEDB
    with loaded.connect() as conn:
        hypertables = set(
            conn.execute(text("SELECT hypertable_name FROM timescaledb_information.hypertables")).scalars()
        )
        caggs = dict(
            conn.execute(
                text("SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates")
            ).all()
        )
        jobs = set(conn.execute(text("SELECT proc_name FROM timescaledb_information.jobs")).scalars())
    assert {spec.table for spec in timeseries.HYPERTABLES} <= hypertables
    assert caggs.get("candles_1h") is False  # real-time aggregation: the newest hour is read too
    assert {"policy_compression", "policy_refresh_continuous_aggregate"} <= jobs
    assert "policy_retention" not in jobs  # opt-in (storage.retention): backfilled history is kept


def test_weekly_rollup_starts_on_monday_and_covers_every_bar(loaded: Engine) -> None:
    weeks = candles.read_candles(loaded, exchange=EXCHANGE, symbol=SYMBOL, timeframe="1w")
    assert all(w.ts.weekday() == 0 and w.ts.hour == 0 for w in weeks)
    assert sum(w.bar_count for w in weeks) == 45_031
    assert weeks[0].ts.isoformat() == "2021-12-27T00:00:00+00:00"
