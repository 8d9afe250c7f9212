"""The trading domain: value objects and immutable past-tense events (DESIGN.md §4, §9).

Every model is a frozen pydantic v2 model with ``extra="forbid"``, so the same classes are the
message schemas on the Kafka topics. Money and quantities are ``Decimal``; times are aware UTC.
"""

from meltica.domain.enums import (
    TERMINAL_STATUSES,
    LiquiditySide,
    MarketType,
    OrderStatus,
    OrderType,
    PriceRounding,
    Side,
    TimeInForce,
)
from meltica.domain.instrument import Instrument
from meltica.domain.market_data import Bar, BookLevel, FloatBar, OrderBookDelta, OrderBookSnapshot, TopOfBook, Trade
from meltica.domain.orders import (
    ALLOWED_TRANSITIONS,
    CLIENT_ORDER_ID_PATTERN,
    AnyOrderEvent,
    Fill,
    Order,
    OrderAccepted,
    OrderAmended,
    OrderCancelled,
    OrderCancelRejected,
    OrderCancelRequested,
    OrderEvent,
    OrderExpired,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderSubmitted,
    client_order_id_for,
    parse_order_event,
    transition,
)
from meltica.domain.portfolio import Balance, Position
from meltica.domain.timeframe import Timeframe
from meltica.domain.values import (
    Amount,
    DecimalLike,
    DomainModel,
    NonNegativeDecimal,
    PositiveDecimal,
    UtcDatetime,
    ms_to_utc,
    to_decimal,
    utc_to_ms,
)

Market = Instrument  # ccxt calls it a market; both names mean the same thing here

__all__ = [
    "ALLOWED_TRANSITIONS",
    "CLIENT_ORDER_ID_PATTERN",
    "TERMINAL_STATUSES",
    "Amount",
    "AnyOrderEvent",
    "Balance",
    "Bar",
    "BookLevel",
    "DecimalLike",
    "DomainModel",
    "Fill",
    "FloatBar",
    "Instrument",
    "LiquiditySide",
    "Market",
    "MarketType",
    "NonNegativeDecimal",
    "Order",
    "OrderAccepted",
    "OrderAmended",
    "OrderBookDelta",
    "OrderBookSnapshot",
    "OrderCancelRejected",
    "OrderCancelRequested",
    "OrderCancelled",
    "OrderEvent",
    "OrderExpired",
    "OrderFilled",
    "OrderIntent",
    "OrderRejected",
    "OrderStatus",
    "OrderSubmitted",
    "OrderType",
    "Position",
    "PositiveDecimal",
    "PriceRounding",
    "Side",
    "TimeInForce",
    "Timeframe",
    "TopOfBook",
    "Trade",
    "UtcDatetime",
    "client_order_id_for",
    "ms_to_utc",
    "parse_order_event",
    "to_decimal",
    "transition",
    "utc_to_ms",
]
