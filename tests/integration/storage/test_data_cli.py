"""`meltica data` and `meltica db` as a user runs them: a real process, a real database."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from meltica.storage import migrate

pytestmark = pytest.mark.integration


def meltica(engine: Engine, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MELTICA_DATABASE_URL": engine.url.render_as_string(hide_password=False), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "meltica", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_load_then_show_rolled_up_csv(empty_database: Engine, tmp_path: Path) -> None:
    data = tmp_path / "sol.csv"
    rows = ["timestamp,open,high,low,close,volume"]
    for minute in range(10):
        price = 100 + minute
        rows.append(f"2022-03-01 00:{minute:02d}:00,{price},{price + 0.5},{price - 0.5},{price + 0.25},{minute + 1}")
    data.write_text("\n".join(rows) + "\n")

    loaded = meltica(
        empty_database, "data", "load", str(data), "--exchange", "okx", "--symbol", "SOL/USDT", "--timeframe", "1m"
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "read 10 bars, stored 10 new" in loaded.stdout

    again = meltica(
        empty_database, "data", "load", str(data), "--exchange", "okx", "--symbol", "SOL/USDT", "--timeframe", "1m"
    )
    assert "stored 0 new, 10 already stored" in again.stdout

    shown = meltica(
        empty_database,
        "data",
        "show",
        "--exchange",
        "okx",
        "--symbol",
        "SOL/USDT",
        "--timeframe",
        "5m",
        "--format",
        "csv",
    )
    assert shown.returncode == 0, shown.stderr
    table = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert [r["timestamp"] for r in table] == ["2022-03-01T00:00:00+00:00", "2022-03-01T00:05:00+00:00"]
    assert table[0] == {
        "timestamp": "2022-03-01T00:00:00+00:00",
        "open": "100",
        "high": "104.5",
        "low": "99.5",
        "close": "104.25",
        "volume": "15",
        "bars": "5",
    }


def test_malformed_file_exits_2_names_the_line_and_loads_nothing(empty_database: Engine, tmp_path: Path) -> None:
    data = tmp_path / "broken.csv"
    data.write_text(
        "timestamp,open,high,low,close,volume\n"
        "2022-03-01 00:00:00,1,2,0.5,1.5,1\n"
        "2022-03-01 00:01:00,1,2,0.5,1.5,1\n"
        "2022-03-01 00:02:00,1,two,0.5,1.5,1\n"
    )
    result = meltica(
        empty_database, "data", "load", str(data), "--exchange", "okx", "--symbol", "X/Y", "--timeframe", "1m"
    )
    assert result.returncode == 2
    assert "broken.csv:4: malformed row: high is not a number" in result.stderr
    assert "Traceback" not in result.stderr
    with empty_database.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM candles")).scalar_one() == 0


def test_db_upgrade_downgrade_commands(empty_database: Engine) -> None:
    up = meltica(empty_database, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    head = migrate.head_revision(empty_database)
    assert f"at revision {head} (postgresql)" in up.stdout or f"at revision {head} (timescaledb)" in up.stdout
    assert "***" in up.stdout  # the password is masked in what it prints
    down = meltica(empty_database, "db", "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert "at revision base" in down.stdout


def test_unreachable_database_is_one_clear_line_not_a_traceback() -> None:
    env = {**os.environ, "MELTICA_DATABASE_URL": "postgresql://meltica:hunter2-secret@127.0.0.1:1/none"}
    for args in (["data", "summary"], ["kill", "status"], ["db", "current"]):
        result = subprocess.run(
            [sys.executable, "-m", "meltica", *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert result.returncode == 1, args
        assert "database is unavailable" in result.stderr
        assert "Traceback" not in result.stderr
        assert "hunter2-secret" not in result.stderr + result.stdout
