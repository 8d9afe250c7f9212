"""``meltica backtest`` on real data in its corners: impossible orders rejected and reported (never fatal),
runs that did nothing warned about loudly, and every run saying what it ran on (effective parameters, data
fingerprint, fill model, code version). Subprocesses on the shipped BTC perpetual minute bars."""

from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"


@pytest.fixture(scope="module")
def daily_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The month of minute bars rolled up to days (33 bars): a daily ATR is a tenth of the price."""
    days: dict[str, list[float]] = {}
    with gzip.open(DATA, "rt") as src:
        for row in csv.DictReader(src):
            day = row["timestamp"][:10]
            o, h, lo, c, v = (float(row[k]) for k in ("open", "high", "low", "close", "volume"))
            got = days.get(day)
            days[day] = [o, h, lo, c, v] if got is None else [got[0], max(got[1], h), min(got[2], lo), c, got[4] + v]
    path = tmp_path_factory.mktemp("data") / "daily.csv"
    lines = ["timestamp,open,high,low,close,volume"]
    lines += [f"{day} 00:00:00,{o},{h},{lo},{c},{v}" for day, (o, h, lo, c, v) in days.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with gzip.open(DATA, "rt") as src:
        path.write_text("".join(itertools.islice(src, 2001)))
    return path


def backtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meltica", "backtest", "--no-store", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def document(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return loaded


def orders(out: Path) -> list[dict[str, str]]:
    with (out / "orders.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_momentums_negative_atr_stop_is_rejected_and_the_run_ends(daily_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = backtest(
        "--strategy", "momentum", "--param", "fast=3", "--param", "slow=8", "--param", "atr_period=2",
        "--param", "atr_multiple=50", "--timeframe", "1d", "--data", str(daily_file), "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rejected = [o for o in orders(out) if o["status"] == "rejected"]
    assert rejected and rejected[0]["order_type"] == "stop_market"
    assert rejected[0]["reason"].startswith("INVALID_INTENT")
    report = document(out)
    assert report["orders"]["rejections"] == {"INVALID_INTENT": len(rejected)}
    invalid = report["orders"]["invalid"][0]
    assert invalid["field"] == "trigger_price" and Decimal(invalid["value"]) < 0 and invalid["ts"].startswith("2022-")
    assert any("impossible order" in w for w in report["warnings"])
    assert "impossible order" in proc.stdout
    assert "INVALID_INTENT" in (out / "report.html").read_text()
    assert int(report["metrics"]["periods"]) == 33  # every bar was run


def test_a_grid_reaching_below_zero_runs_to_the_end_with_its_impossible_levels_rejected(
    daily_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = backtest(
        "--strategy", "grid", "--param", "step_pct=25", "--param", "levels=4", "--param", "quantity=0.01",
        "--timeframe", "1d", "--data", str(daily_file), "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = orders(out)
    rejected = [o for o in rows if o["status"] == "rejected"]
    assert [o["reason"].split(":")[0] for o in rejected] == ["INVALID_INTENT"]
    assert Decimal(rejected[0]["price"]) <= 0
    assert any(o["status"] == "filled" for o in rows)  # the valid levels traded
    assert document(out)["orders"]["invalid"][0]["field"] == "price"


def test_a_run_whose_orders_are_all_rejected_exits_0_with_the_warning_printed_and_recorded(
    slice_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = backtest(
        "--strategy", "momentum", "--param", "fast=10", "--param", "slow=50", "--param", "quantity=0.00001",
        "--data", str(slice_file), "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stdout and "most orders were rejected" in proc.stdout
    assert "MIN_NOTIONAL" in proc.stdout
    report = document(out)
    total = report["orders"]["total"]
    assert total > 0 and report["orders"]["rejections"] == {"MIN_NOTIONAL": total}
    assert any(w.startswith("most orders were rejected") for w in report["warnings"])
    assert any(w.startswith("nothing traded") for w in report["warnings"])
    html = (out / "report.html").read_text()
    assert "most orders were rejected" in html and "MIN_NOTIONAL" in html


def test_a_run_records_effective_parameters_data_fingerprint_fill_model_and_code_version(
    slice_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = backtest(
        "--strategy", "momentum", "--param", "fast=10", "--param", "slow=50", "--latency-ms", "1000",
        "--data", str(slice_file), "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = document(out)["run"]
    assert run["params"] == {"fast": 10, "slow": 50, "symbol": "BTC/USDT"}
    effective = run["effective_params"]
    assert (effective["atr_multiple"], effective["stop"], effective["quantity"]) == (3.0, "atr", "0.01")
    data = run["data"]
    assert data["data_sha256"] == hashlib.sha256(slice_file.read_bytes()).hexdigest()
    assert data["bars"] == 2000
    assert (data["first"], data["last"]) == ("2021-12-31T23:01:00+00:00", "2022-01-02T08:20:00+00:00")
    assert "whole bar later" in run["fill_model"]["description"]
    assert run["code_version"]
    html = (out / "report.html").read_text()
    assert "Effective parameters" in html and data["data_sha256"] in html
