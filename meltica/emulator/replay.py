"""Recorded market data as one time-ordered list of events, and the files they come from.

Sources: candle files (via ``meltica.marketdata.candle_files``), a trades parquet (nautilus layout:
``timestamp, trade_id, price, quantity, buyer_maker``) and Binance depth CSVs (nautilus layout:
``symbol, timestamp, first_update_id, last_update_id, side, update_type, price, qty, pu``; rows with
``update_type == "snap"`` form a snapshot, the others diffs). A bar is an event at its *close* time:
that is when it is known.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO

from meltica.errors import DataValidationError
from meltica.marketdata.candle_files import read_candle_file

Level = tuple[Decimal, Decimal]


@dataclass(frozen=True)
class BarEvent:
    ts: datetime  # close time
    symbol: str
    open_time: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    interval_s: int


@dataclass(frozen=True)
class TradeEvent:
    ts: datetime
    symbol: str
    trade_id: int
    price: Decimal
    quantity: Decimal
    buyer_maker: bool


@dataclass(frozen=True)
class BookEvent:
    ts: datetime
    symbol: str
    snapshot: bool
    first_update_id: int
    last_update_id: int
    bids: list[Level] = field(default_factory=list)
    asks: list[Level] = field(default_factory=list)


ReplayEvent = BarEvent | TradeEvent | BookEvent


def _ms(value: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=value)


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return path.open(newline="")


def _csv_header(path: Path) -> list[str]:
    with _open_text(path) as fh:
        return [h.strip().lower() for h in next(csv.reader(fh), [])]


def load_file(path: Path | str, symbol: str, candle_timeframe: str = "1m") -> list[ReplayEvent]:
    """Events from one file, whose kind is told by its columns."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: no such file", source=str(path))
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        columns = set(pq.read_schema(path).names)
        if {"trade_id", "price", "quantity"} <= columns:
            return list(load_trades_parquet(path, symbol))
    elif ".csv" in name and "update_type" in _csv_header(path):
        return list(load_depth_csv(path, symbol))
    return list(load_candles(path, symbol, candle_timeframe))


def load_candles(path: Path, symbol: str, timeframe: str) -> list[BarEvent]:
    parsed = read_candle_file(path, timeframe)
    tf_delta = None
    out: list[BarEvent] = []
    from meltica.domain.timeframe import Timeframe

    tf = Timeframe.parse(timeframe)
    tf_delta = tf.delta
    for row in parsed.rows:
        out.append(
            BarEvent(
                ts=row.ts + tf_delta,
                symbol=symbol,
                open_time=row.ts,
                open=row.open,
                high=row.high,
                low=row.low,
                close=row.close,
                volume=row.volume,
                interval_s=tf.seconds,
            )
        )
    return out


def load_trades_parquet(path: Path, symbol: str) -> list[TradeEvent]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    out: list[TradeEvent] = []
    for row in table.to_pylist():
        ts = row["timestamp"]
        if isinstance(ts, int):
            ts = _ms(ts)
        ts = ts.astimezone(UTC)
        maker = row.get("buyer_maker")
        out.append(
            TradeEvent(
                ts=ts,
                symbol=symbol,
                trade_id=int(row["trade_id"]),
                price=Decimal(str(row["price"])),
                quantity=Decimal(str(row["quantity"])),
                buyer_maker=str(maker).lower() in ("true", "1"),
            )
        )
    out.sort(key=lambda e: (e.ts, e.trade_id))
    return out


def load_depth_csv(path: Path, symbol: str) -> list[BookEvent]:
    """Group rows into snapshots/diffs by (timestamp, last_update_id, snapshot?)."""
    groups: dict[tuple[int, int, bool], tuple[int, list[Level], list[Level]]] = {}
    with _open_text(path) as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):
            try:
                ts = int(row["timestamp"])
                first = int(row["first_update_id"])
                last = int(row["last_update_id"])
                snap = row["update_type"].strip().lower() == "snap"
                level = (Decimal(row["price"]), Decimal(row["qty"]))
                side = row["side"].strip().lower()
            except (KeyError, ValueError, ArithmeticError) as exc:
                raise DataValidationError(f"{path}:{n}: bad depth row: {exc}", source=str(path)) from exc
            key = (ts, last, snap)
            if key not in groups:
                groups[key] = (first, [], [])
            _, bids, asks = groups[key]
            (bids if side in ("b", "bid", "buy") else asks).append(level)
    out = [
        BookEvent(
            ts=_ms(ts),
            symbol=symbol,
            snapshot=snap,
            first_update_id=first,
            last_update_id=last,
            bids=sorted(bids, key=lambda lv: -lv[0]),
            asks=sorted(asks, key=lambda lv: lv[0]),
        )
        for (ts, last, snap), (first, bids, asks) in groups.items()
    ]
    out.sort(key=lambda e: (e.ts, not e.snapshot, e.last_update_id))
    return out


def merge(*sources: list[ReplayEvent]) -> list[ReplayEvent]:
    """All events in time order (stable: same-time events keep their source order)."""
    events = [e for src in sources for e in src]
    events.sort(key=lambda e: e.ts)
    return events
