"""vectorbt runner (vectorised: numpy + numba). Runs in ``bench/.venv``.

Single run: ``vbt.MA.run(close, 10/50, ewm=True)`` (pandas ``ewm(adjust=False)``: seeded with the
first close, NaN until ``period`` bars), entries = EMA10 > EMA50, exits = EMA10 < EMA50, both shifted
one bar so that a decision on bar t's close executes at bar t+1 with ``price=open``;
``Portfolio.from_signals(close, entries, exits, price=open, size=1, size_type="amount", fees=0.001,
init_cash=1e7, direction="longonly")`` (no accumulation: an entry while long is ignored, which is the
"if flat" rule). Timed: indicators + signals + ``from_signals`` + ``orders.count()`` + ``total_profit()``.

Sweep (``--sweep``): the same for every (fast, slow) pair of ``SWEEP_FAST x SWEEP_SLOW`` (100 pairs):
the 20 distinct EMAs are computed once with ``MA.run`` (a list of windows), pairs become columns of
``from_signals``, evaluated ``--sweep-chunk`` pairs per call to bound memory (1M bars x 100 columns of
float64 is 800 MB per array). Reported rate: bar-evaluations per second = pairs x bars / seconds.

Numba compilation is excluded: a warm-up on the first 5,000 bars runs first (numba's on-disk cache
makes later runs cheaper anyway).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")
import vectorbt as vbt  # noqa: E402
from _common import (  # noqa: E402
    FAST,
    FEE_RATE,
    INITIAL_CASH,
    QUANTITY,
    SLOW,
    SWEEP_FAST,
    SWEEP_SLOW,
    Timer,
    emit,
    load_bars,
    parse_args,
    peak_rss_mb,
)


def shift1(a: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a)
    out[1:] = a[:-1]
    return out


def single(close: pd.Series, open_: pd.Series) -> tuple[int, float]:
    fast = vbt.MA.run(close, FAST, ewm=True).ma.to_numpy()
    slow = vbt.MA.run(close, SLOW, ewm=True).ma.to_numpy()
    entries = shift1(fast > slow)  # NaN comparisons are False: no signal before both are warm
    exits = shift1(fast < slow)
    pf = vbt.Portfolio.from_signals(
        close,
        entries,
        exits,
        price=open_,
        size=QUANTITY,
        size_type="amount",
        fees=FEE_RATE,
        init_cash=INITIAL_CASH,
        direction="longonly",
    )
    return int(pf.orders.count()), float(pf.total_profit())


def sweep(close: pd.Series, open_: pd.Series, chunk: int) -> list[tuple[int, int, int, float]]:
    fast_ma = vbt.MA.run(close, list(SWEEP_FAST), ewm=True).ma.to_numpy()  # (bars, 10)
    slow_ma = vbt.MA.run(close, list(SWEEP_SLOW), ewm=True).ma.to_numpy()
    pairs = [(i, j) for i in range(len(SWEEP_FAST)) for j in range(len(SWEEP_SLOW))]
    out: list[tuple[int, int, int, float]] = []
    for start in range(0, len(pairs), chunk):
        batch = pairs[start : start + chunk]
        fi = np.array([i for i, _ in batch])
        sj = np.array([j for _, j in batch])
        f, s = fast_ma[:, fi], slow_ma[:, sj]
        entries = np.zeros(f.shape, dtype=bool)
        exits = np.zeros(f.shape, dtype=bool)
        np.greater(f[:-1], s[:-1], out=entries[1:])
        np.less(f[:-1], s[:-1], out=exits[1:])
        del f, s
        pf = vbt.Portfolio.from_signals(
            close,
            entries,
            exits,
            price=open_,
            size=QUANTITY,
            size_type="amount",
            fees=FEE_RATE,
            init_cash=INITIAL_CASH,
            direction="longonly",
        )
        counts = np.asarray(pf.orders.count())
        profits = np.asarray(pf.total_profit())
        for k, (i, j) in enumerate(batch):
            out.append((SWEEP_FAST[i], SWEEP_SLOW[j], int(counts[k]), float(profits[k])))
        del pf, entries, exits
    return out


def main() -> None:
    args = parse_args()
    with Timer() as load:
        bars = load_bars(args.data)
        index = pd.to_datetime(bars["ts"], unit="ns")
        close = pd.Series(bars["close"], index=index, name="close")
        open_ = pd.Series(bars["open"], index=index, name="open")
        n = len(close)
        del bars
    with Timer() as warm:  # numba JIT (or cache load) — excluded from the loop time
        if args.sweep:
            sweep(close.iloc[:5000], open_.iloc[:5000], args.sweep_chunk)
        else:
            single(close.iloc[:5000], open_.iloc[:5000])
    rss_before = peak_rss_mb()
    base = {
        "version": vbt.__version__,
        "bars": n,
        "load_seconds": load.seconds,
        "warmup_seconds": warm.seconds,
        "rss_before_loop_mb": rss_before,
    }
    if args.sweep:
        with Timer() as loop:
            results = sweep(close, open_, args.sweep_chunk)
        ref = next(r for r in results if r[0] == FAST and r[1] == SLOW)
        emit(
            {
                **base,
                "engine": "vectorbt sweep",
                "pairs": len(results),
                "evaluations": len(results) * n,
                "seconds": loop.seconds,
                "cpu_seconds": loop.cpu_seconds,
                "fills": ref[2],  # the (10, 50) pair, to cross-check with the single run
                "pnl": ref[3],
            }
        )
        return
    with Timer() as loop:
        fills, pnl = single(close, open_)
    emit(
        {
            **base,
            "engine": "vectorbt",
            "seconds": loop.seconds,
            "cpu_seconds": loop.cpu_seconds,
            "fills": fills,
            "pnl": pnl,
        }
    )


if __name__ == "__main__":
    main()
