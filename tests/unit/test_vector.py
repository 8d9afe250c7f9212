"""The vectorised EMA-crossover path against a plain bar loop with the streaming indicators (real bars)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import meltica.backtest.vector as vector
from meltica.backtest.metrics import compute_metrics, round_trips_from_fills
from meltica.backtest.vector import (
    Bars,
    EmaCache,
    SimConfig,
    ema_cross,
    ema_cross_sweep,
    ema_exact,
    ema_fast,
    load_bars,
    reference_loop,
    run_to_result,
)
from meltica.strategies.indicators import EMA

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"


@pytest.fixture(scope="module")
def bars() -> Bars:
    return load_bars(DATA).slice(0, 12_000)


def test_loads_the_shipped_bars() -> None:
    full = load_bars(DATA)
    assert len(full) == 45_031
    assert full.timeframe_ns == 60_000_000_000
    assert full.datetime_at(0).isoformat() == "2021-12-31T23:01:00+00:00"


def test_exact_ema_is_the_streaming_indicator_bit_for_bit(bars: Bars) -> None:
    ema = EMA(26)
    expected = [ema.update(x) for x in bars.close.tolist()]
    assert ema_exact(bars.close, 26).tolist() == expected
    # pandas' compiled EMA agrees up to float rounding only.
    assert np.max(np.abs(ema_fast(bars.close, 26) - np.asarray(expected))) < 1e-8


@pytest.mark.parametrize("mode", ["cross", "state"])
@pytest.mark.parametrize("allow_short", [False, True])
@pytest.mark.parametrize(("fast", "slow"), [(5, 20), (10, 50), (12, 26), (40, 140)])
def test_fills_and_equity_match_the_bar_loop(bars: Bars, mode: str, allow_short: bool, fast: int, slow: int) -> None:
    cfg = SimConfig(mode=mode, allow_short=allow_short)  # type: ignore[arg-type]
    run = ema_cross(bars, fast, slow, cfg)
    fills, final = reference_loop(bars, fast, slow, cfg)
    assert fills
    got = list(zip(run.fill_index.tolist(), run.fill_qty.tolist(), run.fill_price.tolist(), strict=True))
    assert got == fills
    assert float(run.metrics.final_equity) == pytest.approx(final, rel=1e-12, abs=1e-6)


def test_the_exact_fallback_gives_the_same_decisions(bars: Bars, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SimConfig(mode="cross", allow_short=True)
    plain = ema_cross(bars, 10, 50, cfg)
    monkeypatch.setattr(vector, "_tie_band", lambda *_: float("inf"))  # every evaluation takes the exact path
    cache = EmaCache(bars.close)
    forced = ema_cross(bars, 10, 50, cfg, cache=cache)
    assert cache.exact_fallbacks == 1
    assert forced.fill_index.tolist() == plain.fill_index.tolist()


def test_ties_hold_the_previous_signal() -> None:
    n = 40
    close = np.full(n, 100.0)  # flat prices: fast == slow everywhere, no signal, no trade
    ts = np.arange(n, dtype=np.int64) * 60_000_000_000
    flat = Bars(ts=ts, open=close, high=close, low=close, close=close, volume=close)
    run = ema_cross(flat, 3, 5, SimConfig(mode="state"))
    assert run.fill_index.size == 0
    assert run.metrics.final_equity == Decimal("1000000.0")


def test_metrics_agree_with_compute_metrics(bars: Bars) -> None:
    cfg = SimConfig(mode="cross", allow_short=True)
    run = ema_cross(bars, 12, 26, cfg, keep_equity=True)
    result = run_to_result(run, bars, cfg=cfg, timeframe="1m")
    reference = compute_metrics(
        [(p.ts, p.equity) for p in result.equity], round_trips_from_fills(result.fills), result.fills
    )
    m = run.metrics
    assert m.periods == reference.periods
    assert m.trades == reference.trades and m.open_trades == reference.open_trades
    assert m.winning_trades == reference.winning_trades and m.losing_trades == reference.losing_trades
    for name in ("sharpe", "sortino", "volatility", "max_drawdown", "total_return", "cagr", "exposure", "turnover"):
        assert getattr(m, name) == pytest.approx(getattr(reference, name), rel=1e-6, abs=1e-9), name
    for name in ("final_equity", "fees", "gross_profit", "gross_loss"):
        assert float(getattr(m, name)) == pytest.approx(float(getattr(reference, name)), rel=1e-9), name
    assert m.max_drawdown_duration == reference.max_drawdown_duration


def test_sweep_shares_emas_and_reports_throughput(bars: Bars) -> None:
    pairs = [(f, s) for f in (5, 10) for s in (30, 60)]
    sweep = ema_cross_sweep(bars, pairs, SimConfig(mode="state"))
    assert [(r.params["fast"], r.params["slow"]) for r in sweep.runs] == pairs
    assert sweep.evaluations == len(bars) * 4
    assert sweep.evaluations_per_second > 0
    single = ema_cross(bars, 10, 60, SimConfig(mode="state"))
    assert sweep.runs[3].metrics == single.metrics


def test_no_fill_on_a_decision_at_the_last_bar(bars: Bars) -> None:
    run = ema_cross(bars, 10, 50, SimConfig(mode="state"))
    assert int(run.fill_index.max()) < len(bars)
    short = bars.slice(0, int(run.fill_index[0]))  # ends on the bar whose close decided the first fill
    assert ema_cross(short, 10, 50, SimConfig(mode="state")).fill_index.size == 0
