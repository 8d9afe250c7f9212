"""The paper venue: an in-process exchange built on the shared matching engine.

``InProcessVenue`` owns one :class:`~meltica.matching.MatchingEngine` (the same one the local Binance
emulator and the backtester use, so fills never differ between them) and is fed market data by its
owner — recorded data in a replay, live ``md.*`` messages in paper trading. Each account trades
through its own :class:`InProcessAdapter`, which implements :class:`~meltica.adapters.base.ExchangeAdapter`
exactly like the ccxt adapter does, so the execution engine cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from meltica.adapters.base import Capabilities, Ticker, UserEvent, UserEventKind, VenueOrder
from meltica.domain import (
    Balance,
    Bar,
    BookLevel,
    Fill,
    Instrument,
    LiquiditySide,
    OrderBookDelta,
    OrderBookSnapshot,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    Trade,
)
from meltica.domain.values import slot_setters
from meltica.errors import InvalidOrderError
from meltica.matching import (
    EngineFill,
    EngineOrder,
    EngineOrderStatus,
    EngineOrderType,
    EngineTimeInForce,
    FeeSchedule,
    FillModel,
    MatchingEngine,
    MatchResult,
    NewOrder,
    SelfTradePrevention,
)

PAPER_EXCHANGE_ID = "paper"

_STATUS: dict[EngineOrderStatus, OrderStatus] = {
    EngineOrderStatus.NEW: OrderStatus.OPEN,
    EngineOrderStatus.PARTIALLY_FILLED: OrderStatus.PARTIALLY_FILLED,
    EngineOrderStatus.FILLED: OrderStatus.FILLED,
    EngineOrderStatus.CANCELED: OrderStatus.CANCELLED,
    EngineOrderStatus.REJECTED: OrderStatus.REJECTED,
    EngineOrderStatus.EXPIRED: OrderStatus.EXPIRED,
    EngineOrderStatus.EXPIRED_IN_MATCH: OrderStatus.EXPIRED,
}

_TYPE_BACK: dict[EngineOrderType, OrderType] = {
    EngineOrderType.MARKET: OrderType.MARKET,
    EngineOrderType.LIMIT: OrderType.LIMIT,
    EngineOrderType.LIMIT_MAKER: OrderType.LIMIT,
    EngineOrderType.STOP_LOSS: OrderType.STOP_MARKET,
    EngineOrderType.STOP_LOSS_LIMIT: OrderType.STOP_LIMIT,
    EngineOrderType.TAKE_PROFIT: OrderType.TAKE_PROFIT,
    EngineOrderType.TAKE_PROFIT_LIMIT: OrderType.TAKE_PROFIT_LIMIT,
}

IN_PROCESS_CAPABILITIES = Capabilities(
    order_types=frozenset(OrderType),
    time_in_force=frozenset(TimeInForce),
    post_only=True,
    reduce_only=False,  # spot venue: positions are balances; the execution engine enforces reduce-only
    iceberg=True,
    trailing_stop=True,
    oco=False,
    amend=False,
    cancel_replace=True,
    cancel_all=True,
    fetch_order_by_client_id=True,
    watch_order_book=True,
    watch_trades=True,
    watch_ohlcv=True,
    watch_orders=True,
    watch_my_trades=True,
    watch_balance=True,
)


_ENGINE_TYPE = {
    OrderType.MARKET: EngineOrderType.MARKET,
    OrderType.STOP_MARKET: EngineOrderType.STOP_LOSS,
    OrderType.STOP_LIMIT: EngineOrderType.STOP_LOSS_LIMIT,
    OrderType.TAKE_PROFIT: EngineOrderType.TAKE_PROFIT,
    OrderType.TAKE_PROFIT_LIMIT: EngineOrderType.TAKE_PROFIT_LIMIT,
    OrderType.TRAILING_STOP: EngineOrderType.STOP_LOSS,
}  # (LIMIT depends on post_only)
_ENGINE_TIF = {t: EngineTimeInForce(t.value) for t in TimeInForce if t.value in {e.value for e in EngineTimeInForce}}
"""``EngineTimeInForce(tif.value)`` by member (an enum call by value costs a dictionary lookup many times over)."""


_new = object.__new__
_NEW_ORDER_SLOTS = slot_setters(
    NewOrder,
    (
        "account", "symbol", "side", "type", "quantity", "quote_quantity", "price", "stop_price",
        "trailing_delta_bps", "iceberg_quantity", "time_in_force", "client_order_id", "expire_at",
        "self_trade_prevention",
    ),
)  # fmt: skip


def _market_order(intent: OrderIntent, client_order_id: str) -> NewOrder:
    """``to_new_order`` of a market intent: the same ``NewOrder``, stored slot by slot (a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``: every order of a backtest)."""
    order = _new(NewOrder)
    (
        set_account, set_symbol, set_side, set_type, set_quantity, set_quote_quantity, set_price, set_stop_price,
        set_trailing, set_iceberg, set_tif, set_client_order_id, set_expire_at, set_stp,
    ) = _NEW_ORDER_SLOTS  # fmt: skip
    set_account(order, intent.account)
    set_symbol(order, intent.symbol)
    set_side(order, intent.side)
    set_type(order, EngineOrderType.MARKET)
    set_quantity(order, intent.quantity)
    set_quote_quantity(order, None)
    set_price(order, None)
    set_stop_price(order, intent.trigger_price)
    set_trailing(order, None)
    set_iceberg(order, intent.display_quantity)
    set_tif(order, EngineTimeInForce.GTC)  # Binance takes no timeInForce for a market order
    set_client_order_id(order, client_order_id)
    set_expire_at(order, intent.expire_at)
    set_stp(order, SelfTradePrevention.NONE)
    return order


def to_new_order(intent: OrderIntent, client_order_id: str, last_price: Decimal | None) -> NewOrder:
    """Domain intent → the engine's (Binance) vocabulary."""
    if intent.type is OrderType.MARKET:
        return _market_order(intent, client_order_id)
    engine_type = (
        (EngineOrderType.LIMIT_MAKER if intent.post_only else EngineOrderType.LIMIT)
        if intent.type is OrderType.LIMIT
        else _ENGINE_TYPE[intent.type]
    )
    trailing_bps: int | None = None
    stop_price = intent.trigger_price
    if intent.type is OrderType.TRAILING_STOP:
        trailing_bps = _trailing_bps(intent, last_price)
        stop_price = intent.activation_price
    time_in_force = _ENGINE_TIF.get(intent.time_in_force) or EngineTimeInForce(intent.time_in_force.value)
    if engine_type in (EngineOrderType.MARKET, EngineOrderType.LIMIT_MAKER) or (
        engine_type in (EngineOrderType.STOP_LOSS, EngineOrderType.TAKE_PROFIT)
    ):
        time_in_force = EngineTimeInForce.GTC  # Binance takes no timeInForce for these types
    return NewOrder(
        account=intent.account,
        symbol=intent.symbol,
        side=intent.side,
        type=engine_type,
        quantity=intent.quantity,
        price=intent.price if engine_type.is_limit_priced else None,
        stop_price=stop_price,
        trailing_delta_bps=trailing_bps,
        iceberg_quantity=intent.display_quantity,
        time_in_force=time_in_force,
        client_order_id=client_order_id,
        expire_at=intent.expire_at,
    )


