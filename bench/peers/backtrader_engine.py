"""backtrader runner (event-driven, pure Python). Runs in ``bench/.venv``.

Configuration: ``Cerebro(stdstats=False)`` (no observers: nothing else is computed per bar), default
``preload=True, runonce=True`` (backtrader's fastest mode), ``PandasData`` feed, ``bt.ind.EMA``
(seeded with the SMA of its first ``period`` closes — backtrader's definition), commission 0.1 %
(``setcommission(commission=0.001)``, percentage of value, stock-like), market orders which backtrader
fills at the next bar's open (its default, no cheat-on-open / cheat-on-close).

Timed loop: ``Strategy.start()`` to ``Strategy.stop()`` — the bar loop including the indicators'
vectorised ``once`` pass, excluding the feed's preload (data loading); ``total_seconds`` is the whole
``cerebro.run()``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backtrader as bt
import pandas as pd
from _common import FAST, FEE_RATE, INITIAL_CASH, QUANTITY, SLOW, Timer, emit, load_bars, parse_args, peak_rss_mb


class EmaCross(bt.Strategy):
    params = (("fast", FAST), ("slow", SLOW), ("qty", QUANTITY))

    def __init__(self) -> None:
        self.fast = bt.ind.EMA(self.data.close, period=self.p.fast)
        self.slow = bt.ind.EMA(self.data.close, period=self.p.slow)
        self.fills = 0
        self.t_start = self.t_stop = self.c_start = self.c_stop = 0.0
        self.rss_before = 0.0

    def start(self) -> None:
        self.rss_before = peak_rss_mb()
        self.t_start = time.perf_counter()
        self.c_start = time.process_time()

    def stop(self) -> None:
        self.t_stop = time.perf_counter()
        self.c_stop = time.process_time()

    def notify_order(self, order: bt.Order) -> None:
        if order.status == order.Completed:
            self.fills += 1

    def next(self) -> None:
        fast, slow = self.fast[0], self.slow[0]
        if not self.position:
            if fast > slow:
                self.buy(size=self.p.qty)
        elif fast < slow:
            self.sell(size=self.position.size)


def main() -> None:
    args = parse_args()
    if args.sweep:
        emit({"engine": "backtrader", "skipped": "no sweep path measured"})
        return
    with Timer() as load:
        bars = load_bars(args.data)
        frame = pd.DataFrame(
            {k: bars[k] for k in ("open", "high", "low", "close", "volume")},
            index=pd.to_datetime(bars["ts"], unit="ns"),
        )
        del bars
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(bt.feeds.PandasData(dataname=frame, openinterest=None))
    cerebro.addstrategy(EmaCross)
    cerebro.broker.setcash(INITIAL_CASH)
    cerebro.broker.setcommission(commission=FEE_RATE)
    with Timer() as total:
        (strategy,) = cerebro.run()
    emit(
        {
            "engine": "backtrader",
            "version": bt.__version__,
            "bars": len(frame),
            "load_seconds": load.seconds,
            "seconds": strategy.t_stop - strategy.t_start,
            "cpu_seconds": strategy.c_stop - strategy.c_start,
            "total_seconds": total.seconds,
            "fills": strategy.fills,
            "pnl": cerebro.broker.getvalue() - INITIAL_CASH,
            "rss_before_loop_mb": strategy.rss_before,
        }
    )


if __name__ == "__main__":
    main()
