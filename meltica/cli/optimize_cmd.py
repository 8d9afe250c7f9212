"""``meltica optimize``: parameter sweeps (grid / random) and walk-forward analysis of a strategy.

Examples::

    meltica optimize --strategy momentum --grid fast=5,10,20 --grid slow=50,100 --data bars.csv.gz
    meltica optimize --strategy momentum --random 200 --range fast=5:40 --range slow=50:300 --seed 7 \\
        --data bars.csv.gz --objective sortino --workers 2 --output out/
    meltica optimize --strategy momentum --grid fast=5,10,20 --grid slow=50,100 \\
        --walk-forward in=7d,out=2d,step=2d --data bars.csv.gz

``--path engine`` (the default) runs every parameter set through the event-driven engine
(``meltica.backtest.engine``) with ``meltica backtest``'s defaults (symbol, cash, fees, the strategy's own
parameter defaults): a set's metrics here are the ones ``meltica backtest`` prints for it, and each
walk-forward window's are those of a backtest of that window's bars. ``--path vector`` (``momentum``
only) evaluates with the vectorised EMA crossover (``meltica.backtest.vector``: next-bar-open fills, no
stop orders, no slippage, no venue filters) — fast, and labelled INEXACT in the output (``"exact": false``
in sweep.json / walkforward.json) unless the stop is switched off (``--param stop=none``), there is
no slippage and every order is within the venue's min notional and the cash.
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from meltica.cli._common import console, database_engine, reports_errors
from meltica.errors import ConfigurationError
from meltica.marketdata.candle_files import FORMAT_HELP, duration_text
from meltica.storage.candles import read_candles
from meltica.strategies import get_strategy, validate_params

OPTIMIZE_EPILOG = (
    "Defaults are backtest's (symbol, cash, fees, the strategy's parameter defaults); the default --path engine "
    "gives for each set the metrics 'meltica backtest' gives, and each walk-forward window those of a backtest "
    "of its bars (any strategy; --param applies to every run). --path vector (momentum only, fast) has no stop "
    'orders, slippage or venue filters: labelled INEXACT ("exact": false in sweep.json / walkforward.json) '
    "unless --param stop=none, no slippage and every order within the venue's min notional and the cash."
)

_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["fast=5,10", "slow=50"]`` → ``{"fast": [5, 10], "slow": [50]}``."""
    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ConfigurationError(f"--grid {item!r}: expected NAME=V1,V2,...", field="grid")
        out[name.strip()] = [_value(v.strip()) for v in values.split(",") if v.strip()]
    return out


def parse_ranges(items: list[str]) -> dict[str, tuple[Any, Any]]:
    """``["fast=5:40"]`` → ``{"fast": (5, 40)}``."""
    out: dict[str, tuple[Any, Any]] = {}
    for item in items:
        name, sep, bounds = item.partition("=")
        lo, colon, hi = bounds.partition(":")
        if not sep or not colon:
            raise ConfigurationError(f"--range {item!r}: expected NAME=LOW:HIGH", field="range")
        out[name.strip()] = (_value(lo.strip()), _value(hi.strip()))
    return out


