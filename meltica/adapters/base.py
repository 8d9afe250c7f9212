"""The one async interface every venue adapter implements (DESIGN.md §2, Connection layer).

Nothing above ``meltica/adapters/`` imports ccxt or catches a ccxt exception: adapters translate the
venue's messages into domain objects (``meltica.domain``) and its failures into the error taxonomy
(``meltica.errors``). The same interface is implemented by the ccxt adapter (any ccxt exchange id,
live or pointed at the local emulator) and by the in-process paper venue, so the execution engine,
backtests and live trading drive venues identically.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from meltica.domain import (
    Balance,
    Bar,
    Fill,
    Instrument,
    OrderBookSnapshot,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    Trade,
)


@dataclass(frozen=True)
class Capabilities:
    """What a venue does natively. The execution engine emulates locally what is missing here.

    Built for ccxt venues from ``exchange.has`` and the market structure (see ccxt adapter); the paper
    venue declares everything it implements.
    """

    order_types: frozenset[OrderType]
    time_in_force: frozenset[TimeInForce]
    post_only: bool = False
    reduce_only: bool = False
    iceberg: bool = False
    trailing_stop: bool = False
    oco: bool = False
    amend: bool = False  # native edit (else cancel-replace)
    cancel_replace: bool = False  # native atomic cancel-replace
    cancel_all: bool = False
    fetch_order_by_client_id: bool = False
    watch_order_book: bool = False
    watch_trades: bool = False
    watch_ohlcv: bool = False
    watch_orders: bool = False
    watch_my_trades: bool = False
    watch_balance: bool = False

    def supports(self, order_type: OrderType) -> bool:
        return order_type in self.order_types


@dataclass(frozen=True)
class Ticker:
    exchange: str
    symbol: str
    ts: datetime
    bid: Decimal | None
    ask: Decimal | None
    last: Decimal | None
    base_volume: Decimal | None = None
    quote_volume: Decimal | None = None


@dataclass(frozen=True)
class VenueOrder:
    """The venue's view of one order, as reported by it (REST answer or user-stream update)."""

    exchange: str
    symbol: str
    client_order_id: str | None
    exchange_order_id: str | None
    status: OrderStatus
    side: Side
    type: OrderType
    quantity: Decimal
    filled_quantity: Decimal
    price: Decimal | None = None
    trigger_price: Decimal | None = None
    average_fill_price: Decimal | None = None
    time_in_force: TimeInForce | None = None
    ts: datetime | None = None
    reason: str | None = None  # rejection / cancellation reason as the venue gave it
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def remaining(self) -> Decimal:
        return self.quantity - self.filled_quantity


class UserEventKind(enum.StrEnum):
    ORDER = "order"
    FILL = "fill"
    BALANCE = "balance"


@dataclass(frozen=True)
class UserEvent:
    """One item of the private stream: an order update, a fill, or a balance change."""

    kind: UserEventKind
    ts: datetime
    order: VenueOrder | None = None
    fill: Fill | None = None
    balances: tuple[Balance, ...] = ()


@runtime_checkable
class ExchangeAdapter(Protocol):
    """A trading venue, seen through Meltica's domain types. All I/O is async."""

    @property
    def exchange_id(self) -> str: ...

    @property
    def account(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def connect(self) -> None:
        """Load markets and verify connectivity (and credentials, when given)."""

    async def close(self) -> None: ...

    # --- reference and market data ---------------------------------------------------------

    async def load_instruments(self, reload: bool = False) -> dict[str, Instrument]: ...

    async def fetch_ticker(self, symbol: str) -> Ticker: ...

    async def fetch_order_book(self, symbol: str, limit: int | None = None) -> OrderBookSnapshot: ...

    async def fetch_trades(
        self, symbol: str, since: datetime | None = None, limit: int | None = None
    ) -> list[Trade]: ...

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since: datetime | None = None, limit: int | None = None
    ) -> list[Bar]: ...

    def stream_trades(self, symbol: str) -> AsyncIterator[Trade]: ...

    def stream_order_book(self, symbol: str, depth: int | None = None) -> AsyncIterator[OrderBookSnapshot]:
        """The maintained book after every applied update (snapshot plus diffs, gaps re-snapshotted)."""
        ...

    def stream_bars(self, symbol: str, timeframe: str) -> AsyncIterator[Bar]: ...

    # --- orders and account -----------------------------------------------------------------

    async def create_order(self, intent: OrderIntent, client_order_id: str) -> VenueOrder: ...

    async def cancel_order(
        self, symbol: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> VenueOrder: ...

    async def cancel_all_orders(self, symbol: str | None = None) -> list[VenueOrder]: ...

    async def amend_order(
        self,
        symbol: str,
        *,
        client_order_id: str,
        new_client_order_id: str,
        quantity: Decimal | None = None,
        price: Decimal | None = None,
    ) -> VenueOrder:
        """Change price and/or quantity: natively where the venue can, else cancel-replace."""
        ...

    async def fetch_order(
        self, symbol: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> VenueOrder:
        """Raises ``OrderNotFoundError`` when the venue has no such order."""
        ...

    async def fetch_open_orders(self, symbol: str | None = None) -> list[VenueOrder]: ...

    async def fetch_my_trades(
        self, symbol: str, since: datetime | None = None, limit: int | None = None
    ) -> list[Fill]: ...

    async def fetch_balances(self) -> dict[str, Balance]: ...

    def stream_user_events(self) -> AsyncIterator[UserEvent]: ...
