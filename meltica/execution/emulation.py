"""Local order emulation: what the venue cannot do natively, held and triggered here by market data.

``route(intent, capabilities)`` decides, purely from the venue's capability matrix, whether an intent is
sent to the venue as it is (``"native"``) or handed to :class:`LocalOrderEmulator` (``"emulated"``).
The emulator holds an emulated order locally and, when the market triggers it, places plain *child*
orders the venue can take (MARKET / LIMIT, with native extras when the venue has them) through the
``submit`` callback; it cancels them through ``cancel``. It never talks to a venue or the database
itself: the OMS (or a test) passes the callbacks and a persistence object (``EmulationStore``).

Rules, chosen to match the matching engine (``meltica.matching``, Binance semantics) so that an intent
behaves the same whether it runs natively on the paper venue / emulator or emulated here:

* stop (``stop_market``/``stop_limit``): a sell triggers at price <= trigger, a buy at price >= trigger;
  take-profit the other way round (sell at >=, buy at <=). Reached counts as crossed.
* trailing stop: a sell tracks the highest price since activation and fires at
  ``peak − offset`` (absolute) or ``peak × (1 − pct/100)``; a buy tracks the lowest and fires at
  ``trough + offset`` / ``trough × (1 + pct/100)``. Without ``activation_price`` tracking starts at the
  first price seen after placement; with it, tracking starts when the price meets the activation the
  way Binance spot's ``stopPrice`` + ``trailingDelta`` does (sell: price <= activation, buy: >=).
  The price that activates does not fire in the same step.
* prices: a trade is one point; a bar is the path open → nearer extreme (tie: low first) → other
  extreme → close, with the fixed trigger prices the path passes visited in travel order (the engine's
  conservative intrabar rule); an order book is the best bid for sell orders, the best ask for buys.
* once triggered, a stop-market / take-profit / trailing stop sends a MARKET child, a stop-limit /
  take-profit-limit a LIMIT child at its limit price. A stop that already meets its trigger when it is
  added fires on the next price (no "would trigger immediately" rejection).
* iceberg (``display_quantity``) without native iceberg: LIMIT children of ``display_quantity`` each,
  the next one sent when the previous one is completely filled (a refill loses time priority, as on
  the venue).
* GTD without native GTD: the child is sent GTC and cancelled by the emulator at ``expire_at`` (checked
  on every market data item and on ``advance()``); an untriggered order expires locally.
* post-only without native post-only: best effort — refused locally when the limit would take against
  the last seen book (or the last trade when no book was seen), else sent as a plain LIMIT.
* reduce-only without native reduce-only: with a ``position`` callback, child quantities are clamped to
  what reduces the position (nothing to reduce: the order is cancelled); without one the flag is
  dropped on the child and the risk engine is what enforces it.

Order lists (``add_list``):

* ``oco``: the legs (usually a take-profit LIMIT and a stop) are placed at once, each natively where the
  venue can, else emulated. The first fill of a leg — even a partial one — or the trigger of an
  emulated leg cancels every other leg (Binance OCO rule); the filling leg keeps working to its own
  quantity. A leg cancelled, expired or rejected by the venue cancels the list.
* ``bracket``: ``[entry, take_profit, stop_loss]``. The exits are held until the entry is done (filled,
  or cancelled / expired with a fill) and are then placed for the entry's *filled* quantity (native
  where possible). Between the exits: a partial fill of one reduces the other to what is left of the
  position (a native leg is cancelled and re-placed with the smaller quantity, an emulated one changes
  locally); a complete fill cancels the other. An entry that ends with nothing filled cancels the list.

Persistence: every managed order's state (trigger progress, trailing peak, children, list membership)
is saved through ``EmulationStore`` on every change; ``restore()`` reloads what is active and carries
on. After a restart the OMS should replay the children's current state into ``on_order_event`` (its
``recover()`` does that for open orders), since fills may have happened while the process was down.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

from meltica.adapters.base import Capabilities, VenueOrder
from meltica.domain import (
    Bar,
    Instrument,
    MarketType,
    Order,
    OrderBookSnapshot,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    Trade,
)
from meltica.errors import InvalidOrderError, MelticaError

Route = Literal["native", "emulated"]
ListKind = Literal["oco", "bracket"]
MarketItem = Trade | Bar | OrderBookSnapshot
OrderUpdate = Order | VenueOrder
# The OMS answers with its ``Order``; a thin venue wrapper may answer with the ``VenueOrder``.
Submit = Callable[[OrderIntent], Awaitable[Order | VenueOrder]]
Cancel = Callable[[str], Awaitable[Order | VenueOrder]]
PositionOf = Callable[[OrderIntent], Decimal]

_STOPS = frozenset({OrderType.STOP_MARKET, OrderType.STOP_LIMIT})
_TAKE_PROFITS = frozenset({OrderType.TAKE_PROFIT, OrderType.TAKE_PROFIT_LIMIT})
_TRIGGERED = _STOPS | _TAKE_PROFITS | {OrderType.TRAILING_STOP}
_HUNDRED = Decimal(100)

# A venue we know nothing about: plain market and limit orders only.
BASIC_CAPABILITIES = Capabilities(
    order_types=frozenset({OrderType.MARKET, OrderType.LIMIT}),
    time_in_force=frozenset({TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK}),
)


# --- routing -----------------------------------------------------------------------------------


def route(intent: OrderIntent, capabilities: Capabilities, instrument: Instrument | None = None) -> Route:
    """``"native"`` when the venue takes ``intent`` as it is, ``"emulated"`` when something must be local.

    Pure. ``instrument`` (optional) refines the answer with the market type: spot markets have no
    reduce-only and (on Binance) no GTD, whatever the venue's derivatives can do. MARKET and LIMIT
    are always native (nothing to emulate them with); a venue lacking them rejects the order itself.
    """
    kind = intent.type
    spot = instrument is not None and instrument.market_type is MarketType.SPOT
    if kind in _TRIGGERED and not capabilities.supports(kind):
        return "emulated"
    if kind is OrderType.TRAILING_STOP and (not capabilities.trailing_stop or intent.trailing_offset is not None):
        # No venue of ours trails by an absolute amount (Binance trails by bps; the paper venue would
        # convert to bps and round): emulate it exactly.
        return "emulated"
    if intent.display_quantity is not None and not capabilities.iceberg:
        return "emulated"
    if intent.post_only and not capabilities.post_only:
        return "emulated"
    if intent.reduce_only and (not capabilities.reduce_only or spot):
        return "emulated"
    if intent.time_in_force is TimeInForce.GTD and (
        TimeInForce.GTD not in capabilities.time_in_force or spot or not kind.needs_price
    ):
        return "emulated"
    if intent.time_in_force not in capabilities.time_in_force and intent.time_in_force is not TimeInForce.GTD:
        return "native"  # IOC/FOK cannot be emulated faithfully: let the venue refuse it
    return "native"


def route_list(kind: str, capabilities: Capabilities) -> Route:
    """OCO and bracket lists are managed locally unless the venue has native OCO (none of ours today)."""
    if kind == "oco" and capabilities.oco:
        return "native"
    return "emulated"


# --- state -------------------------------------------------------------------------------------


class EmulatedStatus(enum.StrEnum):
    HELD = "held"  # a bracket exit waiting for its entry
    PENDING = "pending"  # waiting for the trigger (or trailing activation)
    WORKING = "working"  # triggered / released: children live on the venue
    FILLED = "filled"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"

    @property
    def is_terminal(self) -> bool:
        return self in (
            EmulatedStatus.FILLED,
            EmulatedStatus.CANCELLED,
            EmulatedStatus.EXPIRED,
            EmulatedStatus.REJECTED,
        )


@dataclass
class ChildOrder:
    """One order the emulator placed on the venue for a managed order."""

    client_order_id: str
    quantity: Decimal
    filled: Decimal = Decimal(0)
    status: OrderStatus = OrderStatus.NEW
    cancel_requested: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "client_order_id": self.client_order_id,
            "quantity": str(self.quantity),
            "filled": str(self.filled),
            "status": self.status.value,
            "cancel_requested": self.cancel_requested,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChildOrder:
        return cls(
            client_order_id=str(data["client_order_id"]),
            quantity=Decimal(str(data["quantity"])),
            filled=Decimal(str(data["filled"])),
            status=OrderStatus(str(data["status"])),
            cancel_requested=bool(data.get("cancel_requested", False)),
        )


@dataclass
class ManagedOrder:
    """An order the emulator looks after: an emulated order, or a leg of an OCO / bracket list.

    ``mode`` "emulated": held here until triggered, then children. "native": a list leg the venue takes
    as it is; its first child *is* the leg (same client order id), later children replace it with a
    smaller quantity (bracket reduction).
    """

    client_order_id: str
    intent: OrderIntent
    quantity: Decimal
    mode: Route = "emulated"
    status: EmulatedStatus = EmulatedStatus.PENDING
    activated: bool = False
    extreme: Decimal | None = None  # trailing: best price since activation
    triggered_at: datetime | None = None
    triggered_price: Decimal | None = None
    children: list[ChildOrder] = field(default_factory=list)
    child_seq: int = 0
    list_id: str | None = None
    role: str | None = None  # "leg" (oco), "entry" / "take_profit" / "stop_loss" (bracket)
    reason: str | None = None

    @property
    def filled(self) -> Decimal:
        return sum((c.filled for c in self.children), Decimal(0))

    @property
    def remaining(self) -> Decimal:
        return self.quantity - self.filled

    @property
    def live_children(self) -> list[ChildOrder]:
        return [c for c in self.children if not c.status.is_terminal]

    @property
    def symbol_key(self) -> tuple[str, str]:
        return (self.intent.exchange, self.intent.symbol)

    def stop_price(self) -> Decimal | None:
        """The current trigger: fixed, or the trailing stop level (None while not activated)."""
        intent = self.intent
        if intent.type is not OrderType.TRAILING_STOP:
            return intent.trigger_price
        if not self.activated or self.extreme is None:
            return None
        return trailing_stop_level(intent, self.extreme)

    def to_json(self) -> dict[str, Any]:
        return {
            "client_order_id": self.client_order_id,
            "intent": self.intent.model_dump(mode="json"),
            "quantity": str(self.quantity),
            "mode": self.mode,
            "status": self.status.value,
            "activated": self.activated,
            "extreme": None if self.extreme is None else str(self.extreme),
            "triggered_at": None if self.triggered_at is None else self.triggered_at.isoformat(),
            "triggered_price": None if self.triggered_price is None else str(self.triggered_price),
            "children": [c.to_json() for c in self.children],
            "child_seq": self.child_seq,
            "list_id": self.list_id,
            "role": self.role,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ManagedOrder:
        mode = str(data["mode"])
        if mode not in ("native", "emulated"):
            raise ValueError(f"unknown mode {mode!r}")
        return cls(
            client_order_id=str(data["client_order_id"]),
            intent=OrderIntent.model_validate(data["intent"]),
            quantity=Decimal(str(data["quantity"])),
            mode="native" if mode == "native" else "emulated",
            status=EmulatedStatus(str(data["status"])),
            activated=bool(data["activated"]),
            extreme=None if data.get("extreme") is None else Decimal(str(data["extreme"])),
            triggered_at=None if data.get("triggered_at") is None else datetime.fromisoformat(data["triggered_at"]),
            triggered_price=None if data.get("triggered_price") is None else Decimal(str(data["triggered_price"])),
            children=[ChildOrder.from_json(c) for c in data.get("children", [])],
            child_seq=int(data.get("child_seq", 0)),
            list_id=data.get("list_id"),
            role=data.get("role"),
            reason=data.get("reason"),
        )


HELD_STATUS = {
    EmulatedStatus.HELD: OrderStatus.NEW,  # a bracket exit waiting for its entry: held here, not sent
    EmulatedStatus.PENDING: OrderStatus.NEW,  # waiting for its trigger: held here, not sent
    EmulatedStatus.WORKING: OrderStatus.OPEN,  # a child order works on the venue
    EmulatedStatus.FILLED: OrderStatus.FILLED,
    EmulatedStatus.CANCELLED: OrderStatus.CANCELLED,
    EmulatedStatus.EXPIRED: OrderStatus.EXPIRED,
    EmulatedStatus.REJECTED: OrderStatus.REJECTED,
}
"""The status a strategy sees of an order the local order emulation holds (:func:`held_order_view`)."""


def held_order_view(
    held: ManagedOrder, before: Order, child: Callable[[str], Order | None], now: datetime
) -> Order | None:
    """``held`` as its strategy sees it: ``before`` (the order as last seen, e.g. announced) with the status
    the emulation gives it (:data:`HELD_STATUS`; ``open`` with fills: partially filled), the quantity and the
    fills of its children (``child(client_order_id)``: a child's current order, or ``None``).

    ``None`` while the emulation still has the leg working although its children filled all of it: an
    order cannot be open and wholly filled, and the emulation's next change (filled) ends it."""
    filled = Decimal(0)
    notional = Decimal(0)
    for leg_child in held.children:
        order = child(leg_child.client_order_id)
        if order is not None and order.avg_fill_price is not None:
            filled += order.filled_quantity
            notional += order.filled_quantity * order.avg_fill_price
    status = HELD_STATUS[held.status]
    quantity = held.quantity if held.quantity > 0 else before.quantity
    if status is OrderStatus.OPEN and filled > 0:
        if filled >= quantity:
            return None
        status = OrderStatus.PARTIALLY_FILLED
    if status is OrderStatus.FILLED:
        quantity = filled if filled > 0 else quantity
    return before.model_copy(
        update={
            "status": status,
            "quantity": quantity,
            "filled_quantity": filled,
            "avg_fill_price": notional / filled if filled > 0 else None,
            "reason": held.reason if status.is_terminal else None,
            "updated_at": now,
        }
    )


@dataclass
class EmulatedOrderList:
    """An OCO or bracket list: its legs by role, in placement order."""

    list_id: str
    kind: ListKind
    account: str
    strategy: str | None
    legs: list[str]  # client order ids
    status: Literal["active", "done"] = "active"
    winner: str | None = None  # OCO: the leg whose trigger/fill cancelled the others

    def to_json(self) -> dict[str, Any]:
        return {"legs": list(self.legs), "winner": self.winner}

    @classmethod
    def from_row(
        cls, list_id: str, kind: str, account: str, strategy: str | None, status: str, params: Mapping[str, Any]
    ) -> EmulatedOrderList:
        if kind not in ("oco", "bracket"):
            raise ValueError(f"not an emulator list kind: {kind!r}")
        return cls(
            list_id=list_id,
            kind="oco" if kind == "oco" else "bracket",
            account=account,
            strategy=strategy,
            legs=[str(x) for x in params.get("legs", [])],
            status="active" if status == "active" else "done",
            winner=params.get("winner"),
        )


class EmulationStore(Protocol):
    """Where the emulator keeps its state (SQL: ``meltica.execution.emulation_store.SqlEmulationStore``)."""

    def save_order(self, order: ManagedOrder) -> None: ...

    def load_active_orders(self) -> list[ManagedOrder]: ...

    def load_orders(self, client_order_ids: Sequence[str]) -> list[ManagedOrder]: ...

    def save_list(self, order_list: EmulatedOrderList) -> None: ...

    def load_active_lists(self) -> list[EmulatedOrderList]: ...


class MemoryEmulationStore:
    """In-process store (tests, backtests). Keeps JSON copies, so a restore really deserialises."""

    def __init__(self) -> None:
        self.orders: dict[str, str] = {}
        self.lists: dict[str, tuple[str, bool]] = {}

    def save_order(self, order: ManagedOrder) -> None:
        self.orders[order.client_order_id] = json.dumps(order.to_json())

    def load_active_orders(self) -> list[ManagedOrder]:
        loaded = [ManagedOrder.from_json(json.loads(text)) for text in self.orders.values()]
        return [o for o in loaded if not o.status.is_terminal]

    def load_orders(self, client_order_ids: Sequence[str]) -> list[ManagedOrder]:
        return [ManagedOrder.from_json(json.loads(self.orders[c])) for c in client_order_ids if c in self.orders]

    def save_list(self, order_list: EmulatedOrderList) -> None:
        row = {
            "list_id": order_list.list_id,
            "kind": order_list.kind,
            "account": order_list.account,
            "strategy": order_list.strategy,
            "status": order_list.status,
            "params": order_list.to_json(),
        }
        self.lists[order_list.list_id] = (json.dumps(row), order_list.status == "active")

    def load_active_lists(self) -> list[EmulatedOrderList]:
        out: list[EmulatedOrderList] = []
        for text, active in self.lists.values():
            if active:
                row = json.loads(text)
                out.append(
                    EmulatedOrderList.from_row(
                        row["list_id"], row["kind"], row["account"], row["strategy"], row["status"], row["params"]
                    )
                )
        return out


# --- price logic (pure) ------------------------------------------------------------------------


def trailing_stop_level(intent: OrderIntent, extreme: Decimal) -> Decimal:
    """The trailing stop's trigger for the best price ``extreme`` seen since activation."""
    sell = intent.side is Side.SELL
    if intent.trailing_offset is not None:
        return extreme - intent.trailing_offset if sell else extreme + intent.trailing_offset
    assert intent.trailing_offset_pct is not None
    fraction = intent.trailing_offset_pct / _HUNDRED
    return extreme * (1 - fraction) if sell else extreme * (1 + fraction)


def fixed_trigger_hit(intent: OrderIntent, price: Decimal) -> bool:
    """Stop: sell at price <= trigger, buy at >=; take-profit: sell at >=, buy at <= (reached = crossed)."""
    trigger = intent.trigger_price
    assert trigger is not None
    rising = (intent.side is Side.BUY) == (intent.type in _STOPS)
    return price >= trigger if rising else price <= trigger


def bar_path(bar: Bar) -> list[Decimal]:
    """Open → the extreme nearer the open (tie: low first) → the other extreme → close."""
    high_first = (bar.high - bar.open) < (bar.open - bar.low)
    points = [bar.open, bar.high, bar.low, bar.close] if high_first else [bar.open, bar.low, bar.high, bar.close]
    out: list[Decimal] = []
    for p in points:
        if not out or out[-1] != p:
            out.append(p)
    return out


def with_waypoints(path: Sequence[Decimal], triggers: Iterable[Decimal]) -> list[Decimal]:
    """``path`` with the trigger prices each leg passes strictly inside it, in travel order."""
    levels = sorted(set(triggers))
    out: list[Decimal] = []
    previous: Decimal | None = None
    for point in path:
        if previous is not None:
            lo, hi = min(previous, point), max(previous, point)
            inner = [t for t in levels if lo < t < hi]
            out.extend(sorted(inner, reverse=point < previous))
        out.append(point)
        previous = point
    return out


# --- the emulator ------------------------------------------------------------------------------


def _update_fields(update: OrderUpdate) -> tuple[str | None, OrderStatus, Decimal]:
    return update.client_order_id, update.status, update.filled_quantity


class LocalOrderEmulator:
    """Holds emulated orders and order lists locally; see the module docstring for the rules.

    ``submit`` must place the intent *natively* (OMS: write-ahead store + ``adapter.create_order``) and
    never route it back into this emulator; ``cancel`` cancels a venue order by client order id.
    ``capabilities``: the venue's matrix per account (or per exchange id), used for the children and
    list legs; unknown → ``BASIC_CAPABILITIES``. ``instruments`` (optional, by (exchange, symbol))
    refines routing by market type and rounds child quantities.
    """

    def __init__(
        self,
        store: EmulationStore,
        clock: Callable[[], datetime],
        submit: Submit,
        cancel: Cancel,
        *,
        capabilities: Mapping[str, Capabilities] | None = None,
        instruments: Mapping[tuple[str, str], Instrument] | None = None,
        position: PositionOf | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._submit = submit
        self._cancel = cancel
        self._capabilities = dict(capabilities or {})
        self._instruments = dict(instruments or {})
        self._position = position
        self._orders: dict[str, ManagedOrder] = {}
        self._lists: dict[str, EmulatedOrderList] = {}
        self._child_parent: dict[str, str] = {}
        self._last: dict[tuple[str, str], Decimal] = {}
        self._bid: dict[tuple[str, str], Decimal] = {}
        self._ask: dict[tuple[str, str], Decimal] = {}
        self._triggering: set[str] = set()

    # --- views -------------------------------------------------------------------------------

    def get(self, client_order_id: str) -> ManagedOrder:
        return self._orders[client_order_id]

    def orders(self, *, active: bool = True) -> list[ManagedOrder]:
        return [o for o in self._orders.values() if not active or not o.status.is_terminal]

    def order_list(self, list_id: str) -> EmulatedOrderList:
        return self._lists[list_id]

    def parent_of(self, child_client_order_id: str) -> str | None:
        """The managed order a child belongs to (the OMS stores it as ``parent_client_order_id``)."""
        parent = self._child_parent.get(child_client_order_id)
        return None if parent == child_client_order_id else parent

    def capabilities_for(self, intent: OrderIntent) -> Capabilities:
        return self._capabilities.get(intent.account) or self._capabilities.get(intent.exchange) or BASIC_CAPABILITIES

    def last_price(self, exchange: str, symbol: str) -> Decimal | None:
        return self._last.get((exchange, symbol))

    # --- adding --------------------------------------------------------------------------------

    async def add(self, intent: OrderIntent, client_order_id: str | None = None) -> ManagedOrder:
        """Hold ``intent`` locally (stop / take-profit / trailing until triggered; iceberg, GTD,
        post-only and reduce-only emulation start working at once)."""
        coid = client_order_id or intent.client_order_id
        if coid in self._orders:
            return self._orders[coid]  # a replayed add: idempotent
        self._check_emulatable(intent)
        order = ManagedOrder(client_order_id=coid, intent=intent, quantity=intent.quantity)
        self._orders[coid] = order
        await self._start(order)
        return order

    async def add_list(self, kind: ListKind, intents: Sequence[OrderIntent], list_id: str) -> EmulatedOrderList:
        """OCO (legs placed at once, one fill or trigger cancels the others) or bracket
        (``[entry, take_profit, stop_loss]``; exits placed for the entry's fill)."""
        if list_id in self._lists:
            return self._lists[list_id]
        if kind == "bracket" and len(intents) != 3:
            raise InvalidOrderError("a bracket is [entry, take_profit, stop_loss]", reason="bad_order_list")
        if kind == "oco" and len(intents) < 2:
            raise InvalidOrderError("an OCO needs at least two legs", reason="bad_order_list")
        accounts = {(i.account, i.exchange, i.symbol) for i in intents}
        if len(accounts) != 1:
            raise InvalidOrderError("all legs of a list trade one symbol of one account", reason="bad_order_list")
        if kind == "bracket":
            entry, take_profit, stop_loss = intents
            if take_profit.side is entry.side or stop_loss.side is entry.side:
                raise InvalidOrderError("bracket exits trade against the entry", reason="bad_order_list")
            roles = ["entry", "take_profit", "stop_loss"]
        else:
            roles = ["leg"] * len(intents)
        order_list = EmulatedOrderList(
            list_id=list_id,
            kind=kind,
            account=intents[0].account,
            strategy=intents[0].strategy,
            legs=[i.client_order_id for i in intents],
        )
        self._lists[list_id] = order_list
        self._store.save_list(order_list)
        members: list[ManagedOrder] = []
        for intent, role in zip(intents, roles, strict=True):
            mode = route(intent, self.capabilities_for(intent), self._instrument(intent))
            if mode == "emulated":
                self._check_emulatable(intent)
            status = EmulatedStatus.HELD if role in ("take_profit", "stop_loss") else EmulatedStatus.PENDING
            member = ManagedOrder(
                client_order_id=intent.client_order_id,
                intent=intent,
                quantity=intent.quantity,
                mode=mode,
                status=status,
                list_id=list_id,
                role=role,
            )
            self._orders[member.client_order_id] = member
            members.append(member)
            self._store.save_order(member)
        for member in members:
            if member.status is EmulatedStatus.PENDING:
                await self._start(member)
        return order_list

    def _check_emulatable(self, intent: OrderIntent) -> None:
        if intent.display_quantity is not None and intent.time_in_force in (TimeInForce.IOC, TimeInForce.FOK):
            raise InvalidOrderError(
                f"an emulated iceberg cannot be {intent.time_in_force.value}", reason="unsupported_emulation"
            )

    def _instrument(self, intent: OrderIntent) -> Instrument | None:
        return self._instruments.get((intent.exchange, intent.symbol))

    async def _start(self, order: ManagedOrder) -> None:
        """PENDING/HELD → waiting for a trigger, or working at once."""
        if order.mode == "native" or order.intent.type not in _TRIGGERED:
            await self._go_working(order, price=None)
            return
        order.status = EmulatedStatus.PENDING
        self._store.save_order(order)
        last = self._last.get(order.symbol_key)
        if last is not None:
            await self._observe(order, [last])

    # --- cancelling ----------------------------------------------------------------------------

    async def cancel(self, client_order_id: str, reason: str | None = "cancelled") -> ManagedOrder:
        """Cancel a managed order (and its live children). For a list leg this cancels that leg only."""
        order = self._orders[client_order_id]
        await self._finish(order, EmulatedStatus.CANCELLED, reason)
        if order.list_id is not None:
            await self._on_leg_change(order)
        return order

    async def cancel_list(self, list_id: str, reason: str | None = "cancelled") -> EmulatedOrderList:
        order_list = self._lists[list_id]
        for coid in order_list.legs:
            await self._finish(self._orders[coid], EmulatedStatus.CANCELLED, reason)
        self._close_list(order_list)
        return order_list

    async def cancel_all(self, reason: str | None = "cancelled") -> list[ManagedOrder]:
        """Cancel everything (kill switch halt)."""
        out = []
        for order in list(self._orders.values()):
            if not order.status.is_terminal:
                await self._finish(order, EmulatedStatus.CANCELLED, reason)
                out.append(order)
        for order_list in self._lists.values():
            self._close_list(order_list)
        return out

    async def _finish(self, order: ManagedOrder, status: EmulatedStatus, reason: str | None) -> None:
        if order.status.is_terminal:
            return
        order.status = status
        order.reason = reason
        self._store.save_order(order)
        await self._cancel_children(order)

    async def _cancel_children(self, order: ManagedOrder) -> None:
        for child in order.live_children:
            if child.cancel_requested:
                continue
            child.cancel_requested = True
            self._store.save_order(order)
            result: OrderUpdate | None = None
            # Filled or unknown meanwhile: the order events will tell what happened.
            with contextlib.suppress(MelticaError):
                result = await self._cancel(child.client_order_id)
            if result is not None:
                await self.on_order_event(result)

    # --- market data ---------------------------------------------------------------------------

    async def on_market(self, item: MarketItem) -> None:
        """A trade, bar or book: update prices, run triggers, expire GTD orders."""
        key = (item.exchange, item.symbol)
        waiting = [
            o
            for o in self._orders.values()
            if o.status is EmulatedStatus.PENDING and o.symbol_key == key and o.mode == "emulated"
        ]
        if isinstance(item, Trade):
            self._last[key] = item.price
            for order in waiting:
                await self._observe(order, [item.price])
        elif isinstance(item, Bar):
            self._last[key] = item.close
            path = bar_path(item)
            fixed = [o.intent.trigger_price for o in waiting if o.intent.trigger_price is not None]
            for order in waiting:
                await self._observe(order, with_waypoints(path, fixed))
        else:
            if item.best_bid is not None:
                self._bid[key] = item.best_bid.price
            if item.best_ask is not None:
                self._ask[key] = item.best_ask.price
            for order in waiting:
                level = item.best_bid if order.intent.side is Side.SELL else item.best_ask
                if level is not None:
                    await self._observe(order, [level.price])
        await self.advance()

    async def advance(self) -> list[ManagedOrder]:
        """Time moved: expire GTD orders whose ``expire_at`` has passed (``<=`` now)."""
        now = self._clock()
        expired = []
        for order in list(self._orders.values()):
            expire_at = order.intent.expire_at
            if order.status.is_terminal or expire_at is None or expire_at > now:
                continue
            if order.mode == "native":
                continue  # the venue expires it
            await self._finish(order, EmulatedStatus.EXPIRED, "expired (GTD)")
            expired.append(order)
            if order.list_id is not None:
                await self._on_leg_change(order)
        return expired

    async def _observe(self, order: ManagedOrder, points: Sequence[Decimal]) -> None:
        """Walk ``points`` for one waiting order; trigger it at the first point that hits."""
        if order.client_order_id in self._triggering:
            return
        for price in points:
            if order.status is not EmulatedStatus.PENDING:
                return
            if self._hits(order, price):
                self._triggering.add(order.client_order_id)
                try:
                    await self._go_working(order, price=price)
                finally:
                    self._triggering.discard(order.client_order_id)
                return

    def _hits(self, order: ManagedOrder, price: Decimal) -> bool:
        intent = order.intent
        if intent.type is not OrderType.TRAILING_STOP:
            return fixed_trigger_hit(intent, price)
        sell = intent.side is Side.SELL
        if not order.activated:
            activation = intent.activation_price
            if activation is None or (price <= activation if sell else price >= activation):
                order.activated = True
                order.extreme = price
                self._store.save_order(order)
            return False
        assert order.extreme is not None
        better = price > order.extreme if sell else price < order.extreme
        if better:
            order.extreme = price
            self._store.save_order(order)  # the peak must survive a restart
        level = trailing_stop_level(intent, order.extreme)
        return price <= level if sell else price >= level

    # --- working: children ---------------------------------------------------------------------

    async def _go_working(self, order: ManagedOrder, price: Decimal | None) -> None:
        order.status = EmulatedStatus.WORKING
        if price is not None:
            order.triggered_at = self._clock()
            order.triggered_price = price
        self._store.save_order(order)
        if price is not None and order.list_id is not None:
            await self._on_leg_change(order, triggered=True)
            if order.status.is_terminal:
                return
        await self._place_next_child(order)

    def _child_intent(self, order: ManagedOrder, quantity: Decimal) -> OrderIntent:
        parent = order.intent
        caps = self.capabilities_for(parent)
        instrument = self._instrument(parent)
        order.child_seq += 1
        if order.mode == "native":
            if order.child_seq == 1 and quantity == parent.quantity:
                return parent  # the leg itself, under its own client order id
            return parent.model_copy(
                update={"intent_id": f"{order.client_order_id}.r{order.child_seq}", "quantity": quantity}
            )
        limit = parent.type.needs_price
        tif = parent.time_in_force
        if tif is TimeInForce.GTD and (
            TimeInForce.GTD not in caps.time_in_force
            or (instrument is not None and instrument.market_type is MarketType.SPOT)
        ):
            tif = TimeInForce.GTC  # expired locally at expire_at
        if not limit:
            tif = TimeInForce.GTC
        display = parent.display_quantity if (limit and caps.iceberg) else None
        if display is not None and display >= quantity:
            display = None
        return OrderIntent(
            intent_id=f"{order.client_order_id}.c{order.child_seq}",
            account=parent.account,
            strategy=parent.strategy,
            exchange=parent.exchange,
            symbol=parent.symbol,
            side=parent.side,
            type=OrderType.LIMIT if limit else OrderType.MARKET,
            quantity=quantity,
            price=parent.price if limit else None,
            display_quantity=display,
            post_only=parent.post_only and limit and caps.post_only,
            reduce_only=parent.reduce_only and caps.reduce_only,
            time_in_force=tif,
            expire_at=parent.expire_at if tif is TimeInForce.GTD else None,
            created_at=max(self._clock(), parent.created_at),
        )

    def _next_quantity(self, order: ManagedOrder) -> Decimal:
        remaining = order.remaining
        intent = order.intent
        caps = self.capabilities_for(intent)
        if order.mode == "emulated" and intent.display_quantity is not None and not caps.iceberg:
            remaining = min(remaining, intent.display_quantity)
        if intent.reduce_only and self._position is not None and not caps.reduce_only:
            position = self._position(intent)
            reducible = position if intent.side is Side.SELL else -position
            remaining = min(remaining, max(reducible, Decimal(0)))
        instrument = self._instrument(intent)
        if instrument is not None:
            remaining = instrument.round_quantity(remaining)
        return remaining

    def _would_take(self, intent: OrderIntent) -> bool:
        key = (intent.exchange, intent.symbol)
        assert intent.price is not None
        if intent.side is Side.BUY:
            against = self._ask.get(key, self._last.get(key))
            return against is not None and intent.price >= against
        against = self._bid.get(key, self._last.get(key))
        return against is not None and intent.price <= against

    async def _place_next_child(self, order: ManagedOrder) -> None:
        if order.status is not EmulatedStatus.WORKING or order.live_children:
            return
        quantity = self._next_quantity(order)
        if quantity <= 0:
            status = EmulatedStatus.FILLED if order.remaining <= 0 else EmulatedStatus.CANCELLED
            reason = None if status is EmulatedStatus.FILLED else "reduce_only: nothing left to reduce"
            await self._finish(order, status, reason)
            return
        intent = order.intent
        caps = self.capabilities_for(intent)
        if order.mode == "emulated" and intent.post_only and not caps.post_only and self._would_take(intent):
            await self._finish(order, EmulatedStatus.REJECTED, "post_only: the limit would take liquidity")
            if order.list_id is not None:
                await self._on_leg_change(order)
            return
        child_intent = self._child_intent(order, quantity)
        child = ChildOrder(client_order_id=child_intent.client_order_id, quantity=quantity)
        order.children.append(child)
        self._child_parent[child.client_order_id] = order.client_order_id
        self._store.save_order(order)
        try:
            result = await self._submit(child_intent)
        except MelticaError as exc:  # a refused child ends the emulated order
            child.status = OrderStatus.REJECTED
            status = EmulatedStatus.REJECTED if order.filled == 0 else EmulatedStatus.CANCELLED
            await self._finish(order, status, f"child rejected: {exc}")
            if order.list_id is not None:
                await self._on_leg_change(order)
            return
        await self.on_order_event(result)

    # --- order events ------------------------------------------------------------------------

    async def on_order_event(self, update: OrderUpdate) -> None:
        """The current state of an order the emulator placed (OMS snapshot or venue update)."""
        coid, status, filled = _update_fields(update)
        if coid is None:
            return
        parent_id = self._child_parent.get(coid)
        if parent_id is None:
            return
        order = self._orders[parent_id]
        child = next((c for c in order.children if c.client_order_id == coid), None)
        if child is None:
            return
        before = order.filled
        changed = False
        if filled > child.filled:
            child.filled = filled
            changed = True
        if status is not child.status and not child.status.is_terminal:
            child.status = status
            changed = True
        if not changed:
            return
        self._store.save_order(order)
        if order.filled >= order.quantity:
            order.status = EmulatedStatus.FILLED
            order.reason = None
            self._store.save_order(order)
        elif child.status.is_terminal and not order.status.is_terminal:
            if child.status is OrderStatus.FILLED:
                await self._place_next_child(order)  # iceberg refill, or reduce-only continuation
            elif not child.cancel_requested:
                # The venue ended our child by itself (IOC remainder, market without liquidity, expiry).
                terminal = {
                    OrderStatus.EXPIRED: EmulatedStatus.EXPIRED,
                    OrderStatus.REJECTED: EmulatedStatus.REJECTED if order.filled == 0 else EmulatedStatus.CANCELLED,
                }.get(child.status, EmulatedStatus.CANCELLED)
                await self._finish(order, terminal, f"child {child.status.value} by the venue")
        if order.list_id is not None and (order.filled > before or order.status.is_terminal):
            await self._on_leg_change(order, filled_before=before)

    # --- lists ---------------------------------------------------------------------------------

    async def _on_leg_change(
        self, leg: ManagedOrder, *, triggered: bool = False, filled_before: Decimal | None = None
    ) -> None:
        assert leg.list_id is not None
        order_list = self._lists.get(leg.list_id)
        if order_list is None or order_list.status != "active":
            return
        legs = [self._orders[c] for c in order_list.legs]
        if order_list.kind == "oco":
            acted = triggered or leg.filled > 0 or (leg.status.is_terminal and leg.filled == 0)
            if acted and order_list.winner is None:
                # The first leg to trigger, fill (even partly) or end decides; the ends this causes
                # (the siblings' cancellations coming back) must not decide again.
                order_list.winner = leg.client_order_id
                self._store.save_list(order_list)
                why = f"oco: sibling {leg.client_order_id} {'triggered' if triggered else leg.status.value}"
                for other in legs:
                    if other is not leg:
                        await self._finish(other, EmulatedStatus.CANCELLED, why)
            if all(x.status.is_terminal for x in legs):
                self._close_list(order_list)
            return
        entry, take_profit, stop_loss = legs
        if leg is entry:
            if not entry.status.is_terminal:
                return
            if entry.filled == 0:
                for exit_leg in (take_profit, stop_loss):
                    await self._finish(exit_leg, EmulatedStatus.CANCELLED, "bracket: entry ended unfilled")
                self._close_list(order_list)
                return
            for exit_leg in (take_profit, stop_loss):
                if exit_leg.status is EmulatedStatus.HELD:
                    exit_leg.quantity = entry.filled
                    await self._start(exit_leg)
            return
        other = stop_loss if leg is take_profit else take_profit
        if triggered:
            return  # an emulated exit triggered: the other is reduced/cancelled as it fills
        if leg.status is EmulatedStatus.FILLED or leg.filled >= leg.quantity:
            await self._finish(other, EmulatedStatus.CANCELLED, f"bracket: {leg.role} filled")
        elif leg.status.is_terminal and leg.filled == 0:
            pass  # one exit ended alone (e.g. cancelled by the user): the other keeps protecting
        elif leg.filled > (filled_before or Decimal(0)):
            await self._reduce(other, leg.quantity - leg.filled, f"bracket: {leg.role} partially filled")
        if all(x.status.is_terminal for x in legs):
            self._close_list(order_list)

    async def _reduce(self, order: ManagedOrder, target: Decimal, reason: str) -> None:
        """Bring ``order`` down to ``target`` total quantity (filled included)."""
        if order.status.is_terminal or target >= order.quantity:
            return
        if target <= order.filled:
            await self._finish(order, EmulatedStatus.CANCELLED if order.filled == 0 else EmulatedStatus.FILLED, reason)
            return
        order.quantity = target
        order.reason = reason
        self._store.save_order(order)
        if order.status is EmulatedStatus.WORKING and order.live_children:
            # A live venue order with too much quantity: cancel it, then place the rest again.
            await self._cancel_children(order)
            await self._place_next_child(order)

    def _close_list(self, order_list: EmulatedOrderList) -> None:
        if order_list.status == "done":
            return
        order_list.status = "done"
        self._store.save_list(order_list)

    # --- restart -------------------------------------------------------------------------------

    def restore(self) -> int:
        """Reload active managed orders and lists from the store; returns how many orders came back.

        Trailing peaks, activation and children are as last saved; the next market data continues
        from there. Children's fills during the downtime arrive through ``on_order_event``.
        """
        count = 0
        for order in self._store.load_active_orders():
            if order.client_order_id in self._orders:
                continue
            self._orders[order.client_order_id] = order
            for child in order.children:
                self._child_parent[child.client_order_id] = order.client_order_id
            count += 1
        for order_list in self._store.load_active_lists():
            self._lists.setdefault(order_list.list_id, order_list)
            missing = [c for c in order_list.legs if c not in self._orders]
            # A finished leg is not "active" in the store, but the list's logic needs it.
            for order in self._store.load_orders(missing):
                self._orders[order.client_order_id] = order
                for child in order.children:
                    self._child_parent[child.client_order_id] = order.client_order_id
        return count
