"""Market-data series for a backtest, a paper replay or the live lock-step mode: bars from a candle file,
the database or columnar arrays, validated once; trades and order-book updates from recorded files.

The engine walks ``BarSeries`` (columns of ``Decimal`` prices and aware-UTC open times) and builds each
domain ``Bar`` with ``fast_bar`` — no per-bar pydantic validation, because the whole series was checked
here first (positive prices, ``low <= open, close <= high``, volume >= 0, open times strictly increasing).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, overload

from meltica.domain import Bar, OrderBookSnapshot, Side, Timeframe, Trade
from meltica.domain.orderbook import DepthDiff, DepthSynchronizer, L2Book
from meltica.domain.values import ValueSequence
from meltica.errors import BookGapError, DataValidationError
from meltica.marketdata.candle_files import read_candle_file
from meltica.storage.candles import read_candles

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BAR_FIELDS = frozenset(Bar.model_fields)
_CHUNK = 65_536
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


class EpochTimes(ValueSequence[datetime]):
    """Aware-UTC datetimes kept as integer epoch microseconds (a numpy int64 array): a million bar times
    are not a million ``datetime`` objects. Each is built when read; iterating builds each from the
    previous one plus the gap. Equal to any sequence of equal datetimes."""

    __slots__ = ("_micros",)

    def __init__(self, micros: Any) -> None:
        self._micros = micros

    def __len__(self) -> int:
        return len(self._micros)

    @overload
    def __getitem__(self, index: int) -> datetime: ...

    @overload
    def __getitem__(self, index: slice) -> list[datetime]: ...

    def __getitem__(self, index: int | slice) -> datetime | list[datetime]:
        if isinstance(index, slice):
            return [_EPOCH + timedelta(microseconds=m) for m in self._micros[index].tolist()]
        return _EPOCH + timedelta(microseconds=int(self._micros[index]))

    def __iter__(self) -> Iterator[datetime]:
        micros = self._micros
        if not len(micros):
            return
        previous = _EPOCH + timedelta(microseconds=int(micros[0]))
        yield previous
        gaps: dict[int, timedelta] = {}
        for start in range(1, len(micros), _CHUNK):  # in chunks: no million-int list at once
            chunk = micros[start - 1 : start + _CHUNK]
            for gap in (chunk[1:] - chunk[:-1]).tolist():
                td = gaps.get(gap)
                if td is None:
                    td = gaps[gap] = timedelta(microseconds=gap)
                previous = previous + td
                yield previous

    def __repr__(self) -> str:
        return f"<{len(self)} bar times>"


class _DecimalMemo(dict[float, Decimal]):
    """float → ``Decimal(repr(float))``, each built on first use (``from_arrays``)."""

    __slots__ = ()

    def __missing__(self, value: float) -> Decimal:
        dec = self[value] = Decimal(repr(value))
        return dec


class FloatColumn(ValueSequence[Decimal]):
    """A float64 column read as ``Decimal`` s: each value as ``Decimal(repr(value))`` (its shortest repr),
    built when read, one ``Decimal`` per distinct value (``memo``, shared by the price columns of a series).
    A million bars are not five million references held for the whole run, and a loop that reads the
    floats themselves (``floats()``: ``Strategy.bar_prices = "float"``) builds no ``Decimal`` at all.
    Equal to any sequence of equal ``Decimal`` s."""

    __slots__ = ("_memo", "_values")

    def __init__(self, values: Any, memo: _DecimalMemo | None = None) -> None:
        self._values = values  # a read-only numpy float64 array
        self._memo = _DecimalMemo() if memo is None else memo

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> Decimal: ...

    @overload
    def __getitem__(self, index: slice) -> list[Decimal]: ...

    def __getitem__(self, index: int | slice) -> Decimal | list[Decimal]:
        if isinstance(index, slice):
            return list(map(self._memo.__getitem__, self._values[index].tolist()))
        return self._memo[self._values[index].item()]

    def __iter__(self) -> Iterator[Decimal]:
        return map(self._memo.__getitem__, self.floats())

    def floats(self) -> Iterator[float]:
        """The values as Python floats, in order (converted in chunks: no million-float list at once)."""
        values = self._values
        return chain.from_iterable(values[k : k + _CHUNK].tolist() for k in range(0, len(values), _CHUNK))

    def __repr__(self) -> str:
        return f"<{len(self)} prices>"

    def scaled_integers(self, max_places: int = 8) -> tuple[int, Any] | None:
        """``(places, ints)``: every value read as a ``Decimal`` is exactly ``ints[i] / 10**places`` (an int64
        array, each below 2**53), with the fewest ``places`` up to ``max_places``; ``None`` when some value
        needs more (or is not finite). Exact integer arithmetic over a whole column without a ``Decimal``
        per value: ``ints / 10**places`` reads back as each float, and the floats are spaced finer than
        ``10**-(places + 1)``, so no other decimal of that many places reads as the same float — the shortest
        repr (``Decimal(repr(value))``) is that one."""
        # lazy: numpy only for float columns
        import numpy as np

        values = self._values
        if not len(values) or not np.all(np.isfinite(values)):
            return None
        top = float(np.max(np.abs(values)))
        for places in range(max_places + 1):
            scale = float(10**places)
            if top * scale >= 2.0**53 or top * 2.0**-52 >= 10.0 ** -(places + 1):
                return None
            ints = np.rint(values * scale)
            if np.array_equal(ints / scale, values):
                return places, ints.astype(np.int64)
        return None


def float_values(column: Sequence[Decimal]) -> Iterator[float]:
    """A price or volume column's values as floats: a ``FloatColumn``'s own, else ``float`` of each."""
    if isinstance(column, FloatColumn):
        return column.floats()
    return map(float, column)


class OhlcvRow(Protocol):
    """One bar's open time and OHLCV, as a ``Bar`` or a stored/read ``CandleRow`` has them."""

    @property
    def ts(self) -> datetime: ...
    @property
    def open(self) -> Decimal: ...
    @property
    def high(self) -> Decimal: ...
    @property
    def low(self) -> Decimal: ...
    @property
    def close(self) -> Decimal: ...
    @property
    def volume(self) -> Decimal: ...


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
    warnings: tuple[str, ...] = ()
    """What loading found but did not refuse (rows out of order, gaps), in words for the user."""
    open_micros: Any = None
    """``ts`` as a numpy int64 array of epoch microseconds, when the bars came as integer arrays."""

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
    def from_ohlcv(
        cls,
        rows: Sequence[OhlcvRow],
        *,
        exchange: str,
        symbol: str,
        timeframe: str,
        warnings: tuple[str, ...] = (),
    ) -> BarSeries:
        """Rows (``Bar``, ``CandleRow``: anything with ``ts`` and OHLCV) as columns; not validated."""
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
            warnings,
        )

    @classmethod
    def from_bars(cls, bars: Iterable[Bar]) -> BarSeries:
        items = list(bars)
        if not items:
            raise DataValidationError("no bars", reason="no_data")
        first = items[0]
        for b in items:
            if (b.exchange, b.symbol, b.timeframe) != (first.exchange, first.symbol, first.timeframe):
                raise DataValidationError("bars of more than one market or timeframe", reason="mixed_bars")
        return cls.from_ohlcv(items, exchange=first.exchange, symbol=first.symbol, timeframe=first.timeframe).validate()

    @classmethod
    def from_file(cls, path: str | Path, *, exchange: str, symbol: str, timeframe: str | None) -> BarSeries:
        """A bar file (CSV, Feather, Parquet, freqtrade/pandas JSON), validated by ``read_candle_file``;
        ``timeframe=None`` infers it from the bars' spacing. Gaps and unsorted rows are in ``warnings``."""
        parsed = read_candle_file(path, timeframe)
        rows = parsed.rows
        if not rows:
            raise DataValidationError(f"{path}: no bars", reason="no_data")
        return cls.from_ohlcv(
            rows, exchange=exchange, symbol=symbol, timeframe=parsed.timeframe.value, warnings=parsed.warnings
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
        rows = read_candles(engine, exchange=exchange, symbol=symbol, timeframe=timeframe, start=start, end=end)
        if not rows:
            raise DataValidationError(
                f"no {timeframe} candles stored for {exchange} {symbol} in range", reason="no_data"
            )
        return cls.from_ohlcv(rows, exchange=exchange, symbol=symbol, timeframe=timeframe).validate()

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, exchange: str, symbol: str, timeframe: str) -> BarSeries:
        """Columnar arrays (numpy or sequences): ``ts`` (int ns since the epoch, or datetimes) and
        ``open``/``high``/``low``/``close``/``volume`` (floats, converted through their shortest repr)."""
        # lazy: numpy only for float columns
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
        micros: Any = None
        if ts_arr.dtype.kind in "iu":
            if n > 1 and not bool(np.all(np.diff(ts_arr) > 0)):
                raise DataValidationError("bar open times are not strictly increasing")
            # Whole microseconds: datetime's resolution; the times stay integers (``EpochTimes``).
            micros = ts_arr.astype(np.int64) // 1000
            ts: Sequence[datetime] = EpochTimes(micros)
        else:
            ts = [t if isinstance(t, datetime) else datetime.fromisoformat(str(t)) for t in ts_raw]
            for i in range(1, len(ts)):
                if ts[i] <= ts[i - 1]:
                    raise DataValidationError(f"bar {i}: open time not after the previous one")

        # Kept as floats (a copy, read-only: what was validated stays), read as Decimals when read
        # (``FloatColumn``): one Decimal per distinct value (its repr), shared by its repeats — the four
        # price columns share one memo (a bar's open is mostly the previous close), the volumes have theirs.
        prices, volumes = _DecimalMemo(), _DecimalMemo()

        def column(values: Any, memo: _DecimalMemo) -> FloatColumn:
            kept = np.array(values, dtype=np.float64, copy=True)
            kept.setflags(write=False)
            return FloatColumn(kept, memo)

        return cls(
            exchange,
            symbol,
            timeframe,
            ts,
            column(o, prices),
            column(h, prices),
            column(lo, prices),
            column(c, prices),
            column(v, volumes),
            open_micros=micros,
        )


