"""The result of one backtest run: what was run, how it performed, and everything it did.

``BacktestResult`` is stored under its ``run_id`` in ``backtest_runs`` (what was run),
``backtest_metrics`` (one row per metric), ``backtest_equity`` (the whole curve, loaded with COPY) and
``backtest_trades`` (the round trips), ``backtest_orders`` and ``backtest_fills`` (the last three with
COPY too), and written to files by ``write_files``. (The live ``orders``/``fills`` tables are facts of
real accounts; backtests stay out of them.)
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import importlib.metadata
import json
import math
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, get_type_hints, overload

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, func, insert, select

from meltica.backtest.metrics import (
    Direction,
    FloatArray,
    Metrics,
    RoundTrip,
    compute_metrics,
    metrics_from_columns,
    periods_per_year_of,
    round_trips_from_fills,
)
from meltica.backtest.provenance import rejections_by_reason, run_warnings
from meltica.domain.enums import LiquiditySide, Side
from meltica.domain.orders import Fill, Order
from meltica.domain.values import ValueSequence
from meltica.errors import DataValidationError
from meltica.marketdata.series import FloatColumn
from meltica.storage.tables import backtest_metrics, backtest_runs

JsonObject = dict[str, Any]
_ZERO = Decimal(0)


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EquityPoint:
    """The account at one instant of the run, marked to market: ``equity = cash + position_value``."""

    ts: datetime
    equity: Decimal
    cash: Decimal
    position_value: Decimal


class EquityCurve(ValueSequence[EquityPoint]):
    """The equity curve of a bar run, kept as columns: a million bars are not a million objects.

    Point ``i`` is at ``open_times[i] + delta`` (the bar's close time), marked to ``closes[i]`` with the
    account's ``(cash, holding)`` as of the last change at or before bar ``i`` (``changes``: ``(bar index,
    cash, holding)``, the first at bar 0): ``position_value = holding × close`` and ``equity = cash +
    position_value`` — or ``cash`` and a zero value when nothing is held — as the bar loop marks it. An
    ``EquityPoint`` is built when one is read; the curve equals any sequence of equal points.
    ``open_micros``: the open times as integer epoch microseconds, when the caller has them (metrics use
    them instead of a million ``datetime.timestamp()`` calls)."""

    __slots__ = ("_cash", "_closes", "_delta", "_held", "_open_micros", "_starts", "_times")

    def __init__(
        self,
        open_times: Sequence[datetime],
        delta: timedelta,
        closes: Sequence[Decimal],
        changes: Sequence[tuple[int, Decimal, Decimal]],
        open_micros: npt.NDArray[np.int64] | None = None,
    ) -> None:
        if len(open_times) != len(closes):
            raise ValueError("open_times and closes differ in length")
        if closes and (not changes or changes[0][0] != 0):
            raise ValueError("the first change must be at bar 0")
        self._times = open_times
        self._delta = delta
        self._closes = closes
        self._starts = [i for i, _, _ in changes]
        self._cash = [c for _, c, _ in changes]
        self._held = [h for _, _, h in changes]
        self._open_micros = open_micros

    def __len__(self) -> int:
        return len(self._closes)

    def _make(self, i: int, cash: Decimal, held: Decimal) -> EquityPoint:
        if held:
            value = held * self._closes[i]
            return EquityPoint(ts=self._times[i] + self._delta, equity=cash + value, cash=cash, position_value=value)
        return EquityPoint(ts=self._times[i] + self._delta, equity=cash + _ZERO, cash=cash, position_value=_ZERO)

    def _segments(self) -> Iterator[tuple[int, int, Decimal, Decimal]]:
        starts, n = self._starts, len(self)
        for k, start in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else n
            if stop > start:
                yield start, stop, self._cash[k], self._held[k]

    @overload
    def __getitem__(self, index: int) -> EquityPoint: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[EquityPoint, ...]: ...

    def __getitem__(self, index: int | slice) -> EquityPoint | tuple[EquityPoint, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError("equity curve index out of range")
        k = bisect.bisect_right(self._starts, i) - 1
        return self._make(i, self._cash[k], self._held[k])

    def __iter__(self) -> Iterator[EquityPoint]:
        make = self._make
        for start, stop, cash, held in self._segments():
            for i in range(start, stop):
                yield make(i, cash, held)

    def __repr__(self) -> str:
        return f"<equity curve of {len(self)} points>"

    def times(self) -> Sequence[datetime]:
        """The points' timestamps (the bars' close times), built when read."""
        return _CloseTimes(self._times, self._delta)

    def seconds(self) -> FloatArray:
        """The points' timestamps as epoch seconds (``datetime.timestamp()`` of each)."""
        if self._open_micros is not None:  # exact integers, one correctly rounded division: as timestamp()
            delta_us = self._delta // timedelta(microseconds=1)
            return (self._open_micros + delta_us).astype(np.float64) / 1e6
        return np.array([t.timestamp() for t in self.times()], dtype=np.float64)

    def columns(self) -> tuple[FloatArray, Decimal, Decimal, Decimal]:
        """``(float(equity) per point, first equity, last equity, Decimal sum of the equity)``."""
        scaled = self._scaled_columns()
        if scaled is not None:
            return scaled
        out = np.empty(len(self), dtype=np.float64)
        total = _ZERO
        closes = self._closes
        for start, stop, cash, held in self._segments():
            if held:
                values = [cash + held * c for c in closes[start:stop]]
                out[start:stop] = [float(v) for v in values]
                total += sum(values, _ZERO)
            else:
                out[start:stop] = float(cash + _ZERO)
                total += (cash + _ZERO) * (stop - start)
        if not len(self):
            return out, _ZERO, _ZERO, _ZERO
        return out, self[0].equity, self[-1].equity, total

    def _scaled_columns(self) -> tuple[FloatArray, Decimal, Decimal, Decimal] | None:
        """``columns()`` in exact integer arithmetic, when the closes are a float column of few decimal places
        (``FloatColumn.scaled_integers``) and every point's equity, times ``10**places`` of its segment, is an
        integer below 2**53: then ``that integer / 10**places`` in float64 is one correctly rounded division of
        two exact floats, i.e. ``float(equity)`` digit for digit, and each segment's sum is
        ``count × cash + holding × Σ closes``, exactly the sum of its points. ``None`` otherwise (the
        ``Decimal`` way)."""
        closes = self._closes
        scaled = closes.scaled_integers() if isinstance(closes, FloatColumn) else None
        if scaled is None:
            return None
        places, ints = scaled
        n = len(ints)
        top = int(np.max(np.abs(ints)))
        if top * n >= 2**62:
            return None
        prefix = np.concatenate((np.zeros(1, dtype=np.int64), np.cumsum(ints)))  # Σ closes[:i] × 10**places
        bounds = [*self._starts[1:], n]
        cash_ints, held_ints, scales, counts = [], [], [], []
        total = _ZERO
        for start, stop, cash, held in zip(self._starts, bounds, self._cash, self._held, strict=True):
            cash_exp = cash.as_tuple().exponent
            held_exp = held.as_tuple().exponent
            if not isinstance(cash_exp, int) or not isinstance(held_exp, int):
                return None
            k = max(0, -cash_exp, places - held_exp)
            if k > _MAX_EXACT_POWER:
                return None
            cash_int, held_int = int(cash.scaleb(k)), int(held.scaleb(k - places))
            if abs(cash_int) + abs(held_int) * top >= 2**53 or abs(held_int) >= 2**53:
                return None
            cash_ints.append(cash_int)
            held_ints.append(held_int)
            scales.append(k)
            counts.append(max(stop - start, 0))
            if stop > start:
                closes_sum = int(prefix[stop]) - int(prefix[start])
                total += Decimal((stop - start) * cash_int + held_int * closes_sum).scaleb(-k)
        lengths = np.array(counts, dtype=np.int64)
        cash_column = np.repeat(np.array(cash_ints, dtype=np.int64), lengths)
        held_column = np.repeat(np.array(held_ints, dtype=np.int64), lengths)
        powers = _POWERS_OF_TEN[np.repeat(np.array(scales, dtype=np.int64), lengths)]
        out = (cash_column + held_column * ints).astype(np.float64) / powers
        return out, self[0].equity, self[-1].equity, total


