"""Trading enumerations. Values are lower-case strings so they read well in messages and SQL."""

from __future__ import annotations

from enum import StrEnum


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def sign(self) -> int:
        """+1 for buy, -1 for sell: the direction a fill moves a position."""
        return 1 if self is Side.BUY else -1

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class MarketType(StrEnum):
    SPOT = "spot"
    SWAP = "swap"  # perpetual
    FUTURE = "future"  # dated
    OPTION = "option"


class OrderType(StrEnum):
    """Order types. An iceberg is not a type: it is a limit-priced order with ``display_quantity``.

    That is how venues model it (Binance ``icebergQty`` on LIMIT / STOP_LOSS_LIMIT / TAKE_PROFIT_LIMIT),
    and it keeps "how is it priced" separate from "how much is shown".
    """

    MARKET = "market"
    LIMIT = "limit"
    STOP_MARKET = "stop_market"
    STOP_LIMIT = "stop_limit"
    TAKE_PROFIT = "take_profit"  # market once triggered
    TAKE_PROFIT_LIMIT = "take_profit_limit"
    TRAILING_STOP = "trailing_stop"  # market once triggered; trigger trails the price

    @property
    def needs_price(self) -> bool:
        return self in _LIMIT_PRICED

    @property
    def needs_trigger(self) -> bool:
        return self in _TRIGGERED


_LIMIT_PRICED = frozenset({OrderType.LIMIT, OrderType.STOP_LIMIT, OrderType.TAKE_PROFIT_LIMIT})
_TRIGGERED = frozenset(
    {OrderType.STOP_MARKET, OrderType.STOP_LIMIT, OrderType.TAKE_PROFIT, OrderType.TAKE_PROFIT_LIMIT}
)


class TimeInForce(StrEnum):
    GTC = "GTC"  # good till cancelled
    IOC = "IOC"  # immediate or cancel
    FOK = "FOK"  # fill or kill
    GTD = "GTD"  # good till date: needs expire_at


class LiquiditySide(StrEnum):
    MAKER = "maker"
    TAKER = "taker"


class PriceRounding(StrEnum):
    """How to bring a price onto the tick grid."""

    NEAREST = "nearest"
    DOWN = "down"
    UP = "up"


class OrderStatus(StrEnum):
    """Lifecycle of an order. Transitions are in ``meltica.domain.orders.ALLOWED_TRANSITIONS``.

    ``NEW``: created and stored (its client order id is persisted) but not sent.
    ``PENDING_SUBMIT``: sent, the venue has not acknowledged it yet.
    ``OPEN``: acknowledged and working. ``PENDING_CANCEL``: a cancel was sent, not yet confirmed.
    ``FILLED``, ``CANCELLED``, ``REJECTED``, ``EXPIRED`` are terminal.
    """

    NEW = "new"
    PENDING_SUBMIT = "pending_submit"
    OPEN = "open"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    PENDING_CANCEL = "pending_cancel"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.EXPIRED})
