"""Walk-forward analysis: optimise on a rolling in-sample window, evaluate on the out-of-sample window
that follows it, stitch the out-of-sample equity curves into one.

Windows (bar counts or durations; a duration is converted per window with the bar timestamps)::

    window k:  in-sample  [s_k, s_k + IS)      out-of-sample  [s_k + IS, s_k + IS + OOS)
               s_0 = 0,   s_{k+1} = s_k + step   (the last out-of-sample window may be shorter)

No look-ahead, by construction: ``optimise`` receives **only** the in-sample slice (a view that ends
before the first out-of-sample bar), so an out-of-sample bar cannot influence the parameters chosen for
it. ``evaluate`` receives the out-of-sample slice, optionally preceded by ``warmup`` bars taken from the
end of the in-sample window (past data, so indicators start warm; the evaluator must not trade in them).

Stitching: the curve of window k is rebased so that it starts at the stitched equity reached at the end
of window k-1 (``stitch="compound"`` scales it, i.e. compounds returns; ``stitch="add"`` shifts it, i.e.
adds PnL — right for fixed-size strategies). Points before the window's first out-of-sample bar (a
warm-up) are dropped; the rebasing anchor is the curve's equity at the window start. When ``step`` is
shorter than the out-of-sample length the windows overlap and only the bars after the previous window's
end are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

import numpy as np

from meltica.backtest.metrics import Metrics, RoundTrip, compute_metrics
from meltica.backtest.optimize import EngineEvaluator, run_sweep, shared_bars
from meltica.backtest.results import BacktestResult
from meltica.backtest.vector import (
    Bars,
    SimConfig,
    VectorRun,
    datetime_to_ns,
    ema_cross,
    ema_cross_sweep,
    ns_to_datetime,
    run_to_result,
)
from meltica.errors import ConfigurationError

Span = int | timedelta
Curve = Sequence[tuple[int, float]]
"""An equity curve as ``(timestamp ns, equity)`` pairs."""
Optimise = Callable[[Bars], Mapping[str, Any]]
Evaluate = Callable[[Bars, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Window:
    """Bar indices of one walk-forward window (half-open ranges into the full bars)."""

    number: int
    in_start: int
    in_stop: int
    out_start: int
    out_stop: int

    def __post_init__(self) -> None:
        if not (self.in_start < self.in_stop <= self.out_start < self.out_stop):
            raise ConfigurationError(f"walk-forward window {self.number} is not in-sample before out-of-sample")


@dataclass(frozen=True)
class WindowResult:
    window: Window
    params: Mapping[str, Any]
    in_sample: tuple[int, int]  # first and last in-sample bar timestamp (ns)
    out_of_sample: tuple[int, int]
    metrics: Metrics  # of this window's out-of-sample curve (as evaluated, before rebasing)
    start_equity: float  # stitched equity when the window started
    end_equity: float


@dataclass(frozen=True)
class WalkForwardResult:
    windows: list[WindowResult]
    equity: list[tuple[int, float]]  # stitched out-of-sample curve, (ts ns, equity)
    metrics: Metrics  # of the stitched curve

    def equity_points(self) -> list[tuple[Any, Decimal]]:
        return [(ns_to_datetime(t), Decimal(repr(e))) for t, e in self.equity]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "window": w.window.number,
                "in_start": ns_to_datetime(w.in_sample[0]).isoformat(),
                "in_end": ns_to_datetime(w.in_sample[1]).isoformat(),
                "out_start": ns_to_datetime(w.out_of_sample[0]).isoformat(),
                "out_end": ns_to_datetime(w.out_of_sample[1]).isoformat(),
                **{f"param.{k}": v for k, v in w.params.items()},
                "oos_total_return": w.metrics.total_return,
                "oos_sharpe": w.metrics.sharpe,
                "oos_trades": w.metrics.trades,
                "start_equity": w.start_equity,
                "end_equity": w.end_equity,
            }
            for w in self.windows
        ]


def _to_bars_count(bars: Bars, at: int, span: Span, name: str) -> int:
    """``span`` as a number of bars starting at index ``at`` (a duration covers the bars whose open time is
    before ``ts[at] + span``)."""
    if isinstance(span, timedelta):
        if span <= timedelta(0):
            raise ConfigurationError(f"walk-forward {name} must be positive", field=name)
        limit = int(bars.ts[at]) + (span // timedelta(microseconds=1)) * 1000
        return int(np.searchsorted(bars.ts, limit, side="left")) - at
    if span <= 0:
        raise ConfigurationError(f"walk-forward {name} must be positive", field=name)
    return int(span)


def windows(bars: Bars, *, in_sample: Span, out_of_sample: Span, step: Span | None = None) -> list[Window]:
    """The windows (module docstring); ``step`` defaults to the out-of-sample length. Only windows with a
    full in-sample period and at least one out-of-sample bar are returned."""
    n = len(bars)
    out: list[Window] = []
    start = 0
    while start < n:
        is_len = _to_bars_count(bars, start, in_sample, "in_sample")
        in_stop = start + is_len
        if is_len <= 0 or in_stop >= n:
            break
        oos_len = _to_bars_count(bars, in_stop, out_of_sample, "out_of_sample")
        out_stop = min(in_stop + max(oos_len, 1), n)
        out.append(Window(len(out), start, in_stop, in_stop, out_stop))
        step_len = _to_bars_count(bars, start, step if step is not None else out_of_sample, "step")
        start += max(step_len, 1)
    return out


def _curve(output: Any, bars: Bars) -> list[tuple[int, float]]:
    """An evaluation's equity curve as (ts ns, equity)."""
    if isinstance(output, VectorRun):
        if output.equity is None:
            raise ValueError("walk-forward evaluate must return a VectorRun with keep_equity=True")
        close_ts = bars.ts + bars.timeframe_ns
        return list(zip(close_ts.tolist(), output.equity.tolist(), strict=True))
    if isinstance(output, BacktestResult):
        return [(datetime_to_ns(p.ts), float(p.equity)) for p in output.equity]
    return [(int(t), float(e)) for t, e in output]