# --- trades -----------------------------------------------------------------------------------------

_TS_NAMES = ("ts", "timestamp", "time", "date", "datetime", "ts_event", "transact_time", "T")
_QTY_NAMES = ("quantity", "qty", "amount", "size", "volume", "q")
_PRICE_NAMES = ("price", "p")


def _to_datetime(value: Any) -> datetime:
    """A timestamp as epoch (s / ms / µs / ns, guessed from the magnitude), ISO text or datetime → aware UTC."""
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        return _to_datetime(value.to_pydatetime())
    if isinstance(value, str):
        text = value.strip()
        try:
            return _to_datetime(int(text))
        except ValueError:
            return _to_datetime(datetime.fromisoformat(text.replace("Z", "+00:00")))
    number = int(value)
    magnitude = abs(number)
    if magnitude >= 10**17:
        micros = number // 1000
    elif magnitude >= 10**14:
        micros = number
    elif magnitude >= 10**11:
        micros = number * 1000
    else:
        micros = number * 1_000_000
    return _EPOCH + timedelta(microseconds=micros)


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(str(value).strip())


def _aggressor(row: Mapping[str, Any]) -> Side | None:
    """The taker's side from ``side``/``aggressor_side`` (buy/sell, b/s) or ``buyer_maker``/``is_buyer_maker``/``m``."""
    for key in ("aggressor_side", "side", "taker_side"):
        raw = row.get(key)
        if raw is None or raw == "":
            continue
        text = str(raw).strip().lower()
        if text in ("buy", "b", "buyer"):
            return Side.BUY
        if text in ("sell", "s", "seller"):
            return Side.SELL
    for key in ("buyer_maker", "is_buyer_maker", "m"):
        raw = row.get(key)
        if raw is None or raw == "":
            continue
        maker = raw if isinstance(raw, bool) else str(raw).strip().lower() in ("true", "1", "t", "yes")
        return Side.SELL if maker else Side.BUY  # the buyer made the market: the seller took
    return None


