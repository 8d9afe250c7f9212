"""Parity: the backtester (OMS + risk + emulator over the paper venue) and the paper exchange driven bar by
bar (``PaperContext``) produce the same orders and fills on the same recorded data (DESIGN.md §2)."""

from __future__ import annotations

import gzip
import itertools
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from meltica.backtest import BacktestConfig, BarSeries, run_backtest
from meltica.backtest.engine import build_context
from meltica.backtest.simulation import PaperContext
from meltica.strategies import build_strategy

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

    # The same venue set-up, driven bar by bar through the reference context.
    reference = build_context(config, series.ts[0])
    paper = PaperContext.create(
        reference.venue.instruments.values(),
        start=series.ts[0],
        balances=config.balances(),
        account=config.account,
        instance_id=config.strategy_instance,
        exchange_id=config.exchange,
        fees=config.fees(),
        fill_model=config.fill_model(),
    )
    strategy = build_strategy(name, params, paper)
    paper.attach(strategy)
    paper.start()
    paper.run_bars(series.bars())
    paper.stop()

    assert len(result.fills) > 10
    backtest_fills = [(f.client_order_id, f.side, f.price, f.quantity, f.fee, f.ts) for f in result.fills]
    paper_fills = [(f.client_order_id, f.side, f.price, f.quantity, f.fee, f.ts) for f in paper.fills]
    assert backtest_fills == paper_fills
    sent = [a.client_order_id for a in paper.actions if a.kind == "submit"]
    assert [o.client_order_id for o in result.orders] == sent
    final = {o.client_order_id: (o.status, o.filled_quantity) for o in result.orders}
    paper_final = {}
    for order in [*paper.rejections, *paper.open_orders()]:
        status = order.status.value if order.status.is_terminal else "open_at_end"  # as the result marks it
        paper_final[order.client_order_id] = (status, order.filled_quantity)
    for coid, state in paper_final.items():
        assert final[coid] == state
