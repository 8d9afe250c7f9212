"""Shared by every engine runner in ``bench/peers``: the workload definition, bar loading, result output.

Standard library + numpy only, so it imports in both interpreters (``/work/main/.venv`` for Meltica,
``bench/.venv`` for the peers). Every runner is executed as a script by ``bench/backtest_bench.py``::

    <python> bench/peers/<engine>.py --data bench/.cache/<bars>.npz [--sweep]

and prints, as its last stdout line, ``RESULT <json>`` (see :func:`emit`). Anything else it prints
(engine logs, warnings) is passed through to the user on stderr by the harness.

The workload (identical for every engine, deviations documented in ``bench/README.md``):

* EMA(10) and EMA(50) of the close, alpha = 2 / (period + 1);
* long-only, fixed quantity 1 BTC: at a bar's close, once both EMAs are warm (bar index >= 49), if flat
  and EMA10 > EMA50 send a market BUY of 1; if long and EMA10 < EMA50 send a market SELL of 1;
* market orders decided on bar t's close fill at bar t+1's open (no look-ahead);
* fee 0.1 % of notional per fill (each side); 10,000,000 USDT starting cash (never binding);
* result: ``fills`` = filled orders (entries + exits), ``pnl`` = final equity - starting cash with an
  open position marked at the last close.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FAST = 10
SLOW = 50
FEE_RATE = 0.001
QUANTITY = 1.0
# Large enough never to bind: the workload loses ~61k USDT per 45,031-bar copy (~1.4M over 1M bars) and
# holds at most 1 BTC (< 50k USDT). With 1M, backtrader starts rejecting orders and vectorbt shrinks them.
INITIAL_CASH = 10_000_000.0

# Parameter sweep grid: 10 x 10 = 100 (fast, slow) pairs, every fast < every slow; contains (10, 50).
SWEEP_FAST = (5, 8, 10, 12, 15, 20, 25, 30, 35, 40)
SWEEP_SLOW = (50, 60, 70, 80, 90, 100, 110, 120, 130, 140)

Bars = dict[str, np.ndarray]  # "ts" int64 ns UTC bar open time; "open","high","low","close","volume" float64


def load_bars(path: str | Path) -> Bars:
    with np.load(path) as z:
        return {k: z[k] for k in ("ts", "open", "high", "low", "close", "volume")}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="bars .npz built by bench/backtest_bench.py")
    parser.add_argument("--sweep", action="store_true", help="run the parameter-sweep path instead")
    parser.add_argument("--sweep-chunk", type=int, default=25, help="pairs evaluated per batch (memory bound)")
    return parser.parse_args(argv)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall) and ``t.cpu_seconds`` (this process, all threads).

    CPU time is reported next to wall time because a shared machine under load stretches wall time;
    the harness shows both rates.
    """

    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu


def emit(result: dict[str, Any]) -> None:
    """The one line the harness parses. Keys: see ``bench/README.md`` ("runner protocol")."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    sys.stdout.flush()
    print("RESULT " + json.dumps(result), flush=True)
