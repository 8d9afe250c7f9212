"""Recorded market data as one time-ordered list of events, and the files they come from.

Sources: candle files (via ``meltica.marketdata.candle_files``), a trades parquet (nautilus layout:
``timestamp, trade_id, price, quantity, buyer_maker``) and Binance depth CSVs (nautilus layout:
``symbol, timestamp, first_update_id, last_update_id, side, update_type, price, qty, pu``; rows with
``update_type == "snap"`` form a snapshot, the others diffs). A bar is an event at its *close* time:
that is when it is known. :func:`to_wall_clock` moves a replay to start now (the real-time venue), each
bar preceded by the public trades of its path.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import IO

from meltica.domain.timeframe import Timeframe
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
class DepthEvent:
    ts: datetime
    symbol: str
    snapshot: bool
    first_update_id: int
    last_update_id: int
    bids: list[Level] = field(default_factory=list)
    asks: list[Level] = field(default_factory=list)


@dataclass(frozen=True)
class PathTradeEvent:
    """A public trade on a bar's path (real-time mode): the venue gives it the next trade id."""

    ts: datetime
    symbol: str
    price: Decimal
    quantity: Decimal
    buyer_maker: bool
    bar_volume: Decimal | None = None  # the whole bar's volume (base units): the venue sizes its book from it


ReplayEvent = BarEvent | TradeEvent | DepthEvent | PathTradeEvent


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_QTY_STEP = Decimal("0.00000001")


def _ms(value: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=value)


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return path.open(newline="")


def _csv_header(path: Path) -> list[str]:
    with _open_text(path) as fh:
        return [h.strip().lower() for h in next(csv.reader(fh), [])]


VOLUME_KINDS = ("base", "quote")


def load_file(
    path: Path | str, symbol: str, candle_timeframe: str = "1m", candle_volume: str = "base"
) -> list[ReplayEvent]:
    """Events from one file, whose kind is told by its columns. ``candle_volume``: what a candle file's
    volume column counts — ``"base"`` (Binance's kline volume: BTC of BTCUSDT) or ``"quote"`` (USDT,
    converted to base, :func:`base_volume`)."""
    if candle_volume not in VOLUME_KINDS:
        raise DataValidationError(f"candle volume must be one of {VOLUME_KINDS}, not {candle_volume!r}")
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: no such file", source=str(path))
    name = path.name.lower()
    if name.endswith(".parquet"):
        # lazy: pyarrow only for Parquet files
        import pyarrow.parquet as pq

        columns = set(pq.read_schema(path).names)
        if {"trade_id", "price", "quantity"} <= columns:
            return list(load_trades_parquet(path, symbol))
    elif ".csv" in name and "update_type" in _csv_header(path):
        return list(load_depth_csv(path, symbol))
    return list(load_candles(path, symbol, candle_timeframe, quote_volume=candle_volume == "quote"))


def base_volume(quote_volume: Decimal, o: Decimal, h: Decimal, lo: Decimal, c: Decimal) -> Decimal:
    """A bar's quote volume in base units: divided by the mean of its four path prices (each prints a
    quarter of the volume, ``bar_path``), so the kline's quote volume comes back as recorded; 8 decimals."""
    mean = (o + h + lo + c) / 4
    return (quote_volume / mean).quantize(_QTY_STEP) if mean > 0 else Decimal(0)


def load_candles(path: Path, symbol: str, timeframe: str, quote_volume: bool = False) -> list[BarEvent]:
    parsed = read_candle_file(path, timeframe)
    tf_delta = None
    out: list[BarEvent] = []

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
                volume=base_volume(row.volume, row.open, row.high, row.low, row.close) if quote_volume else row.volume,
                interval_s=tf.seconds,
            )
        )
    return out


def load_trades_parquet(path: Path, symbol: str) -> list[TradeEvent]:
    # lazy: pyarrow only for Parquet files
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
                # float columns: at Binance's 8 decimals, so 0.00031099999999999997 is the 0.000311 it was
                price=Decimal(str(row["price"])).quantize(_QTY_STEP),
                quantity=Decimal(str(row["quantity"])).quantize(_QTY_STEP),
                buyer_maker=str(maker).lower() in ("true", "1"),
            )
        )
    out.sort(key=lambda e: (e.ts, e.trade_id))
    return out


def load_depth_csv(path: Path, symbol: str) -> list[DepthEvent]:
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
        DepthEvent(
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


def bar_path(bar: BarEvent) -> list[PathTradeEvent]:
    """A bar as four public trades: open (at the open), the nearer extreme, the other extreme (a third
    and two thirds into the bar; ties: the low first, as ``MatchingEngine.on_bar``) and the close (1 ms
    before the bar ends), each a quarter of the volume: trades aggregated per interval give the bar back."""
    high_first = (bar.high - bar.open) < (bar.open - bar.low)
    path = [bar.open, bar.high, bar.low, bar.close] if high_first else [bar.open, bar.low, bar.high, bar.close]
    span_ms = bar.interval_s * 1000
    offsets_ms = [0, span_ms // 3, 2 * span_ms // 3, span_ms - 1]
    # Binance quantities have at most 8 decimals: three quarters rounded down, the last one the rest,
    # so the four trades still add up to the bar's volume.
    quarter = (bar.volume / 4).quantize(_QTY_STEP, rounding=ROUND_DOWN)
    quantities = [quarter, quarter, quarter, bar.volume - 3 * quarter]
    out: list[PathTradeEvent] = []
    previous = bar.open
    for price, offset, quantity in zip(path, offsets_ms, quantities, strict=True):
        out.append(
            PathTradeEvent(
                ts=bar.open_time + timedelta(milliseconds=offset),
                symbol=bar.symbol,
                price=price,
                quantity=quantity,
                buyer_maker=price < previous,  # a move down: a seller took the bid
                bar_volume=bar.volume,
            )
        )
        previous = price
    return out


def to_wall_clock(events: list[ReplayEvent], now: datetime, history_bars: int = 0) -> list[ReplayEvent]:
    """The events shifted so the data starts at ``now`` — floored to the bar interval when there are
    bars, so klines keep Binance's boundaries — each bar preceded by its path's trades (:func:`bar_path`);
    the bar itself stays, at its close, as the moment the bar is complete. With ``history_bars`` = N the
    N first bars lie before ``now`` (already closed: history for a strategy's warm-up) and bar N opens now."""
    if not events:
        return []
    starts = [e.open_time if isinstance(e, BarEvent) else e.ts for e in events]
    start = min(starts)
    bars = [e for e in events if isinstance(e, BarEvent)]
    origin = now
    if bars and history_bars > 0:
        opens = sorted({b.open_time for b in bars})
        start = opens[min(history_bars, len(opens) - 1)]
    if bars:
        step_ms = bars[0].interval_s * 1000
        now_ms = (now - _EPOCH) // timedelta(milliseconds=1)
        origin = _ms(now_ms // step_ms * step_ms)
    offset = origin - start
    out: list[ReplayEvent] = []
    for event in events:
        if isinstance(event, BarEvent):
            shifted = replace(event, ts=event.ts + offset, open_time=event.open_time + offset)
            out.extend(bar_path(shifted))
            out.append(shifted)
        else:
            out.append(replace(event, ts=event.ts + offset))
    return merge(out)
