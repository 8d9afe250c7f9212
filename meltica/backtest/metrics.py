"""Backtest performance metrics: pure functions over an equity curve, round-trip trades and fills.

Nothing here does I/O or reads a clock. Money stays ``Decimal`` (fees, PnL, equity); ratios are
``float`` (DESIGN.md §4: indicators and statistics may use floats).

Conventions, used by every function below
------------------------------------------
* The equity curve is a sequence of ``(timestamp, equity)`` pairs, aware UTC, strictly increasing in
  time, sampled regularly (once per bar is what the backtester records). Equity is marked to market and
  net of fees.
* **Returns** are simple per-period returns ``r_i = E_i / E_{i-1} - 1`` for ``i = 1..n-1``. A period whose
  starting equity is not positive (the account is already wiped out) has return ``0.0``.
* **Periods per year** are inferred from the curve's median spacing: crypto trades 365 days a year,
  24 hours a day, so hourly bars give ``365 × 24 = 8760``. Pass ``periods_per_year`` to override.
* **The risk-free rate** is annual and compounded per period: ``rf_p = (1 + risk_free)^(1/ppy) - 1``.
* **Ratios with a zero denominator** (Sharpe with zero deviation, Sortino without downside, Calmar
  without drawdown, profit factor without losses) are ``+inf`` when the numerator is positive and
  ``0.0`` otherwise. No metric is ever NaN.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Literal

import numpy as np
import numpy.typing as npt

from meltica.domain.orders import Fill

SECONDS_PER_YEAR = 365 * 24 * 3600
"""Crypto markets never close: a year is 365 days of 24 hours."""

Direction = Literal["long", "short"]
FloatArray = npt.NDArray[np.float64]

_ZERO = Decimal(0)


# --- round trips -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundTrip:
    """One round-trip trade: a quantity opened at ``entry_*`` and closed at ``exit_*``.

    ``entry_price`` and ``exit_price`` are quantity-weighted averages of the fills (or parts of fills)
    that make the trip. ``fees`` are the entry fees allocated to this quantity plus the exit fees.
    ``pnl`` is **net of fees**: ``(exit - entry) × quantity × (+1 long / -1 short) - fees``, computed from the
    exact notionals (the average prices are rounded to 28 digits, the PnL is not). A trip that is
    still open at the end of the data has ``exit_ts``, ``exit_price`` and ``pnl`` ``None`` and only its
    entry fees in ``fees``.
    """

    symbol: str
    direction: Direction
    quantity: Decimal
    entry_ts: datetime
    entry_price: Decimal
    exit_ts: datetime | None
    exit_price: Decimal | None
    fees: Decimal
    pnl: Decimal | None

    @property
    def is_open(self) -> bool:
        return self.exit_ts is None

    @property
    def sign(self) -> int:
        return 1 if self.direction == "long" else -1

    @property
    def gross_pnl(self) -> Decimal | None:
        """PnL before fees (``pnl + fees``), ``None`` while open."""
        return None if self.pnl is None else self.pnl + self.fees

    @property
    def duration(self) -> timedelta | None:
        return None if self.exit_ts is None else self.exit_ts - self.entry_ts

    @property
    def return_pct(self) -> float | None:
        """Net PnL as a fraction of the entry notional, ``None`` while open."""
        if self.pnl is None:
            return None
        notional = self.entry_price * self.quantity
        return float(self.pnl / notional) if notional else 0.0


@dataclass(slots=True)
class _Lot:
    """An open FIFO lot: the unclosed part of one opening fill and its not yet allocated fee."""

    ts: datetime
    price: Decimal
    quantity: Decimal
    fee: Decimal


@dataclass(slots=True)
class _Closing:
    """A round trip being built from consecutive closing fills of one order."""

    client_order_id: str
    direction: Direction
    entry_ts: datetime
    entry_notional: Decimal
    exit_notional: Decimal
    quantity: Decimal
    fees: Decimal
    exit_ts: datetime

    def finish(self, symbol: str) -> RoundTrip:
        entry = self.entry_notional / self.quantity
        exit_ = self.exit_notional / self.quantity
        sign = 1 if self.direction == "long" else -1
        gross = (self.exit_notional - self.entry_notional) * sign
        return RoundTrip(
            symbol=symbol,
            direction=self.direction,
            quantity=self.quantity,
            entry_ts=self.entry_ts,
            entry_price=entry,
            exit_ts=self.exit_ts,
            exit_price=exit_,
            fees=self.fees,
            pnl=gross - self.fees,
        )


@dataclass(slots=True)
class _Book:
    """FIFO state of one symbol."""

    lots: deque[_Lot]
    direction: Direction | None = None
    closing: _Closing | None = None


FEE_SHARE_QUANTUM = Decimal("1e-12")
"""Pro-rata fee shares are rounded to 12 decimal places (far below any venue's fee precision), so the
remainders and sums stay exact ``Decimal`` arithmetic instead of 28-digit repeating fractions."""


def _share(amount: Decimal, part: Decimal, whole: Decimal) -> Decimal:
    """``amount × part / whole`` rounded to ``FEE_SHARE_QUANTUM``; exactly ``amount`` when ``part`` is the
    whole, so the shares of one fee always add up to it."""
    return amount if part == whole else (amount * part / whole).quantize(FEE_SHARE_QUANTUM)


_FILL_TIME = attrgetter("ts")


def round_trips_from_fills(fills: Iterable[Fill]) -> list[RoundTrip]:
    """Round-trip trades from fills, matched first-in first-out per symbol.

    * An opening fill (flat, or same direction as the position) adds a lot.
    * A closing fill consumes the oldest lots first; the closed quantity becomes a round trip whose
      entry price is the weighted average of the consumed lot parts and whose entry time is the oldest
      consumed lot's. Consecutive closing fills of the same order (same ``client_order_id``, no other fill
      of that symbol in between) make one round trip — a market order that sweeps three levels is one
      trade, not three. A partial close leaves the rest of the lots open.
    * A fill larger than the position (a flip) closes the position and opens the remainder as a new lot
      in the other direction.
    * Fees are allocated pro rata to quantity: a lot carries its opening fill's fee and hands the
      matching share to each trip that closes part of it; a flipping fill's fee is split between the
      closing and the opening part. Shares are rounded to ``FEE_SHARE_QUANTUM`` and the last share of a
      fee takes the remainder, so the trips' fees sum exactly to the fills' fees.

    Fills are taken in timestamp order (a stable sort, so fills with equal timestamps keep the given
    order). Returns closed trips ordered by exit time, then one open trip per symbol still holding a
    position (all its lots aggregated, ``exit_*`` and ``pnl`` ``None``), ordered by entry time.
    """
    books: dict[str, _Book] = {}
    closed: list[RoundTrip] = []

    def flush(symbol: str, book: _Book) -> None:
        if book.closing is not None:
            closed.append(book.closing.finish(symbol))
            book.closing = None

    for fill in sorted(fills, key=_FILL_TIME):
        book = books.get(fill.symbol)
        if book is None:
            book = books[fill.symbol] = _Book(lots=deque())
        fill_direction: Direction = "long" if fill.side.sign > 0 else "short"
        if book.direction is None or book.direction == fill_direction:
            flush(fill.symbol, book)
            book.lots.append(_Lot(fill.ts, fill.price, fill.quantity, fill.fee))
            book.direction = fill_direction
            continue
        # Closing (and maybe flipping).
        open_qty = sum((lot.quantity for lot in book.lots), _ZERO)
        close_qty = min(open_qty, fill.quantity)
        exit_fee = _share(fill.fee, close_qty, fill.quantity)
        entry_notional = _ZERO
        entry_fee = _ZERO
        entry_ts = book.lots[0].ts
        remaining = close_qty
        while remaining > 0:
            lot = book.lots[0]
            piece = min(lot.quantity, remaining)
            piece_fee = _share(lot.fee, piece, lot.quantity)
            entry_notional += lot.price * piece
            entry_fee += piece_fee
            lot.quantity -= piece
            lot.fee -= piece_fee
            remaining -= piece
            if lot.quantity == 0:
                book.lots.popleft()
        continuing = book.closing is not None and book.closing.client_order_id == fill.client_order_id
        if not continuing:
            flush(fill.symbol, book)
            book.closing = _Closing(
                client_order_id=fill.client_order_id,
                direction=book.direction,
                entry_ts=entry_ts,
                entry_notional=_ZERO,
                exit_notional=_ZERO,
                quantity=_ZERO,
                fees=_ZERO,
                exit_ts=fill.ts,
            )
        closing = book.closing
        assert closing is not None
        closing.entry_notional += entry_notional
        closing.exit_notional += fill.price * close_qty
        closing.quantity += close_qty
        closing.fees += entry_fee + exit_fee
        closing.exit_ts = fill.ts
        if not book.lots:
            book.direction = None
        rest = fill.quantity - close_qty
        if rest > 0:  # flip: the remainder opens a position the other way
            flush(fill.symbol, book)
            book.lots.append(_Lot(fill.ts, fill.price, rest, fill.fee - exit_fee))
            book.direction = fill_direction

    still_open: list[RoundTrip] = []
    for symbol, book in books.items():
        flush(symbol, book)
        if book.lots and book.direction is not None:
            quantity = sum((lot.quantity for lot in book.lots), _ZERO)
            notional = sum((lot.price * lot.quantity for lot in book.lots), _ZERO)
            still_open.append(
                RoundTrip(
                    symbol=symbol,
                    direction=book.direction,
                    quantity=quantity,
                    entry_ts=book.lots[0].ts,
                    entry_price=notional / quantity,
                    exit_ts=None,
                    exit_price=None,
                    fees=sum((lot.fee for lot in book.lots), _ZERO),
                    pnl=None,
                )
            )
    closed.sort(key=lambda t: t.exit_ts or t.entry_ts)
    still_open.sort(key=lambda t: t.entry_ts)
    return closed + still_open


# --- metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """The performance of one backtest run. See the module docstring for the shared conventions.

    Curve metrics (from the equity curve):

    * ``periods``: number of equity points; ``periods_per_year``: annualisation factor used (``0.0`` when
      the curve has fewer than two points).
    * ``initial_equity``, ``final_equity``: first and last equity (``0`` for an empty curve).
    * ``total_return``: ``E_last / E_first - 1`` (``0.0`` for fewer than two points or ``E_first <= 0``).
    * ``cagr``: ``(E_last / E_first) ^ (1 / years) - 1`` with ``years = (t_last - t_first) / 365 days``;
      ``0.0`` for a zero time span, ``-1.0`` when the account ends at or below zero, ``+inf`` when the
      number overflows a float (a large gain over a tiny span).
    * ``volatility``: ``std(r, ddof=1) × sqrt(ppy)`` (``0.0`` for fewer than two returns).
    * ``sharpe``: ``mean(r - rf_p) / std(r, ddof=1) × sqrt(ppy)``.
    * ``sortino``: ``mean(r - rf_p) / DD × sqrt(ppy)`` where the downside deviation is the *target
      downside deviation* over **all** periods, ``DD = sqrt(mean(min(r - rf_p, 0)²))`` (Sortino & Price
      1994: periods above the target count as zero, they are not dropped).
    * ``max_drawdown``: the largest fall from a running peak, as a non-negative fraction of that peak
      (``0.25`` = 25 % below the peak).
    * ``max_drawdown_duration``: for that largest drawdown, the time from its peak (the last time equity
      stood at the peak before the trough) to the first point back at or above the peak, or to the end
      of the curve if it never recovered (``max_drawdown_recovered`` is then ``False``).
      ``timedelta(0)`` without a drawdown.
    * ``calmar``: ``cagr / max_drawdown``.

    Trade metrics (from closed round trips; open trips are ignored, ``open_trades`` counts them):

    * ``trades``, ``winning_trades`` (``pnl > 0``), ``losing_trades`` (``pnl < 0``); a zero-PnL trade is
      neither.
    * ``win_rate``: ``winning_trades / trades`` (``0.0`` without trades).
    * ``gross_profit``: sum of positive trade PnL; ``gross_loss``: absolute sum of negative trade PnL.
    * ``profit_factor``: ``gross_profit / gross_loss`` (``+inf`` without losses but with a profit,
      ``0.0`` without either).
    * ``average_trade``: mean net PnL per closed trade (``0`` without trades).

    Fill metrics:

    * ``exposure``: the share of the curve's time span during which any symbol's net position (rebuilt
      from the fills) is not zero (``0.0`` for a zero span).
    * ``turnover``: ``Σ |price × quantity|`` over all fills divided by the mean equity of the curve
      (``0.0`` when the mean equity is not positive). Not annualised.
    * ``fees``: the sum of all fill fees (a rebate counts negative). Fees are summed as charged, assuming
      one fee currency (the quote/settlement currency the backtester charges in).
    """

    periods: int
    periods_per_year: float
    initial_equity: Decimal
    final_equity: Decimal
    total_return: float
    cagr: float
    volatility: float
    sharpe: float
    sortino: float
    max_drawdown: float
    max_drawdown_duration: timedelta
    max_drawdown_recovered: bool
    calmar: float
    trades: int
    open_trades: int
    winning_trades: int
    losing_trades: int
    win_rate: float
    gross_profit: Decimal
    gross_loss: Decimal
    profit_factor: float
    average_trade: Decimal
    exposure: float
    turnover: float
    fees: Decimal

    def as_dict(self) -> dict[str, float | int | bool | Decimal | timedelta]:
        """Field name → value, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; ``+inf`` / ``0.0`` for a zero denominator (module docstring)."""
    if denominator == 0:
        return math.inf if numerator > 0 else 0.0
    return numerator / denominator


def infer_periods_per_year(timestamps: Sequence[datetime]) -> float:
    """``365 days / median spacing`` of ``timestamps``; ``0.0`` for fewer than two distinct points."""
    if len(timestamps) < 2:
        return 0.0
    return periods_per_year_of(np.array([ts.timestamp() for ts in timestamps], dtype=np.float64))


def periods_per_year_of(seconds: FloatArray) -> float:
    """``infer_periods_per_year`` of the timestamps as epoch seconds (``datetime.timestamp()`` values)."""
    if seconds.size < 2:
        return 0.0
    gaps = np.diff(seconds)
    median = float(np.median(gaps))
    return SECONDS_PER_YEAR / median if median > 0 else 0.0


def simple_returns(equity: FloatArray) -> FloatArray:
    """``E_i / E_{i-1} - 1`` for ``i = 1..n-1``; ``0.0`` where ``E_{i-1} <= 0``."""
    if equity.size < 2:
        return np.zeros(0, dtype=np.float64)
    prev, cur = equity[:-1], equity[1:]
    out = np.zeros_like(cur)
    np.divide(cur - prev, prev, out=out, where=prev > 0)
    return out


def drawdown_series(equity: FloatArray) -> FloatArray:
    """``E_i / max(E_0..E_i) - 1`` (``<= 0``; ``0.0`` while the running peak is not positive)."""
    if equity.size == 0:
        return np.zeros(0, dtype=np.float64)
    peak = np.maximum.accumulate(equity)
    out = np.zeros_like(equity)
    np.divide(equity - peak, peak, out=out, where=peak > 0)
    return out


def _max_drawdown(ts: Sequence[datetime], equity: FloatArray) -> tuple[float, timedelta, bool]:
    dd = drawdown_series(equity)
    if dd.size == 0 or float(dd.min()) >= 0:
        return 0.0, timedelta(0), True
    trough = int(np.argmin(dd))
    peak_value = float(np.max(equity[: trough + 1]))
    peak = int(np.flatnonzero(equity[: trough + 1] == peak_value)[-1])
    after = np.flatnonzero(equity[trough + 1 :] >= peak_value)
    if after.size:
        return -float(dd[trough]), ts[trough + 1 + int(after[0])] - ts[peak], True
    return -float(dd[trough]), ts[-1] - ts[peak], False


def _cagr(first: Decimal, last: Decimal, span: timedelta) -> float:
    years = span.total_seconds() / SECONDS_PER_YEAR
    if years <= 0 or first <= 0:
        return 0.0
    if last <= 0:
        return -1.0
    try:
        return math.exp(math.log(float(last / first)) / years) - 1.0
    except OverflowError:
        return math.inf


def _exposure(fills: Sequence[Fill], start: datetime, end: datetime) -> float:
    span = (end - start).total_seconds()
    if span <= 0:
        return 0.0
    positions: dict[str, Decimal] = {}
    nonzero = 0
    since: datetime | None = None
    exposed = 0.0

    def add(a: datetime, b: datetime) -> float:
        lo, hi = max(a, start), min(b, end)
        return max((hi - lo).total_seconds(), 0.0)

    for fill in sorted(fills, key=_FILL_TIME):
        before = positions.get(fill.symbol, _ZERO)
        after = before + fill.quantity * fill.side.sign
        positions[fill.symbol] = after
        nonzero += (after != 0) - (before != 0)
        if nonzero > 0 and since is None:
            since = fill.ts
        elif nonzero == 0 and since is not None:
            exposed += add(since, fill.ts)
            since = None
    if since is not None:
        exposed += add(since, end)
    return exposed / span


def compute_metrics(
    equity: Sequence[tuple[datetime, Decimal]],
    trades: Sequence[RoundTrip],
    fills: Sequence[Fill] = (),
    *,
    periods_per_year: float | None = None,
    risk_free: float = 0.0,
) -> Metrics:
    """All metrics of one run (definitions in ``Metrics``).

    ``equity``: ``(timestamp, equity)`` pairs in time order; ``trades``: round trips (usually
    ``round_trips_from_fills(fills)``); ``fills``: every fill of the run, for exposure, turnover and fees.
    ``periods_per_year``: annualisation factor, inferred from the curve's median spacing when ``None``.
    ``risk_free``: annual risk-free rate as a fraction (``0.04`` = 4 %).

    Edge cases: an empty or single-point curve gives zero returns, ratios and drawdown; a flat curve gives
    zero volatility, Sharpe, Sortino and drawdown; no trades give zero win rate, profit factor and
    average trade. Nothing is NaN.
    """
    timestamps = [ts for ts, _ in equity]
    values = [e for _, e in equity]
    curve = np.array([float(e) for e in values], dtype=np.float64)
    ppy = infer_periods_per_year(timestamps) if periods_per_year is None else float(periods_per_year)
    total = sum(values, _ZERO)
    first = values[0] if values else _ZERO
    last = values[-1] if values else _ZERO
    return metrics_from_columns(timestamps, curve, first, last, total, trades, fills, ppy=ppy, risk_free=risk_free)


def metrics_from_columns(
    timestamps: Sequence[datetime],
    curve: FloatArray,
    first: Decimal,
    last: Decimal,
    total: Decimal,
    trades: Sequence[RoundTrip],
    fills: Sequence[Fill] = (),
    *,
    ppy: float,
    risk_free: float = 0.0,
) -> Metrics:
    """``compute_metrics`` from a curve already in columns (a long run's curve is never a list of pairs):
    ``timestamps`` (any indexable sequence), ``curve`` = ``float(equity)`` per point, ``first`` / ``last``
    the first and last equity, ``total`` the ``Decimal`` sum of the equity, ``ppy`` the annualisation
    factor."""
    n = len(curve)
    span = timestamps[-1] - timestamps[0] if n else timedelta(0)
    total_return = float(last / first - 1) if n >= 2 and first > 0 else 0.0

    returns = simple_returns(curve)
    rf_p = (1.0 + risk_free) ** (1.0 / ppy) - 1.0 if ppy > 0 else 0.0
    excess = returns - rf_p
    annualiser = math.sqrt(ppy)
    if returns.size >= 2:
        std = float(np.std(returns, ddof=1))
        mean_excess = float(np.mean(excess))
        volatility = std * annualiser
        sharpe = _ratio(mean_excess * annualiser, std)
        downside = float(np.sqrt(np.mean(np.minimum(excess, 0.0) ** 2)))
        sortino = _ratio(mean_excess * annualiser, downside)
    else:
        volatility = sharpe = sortino = 0.0

    max_dd, dd_duration, recovered = _max_drawdown(timestamps, curve)
    cagr = _cagr(first, last, span)

    closed = [t for t in trades if t.pnl is not None]
    pnls = [t.pnl for t in closed if t.pnl is not None]
    gross_profit = sum((p for p in pnls if p > 0), _ZERO)
    gross_loss = -sum((p for p in pnls if p < 0), _ZERO)
    wins = sum(1 for p in pnls if p > 0)
    losses = sum(1 for p in pnls if p < 0)

    notional = sum((abs(f.price * f.quantity) for f in fills), _ZERO)
    mean_equity = total / n if n else _ZERO

    return Metrics(
        periods=n,
        periods_per_year=ppy,
        initial_equity=first,
        final_equity=last,
        total_return=total_return,
        cagr=cagr,
        volatility=volatility,
        sharpe=sharpe,
        sortino=sortino,
        max_drawdown=max_dd,
        max_drawdown_duration=dd_duration,
        max_drawdown_recovered=recovered,
        calmar=_ratio(cagr, max_dd),
        trades=len(closed),
        open_trades=len(trades) - len(closed),
        winning_trades=wins,
        losing_trades=losses,
        win_rate=wins / len(closed) if closed else 0.0,
        gross_profit=gross_profit,
        gross_loss=gross_loss,
        profit_factor=_ratio(float(gross_profit), float(gross_loss)),
        average_trade=sum(pnls, _ZERO) / len(pnls) if pnls else _ZERO,
        exposure=_exposure(fills, timestamps[0], timestamps[-1]) if n else 0.0,
        turnover=float(notional / mean_equity) if mean_equity > 0 else 0.0,
        fees=sum((f.fee for f in fills), _ZERO),
    )
