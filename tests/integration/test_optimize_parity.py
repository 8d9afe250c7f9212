"""One parameter set, one truth: ``meltica backtest``, ``meltica optimize`` (engine path, and the vector path
where it is exact) and each walk-forward window give the same metrics; walk-forward honours ``--param``.
Subprocesses on the first 2,000 shipped BTC perpetual minute bars."""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
COMPARED = ("final_equity", "total_return", "sharpe", "max_drawdown", "trades", "fees")


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with gzip.open(DATA, "rt") as src:
        path.write_text("".join(itertools.islice(src, 2001)))
    return path


def meltica(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "meltica", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def backtest_metrics(data: Path, out: Path, *args: str) -> dict[str, Any]:
    meltica("backtest", "--data", str(data), "--no-store", "--no-progress", "--output", str(out), *args)
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())["metrics"]
    return metrics


def test_backtest_and_optimize_give_equal_metrics_for_the_same_set_with_their_defaults(
    slice_file: Path, tmp_path: Path
) -> None:
    expected = backtest_metrics(
        slice_file, tmp_path / "bt", "--strategy", "momentum", "--param", "fast=10", "--param", "slow=50"
    )
    meltica(
        "optimize", "--strategy", "momentum", "--grid", "fast=10", "--grid", "slow=50", "--data", str(slice_file),
        "--workers", "1", "--output", str(tmp_path / "opt"),
    )  # fmt: skip
    sweep = json.loads((tmp_path / "opt" / "sweep.json").read_text())
    assert (sweep["path"], sweep["exact"]) == ("engine", True)
    got = sweep["runs"][0]
    assert int(expected["trades"]) > 10
    assert {k: got[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}


def test_optimize_honours_initial_cash_and_slippage_on_the_engine_path(slice_file: Path, tmp_path: Path) -> None:
    expected = backtest_metrics(
        slice_file, tmp_path / "bt", "--strategy", "momentum", "--param", "fast=10", "--param", "slow=50",
        "--balance", "USDT=2500", "--slippage-bps", "3",
    )  # fmt: skip
    meltica(
        "optimize", "--grid", "fast=10", "--grid", "slow=50", "--data", str(slice_file), "--path", "engine",
        "--initial-cash", "2500", "--slippage-bps", "3", "--workers", "1", "--output", str(tmp_path / "opt"),
    )  # fmt: skip
    got = json.loads((tmp_path / "opt" / "sweep.json").read_text())["runs"][0]
    assert Decimal(got["initial_equity"]) == Decimal(2500)
    assert {k: got[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}


def test_the_vector_path_is_labelled_inexact_unless_it_models_the_same_strategy(
    slice_file: Path, tmp_path: Path
) -> None:
    grid = ("optimize", "--path", "vector", "--grid", "fast=10", "--grid", "slow=50", "--data", str(slice_file))
    proc = meltica(*grid, "--workers", "1", "--output", str(tmp_path / "with-stop"))
    assert "INEXACT" in proc.stdout
    assert json.loads((tmp_path / "with-stop" / "sweep.json").read_text())["exact"] is False
    # momentum with its stop switched off is what the vector path computes: same numbers (float rounding)
    meltica(*grid, "--param", "stop=none", "--workers", "1", "--output", str(tmp_path / "no-stop"))
    sweep = json.loads((tmp_path / "no-stop" / "sweep.json").read_text())
    assert sweep["exact"] is True
    expected = backtest_metrics(
        slice_file, tmp_path / "bt", "--strategy", "momentum", "--param", "fast=10", "--param", "slow=50",
        "--param", "stop=none",
    )  # fmt: skip
    got = sweep["runs"][0]
    assert got["trades"] == expected["trades"]
    assert float(got["final_equity"]) == pytest.approx(float(expected["final_equity"]), abs=1e-6)


def walk_forward(data: Path, out: Path, *args: str) -> dict[str, Any]:
    meltica(
        "optimize", "--grid", "fast=10", "--grid", "slow=50", "--walk-forward", "in=600,out=400",
        "--data", str(data), "--workers", "1", "--output", str(out), *args,
    )  # fmt: skip
    loaded: dict[str, Any] = json.loads((out / "walkforward.json").read_text())
    return loaded


@pytest.mark.parametrize("path", ["engine", "vector"])
def test_walk_forward_with_param_quantity_scales_pnl(path: str, slice_file: Path, tmp_path: Path) -> None:
    small = walk_forward(slice_file, tmp_path / "small", "--param", "quantity=0.01", "--path", path)
    large = walk_forward(slice_file, tmp_path / "large", "--param", "quantity=0.02", "--path", path)
    assert int(small["metrics"]["trades"]) > 5  # the stitched metrics count the windows' trades
    pnl_small = float(small["metrics"]["final_equity"]) - float(small["metrics"]["initial_equity"])
    pnl_large = float(large["metrics"]["final_equity"]) - float(large["metrics"]["initial_equity"])
    assert pnl_small != 0
    assert pnl_large == pytest.approx(2 * pnl_small, rel=1e-9)


@pytest.mark.parametrize("strategy", ["momentum", "mean_reversion"])
def test_each_walk_forward_window_is_the_backtest_of_its_bars(strategy: str, slice_file: Path, tmp_path: Path) -> None:
    grid = ["--grid", "fast=10", "--grid", "slow=50"] if strategy == "momentum" else ["--grid", "period=20,40"]
    meltica(
        "optimize", "--strategy", strategy, *grid, "--walk-forward", "in=600,out=400", "--data", str(slice_file),
        "--workers", "1", "--output", str(tmp_path / "wf"),
    )  # fmt: skip
    windows = json.loads((tmp_path / "wf" / "walkforward.json").read_text())["windows"]
    assert len(windows) == 4
    window = windows[1]
    params = [f"{k.removeprefix('param.')}={v}" for k, v in window.items() if k.startswith("param.")]
    end = datetime.fromisoformat(window["out_end"]) + timedelta(minutes=1)
    expected = backtest_metrics(
        slice_file, tmp_path / "bt", "--strategy", strategy, *itertools.chain(*(("--param", p) for p in params)),
        "--start", window["out_start"], "--end", end.isoformat(),
    )  # fmt: skip
    assert window["oos_trades"] == expected["trades"]
    assert window["oos_total_return"] == pytest.approx(expected["total_return"], rel=1e-12, abs=1e-15)
