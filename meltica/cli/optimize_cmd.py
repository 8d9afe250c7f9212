"""``meltica optimize``: parameter sweeps (grid / random) and walk-forward analysis of a strategy.

Examples::

    meltica optimize --strategy momentum --grid fast=5,10,20 --grid slow=50,100 --data bars.csv.gz
    meltica optimize --strategy momentum --random 200 --range fast=5:40 --range slow=50:300 --seed 7 \\
        --data bars.csv.gz --objective sortino --workers 2 --output out/
    meltica optimize --strategy momentum --grid fast=5,10,20 --grid slow=50,100 \\
        --walk-forward in=7d,out=2d,step=2d --data bars.csv.gz

``--path vector`` (the default for ``momentum``) evaluates with the vectorised EMA crossover
(``meltica.backtest.vector``: next-bar-open fills, no stop orders); ``--path engine`` runs every
parameter set through the event-driven engine (``meltica.backtest.engine``).
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from meltica.cli._common import console, database_engine, reports_errors
from meltica.errors import ConfigurationError
from meltica.marketdata.candle_files import FORMAT_HELP, duration_text

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
    from meltica.storage.candles import read_candles

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
    param: Annotated[list[str] | None, typer.Option("--param", help="NAME=VALUE fixed for every run")] = None,
    walk_forward_spec: Annotated[
        str | None, typer.Option("--walk-forward", help="in=SPAN,out=SPAN[,step=SPAN]: 30d, 12h, or bars")
    ] = None,
    data: Annotated[Path | None, typer.Option(help=f"bar file (or .npz). {FORMAT_HELP}")] = None,
    exchange: Annotated[str | None, typer.Option(help="read bars from the database for this exchange")] = None,
    symbol: Annotated[str, typer.Option(help="symbol (database bars and reports)")] = "BTC/USDT:USDT",
    timeframe: Annotated[
        str | None, typer.Option(help="bar timeframe: of --data (checked; inferred if not given) or database (1m)")
    ] = None,
    objective: Annotated[str, typer.Option(help="Metrics field to rank by")] = "sharpe",
    workers: Annotated[int, typer.Option(help="worker processes (default: every core)")] = 0,
    path: Annotated[str, typer.Option(help="vector (fast, EMA crossover) or engine (event-driven)")] = "vector",
    fee_rate: Annotated[float, typer.Option(help="fee per fill, fraction of notional (vector path)")] = 0.001,
    initial_cash: Annotated[float, typer.Option(help="starting cash (vector path)")] = 1_000_000.0,
    top: Annotated[int, typer.Option(help="rows to print")] = 10,
    store: Annotated[bool, typer.Option(help="store every run in the database under one sweep id")] = False,
    output: Annotated[Path | None, typer.Option(help="directory for sweep.csv / sweep.json")] = None,
) -> None:
    """Sweep a strategy's parameters (grid or random) or run a walk-forward analysis; rank by an objective."""
    from meltica.backtest.optimize import VectorEvaluator, grid, random_search, run_sweep

    if path not in ("vector", "engine"):
        raise ConfigurationError("--path must be vector or engine", field="path")
    fixed = {k: v for k, v in (item.partition("=")[::2] for item in (param or []))}
    base = {k: _value(v) for k, v in fixed.items()}
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
    with tempfile.TemporaryDirectory(prefix="meltica-optimize-") as tmp:
        bars_path, timeframe = _bars_file(data, exchange, symbol, timeframe, Path(tmp))
        if path == "engine":
            from meltica.backtest.optimize import EngineEvaluator

            bps = str(fee_rate * 10_000)
            evaluate: Any = EngineEvaluator(
                str(bars_path),
                config={
                    "strategy": strategy,
                    "exchange": exchange or "binance",
                    "symbol": symbol,
                    "timeframe": timeframe,
                    "maker_fee_bps": bps,
                    "taker_fee_bps": bps,
                },
            )
        else:
            if strategy != "momentum":
                raise ConfigurationError(
                    f"the vector path covers momentum only; use --path engine for {strategy!r}", field="path"
                )
            evaluate = VectorEvaluator(
                str(bars_path),
                fee_rate=fee_rate,
                initial_cash=initial_cash,
                mode="cross",
                symbol=symbol,
                timeframe=timeframe,
                quantity=float(base.get("quantity", 1.0)),
            )
        if walk_forward_spec is not None:
            _walk_forward(evaluate, sets.params, bars_path, parse_walk_forward(walk_forward_spec), objective, output)
            return
        result = run_sweep(
            evaluate,
            sets,
            workers=n_workers,
            objective=objective,
            store=database_engine() if store else None,
        )
    names = sorted({k for r in result.runs for k in r.params if k not in base})
    metric_cols = [objective] + [c for c in ("total_return", "sharpe", "max_drawdown", "trades") if c != objective]
    rows = result.rows(metric_cols)
    console.print(
        _table(
            rows[:top],
            ["rank", *(f"param.{n}" for n in names), *metric_cols],
            f"sweep {result.sweep_id} — by {objective}",
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


def _walk_forward(
    evaluate: Any,
    param_sets: list[dict[str, Any]],
    bars_path: Path,
    spans: dict[str, int | timedelta],
    objective: str,
    output: Path | None,
) -> None:
    from meltica.backtest.optimize import LOWER_IS_BETTER
    from meltica.backtest.vector import Bars, load_bars
    from meltica.backtest.walkforward import vector_evaluator, vector_optimiser, walk_forward

    if not hasattr(evaluate, "mode"):
        raise ConfigurationError("--walk-forward runs on the vector path", field="path")
    bars = load_bars(bars_path)
    pairs = [(int(p["fast"]), int(p["slow"])) for p in param_sets]
    sim = {"fee_rate": evaluate.fee_rate, "initial_cash": evaluate.initial_cash, "mode": evaluate.mode}
    warmup = max(s for _, s in pairs)

    def optimise(is_bars: Bars) -> dict[str, Any]:
        best = vector_optimiser(pairs, objective=objective, maximize=objective not in LOWER_IS_BETTER, **sim)(is_bars)
        return {**{k: v for k, v in param_sets[0].items() if k not in ("fast", "slow")}, **best}

    result = walk_forward(
        bars,
        in_sample=spans["in"],
        out_of_sample=spans["out"],
        step=spans.get("step"),
        optimise=optimise,
        evaluate=vector_evaluator(warmup=warmup, **sim),
        warmup=warmup,
        stitch="add",
    )
    rows = result.rows()
    columns = list(rows[0]) if rows else ["window"]
    console.print(_table(rows, columns, f"walk-forward by {objective}"))
    m = result.metrics
    console.print(
        f"stitched out-of-sample: total return {m.total_return:.4%}, sharpe {m.sharpe:.3f}, "
        f"max drawdown {m.max_drawdown:.2%}, final equity {m.final_equity}"
    )
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "walkforward.json").write_text(
            json.dumps(
                {"windows": rows, "equity": result.equity, "metrics": {k: str(v) for k, v in m.as_dict().items()}},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        console.print(f"wrote {output / 'walkforward.json'}")