def walk_forward(
    bars: Bars,
    *,
    in_sample: Span,
    out_of_sample: Span,
    step: Span | None = None,
    optimise: Optimise,
    evaluate: Evaluate,
    warmup: int = 0,
    stitch: Literal["compound", "add"] = "compound",
    initial_equity: float | None = None,
) -> WalkForwardResult:
    """Run the walk-forward (module docstring). ``optimise(in_sample_bars) -> params``;
    ``evaluate(out_of_sample_bars, params)`` returns a ``VectorRun`` (with its equity), a
    ``BacktestResult`` or a ``(ts ns, equity)`` sequence. ``initial_equity``: the stitched curve's start
    (default: the first window's own starting equity)."""
    plan = windows(bars, in_sample=in_sample, out_of_sample=out_of_sample, step=step)
    if not plan:
        raise ConfigurationError("walk-forward: the data is too short for one in-sample + out-of-sample window")
    stitched: list[tuple[int, float]] = []
    results: list[WindowResult] = []
    trips: list[RoundTrip] = []
    level = initial_equity
    for w in plan:
        is_bars = bars.slice(w.in_start, w.in_stop)
        params = dict(optimise(is_bars))
        lead = min(warmup, w.out_start - w.in_start)
        oos_bars = bars.slice(w.out_start - lead, w.out_stop)
        output = evaluate(oos_bars, params)
        curve = _curve(output, oos_bars)
        first_oos_ts = int(bars.ts[w.out_start])
        # Keep the window's own points: from its first out-of-sample bar (a warm-up's last close, at the
        # open of that bar, is the anchor) and after anything the previous window already covered.
        anchor_idx = 0
        for i, (t, _) in enumerate(curve):
            if t <= first_oos_ts:
                anchor_idx = i
        kept = [(t, e) for t, e in curve[anchor_idx:] if not stitched or t > stitched[-1][0]]
        if not kept:
            continue
        base = curve[anchor_idx][1]
        if level is None:
            level = base
        if stitch == "compound":
            factor = level / base if base else 0.0
            rebased = [(t, e * factor) for t, e in kept]
        else:
            rebased = [(t, e - base + level) for t, e in kept]
        start_level = level
        stitched.extend(rebased)
        level = rebased[-1][1]
        own = [(ns_to_datetime(t), Decimal(repr(e))) for t, e in curve[anchor_idx:]]
        if isinstance(output, VectorRun):  # its round trips, so the metrics count the window's trades
            output = run_to_result(output, oos_bars, code_version="")
        own_trips = list(output.round_trips) if isinstance(output, BacktestResult) else []
        trips.extend(own_trips)
        window_metrics = compute_metrics(own, own_trips)
        if isinstance(output, BacktestResult) and lead == 0 and output.fill_model.get("kind") != "vector":
            # An engine run of exactly the window: its own metrics — what `meltica backtest` gives on the
            # same bars.
            window_metrics = output.metrics
        results.append(
            WindowResult(
                window=w,
                params=params,
                in_sample=(int(bars.ts[w.in_start]), int(bars.ts[w.in_stop - 1])),
                out_of_sample=(first_oos_ts, int(bars.ts[w.out_stop - 1])),
                metrics=window_metrics,
                start_equity=start_level,
                end_equity=level,
            )
        )
    metrics = compute_metrics([(ns_to_datetime(t), Decimal(repr(e))) for t, e in stitched], trips)
    return WalkForwardResult(windows=results, equity=stitched, metrics=metrics)