def _trailing_bps(intent: OrderIntent, last_price: Decimal | None) -> int:
    if intent.trailing_offset_pct is not None:
        bps = intent.trailing_offset_pct * 100
    else:
        reference = intent.activation_price or last_price
        if intent.trailing_offset is None or reference is None:
            raise InvalidOrderError(
                "an absolute trailing offset needs an activation price or a last trade price to convert to bps",
                reason="trailing_reference_missing",
            )
        bps = intent.trailing_offset / reference * 10_000
    whole = int(bps.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if whole < 1:
        raise InvalidOrderError(
            f"trailing offset {bps} bps is below the venue's 1 bps step", reason="trailing_too_small"
        )
    return whole


def venue_order(exchange_id: str, order: EngineOrder, reason: str | None = None) -> VenueOrder:
    average = order.cumulative_quote_quantity / order.executed_quantity if order.executed_quantity else None
    order_type = _TYPE_BACK[order.type]
    if order.trailing_delta_bps is not None:
        order_type = OrderType.TRAILING_STOP
    return VenueOrder(
        exchange=exchange_id,
        symbol=order.symbol,
        client_order_id=order.client_order_id,
        exchange_order_id=str(order.order_id),
        status=_STATUS[order.status],
        side=order.side,
        type=order_type,
        quantity=order.quantity,
        filled_quantity=order.executed_quantity,
        price=order.price or None,
        trigger_price=order.stop_price or None,
        average_fill_price=average,
        time_in_force=TimeInForce(order.time_in_force.value),
        ts=order.update_time,
        reason=reason,
    )


def domain_fill(exchange_id: str, fill: EngineFill) -> Fill:
    return Fill(
        fill_id=str(fill.trade_id),
        client_order_id=fill.client_order_id,
        exchange_order_id=str(fill.order_id),
        exchange=exchange_id,
        symbol=fill.symbol,
        side=fill.side,
        price=fill.price,
        quantity=fill.quantity,
        fee=fill.commission,
        fee_currency=fill.commission_asset,
        liquidity=LiquiditySide.MAKER if fill.is_maker else LiquiditySide.TAKER,
        ts=fill.time,
    )


class InProcessVenue:
    """One simulated exchange: a matching engine, its accounts, and the market data fed into it."""

    def __init__(
        self,
        instruments: Iterable[Instrument],
        *,
        clock: Callable[[], datetime],
        exchange_id: str = PAPER_EXCHANGE_ID,
        fees: FeeSchedule | None = None,
        fill_model: FillModel | None = None,
    ) -> None:
        self.exchange_id = exchange_id
        self.clock = clock
        self.engine = MatchingEngine(clock=clock, fees=fees or FeeSchedule(), fill_model=fill_model or FillModel())
        self._instruments: dict[str, Instrument] = {}
        for instrument in instruments:
            self._instruments[instrument.symbol] = instrument
            self.engine.add_instrument(instrument, instrument.symbol)
        # Subscribers (``InProcessAdapter.stream_*`` and the simulated drivers append their queues here, and
        # remove them when done) and the market data the venue has seen (``fetch_trades`` / ``fetch_ohlcv``).
        self.user_queues: dict[str, list[asyncio.Queue[UserEvent]]] = defaultdict(list)
        self.trade_queues: dict[str, list[asyncio.Queue[Trade]]] = defaultdict(list)
        self.book_queues: dict[str, list[asyncio.Queue[OrderBookSnapshot]]] = defaultdict(list)
        self.bar_queues: dict[tuple[str, str], list[asyncio.Queue[Bar]]] = defaultdict(list)
        self.public_trades: dict[str, list[Trade]] = defaultdict(list)
        self.bars: dict[tuple[str, str], list[Bar]] = defaultdict(list)
        self._trade_seq = itertools.count(1)

    @property
    def instruments(self) -> dict[str, Instrument]:
        return dict(self._instruments)

    def instrument(self, symbol: str) -> Instrument | None:
        """One listed instrument (no copy of the listing: this is on every order's path)."""
        return self._instruments.get(symbol)

    def deposit(self, account: str, asset: str, amount: Decimal) -> None:
        self.engine.ledger.deposit(account, asset, amount)

    def adapter(self, account: str) -> InProcessAdapter:
        return InProcessAdapter(self, account)

    # --- market data in ----------------------------------------------------------------------

    def on_trade(self, trade: Trade) -> MatchResult:
        result = self.engine.on_trade(trade.symbol, trade.price, trade.quantity, trade.aggressor_side)
        self._record_trade(trade)
        self.dispatch(result)
        return result

    def on_bar(self, bar: Bar) -> MatchResult:
        result = self.engine.on_bar(bar.symbol, bar.open, bar.high, bar.low, bar.close, bar.volume)
        self.bars[(bar.symbol, bar.timeframe)].append(bar)
        for queue in self.bar_queues[(bar.symbol, bar.timeframe)]:
            queue.put_nowait(bar)
        self.dispatch(result)
        return result

    def on_book(self, book: OrderBookSnapshot) -> MatchResult:
        result = self.engine.on_book_snapshot(
            book.symbol,
            [(level.price, level.quantity) for level in book.bids],
            [(level.price, level.quantity) for level in book.asks],
        )
        self.dispatch(result)
        return result

    def on_book_delta(self, delta: OrderBookDelta) -> MatchResult:
        result = self.engine.on_book_delta(
            delta.symbol,
            [(level.price, level.quantity) for level in delta.bids],
            [(level.price, level.quantity) for level in delta.asks],
        )
        self.dispatch(result)
        return result

    def advance(self) -> MatchResult:
        """Time moved on (the clock): expire GTD orders."""
        result = self.engine.advance()
        self.dispatch(result)
        return result

    # --- events out --------------------------------------------------------------------------

    def dispatch(self, result: MatchResult) -> None:
        """Deliver what the engine did: user events per account, public trades and books per symbol."""
        now = self.clock()
        if not (result.order_updates or result.balance_updates or result.public_trades):
            return  # most bars change nothing
        for update in result.order_updates:
            order = update.order
            event = UserEvent(UserEventKind.ORDER, now, order=venue_order(self.exchange_id, order))
            self._publish_user(order.account, event)
            if update.fill is not None:
                fill = domain_fill(self.exchange_id, update.fill)
                self._publish_user(order.account, UserEvent(UserEventKind.FILL, now, fill=fill))
        by_account: dict[str, list[Balance]] = defaultdict(list)
        for change in result.balance_updates:
            by_account[change.account].append(Balance(asset=change.asset, free=change.free, locked=change.locked))
        for account, balances in by_account.items():
            self._publish_user(account, UserEvent(UserEventKind.BALANCE, now, balances=tuple(balances)))
        for public in result.public_trades:
            self._record_trade(
                Trade(
                    exchange=self.exchange_id,
                    symbol=public.symbol,
                    trade_id=str(public.trade_id),
                    price=public.price,
                    quantity=public.quantity,
                    aggressor_side=Side.SELL if public.is_buyer_maker else Side.BUY,
                    ts=public.time,
                )
            )
        touched = {u.order.symbol for u in result.order_updates}
        for symbol in touched:
            if self.book_queues.get(symbol):
                snapshot = self.book_snapshot(symbol)
                for queue in self.book_queues[symbol]:
                    queue.put_nowait(snapshot)

    def _publish_user(self, account: str, event: UserEvent) -> None:
        for queue in self.user_queues[account]:
            queue.put_nowait(event)

    def _record_trade(self, trade: Trade) -> None:
        self.public_trades[trade.symbol].append(trade)
        for queue in self.trade_queues[trade.symbol]:
            queue.put_nowait(trade)

    def book_snapshot(self, symbol: str, depth: int | None = None) -> OrderBookSnapshot:
        view = self.engine.book(symbol, depth)
        return OrderBookSnapshot(
            exchange=self.exchange_id,
            symbol=symbol,
            ts=self.clock(),
            bids=tuple(BookLevel(price=p, quantity=q) for p, q in view.bids),
            asks=tuple(BookLevel(price=p, quantity=q) for p, q in view.asks),
        )


class InProcessAdapter:
    """One account on a :class:`InProcessVenue`, behind the ``ExchangeAdapter`` interface."""

    def __init__(self, venue: InProcessVenue, account: str) -> None:
        self._venue = venue
        self._account = account

    @property
    def exchange_id(self) -> str:
        return self._venue.exchange_id

    @property
    def account(self) -> str:
        return self._account

    @property
    def capabilities(self) -> Capabilities:
        return IN_PROCESS_CAPABILITIES

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # --- reference and market data ---------------------------------------------------------

    async def load_instruments(self, reload: bool = False) -> dict[str, Instrument]:
        return self._venue.instruments

    def _instrument(self, symbol: str) -> Instrument:
        instrument = self._venue.instrument(symbol)
        if instrument is None:
            raise InvalidOrderError(f"unknown symbol {symbol!r} on {self.exchange_id}", reason="unknown_symbol")
        return instrument

    async def fetch_ticker(self, symbol: str) -> Ticker:
        self._instrument(symbol)
        view = self._venue.engine.book(symbol, 1)
        return Ticker(
            exchange=self.exchange_id,
            symbol=symbol,
            ts=self._venue.clock(),
            bid=view.bids[0][0] if view.bids else None,
            ask=view.asks[0][0] if view.asks else None,
            last=view.last_price,
        )

    async def fetch_order_book(self, symbol: str, limit: int | None = None) -> OrderBookSnapshot:
        self._instrument(symbol)
        return self._venue.book_snapshot(symbol, limit)

    async def fetch_trades(self, symbol: str, since: datetime | None = None, limit: int | None = None) -> list[Trade]:
        trades = [t for t in self._venue.public_trades[symbol] if since is None or t.ts >= since]
        return trades[-limit:] if limit else trades

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since: datetime | None = None, limit: int | None = None
    ) -> list[Bar]:
        bars = [b for b in self._venue.bars[(symbol, timeframe)] if since is None or b.ts >= since]
        return bars[:limit] if limit else bars

    async def stream_trades(self, symbol: str) -> AsyncIterator[Trade]:
        queue: asyncio.Queue[Trade] = asyncio.Queue()
        self._venue.trade_queues[symbol].append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._venue.trade_queues[symbol].remove(queue)

    async def stream_order_book(self, symbol: str, depth: int | None = None) -> AsyncIterator[OrderBookSnapshot]:
        queue: asyncio.Queue[OrderBookSnapshot] = asyncio.Queue()
        self._venue.book_queues[symbol].append(queue)
        try:
            yield self._venue.book_snapshot(symbol, depth)
            while True:
                yield await queue.get()
        finally:
            self._venue.book_queues[symbol].remove(queue)

    async def stream_bars(self, symbol: str, timeframe: str) -> AsyncIterator[Bar]:
        queue: asyncio.Queue[Bar] = asyncio.Queue()
        self._venue.bar_queues[(symbol, timeframe)].append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._venue.bar_queues[(symbol, timeframe)].remove(queue)

    # --- orders and account -----------------------------------------------------------------

    async def create_order(self, intent: OrderIntent, client_order_id: str) -> VenueOrder:
        instrument = self._instrument(intent.symbol)
        if intent.account != self._account:
            raise InvalidOrderError(
                f"intent for account {intent.account!r} sent through account {self._account!r}",
                reason="wrong_account",
            )
        quantity = instrument.round_quantity(intent.quantity)
        price = instrument.round_price(intent.price, intent.side) if intent.price is not None else None
        trigger = instrument.round_price(intent.trigger_price) if intent.trigger_price is not None else None
        rounded = intent.model_copy(update={"quantity": quantity, "price": price, "trigger_price": trigger})
        new = to_new_order(rounded, client_order_id, self._venue.engine.last_price(intent.symbol))
        result = self._venue.engine.submit(new)
        self._venue.dispatch(result)
        order = result.order
        assert order is not None  # submit always reports the new order
        return venue_order(self.exchange_id, order)

    async def cancel_order(
        self, symbol: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> VenueOrder:
        result = self._venue.engine.cancel(
            self._account,
            symbol,
            order_id=int(exchange_order_id) if exchange_order_id else None,
            client_order_id=client_order_id,
        )
        self._venue.dispatch(result)
        order = result.order
        assert order is not None
        return venue_order(self.exchange_id, order)

    async def cancel_all_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        symbols = [symbol] if symbol else sorted({o.symbol for o in self._venue.engine.open_orders(self._account)})
        cancelled: list[VenueOrder] = []
        for sym in symbols:
            result = self._venue.engine.cancel_all(self._account, sym)
            self._venue.dispatch(result)
            cancelled.extend(venue_order(self.exchange_id, u.order) for u in result.order_updates)
        return cancelled

    async def amend_order(
        self,
        symbol: str,
        *,
        client_order_id: str,
        new_client_order_id: str,
        quantity: Decimal | None = None,
        price: Decimal | None = None,
    ) -> VenueOrder:
        current = self._venue.engine.get_order(self._account, symbol, client_order_id=client_order_id)
        if price is None and quantity is not None and quantity < current.quantity:
            # Reducing quantity keeps time priority, as Binance's order amend keeps it.
            result = self._venue.engine.amend_quantity(self._account, symbol, quantity, client_order_id=client_order_id)
            self._venue.dispatch(result)
            order = result.order
            assert order is not None
            return venue_order(self.exchange_id, order)
        replacement = NewOrder(
            account=self._account,
            symbol=symbol,
            side=current.side,
            type=current.type,
            quantity=(quantity if quantity is not None else current.quantity) - current.executed_quantity,
            price=price if price is not None else (current.price or None),
            stop_price=current.stop_price or None,
            trailing_delta_bps=current.trailing_delta_bps,
            iceberg_quantity=current.iceberg_quantity or None,
            time_in_force=current.time_in_force,
            client_order_id=new_client_order_id,
            expire_at=current.expire_at,
        )
        result = self._venue.engine.cancel_replace(
            self._account, symbol, replacement, cancel_client_order_id=client_order_id
        )
        self._venue.dispatch(result)
        new_order = self._venue.engine.get_order(self._account, symbol, client_order_id=new_client_order_id)
        return venue_order(self.exchange_id, new_order)

    async def fetch_order(
        self, symbol: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> VenueOrder:
        # The engine raises OrderNotFoundError (taxonomy) for an unknown order.
        order = self._venue.engine.get_order(
            self._account,
            symbol,
            order_id=int(exchange_order_id) if exchange_order_id else None,
            client_order_id=client_order_id,
        )
        return venue_order(self.exchange_id, order)

    async def fetch_open_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        return [venue_order(self.exchange_id, o) for o in self._venue.engine.open_orders(self._account, symbol)]

    async def fetch_my_trades(self, symbol: str, since: datetime | None = None, limit: int | None = None) -> list[Fill]:
        fills = [
            domain_fill(self.exchange_id, f)
            for f in self._venue.engine.account_trades(self._account, symbol)
            if since is None or f.time >= since
        ]
        return fills[-limit:] if limit else fills

    async def fetch_balances(self) -> dict[str, Balance]:
        return {
            asset: Balance(asset=asset, free=b.free, locked=b.locked)
            for asset, b in self._venue.engine.ledger.balances(self._account).items()
        }

    async def stream_user_events(self) -> AsyncIterator[UserEvent]:
        queue: asyncio.Queue[UserEvent] = asyncio.Queue()
        self._venue.user_queues[self._account].append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._venue.user_queues[self._account].remove(queue)
