"""Market data for a backtest: bars from a candle file, the database or columnar arrays, validated once.

The engine walks ``BarSeries`` (columns of ``Decimal`` prices and aware-UTC open times) and builds each
domain ``Bar`` with ``fast_bar`` — no per-bar pydantic validation, because the whole series was checked
here first (positive prices, ``low <= open, close <= high``, volume >= 0, open times strictly increasing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from meltica.domain import Bar, Timeframe
from meltica.errors import DataValidationError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BAR_FIELDS = frozenset(Bar.model_fields)
_new = object.__new__
_set = object.__setattr__


def fast_bar(
    exchange: str,
    symbol: str,
    timeframe: str,
    ts: datetime,
    o: Decimal,
    h: Decimal,
    lo: Decimal,
    c: Decimal,
    v: Decimal,
) -> Bar:
    """A ``Bar`` from already-validated values (what ``Bar.model_construct`` does, minus its overhead)."""
    bar: Bar = _new(Bar)
    _set(
        bar,
        "__dict__",
        {
            "exchange": exchange,
            "symbol": symbol,
            "timeframe": timeframe,
            "ts": ts,
            "open": o,
            "high": h,
            "low": lo,
            "close": c,
            "volume": v,
        },
    )
    _set(bar, "__pydantic_fields_set__", _BAR_FIELDS)
    _set(bar, "__pydantic_extra__", None)
    _set(bar, "__pydantic_private__", None)
    return bar


@dataclass(frozen=True)
class BarSeries:
    """Bars of one market as columns. ``ts`` is each bar's open time."""

    exchange: str
    symbol: str
    timeframe: str
    ts: Sequence[datetime]
    open: Sequence[Decimal]
    high: Sequence[Decimal]
    low: Sequence[Decimal]
    close: Sequence[Decimal]
    volume: Sequence[Decimal]

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def delta(self) -> timedelta:
        return Timeframe.parse(self.timeframe).delta

    def bars(self) -> list[Bar]:
        return [
            fast_bar(self.exchange, self.symbol, self.timeframe, *row)
            for row in zip(self.ts, self.open, self.high, self.low, self.close, self.volume, strict=True)
        ]

    def closes(self) -> list[tuple[datetime, Decimal]]:
        """``(close time, close)`` per bar, for the report's price line."""
        delta = self.delta
        return [(t + delta, c) for t, c in zip(self.ts, self.close, strict=True)]

    def validate(self) -> BarSeries:
        """Check the whole series once; ``DataValidationError`` names the first bad bar."""
        n = len(self.ts)
        for name in ("open", "high", "low", "close", "volume"):
            if len(getattr(self, name)) != n:
                raise DataValidationError(f"column {name} has {len(getattr(self, name))} values, ts has {n}")
        previous: datetime | None = None
        for i, (t, o, h, lo, c, v) in enumerate(
            zip(self.ts, self.open, self.high, self.low, self.close, self.volume, strict=True)
        ):
            if t.tzinfo is None:
                raise DataValidationError(f"bar {i}: naive timestamp {t}", reason="naive_timestamp")
            if previous is not None and t <= previous:
                raise DataValidationError(f"bar {i}: {t.isoformat()} is not after {previous.isoformat()}")
            if not (lo > 0 and lo <= o <= h and lo <= c <= h and v >= 0):
                raise DataValidationError(f"bar {i} at {t.isoformat()}: bad OHLCV {o} {h} {lo} {c} {v}")
            previous = t
        return self

    @classmethod
    def from_bars(cls, bars: Iterable[Bar]) -> BarSeries:
        items = list(bars)
        if not items:
            raise DataValidationError("no bars", reason="no_data")
        first = items[0]
        for b in items:
            if (b.exchange, b.symbol, b.timeframe) != (first.exchange, first.symbol, first.timeframe):
                raise DataValidationError("bars of more than one market or timeframe", reason="mixed_bars")
        return cls(
            first.exchange,
            first.symbol,
            first.timeframe,
            [b.ts for b in items],
            [b.open for b in items],
            [b.high for b in items],
            [b.low for b in items],
            [b.close for b in items],
            [b.volume for b in items],
        ).validate()

    @classmethod
    def from_file(cls, path: str | Path, *, exchange: str, symbol: str, timeframe: str) -> BarSeries:
        """A candle file (``.csv``/``.csv.gz``/``.feather``/``.parquet``), validated by ``read_candle_file``."""
        from meltica.marketdata.candle_files import read_candle_file

        rows = read_candle_file(path, timeframe).rows
        if not rows:
            raise DataValidationError(f"{path}: no bars", reason="no_data")
        return cls(
            exchange,
            symbol,
            timeframe,
            [r.ts for r in rows],
            [r.open for r in rows],
            [r.high for r in rows],
            [r.low for r in rows],
            [r.close for r in rows],
            [r.volume for r in rows],
        )

    @classmethod
    def from_database(
        cls,
        engine: Any,
        *,
        exchange: str,
        symbol: str,
        timeframe: str,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> BarSeries:
        """Stored candles (rolled up by the database when ``timeframe`` is a multiple of a stored one)."""
        from meltica.storage.candles import read_candles

        rows = read_candles(engine, exchange=exchange, symbol=symbol, timeframe=timeframe, start=start, end=end)
        if not rows:
            raise DataValidationError(
                f"no {timeframe} candles stored for {exchange} {symbol} in range", reason="no_data"
            )
        return cls(
            exchange,
            symbol,
            timeframe,
            [r.ts for r in rows],
            [r.open for r in rows],
            [r.high for r in rows],
            [r.low for r in rows],
            [r.close for r in rows],
            [r.volume for r in rows],
        ).validate()

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, exchange: str, symbol: str, timeframe: str) -> BarSeries:
        """Columnar arrays (numpy or sequences): ``ts`` (int ns since the epoch, or datetimes) and
        ``open``/``high``/``low``/``close``/``volume`` (floats, converted through their shortest repr)."""
        import numpy as np

        ts_raw = arrays["ts"]
        cols = {name: np.asarray(arrays[name], dtype=np.float64) for name in ("open", "high", "low", "close", "volume")}
        o, h, lo, c, v = (cols[k] for k in ("open", "high", "low", "close", "volume"))
        n = len(ts_raw)
        if any(len(col) != n for col in cols.values()):
            raise DataValidationError("columns of different lengths")
        bad = ~((lo > 0) & (lo <= o) & (o <= h) & (lo <= c) & (c <= h) & (v >= 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataValidationError(f"bar {i}: bad OHLCV {o[i]} {h[i]} {lo[i]} {c[i]} {v[i]}")
        ts_arr = np.asarray(ts_raw)
        if ts_arr.dtype.kind in "iu":
            if n > 1 and not bool(np.all(np.diff(ts_arr) > 0)):
                raise DataValidationError("bar open times are not strictly increasing")
            # Whole microseconds: datetime's resolution.
            micros = (ts_arr // 1000).tolist()
            ts = [_EPOCH + timedelta(microseconds=m) for m in micros]
        else:
            ts = [t if isinstance(t, datetime) else datetime.fromisoformat(str(t)) for t in ts_raw]
            for i in range(1, len(ts)):
                if ts[i] <= ts[i - 1]:
                    raise DataValidationError(f"bar {i}: open time not after the previous one")

        def decimals(col: Any) -> list[Decimal]:
            cache: dict[float, Decimal] = {}
            out: list[Decimal] = []
            append = out.append
            for x in col.tolist():
                d = cache.get(x)
                if d is None:
                    d = cache[x] = Decimal(repr(x))
                append(d)
            return out

        return cls(exchange, symbol, timeframe, ts, decimals(o), decimals(h), decimals(lo), decimals(c), decimals(v))
