"""``PaperContext``: the reference ``StrategyContext``, running a strategy against a ``PaperVenue``.

It drives the paper venue's matching engine directly and synchronously (no OMS, no risk gate yet), so a
strategy can be exercised bar by bar on recorded data in tests and notebooks. The fills come from the one
matching engine (``meltica.matching``) that the emulator, the paper venue and the backtester share; this
module only translates between the strategy and the venue and keeps the strategy's orders and positions.

Per market-data item the order is fixed (and is the order the backtest engine should keep):

1. the clock moves to the item's time (a bar's *close* time: a bar is known once it has closed);
2. the venue matches resting orders against the item; the resulting order updates and fills are queued;
3. GTD orders whose ``expire_at`` has passed expire; due timers are queued;
4. the queued ``on_order`` / ``on_fill`` / ``on_timer`` callbacks run, then the data callback
   (``on_bar`` / ``on_trade`` / ``on_book``), then whatever those callbacks caused, until nothing is left.

No look-ahead (the rule the backtest engine keeps too): what a callback asks for (submit, cancel, amend,
order lists) is held and delivered to the venue, in the order asked, just before the *next* market-data
item — for a bar, at that bar's open: the clock moves to the bar's open time, the open is printed to the
venue (stops it crosses trigger there, a gap fills at the worse price), the held requests are sent, then
the bar runs as usual. So a decision made on bar t's close never fills inside bar t. Reactions of the
venue side (an OCO sibling cancelled, bracket exits placed when the entry fills) happen at once.
``PaperContext(..., immediate=True)`` restores the older "matched at once" behaviour for callers that
drive the clock themselves. Either way the strategy hears about results only after its callback
returned: never re-entrantly.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

from pydantic import ValidationError

from meltica.adapters.paper import PaperVenue, domain_fill, to_new_order
from meltica.backtest.intents import END_OF_DATA, IntentingContext, ManualClock
from meltica.domain import (
    Bar,
    Fill,
    Instrument,
    Order,
    OrderAccepted,
    OrderAmended,
    OrderBookSnapshot,
    OrderCancelled,
    OrderEvent,
    OrderExpired,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderStatus,
    OrderSubmitted,
    Position,
    Trade,
)
from meltica.errors import InvalidOrderError
from meltica.matching import (
    CancelReplacePartialFailureError,
    EngineRejection,
    ExecutionType,
    FeeSchedule,
    FillModel,
    MatchResult,
    NewOrder,
)
from meltica.strategies.base import OrderList, OrderListKind, Strategy


@dataclass(frozen=True, slots=True)
class Action:
    """What the strategy asked for, in order: ``submit`` (with the intent), ``cancel`` or ``amend``."""

    kind: str
    client_order_id: str
    intent: OrderIntent | None = None
    price: Decimal | None = None
    quantity: Decimal | None = None


@dataclass(slots=True)
class _OrderListState:
    kind: OrderListKind
    legs: tuple[str, ...]
    held: dict[str, OrderIntent] = field(default_factory=dict)  # bracket children waiting for the entry
    done: bool = False


class PaperContext(IntentingContext):
    """One strategy instance on one paper venue account. See the module docstring for the event order."""

    def __init__(
        self,
        venue: PaperVenue,
        clock: ManualClock,
        *,
        account: str,
        instance_id: str,
        logger: logging.Logger | None = None,
        immediate: bool = False,
    ) -> None:
        if venue.clock is not clock:
            raise ValueError("the venue must run on the same ManualClock as the context")
        self.venue = venue
        self.clock = clock
        self._account = account
        self._instance_id = instance_id
        self._log = logger or logging.getLogger(f"meltica.strategy.{instance_id}")
        self._state: dict[str, Any] = {}
        self._strategy: Strategy[Any] | None = None
        self._seq = 0
        self._orders: dict[str, Order] = {}  # open and held orders only: closed ones are dropped
        self._positions: dict[str, Position] = {}
        self._lists: dict[str, _OrderListState] = {}
        self._list_of: dict[str, str] = {}
        self._timers = {}
        self._pending: deque[Callable[[], None]] = deque()
        self._event_seq = 0
        self.immediate = immediate
        self._outbox: list[Callable[[], None]] = []  # requests held until the next market-data item
        self.actions: list[Action] = []
        self.rejections: list[Order] = []
        self.fills: list[Fill] = []

    @classmethod
    def create(
        cls,
        instruments: Iterable[Instrument],
        *,
        start: datetime,
        balances: Mapping[str, Decimal],
        account: str = "paper",
        instance_id: str = "strategy-1",
        exchange_id: str | None = None,
        fees: FeeSchedule | None = None,
        fill_model: FillModel | None = None,
    ) -> PaperContext:
        """A fresh venue with ``balances`` deposited into ``account``, and a context on it."""
        clock = ManualClock(start)
        kwargs: dict[str, Any] = {"fees": fees, "fill_model": fill_model}
        if exchange_id is not None:
            kwargs["exchange_id"] = exchange_id
        venue = PaperVenue(instruments, clock=clock, **kwargs)
        for asset, amount in balances.items():
            venue.deposit(account, asset, amount)
        return cls(venue, clock, account=account, instance_id=instance_id)

    # --- StrategyContext: identity, clock, reads ---------------------------------------------------
    @property
    def exchange(self) -> str:
        return self.venue.exchange_id

    def position(self, symbol: str) -> Position:
        pos = self._positions.get(symbol)
        if pos is None:
            pos = Position(account=self._account, exchange=self.exchange, symbol=symbol, strategy=self._instance_id)
            self._positions[symbol] = pos
        return pos

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        return [o for o in self._orders.values() if symbol is None or o.intent.symbol == symbol]

    def balances(self) -> dict[str, tuple[Decimal, Decimal]]:
        """(free, locked) per asset of the account: for tests and reports, not part of the Protocol."""
        return {a: (b.free, b.locked) for a, b in self.venue.engine.ledger.balances(self._account).items()}

    # --- running -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._call(self.strategy.on_start)

    def stop(self) -> None:
        self._call(self.strategy.on_stop)
        self._end_of_data()

    def _end_of_data(self) -> None:
        """The data ended: held cancels still reach the venue (clean-up); held new orders and amendments
        never do — they end ``cancelled`` (reason ``END_OF_DATA``): no market remained to send them into."""
        while self._outbox:
            batch, self._outbox = self._outbox, []
            for request in batch:
                func = getattr(request, "func", None)
                args: tuple[Any, ...] = getattr(request, "args", ())
                if func == self._cancel_now:
                    request()
                elif func in (self._place, self._cancel_replace_now):
                    coid = args[0] if func == self._place else args[1]
                    if coid in self._orders:
                        self._apply(
                            coid,
                            OrderCancelled(
                                event_id=self._event_id(coid), client_order_id=coid, ts=self.now(), reason=END_OF_DATA
                            ),
                        )
            self._drain()

    def on_bar(self, bar: Bar) -> None:
        if self._outbox:
            self.clock.now = bar.ts
            opening = self.venue.engine.on_trade(bar.symbol, bar.open, Decimal(0))
            self.venue.dispatch(opening)
            self._process(opening)
            self._release()
        self.clock.now = bar.close_time
        self._process(self.venue.on_bar(bar))
        self._after_market(lambda: self.strategy.on_bar(bar))

    def on_trade(self, trade: Trade) -> None:
        self.clock.now = trade.ts
        self._release()
        self._process(self.venue.on_trade(trade))
        self._after_market(lambda: self.strategy.on_trade(trade))

    def on_book(self, book: OrderBookSnapshot) -> None:
        self.clock.now = book.ts
        self._release()
        self._process(self.venue.on_book(book))
        self._after_market(lambda: self.strategy.on_book(book))

    def run_bars(self, bars: Iterable[Bar]) -> None:
        for bar in bars:
            self.on_bar(bar)

    def _release(self) -> None:
        """Deliver the held requests to the venue, in the order they were made."""
        while self._outbox:
            batch, self._outbox = self._outbox, []
            for request in batch:
                request()
            self._drain()

    def _later(self, request: Callable[[], None]) -> None:
        if self.immediate:
            request()
        else:
            self._outbox.append(request)

    def _after_market(self, callback: Callable[[], None]) -> None:
        self._process(self.venue.advance())
        self._queue_due_timers()
        self._pending.append(callback)
        self._drain()

    def _call(self, callback: Callable[[], None]) -> None:
        self._pending.append(callback)
        self._drain()

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            pending.popleft()()

    # --- intents -----------------------------------------------------------------------------------
    def _send_intent(self, intent: OrderIntent) -> str:
        return self._send(intent)

    def _send_list(self, kind: OrderListKind, list_id: str, legs: tuple[OrderIntent, ...]) -> OrderList:
        coids = tuple(leg.client_order_id for leg in legs)
        state = _OrderListState(kind=kind, legs=coids)
        if kind == "bracket":
            for child in legs[1:]:
                state.held[child.client_order_id] = child
                # Held legs are stored (status NEW) and visible in open_orders, as the OMS emulator keeps them.
                self._orders[child.client_order_id] = self._new_order(child)
        self._lists[list_id] = state
        for coid in coids:
            self._list_of[coid] = list_id
        for leg in legs[:1] if kind == "bracket" else legs:
            self._send(leg)
        return OrderList(list_id=list_id, kind=kind, client_order_ids=coids)

    def _new_order(self, intent: OrderIntent) -> Order:
        return Order(
            intent=intent,
            client_order_id=intent.client_order_id,
            quantity=intent.quantity,
            price=intent.price,
            trigger_price=intent.trigger_price,
            created_at=intent.created_at,
            updated_at=intent.created_at,
        )

    def _send(self, intent: OrderIntent, *, now: bool = False) -> str:
        coid = intent.client_order_id
        self.actions.append(Action("submit", coid, intent=intent))
        order = self._new_order(intent)
        self._orders[coid] = order
        self._apply(coid, OrderSubmitted(event_id=self._event_id(coid), client_order_id=coid, ts=self.now()))
        if now:
            self._place(coid, intent)
        else:
            self._later(partial(self._place, coid, intent))
        return coid

    def _place(self, coid: str, intent: OrderIntent) -> None:
        if coid not in self._orders:
            return
        new = to_new_order(intent, coid, self.venue.engine.last_price(intent.symbol))
        try:
            result = self.venue.engine.submit(new)
        except EngineRejection as exc:
            self._reject(coid, f"{exc.reason}: {exc.message}")
            return
        except InvalidOrderError as exc:  # e.g. a trailing offset the venue cannot express
            self._reject(coid, f"{exc.reason}: {exc.message}")
            return
        self._process(result)

    def _reject(self, coid: str, reason: str) -> None:
        self._apply(
            coid, OrderRejected(event_id=self._event_id(coid), client_order_id=coid, ts=self.now(), reason=reason)
        )

    # --- cancel / amend ------------------------------------------------------------------------------
    def cancel(self, client_order_id: str) -> None:
        self.actions.append(Action("cancel", client_order_id))
        self._later(partial(self._cancel_now, client_order_id))

    def _cancel_now(self, client_order_id: str) -> None:
        order = self._orders.get(client_order_id)
        if order is None:
            self._log.debug("cancel %s: not open (already closed or unknown)", client_order_id)
            return
        if order.status is OrderStatus.NEW:  # a held bracket leg: never sent
            self._drop_held(client_order_id)
            return
        try:
            result = self.venue.engine.cancel(self._account, order.intent.symbol, client_order_id=client_order_id)
        except EngineRejection as exc:
            self._log.debug("cancel %s refused by the venue: %s", client_order_id, exc.message)
            return
        self._process(result)

    def amend(self, client_order_id: str, *, price: Decimal | None = None, quantity: Decimal | None = None) -> str:
        self.actions.append(Action("amend", client_order_id, price=price, quantity=quantity))
        order = self._orders.get(client_order_id)
        if order is None:
            raise InvalidOrderError(f"amend {client_order_id}: no such open order", reason="order_not_open")
        inst = self.instrument(order.intent.symbol)
        new_price = None if price is None else inst.round_price(price, order.side)
        new_qty = None if quantity is None else inst.round_quantity(quantity)
        if order.status is OrderStatus.NEW:  # held bracket leg: change what will be sent
            list_state = self._lists[self._list_of[client_order_id]]
            held = list_state.held[client_order_id]
            changes: dict[str, Any] = {}
            if new_price is not None:
                changes["price" if held.type.needs_price else "trigger_price"] = new_price
            if new_qty is not None:
                changes["quantity"] = new_qty
            list_state.held[client_order_id] = held.replace(**changes)
            self._orders[client_order_id] = self._new_order(list_state.held[client_order_id])
            return client_order_id
        symbol = order.intent.symbol
        if new_price is None and new_qty is not None and new_qty < order.quantity:
            # Reducing quantity keeps priority (native amend on the venue).
            if new_qty < order.filled_quantity:
                raise InvalidOrderError(f"amend {client_order_id}: below the filled quantity", reason="invalid_amend")
            self._later(partial(self._amend_quantity_now, client_order_id, symbol, new_qty))
            return client_order_id
        # Cancel-replace: a new intent (new deterministic id) for the rest of the order at the new terms.
        remaining = (new_qty if new_qty is not None else order.quantity) - order.filled_quantity
        if remaining <= 0:
            raise InvalidOrderError(f"amend {client_order_id}: nothing would remain", reason="invalid_amend")
        changes = {"intent_id": self._next_intent_id(), "quantity": remaining, "created_at": self.now()}
        if new_price is not None:
            changes["price" if order.intent.type.needs_price else "trigger_price"] = new_price
        try:
            intent = order.intent.replace(**changes)
        except ValidationError as exc:
            raise InvalidOrderError(f"amend {client_order_id}: {exc.errors()[0]['msg']}") from None
        coid = intent.client_order_id
        self.actions.append(Action("submit", coid, intent=intent))
        self._orders[coid] = self._new_order(intent)
        list_id = self._list_of.pop(client_order_id, None)  # its cancel must not end the list
        if list_id is not None:
            self._list_of[coid] = list_id
            state = self._lists[list_id]
            state.legs = tuple(coid if leg == client_order_id else leg for leg in state.legs)
        self._apply(coid, OrderSubmitted(event_id=self._event_id(coid), client_order_id=coid, ts=self.now()))
        self._later(partial(self._cancel_replace_now, client_order_id, coid, intent))
        return coid

    def _amend_quantity_now(self, client_order_id: str, symbol: str, quantity: Decimal) -> None:
        if client_order_id not in self._orders:
            return
        try:
            result = self.venue.engine.amend_quantity(self._account, symbol, quantity, client_order_id=client_order_id)
        except EngineRejection as exc:
            self._log.debug("amend %s refused by the venue: %s", client_order_id, exc.message)
            return
        self._process(result)

    def _cancel_replace_now(self, client_order_id: str, coid: str, intent: OrderIntent) -> None:
        symbol = intent.symbol
        if client_order_id not in self._orders:  # done meanwhile: the replacement has nothing to replace
            self._reject(coid, f"{client_order_id} is no longer open")
            return
        new = to_new_order(intent, coid, self.venue.engine.last_price(symbol))
        new = _with_type_of(new, self.venue.engine.get_order(self._account, symbol, client_order_id=client_order_id))
        try:
            result = self.venue.engine.cancel_replace(
                self._account, symbol, new, cancel_client_order_id=client_order_id
            )
        except CancelReplacePartialFailureError as exc:
            self._process(exc.cancel_result)
            self._reject(coid, f"{exc.reason}: {exc.message}")
            return
        except EngineRejection as exc:
            self._reject(coid, f"{exc.reason}: {exc.message}")
            return
        self._process(result)

    # --- venue results → orders, fills, positions ---------------------------------------------------
    def _event_id(self, coid: str) -> str:
        self._event_seq += 1
        return f"{coid}:{self._event_seq}"

    def _apply(self, coid: str, event: OrderEvent) -> Order | None:
        order = self._orders.get(coid)
        if order is None:
            return None
        order = order.apply(event)
        if order.status.is_terminal:
            del self._orders[coid]
            if order.status is OrderStatus.REJECTED:
                self.rejections.append(order)
        else:
            self._orders[coid] = order
        snapshot = order
        self._pending.append(lambda: self.strategy.on_order(snapshot))
        if order.status.is_terminal or isinstance(event, OrderFilled):
            self._on_list_leg(order)
        return order

    def _process(self, result: MatchResult) -> None:
        now = self.now()
        for update in result.order_updates:
            eo = update.order
            coid = eo.client_order_id
            order = self._orders.get(coid)
            if order is None or eo.account != self._account:
                continue
            execution = update.execution
            event: OrderEvent
            if execution is ExecutionType.NEW:
                if order.status is not OrderStatus.PENDING_SUBMIT:
                    continue  # a stop triggering (working=True): not a state change for the order
                event = OrderAccepted(
                    event_id=self._event_id(coid), client_order_id=coid, ts=now, exchange_order_id=str(eo.order_id)
                )
            elif execution is ExecutionType.TRADE:
                assert update.fill is not None
                if order.status is OrderStatus.PENDING_SUBMIT:  # filled on arrival: acknowledge first
                    self._apply(
                        coid,
                        OrderAccepted(
                            event_id=self._event_id(coid),
                            client_order_id=coid,
                            ts=now,
                            exchange_order_id=str(eo.order_id),
                        ),
                    )
                fill = domain_fill(self.exchange, update.fill)
                self.fills.append(fill)
                self._pending.append(partial(self._deliver_fill, fill))
                event = OrderFilled(event_id=self._event_id(coid), client_order_id=coid, ts=now, fill=fill)
            elif execution is ExecutionType.CANCELED:
                event = OrderCancelled(event_id=self._event_id(coid), client_order_id=coid, ts=now)
            elif execution is ExecutionType.EXPIRED:
                event = OrderExpired(event_id=self._event_id(coid), client_order_id=coid, ts=now)
            elif execution is ExecutionType.REPLACED:
                if eo.quantity == eo.executed_quantity:
                    continue  # amended down to what was filled: the engine reports FILLED below
                event = OrderAmended(event_id=self._event_id(coid), client_order_id=coid, ts=now, quantity=eo.quantity)
            elif execution is ExecutionType.REJECTED:
                event = OrderRejected(event_id=self._event_id(coid), client_order_id=coid, ts=now, reason="rejected")
            else:
                continue
            self._apply(coid, event)

    def _deliver_fill(self, fill: Fill) -> None:
        self._positions[fill.symbol] = self.position(fill.symbol).apply_fill(fill)
        self.strategy.on_fill(fill)

    # --- order lists (OCO, bracket): the LocalOrderEmulator.add_list contract, in miniature ---------
    def _on_list_leg(self, order: Order) -> None:
        list_id = self._list_of.get(order.client_order_id)
        if list_id is None:
            return
        state = self._lists[list_id]
        if state.done:
            return
        coid = order.client_order_id
        if state.kind == "bracket" and coid == state.legs[0]:
            if not order.status.is_terminal:
                return
            filled = order.filled_quantity
            held = list(state.held.values())
            if filled <= 0:
                for child in held:
                    self._drop_held(child.client_order_id)
                state.done = True
                return
            # Entry done: the exits become a live OCO for what was actually bought/sold.
            state.held.clear()
            state.kind = "oco"
            state.legs = tuple(child.client_order_id for child in held)
            for child in held:
                del self._orders[child.client_order_id]
                self._send(child if child.quantity == filled else child.replace(quantity=filled), now=True)
            return
        # OCO: the first fill (or a leg ending without one) cancels the sibling(s).
        state.done = True
        for leg in state.legs:
            if leg != coid and leg in self._orders:
                self._cancel_now(leg)

    def _drop_held(self, coid: str) -> None:
        list_id = self._list_of.get(coid)
        if list_id is not None:
            self._lists[list_id].held.pop(coid, None)
        order = self._orders.pop(coid, None)
        if order is not None:
            cancelled = order.apply(OrderCancelled(event_id=self._event_id(coid), client_order_id=coid, ts=self.now()))
            self._pending.append(lambda: self.strategy.on_order(cancelled))


def _with_type_of(new: NewOrder, current: Any) -> NewOrder:
    """Keep the venue-side type of the order being replaced (a post-only limit stays LIMIT_MAKER)."""
    return replace(new, type=current.type)
