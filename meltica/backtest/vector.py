"""Vectorised backtests: whole-array evaluation of strategies whose signals are expressible on arrays.

The event-driven engine (``meltica.backtest.engine``) is the reference: it runs any strategy through the
one matching engine. This module is the fast path for parameter sweeps of strategies whose decisions
are a function of the bar arrays alone — for now the EMA fast/slow crossover of ``momentum`` (and the
benchmark's "state" variant of it). It must agree with the engine; ``tests/unit/test_vector*.py``
checks it against a plain bar loop and ``tests/integration/test_optimize*.py`` against the engine.

Model (the engine's semantics for market orders on bars, without stops):

* EMA(n) of the close, ``alpha = 2 / (n + 1)``, seeded with the first close and "ready" after ``n``
  values — exactly ``meltica.strategies.indicators.EMA``. Decisions start at bar ``slow - 1``.
* signal = +1 when EMA(fast) > EMA(slow), -1 when below, unchanged on a tie (0 until the first
  non-tie). The target position is ``+quantity`` for +1 and ``-quantity`` / flat for -1
  (``allow_short``). ``mode="cross"`` (the ``momentum`` strategy) moves to the target only from the
  first signal *change* on; ``mode="state"`` (the benchmark workload) holds the target from the first
  ready bar.
* A decision on bar t's close fills at bar t+1's **open** (no look-ahead); a decision on the last bar
  is not filled. Fee: ``fee_rate`` of the notional on every fill. Equity is marked at each bar's
  close: ``cash + position × close``.
* No protective stops: ``momentum``'s stop is not modelled, so parity with the engine holds for a
  stop that never triggers (e.g. ``stop="percent", stop_pct=49`` on these data).

Exact decisions, fast EMAs: each span's EMA is computed once per data set (``EmaCache``) with pandas'
compiled ``ewm(adjust=False)`` — about 15x faster than a Python loop. Its rounding differs from the
streaming recursion ``v += alpha × (x - v)`` by about 1e-15 relative, which could flip a decision only
when the two EMAs are within that distance of each other. Every evaluation checks for such a near-tie
(a rigorous bound, ``_tie_band``) and, if one occurs, recomputes both spans with the exact recursion,
so the decisions are always the streaming indicator's. Money is float64 here (DESIGN.md §4 allows
floats for statistics); the engine's ``Decimal`` arithmetic differs by float rounding only.
Measured against ``run_backtest`` (momentum, BTC/USDT, 0.01 BTC, 10 bps, 4-5k real 1m bars): identical
fill timestamps, sides and prices, final equity within 2e-12 USDT (the test asserts 1e-9).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from meltica.backtest.metrics import SECONDS_PER_YEAR, Metrics
from meltica.backtest.results import BacktestResult, EquityPoint
from meltica.domain import Fill, Side
from meltica.errors import DataValidationError
from meltica.marketdata.candle_files import read_candle_file
from meltica.strategies.indicators import EMA

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Mode = Literal["cross", "state"]

_EPS = float(np.finfo(np.float64).eps)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BAR_COLUMNS = ("open", "high", "low", "close", "volume")
_TIME_COLUMNS = ("ts", "timestamp", "date", "time", "open_time")


# --- bars as arrays --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Bars:
    """Equal-length bar columns: ``ts`` int64 nanoseconds since the epoch (UTC, bar **open** time),
    strictly increasing; ``open``/``high``/``low``/``close``/``volume`` float64. ``timeframe_ns`` is the
    bar length (inferred from the median spacing when not given); a bar closes at ``ts + timeframe_ns``."""

    ts: IntArray
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray
    timeframe_ns: int = 0

    def __post_init__(self) -> None:
        n = len(self.ts)
        for name in _BAR_COLUMNS:
            if len(getattr(self, name)) != n:
                raise DataValidationError(f"bar column {name!r} has {len(getattr(self, name))} rows, ts has {n}")
        if n >= 2 and not bool(np.all(np.diff(self.ts) > 0)):
            raise DataValidationError("bar timestamps are not strictly increasing", reason="unordered_bars")
        if self.timeframe_ns <= 0:
            spacing = int(np.median(np.diff(self.ts))) if n >= 2 else 60_000_000_000
            object.__setattr__(self, "timeframe_ns", spacing)

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def from_mapping(cls, columns: Mapping[str, Any], *, timeframe_ns: int = 0) -> Bars:
        """From ``{"ts": int64 ns, "open": ..., ...}`` (the benchmark's format) or any array-likes."""
        time_key = next((k for k in _TIME_COLUMNS if k in columns), None)
        if time_key is None:
            raise DataValidationError(f"no time column (one of {', '.join(_TIME_COLUMNS)})")
        ts = np.asarray(columns[time_key])
        if np.issubdtype(ts.dtype, np.datetime64):
            ts = ts.astype("datetime64[ns]").astype(np.int64)
        arrays = {name: np.ascontiguousarray(columns[name], dtype=np.float64) for name in _BAR_COLUMNS}
        return cls(ts=np.ascontiguousarray(ts, dtype=np.int64), timeframe_ns=timeframe_ns, **arrays)

    def slice(self, start: int, stop: int) -> Bars:
        """Bars ``start`` (inclusive) to ``stop`` (exclusive): views, no copy."""
        return Bars(
            ts=self.ts[start:stop],
            open=self.open[start:stop],
            high=self.high[start:stop],
            low=self.low[start:stop],
            close=self.close[start:stop],
            volume=self.volume[start:stop],
            timeframe_ns=self.timeframe_ns,
        )

    def copy(self) -> Bars:
        return Bars(
            ts=self.ts.copy(),
            open=self.open.copy(),
            high=self.high.copy(),
            low=self.low.copy(),
            close=self.close.copy(),
            volume=self.volume.copy(),
            timeframe_ns=self.timeframe_ns,
        )

    def datetime_at(self, index: int) -> datetime:
        return ns_to_datetime(int(self.ts[index]))

    def as_mapping(self) -> dict[str, npt.NDArray[Any]]:
        return {"ts": self.ts, **{name: getattr(self, name) for name in _BAR_COLUMNS}}

    def save_npz(self, path: str | Path) -> Path:
        """Write an uncompressed ``.npz`` (what sweep workers load by path instead of unpickling bars)."""
        out = Path(path)
        np.savez(out, **self.as_mapping())  # type: ignore[arg-type]
        return out


def ns_to_datetime(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def datetime_to_ns(ts: datetime) -> int:
    if ts.tzinfo is None:
        raise DataValidationError("timestamps must be timezone-aware", reason="naive_timestamp")
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def load_bars(path: str | Path, timeframe: str | None = None) -> Bars:
    """Bars from ``.npz`` (columns ``ts``, ``open`` … ``volume``) or any bar file ``read_candle_file``
    accepts (CSV, Feather, Parquet, freqtrade/pandas JSON: the same loader and checks as ``backtest``);
    ``timeframe`` is checked against the bars' spacing, or inferred from it when ``None``."""
    p = Path(path)
    if not p.is_file():
        raise DataValidationError(f"{p}: no such file", source=str(p))
    if [s.lower() for s in p.suffixes][-1:] == [".npz"]:
        with np.load(p) as z:
            return Bars.from_mapping({k: z[k] for k in z.files})

    parsed = read_candle_file(p, timeframe)
    rows = parsed.rows
    return Bars(
        ts=np.fromiter((datetime_to_ns(r.ts) for r in rows), dtype=np.int64, count=len(rows)),
        open=np.fromiter((float(r.open) for r in rows), dtype=np.float64, count=len(rows)),
        high=np.fromiter((float(r.high) for r in rows), dtype=np.float64, count=len(rows)),
        low=np.fromiter((float(r.low) for r in rows), dtype=np.float64, count=len(rows)),
        close=np.fromiter((float(r.close) for r in rows), dtype=np.float64, count=len(rows)),
        volume=np.fromiter((float(r.volume) for r in rows), dtype=np.float64, count=len(rows)),
        timeframe_ns=parsed.timeframe.seconds * 1_000_000_000,
    )


# --- EMAs ------------------------------------------------------------------------------------


def ema_exact(values: FloatArray, span: int) -> FloatArray:
    """EMA bit-for-bit as ``meltica.strategies.indicators.EMA`` (``v += alpha × (x - v)``); a Python loop."""
    alpha = 2.0 / (span + 1)
    out = [0.0] * len(values)
    it = iter(values.tolist())
    v = next(it, 0.0)
    if out:
        out[0] = v
    for i, x in enumerate(it, start=1):
        v += alpha * (x - v)
        out[i] = v
    return np.asarray(out, dtype=np.float64)


def ema_fast(values: FloatArray, span: int) -> FloatArray:
    """The same EMA through pandas' compiled ``ewm(span, adjust=False)`` (differs by float rounding)."""
    # lazy: pandas takes about a second to import; only this reference EMA uses it
    import pandas as pd

    result: FloatArray = pd.Series(values, copy=False).ewm(span=span, adjust=False).mean().to_numpy(np.float64)
    return result


class EmaCache:
    """Each span's EMA of one close series, computed once and shared by every pair that uses it."""

    def __init__(self, close: FloatArray) -> None:
        self.close = np.ascontiguousarray(close, dtype=np.float64)
        self.scale = float(np.max(np.abs(self.close))) if len(self.close) else 0.0
        self._fast: dict[int, FloatArray] = {}
        self._exact: dict[int, FloatArray] = {}
        self.exact_fallbacks = 0

    def fast(self, span: int) -> FloatArray:
        got = self._fast.get(span)
        if got is None:
            got = self._fast[span] = ema_fast(self.close, span)
        return got

    def exact(self, span: int) -> FloatArray:
        got = self._exact.get(span)
        if got is None:
            got = self._exact[span] = ema_exact(self.close, span)
        return got

    def warm(self, spans: Iterable[int]) -> None:
        for span in spans:
            self.fast(span)

    def difference(self, fast: int, slow: int, start: int) -> FloatArray:
        """``EMA(fast) - EMA(slow)`` from bar ``start`` on, with the streaming indicator's sign on every bar."""
        d = self.fast(fast)[start:] - self.fast(slow)[start:]
        band = _tie_band(self.scale, fast, slow)
        if d.size and float(np.min(np.abs(d))) <= band:
            # A near-tie: pandas' rounding could decide differently from the streaming EMA. Use the exact one.
            self.exact_fallbacks += 1
            d = self.exact(fast)[start:] - self.exact(slow)[start:]
        return d


def _tie_band(scale: float, fast: int, slow: int) -> float:
    """A bound on ``|ema_fast - ema_exact|`` summed over both spans. Each step of either recursion rounds
    by at most ~3 ulp of the scale; the recursion contracts errors by ``1 - alpha`` per step, so the
    accumulated error stays below ``3 eps scale / alpha``. Doubled for the two recursions and again for
    margin (observed errors are ~100x smaller)."""
    return 12.0 * _EPS * scale * ((fast + 1) / 2.0 + (slow + 1) / 2.0) + 1e-300


# --- one vectorised run ----------------------------------------------------------------------


@dataclass(frozen=True)
class VectorRun:
    """One vectorised run: fills (bar index, signed quantity, price, fee) and the metrics.

    ``fill_index[i]`` is the bar whose open filled fill ``i``; ``equity`` (kept only when asked for) is
    marked at each bar's close."""

    params: Mapping[str, Any]
    metrics: Metrics
    fill_index: IntArray
    fill_qty: FloatArray
    fill_price: FloatArray
    fill_fee: FloatArray
    equity: FloatArray | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SimConfig:
    """Account and costs of a vectorised run."""

    quantity: float = 1.0
    fee_rate: float = 0.001
    initial_cash: float = 1_000_000.0
    allow_short: bool = False
    mode: Mode = "cross"
    risk_free: float = 0.0


def _targets(d: FloatArray, allow_short: bool, mode: Mode) -> npt.NDArray[np.int8]:
    """Target position (in units of ``quantity``: -1, 0, +1) per bar from the EMA difference ``d``."""
    sig = np.sign(d).astype(np.int8)
    if not sig.all():  # ties hold the previous signal (0 until the first non-tie)
        idx = np.where(sig != 0, np.arange(sig.size), 0)
        np.maximum.accumulate(idx, out=idx)
        held = sig[idx]
        held[: int(np.argmax(sig != 0)) if sig.any() else sig.size] = 0
        sig = held
    tgt = sig if allow_short else (sig > 0).astype(np.int8)
    if mode == "cross":
        nz = np.flatnonzero(sig)
        if nz.size == 0:
            return np.zeros_like(sig)
        first = int(nz[0])
        changed = np.flatnonzero(sig[first:] != sig[first])
        cut = first + int(changed[0]) if changed.size else sig.size
        if cut:
            tgt = tgt.copy() if tgt is sig else tgt
            tgt[:cut] = 0
    return tgt


def simulate_targets(
    bars: Bars,
    target: npt.NDArray[np.int8],
    start: int,
    cfg: SimConfig,
    *,
    params: Mapping[str, Any] | None = None,
    ppy: float | None = None,
    keep_equity: bool = False,
) -> VectorRun:
    """Fills, equity and metrics for a target position per bar (``target[k]`` decided on bar
    ``start + k``'s close, in units of ``cfg.quantity``), filled at the next bar's open."""
    n = len(bars)
    q = cfg.quantity
    # Position changes: decided at bar start+k (k >= 0), filled at the open of bar start+k+1 (< n).
    t = target[: max(n - 1 - start, 0)]
    if t.size:
        prev = np.empty_like(t)
        prev[0] = 0
        prev[1:] = t[:-1]
        ch = np.flatnonzero(t != prev)
        fill_index = (ch + start + 1).astype(np.int64)
        levels = t[ch].astype(np.float64) * q
        before = prev[ch].astype(np.float64) * q
    else:
        fill_index = np.zeros(0, dtype=np.int64)
        levels = before = np.zeros(0, dtype=np.float64)
    fill_qty = levels - before
    fill_price = bars.open[fill_index]
    notional = fill_qty * fill_price
    fill_fee = np.abs(notional) * cfg.fee_rate
    cash_after = cfg.initial_cash - np.cumsum(notional + fill_fee)
    # Per-bar position and cash: step functions that change at the fill bars.
    seg = np.diff(np.concatenate(([0], fill_index, [n])))
    pos = np.repeat(np.concatenate(([0.0], levels)), seg)
    cash = np.repeat(np.concatenate(([cfg.initial_cash], cash_after)), seg)
    equity = cash + pos * bars.close
    metrics, extras = _metrics(bars, equity, pos, fill_index, fill_qty, fill_price, fill_fee, cfg, ppy)
    return VectorRun(
        params=dict(params or {}),
        metrics=metrics,
        fill_index=fill_index,
        fill_qty=fill_qty,
        fill_price=fill_price,
        fill_fee=fill_fee,
        equity=equity if keep_equity else None,
        extras=extras,
    )


def periods_per_year(bars: Bars) -> float:
    """As ``metrics.infer_periods_per_year`` on the bars' timestamps: 365 days / median spacing."""
    if len(bars) < 2:
        return 0.0
    median = float(np.median(np.diff(bars.ts))) / 1e9
    return SECONDS_PER_YEAR / median if median > 0 else 0.0


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.inf if numerator > 0 else 0.0
    return numerator / denominator


def _dec(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def _metrics(
    bars: Bars,
    equity: FloatArray,
    pos: FloatArray,
    fill_index: IntArray,
    fill_qty: FloatArray,
    fill_price: FloatArray,
    fill_fee: FloatArray,
    cfg: SimConfig,
    ppy: float | None,
) -> tuple[Metrics, dict[str, Any]]:
    """``Metrics`` with ``compute_metrics``' definitions, in float64 (curve timestamps = bar close times)."""
    n = equity.size
    ppy = periods_per_year(bars) if ppy is None else ppy
    first = float(equity[0]) if n else 0.0
    last = float(equity[-1]) if n else 0.0
    span_s = float(bars.ts[-1] - bars.ts[0]) / 1e9 if n else 0.0
    total_return = last / first - 1.0 if n >= 2 and first > 0 else 0.0
    volatility = sharpe = sortino = 0.0
    if n >= 3:
        prev = equity[:-1]
        if float(prev.min()) > 0:
            r = equity[1:] / prev - 1.0
        else:
            r = np.zeros(n - 1)
            np.divide(equity[1:] - prev, prev, out=r, where=prev > 0)
        rf_p = (1.0 + cfg.risk_free) ** (1.0 / ppy) - 1.0 if ppy > 0 else 0.0
        if rf_p:
            r = r - rf_p
        ann = math.sqrt(ppy)
        mean = float(r.mean())
        std = float(r.std(ddof=1))
        volatility = std * ann
        sharpe = _ratio(mean * ann, std)
        downside = math.sqrt(float(np.square(np.minimum(r, 0.0)).mean()))
        sortino = _ratio(mean * ann, downside)
    # Drawdown.
    max_dd, dd_duration, recovered = 0.0, timedelta(0), True
    if n:
        peak = np.maximum.accumulate(equity)
        dd = np.zeros(n)
        np.divide(equity - peak, peak, out=dd, where=peak > 0)
        trough = int(np.argmin(dd))
        if float(dd[trough]) < 0:
            max_dd = -float(dd[trough])
            peak_value = float(peak[trough])
            peak_at = int(np.flatnonzero(equity[: trough + 1] == peak_value)[-1])
            after = np.flatnonzero(equity[trough + 1 :] >= peak_value)
            end = trough + 1 + int(after[0]) if after.size else n - 1
            recovered = bool(after.size)
            dd_duration = timedelta(microseconds=int(bars.ts[end] - bars.ts[peak_at]) // 1000)
    years = span_s / SECONDS_PER_YEAR
    if years <= 0 or first <= 0:
        cagr = 0.0
    elif last <= 0:
        cagr = -1.0
    else:
        try:
            cagr = math.exp(math.log(last / first) / years) - 1.0
        except OverflowError:
            cagr = math.inf
    # Round trips of a fixed-size position: every fill opens, closes or flips the whole quantity, so
    # the trip a fill closes was opened by the fill before it (fees shared pro rata, as FIFO matching).
    before = np.cumsum(fill_qty) - fill_qty  # position before each fill
    closes = np.flatnonzero(before != 0.0)
    if closes.size:
        side = before[closes]
        held = np.abs(side)
        entry_share = fill_fee[closes - 1] * held / np.abs(fill_qty[closes - 1])
        exit_share = fill_fee[closes] * held / np.abs(fill_qty[closes])
        pnl_arr = (fill_price[closes] - fill_price[closes - 1]) * side - entry_share - exit_share
    else:
        pnl_arr = np.zeros(0)
    after_last = float(before[-1] + fill_qty[-1]) if fill_qty.size else 0.0
    open_trades = 1 if after_last != 0.0 else 0
    wins = int(np.count_nonzero(pnl_arr > 0))
    losses = int(np.count_nonzero(pnl_arr < 0))
    gross_profit = float(pnl_arr[pnl_arr > 0].sum())
    gross_loss = -float(pnl_arr[pnl_arr < 0].sum())
    trades = int(pnl_arr.size)
    # Exposure: time with a position between the first and last curve point (close times).
    tf = bars.timeframe_ns
    span_ns = float(bars.ts[-1] - bars.ts[0]) if n else 0.0
    exposure = 0.0
    if span_ns > 0 and fill_index.size:
        start_ns, end_ns = int(bars.ts[0]) + tf, int(bars.ts[-1]) + tf
        fill_ns = bars.ts[fill_index]  # a fill at bar k's open happens at bar k-1's close time
        nxt = np.append(fill_ns[1:], end_ns)
        lo = np.maximum(fill_ns, start_ns)
        hi = np.minimum(nxt, end_ns)
        holding = (before + fill_qty) != 0.0
        exposure = float(np.maximum(hi - lo, 0)[holding].sum()) / span_ns
    notional = float(np.abs(fill_qty * fill_price).sum())
    mean_equity = float(equity.mean()) if n else 0.0
    fees = float(fill_fee.sum())
    metrics = Metrics(
        periods=n,
        periods_per_year=ppy,
        initial_equity=_dec(first),
        final_equity=_dec(last),
        total_return=total_return,
        cagr=cagr,
        volatility=volatility,
        sharpe=sharpe,
        sortino=sortino,
        max_drawdown=max_dd,
        max_drawdown_duration=dd_duration,
        max_drawdown_recovered=recovered,
        calmar=_ratio(cagr, max_dd),
        trades=trades,
        open_trades=open_trades,
        winning_trades=wins,
        losing_trades=losses,
        win_rate=wins / trades if trades else 0.0,
        gross_profit=_dec(gross_profit),
        gross_loss=_dec(gross_loss),
        profit_factor=_ratio(gross_profit, gross_loss),
        average_trade=_dec(float(pnl_arr.mean())) if trades else Decimal(0),
        exposure=exposure,
        turnover=notional / mean_equity if mean_equity > 0 else 0.0,
        fees=_dec(fees),
    )
    return metrics, {"pnl": last - cfg.initial_cash}


def ema_cross(
    bars: Bars,
    fast: int,
    slow: int,
    cfg: SimConfig | None = None,
    *,
    cache: EmaCache | None = None,
    trade_from: int = 0,
    params: Mapping[str, Any] | None = None,
    keep_equity: bool = False,
    ppy: float | None = None,
) -> VectorRun:
    """One EMA(fast)/EMA(slow) crossover run (module docstring). ``trade_from``: no position before that
    bar (the indicators still run from bar 0 — a warm-up for walk-forward windows)."""
    cfg = cfg or SimConfig()
    if not 1 <= fast < slow:
        raise ValueError(f"need 1 <= fast < slow, got fast={fast}, slow={slow}")
    cache = cache or EmaCache(bars.close)
    start = slow - 1  # the slow EMA is ready from its slow-th value on
    n = len(bars)
    if start >= n:
        target = np.zeros(0, dtype=np.int8)
    else:
        target = _targets(cache.difference(fast, slow, start), cfg.allow_short, cfg.mode)
        if trade_from > start:
            target = target.copy()
            target[: trade_from - start] = 0
    return simulate_targets(
        bars,
        target,
        min(start, n),
        cfg,
        params=params if params is not None else {"fast": fast, "slow": slow},
        ppy=ppy,
        keep_equity=keep_equity,
    )


@dataclass(frozen=True)
class VectorSweep:
    """Every pair's run, in input order, and the throughput."""

    runs: list[VectorRun]
    bars: int
    seconds: float
    exact_fallbacks: int

    @property
    def evaluations(self) -> int:
        return self.bars * len(self.runs)

    @property
    def evaluations_per_second(self) -> float:
        """Bar-evaluations per second: bars × parameter sets / wall seconds."""
        return self.evaluations / self.seconds if self.seconds > 0 else math.inf


def ema_cross_sweep(
    bars: Bars,
    pairs: Sequence[tuple[int, int]],
    cfg: SimConfig | None = None,
    *,
    base_params: Mapping[str, Any] | None = None,
    trade_from: int = 0,
) -> VectorSweep:
    """Many (fast, slow) pairs on one data set, each span's EMA computed once and shared."""
    cfg = cfg or SimConfig()
    started = time.perf_counter()
    cache = EmaCache(bars.close)
    ppy = periods_per_year(bars)
    runs = [
        ema_cross(
            bars,
            f,
            s,
            cfg,
            cache=cache,
            trade_from=trade_from,
            params={**(base_params or {}), "fast": f, "slow": s},
            ppy=ppy,
        )
        for f, s in pairs
    ]
    return VectorSweep(
        runs=runs, bars=len(bars), seconds=time.perf_counter() - started, exact_fallbacks=cache.exact_fallbacks
    )


# --- reference loop and result building --------------------------------------------------------


def reference_loop(
    bars: Bars, fast: int, slow: int, cfg: SimConfig | None = None
) -> tuple[list[tuple[int, float, float]], float]:
    """The model as a plain bar loop with the streaming indicators: (fills as (bar, qty, price), final
    equity). The yardstick the vectorised path is tested against."""
    cfg = cfg or SimConfig()
    ef, es = EMA(fast), EMA(slow)
    signal = 0
    pos = 0.0
    cash = cfg.initial_cash
    pending: float | None = None
    fills: list[tuple[int, float, float]] = []
    opens, closes = bars.open.tolist(), bars.close.tolist()
    for i, close in enumerate(closes):
        if pending is not None:
            qty = pending - pos
            cash -= qty * opens[i] + abs(qty * opens[i]) * cfg.fee_rate
            pos = pending
            fills.append((i, qty, opens[i]))
            pending = None
        f, s = ef.update(close), es.update(close)
        if not es.ready:
            continue
        new = 1 if f > s else -1 if f < s else signal
        crossed = signal != 0 and new != signal
        first = signal == 0 and new != 0
        signal = new
        if cfg.mode == "cross" and not crossed:
            continue
        if cfg.mode == "state" and not (crossed or first):
            continue
        target = cfg.quantity if signal > 0 else (-cfg.quantity if cfg.allow_short else 0.0)
        if target != pos and i + 1 < len(closes):
            pending = target
    return fills, cash + pos * closes[-1] if closes else cfg.initial_cash


def run_to_result(
    run: VectorRun,
    bars: Bars,
    *,
    strategy: str = "momentum",
    exchange: str = "vector",
    symbol: str = "BTC/USDT",
    timeframe: str | None = None,
    cfg: SimConfig | None = None,
    sweep_id: Any = None,
    code_version: str | None = None,
) -> Any:
    """A ``BacktestResult`` (fills, equity curve, round trips, ``compute_metrics``) for one vectorised run;
    the run must have been made with ``keep_equity=True``. Used to store the runs a sweep keeps."""
    if run.equity is None:
        raise ValueError("run_to_result needs a run made with keep_equity=True")
    cfg = cfg or SimConfig()
    tf = bars.timeframe_ns
    close_ts = [ns_to_datetime(int(t) + tf) for t in bars.ts.tolist()]
    pos = 0.0
    fill_at = dict(zip(run.fill_index.tolist(), run.fill_qty.tolist(), strict=True))
    equity: list[EquityPoint] = []
    for i, (ts, eq) in enumerate(zip(close_ts, run.equity.tolist(), strict=True)):
        pos += fill_at.get(i, 0.0)
        value = pos * float(bars.close[i])
        equity.append(EquityPoint(ts, _dec(eq), _dec(eq - value), _dec(value)))
    fills = [
        Fill(
            fill_id=f"v{k}",
            client_order_id=f"v{k}",
            exchange=exchange,
            symbol=symbol,
            side=Side.BUY if qty > 0 else Side.SELL,
            price=_dec(px),
            quantity=_dec(abs(qty)),
            fee=_dec(fee),
            ts=ns_to_datetime(int(bars.ts[idx])),
        )
        for k, (idx, qty, px, fee) in enumerate(
            zip(
                run.fill_index.tolist(),
                run.fill_qty.tolist(),
                run.fill_price.tolist(),
                run.fill_fee.tolist(),
                strict=True,
            )
        )
    ]
    return BacktestResult.from_run(
        strategy=strategy,
        symbols=[symbol],
        equity=equity,
        fills=fills,
        params=run.params,
        exchange=exchange,
        timeframe=timeframe,
        fill_model={"kind": "vector", "fill": "next_open", "fee_rate": cfg.fee_rate},
        sweep_id=sweep_id,
        code_version=code_version,
    )