def parse_span(text: str) -> int | timedelta:
    """``"30d"`` / ``"12h"`` / ``"90m"`` / ``"2w"`` → a duration; a bare integer → a number of bars."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    unit = _UNITS.get(text[-1:].lower())
    if unit is None or not text[:-1].replace(".", "", 1).isdigit():
        raise ConfigurationError(
            f"{text!r}: expected a bar count or a duration like 30d, 12h, 90m", field="walk_forward"
        )
    return unit * float(text[:-1])


def parse_walk_forward(text: str) -> dict[str, int | timedelta]:
    """``"in=30d,out=7d,step=7d"`` → the ``walk_forward`` spans (``step`` defaults to ``out``)."""
    parts: dict[str, int | timedelta] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("in", "out", "step"):
            raise ConfigurationError(
                f"--walk-forward {text!r}: expected in=SPAN,out=SPAN[,step=SPAN]", field="walk_forward"
            )
        parts[key] = parse_span(value)
    if "in" not in parts or "out" not in parts:
        raise ConfigurationError("--walk-forward needs in= and out=", field="walk_forward")
    return parts


def _bars_file(
    data: Path | None, exchange: str | None, symbol: str, timeframe: str | None, workdir: Path
) -> tuple[Path, str]:
    """The bars as a ``.npz`` the workers load by path, and their timeframe: ``--data`` read and checked
    once by the loader ``backtest`` uses (timeframe checked or inferred), or the database's bars."""
    from meltica.backtest.vector import load_bars

    if data is not None:
        bars = load_bars(data, timeframe)
        inferred = duration_text(timedelta(microseconds=bars.timeframe_ns // 1000))
        return bars.save_npz(workdir / "bars.npz"), timeframe or inferred
    timeframe = timeframe or "1m"
    if exchange is None:
        raise ConfigurationError("give --data FILE or --exchange (with --symbol, --timeframe)", field="data")
    import numpy as np

    from meltica.backtest.vector import Bars, datetime_to_ns

    rows = read_candles(database_engine(), exchange=exchange, symbol=symbol, timeframe=timeframe)
    bars = Bars(
        ts=np.array([datetime_to_ns(r.ts) for r in rows], dtype=np.int64),
        open=np.array([float(r.open) for r in rows]),
        high=np.array([float(r.high) for r in rows]),
        low=np.array([float(r.low) for r in rows]),
        close=np.array([float(r.close) for r in rows]),
        volume=np.array([float(r.volume) for r in rows]),
    )
    return bars.save_npz(workdir / "bars.npz"), timeframe


def _table(rows: list[dict[str, Any]], columns: list[str], title: str) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v))
        table.add_row(*cells)
    return table


