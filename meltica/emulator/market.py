"""Public market state the emulator serves besides the book: klines, recent trades, 24h statistics.

1-minute klines are the stored grain (from replayed bars, or aggregated from trades); larger
intervals are aggregated on request. Times are market (data) time in epoch milliseconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from decimal import Decimal

from meltica.emulator import errors
from meltica.emulator.binance_format import f8

MINUTE_MS = 60_000
INTERVALS_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": 60 * MINUTE_MS,
    "2h": 120 * MINUTE_MS,
    "4h": 240 * MINUTE_MS,
    "6h": 360 * MINUTE_MS,
    "8h": 480 * MINUTE_MS,
    "12h": 720 * MINUTE_MS,
    "1d": 1440 * MINUTE_MS,
    "3d": 3 * 1440 * MINUTE_MS,
    "1w": 7 * 1440 * MINUTE_MS,
}
# Binance weeks open on Monday; the epoch was a Thursday.
_WEEK_OFFSET_MS = 4 * 1440 * MINUTE_MS


def interval_ms(interval: str) -> int:
    if interval not in INTERVALS_MS:
        raise errors.invalid_interval()
    return INTERVALS_MS[interval]


def floor_ms(ts_ms: int, step: int) -> int:
    offset = _WEEK_OFFSET_MS if step == INTERVALS_MS["1w"] else 0
    return (ts_ms - offset) // step * step + offset


@dataclass
class Kline:
    open_time: int
    close_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal
    trades: int
    taker_buy_volume: Decimal
    taker_buy_quote: Decimal
    first_trade_id: int = -1
    last_trade_id: int = -1
    closed: bool = False

    def merge(self, other: Kline) -> None:
        self.high = max(self.high, other.high)
        self.low = min(self.low, other.low)
        self.close = other.close
        self.volume += other.volume
        self.quote_volume += other.quote_volume
        self.trades += other.trades
        self.taker_buy_volume += other.taker_buy_volume
        self.taker_buy_quote += other.taker_buy_quote
        if self.first_trade_id < 0:
            self.first_trade_id = other.first_trade_id
        if other.last_trade_id >= 0:
            self.last_trade_id = other.last_trade_id
        self.closed = other.closed

    def rest_row(self) -> list[object]:
        return [
            self.open_time,
            f8(self.open),
            f8(self.high),
            f8(self.low),
            f8(self.close),
            f8(self.volume),
            self.close_time,
            f8(self.quote_volume),
            self.trades,
            f8(self.taker_buy_volume),
            f8(self.taker_buy_quote),
            "0",
        ]

    def stream_payload(self, symbol: str, interval: str) -> dict[str, object]:
        return {
            "t": self.open_time,
            "T": self.close_time,
            "s": symbol,
            "i": interval,
            "f": self.first_trade_id,
            "L": self.last_trade_id,
            "o": f8(self.open),
            "c": f8(self.close),
            "h": f8(self.high),
            "l": f8(self.low),
            "v": f8(self.volume),
            "n": self.trades,
            "x": self.closed,
            "q": f8(self.quote_volume),
            "V": f8(self.taker_buy_volume),
            "Q": f8(self.taker_buy_quote),
            "B": "0",
        }


def plain(value: Decimal) -> str:
    """Decimal as plain text, never in exponent notation."""
    text = format(value, "f")
    return text


@dataclass(frozen=True)
class MarketTrade:
    trade_id: int
    price: Decimal
    quantity: Decimal
    time_ms: int
    buyer_maker: bool

    def rest(self) -> dict[str, object]:
        return {
            "id": self.trade_id,
            "price": f8(self.price),
            "qty": f8(self.quantity),
            "quoteQty": f8(self.price * self.quantity),
            "time": self.time_ms,
            "isBuyerMaker": self.buyer_maker,
            "isBestMatch": True,
        }

    def agg(self) -> dict[str, object]:
        """As one ``/api/v3/aggTrades`` entry: the emulator never aggregates, so first = last = its id."""
        return {
            "a": self.trade_id,
            "p": f8(self.price),
            "q": f8(self.quantity),
            "f": self.trade_id,
            "l": self.trade_id,
            "T": self.time_ms,
            "m": self.buyer_maker,
            "M": True,
        }


class SymbolMarket:
    """Klines and recent trades of one symbol."""

    def __init__(self, symbol: str, max_trades: int = 1000) -> None:
        self.symbol = symbol
        self.minutes: dict[int, Kline] = {}
        self.trades: deque[MarketTrade] = deque(maxlen=max_trades)

    def on_bar(
        self, open_ms: int, interval_s: int, o: Decimal, h: Decimal, lo: Decimal, c: Decimal, v: Decimal
    ) -> None:
        # A bar longer than a minute is stored at its open minute: good enough for 24h stats and klines.
        start = floor_ms(open_ms, MINUTE_MS)
        self.minutes[start] = Kline(
            open_time=start,
            close_time=start + max(interval_s * 1000, MINUTE_MS) - 1,
            open=o,
            high=h,
            low=lo,
            close=c,
            volume=v,
            quote_volume=v * c,
            trades=0,
            taker_buy_volume=Decimal(0),
            taker_buy_quote=Decimal(0),
            closed=True,
        )

    def on_trade(self, trade: MarketTrade) -> None:
        self.trades.append(trade)
        start = floor_ms(trade.time_ms, MINUTE_MS)
        notional = trade.price * trade.quantity
        taker_buy = not trade.buyer_maker
        one = Kline(
            open_time=start,
            close_time=start + MINUTE_MS - 1,
            open=trade.price,
            high=trade.price,
            low=trade.price,
            close=trade.price,
            volume=trade.quantity,
            quote_volume=notional,
            trades=1,
            taker_buy_volume=trade.quantity if taker_buy else Decimal(0),
            taker_buy_quote=notional if taker_buy else Decimal(0),
            first_trade_id=trade.trade_id,
            last_trade_id=trade.trade_id,
        )
        current = self.minutes.get(start)
        if current is None:
            self.minutes[start] = one
        else:
            current.merge(one)

    def klines(
        self, interval: str, start_ms: int | None = None, end_ms: int | None = None, limit: int = 500
    ) -> list[Kline]:
        step = interval_ms(interval)
        buckets: dict[int, Kline] = {}
        for open_ms in sorted(self.minutes):
            k = self.minutes[open_ms]
            key = floor_ms(open_ms, step) if step >= MINUTE_MS else open_ms
            if key not in buckets:
                buckets[key] = Kline(
                    open_time=key,
                    close_time=key + step - 1,
                    open=k.open,
                    high=k.high,
                    low=k.low,
                    close=k.close,
                    volume=k.volume,
                    quote_volume=k.quote_volume,
                    trades=k.trades,
                    taker_buy_volume=k.taker_buy_volume,
                    taker_buy_quote=k.taker_buy_quote,
                    first_trade_id=k.first_trade_id,
                    last_trade_id=k.last_trade_id,
                    closed=k.closed,
                )
            else:
                buckets[key].merge(k)
        rows = [buckets[key] for key in sorted(buckets)]
        if start_ms is not None:
            rows = [k for k in rows if k.open_time >= start_ms]
        if end_ms is not None:
            rows = [k for k in rows if k.open_time <= end_ms]
        if start_ms is not None:
            return rows[:limit]
        return rows[-limit:] if limit > 0 else []

    def current_kline(self, interval: str, at_ms: int) -> Kline | None:
        step = interval_ms(interval)
        key = floor_ms(at_ms, step)
        if step < MINUTE_MS:
            rows = self.klines(interval, start_ms=key, end_ms=key, limit=1)
            return rows[0] if rows else None
        # only the minutes inside this interval (a long replay stores many)
        parts = [self.minutes[m] for m in range(key, key + step, MINUTE_MS) if m in self.minutes]
        if not parts:
            return None
        first = parts[0]
        out = Kline(
            open_time=key,
            close_time=key + step - 1,
            open=first.open,
            high=first.high,
            low=first.low,
            close=first.close,
            volume=first.volume,
            quote_volume=first.quote_volume,
            trades=first.trades,
            taker_buy_volume=first.taker_buy_volume,
            taker_buy_quote=first.taker_buy_quote,
            first_trade_id=first.first_trade_id,
            last_trade_id=first.last_trade_id,
            closed=first.closed,
        )
        for part in parts[1:]:
            out.merge(part)
        return out

    def latest_kline(self, interval: str) -> Kline | None:
        """The kline holding the latest stored minute."""
        return self.current_kline(interval, max(self.minutes)) if self.minutes else None

    def stats_24h(
        self, now_ms: int
    ) -> tuple[Decimal | None, Decimal | None, Decimal | None, Decimal, Decimal, int, int]:
        """open, high, low, volume, quote volume, count, open time over the 24 h before ``now_ms``."""
        since = now_ms - 1440 * MINUTE_MS
        first = floor_ms(since, MINUTE_MS) + (MINUTE_MS if since % MINUTE_MS else 0)  # the first minute >= since
        rows = [self.minutes[k] for k in range(first, now_ms + 1, MINUTE_MS) if k in self.minutes]
        if not rows:
            return None, None, None, Decimal(0), Decimal(0), 0, since
        return (
            rows[0].open,
            max(k.high for k in rows),
            min(k.low for k in rows),
            sum((k.volume for k in rows), Decimal(0)),
            sum((k.quote_volume for k in rows), Decimal(0)),
            sum(k.trades for k in rows),
            rows[0].open_time,
        )
