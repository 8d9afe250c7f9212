"""Parity: the backtester (OMS + risk + emulator over the paper venue) and the paper venue driven bar by bar
through the live pipeline in lock-step (``meltica paper``'s path: strategy host → risk stage → execution
over ``SimulatedVenueDriver``) produce the same orders and fills on the same recorded data (DESIGN.md §2)."""

from __future__ import annotations

import asyncio
import gzip
import itertools
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from meltica.backtest import BacktestConfig, BarSeries, run_backtest
from meltica.live.bus import InMemoryBus
from tests.unit.test_live_parity import collect, fills_of, pipeline, replay

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
SYMBOL = "BTC/USDT:USDT"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> BarSeries:
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with gzip.open(DATA, "rt") as src:
        path.write_text("".join(itertools.islice(src, 6001)))  # header + 6000 one-minute bars
    return BarSeries.from_file(path, exchange="binance", symbol=SYMBOL, timeframe="1m")


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("momentum", {"symbol": SYMBOL, "fast": 10, "slow": 50, "quantity": "0.1"}, {}),
    ("momentum", {"symbol": SYMBOL, "stop": "trailing", "stop_pct": "0.3", "quantity": "0.1"}, {"slippage_bps": 3}),
    ("mean_reversion", {"symbol": SYMBOL, "quantity": "0.1"}, {"taker_fee_bps": 5, "maker_fee_bps": 2}),
    ("grid", {"symbol": SYMBOL}, {}),
]


@pytest.mark.parametrize(("name", "params", "extra"), CASES)
def test_backtest_and_paper_exchange_give_the_same_orders_and_fills(
    series: BarSeries, name: str, params: dict[str, Any], extra: dict[str, Any]
) -> None:
    config = BacktestConfig.create(
        strategy=name,
        params=params,
        symbol=SYMBOL,
        initial_balances={"USDT": D(100_000), "BTC": D(1)},
        **extra,
    )
    result = run_backtest(config, series)
    bars = list(series.bars())

    # The same venue set-up, driven bar by bar through the paper run's pipeline.
    async def main() -> InMemoryBus:
        bus = InMemoryBus(pipeline(config))
        async with bus:
            await replay(bus, config, bars)
        return bus

    collector = collect(config, asyncio.run(main()))
    assert collector.ended
    assert len(result.fills) > 10
    assert fills_of(collector.fills) == fills_of(result.fills)
    assert [o.client_order_id for o in result.orders] == list(collector.orders)  # sent in the same order
    paper_final = {
        # an order still open when the data ended: as the backtest's result marks it
        coid: (order.status.value if order.status.is_terminal else "open_at_end", order.filled_quantity)
        for coid, order in collector.orders.items()
    }
    assert paper_final == {o.client_order_id: (o.status, o.filled_quantity) for o in result.orders}
