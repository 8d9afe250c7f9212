"""What one checkpoint of the trading worker's state costs: snapshot + JSON (as ``streams.worker`` stores it) of
the risk gate's account state with N open orders, and of the execution stage's with N handled request ids.

The stages of ``bench/live_pipeline_bench.py`` (its ``bench_every_bar`` strategy, 50 markets) on the in-memory
bus: N bars through strategies + risk only (every approved order stays open in the risk gate), then N bars
through all three stages (every request id remembered by the execution stage). CPU time, one process.

Usage: ``.venv/bin/python bench/checkpoint_cost.py [N ...]`` (default 1000 5000). Not a test.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import live_pipeline_bench as bench  # noqa: E402

from meltica.live.bus import InMemoryBus  # noqa: E402
from meltica.messaging.catalogue import market_key  # noqa: E402
from streams.pipeline import build_processors  # noqa: E402
from streams.worker import _state_json  # noqa: E402

SYMBOLS = 50


async def run_bars(stages: list[str], bars: int) -> list[Any]:
    processors = build_processors({"params": {"pipeline": bench.pipeline_config(SYMBOLS), "stages": stages}})
    bus = InMemoryBus(processors)
    await bus.start()
    for bar in bench.bench_bars(bars, SYMBOLS):
        await bus.publish(bench.CANDLES_TOPIC, market_key(bar.exchange, bar.symbol), bar)
        await bus.run_until_idle()
        bus.published.clear()  # the bus keeps every message; a worker does not
    return processors


def cost(processor: Any, key: str, repeats: int = 20) -> tuple[float, int]:
    started = time.process_time()
    size = 0
    for _ in range(repeats):
        size = len(_state_json(processor.snapshot(key)) or b"")
    return (time.process_time() - started) / repeats * 1000, size


async def main(counts: list[int]) -> None:
    for n in counts:
        gate = next(p for p in await run_bars(["strategies", "risk"], n) if p.name == "risk-gate")
        ms, size = cost(gate, bench.ACCOUNT)
        print(f"risk gate, {n:,} open orders: {ms:.2f} ms CPU per snapshot + JSON, {size:,} B", flush=True)
        stages = ["strategies", "risk", "execution"]
        execution = next(p for p in await run_bars(stages, n) if p.name == "execution")
        ms, size = cost(execution, bench.ACCOUNT)
        print(f"execution, {n:,} handled request ids: {ms:.2f} ms CPU per snapshot + JSON, {size:,} B", flush=True)


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1000, 5000]))
