"""Walk-forward: window layout, stitching, and no out-of-sample bar ever reaching its own optimisation."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meltica.backtest.vector import Bars, VectorRun, load_bars
from meltica.backtest.walkforward import vector_evaluator, vector_optimiser, walk_forward, windows
from meltica.errors import ConfigurationError

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
PAIRS = [(f, s) for f in (5, 10, 20) for s in (30, 60, 120)]
SIM: dict[str, Any] = {"mode": "state", "allow_short": True}
FREE: dict[str, Any] = {**SIM, "fee_rate": 0.0}  # without fees the best pair changes from window to window


@pytest.fixture(scope="module")
def bars() -> Bars:
    return load_bars(DATA).slice(0, 20_000)


def test_windows_by_bar_count() -> None:
    ts = np.arange(100, dtype=np.int64) * 60_000_000_000
    x = np.linspace(1.0, 2.0, 100)
    b = Bars(ts=ts, open=x, high=x, low=x, close=x, volume=x)
    got = [(w.in_start, w.in_stop, w.out_start, w.out_stop) for w in windows(b, in_sample=40, out_of_sample=20)]
    assert got == [(0, 40, 40, 60), (20, 60, 60, 80), (40, 80, 80, 100)]
    tail = windows(b, in_sample=40, out_of_sample=25, step=25)
    assert [(w.out_start, w.out_stop) for w in tail] == [(40, 65), (65, 90), (90, 100)]  # last one shorter


def test_windows_by_duration(bars: Bars) -> None:
    plan = windows(bars, in_sample=timedelta(days=3), out_of_sample=timedelta(days=1), step=timedelta(days=1))
    assert plan
    for w in plan:
        assert w.in_stop - w.in_start == 3 * 1440  # contiguous 1-minute bars
        assert w.out_start == w.in_stop
    assert all(w.out_stop - w.out_start == 1440 for w in plan[:-1])


def test_out_of_sample_bars_never_reach_their_own_optimisation(bars: Bars) -> None:
    """The optimiser of every window sees only bars strictly before that window's first OOS bar."""
    inner = vector_optimiser(PAIRS, **SIM)
    seen: list[tuple[int, int]] = []

    def recording_optimise(is_bars: Bars) -> Mapping[str, Any]:
        seen.append((int(is_bars.ts.min()), int(is_bars.ts.max())))
        return inner(is_bars)

    result = walk_forward(
        bars,
        in_sample=4000,
        out_of_sample=2000,
        optimise=recording_optimise,
        evaluate=vector_evaluator(warmup=200, **SIM),
        warmup=200,
    )
    assert len(result.windows) == len(seen) >= 5
    for (lo, hi), w in zip(seen, result.windows, strict=True):
        first_oos = w.out_of_sample[0]
        assert hi < first_oos
        assert lo == int(bars.ts[w.window.in_start])
        assert hi == int(bars.ts[w.window.out_start - 1])
        # and the evaluated curve starts at (not before) the first OOS bar
    stitched_ts = [t for t, _ in result.equity]
    assert stitched_ts == sorted(set(stitched_ts))
    assert stitched_ts[0] >= result.windows[0].out_of_sample[0]


def test_scrambling_out_of_sample_bars_leaves_each_windows_choice_unchanged(bars: Bars) -> None:
    """For every window k, destroying every bar from k's first OOS bar on changes none of the parameters
    chosen for windows 0..k."""
    kwargs: dict[str, Any] = {
        "in_sample": 4000,
        "out_of_sample": 2000,
        "optimise": vector_optimiser(PAIRS, objective="total_return", **FREE),
        "evaluate": vector_evaluator(**FREE),
    }
    baseline = walk_forward(bars, **kwargs)
    chosen = [dict(w.params) for w in baseline.windows]
    assert len(set(map(str, chosen))) > 1  # the choice does depend on the data
    rng = np.random.default_rng(7)
    later_changed = False
    for k, w in enumerate(baseline.windows):
        cut = w.window.out_start
        mutated = bars.copy()
        for column in (mutated.open, mutated.high, mutated.low, mutated.close):
            tail = column[cut:]
            tail[:] = rng.permutation(tail) * rng.uniform(0.5, 1.5, size=tail.size)
        again = walk_forward(mutated, **kwargs)
        assert [dict(x.params) for x in again.windows[: k + 1]] == chosen[: k + 1]
        later_changed = later_changed or [dict(x.params) for x in again.windows[k + 1 :]] != chosen[k + 1 :]
    assert later_changed  # the scrambling is strong enough to change the windows that do see it


def test_stitched_curve_continues_from_the_previous_window(bars: Bars) -> None:
    def const_optimise(is_bars: Bars) -> Mapping[str, Any]:
        return {"fast": 10, "slow": 60}

    evaluate = vector_evaluator(**SIM)
    for mode in ("compound", "add"):
        result = walk_forward(
            bars, in_sample=3000, out_of_sample=3000, optimise=const_optimise, evaluate=evaluate, stitch=mode
        )  # type: ignore[arg-type]
        equity = dict(result.equity)
        for prev, cur in zip(result.windows, result.windows[1:], strict=False):
            assert cur.start_equity == pytest.approx(prev.end_equity)
            run = evaluate(bars.slice(cur.window.out_start, cur.window.out_stop), cur.params)
            assert isinstance(run, VectorRun) and run.equity is not None
            own = run.equity
            first_ts = int(bars.ts[cur.window.out_start]) + bars.timeframe_ns
            # the first OOS close is rebased onto the previous window's end (no trade before it)
            expected = own[0] * (cur.start_equity / own[0]) if mode == "compound" else cur.start_equity
            assert equity[first_ts] == pytest.approx(expected)
        assert result.equity[-1][1] == pytest.approx(result.windows[-1].end_equity)
        assert float(result.metrics.final_equity) == pytest.approx(result.windows[-1].end_equity)


def test_too_little_data_is_refused(bars: Bars) -> None:
    with pytest.raises(ConfigurationError):
        walk_forward(
            bars.slice(0, 100),
            in_sample=100,
            out_of_sample=10,
            optimise=lambda b: {"fast": 5, "slow": 30},
            evaluate=vector_evaluator(),
        )
