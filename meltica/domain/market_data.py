"""Public market data: trades, bars (candles) and order books."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import pairwise
from typing import Annotated, NamedTuple

from pydantic import AfterValidator, Field, model_validator

from meltica.domain.enums import Side
from meltica.domain.timeframe import Timeframe, validate_timeframe
from meltica.domain.values import DomainModel, NonNegativeDecimal, PositiveDecimal, UtcDatetime

Name = Annotated[str, Field(min_length=1, max_length=128)]
TimeframeStr = Annotated[str, AfterValidator(validate_timeframe)]


class Trade(DomainModel):
    """A public trade. ``aggressor_side`` is the taker's side when the venue says."""

    exchange: Name
    symbol: Name
    trade_id: Name
    price: PositiveDecimal
    quantity: PositiveDecimal
    aggressor_side: Side | None = None
    ts: UtcDatetime


class Bar(DomainModel):
    """An OHLCV candle; ``ts`` is the open time."""

    exchange: Name
    symbol: Name
    timeframe: TimeframeStr
    ts: UtcDatetime
    open: PositiveDecimal
    high: PositiveDecimal
    low: PositiveDecimal
    close: PositiveDecimal
    volume: NonNegativeDecimal

    @model_validator(mode="after")
    def _ohlc(self) -> Bar:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        for name in ("open", "close"):
            value: Decimal = getattr(self, name)
            if not self.low <= value <= self.high:
                raise ValueError(f"{name} {value} is outside [low {self.low}, high {self.high}]")
        return self

    @property
    def tf(self) -> Timeframe:
        return Timeframe.parse(self.timeframe)

    @property
    def close_time(self) -> UtcDatetime:
        return self.ts + self.tf.delta


class FloatBar(NamedTuple):
    """A bar with its prices and volume as floats — what a strategy that declares ``bar_prices = "float"``
    receives in a bar backtest (``meltica.strategies.Strategy.bar_prices``): the same fields as ``Bar``,
    the values the bar data held, no ``Decimal`` built. ``ts`` is the open time (aware UTC)."""

    exchange: str
    symbol: str
    timeframe: str
    ts: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float

    @property
    def tf(self) -> Timeframe:
        return Timeframe.parse(self.timeframe)

    @property
    def close_time(self) -> datetime:
        return self.ts + self.tf.delta


class TopOfBook(DomainModel):
    """Best bid and ask of a market (Binance ``bookTicker``, a venue ticker, or the top of a maintained
    book). ``ts`` is the venue's time when it gives one, else when the quote was received."""

    exchange: Name
    symbol: Name
    bid: PositiveDecimal | None = None
    bid_quantity: NonNegativeDecimal | None = None
    ask: PositiveDecimal | None = None
    ask_quantity: NonNegativeDecimal | None = None
    ts: UtcDatetime

    @property
    def mid(self) -> Decimal | None:
        if self.bid is None or self.ask is None:
            return None
        return (self.bid + self.ask) / 2


class BookLevel(DomainModel):
    """A price level. In a delta, quantity 0 removes the level."""

    price: PositiveDecimal
    quantity: NonNegativeDecimal


def _check_sorted(levels: tuple[BookLevel, ...], side: str, descending: bool) -> None:
    for a, b in pairwise(levels):
        if (a.price <= b.price) if descending else (a.price >= b.price):
            order = "descending" if descending else "ascending"
            raise ValueError(f"{side} must be strictly {order} by price ({a.price} then {b.price})")


class OrderBookSnapshot(DomainModel):
    """A full (possibly depth-limited) book: bids best-first (descending), asks best-first (ascending)."""

    exchange: Name
    symbol: Name
    bids: tuple[BookLevel, ...] = ()
    asks: tuple[BookLevel, ...] = ()
    sequence: int | None = None  # venue update id (Binance lastUpdateId)
    ts: UtcDatetime

    @model_validator(mode="after")
    def _shape(self) -> OrderBookSnapshot:
        _check_sorted(self.bids, "bids", descending=True)
        _check_sorted(self.asks, "asks", descending=False)
        if any(level.quantity == 0 for level in (*self.bids, *self.asks)):
            raise ValueError("a snapshot level has quantity 0")
        if self.bids and self.asks and self.bids[0].price >= self.asks[0].price:
            raise ValueError(f"crossed book: best bid {self.bids[0].price} >= best ask {self.asks[0].price}")
        return self

    @property
    def best_bid(self) -> BookLevel | None:
        return self.bids[0] if self.bids else None

    @property
    def best_ask(self) -> BookLevel | None:
        return self.asks[0] if self.asks else None

    @property
    def mid(self) -> Decimal | None:
        if not self.bids or not self.asks:
            return None
        return (self.bids[0].price + self.asks[0].price) / 2


class OrderBookDelta(DomainModel):
    """Changed levels between ``first_sequence`` and ``last_sequence`` (Binance ``U``/``u``).

    ``previous_sequence`` is the last id of the delta before (futures ``pu``), when the venue gives it.
    A delta may momentarily cross; only snapshots are checked for that.
    """

    exchange: Name
    symbol: Name
    bids: tuple[BookLevel, ...] = ()
    asks: tuple[BookLevel, ...] = ()
    first_sequence: int
    last_sequence: int
    previous_sequence: int | None = None
    ts: UtcDatetime

    @model_validator(mode="after")
    def _shape(self) -> OrderBookDelta:
        if self.first_sequence > self.last_sequence:
            raise ValueError(f"first_sequence {self.first_sequence} is after last_sequence {self.last_sequence}")
        for side, levels in (("bids", self.bids), ("asks", self.asks)):
            prices = [level.price for level in levels]
            if len(set(prices)) != len(prices):
                raise ValueError(f"{side} repeat a price level")
        return self


@dataclass(frozen=True, slots=True)
class CandleRow:
    """One validated bar as read from a file or loaded into the candles table: a plain row, lighter than
    ``Bar`` for bulk loads; ``line`` is its 1-based line (CSV) or row number."""

    ts: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    line: int