def _pick(row: Mapping[str, Any], names: Sequence[str], what: str, where: str) -> Any:
    for name in names:
        if name in row and row[name] is not None and row[name] != "":
            return row[name]
    raise DataValidationError(f"{where}: no {what} column (one of {', '.join(names)})", reason="bad_trades")


@dataclass(frozen=True)
class TradeSeries:
    """Recorded public trades of one market as columns, in time order (ties keep the file's order).

    ``side`` is the aggressor (taker) side when the source says, else ``None`` (then a print may fill
    resting orders on either side)."""

    exchange: str
    symbol: str
    ts: Sequence[datetime]
    price: Sequence[Decimal]
    quantity: Sequence[Decimal]
    side: Sequence[Side | None]
    trade_id: Sequence[str] = ()

    def __len__(self) -> int:
        return len(self.ts)

    def trade(self, i: int) -> Trade:
        """The ``i``-th trade as a domain ``Trade`` (built without re-validation: the series is checked)."""
        return Trade.model_construct(
            exchange=self.exchange,
            symbol=self.symbol,
            trade_id=self.trade_id[i] if self.trade_id else str(i + 1),
            price=self.price[i],
            quantity=self.quantity[i],
            aggressor_side=self.side[i],
            ts=self.ts[i],
        )

    def trades(self) -> list[Trade]:
        return [self.trade(i) for i in range(len(self))]

    @property
    def total_quantity(self) -> Decimal:
        return sum(self.quantity, Decimal(0))

    def validate(self) -> TradeSeries:
        n = len(self.ts)
        for name in ("price", "quantity", "side"):
            if len(getattr(self, name)) != n:
                raise DataValidationError(f"trade column {name} has {len(getattr(self, name))} values, ts has {n}")
        if self.trade_id and len(self.trade_id) != n:
            raise DataValidationError(f"trade column trade_id has {len(self.trade_id)} values, ts has {n}")
        previous: datetime | None = None
        for i, (t, p, q) in enumerate(zip(self.ts, self.price, self.quantity, strict=True)):
            if t.tzinfo is None:
                raise DataValidationError(f"trade {i}: naive timestamp {t}", reason="naive_timestamp")
            if previous is not None and t < previous:
                raise DataValidationError(f"trade {i}: {t.isoformat()} is before {previous.isoformat()}")
            if not (p > 0 and q > 0):
                raise DataValidationError(f"trade {i} at {t.isoformat()}: bad price/quantity {p} {q}")
            previous = t
        return self

    @classmethod
    def from_rows(
        cls, rows: Iterable[Mapping[str, Any]], *, exchange: str, symbol: str, where: str = "trades"
    ) -> TradeSeries:
        """Rows with a timestamp, price, quantity and (optionally) side / buyer-maker / trade id; sorted by
        time, stably (equal timestamps keep their order)."""
        parsed: list[tuple[datetime, Decimal, Decimal, Side | None, str]] = []
        for n, row in enumerate(rows):
            tid = row.get("trade_id", row.get("id", row.get("tid")))
            parsed.append(
                (
                    _to_datetime(_pick(row, _TS_NAMES, "timestamp", where)),
                    _to_decimal(_pick(row, _PRICE_NAMES, "price", where)),
                    _to_decimal(_pick(row, _QTY_NAMES, "quantity", where)),
                    _aggressor(row),
                    str(tid) if tid is not None and tid != "" else str(n + 1),
                )
            )
        if not parsed:
            raise DataValidationError(f"{where}: no trades", reason="no_data")
        parsed.sort(key=lambda r: r[0])  # stable
        return cls(
            exchange,
            symbol,
            [r[0] for r in parsed],
            [r[1] for r in parsed],
            [r[2] for r in parsed],
            [r[3] for r in parsed],
            [r[4] for r in parsed],
        ).validate()

    @classmethod
    def from_trades(cls, trades: Iterable[Trade]) -> TradeSeries:
        items = list(trades)
        if not items:
            raise DataValidationError("no trades", reason="no_data")
        first = items[0]
        if any((t.exchange, t.symbol) != (first.exchange, first.symbol) for t in items):
            raise DataValidationError("trades of more than one market", reason="mixed_trades")
        items.sort(key=lambda t: t.ts)
        return cls(
            first.exchange,
            first.symbol,
            [t.ts for t in items],
            [t.price for t in items],
            [t.quantity for t in items],
            [t.aggressor_side for t in items],
            [t.trade_id for t in items],
        ).validate()

    @classmethod
    def from_file(cls, path: str | Path, *, exchange: str, symbol: str) -> TradeSeries:
        """Trades from ``.parquet``, ``.csv``/``.csv.gz`` (header row) or ``.json``/``.json.gz``.

        Columns are found by name: timestamp (``ts``/``timestamp``/``time``/``date``; epoch s/ms/µs/ns or
        ISO-8601), ``price``, ``quantity``/``qty``/``amount``, and the aggressor from ``side`` (buy/sell) or
        ``buyer_maker``/``is_buyer_maker`` (true → the seller took). JSON: a list of objects, or of
        freqtrade rows ``[timestamp_ms, id, type, side, price, amount, cost]``."""
        p = Path(path)
        name = p.name.lower()
        where = str(p)
        if not p.exists():
            raise DataValidationError(f"{where}: no such file", reason="no_data")
        if name.endswith(".parquet"):
            # lazy: pyarrow only for Parquet files
            import pyarrow.parquet as pq

            rows: list[dict[str, Any]] = pq.read_table(p).to_pylist()
        elif name.endswith((".csv", ".csv.gz")):
            raw = gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()
            rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
        elif name.endswith((".json", ".json.gz")):
            raw = gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()
            data = json.loads(raw, parse_float=Decimal)
            if isinstance(data, Mapping):
                data = data.get("trades", data.get("data", []))
            rows = []
            for item in data:
                if isinstance(item, Mapping):
                    rows.append(dict(item))
                elif isinstance(item, list) and len(item) >= 6:
                    rows.append(
                        {"ts": item[0], "trade_id": item[1], "side": item[3], "price": item[4], "quantity": item[5]}
                    )
                else:
                    raise DataValidationError(f"{where}: unrecognised trade row {item!r}", reason="bad_trades")
        else:
            raise DataValidationError(f"{where}: unsupported trade file type", reason="bad_trades")
        return cls.from_rows(rows, exchange=exchange, symbol=symbol, where=where)


