"""Market-data publish benchmark: messages per second of ``streams.replay.ReplayPublisher``.

Replays real 1m bars (``meltica/data/btc-perp-20211231-20220201_1m.csv.gz``) at max speed to
``md.candles.1m`` of a fresh ``bench-<hex>.`` topic prefix on the dev broker (``MELTICA_KAFKA_BOOTSTRAP``
or ``meltica infra``), encoded with the core codec, and prints the rate to the last broker ack.

Usage: ``.venv/bin/python bench/md_publish_bench.py [--bars N] [--repeat R] [--batch M] [--linger MS]``.
Not a test: nothing asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from meltica.marketdata.replay import load_bars, replay  # noqa: E402
from meltica.messaging import Catalogue, Codec  # noqa: E402
from meltica.messaging.admin import create_topics, default_bootstrap  # noqa: E402
from streams.replay import ReplayPublisher  # noqa: E402

DATA = HERE.parent / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2000, help="messages per send_batch")
    parser.add_argument("--linger", type=float, default=20.0, help="linger in ms")
    args = parser.parse_args()

    bootstrap = default_bootstrap()
    catalogue = Catalogue(prefix=f"bench-{uuid.uuid4().hex[:10]}.")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    bars = load_bars(DATA, exchange="binanceusdm", symbol="BTC/USDT:USDT", limit=args.bars)
    t0 = time.perf_counter()
    encoded = sum(len(codec.encode("md.candles.1m", b)) for b in bars)
    encode_s = time.perf_counter() - t0
    print(f"{len(bars)} bars, {encoded / len(bars):.0f} B/msg, encode only: {len(bars) / encode_s:,.0f} msg/s")

    async def run() -> list[float]:
        rates = []
        async with ReplayPublisher(bootstrap, codec=codec, batch_messages=args.batch, linger_ms=args.linger) as pub:
            for i in range(args.repeat):
                stats = await pub.publish(replay(bars, speed=None))
                rates.append(stats.rate)
                print(f"run {i + 1}: {stats.messages} msgs in {stats.seconds:.3f}s, {stats.batches} batches, "
                      f"{stats.rate:,.0f} msg/s")  # fmt: skip
        return rates

    rates = asyncio.run(run())
    print(f"publish (codec + send_batch, acks=all): best {max(rates):,.0f} msg/s, median "
          f"{sorted(rates)[len(rates) // 2]:,.0f} msg/s")  # fmt: skip


if __name__ == "__main__":
    main()
