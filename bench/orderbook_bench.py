"""Order-book benchmark: apply one level, then read best bid and best ask — updates per second.

Measured in one run, on the same update stream, for:

* Meltica ``L2Book`` (``meltica.domain.orderbook``): string levels in, ``Decimal`` best prices out
  (the public API), and the float hot path (``best_*_price_float``);
* ccxt's ``OrderBook`` (``ccxt.async_support.base.ws.order_book``), what ``watch_order_book`` users
  get: ``side.store(float(price), float(qty))`` as ccxt's binance handler does, then ``[0][0]`` reads;
* NautilusTrader's ``OrderBook`` (``BookType.L2_MBP``, Rust core): ``apply_delta`` of pre-built
  ``OrderBookDelta`` objects, then ``best_bid_price()``/``best_ask_price()``. Nautilus is not a
  dependency of Meltica: it runs in ``bench/.venv`` (created with ``uv`` on first use) in a subprocess.

Usage: ``.venv/bin/python bench/orderbook_bench.py [--updates N] [--repeat R]``. Not a test: nothing
asserts on speed. The stream is seeded, so every run and every library sees the same updates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_VENV = HERE / ".venv"
NAUTILUS_SPEC = os.environ.get("MELTICA_BENCH_NAUTILUS", "nautilus_trader")

Update = tuple[bool, str, str]  # (is_bid, price, quantity) as the venue sends them (strings)


def make_stream(count: int, seed: int = 7) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[Update]]:
    """A snapshot of 200 levels a side around 20 000.0 (tick 0.1) and ``count`` diffs.

    Updates concentrate near the top (geometric distance from the mid), 25 % remove a level, the mid
    never moves, so the book is never crossed and every library does the same work.
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible benchmark stream, not a secret
    mid_ticks = 200_000
    bids = [(f"{(mid_ticks - i) / 10:.1f}", f"{rng.randint(1, 5000) / 1000:.3f}") for i in range(1, 201)]
    asks = [(f"{(mid_ticks + i) / 10:.1f}", f"{rng.randint(1, 5000) / 1000:.3f}") for i in range(1, 201)]
    updates: list[Update] = []
    for _ in range(count):
        is_bid = rng.random() < 0.5
        distance = min(1 + int(rng.expovariate(1 / 12)), 400)
        ticks = mid_ticks - distance if is_bid else mid_ticks + distance
        qty = "0.000" if rng.random() < 0.25 else f"{rng.randint(1, 5000) / 1000:.3f}"
        updates.append((is_bid, f"{ticks / 10:.1f}", qty))
    return bids, asks, updates