# --- order books ------------------------------------------------------------------------------------

Levels = tuple[tuple[Decimal, Decimal], ...]


@dataclass(frozen=True)
class BookEvent:
    """One book update to replay: ``snapshot`` replaces the venue's recorded book with ``bids``/``asks``;
    a delta sets the given levels (quantity 0 removes one). ``book`` is the maintained book after it
    (top ``depth`` levels), what the strategy's ``on_book`` receives."""

    ts: datetime
    snapshot: bool
    bids: Levels
    asks: Levels
    book: OrderBookSnapshot


@dataclass(frozen=True)
class BookSeries:
    """Recorded L2 book updates of one market, in time order. ``gaps``: diffs dropped because they did not
    continue the sequence (Binance's procedure, ``DepthSynchronizer``); the book stays at its last
    in-sequence state until the next snapshot."""

    exchange: str
    symbol: str
    events: Sequence[BookEvent]
    gaps: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ts(self) -> list[datetime]:
        return [e.ts for e in self.events]

    @classmethod
    def from_snapshots(cls, snapshots: Iterable[OrderBookSnapshot], *, depth: int | None = None) -> BookSeries:
        """Direct snapshots (each replaces the book)."""
        items = sorted(snapshots, key=lambda s: s.ts)
        if not items:
            raise DataValidationError("no book snapshots", reason="no_data")
        first = items[0]
        events = []
        for s in items:
            bids = tuple((lv.price, lv.quantity) for lv in s.bids)
            asks = tuple((lv.price, lv.quantity) for lv in s.asks)
            view = s if depth is None else s.model_copy(update={"bids": s.bids[:depth], "asks": s.asks[:depth]})
            events.append(BookEvent(s.ts, True, bids, asks, view))
        return cls(first.exchange, first.symbol, events)

    @classmethod
    def from_binance_csv(
        cls,
        snapshot: str | Path,
        updates: str | Path | None = None,
        *,
        exchange: str,
        symbol: str,
        depth: int | None = 20,
        on_gap: str = "drop",
    ) -> BookSeries:
        """Binance-style depth CSVs (the layout of Nautilus' test data: ``symbol,timestamp,first_update_id,
        last_update_id,side,update_type,price,qty,pu``; ``side`` ``b``/``a``; one message = the rows sharing
        timestamp and update ids). Snapshots load the book, diffs go through ``DepthSynchronizer``
        (spot or futures rule, ``pu`` present = futures). A diff that does not continue the sequence:
        ``on_gap="raise"`` raises ``BookGapError``; ``"drop"`` (default) drops it and every diff until
        the next snapshot (counted in ``gaps``/``dropped``); ``"apply"`` applies it anyway and carries on
        from it (counted in ``gaps``; recorded files with holes). ``depth``: levels in the strategy's view."""
        if on_gap not in ("raise", "drop", "apply"):
            raise ValueError("on_gap must be 'raise', 'drop' or 'apply'")
        messages: list[tuple[datetime, int, int, dict[str, Any]]] = []  # (ts, kind 0 = snapshot, seq, msg)
        seq = 0
        for kind, path in ((0, snapshot), (1, updates)):
            if path is None:
                continue
            for msg in _depth_messages(Path(path)):
                messages.append((msg["ts"], kind, seq, msg))
                seq += 1
        if not messages:
            raise DataValidationError(f"{snapshot}: no book data", reason="no_data")
        messages.sort(key=lambda m: (m[0], m[1], m[2]))
        book = L2Book(exchange, symbol)
        sync = DepthSynchronizer(book)
        events: list[BookEvent] = []
        gaps = dropped = 0
        for ts, kind, _, msg in messages:
            if kind == 0 or msg["snapshot"]:
                sync.resync()  # diffs are replayed in time order: nothing buffered can bridge a later snapshot
                sync.on_snapshot(msg["bids"], msg["asks"], msg["last"], ts)
                events.append(BookEvent(ts, True, _levels(book.bids()), _levels(book.asks()), book.snapshot(depth, ts)))
                continue
            if sync.needs_snapshot:
                dropped += 1
                continue
            diff = DepthDiff(msg["first"], msg["last"], msg["bids"], msg["asks"], msg["pu"], ts)
            try:
                applied = sync.on_diff(diff)
            except BookGapError:
                if on_gap == "raise":
                    raise
                gaps += 1
                if on_gap == "drop":
                    dropped += 1
                    continue
                # "apply": take the diff as it is (the book may be wrong until the next snapshot)
                book.apply_levels(diff.bids, diff.asks)
                sync.resync()
                sync.on_snapshot(book.bids(), book.asks(), diff.last_id, ts)
                applied = True
            if applied:
                events.append(
                    BookEvent(ts, False, _levels(msg["bids"]), _levels(msg["asks"]), book.snapshot(depth, ts))
                )
        return cls(exchange, symbol, events, gaps=gaps, dropped=dropped)


def _levels(levels: Iterable[Sequence[Any]]) -> Levels:
    return tuple((_to_decimal(p), _to_decimal(q)) for p, q, *_ in levels)


def _depth_messages(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DataValidationError(f"{path}: no such file", reason="no_data")
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        key = (row["timestamp"], row["first_update_id"], row["last_update_id"], row.get("update_type") == "snap")
        if current is None or current["key"] != key:
            pu = row.get("pu")
            current = {
                "key": key,
                "ts": _to_datetime(row["timestamp"]),
                "first": int(row["first_update_id"]),
                "last": int(row["last_update_id"]),
                "pu": None if pu in (None, "", "-1") else int(pu),
                "snapshot": row.get("update_type") == "snap",
                "bids": [],
                "asks": [],
            }
            out.append(current)
        side = row["side"].strip().lower()
        level = (row["price"], row["qty"])
        if side in ("b", "bid", "bids", "buy"):
            current["bids"].append(level)
        elif side in ("a", "ask", "asks", "sell"):
            current["asks"].append(level)
        else:
            raise DataValidationError(f"{path}: unknown side {row['side']!r}", reason="bad_book")
    return out
