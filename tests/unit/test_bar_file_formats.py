"""Bar files in every accepted shape go through one loader (``read_candle_file``), which ``backtest --data``,
``optimize --data`` (and walk-forward) and ``data load`` share: a UTF-8 BOM, epoch seconds / ms / ISO times,
freqtrade and pandas JSON; the bars' spacing checked against the timeframe (or the timeframe inferred);
unsorted rows and gaps reported with counts, never silently."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from meltica.backtest import BarSeries
from meltica.backtest.vector import load_bars
from meltica.errors import DataValidationError
from meltica.marketdata.candle_files import parse_time, read_candle_file

T0 = datetime(2024, 1, 1, tzinfo=UTC)
HEADER = "timestamp,open,high,low,close,volume"


def _bars(n: int, step: timedelta = timedelta(minutes=1)) -> list[tuple[datetime, str, str, str, str, str]]:
    out = []
    for i in range(n):
        base = Decimal(100) + Decimal(i) / 10
        out.append((T0 + i * step, str(base), str(base + 1), str(base - 1), str(base + Decimal("0.5")), "3.25"))
    return out


def _csv(path: Path, rows: list[tuple[str, ...]], *, bom: bool = False, header: str = HEADER) -> Path:
    text = "\n".join([header, *(",".join(r) for r in rows)]) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _epoch_s(t: datetime) -> str:
    return str(int(t.timestamp()))


def test_a_csv_with_a_utf8_bom_loads(tmp_path: Path) -> None:
    rows = [(t.isoformat(), *rest) for t, *rest in _bars(5)]
    parsed = read_candle_file(_csv(tmp_path / "bom.csv", rows, bom=True), "1m")
    assert [r.ts for r in parsed.rows] == [T0 + timedelta(minutes=i) for i in range(5)]
    assert parsed.rows[0].open == Decimal("100")
    assert parsed.warnings == ()


def test_epoch_seconds_milliseconds_and_iso_times_are_told_apart(tmp_path: Path) -> None:
    bars = _bars(4)
    seconds = _csv(tmp_path / "s.csv", [(_epoch_s(t), *rest) for t, *rest in bars])
    millis = _csv(tmp_path / "ms.csv", [(_epoch_s(t) + "000", *rest) for t, *rest in bars])
    iso = _csv(tmp_path / "iso.csv", [(t.strftime("%Y-%m-%dT%H:%M:%SZ"), *rest) for t, *rest in bars])
    expected = [t for t, *_ in bars]
    for path in (seconds, millis, iso):
        assert [r.ts for r in read_candle_file(path, "1m").rows] == expected, path.name
    assert parse_time("1704067200") == parse_time("1704067200000") == parse_time(1704067200000000) == T0
    assert parse_time("1704067200.5") == T0 + timedelta(milliseconds=500)
    assert parse_time(1704067200 * 10**9) == T0


def test_a_bom_epoch_seconds_file_backtests_from_the_cli(tmp_path: Path) -> None:
    """``meltica backtest --data`` on a BOM + epoch-seconds file without --timeframe: the timeframe (5m) is
    inferred from the spacing, and the run's metrics say 5m."""
    bars = _bars(300, timedelta(minutes=5))
    path = _csv(tmp_path / "bars.csv", [(_epoch_s(t), *rest) for t, *rest in bars], bom=True)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "meltica", "backtest", "--strategy", "momentum", "--param", "fast=5",
         "--param", "slow=20", "--data", str(path), "--output", str(out), "--no-store", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    document = json.loads((out / "metrics.json").read_text())
    assert document["run"]["timeframe"] == "5m"
    assert int(document["metrics"]["periods"]) == 300


def test_five_minute_bars_declared_as_one_minute_are_refused(tmp_path: Path) -> None:
    bars = _bars(20, timedelta(minutes=5))
    path = _csv(tmp_path / "5m.csv", [(t.isoformat(), *rest) for t, *rest in bars])
    with pytest.raises(DataValidationError, match=r"bars are 5m apart .* timeframe is 1m: give --timeframe 5m"):
        read_candle_file(path, "1m")
    with pytest.raises(DataValidationError, match="5m apart"):
        BarSeries.from_file(path, exchange="binance", symbol="BTC/USDT", timeframe="1m")
    with pytest.raises(DataValidationError, match="5m apart"):
        load_bars(path, "1m")  # optimize --data / walk-forward
    assert str(read_candle_file(path).timeframe) == "5m"  # inferred when not given
    series = BarSeries.from_file(path, exchange="binance", symbol="BTC/USDT", timeframe=None)
    assert series.timeframe == "5m" and len(series) == 20


