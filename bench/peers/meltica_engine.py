"""Meltica runner — the plug-in point for Meltica's backtest engine. Runs in ``/work/main/.venv``.

Until ``meltica/backtest/engine.py`` exists this prints ``meltica backtest engine not available yet`` and
reports itself skipped; the harness then leaves Meltica out of the table and the ratios.

The workload is written as an ordinary Meltica strategy (``meltica.strategies.Strategy``, streaming
``meltica.strategies.indicators.EMA``), so the benchmark measures what a user's strategy costs, not a
special path. Expected engine API (what this runner calls; if the engine lands with another shape,
change ``_run_single`` / ``_run_sweep`` and ``bench/README.md`` — never the workload)::

    # meltica/backtest/engine.py
    def run_backtest(
        strategy: type[Strategy],                 # constructed by the engine as strategy(params, ctx)
        params: Mapping[str, Any] | BaseModel,    # validated with strategy.Params
        bars: Mapping[str, numpy.ndarray],        # columnar bars, see below
        *,
        exchange: str,                            # "binance"
        symbol: str,                              # "BTC/USDT:USDT"
        timeframe: str,                           # "1m"
        fee_rate: Decimal,                        # Decimal("0.001") of notional, every fill (maker = taker)
        initial_cash: Decimal,                    # Decimal(10_000_000), quote currency
    ) -> meltica.backtest.BacktestResult

* ``bars``: equal-length arrays ``"ts"`` (int64 ns since epoch UTC, bar **open** time), ``"open"``,
  ``"high"``, ``"low"``, ``"close"``, ``"volume"`` (float64) — exactly what ``_common.load_bars`` returns.
* fills: a market order sent from ``on_bar`` of bar t fills at bar t+1's open (no look-ahead); one still
  pending when the data ends is not filled. ``ctx.position(symbol)`` includes every fill so far.
* result: ``len(result.fills)`` is the number of fills; ``result.metrics.final_equity - initial_cash``
  the PnL (an open position marked at the last close).

Sweep path (optional; compared with vectorbt's ``Portfolio.from_signals`` over the same grid)::

    # meltica/backtest/engine.py (or meltica/backtest/sweep.py)
    def run_sweep(
        strategy: type[Strategy],
        grid: Mapping[str, Sequence[Any]],        # {"fast": SWEEP_FAST, "slow": SWEEP_SLOW}: the product
        bars: Mapping[str, numpy.ndarray],
        *,
        base_params: Mapping[str, Any],           # the other parameters (symbol, quantity)
        exchange: str, symbol: str, timeframe: str, fee_rate: Decimal, initial_cash: Decimal,
    ) -> Sequence[meltica.backtest.BacktestResult]   # one per combination, result.params holds it

Rate reported: combinations x bars / seconds ("bar-evaluations per second"), as for vectorbt.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent.parent))  # the repository root: meltica from the working tree

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

NOT_AVAILABLE = "meltica backtest engine not available yet"
EXCHANGE, SYMBOL, TIMEFRAME = "binance", "BTC/USDT:USDT", "1m"
ENGINE_KWARGS: dict[str, Any] = {
    "exchange": EXCHANGE,
    "symbol": SYMBOL,
    "timeframe": TIMEFRAME,
    "fee_rate": Decimal(str(FEE_RATE)),
    "initial_cash": Decimal(int(INITIAL_CASH)),
}
BASE_PARAMS: dict[str, Any] = {"symbol": SYMBOL, "quantity": Decimal(str(QUANTITY))}


def _import_engine() -> Any | None:
    try:
        engine = importlib.import_module("meltica.backtest.engine")
    except ModuleNotFoundError as exc:  # only "not there yet" is a skip; a broken engine must fail loudly
        if exc.name in ("meltica.backtest", "meltica.backtest.engine"):
            return None
        raise
    return engine


def _strategy_class() -> type:
    """The bench workload as a Meltica strategy (built lazily: meltica is imported only when needed)."""
    from meltica.strategies import Strategy, StrategyParams
    from meltica.strategies.indicators import EMA

    class BenchEmaCrossParams(StrategyParams):
        symbol: str = SYMBOL
        quantity: Decimal = Decimal(str(QUANTITY))
        fast: int = FAST
        slow: int = SLOW

    class BenchEmaCross(Strategy[BenchEmaCrossParams]):
        """Long-only EMA fast/slow: flat and fast > slow -> buy ``quantity``; long and fast < slow -> sell all."""

        name = "bench_ema_cross"  # deliberately not registered: a bench fixture, not a product strategy
        Params = BenchEmaCrossParams
        bar_prices = "float"  # on_bar reads float(bar.close) only: take a FloatBar (bench/README.md)

        def __init__(self, params: BenchEmaCrossParams, ctx: Any) -> None:
            super().__init__(params, ctx)
            self.fast = EMA(params.fast)  # seeded with the first close, ready after `period` values
            self.slow = EMA(params.slow)
            self.symbol = params.symbol
            self.quantity = params.quantity

        def on_bar(self, bar: Any) -> None:
            close = float(bar.close)
            fast = self.fast.update(close)
            slow = self.slow.update(close)
            if not self.slow.ready:
                return
            position = self.ctx.position(self.symbol).quantity
            if position == 0 and fast > slow:
                self.ctx.buy(self.symbol, self.quantity)
            elif position > 0 and fast < slow:
                self.ctx.sell(self.symbol, position)

    return BenchEmaCross


def _config(params: Mapping[str, Any]) -> Any:
    """The workload as a ``BacktestConfig``: fee 0.1 % maker = taker, charged in USDT; no slippage."""
    from meltica.backtest import BacktestConfig

    fee_bps = ENGINE_KWARGS["fee_rate"] * 10_000
    return BacktestConfig.model_validate(
        {
            "strategy": "bench_ema_cross",
            "params": dict(params),
            "exchange": EXCHANGE,
            "symbol": SYMBOL,
            "timeframe": TIMEFRAME,
            "maker_fee_bps": fee_bps,
            "taker_fee_bps": fee_bps,
            "fee_asset": "quote",
            "initial_balances": {"USDT": ENGINE_KWARGS["initial_cash"]},
        }
    )


def _run_single(engine: Any, bars: Mapping[str, Any]) -> tuple[int, float]:
    # meltica.backtest.run_backtest(config, bars, *, strategy=cls): the engine's API (bench/README.md).
    result = engine.run_backtest(_config(BASE_PARAMS), bars, strategy=_strategy_class())
    return len(result.fills), float(result.metrics.final_equity) - INITIAL_CASH


def _find_sweep(engine: Any) -> Any | None:
    if hasattr(engine, "run_sweep"):
        return engine.run_sweep
    try:
        sweep = importlib.import_module("meltica.backtest.sweep")
    except ModuleNotFoundError as exc:
        if exc.name != "meltica.backtest.sweep":
            raise
    else:
        return getattr(sweep, "run_sweep", None)
    try:  # meltica.backtest.optimize.run_sweep(evaluate, param_sets, ...): adapted below
        optimize = importlib.import_module("meltica.backtest.optimize")
    except ModuleNotFoundError as exc:
        if exc.name == "meltica.backtest.optimize":
            return None
        raise
    if _DATA_PATH is not None:
        optimize.shared_bars(str(_DATA_PATH))  # loaded here, before the timed loop (as every peer's data)
    return _optimize_sweep(optimize)


def _optimize_sweep(optimize: Any) -> Any:
    """``meltica.backtest.optimize.run_sweep`` in the shape above: the grid through its vectorised
    evaluator (``VectorEvaluator``, ``mode="state"``: this workload's rule; ``meltica optimize --path
    vector``) in this process (``workers=1``: the CPU column counts this process only). Each
    combination comes back as ``(params, fills, pnl)``."""

    def run_sweep(
        strategy: type,
        grid: Mapping[str, Sequence[Any]],
        bars: Mapping[str, Any],
        *,
        base_params: Mapping[str, Any],
        exchange: str,
        symbol: str,
        timeframe: str,
        fee_rate: Decimal,
        initial_cash: Decimal,
    ) -> list[tuple[Mapping[str, Any], int, float]]:
        evaluator = optimize.VectorEvaluator(
            data=str(_DATA_PATH),
            quantity=float(base_params["quantity"]),
            fee_rate=float(fee_rate),
            initial_cash=float(initial_cash),
            mode="state",
            strategy=strategy.name,
            exchange=exchange,
            symbol=symbol,
            timeframe=timeframe,
        )
        result = optimize.run_sweep(evaluator, optimize.grid(grid), workers=1, objective="total_return")
        out = []
        for run in sorted(result.runs, key=lambda r: r.index):
            m = run.metrics
            fills = 2 * m.trades + m.open_trades  # one lot: a round trip is two fills, an open one is one
            out.append((run.params, fills, float(m.final_equity) - float(initial_cash)))
        return out

    return run_sweep


_DATA_PATH: Path | None = None  # the --data file (the vectorised evaluator loads it once per process)


def _engine_check(
    engine: Any, bars: Mapping[str, Any], swept: list[tuple[Mapping[str, Any], int, float]]
) -> dict[str, Any]:
    """The engine (``run_backtest``, the bench strategy) on two of the swept pairs: same fills and PnL?"""
    out: dict[str, Any] = {}
    for fast, slow in ((FAST, SLOW), (SWEEP_FAST[-1], SWEEP_SLOW[-1])):
        got = next((r for r in swept if r[0].get("fast") == fast and r[0].get("slow") == slow), None)
        if got is None:
            continue
        config = _config({**BASE_PARAMS, "fast": fast, "slow": slow})
        result = engine.run_backtest(config, bars, strategy=_strategy_class())
        fills, pnl = len(result.fills), float(result.metrics.final_equity) - INITIAL_CASH
        out[f"{fast}/{slow}"] = {
            "sweep": [got[1], got[2]],
            "engine": [fills, pnl],
            "equal": got[1] == fills and abs(got[2] - pnl) < 1e-6 * max(1.0, abs(pnl)),
        }
    return out


def _run_sweep(run_sweep: Any, bars: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], int, float]]:
    grid: dict[str, Sequence[Any]] = {"fast": SWEEP_FAST, "slow": SWEEP_SLOW}
    out = run_sweep(_strategy_class(), grid, bars, base_params=BASE_PARAMS, **ENGINE_KWARGS)
    return [
        r if isinstance(r, tuple) else (r.params, len(r.fills), float(r.metrics.final_equity) - INITIAL_CASH)
        for r in out
    ]


def main() -> None:
    args = parse_args()
    engine = _import_engine()
    if engine is None:
        print(NOT_AVAILABLE)
        emit({"engine": "meltica sweep" if args.sweep else "meltica", "skipped": NOT_AVAILABLE})
        return
    import meltica

    version = getattr(meltica, "__version__", "working tree")
    with Timer() as load:
        bars = load_bars(args.data)
    n = len(bars["ts"])
    base = {"version": version, "bars": n, "load_seconds": load.seconds, "rss_before_loop_mb": peak_rss_mb()}
    if args.sweep:
        global _DATA_PATH
        _DATA_PATH = Path(args.data).resolve()
        run_sweep = _find_sweep(engine)
        if run_sweep is None:
            emit({"engine": "meltica sweep", "skipped": "meltica sweep path not available yet"})
            return
        with Timer() as loop:
            results = _run_sweep(run_sweep, bars)
        ref = next((r for r in results if r[0].get("fast") == FAST and r[0].get("slow") == SLOW), None)
        check = _engine_check(engine, bars, results)  # after the timed loop: not part of the rate
        for pair, c in check.items():
            print(f"sweep vs engine {pair}: sweep {c['sweep']} engine {c['engine']} equal={c['equal']}")
        emit(
            {
                **base,
                "engine": "meltica sweep",
                "pairs": len(results),
                "evaluations": len(results) * n,
                "seconds": loop.seconds,
                "cpu_seconds": loop.cpu_seconds,
                "fills": ref[1] if ref else None,
                "pnl": ref[2] if ref else None,
                "engine_check": check,
            }
        )
        return
    with Timer() as loop:
        fills, pnl = _run_single(engine, bars)
    emit(
        {
            **base,
            "engine": "meltica",
            "seconds": loop.seconds,
            "cpu_seconds": loop.cpu_seconds,
            "fills": fills,
            "pnl": pnl,
        }
    )


if __name__ == "__main__":
    main()