@reports_errors
def optimize(
    strategy: Annotated[
        str, typer.Option(help="a registered name, path/to/file.py:Class or module:Class")
    ] = "momentum",
    grid_spec: Annotated[list[str] | None, typer.Option("--grid", help="NAME=V1,V2,... (repeatable)")] = None,
    random_n: Annotated[int | None, typer.Option("--random", help="draw N random parameter sets")] = None,
    range_spec: Annotated[list[str] | None, typer.Option("--range", help="NAME=LOW:HIGH for --random")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="NAME=VALUE fixed for every run (walk-forward too)")
    ] = None,
    walk_forward_spec: Annotated[
        str | None, typer.Option("--walk-forward", help="in=SPAN,out=SPAN[,step=SPAN]: 30d, 12h, or bars")
    ] = None,
    data: Annotated[Path | None, typer.Option(help=f"bar file (or .npz). {FORMAT_HELP}")] = None,
    exchange: Annotated[str | None, typer.Option(help="read bars from the database for this exchange")] = None,
    symbol: Annotated[str, typer.Option(help="unified symbol traded (as backtest's --symbol)")] = "BTC/USDT",
    timeframe: Annotated[
        str | None, typer.Option(help="bar timeframe: of --data (checked; inferred if not given) or database (1m)")
    ] = None,
    objective: Annotated[str, typer.Option(help="Metrics field to rank by")] = "sharpe",
    workers: Annotated[int, typer.Option(help="worker processes (default: every core)")] = 0,
    path: Annotated[
        str,
        typer.Option(
            help="engine (every strategy; the numbers `meltica backtest` gives) or vector (momentum only, fast; "
            "labelled INEXACT where it can differ)"
        ),
    ] = "engine",
    fees_bps: Annotated[str, typer.Option("--fees-bps", help="fee per fill in bps of notional (as backtest)")] = "10",
    slippage_bps: Annotated[str, typer.Option("--slippage-bps", help="taker slippage in bps (as backtest)")] = "0",
    initial_cash: Annotated[str, typer.Option(help="starting cash in the quote currency (as backtest)")] = "10000",
    top: Annotated[int, typer.Option(help="rows to print")] = 10,
    store: Annotated[bool, typer.Option(help="store every run in the database under one sweep id")] = False,
    output: Annotated[Path | None, typer.Option(help="directory for sweep.csv / sweep.json")] = None,
) -> None:
    """Sweep a strategy's parameters (grid or random) or run a walk-forward analysis; rank by an objective.
    Defaults (symbol, cash, fees, the strategy's own parameter defaults) are `meltica backtest`'s: one
    parameter set gives the same metrics here (engine path) as there."""
    from meltica.backtest.config import default_instrument
    from meltica.backtest.optimize import VectorEvaluator, grid, random_search, run_sweep, shared_bars

    if path not in ("vector", "engine"):
        raise ConfigurationError("--path must be vector or engine", field="path")
    fees, slippage, cash = (
        _decimal_option(fees_bps, "fees-bps"),
        _decimal_option(slippage_bps, "slippage-bps"),
        _decimal_option(initial_cash, "initial-cash"),
    )
    base: dict[str, Any] = {}
    for item in param or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--param {item!r}: expected NAME=VALUE", field="param")
        base[key.strip()] = _value(raw.strip())
    if _has_symbol(strategy):
        base.setdefault("symbol", symbol)  # as backtest binds it: the strategy trades the run's symbol
    if random_n is not None:
        sets = random_search(strategy, random_n, seed=seed, ranges=parse_ranges(range_spec or []) or None, base=base)
    elif grid_spec:
        sets = grid(parse_grid(grid_spec), strategy=strategy, base=base)
    else:
        raise ConfigurationError("give --grid NAME=V1,V2 (repeatable) or --random N", field="grid")
    if not sets.params:
        raise ConfigurationError(f"no valid parameter set ({sets.invalid} invalid: {'; '.join(sets.reasons[:2])})")
    console.print(f"{len(sets)} parameter sets ({sets.invalid} invalid and {sets.duplicates} duplicate skipped)")
    n_workers = workers or os.cpu_count() or 1
    quote = default_instrument(exchange or "binance", symbol).quote
    inexact: str | None = None
    with tempfile.TemporaryDirectory(prefix="meltica-optimize-") as tmp:
        bars_path, timeframe = _bars_file(data, exchange, symbol, timeframe, Path(tmp))
        config: dict[str, Any] = {
            "strategy": strategy,
            "exchange": exchange or "binance",
            "symbol": symbol,
            "timeframe": timeframe,
            "maker_fee_bps": str(fees),
            "taker_fee_bps": str(fees),
            "slippage_bps": str(slippage),
            "initial_balances": {quote: str(cash)},
        }
        if path == "engine":
            from meltica.backtest.optimize import EngineEvaluator

            evaluate: Any = EngineEvaluator(str(bars_path), config=config)
        else:
            if strategy != "momentum":
                raise ConfigurationError(
                    f"the vector path covers momentum only; use --path engine for {strategy!r}", field="path"
                )
            effective = [validate_params(strategy, p) for p in sets.params]
            reasons = []
            if any(getattr(p, "stop", "none") != "none" for p in effective):
                reasons.append("it places no stop orders (the engine does: --param stop=none to match)")
            if slippage:
                reasons.append("it has no slippage model")
            closes = shared_bars(bars_path).close
            market = default_instrument(exchange or "binance", symbol)
            sizes = [Decimal(str(getattr(p, "quantity", 1))) for p in effective]
            low, high = Decimal(repr(float(closes.min()))), Decimal(repr(float(closes.max())))
            if any(q * low < (market.min_notional or 0) or q * high * (1 + fees / 10_000) > cash for q in sizes):
                reasons.append("some orders would be refused by the venue (below its min notional, or beyond the cash)")
            if reasons:
                inexact = "the vector path differs from `meltica backtest`: " + "; ".join(reasons)
                console.print(
                    f"[bold yellow]vector path: INEXACT[/] — {escape(inexact)}; rerun the best sets with --path engine"
                )
            evaluate = VectorEvaluator(
                str(bars_path),
                fee_rate=float(fees / 10_000),
                initial_cash=float(cash),
                mode="cross",
                symbol=symbol,
                timeframe=timeframe,
                quantity=float(getattr(effective[0], "quantity", 1)),
            )
        if walk_forward_spec is not None:
            _walk_forward(
                evaluate,
                sets.params,
                bars_path,
                parse_walk_forward(walk_forward_spec),
                objective,
                output,
                config=config,
                workers=n_workers,
                inexact=inexact,
            )
            return
        result = run_sweep(
            evaluate,
            sets,
            workers=n_workers,
            objective=objective,
            store=database_engine() if store else None,
        )
    result = replace(result, path=path, inexact=inexact)
    names = sorted({k for r in result.runs for k in r.params if k not in base})
    metric_cols = [objective] + [c for c in ("total_return", "sharpe", "max_drawdown", "trades") if c != objective]
    rows = result.rows(metric_cols)
    console.print(
        _table(
            rows[:top],
            ["rank", *(f"param.{n}" for n in names), *metric_cols],
            f"sweep {result.sweep_id} — by {objective}, {path} path" + (" (INEXACT)" if inexact else ""),
        )
    )
    console.print(
        f"{len(result.runs)} runs, {len(result.failed)} failed, {result.seconds:.2f} s on {result.workers} workers, "
        f"{result.evaluations_per_second:,.0f} bar-evaluations/s" + (f", {result.stored} stored" if store else "")
    )
    for f in result.failed[:3]:
        console.print(f"[red]failed[/] {f.params}: {f.error}")
    if output is not None:
        for written in result.write(output):
            console.print(f"wrote {written}")