def _best_of(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def bench_meltica(
    stream: tuple[list[tuple[str, str]], list[tuple[str, str]], list[Update]], repeat: int
) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from meltica.domain.orderbook import L2Book

    bids, asks, updates = stream

    def run_decimal() -> float:
        book = L2Book("bench", "BTC/USDT")
        book.apply_snapshot(bids, asks, 0)
        update_bid, update_ask = book.update_bid, book.update_ask
        best_bid, best_ask = book.best_bid_price, book.best_ask_price
        start = time.perf_counter()
        for is_bid, price, qty in updates:
            if is_bid:
                update_bid(price, qty)
            else:
                update_ask(price, qty)
            best_bid()
            best_ask()
        return time.perf_counter() - start

    def run_float() -> float:
        book = L2Book("bench", "BTC/USDT")
        book.apply_snapshot(bids, asks, 0)
        update_bid, update_ask = book.update_bid, book.update_ask
        best_bid, best_ask = book.best_bid_price_float, book.best_ask_price_float
        start = time.perf_counter()
        for is_bid, price, qty in updates:
            if is_bid:
                update_bid(price, qty)
            else:
                update_ask(price, qty)
            best_bid()
            best_ask()
        return time.perf_counter() - start

    n = len(updates)
    return {
        "meltica L2Book (Decimal top)": n / _best_of(repeat, run_decimal),
        "meltica L2Book (float top)": n / _best_of(repeat, run_float),
    }


def bench_ccxt(
    stream: tuple[list[tuple[str, str]], list[tuple[str, str]], list[Update]], repeat: int
) -> dict[str, float]:
    from ccxt.async_support.base.ws.order_book import OrderBook

    bids, asks, updates = stream

    def run() -> float:
        book = OrderBook(
            {"bids": [[float(p), float(q)] for p, q in bids], "asks": [[float(p), float(q)] for p, q in asks]}
        )
        book_bids, book_asks = book["bids"], book["asks"]
        start = time.perf_counter()
        for is_bid, price, qty in updates:
            # ccxt's binance handler: safe_float on both values, then side.store(price, amount).
            (book_bids if is_bid else book_asks).store(float(price), float(qty))
            book_bids[0][0]  # the read being measured
            book_asks[0][0]
        return time.perf_counter() - start

    return {"ccxt OrderBook (ccxt.pro)": len(updates) / _best_of(repeat, run)}


NAUTILUS_SCRIPT = r"""
import json, sys, time
from nautilus_trader.model.book import OrderBook
from nautilus_trader.model.data import BookOrder, OrderBookDelta
from nautilus_trader.model.enums import BookAction, BookType, OrderSide
from nautilus_trader.model.identifiers import InstrumentId
from nautilus_trader.model.objects import Price, Quantity
import nautilus_trader

data = json.load(sys.stdin)
repeat = data["repeat"]
iid = InstrumentId.from_str("BTCUSDT.BINANCE")

def delta(is_bid, price, qty, action):
    side = OrderSide.BUY if is_bid else OrderSide.SELL
    order = BookOrder(side, Price.from_str(price), Quantity.from_str(qty), 0)
    return OrderBookDelta(iid, action, order, 0, 0, 0, 0)

# Deltas are built up front: an adapter's parser would build them before the book sees them.
# Whether a level is new, updated or deleted is what a venue diff implies; track it as a parser would.
def build():
    present = {True: set(), False: set()}
    snap = []
    for is_bid, levels in ((True, data["bids"]), (False, data["asks"])):
        for p, q in levels:
            snap.append(delta(is_bid, p, q, BookAction.ADD))
            present[is_bid].add(p)
    stream = []
    for is_bid, p, q in data["updates"]:
        if float(q) == 0:
            action = BookAction.DELETE
            present[is_bid].discard(p)
        elif p in present[is_bid]:
            action = BookAction.UPDATE
        else:
            action = BookAction.ADD
            present[is_bid].add(p)
        stream.append(delta(is_bid, p, q, action))
    return snap, stream

snap, stream = build()
best = None
for _ in range(repeat):
    book = OrderBook(iid, BookType.L2_MBP)
    for d in snap:
        book.apply_delta(d)
    apply, bb, ba = book.apply_delta, book.best_bid_price, book.best_ask_price
    start = time.perf_counter()
    for d in stream:
        apply(d)
        bb()
        ba()
    elapsed = time.perf_counter() - start
    best = elapsed if best is None else min(best, elapsed)
print(json.dumps({"version": nautilus_trader.__version__, "rate": len(stream) / best}))
"""


def ensure_bench_venv() -> Path | None:
    """``bench/.venv`` with nautilus_trader, created with uv when missing. ``None`` if impossible."""
    python = BENCH_VENV / "bin" / "python"
    probe = [str(python), "-c", "import nautilus_trader"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    uv = shutil.which("uv")
    if uv is None:
        print("  (uv not found: skipping NautilusTrader)", file=sys.stderr)
        return None
    print(f"  creating {BENCH_VENV} with {NAUTILUS_SPEC} (one time) …", file=sys.stderr)
    base = f"{sys.version_info.major}.{sys.version_info.minor}"
    steps = [
        [uv, "venv", "-q", "--python", base, str(BENCH_VENV)],
        [uv, "pip", "install", "-q", "--python", str(python), NAUTILUS_SPEC],
    ]
    for step in steps:
        if subprocess.run(step, check=False).returncode != 0:
            print(f"  (failed: {' '.join(step)}: skipping NautilusTrader)", file=sys.stderr)
            return None
    return python


def bench_nautilus(
    stream: tuple[list[tuple[str, str]], list[tuple[str, str]], list[Update]], repeat: int
) -> dict[str, float]:
    python = ensure_bench_venv()
    if python is None:
        return {}
    bids, asks, updates = stream
    payload = json.dumps({"bids": bids, "asks": asks, "updates": updates, "repeat": repeat})
    done = subprocess.run(
        [str(python), "-c", NAUTILUS_SCRIPT], input=payload, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        print(f"  (NautilusTrader run failed: {done.stderr.strip()[-400:]})", file=sys.stderr)
        return {}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {f"nautilus_trader {result['version']} OrderBook L2_MBP": float(result["rate"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--updates", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-nautilus", action="store_true")
    args = parser.parse_args(argv)

    stream = make_stream(args.updates)
    print(
        f"apply one level + read best bid/ask; {args.updates:,} updates, best of {args.repeat}; "
        f"python {sys.version.split()[0]}"
    )
    results: dict[str, float] = {}
    results.update(bench_meltica(stream, args.repeat))
    results.update(bench_ccxt(stream, args.repeat))
    if not args.no_nautilus:
        results.update(bench_nautilus(stream, args.repeat))

    width = max(len(name) for name in results)
    for name, rate in results.items():
        print(f"  {name:<{width}}  {rate:>12,.0f} updates/s")
    meltica = {k: v for k, v in results.items() if k.startswith("meltica")}
    peers = {k: v for k, v in results.items() if not k.startswith("meltica")}
    if peers:
        print("ratios (Meltica / peer):")
        for mname, mrate in meltica.items():
            for pname, prate in peers.items():
                print(f"  {mname} / {pname}: {mrate / prate:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
