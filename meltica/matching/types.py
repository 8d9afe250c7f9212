"""Vocabulary of the matching engine: Binance spot enums, requests, immutable result snapshots, errors.

Everything a caller receives is a frozen dataclass holding ``Decimal`` and aware-UTC ``datetime`` values,
so the emulator can serialise it later without the engine changing it underneath.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from meltica.domain.enums import Side
from meltica.errors import InsufficientFundsError, InvalidOrderError, OrderNotFoundError, TerminalError

Account = str


class EngineOrderType(StrEnum):
    MARKET = "MARKET"
    LIMIT = "LIMIT"
    LIMIT_MAKER = "LIMIT_MAKER"
    STOP_LOSS = "STOP_LOSS"
    STOP_LOSS_LIMIT = "STOP_LOSS_LIMIT"
    TAKE_PROFIT = "TAKE_PROFIT"
    TAKE_PROFIT_LIMIT = "TAKE_PROFIT_LIMIT"

    @property
    def is_conditional(self) -> bool:
        """Waits for a trigger (stop or take-profit)."""
        return self in _CONDITIONAL

    @property
    def is_limit_priced(self) -> bool:
        return self in _LIMIT_PRICED


_CONDITIONAL = frozenset(
    {
        EngineOrderType.STOP_LOSS,
        EngineOrderType.STOP_LOSS_LIMIT,
        EngineOrderType.TAKE_PROFIT,
        EngineOrderType.TAKE_PROFIT_LIMIT,
    }
)
_LIMIT_PRICED = frozenset(
    {
        EngineOrderType.LIMIT,
        EngineOrderType.LIMIT_MAKER,
        EngineOrderType.STOP_LOSS_LIMIT,
        EngineOrderType.TAKE_PROFIT_LIMIT,
    }
)


class EngineTimeInForce(StrEnum):
    GTC = "GTC"
    IOC = "IOC"
    FOK = "FOK"
    GTD = "GTD"  # paper venue only: needs ``expire_at``


class EngineOrderStatus(StrEnum):
    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    EXPIRED_IN_MATCH = "EXPIRED_IN_MATCH"

    @property
    def is_open(self) -> bool:
        return self in (EngineOrderStatus.NEW, EngineOrderStatus.PARTIALLY_FILLED)


class ExecutionType(StrEnum):
    NEW = "NEW"
    TRADE = "TRADE"
    CANCELED = "CANCELED"
    REPLACED = "REPLACED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    TRADE_PREVENTION = "TRADE_PREVENTION"


class SelfTradePrevention(StrEnum):
    """Binance's STP modes: what happens when a taker would trade with a resting order of its own account
    (the taker's mode decides). ``EXPIRED_IN_MATCH`` / ``TRADE_PREVENTION`` mark the expired order(s)."""

    NONE = "NONE"  # they trade
    EXPIRE_TAKER = "EXPIRE_TAKER"  # the taker's remainder expires; the resting order stays
    EXPIRE_MAKER = "EXPIRE_MAKER"  # the resting order expires; the taker goes on
    EXPIRE_BOTH = "EXPIRE_BOTH"


class RejectReason(StrEnum):
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    PRICE_FILTER = "PRICE_FILTER"
    LOT_SIZE = "LOT_SIZE"
    MIN_NOTIONAL = "MIN_NOTIONAL"
    MAX_NUM_ORDERS = "MAX_NUM_ORDERS"
    WOULD_TAKE = "WOULD_TAKE"
    UNKNOWN_ORDER = "UNKNOWN_ORDER"
    DUPLICATE_CLIENT_ORDER_ID = "DUPLICATE_CLIENT_ORDER_ID"
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    STOP_PRICE_WOULD_TRIGGER_IMMEDIATELY = "STOP_PRICE_WOULD_TRIGGER_IMMEDIATELY"
    FOK_NOT_FILLABLE = "FOK_NOT_FILLABLE"


# --- errors ----------------------------------------------------------------------------------


class EngineRejection(TerminalError):  # noqa: N818 -- the contract (README) names it
    """The engine refused a request; nothing changed.

    ``reason`` (a ``str`` on every ``MelticaError``) is the ``RejectReason`` member itself — a ``StrEnum``,
    so it is a str too; ``reject_reason`` is the same value typed as the enum. Raise through
    ``EngineRejection.of`` to get the subclass that also belongs to the project taxonomy
    (``InvalidOrderError``, ``InsufficientFundsError``, ``OrderNotFoundError``).
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message, reason=reason)
        self.reject_reason = reason

    @staticmethod
    def of(reason: RejectReason, message: str) -> EngineRejection:
        if reason is RejectReason.INSUFFICIENT_BALANCE:
            return EngineInsufficientFundsError(reason, message)
        if reason is RejectReason.UNKNOWN_ORDER:
            return EngineUnknownOrderError(reason, message)
        return EngineInvalidOrderError(reason, message)


class EngineInvalidOrderError(EngineRejection, InvalidOrderError):
    pass


class EngineInsufficientFundsError(EngineRejection, InsufficientFundsError):
    pass


class EngineUnknownOrderError(EngineRejection, OrderNotFoundError):
    pass


class CancelReplacePartialFailureError(EngineInvalidOrderError):
    """``cancel_replace``: the cancel succeeded, the new order failed (Binance ``-2021``, HTTP 409).

    ``cancel_result`` holds what the cancel did (the old order stays cancelled, as Binance's
    ``STOP_ON_FAILURE`` does); ``reject_reason`` is why the new order failed.
    """

    def __init__(self, reason: RejectReason, message: str, cancel_result: MatchResult) -> None:
        super().__init__(reason, message)
        self.cancel_result = cancel_result


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """Rates (0.001 = 0.1 %); negative means a rebate.

    ``quote_commission``: charge every commission in the quote asset (as USDT-margined derivatives
    venues do, and as the backtester's metrics assume) instead of in the asset received (Binance spot's
    default: a buy pays in base). A buy's commission is taken from the free quote balance (what is left
    of the order's own reservation when the free balance is short); a buy is admitted only if the free
    quote covers its cost plus the fee at the higher of the two rates.
    """

    maker: Decimal = Decimal("0.001")
    taker: Decimal = Decimal("0.001")
    quote_commission: bool = False


@dataclass(frozen=True, slots=True)
class FillModel:
    """How the engine turns recorded market data into fills.

    * ``fill_on_touch``: a recorded trade exactly at a resting limit price fills it (default: only a
      trade strictly through the price does — conservative queue position).
    * ``synthetic_*``: the book derived from the last price when no book was ever recorded. Level ``i``
      (0-based) sits ``synthetic_spread_bps × (i + ½)`` away from the last price on each side, rounded
      away from it to the tick, with ``synthetic_level_quantity`` (base units) each.
    * ``market_reserve_bps``: extra quote locked for a stop-market buy over its reference price
      (stop price, or last price when trailing), released after it runs; the triggered order may not
      spend more than it locked (the rest expires).
    * ``synthetic_spread_bps = 0`` gives a locked synthetic book (bid = ask = last price): takers fill
      exactly at the last price (the backtester's "no slippage").
    * ``bar_volume_share``: resting orders may fill at most this share of a recorded bar's volume over
      the bar's whole path (``None``: the whole volume) — the backtester's partial-fill cap.
    """

    fill_on_touch: bool = False
    synthetic_spread_bps: Decimal = Decimal(10)
    synthetic_levels: int = 5
    synthetic_level_quantity: Decimal = Decimal(1_000_000)
    market_reserve_bps: Decimal = Decimal(500)
    bar_volume_share: Decimal | None = None


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewOrder:
    """A new order, in Binance's terms (``trailing_delta_bps`` is Binance's ``trailingDelta``)."""

    account: Account
    symbol: str
    side: Side
    type: EngineOrderType
    quantity: Decimal | None = None
    quote_quantity: Decimal | None = None
    price: Decimal | None = None
    stop_price: Decimal | None = None
    trailing_delta_bps: int | None = None
    iceberg_quantity: Decimal | None = None
    time_in_force: EngineTimeInForce = EngineTimeInForce.GTC
    client_order_id: str | None = None
    expire_at: datetime | None = None
    self_trade_prevention: SelfTradePrevention = SelfTradePrevention.NONE


# --- snapshots -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineOrder:
    """One order as it is now (Binance field in comments)."""

    order_id: int  # orderId
    client_order_id: str  # clientOrderId
    account: Account
    symbol: str
    side: Side
    type: EngineOrderType
    time_in_force: EngineTimeInForce
    quantity: Decimal  # origQty (for a quote-quantity market order: the executed quantity)
    price: Decimal  # 0 when not limit-priced, as Binance reports
    stop_price: Decimal  # 0 when none
    trailing_delta_bps: int | None
    iceberg_quantity: Decimal  # 0 when none
    quote_quantity: Decimal  # origQuoteOrderQty, 0 when none
    executed_quantity: Decimal  # executedQty
    cumulative_quote_quantity: Decimal  # cummulativeQuoteQty
    status: EngineOrderStatus
    time: datetime  # time / transactTime of creation
    update_time: datetime  # updateTime
    working: bool  # isWorking
    working_time: datetime | None  # workingTime (None until a stop triggers; Binance sends -1)
    trailing_time: datetime | None  # trailingTime: when trailing started tracking
    expire_at: datetime | None
    self_trade_prevention: SelfTradePrevention = SelfTradePrevention.NONE  # selfTradePreventionMode

    @property
    def remaining_quantity(self) -> Decimal:
        return self.quantity - self.executed_quantity

    @property
    def is_open(self) -> bool:
        return self.status.is_open


@dataclass(frozen=True, slots=True)
class EngineFill:
    account: Account
    symbol: str
    order_id: int
    client_order_id: str
    side: Side
    trade_id: int  # per symbol, increasing
    price: Decimal
    quantity: Decimal
    quote_quantity: Decimal
    commission: Decimal
    commission_asset: str
    is_maker: bool
    time: datetime


@dataclass(frozen=True, slots=True)
class ExecutionReport:
    """What happened to one order in the engine (Binance's ``executionReport``): the order after it, the
    execution type and the fill of a trade. Not ``meltica.messaging.OrderUpdate``, the pipeline's message."""

    order: EngineOrder
    execution: ExecutionType
    fill: EngineFill | None = None


@dataclass(frozen=True, slots=True)
class BalanceUpdate:
    account: Account
    asset: str
    free: Decimal
    locked: Decimal


@dataclass(frozen=True, slots=True)
class PublicTrade:
    """A trade between two user orders (the emulator's public trade stream)."""

    symbol: str
    trade_id: int
    price: Decimal
    quantity: Decimal
    buyer_order_id: int
    seller_order_id: int
    is_buyer_maker: bool
    time: datetime


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Everything one call did, in order. ``balance_updates`` holds one entry per touched
    (account, asset), with the values after the call, in the order they were first touched."""

    order_updates: tuple[ExecutionReport, ...] = ()
    fills: tuple[EngineFill, ...] = ()
    balance_updates: tuple[BalanceUpdate, ...] = ()
    public_trades: tuple[PublicTrade, ...] = ()

    @property
    def order(self) -> EngineOrder | None:
        """The last snapshot of the first order this result speaks about (the submitted one)."""
        if not self.order_updates:
            return None
        first = self.order_updates[0].order.order_id
        last = [u.order for u in self.order_updates if u.order.order_id == first]
        return last[-1]


@dataclass(frozen=True, slots=True)
class LedgerBalance:
    free: Decimal
    locked: Decimal

    @property
    def total(self) -> Decimal:
        return self.free + self.locked


@dataclass(frozen=True, slots=True)
class BookView:
    """Best first; each level (price, quantity): market liquidity plus the visible part of user orders."""

    bids: tuple[tuple[Decimal, Decimal], ...]
    asks: tuple[tuple[Decimal, Decimal], ...]
    last_price: Decimal | None