_MAX_EXACT_POWER = 22
_POWERS_OF_TEN = np.array([float(10**k) for k in range(_MAX_EXACT_POWER + 1)], dtype=np.float64)
"""``10**k`` as float64, exact for ``k <= 22``."""


class _CloseTimes(Sequence[datetime]):
    __slots__ = ("_delta", "_times")

    def __init__(self, open_times: Sequence[datetime], delta: timedelta) -> None:
        self._times = open_times
        self._delta = delta

    def __len__(self) -> int:
        return len(self._times)

    @overload
    def __getitem__(self, index: int) -> datetime: ...

    @overload
    def __getitem__(self, index: slice) -> list[datetime]: ...

    def __getitem__(self, index: int | slice) -> datetime | list[datetime]:
        if isinstance(index, slice):
            return [t + self._delta for t in self._times[index]]
        return self._times[index] + self._delta


class OrderRecords(ValueSequence["OrderRecord"]):
    """A run's ``OrderRecord`` s, each built (``OrderRecord.at_end``) when first read from the orders as the
    run left them — a sequence that may itself build each order when read (the backtest's direct path):
    a run whose orders nobody reads builds none. Equal to any sequence of equal records."""

    __slots__ = ("_built", "_orders")

    def __init__(self, orders: Sequence[OrderRecord | Order]) -> None:
        self._orders = orders
        self._built: list[OrderRecord | None] = [None] * len(orders)

    def __len__(self) -> int:
        return len(self._built)

    @overload
    def __getitem__(self, index: int) -> OrderRecord: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[OrderRecord, ...]: ...

    def __getitem__(self, index: int | slice) -> OrderRecord | tuple[OrderRecord, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        record = self._built[index]
        if record is None:
            order = self._orders[index]
            record = order if isinstance(order, OrderRecord) else OrderRecord.at_end(order)
            self._built[index] = record
        return record

    def __iter__(self) -> Iterator[OrderRecord]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"<{len(self)} order records>"


OPEN_AT_END = "open_at_end"
"""``OrderRecord.status`` of an order still working, or never sent, when the data ended."""


@dataclass(frozen=True)
class OrderRecord:
    """One order of the run as it ended (a flat row for ``orders.csv``)."""

    client_order_id: str
    intent_id: str
    symbol: str
    side: str
    order_type: str
    quantity: Decimal
    price: Decimal | None
    trigger_price: Decimal | None
    status: str
    filled_quantity: Decimal
    avg_fill_price: Decimal | None
    created_at: datetime
    updated_at: datetime
    reason: str | None = None

    @classmethod
    def at_end(cls, order: Order) -> OrderRecord:
        """The order as the run left it: one still working (or never sent) when the data ended is
        ``open_at_end``, its reason saying which status it had then."""
        record = cls.from_order(order)
        if order.is_terminal:
            return record
        return dataclasses.replace(record, status=OPEN_AT_END, reason=f"{order.status.value} when the data ended")

    @classmethod
    def from_order(cls, order: Order) -> OrderRecord:
        # ``cls(...)`` without the frozen ``__init__``'s per-field ``object.__setattr__`` (one per kept
        # order): the same fields in the instance's ``__dict__``, in field order.
        record = object.__new__(cls)
        intent = order.intent
        record.__dict__.update(
            client_order_id=order.client_order_id,
            intent_id=intent.intent_id,
            symbol=intent.symbol,
            side=intent.side.value,
            order_type=intent.type.value,
            quantity=order.quantity,
            price=order.price,
            trigger_price=order.trigger_price,
            status=order.status.value,
            filled_quantity=order.filled_quantity,
            avg_fill_price=order.avg_fill_price,
            created_at=order.created_at,
            updated_at=order.updated_at,
            reason=order.reason,
        )
        return record


# --- code version and JSON -------------------------------------------------------------------


def detect_code_version() -> str:
    """``git describe --always --dirty --tags`` of the checkout Meltica runs from, else ``meltica <version>``."""
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            described = out.stdout.strip()
            if described:
                return described
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"meltica {importlib.metadata.version('meltica')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: ``Decimal`` → string (exact), datetime → ISO 8601, enum → its value,
    UUID → string, tuples/sets → lists, non-finite floats → ``"Infinity"`` / ``"-Infinity"`` / ``"NaN"``,
    timedelta → seconds (float)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# --- metrics as NUMERIC ----------------------------------------------------------------------

_METRIC_TYPES: dict[str, Any] = get_type_hints(Metrics)


def metric_to_numeric(value: float | int | bool | Decimal | timedelta) -> Decimal:
    """A metric value as the ``NUMERIC`` stored in ``backtest_metrics`` (durations in seconds; floats
    through their shortest repr, so they load back bit-identical; ``inf`` as ``'Infinity'``)."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool | int):
        return Decimal(int(value))
    if isinstance(value, timedelta):
        return Decimal(value.days * 86_400 + value.seconds) + Decimal(value.microseconds).scaleb(-6)
    return Decimal(repr(value))


def _metric_from_numeric(name: str, value: Decimal) -> Any:
    kind = _METRIC_TYPES[name]
    if kind is Decimal:
        return value
    if kind is bool:
        return value != 0
    if kind is int:
        return int(value)
    if kind is timedelta:
        return timedelta(microseconds=int(value.scaleb(6)))
    return float(value)


def metrics_from_numeric(values: Mapping[str, Decimal | None]) -> Metrics:
    """Rebuild ``Metrics`` from ``name → NUMERIC`` rows; unknown names are ignored."""
    missing = [f.name for f in fields(Metrics) if values.get(f.name) is None]
    if missing:
        raise DataValidationError(f"stored metrics lack {', '.join(missing)}", reason="incomplete_metrics")
    kwargs = {}
    for f in fields(Metrics):
        raw = values[f.name]
        assert raw is not None
        kwargs[f.name] = _metric_from_numeric(f.name, raw)
    return Metrics(**kwargs)


# --- the result ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BacktestResult:
    """One backtest run. Sequences are stored as tuples; the equity curve must be strictly increasing in
    time with aware timestamps. ``started_at`` / ``finished_at`` left ``None`` are set by the database
    clock on ``save`` (code never reads the wall clock, DESIGN.md §4)."""

    strategy: str
    symbols: Sequence[str]
    metrics: Metrics
    equity: Sequence[EquityPoint]
    fills: Sequence[Fill] = ()
    orders: Sequence[OrderRecord] = ()
    round_trips: Sequence[RoundTrip] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    exchange: str | None = None
    timeframe: str | None = None
    data_start: datetime | None = None
    data_end: datetime | None = None
    fill_model: Mapping[str, Any] = field(default_factory=dict)
    code_version: str | None = None
    effective_params: Mapping[str, Any] = field(default_factory=dict)  # every parameter, defaults included
    data_fingerprint: Mapping[str, Any] = field(default_factory=dict)  # bars, first/last time, sha256, file
    invalid_orders: Sequence[Mapping[str, Any]] = ()  # the strategy's impossible orders (ts, field, value)
    fill_phases: Mapping[str, str] = field(default_factory=dict)  # fill id -> bar_open / bar_path / event
    run_id: uuid.UUID = field(default_factory=uuid.uuid4)
    sweep_id: uuid.UUID | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("symbols", "equity", "fills", "orders", "round_trips", "invalid_orders"):
            if name == "equity" and isinstance(self.equity, EquityCurve):
                continue  # immutable already; its times are the bars' (validated when the bars were)
            if name == "orders" and isinstance(self.orders, OrderRecords):
                continue  # immutable already: each record built when read
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "fill_model", dict(self.fill_model))
        object.__setattr__(self, "effective_params", dict(self.effective_params))
        object.__setattr__(self, "data_fingerprint", dict(self.data_fingerprint))
        object.__setattr__(self, "fill_phases", dict(self.fill_phases))
        previous: datetime | None = None
        for point in () if isinstance(self.equity, EquityCurve) else self.equity:
            if point.ts.tzinfo is None:
                raise DataValidationError("equity timestamps must be timezone-aware UTC", reason="naive_timestamp")
            if previous is not None and point.ts <= previous:
                raise DataValidationError(
                    f"equity curve is not strictly increasing in time at {point.ts.isoformat()}",
                    reason="unordered_equity",
                )
            previous = point.ts

    @classmethod
    def from_run(
        cls,
        *,
        strategy: str,
        symbols: Sequence[str],
        equity: Sequence[EquityPoint],
        fills: Sequence[Fill] = (),
        orders: Sequence[OrderRecord | Order] = (),
        params: Mapping[str, Any] | None = None,
        exchange: str | None = None,
        timeframe: str | None = None,
        data_start: datetime | None = None,
        data_end: datetime | None = None,
        fill_model: Mapping[str, Any] | None = None,
        code_version: str | None = None,
        effective_params: Mapping[str, Any] | None = None,
        data_fingerprint: Mapping[str, Any] | None = None,
        invalid_orders: Sequence[Mapping[str, Any]] = (),
        fill_phases: Mapping[str, str] | None = None,
        run_id: uuid.UUID | None = None,
        sweep_id: uuid.UUID | None = None,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        periods_per_year: float | None = None,
        risk_free: float = 0.0,
    ) -> BacktestResult:
        """A result with its round trips (FIFO from ``fills``) and metrics computed. ``code_version``
        defaults to ``detect_code_version()``; ``data_start``/``data_end`` default to the
        curve's first and last timestamps."""
        trips = round_trips_from_fills(fills)
        if isinstance(equity, EquityCurve):
            curve, first, last, total = equity.columns()
            ppy = periods_per_year_of(equity.seconds()) if periods_per_year is None else float(periods_per_year)
            metrics = metrics_from_columns(
                equity.times(), curve, first, last, total, trips, fills, ppy=ppy, risk_free=risk_free
            )
        else:
            metrics = compute_metrics(
                [(p.ts, p.equity) for p in equity],
                trips,
                fills,
                periods_per_year=periods_per_year,
                risk_free=risk_free,
            )
        return cls(
            strategy=strategy,
            symbols=tuple(symbols),
            metrics=metrics,
            equity=equity if isinstance(equity, EquityCurve) else tuple(equity),
            fills=tuple(fills),
            orders=(
                tuple(o if isinstance(o, OrderRecord) else OrderRecord.at_end(o) for o in orders)
                if isinstance(orders, list | tuple)
                else OrderRecords(orders)
            ),
            round_trips=tuple(trips),
            params=dict(params or {}),
            exchange=exchange,
            timeframe=timeframe,
            data_start=data_start if data_start is not None else (equity[0].ts if equity else None),
            data_end=data_end if data_end is not None else (equity[-1].ts if equity else None),
            fill_model=dict(fill_model or {}),
            code_version=code_version if code_version is not None else detect_code_version(),
            effective_params=dict(effective_params if effective_params is not None else params or {}),
            data_fingerprint=dict(data_fingerprint or {}),
            invalid_orders=tuple(invalid_orders),
            fill_phases=dict(fill_phases or {}),
            run_id=run_id or uuid.uuid4(),
            sweep_id=sweep_id,
            started_at=started_at,
            finished_at=finished_at,
        )

    @property
    def rejections(self) -> dict[str, int]:
        """Rejected orders by reason code (``MIN_NOTIONAL``, ``INSUFFICIENT_BALANCE``, ``INVALID_INTENT``…)."""
        return rejections_by_reason(self.orders)

    @property
    def warnings(self) -> list[str]:
        """What must be known before trusting this run's numbers (``provenance.run_warnings``)."""
        return run_warnings(
            orders=len(self.orders),
            fills=len(self.fills),
            rejections=self.rejections,
            invalid_orders=[jsonable(i) for i in self.invalid_orders],
        )

    def run_info(self) -> JsonObject:
        """What was run, as JSON data (the ``run`` object of ``metrics.json``)."""
        info: JsonObject = jsonable(
            {
                "run_id": self.run_id,
                "strategy": self.strategy,
                "params": self.params,
                "effective_params": self.effective_params,
                "data": self.data_fingerprint,
                "exchange": self.exchange,
                "symbols": self.symbols,
                "timeframe": self.timeframe,
                "data_start": self.data_start,
                "data_end": self.data_end,
                "fill_model": self.fill_model,
                "code_version": self.code_version,
                "sweep_id": self.sweep_id,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
            }
        )
        return info

    # --- database ----------------------------------------------------------------------------

    def save(self, engine: Engine) -> None:
        """Store the run in one transaction: its ``backtest_runs`` row (status ``finished``), one
        ``backtest_metrics`` row per ``Metrics`` field, the whole equity curve, the round trips, the
        orders and the fills (all with COPY; orders and fills keep their position in ``seq``). Saving a
        ``run_id`` twice fails on the primary key: a run is stored once."""
        run_row: dict[str, Any] = {
            "run_id": self.run_id,
            "strategy": self.strategy,
            "params": jsonable(self.params),
            "exchange": self.exchange,
            "symbols": list(self.symbols),
            "timeframe": self.timeframe,
            "data_start": self.data_start,
            "data_end": self.data_end,
            "fill_model": jsonable(self.fill_model),
            "code_version": self.code_version,
            "sweep_id": self.sweep_id,
            "status": "finished",
            "finished_at": self.finished_at if self.finished_at is not None else func.now(),
        }
        if self.started_at is not None:
            run_row["started_at"] = self.started_at
        metric_rows = [
            {"run_id": self.run_id, "name": name, "value": metric_to_numeric(value)}
            for name, value in self.metrics.as_dict().items()
        ]
        with engine.begin() as conn:
            conn.execute(insert(backtest_runs).values(run_row))
            conn.execute(insert(backtest_metrics), metric_rows)
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cur:
                # Binary COPY: no text formatting of a million timestamps and decimals on either side.
                with cur.copy(
                    "COPY backtest_equity (run_id, ts, equity, cash, position_value) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["uuid", "timestamptz", "numeric", "numeric", "numeric"])
                    for p in self.equity:
                        copy.write_row((self.run_id, p.ts, p.equity, p.cash, p.position_value))
                with cur.copy(
                    "COPY backtest_trades (run_id, trade_no, symbol, side, entry_ts, exit_ts, entry_price, "
                    "exit_price, quantity, pnl, fees) FROM STDIN"
                ) as copy:
                    for no, t in enumerate(self.round_trips, start=1):
                        copy.write_row(
                            (
                                self.run_id,
                                no,
                                t.symbol,
                                t.direction,
                                t.entry_ts,
                                t.exit_ts,
                                t.entry_price,
                                t.exit_price,
                                t.quantity,
                                t.pnl,
                                t.fees,
                            )
                        )
                with cur.copy(
                    "COPY backtest_orders (run_id, client_order_id, seq, intent_id, symbol, side, order_type, "
                    "quantity, price, trigger_price, status, filled_quantity, average_fill_price, reason, "
                    "created_at, updated_at) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(_ORDER_COPY_TYPES)
                    for seq, o in enumerate(self.orders, start=1):
                        copy.write_row(
                            (
                                self.run_id,
                                o.client_order_id,
                                seq,
                                o.intent_id,
                                o.symbol,
                                o.side,
                                o.order_type,
                                o.quantity,
                                o.price,
                                o.trigger_price,
                                o.status,
                                o.filled_quantity,
                                o.avg_fill_price,
                                o.reason,
                                o.created_at,
                                o.updated_at,
                            )
                        )
                with cur.copy(
                    "COPY backtest_fills (run_id, trade_id, seq, client_order_id, exchange_order_id, exchange, "
                    "symbol, side, price, quantity, fee, fee_currency, liquidity, ts) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(_FILL_COPY_TYPES)
                    for seq, f in enumerate(self.fills, start=1):
                        copy.write_row(
                            (
                                self.run_id,
                                f.fill_id,
                                seq,
                                f.client_order_id,
                                f.exchange_order_id,
                                f.exchange,
                                f.symbol,
                                f.side.value,
                                f.price,
                                f.quantity,
                                f.fee,
                                f.fee_currency,
                                f.liquidity.value if f.liquidity is not None else None,
                                f.ts,
                            )
                        )

    @classmethod
    def load(cls, engine: Engine, run_id: uuid.UUID | str) -> BacktestResult:
        """The stored run ``run_id``; ``DataValidationError`` (reason ``unknown_run``) if there is none.
        ``orders`` and ``fills`` come back empty (module docstring); params and fill model come back as
        the JSON that was stored (decimals as strings)."""
        rid = run_id if isinstance(run_id, uuid.UUID) else uuid.UUID(str(run_id))
        with engine.connect() as conn:
            run = conn.execute(select(backtest_runs).where(backtest_runs.c.run_id == rid)).mappings().first()
            if run is None:
                raise DataValidationError(f"no backtest run {rid}", reason="unknown_run")
            metric_rows = conn.execute(
                select(backtest_metrics.c.name, backtest_metrics.c.value).where(backtest_metrics.c.run_id == rid)
            )
            stored: dict[str, Decimal | None] = {name: value for name, value in metric_rows}
            raw = conn.connection.driver_connection
            assert raw is not None
            # The driver's binary cursor skips SQLAlchemy's row objects: a curve can have a million points.
            with raw.cursor(binary=True) as cur:
                cur.execute(
                    "SELECT ts, equity, cash, position_value FROM backtest_equity WHERE run_id = %s ORDER BY ts",
                    (rid,),
                )
                equity = [EquityPoint(*row) for row in cur.fetchall()]
                cur.execute(
                    "SELECT symbol, side, quantity, entry_ts, entry_price, exit_ts, exit_price, fees, pnl "
                    "FROM backtest_trades WHERE run_id = %s ORDER BY trade_no",
                    (rid,),
                )
                trips = [_trip_from_row(row) for row in cur.fetchall()]
                cur.execute(
                    "SELECT client_order_id, intent_id, symbol, side, order_type, quantity, price, trigger_price, "
                    "status, filled_quantity, average_fill_price, created_at, updated_at, reason "
                    "FROM backtest_orders WHERE run_id = %s ORDER BY seq",
                    (rid,),
                )
                orders = [OrderRecord(*row) for row in cur.fetchall()]
                cur.execute(
                    "SELECT trade_id, client_order_id, exchange_order_id, exchange, symbol, side, price, quantity, "
                    "fee, fee_currency, liquidity, ts FROM backtest_fills WHERE run_id = %s ORDER BY seq",
                    (rid,),
                )
                fills = [_fill_from_row(row) for row in cur.fetchall()]
        return cls(
            strategy=run["strategy"],
            symbols=tuple(run["symbols"]),
            metrics=metrics_from_numeric(stored),
            equity=equity,
            fills=fills,
            orders=orders,
            round_trips=trips,
            params=run["params"],
            exchange=run["exchange"],
            timeframe=run["timeframe"],
            data_start=run["data_start"],
            data_end=run["data_end"],
            fill_model=run["fill_model"],
            code_version=run["code_version"],
            run_id=run["run_id"],
            sweep_id=run["sweep_id"],
            started_at=run["started_at"],
            finished_at=run["finished_at"],
        )

    # --- files -------------------------------------------------------------------------------

    def write_files(self, directory: str | Path) -> list[Path]:
        """Write ``metrics.json`` (``{"run": …, "metrics": …, "orders": {… "rejections": by reason},
        "warnings": […]}``; decimals as strings, durations in
        seconds, infinities as ``"Infinity"``), ``orders.csv``, ``fills.csv``, ``equity.csv`` and
        ``trades.csv`` into ``directory`` (created if missing). Returns the paths written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.json"
        document = {
            "run": self.run_info(),
            "metrics": jsonable(self.metrics.as_dict()),
            "orders": {
                "total": len(self.orders),
                "filled": sum(1 for o in self.orders if o.status == "filled"),
                "rejected": sum(self.rejections.values()),
                "open_at_end": sum(1 for o in self.orders if o.status == OPEN_AT_END),
                "rejections": self.rejections,
                "invalid": jsonable(self.invalid_orders),
            },
            "warnings": self.warnings,
        }
        metrics_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        written = [metrics_path]
        written.append(
            _write_csv(
                out / "orders.csv",
                [f.name for f in fields(OrderRecord)],
                ([getattr(o, f.name) for f in fields(OrderRecord)] for o in self.orders),
            )
        )
        phases = self.fill_phases
        written.append(
            _write_csv(
                out / "fills.csv",
                ["ts", "at", *FILL_COLUMNS[1:]],
                ([f.ts, phases.get(f.fill_id, ""), *(getattr(f, c) for c in FILL_COLUMNS[1:])] for f in self.fills),
            )
        )
        written.append(
            _write_csv(
                out / "equity.csv",
                ["ts", "equity", "cash", "position_value"],
                ((p.ts, p.equity, p.cash, p.position_value) for p in self.equity),
            )
        )
        written.append(
            _write_csv(
                out / "trades.csv",
                list(TRADE_COLUMNS),
                ([no, *(getattr(t, c) for c in TRADE_COLUMNS[1:])] for no, t in enumerate(self.round_trips, start=1)),
            )
        )
        return written


FILL_COLUMNS = (
    "ts",
    "fill_id",
    "client_order_id",
    "exchange_order_id",
    "exchange",
    "symbol",
    "side",
    "price",
    "quantity",
    "fee",
    "fee_currency",
    "liquidity",
)
TRADE_COLUMNS = (
    "trade_no",
    "symbol",
    "direction",
    "quantity",
    "entry_ts",
    "entry_price",
    "exit_ts",
    "exit_price",
    "fees",
    "pnl",
)


_ORDER_COPY_TYPES = [
    "uuid",
    "text",
    "int4",
    "text",
    "text",
    "text",
    "text",
    "numeric",
    "numeric",
    "numeric",
    "text",
    "numeric",
    "numeric",
    "text",
    "timestamptz",
    "timestamptz",
]
_FILL_COPY_TYPES = [
    "uuid",
    "text",
    "int4",
    "text",
    "text",
    "text",
    "text",
    "text",
    "numeric",
    "numeric",
    "numeric",
    "text",
    "text",
    "timestamptz",
]


def _fill_from_row(row: tuple[Any, ...]) -> Fill:
    (
        trade_id,
        client_order_id,
        exchange_order_id,
        exchange,
        symbol,
        side,
        price,
        quantity,
        fee,
        fee_currency,
        liquidity,
        ts,
    ) = row
    return Fill(
        fill_id=trade_id,
        client_order_id=client_order_id,
        exchange_order_id=exchange_order_id,
        exchange=exchange,
        symbol=symbol,
        side=Side(side),
        price=price,
        quantity=quantity,
        fee=fee,
        fee_currency=fee_currency,
        liquidity=LiquiditySide(liquidity) if liquidity is not None else None,
        ts=ts,
    )


def _trip_from_row(row: tuple[Any, ...]) -> RoundTrip:
    symbol, side, quantity, entry_ts, entry_price, exit_ts, exit_price, fees, pnl = row
    if side not in ("long", "short"):
        raise DataValidationError(f"stored round trip side {side!r} is not long or short", reason="bad_trade")
    direction: Direction = "long" if side == "long" else "short"
    return RoundTrip(symbol, direction, quantity, entry_ts, entry_price, exit_ts, exit_price, fees, pnl)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([_cell(v) for v in row] for row in rows)
    return path
