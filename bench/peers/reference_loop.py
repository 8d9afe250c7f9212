"""Reference: the workload as a plain Python loop (no framework) — the definition made executable.

Not a contender: it has no order objects, no events, no broker. It fixes what the right number of fills
and the right PnL are, so each engine's row can be checked against it, and it shows what an
un-engineered Python loop costs per bar. Runs in whichever interpreter the harness picks (Meltica's).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import FAST, FEE_RATE, QUANTITY, SLOW, Timer, emit, load_bars, parse_args, peak_rss_mb


def run(opens: list[float], closes: list[float]) -> tuple[int, float]:
    a_fast, a_slow = 2.0 / (FAST + 1), 2.0 / (SLOW + 1)
    fast = slow = closes[0]  # seeded with the first close (as NautilusTrader and pandas/vectorbt adjust=False)
    cash = 0.0  # PnL accounting: cash flow relative to the starting cash
    position = 0.0
    pending = 0.0  # quantity to trade at the next bar's open
    fills = 0
    qty = QUANTITY
    for i in range(len(closes)):
        if pending:
            price = opens[i]
            cash -= pending * price + abs(pending) * price * FEE_RATE
            position += pending
            pending = 0.0
            fills += 1
        close = closes[i]
        fast += a_fast * (close - fast)
        slow += a_slow * (close - slow)
        if i >= SLOW - 1:
            if position == 0.0 and fast > slow:
                pending = qty
            elif position > 0.0 and fast < slow:
                pending = -position
    return fills, cash + position * closes[-1]


def main() -> None:
    args = parse_args()
    if args.sweep:
        emit({"engine": "reference loop", "skipped": "no sweep path"})
        return
    with Timer() as load:
        bars = load_bars(args.data)
        opens, closes = bars["open"].tolist(), bars["close"].tolist()
    rss_before = peak_rss_mb()
    with Timer() as loop:
        fills, pnl = run(opens, closes)
    emit(
        {
            "engine": "reference loop",
            "version": sys.version.split()[0],
            "bars": len(closes),
            "load_seconds": load.seconds,
            "seconds": loop.seconds,
            "cpu_seconds": loop.cpu_seconds,
            "fills": fills,
            "pnl": pnl,
            "rss_before_loop_mb": rss_before,
        }
    )


if __name__ == "__main__":
    main()