def vector_optimiser(
    pairs: Sequence[tuple[int, int]],
    *,
    objective: str = "sharpe",
    maximize: bool = True,
    **sim: Any,
) -> Optimise:
    """An ``optimise`` for the vectorised EMA crossover: the best (fast, slow) of ``pairs`` on the
    in-sample bars by ``objective`` (ties: first in ``pairs``). ``sim``: ``SimConfig`` fields."""
    cfg = SimConfig(**sim)

    def optimise(is_bars: Bars) -> Mapping[str, Any]:
        sweep = ema_cross_sweep(is_bars, pairs, cfg)
        best: tuple[float, int] | None = None
        for i, run in enumerate(sweep.runs):
            raw = getattr(run.metrics, objective)
            v = raw.total_seconds() if isinstance(raw, timedelta) else float(raw)
            if math.isnan(v):
                continue
            score = v if maximize else -v
            if best is None or score > best[0]:
                best = (score, i)
        f, s = pairs[best[1] if best else 0]
        return {"fast": f, "slow": s}

    return optimise


def vector_evaluator(*, warmup: int = 0, **sim: Any) -> Evaluate:
    """An ``evaluate`` for the vectorised EMA crossover that trades only after ``warmup`` leading bars
    (pass the same ``warmup`` to ``walk_forward``)."""
    cfg = SimConfig(**sim)

    def evaluate(oos_bars: Bars, params: Mapping[str, Any]) -> VectorRun:
        lead = min(warmup, len(oos_bars) - 1)
        return ema_cross(
            oos_bars, int(params["fast"]), int(params["slow"]), cfg, trade_from=lead, keep_equity=True, params=params
        )

    return evaluate


def engine_walk_forward_functions(
    data: str,
    config: Mapping[str, Any],
    param_sets: Sequence[Mapping[str, Any]],
    *,
    objective: str = "sharpe",
    maximize: bool = True,
    workers: int = 1,
) -> tuple[Optimise, Evaluate]:
    """``optimise`` and ``evaluate`` through the event-driven engine, for any strategy: the in-sample
    window is swept over ``param_sets`` (``run_sweep`` on ``workers`` processes), the best set by
    ``objective`` is run on the out-of-sample window — exactly what ``meltica backtest`` gives on those
    bars with that set (use ``warmup=0``: the strategy warms up inside the window, as it would live).
    ``data``: the bars file the whole walk-forward reads; ``config``: ``BacktestConfig`` fields."""
    full = shared_bars(data)
    sets = [dict(p) for p in param_sets]

    def span(window: Bars) -> tuple[int, int]:
        start = int(np.searchsorted(full.ts, window.ts[0]))
        return start, start + len(window)

    def optimise(is_bars: Bars) -> Mapping[str, Any]:
        start, stop = span(is_bars)
        sweep = run_sweep(
            EngineEvaluator(data, config=dict(config), start=start, stop=stop),
            sets,
            workers=workers,
            objective=objective,
            maximize=maximize,
        )
        if sweep.best is None:
            failure = sweep.failed[0].error if sweep.failed else "no run"
            raise ConfigurationError(f"walk-forward: every parameter set failed in-sample ({failure})")
        return sweep.best.params

    def evaluate(oos_bars: Bars, params: Mapping[str, Any]) -> BacktestResult:
        start, stop = span(oos_bars)
        return EngineEvaluator(data, config=dict(config), start=start, stop=stop)(params)

    return optimise, evaluate
