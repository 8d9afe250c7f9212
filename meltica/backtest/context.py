"""``BacktestContext``: the ``StrategyContext`` of a backtest, over the same objects as live.

A strategy's requests go through the real ``OrderManager`` (write-ahead into a ``MemoryOrderStore``,
risk check by the real ``RiskEngine`` when limits are configured, ``LocalOrderEmulator`` for order lists
and order types the venue lacks) to a ``InProcessAdapter`` on a ``InProcessVenue`` (``meltica.sim.venue
.SimulatedVenue``) — whose ``MatchingEngine`` is the one the emulator and paper trading use. Only the clock
(a ``ManualClock``) and the way the venue's user stream is delivered differ from live: the stream is
pumped synchronously into the OMS right after every venue call (``SettlingInProcessAdapter``), which is one
of the interleavings live allows.

No look-ahead (the rule the live pipeline's lock-step mode keeps too): every request a
callback makes (submit, cancel, amend, order list) is held with an *arrival time* ``decision time +
latency`` and delivered, in the order made, just before the first market-data item that starts at or
after its arrival — for bars, at the open of that bar: the clock moves to the bar's open time, the open
is printed to the venue (stops the gap crosses trigger and fill at the worse price), the held requests
are sent, then the bar's path runs. With latency 0 a decision on bar t's close (= bar t+1's open time)
reaches the venue at bar t+1's open; with 0 < latency <= one bar it reaches it at bar t+2's open (the
arrival falls inside bar t+1, whose path before the arrival is unknown: conservative). Requests made by
the reactions to a release (an entry filled at the open → its protective stop) have arrived by the same
open when latency is 0 and go out there too, before the bar's path.
Fills on a bar's path are stamped with the bar's close time (when the bar is known). Requests still
held when the data ends: cancels are delivered, new orders and amendments are not (they end
``cancelled`` with reason ``END_OF_DATA``). Venue-side reactions (an OCO sibling cancelled, bracket exits
placed when the entry fills, a triggered stop's child) happen at once, as they do live.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, TypedDict, overload

from pydantic import BaseModel

from meltica.adapters.in_process import (
    IN_PROCESS_CAPABILITIES,
    InProcessAdapter,
    InProcessVenue,
    domain_fill,
    to_new_order,
)
from meltica.backtest.intents import IntentingContext, Timer
from meltica.domain import (
    Bar,
    Fill,
    Instrument,
    LiquiditySide,
    Order,
    OrderAccepted,
    OrderBookSnapshot,
    OrderCancelled,
    OrderEvent,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderStatus,
    OrderSubmitted,
    OrderType,
    Position,
    Trade,
    client_order_id_for,
)
from meltica.domain.values import construct, is_shared_fields_set, shared_fields_set
from meltica.errors import InvalidOrderError, MelticaError
from meltica.execution import OrderManager
from meltica.execution.emulation import LocalOrderEmulator, ManagedOrder, held_order_view
from meltica.execution.oms import needs_emulation
from meltica.matching import EngineFill, EngineOrderStatus, FeeSchedule, FillModel
from meltica.portfolio import Portfolio
from meltica.risk import InMemoryKillSwitchStore, KillSwitch, RiskConfig, RiskEngine
from meltica.sim.clock import ManualClock
from meltica.sim.executor import HeldRequest, RequestExecutor
from meltica.sim.store import NotifyingEmulationStore, NotifyingOrderStore
from meltica.sim.venue import SimulatedVenue
from meltica.strategies.base import OrderList, OrderListKind, Strategy

_ZERO = Decimal(0)


def share_fields_set(model: BaseModel) -> None:
    """Give a kept model the one shared copy of its ``model_fields_set`` (``shared_fields_set``)."""
    fields = model.__pydantic_fields_set__
    if not is_shared_fields_set(fields):
        object.__setattr__(model, "__pydantic_fields_set__", shared_fields_set(fields))


def _domain_fill(exchange_id: str, fill: EngineFill) -> Fill:
    """``domain_fill`` (the validated ``Fill``) for an engine fill whose values are what validation would
    keep as they are — positive Decimal price and quantity, a finite fee, a UTC time — else ``domain_fill``."""
    if not (fill.price > 0 and fill.quantity > 0 and fill.commission.is_finite() and fill.time.tzinfo is UTC):
        return domain_fill(exchange_id, fill)
    model = construct(
        Fill,
        {
            "fill_id": str(fill.trade_id),
            "client_order_id": fill.client_order_id,
            "exchange_order_id": str(fill.order_id),
            "exchange": exchange_id,
            "symbol": fill.symbol,
            "side": fill.side,
            "price": fill.price,
            "quantity": fill.quantity,
            "fee": fill.commission,
            "fee_currency": fill.commission_asset,
            "liquidity": LiquiditySide.MAKER if fill.is_maker else LiquiditySide.TAKER,
            "ts": fill.time,
        },
        _FILL_FIELDS,
    )
    return model


_FILL_FIELDS = shared_fields_set(Fill.model_fields)
"""The names ``_domain_fill`` gives, every field of ``Fill`` (the ``model_fields_set`` every such fill shares)."""


@dataclass(frozen=True, slots=True)
class DirectOrder:
    """A plain market order the direct path filled, kept as what its last snapshot is built from: the
    snapshot announced when it was asked for (``pending_submit``), the venue's order id, the time, the
    fills. ``order()`` applies the acceptance and each fill to it, as ``BacktestContext.submit_direct``
    does for a strategy that hears order changes."""

    announced: Order
    exchange_order_id: str
    ts: datetime
    fills: tuple[Fill, ...]

    def order(self) -> Order:
        coid = self.announced.client_order_id
        current = self.announced.apply(
            construct(
                OrderAccepted,
                {
                    "event_id": "accepted",
                    "client_order_id": coid,
                    "ts": self.ts,
                    "exchange_order_id": self.exchange_order_id,
                },
            )
        )
        for fill in self.fills:
            current = current.apply(
                construct(
                    OrderFilled,
                    {"event_id": f"fill:{fill.fill_id}", "client_order_id": coid, "ts": fill.ts, "fill": fill},
                )
            )
        return current


class FinalOrders(Sequence[Order]):
    """A run's orders as it left them (``BacktestContext.final_orders``): those the direct path filled
    without anyone listening to their changes are built when read (``DirectOrder``), the rest are kept."""

    __slots__ = ("_deferred", "_orders")

    def __init__(self, orders: list[Order], deferred: Mapping[str, DirectOrder]) -> None:
        self._orders = orders
        self._deferred = deferred

    def __len__(self) -> int:
        return len(self._orders)

    @overload
    def __getitem__(self, index: int) -> Order: ...

    @overload
    def __getitem__(self, index: slice) -> list[Order]: ...

    def __getitem__(self, index: int | slice) -> Order | list[Order]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        order = self._orders[index]
        direct = self._deferred.get(order.client_order_id) if self._deferred else None
        return order if direct is None else direct.order()


INVALID_INTENT = "INVALID_INTENT"
"""The rejection reason of an order the strategy asked for that cannot exist (``BacktestContext``)."""


@dataclass(frozen=True, slots=True)
class InvalidIntent:
    """An order a strategy asked for that failed validation: when, which field, which value, why."""

    ts: datetime
    client_order_id: str
    field: str
    value: Any
    message: str


@dataclass
class Wiring:
    """The live objects a backtest runs on (exposed for tests and tools)."""

    venue: InProcessVenue
    adapter: InProcessAdapter
    oms: OrderManager
    store: NotifyingOrderStore
    portfolio: Portfolio
    emulator: LocalOrderEmulator
    risk: RiskEngine | None
    instruments: dict[str, Instrument] = field(default_factory=dict)


class ContextState(TypedDict):
    """A simulated strategy context's own state (``OrderTrackingContext.export_state``): timers as
    ``[due ISO time, every in seconds or None]``, open orders as JSON ``Order``s."""

    seq: int
    id_epoch: str
    timers: dict[str, list[Any]]
    open: list[dict[str, Any]]
    announced: list[str]
    amends: dict[str, int]


class OrderTrackingContext(IntentingContext):
    """The strategy half of a simulated context: what the strategy sees of its orders.

    New orders are announced at once (``pending_submit``) and held; every order change the OMS stores
    (``on_order_change``) updates the view (open orders, positions from ``portfolio``) at once and
    queues the strategy's callbacks (``on_fill`` then ``on_order``), which ``drain`` runs later: never
    re-entrantly. Shared by ``BacktestContext`` and the live strategy host's
    ``meltica.live.strategy_host.LiveStrategyContext``. A subclass sets the attributes below (``init_tracking``)
    and provides ``_send_intent`` / ``_send_list`` / ``cancel`` / ``_send_amend``.
    """

    portfolio: Portfolio
    orders: dict[str, Order]
    fills: list[Fill]
    rejections: list[Order]
    fills_changed: bool
    _announced: set[str]
    _open: dict[str, Order]
    _positions: dict[str, Position]
    _amends: dict[str, int]

    def init_tracking(self, portfolio: Portfolio) -> None:
        self.portfolio = portfolio
        self._pending = deque()
        self._timers = {}
        self._announced = set()  # orders whose submission the strategy already heard of
        self._open = {}  # this instance's open (and held) orders
        self._positions = {}
        self._amends = {}
        self.orders = {}  # every order of this instance, as it is now
        self.fills = []
        self.rejections = []
        self.fills_changed = False  # set on every fill; the engine clears it after re-reading balances

    # --- state for restarts (the live strategy host's snapshots) ----------------------------------
    def export_state(self) -> ContextState:
        """The context's own state, JSON-ready: intent sequence and id epoch, timers, open orders, which of
        them the strategy heard of, and their amendment counts."""
        open_coids = set(self._open)
        return {
            "seq": self._seq,
            "id_epoch": self._id_epoch,
            "timers": {
                n: [t.due.isoformat(), None if t.every is None else t.every.total_seconds()]
                for n, t in self._timers.items()
            },
            "open": [o.model_dump(mode="json") for o in self._open.values()],
            "announced": sorted(self._announced & open_coids),
            "amends": {c: n for c, n in self._amends.items() if c in open_coids},
        }

    def import_state(self, data: ContextState | Mapping[str, Any]) -> None:
        """Restore what ``export_state`` returned (into a context that has tracked nothing yet)."""
        self._seq = int(data["seq"])
        self._id_epoch = str(data.get("id_epoch", ""))
        for name, (due, every) in data["timers"].items():
            self._timers[name] = Timer(
                due=datetime.fromisoformat(due), every=None if every is None else timedelta(seconds=every)
            )
        for order in data["open"]:
            self._track(Order.model_validate(order))
        self._announced.update(data["announced"])
        self._amends.update({c: int(n) for c, n in data["amends"].items()})

    # --- reads -----------------------------------------------------------------------------------
    def position(self, symbol: str) -> Position:
        # Cached per symbol until a fill of it arrives (``on_order_change`` / ``_deliver_fill`` drop it).
        try:
            return self._positions[symbol]
        except KeyError:
            pos = self.portfolio.position(self._account, self.exchange, symbol, strategy=self._instance_id)
            self._positions[symbol] = pos
            return pos

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        return [o for o in self._open.values() if symbol is None or o.intent.symbol == symbol]

    # --- requests --------------------------------------------------------------------------------
    def _hold(self, intent: OrderIntent) -> str:
        """A new order the strategy asked for: announced now (``pending_submit``), sent at release."""
        coid = intent.client_order_id
        order = Order.announced(intent, self.clock.now)  # (from_intent, then its OrderSubmitted applied)
        self._announced.add(coid)
        self._track(order)
        self._queue_on_order(order)
        return coid

    def _queue_on_order(self, order: Order) -> None:
        """Queue the strategy's ``on_order(order)`` — unless it is ``Strategy``'s own, which does nothing."""
        callback = self.strategy.on_order
        if getattr(callback, "__func__", None) is not Strategy.on_order:
            self._pending.append(partial(callback, order))

    def _hears_orders(self) -> bool:
        """Whether the strategy has an ``on_order`` of its own (``Strategy``'s does nothing)."""
        return getattr(self.strategy.on_order, "__func__", None) is not Strategy.on_order

    def _send_amend(self, client_order_id: str, price: Decimal | None, quantity: Decimal | None, carrier: str) -> None:
        """Hand an amendment on; ``carrier`` is the client order id the strategy was told will carry it."""
        raise NotImplementedError

    def amend(self, client_order_id: str, *, price: Decimal | None = None, quantity: Decimal | None = None) -> str:
        order = self._open.get(client_order_id)
        if order is None:
            raise InvalidOrderError(f"amend {client_order_id}: no such open order", reason="order_not_open")
        inst = self.instrument(order.intent.symbol)
        new_price = None if price is None else inst.round_price(price, order.side)
        new_qty = None if quantity is None else inst.round_quantity(quantity)
        if new_price is None and new_qty is None:
            raise InvalidOrderError("amend needs a price or a quantity")
        if new_price is None and new_qty is not None and new_qty < order.quantity:
            carrier = client_order_id  # the paper venue amends a decrease in place
        else:
            # Cancel-replace: the OMS names the replacement "<intent id>~a<n>" (deterministic).
            n = self._amends.get(client_order_id, 0) + 1
            self._amends[client_order_id] = n
            carrier = client_order_id_for(f"{order.intent.intent_id}~a{n}")
        self._send_amend(client_order_id, new_price, new_qty, carrier)
        return carrier

    def queue_due_timers(self) -> None:
        self._queue_due_timers()

    # --- order changes ---------------------------------------------------------------------------
    def _remember(self, client_order_id: str, order: Order) -> None:
        """Keep ``order`` as the order's current snapshot in ``orders``."""
        self.orders[client_order_id] = order

    def _track(self, order: Order) -> None:
        coid = order.client_order_id
        share_fields_set(order)  # every order is kept (``orders``): see share_fields_set
        share_fields_set(order.intent)
        self._remember(coid, order)
        if order.is_terminal:
            self._open.pop(coid, None)
        else:
            self._open[coid] = order

    def on_order_change(self, order: Order, event: OrderEvent | None) -> None:
        """One stored change of one of this instance's orders: keep our view, queue the callbacks.
        A fill must already be in ``portfolio``."""
        self._track(order)
        if event is None:
            return
        if isinstance(event, OrderSubmitted) and order.client_order_id in self._announced:
            return
        if isinstance(event, OrderFilled):
            fill = event.fill
            share_fields_set(fill)
            self.fills.append(fill)
            self._positions.pop(fill.symbol, None)
            self.fills_changed = True
            if getattr(self.strategy.on_fill, "__func__", None) is not Strategy.on_fill:
                self._pending.append(partial(self._deliver_fill, fill))
            # (else nothing to deliver: ``Strategy``'s own ``on_fill`` does nothing)
        if order.status is OrderStatus.REJECTED:
            self.rejections.append(order)
        self._queue_on_order(order)

    def on_held_view(self, view: Order) -> None:
        """A new view of an order the local order emulation holds (:func:`held_order_view`): ``new`` while
        held, open while a child works on the venue, then how it ended. The strategy hears each change but
        the first, as for any order."""
        before = self.orders.get(view.client_order_id)
        if before is None or (view.status is before.status and view.filled_quantity == before.filled_quantity):
            return
        self._track(view)
        if view.status is not OrderStatus.NEW:
            self._pending.append(partial(self.strategy.on_order, view))

    def _deliver_fill(self, fill: Fill) -> None:
        self._positions.pop(fill.symbol, None)
        self.strategy.on_fill(fill)

    def _local_cancel(self, order: Order, reason: str) -> None:
        coid = order.client_order_id
        cancelled = order.apply(
            OrderCancelled(event_id="cancelled", client_order_id=coid, ts=self.clock.now, reason=reason)
        )
        self._track(cancelled)
        self._pending.append(partial(self.strategy.on_order, cancelled))

    def drain(self) -> None:
        """Run the queued strategy callbacks (and what they cause) until none is left."""
        pending = self._pending
        while pending:
            pending.popleft()()


class BacktestContext(OrderTrackingContext):
    """One strategy instance in a backtest. See the module docstring for the release rule."""

    def __init__(
        self,
        instruments: Iterable[Instrument],
        *,
        start: datetime,
        balances: Mapping[str, Decimal],
        account: str = "backtest",
        instance_id: str = "strategy-1",
        exchange_id: str = "paper",
        fees: FeeSchedule | None = None,
        fill_model: FillModel | None = None,
        risk: RiskConfig | None = None,
        latency: timedelta = timedelta(0),
        valuation_currency: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        markets = list(instruments)
        self.clock = ManualClock(start)
        clock = self.clock
        self.simulated = SimulatedVenue(
            markets,
            clock=clock,
            account=account,
            exchange_id=exchange_id,
            balances=balances,
            fees=fees,
            fill_model=fill_model,
        )
        self.venue = self.simulated.venue
        self.engine = self.simulated.engine
        self.step = self.simulated.step
        self.adapter = self.simulated.adapter
        # Deliver the venue's queued user events to the OMS (the private stream, synchronously).
        self.pump = self.simulated.settle
        quote = valuation_currency or (markets[0].quote if markets else None)
        portfolio = Portfolio(clock=clock, valuation_currency=quote)
        by_key = {(i.exchange if i.exchange == exchange_id else exchange_id, i.symbol): i for i in markets}
        self.risk: RiskEngine | None = None
        if risk is not None:
            self.risk = RiskEngine(
                risk,
                portfolio,
                clock=clock,
                instruments=by_key,
                kill_switch=KillSwitch(InMemoryKillSwitchStore(), clock=clock),
            )
        self.store = NotifyingOrderStore(self._on_stored)
        self.oms = OrderManager(self.store, {account: self.adapter}, clock=clock, risk=self.risk, portfolio=portfolio)
        self.simulated.on_user_event = partial(self.oms.on_user_event, account=account)
        self.emulator = LocalOrderEmulator(
            NotifyingEmulationStore(self._on_held_change),
            clock,
            self.oms.submit_native,
            self.oms.cancel,
            capabilities={account: IN_PROCESS_CAPABILITIES},
            instruments=by_key,
        )
        self.oms.emulator = self.emulator
        self._account = account
        self._instance_id = instance_id
        self._exchange = exchange_id
        self._log = logger or logging.getLogger(f"meltica.strategy.{instance_id}")
        self._state: dict[str, Any] = {}
        self._strategy: Strategy[Any] | None = None
        self._seq = 0
        self.latency = latency
        self._outbox: deque[HeldRequest] = deque()
        # Direct-path orders whose last snapshots are not built yet (``submit_direct``): client order id ->
        # what builds them. ``orders`` builds them before anyone reads it; the result reads them lazily.
        self._deferred: dict[str, DirectOrder] = {}
        self._orders_map: dict[str, Order] = {}
        self.init_tracking(portfolio)
        self._emulated_active = False
        self._invalid: dict[str, InvalidIntent] = {}  # client order id -> why its intent is impossible
        # Where in the simulation fills happen now (the engine sets it): a fill at a bar's open and one on
        # the previous bar's path share a timestamp (that bar's close is this one's open).
        self.fill_phase = "event"
        self.fill_phases: dict[str, str] = {}  # fill id -> the phase it happened in
        # Plain market orders skip the OMS round trip (``submit_direct``); the bar loop switches it on
        # when the venue is synthetic and uncapped (no recorded trades or book, no volume share).
        self.direct_market_orders = False
        self._executor = RequestExecutor(
            self.oms,
            self.emulator,
            self.store,
            known=lambda coid: self.orders.get(coid),  # (through ``orders``: deferred orders built first)
            local_cancel=self._local_cancel,
            logger=self._log,
        )

    # --- StrategyContext: identity ---------------------------------------------------------------
    @property
    def exchange(self) -> str:
        return self._exchange

    # --- the orders, some built when read ------------------------------------------------------------
    @property
    def orders(self) -> dict[str, Order]:
        """Every order of this instance as it is now (the direct path's deferred snapshots built first)."""
        if self._deferred:
            self._build_deferred()
        return self._orders_map

    @orders.setter
    def orders(self, value: dict[str, Order]) -> None:
        self._orders_map = value

    def _remember(self, client_order_id: str, order: Order) -> None:
        if client_order_id in self._deferred:  # (cannot happen: a deferred order is terminal) keep the order
            self._build_deferred()
        self._orders_map[client_order_id] = order

    def _build_deferred(self) -> None:
        orders = self._orders_map
        for coid, direct in self._deferred.items():
            order = direct.order()
            share_fields_set(order)
            orders[coid] = order
        self._deferred.clear()

    def final_orders(self) -> Sequence[Order]:
        """Every order of this instance as the run left it, in the order asked for; a direct-path order's
        last snapshot is built when it is read (``FinalOrders``). Read after the run."""
        return FinalOrders(list(self._orders_map.values()), dict(self._deferred))

    # --- intents ---------------------------------------------------------------------------------
    def _arrival(self) -> datetime:
        return self.clock.now + self.latency

    def _invalid_intent(self, message: str, *, field: str, value: Any, values: dict[str, Any]) -> OrderIntent:
        # Fails closed for the order (it never reaches the OMS: ``_send_intent`` rejects it) but not for
        # the run: one impossible order on real data must not throw the whole backtest away.
        intent = OrderIntent.model_construct(**values)
        self._invalid[intent.client_order_id] = InvalidIntent(
            ts=self.clock.now, client_order_id=intent.client_order_id, field=field, value=value, message=message
        )
        return intent

    def _reject_invalid(self, intent: OrderIntent, why: str) -> None:
        """Report ``intent`` rejected at once (``INVALID_INTENT``), as a venue rejection is reported."""
        coid = intent.client_order_id
        now = self.clock.now
        order = (
            Order.from_intent(intent)
            .apply(OrderSubmitted(event_id="submitted", client_order_id=coid, ts=now))
            .apply(OrderRejected(event_id="rejected", client_order_id=coid, ts=now, reason=f"{INVALID_INTENT}: {why}"))
        )
        self._log.warning("order %s rejected: %s", coid, why)
        self._track(order)
        self.rejections.append(order)
        self._pending.append(partial(self.strategy.on_order, order))

    def _send_intent(self, intent: OrderIntent) -> str:
        invalid = self._invalid.get(intent.client_order_id)
        if invalid is not None:
            self._reject_invalid(intent, invalid.message)
            return intent.client_order_id
        self._outbox.append(HeldRequest(self._arrival(), "submit", intent.client_order_id, intent=intent))
        return self._hold(intent)

    def _send_list(self, kind: OrderListKind, list_id: str, legs: tuple[OrderIntent, ...]) -> OrderList:
        bad = [self._invalid[leg.client_order_id] for leg in legs if leg.client_order_id in self._invalid]
        if bad:  # a list stands or falls as a whole: no entry without its protective exits
            for leg in legs:
                own = self._invalid.get(leg.client_order_id)
                self._reject_invalid(leg, own.message if own else f"its {kind} sibling: {bad[0].message}")
        else:
            self._outbox.append(HeldRequest(self._arrival(), "list", intents=legs, list_id=list_id, list_kind=kind))
            for leg in legs:
                self._hold(leg)
        return OrderList(list_id=list_id, kind=kind, client_order_ids=tuple(i.client_order_id for i in legs))

    def cancel(self, client_order_id: str) -> None:
        self._outbox.append(HeldRequest(self._arrival(), "cancel", client_order_id))

    def _send_amend(self, client_order_id: str, price: Decimal | None, quantity: Decimal | None, carrier: str) -> None:
        self._outbox.append(HeldRequest(self._arrival(), "amend", client_order_id, price=price, quantity=quantity))

    @property
    def invalid_intents(self) -> list[InvalidIntent]:
        """The strategy's impossible orders so far, in the order asked for (each also a rejected order)."""
        return list(self._invalid.values())

    # --- OMS side ----------------------------------------------------------------------------------
    def _on_stored(self, order: Order, event: OrderEvent | None) -> None:
        """Every order change the OMS stores: keep our view, queue the strategy's callbacks."""
        if order.intent.strategy != self._instance_id:
            return
        if isinstance(event, OrderFilled):
            self.fill_phases[event.fill.fill_id] = self.fill_phase
        self.on_order_change(order, event)

    def _on_held_change(self, held: ManagedOrder) -> None:
        """Every change of an order the local order emulation holds. A leg of an order list it holds
        (``mode`` "emulated") never reaches the OMS or the venue under its own id — its child orders do —
        so our view of it follows the emulation (:meth:`on_held_view`)."""
        coid = held.client_order_id
        if held.mode != "emulated" or held.list_id is None or held.intent.strategy != self._instance_id:
            return  # a native leg (it is the venue order) or an emulated order of the OMS's: the OMS tells
        before = self.orders.get(coid)
        if before is None:
            return
        view = held_order_view(held, before, self.orders.get, self.clock.now)
        if view is not None:
            self.on_held_view(view)

    def has_releasable(self, ts: datetime) -> bool:
        outbox = self._outbox
        return bool(outbox) and outbox[0].arrival <= ts

    @property
    def emulated_active(self) -> bool:
        return self._emulated_active

    async def release(self, ts: datetime) -> None:
        """Send every held request that has arrived by ``ts``, in the order made."""
        outbox = self._outbox
        while outbox and outbox[0].arrival <= ts:
            while outbox and outbox[0].arrival <= ts:
                request = outbox.popleft()
                # a plain market order straight to the engine when it can (``submit_direct``), else the OMS
                if self.direct_market_orders and request.kind == "submit" and self.submit_direct(request.intent):
                    continue
                await self._send_held(request)
            self.drain()  # reactions (on_order / on_fill) may make requests that have arrived too

    async def release_held_back(self, ts: datetime) -> None:
        """``release(ts)``, with the callbacks already queued (reactions to the market data item being
        processed: a resting order it filled) held back until after it: their requests wait for the next
        item, as a decision on any item does (event replay, ``engine._drive_events``)."""
        held = self._pending
        self._pending = deque()
        try:
            await self.release(ts)
            held.extend(self._pending)
        finally:
            self._pending = held

    async def _send_held(self, request: HeldRequest) -> None:
        """A released request through the OMS / the emulator (the request executor)."""
        if await self._executor.execute(request):
            self._emulated_active = True

    def submit_direct(self, intent: OrderIntent | None) -> bool:
        """The in-process venue path: a plain market order goes straight to the matching engine.

        What the OMS path does for such an order, without its write-ahead store, adapter, user-stream
        queue and event loop: the engine's ``submit`` (the same validation, balance check, fill price,
        fee, order and trade ids and ledger), then the order's events — submitted, accepted, one filled
        per fill — applied to the domain ``Order`` and reported as the OMS's store would report them, and
        each fill applied to the portfolio. Only when nothing else can take part: no risk engine or kill
        switch, nothing emulated, no open venue order of ours (a fill could trigger a resting stop), a
        quantity the book in front of it fills whole (no volume cap), a known new order that needs no
        emulation and no rounding. Otherwise, and when the engine refuses the order (it changed nothing
        then), ``False``: the request takes the full OMS path, which reports the refusal as live would.
        """
        if intent is None or intent.type is not OrderType.MARKET:
            return False
        engine = self.engine
        coid = intent.client_order_id
        if (
            self.risk is not None
            or self.oms.kill_switch is not None
            or self._emulated_active
            or intent.account != self._account
            or intent.exchange != self._exchange
            or engine.has_open_orders(intent.account)
            or self.store.get(coid) is not None
            or needs_emulation(intent, IN_PROCESS_CAPABILITIES)
            or engine.instrument(intent.symbol).round_quantity(intent.quantity) != intent.quantity
        ):
            return False
        if not engine.fills_whole(intent.symbol, intent.side, intent.quantity):
            return False  # the book cannot fill it whole: the OMS path reports the expired remainder
        now = self.clock.now
        if coid in self._deferred:  # (a client order id used again: cannot happen) the snapshots first
            self._build_deferred()
        held = self._orders_map.get(coid)
        # The snapshot announced when the strategy asked (``_hold``) is the one the submission makes now
        # (same intent, same time: latency 0), and storing it again changes nothing the strategy sees (the
        # submission of an announced order is not reported twice): it is kept.
        announced = (
            held is not None
            and held.intent is intent
            and held.status is OrderStatus.PENDING_SUBMIT
            and held.updated_at == now
            and not held.fill_ids
            and held.exchange_order_id is None
        )
        if announced and not self._hears_orders() and not self._hears_fills() and intent.strategy == self._instance_id:
            # Nobody hears this order's changes: the engine's order as it ended and its fills are all
            # that is read (``MatchingEngine.submit_taker``: no execution reports built).
            assert held is not None
            try:
                order_id, status, fills = engine.submit_taker(
                    to_new_order(intent, coid, engine.last_price(intent.symbol))
                )
            except MelticaError:
                return False
            if status is not EngineOrderStatus.FILLED:  # ruled out above; a bug (the engine executed)
                raise RuntimeError(f"direct market order {coid}: the engine left it {status}")
            self._fill_unheard(intent, held, str(order_id), now, fills)
            return True
        try:
            result = engine.submit(to_new_order(intent, coid, engine.last_price(intent.symbol)))
        except MelticaError:
            return False
        order = result.order
        if (
            order is None
            or order.status is not EngineOrderStatus.FILLED
            or any(u.order.order_id != order.order_id for u in result.order_updates)
        ):  # the preconditions above rule this out; a bug if it happens (the engine already executed)
            raise RuntimeError(f"direct market order {coid}: unexpected engine result {result!r}")
        # The events are built from values that are valid by construction (a validated intent, the
        # engine's ids and times): ``construct`` (``model_construct``'s result, without its generic
        # machinery) skips re-validating them, nothing else differs.
        if announced:
            assert held is not None
            current = held
        else:
            submitted = construct(OrderSubmitted, {"event_id": "submitted", "client_order_id": coid, "ts": now})
            current = Order.from_intent(intent).apply(submitted)
            self._on_stored(current, submitted)
        accepted = construct(
            OrderAccepted,
            {"event_id": "accepted", "client_order_id": coid, "ts": now, "exchange_order_id": str(order.order_id)},
        )
        current = current.apply(accepted)
        if self._hears_orders():
            self._on_stored(current, accepted)
        # else: the acceptance is overwritten by the fill below before anyone could read it (the strategy
        # does not listen to order changes, and nothing runs in between)
        exchange_id = self.venue.exchange_id
        portfolio = self.portfolio
        for update in result.order_updates:
            if update.fill is None:
                continue
            fill = _domain_fill(exchange_id, update.fill)
            filled = construct(
                OrderFilled,
                {"event_id": f"fill:{fill.fill_id}", "client_order_id": coid, "ts": fill.ts, "fill": fill},
            )
            current = current.apply(filled)
            self._on_stored(current, filled)
            portfolio.book_fill(fill, account=intent.account, strategy=intent.strategy)
        return True

    def _hears_fills(self) -> bool:
        """Whether the strategy has an ``on_fill`` of its own (``Strategy``'s does nothing)."""
        return getattr(self.strategy.on_fill, "__func__", None) is not Strategy.on_fill

    def _fill_unheard(
        self, intent: OrderIntent, announced: Order, exchange_order_id: str, now: datetime, fills: Iterable[EngineFill]
    ) -> None:
        """``submit_direct``'s fills for a strategy that hears neither order changes nor fills: what storing
        each change does (the fill kept, its phase, positions re-read, booked in the portfolio, the order no
        longer open), with the order's snapshots — accepted, then one per fill — left to be built when
        ``orders`` or the result is read (``DirectOrder``): nobody can see them before."""
        exchange_id = self.venue.exchange_id
        portfolio = self.portfolio
        kept: list[Fill] = []
        for engine_fill in fills:
            fill = _domain_fill(exchange_id, engine_fill)
            self.fill_phases[fill.fill_id] = self.fill_phase
            share_fields_set(fill)
            self.fills.append(fill)
            self._positions.pop(fill.symbol, None)
            self.fills_changed = True
            portfolio.book_fill(fill, account=intent.account, strategy=intent.strategy)
            kept.append(fill)
        coid = intent.client_order_id
        self._open.pop(coid, None)  # filled (the engine said so): terminal
        self._deferred[coid] = DirectOrder(announced, exchange_order_id, now, tuple(kept))

    async def _cancel_now(self, client_order_id: str) -> None:
        await self._executor.cancel_now(client_order_id)

    def cash_and_holding(self, symbol: str) -> tuple[Decimal, Decimal]:
        """The account's quote currency and base asset of ``symbol``'s market, free + locked: the parts the
        equity curve is made of."""
        instrument = self.engine.instrument(symbol)
        total = self.engine.ledger.total
        return total(self._account, instrument.quote), total(self._account, instrument.base)

    def start(self) -> None:
        """The strategy's ``on_start`` (what it asks for is held for the first market data)."""
        self.strategy.on_start()
        self.drain()

    async def stop(self, at: datetime) -> None:
        """The data ended at ``at``: the strategy's ``on_stop``, then the end of the data (``end_of_data``)."""
        self.clock.now = at
        self.strategy.on_stop()
        self.drain()
        await self.end_of_data()

    async def end_of_data(self) -> None:
        """Held cancels are delivered; held new orders and amendments never reach the venue — also those
        the strategy makes in reaction to the end (an entry cancelled ``END_OF_DATA`` → its stop)."""
        for _ in range(100):  # each round answers the reactions to the last; a strategy may loop forever
            await self._executor.end_of_data(self._outbox)
            self.drain()
            if not self._outbox:
                return
        self._outbox.clear()  # requests made after the data ended never reach the venue

    # --- market data -------------------------------------------------------------------------------
    def feed_trade(self, trade: Trade) -> None:
        self.clock.now = trade.ts
        self.venue.on_trade(trade)

    def feed_book(self, book: OrderBookSnapshot) -> None:
        self.clock.now = book.ts
        self.venue.on_book(book)

    def quiet(self) -> bool:
        """Nothing of ours can move on this data: no open orders, nothing emulated."""
        return not self._open and not self._emulated_active

    def on_bar_callback(self, bar: Bar) -> None:
        self._pending.append(partial(self.strategy.on_bar, bar))

    def update_emulated_activity(self) -> None:
        if self._emulated_active:
            self._emulated_active = bool(self.emulator.orders())