def test_the_cli_refuses_a_misdeclared_timeframe_with_a_clear_error(tmp_path: Path) -> None:
    bars = _bars(20, timedelta(minutes=5))
    path = _csv(tmp_path / "5m.csv", [(t.isoformat(), *rest) for t, *rest in bars])
    proc = subprocess.run(
        [sys.executable, "-m", "meltica", "backtest", "--strategy", "momentum", "--data", str(path),
         "--timeframe", "1m", "--output", str(tmp_path / "x"), "--no-store", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "give --timeframe 5m" in proc.stderr + proc.stdout
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_unsorted_rows_and_gaps_are_counted_in_the_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bars = _bars(30)
    del bars[20:24]  # one gap of 4 bars
    del bars[10:11]  # one gap of 1 bar
    shuffled = [*bars[:5], bars[6], bars[5], *bars[7:15], bars[16], bars[15], *bars[17:]]  # 2 rows out of order
    path = _csv(tmp_path / "messy.csv", [(t.isoformat(), *rest) for t, *rest in shuffled])
    with caplog.at_level(logging.WARNING, logger="meltica.marketdata.candle_files"):
        parsed = read_candle_file(path, "1m")
    assert [r.ts for r in parsed.rows] == sorted(t for t, *_ in bars)  # sorted, gaps not filled in
    assert (parsed.unsorted, parsed.gaps, parsed.missing_bars) == (2, 2, 5)
    assert len(parsed.warnings) == 2
    assert "2 row(s) out of time order" in parsed.warnings[0]
    assert "2 gap(s)" in parsed.warnings[1] and "5 bar(s) missing" in parsed.warnings[1]
    assert "the longest: 4m after 2024-01-01T00:19:00+00:00" in parsed.warnings[1]
    assert [r.getMessage() for r in caplog.records] == list(parsed.warnings)
    series = BarSeries.from_file(path, exchange="binance", symbol="BTC/USDT", timeframe="1m")
    assert series.warnings == parsed.warnings


def test_freqtrade_json_candles_load(tmp_path: Path) -> None:
    bars = _bars(6, timedelta(hours=1))
    rows = [[int(t.timestamp() * 1000), *(float(x) for x in prices)] for t, *prices in bars]
    path = tmp_path / "BTC_USDT-1h.json"
    path.write_text(json.dumps(rows))
    parsed = read_candle_file(path)
    assert str(parsed.timeframe) == "1h"
    assert [r.ts for r in parsed.rows] == [t for t, *_ in bars]
    assert parsed.rows[1].close == Decimal("100.6")  # from the JSON text, exactly
    gz = tmp_path / "BTC_USDT-1h.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(rows).encode()))
    assert len(load_bars(gz)) == 6  # the optimiser's loader is the same one
    series = BarSeries.from_file(path, exchange="binance", symbol="BTC/USDT", timeframe="1h")
    assert series.close[-1] == Decimal("101.0")


def test_optimize_reads_the_same_files_and_refuses_the_same_timeframe_mismatch(tmp_path: Path) -> None:
    bars = _bars(200, timedelta(minutes=5))
    rows = [[int(t.timestamp() * 1000), *(float(x) for x in prices)] for t, *prices in bars]
    path = tmp_path / "BTC_USDT-5m.json"
    path.write_text(json.dumps(rows))

    def optimize(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meltica", "optimize", "--grid", "fast=5", "--grid", "slow=20", "--workers", "1",
             "--data", str(path), *extra],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    ok = optimize()
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "1 runs, 0 failed" in ok.stdout
    refused = optimize("--timeframe", "1m")
    assert refused.returncode == 2
    assert "give --timeframe 5m" in refused.stderr


# every (orient, time as, date format) pandas can write: orient=table writes ISO dates only, and
# orient=records/values drop the index, so those combinations do not exist
PANDAS_SHAPES = [
    (orient, time_as, date_format)
    for orient in ("split", "records", "columns", "index", "values", "table")
    for time_as in ("column", "index")
    for date_format in ("epoch", "iso")
    if not (orient == "table" and date_format == "epoch")
    and not (time_as == "index" and orient in ("records", "values"))
]


@pytest.mark.parametrize(("orient", "time_as", "date_format"), PANDAS_SHAPES)
@pytest.mark.filterwarnings("ignore:'epoch' date format is deprecated")
def test_pandas_to_json_candles_load(tmp_path: Path, orient: str, time_as: str, date_format: str) -> None:
    bars = _bars(5, timedelta(minutes=15))
    frame = pd.DataFrame(
        {
            "date": pd.to_datetime([t for t, *_ in bars], utc=True),
            **{
                name: [float(b[i + 1]) for b in bars]
                for i, name in enumerate(("open", "high", "low", "close", "volume"))
            },
        }
    )
    if time_as == "index":
        frame = frame.set_index("date")
    path = tmp_path / f"{orient}.json"
    frame.to_json(path, orient=orient, date_format=date_format)  # type: ignore[call-overload]
    parsed = read_candle_file(path, "15m")
    assert [r.ts for r in parsed.rows] == [t for t, *_ in bars], path.read_text()[:300]
    assert parsed.rows[2].high == Decimal("101.2")


@pytest.mark.parametrize("command", [["backtest"], ["optimize"], ["data", "load"]])
def test_help_documents_the_bar_file_format(command: list[str]) -> None:
    from typer.testing import CliRunner

    from meltica.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    for phrase in ("BOM is fine", "freqtrade candles", "epoch seconds, ms, µs or ns", "open_time", "spacing"):
        assert phrase in text, (phrase, text)
