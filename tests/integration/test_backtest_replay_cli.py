"""``meltica backtest --trades`` / ``--book-snapshot --book-updates``: replays from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BINANCE = Path(__file__).resolve().parents[1] / "data" / "binance"


def meltica(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meltica", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_replays_recorded_trades_and_book(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = meltica(
        "backtest", "--strategy", "momentum", "--trades", str(BINANCE / "btcusdt-trades.parquet"),
        "--book-snapshot", str(BINANCE / "btcusdt-depth-snap.csv"),
        "--book-updates", str(BINANCE / "btcusdt-depth-update.csv"),
        "--output", str(out), "--no-store", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    document = json.loads((out / "metrics.json").read_text())
    assert document["run"]["fill_model"]["release"] == "next event at or after decision + latency"
    assert "1 sequence gap(s)" in proc.stdout
    equity = (out / "equity.csv").read_text().splitlines()
    assert len(equity) > 1000  # one point per distinct timestamp of 2,001 trades + 1 book event


def test_cli_book_updates_need_a_snapshot(tmp_path: Path) -> None:
    proc = meltica(
        "backtest", "--strategy", "momentum", "--book-updates", str(BINANCE / "btcusdt-depth-update.csv"),
        "--output", str(tmp_path / "x"), "--no-store", "--no-progress",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--book-snapshot" in proc.stdout + proc.stderr