def _decimal_option(value: str, name: str) -> Decimal:
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ConfigurationError(f"--{name} {value!r} is not a number", field=name) from None
    if not number.is_finite() or number < 0:
        raise ConfigurationError(f"--{name} {value!r} must be a finite number >= 0", field=name)
    return number


def _has_symbol(strategy: str) -> bool:
    return "symbol" in get_strategy(strategy).Params.model_fields


def _walk_forward(
    evaluate: Any,
    param_sets: list[dict[str, Any]],
    bars_path: Path,
    spans: dict[str, int | timedelta],
    objective: str,
    output: Path | None,
    *,
    config: dict[str, Any],
    workers: int,
    inexact: str | None,
) -> None:
    from meltica.backtest.optimize import LOWER_IS_BETTER
    from meltica.backtest.vector import Bars, load_bars
    from meltica.backtest.walkforward import (
        engine_walk_forward_functions,
        vector_evaluator,
        vector_optimiser,
        walk_forward,
    )

    bars = load_bars(bars_path)
    maximize = objective not in LOWER_IS_BETTER
    if hasattr(evaluate, "mode"):  # the vector path
        pairs = [(int(p["fast"]), int(p["slow"])) for p in param_sets]
        sim = {
            "fee_rate": evaluate.fee_rate,
            "initial_cash": evaluate.initial_cash,
            "mode": evaluate.mode,
            "quantity": float(param_sets[0].get("quantity", evaluate.quantity)),
            "allow_short": bool(param_sets[0].get("allow_short", evaluate.allow_short)),
        }
        warmup = max(s for _, s in pairs)

        def vector_optimise(is_bars: Bars) -> dict[str, Any]:
            best = vector_optimiser(pairs, objective=objective, maximize=maximize, **sim)(is_bars)
            return {**{k: v for k, v in param_sets[0].items() if k not in ("fast", "slow")}, **best}

        optimise: Any = vector_optimise
        window_evaluate: Any = vector_evaluator(warmup=warmup, **sim)
    else:  # the engine path: any strategy, each window exactly a backtest of its bars
        warmup = 0
        optimise, window_evaluate = engine_walk_forward_functions(
            str(bars_path), config, param_sets, objective=objective, maximize=maximize, workers=workers
        )
    result = walk_forward(
        bars,
        in_sample=spans["in"],
        out_of_sample=spans["out"],
        step=spans.get("step"),
        optimise=optimise,
        evaluate=window_evaluate,
        warmup=warmup,
        stitch="add",
    )
    rows = result.rows()
    columns = list(rows[0]) if rows else ["window"]
    path = "vector" if hasattr(evaluate, "mode") else "engine"
    console.print(
        _table(rows, columns, f"walk-forward by {objective}, {path} path" + (" (INEXACT)" if inexact else ""))
    )
    m = result.metrics
    console.print(
        f"stitched out-of-sample: total return {m.total_return:.4%}, sharpe {m.sharpe:.3f}, "
        f"max drawdown {m.max_drawdown:.2%}, trades {m.trades}, final equity {m.final_equity}"
    )
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "walkforward.json").write_text(
            json.dumps(
                {
                    "path": path,
                    "exact": inexact is None,
                    "inexact": inexact,
                    "windows": rows,
                    "equity": result.equity,
                    "metrics": {k: str(v) for k, v in m.as_dict().items()},
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        console.print(f"wrote {output / 'walkforward.json'}")
