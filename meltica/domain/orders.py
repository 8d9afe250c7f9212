"""Order intents, the order state machine, order events and the ``Order`` snapshot they update.

An ``OrderIntent`` is what a strategy wants; the risk engine approves or rejects it; the OMS turns an
approved intent into an ``Order`` whose client order id is derived from the intent id, so after a crash
the same intent finds the same order on the venue (DESIGN.md §4). Every change to an order is a
past-tense event; ``Order.apply(event)`` returns the next snapshot and never mutates.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, model_validator

from meltica.domain.enums import (
    TERMINAL_STATUSES,
    LiquiditySide,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
)
from meltica.domain.values import (
    Amount,
    DomainModel,
    NonNegativeDecimal,
    PositiveDecimal,
    UtcDatetime,
    construct,
    shared_fields_set,
)
from meltica.errors import DataValidationError, IllegalStateTransitionError

Identifier = Annotated[str, Field(min_length=1, max_length=128)]

# --- client order ids ------------------------------------------------------------------------

CLIENT_ORDER_ID_PREFIX = "mlt-"
# Binance newClientOrderId; the strictest common venue rule, so one id works everywhere.
CLIENT_ORDER_ID_PATTERN = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")


@lru_cache(maxsize=4096)
def client_order_id_for(intent_id: str) -> str:
    """Deterministic client order id of an intent: ``"mlt-"`` + 32 hex chars of SHA-256 (36 chars).

    128 bits of hash make a collision between two intents practically impossible, and the same intent
    always maps to the same id, which is what makes re-sending after a crash idempotent.
    """
    if not intent_id:
        raise ValueError("intent_id must not be empty")
    return CLIENT_ORDER_ID_PREFIX + hashlib.sha256(intent_id.encode("utf-8")).hexdigest()[:32]


# --- state machine ---------------------------------------------------------------------------

_S = OrderStatus
ALLOWED_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    # NEW → REJECTED / CANCELLED: refused or withdrawn before it was ever sent.
    _S.NEW: frozenset({_S.PENDING_SUBMIT, _S.REJECTED, _S.CANCELLED}),
    # Fills and cancels can arrive before the venue's acknowledgement (user stream vs REST reply).
    _S.PENDING_SUBMIT: frozenset(
        {_S.OPEN, _S.REJECTED, _S.PARTIALLY_FILLED, _S.FILLED, _S.PENDING_CANCEL, _S.CANCELLED, _S.EXPIRED}
    ),
    # OPEN → OPEN is an amendment.
    _S.OPEN: frozenset({_S.OPEN, _S.PARTIALLY_FILLED, _S.FILLED, _S.PENDING_CANCEL, _S.CANCELLED, _S.EXPIRED}),
    _S.PARTIALLY_FILLED: frozenset({_S.PARTIALLY_FILLED, _S.FILLED, _S.PENDING_CANCEL, _S.CANCELLED, _S.EXPIRED}),
    # Fills race the cancel; a rejected cancel returns the order to OPEN / PARTIALLY_FILLED.
    _S.PENDING_CANCEL: frozenset(
        {_S.PENDING_CANCEL, _S.OPEN, _S.PARTIALLY_FILLED, _S.FILLED, _S.CANCELLED, _S.EXPIRED}
    ),
    **{terminal: frozenset() for terminal in TERMINAL_STATUSES},
}


def transition(current: OrderStatus, target: OrderStatus) -> OrderStatus:
    """``target`` if the lifecycle allows ``current → target``, else ``IllegalStateTransitionError``."""
    if target not in ALLOWED_TRANSITIONS[current]:
        why = " (terminal)" if current.is_terminal else ""
        raise IllegalStateTransitionError(
            f"order status cannot go from {current.value}{why} to {target.value}",
            current=current.value,
            target=target.value,
        )
    return target


# --- intents ---------------------------------------------------------------------------------


class OrderIntent(DomainModel):
    """What a strategy wants to trade. Cross-field rules are checked on construction.

    Iceberg: a limit-priced order with ``display_quantity`` (the visible part), not a separate type.
    Trailing stop: exactly one of ``trailing_offset`` (price distance) or ``trailing_offset_pct``
    (percent of price, 0 < pct < 100); ``activation_price`` optional.
    """

    intent_id: Identifier
    account: Identifier
    strategy: Identifier
    exchange: Identifier
    symbol: Identifier
    side: Side
    type: OrderType
    quantity: PositiveDecimal
    price: PositiveDecimal | None = None
    trigger_price: PositiveDecimal | None = None
    trailing_offset: PositiveDecimal | None = None
    trailing_offset_pct: PositiveDecimal | None = None
    activation_price: PositiveDecimal | None = None
    display_quantity: PositiveDecimal | None = None
    post_only: bool = False
    reduce_only: bool = False
    time_in_force: TimeInForce = TimeInForce.GTC
    expire_at: UtcDatetime | None = None
    created_at: UtcDatetime

    @model_validator(mode="after")
    def _check_combination(self) -> OrderIntent:
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def from_validated_values(cls, values: dict[str, Any]) -> OrderIntent | None:
        """The intent ``cls(**values)`` would build, without running pydantic's validation, when every value
        is already what validation keeps as it is (identifiers of 1-128 characters, enum members, finite
        positive ``Decimal``s or ``None``, bools, UTC times) and the cross-field rules hold; else ``None``
        (the caller validates: the same intent, or the same error). ``values`` names every field."""
        for name in _INTENT_IDS:
            v = values[name]
            if type(v) is not str or not 0 < len(v) <= 128:
                return None
        if (
            type(values["side"]) is not Side
            or type(values["type"]) is not OrderType
            or type(values["time_in_force"]) is not TimeInForce
            or type(values["post_only"]) is not bool
            or type(values["reduce_only"]) is not bool
        ):
            return None
        for name in _INTENT_DECIMALS:
            v = values[name]
            if v is None and name != "quantity":
                continue
            if type(v) is not Decimal or not v.is_finite() or v <= 0:
                return None
        for name in ("expire_at", "created_at"):
            v = values[name]
            if v is None and name == "expire_at":
                continue
            if not isinstance(v, datetime) or v.tzinfo is not UTC:
                return None
        # Every field named (``construct`` refuses unknown ones): its fields set is the one shared set of
        # all the names (``shared_fields_set``); fewer: not a full intent, validated by the caller.
        every = len(values) == (_INTENT_FIELD_COUNT if cls is OrderIntent else len(cls.model_fields))
        intent = construct(cls, values, _INTENT_FIELDS if every and cls is OrderIntent else None)
        if not every or cls._problems(intent):
            return None
        return intent

    @classmethod
    def plain_market(
        cls,
        *,
        intent_id: str,
        account: str,
        strategy: str,
        exchange: str,
        symbol: str,
        side: Side,
        quantity: Decimal,
        created_at: datetime,
    ) -> OrderIntent | None:
        """``from_validated_values`` of a market intent with every optional field at its default (GTC, no
        price, trigger, trailing, display quantity or expiry, not post-only or reduce-only): the same intent,
        with only the checks those values need; ``None`` when one fails (the caller validates)."""
        for v in (intent_id, account, strategy, exchange, symbol):
            if type(v) is not str or not 0 < len(v) <= 128:
                return None
        if (
            type(side) is not Side
            or type(quantity) is not Decimal
            or not quantity.is_finite()
            or quantity <= 0
            or not isinstance(created_at, datetime)
            or created_at.tzinfo is not UTC
            or cls is not OrderIntent
        ):
            return None
        return construct(
            cls,
            {
                "intent_id": intent_id,
                "account": account,
                "strategy": strategy,
                "exchange": exchange,
                "symbol": symbol,
                "side": side,
                "type": OrderType.MARKET,
                "quantity": quantity,
                "price": None,
                "trigger_price": None,
                "trailing_offset": None,
                "trailing_offset_pct": None,
                "activation_price": None,
                "display_quantity": None,
                "post_only": False,
                "reduce_only": False,
                "time_in_force": TimeInForce.GTC,
                "expire_at": None,
                "created_at": created_at,
            },
            _INTENT_FIELDS,
        )

    def _problems(self) -> list[str]:
        if (
            self.type is OrderType.MARKET
            and self.price is None
            and self.trigger_price is None
            and self.trailing_offset is None
            and self.trailing_offset_pct is None
            and self.activation_price is None
            and self.display_quantity is None
            and not self.post_only
            and self.expire_at is None
            and self.time_in_force is not TimeInForce.GTD
        ):
            return []  # a plain market order (the common case): none of the rules below can apply
        t = self.type.value
        out: list[str] = []
        if self.type.needs_price and self.price is None:
            out.append(f"a {t} order needs a price")
        if not self.type.needs_price and self.price is not None:
            out.append(f"a {t} order takes no price: it executes at market")
        if self.type.needs_trigger and self.trigger_price is None:
            out.append(f"a {t} order needs a trigger_price")
        if not self.type.needs_trigger and self.trigger_price is not None:
            out.append(f"trigger_price is only for stop and take-profit orders, not {t}")
        trailing_set = [name for name in ("trailing_offset", "trailing_offset_pct") if getattr(self, name) is not None]
        if self.type is OrderType.TRAILING_STOP:
            if len(trailing_set) != 1:
                out.append("a trailing_stop order needs exactly one of trailing_offset or trailing_offset_pct")
            if self.trailing_offset_pct is not None and self.trailing_offset_pct >= 100:
                out.append("trailing_offset_pct is a percentage and must be below 100")
        else:
            extra = [*trailing_set, *(["activation_price"] if self.activation_price is not None else [])]
            if extra:
                out.append(f"{', '.join(extra)} only apply to trailing_stop orders, not {t}")
        if self.display_quantity is not None:
            if not self.type.needs_price:
                out.append(f"display_quantity (iceberg) needs a limit-priced order, not {t}")
            if self.display_quantity >= self.quantity:
                out.append(f"display_quantity {self.display_quantity} must be below quantity {self.quantity}")
        if self.post_only:
            if not self.type.needs_price:
                out.append(f"post_only needs a limit-priced order, not {t}")
            if self.time_in_force in (TimeInForce.IOC, TimeInForce.FOK):
                out.append(f"post_only cannot be combined with time_in_force {self.time_in_force.value}")
        if self.time_in_force is TimeInForce.GTD:
            if self.expire_at is None:
                out.append("time_in_force GTD needs expire_at")
            elif self.expire_at <= self.created_at:
                out.append("expire_at must be after created_at")
        elif self.expire_at is not None:
            out.append(f"expire_at needs time_in_force GTD, not {self.time_in_force.value}")
        return out

    @property
    def client_order_id(self) -> str:
        return client_order_id_for(self.intent_id)

    @property
    def is_iceberg(self) -> bool:
        return self.display_quantity is not None


_INTENT_FIELD_COUNT = len(OrderIntent.model_fields)
_INTENT_FIELDS = shared_fields_set(OrderIntent.model_fields)
_INTENT_IDS = ("intent_id", "account", "strategy", "exchange", "symbol")
_INTENT_DECIMALS = (
    "quantity",
    "price",
    "trigger_price",
    "trailing_offset",
    "trailing_offset_pct",
    "activation_price",
    "display_quantity",
)


# --- fills -----------------------------------------------------------------------------------


class Fill(DomainModel):
    """One execution of (part of) our order. ``fee`` is negative for a rebate."""

    fill_id: Identifier  # the venue's trade id: unique per symbol on the venue
    client_order_id: Identifier
    exchange_order_id: str | None = None
    exchange: Identifier
    symbol: Identifier
    side: Side
    price: PositiveDecimal
    quantity: PositiveDecimal
    fee: Amount = Decimal(0)
    fee_currency: str | None = None
    liquidity: LiquiditySide | None = None
    ts: UtcDatetime

    @property
    def notional(self) -> Decimal:
        return self.price * self.quantity


# --- events ----------------------------------------------------------------------------------


class OrderEvent(DomainModel):
    """Something that happened to one order. ``event_id`` makes replays idempotent downstream."""

    event_id: Identifier
    client_order_id: Identifier
    ts: UtcDatetime


class OrderSubmitted(OrderEvent):
    kind: Literal["submitted"] = "submitted"


class OrderAccepted(OrderEvent):
    kind: Literal["accepted"] = "accepted"
    exchange_order_id: Identifier


class OrderRejected(OrderEvent):
    kind: Literal["rejected"] = "rejected"
    reason: str


class OrderFilled(OrderEvent):
    """A fill; the resulting status (partially filled or filled) follows from the quantities."""

    kind: Literal["filled"] = "filled"
    fill: Fill

    @model_validator(mode="after")
    def _same_order(self) -> OrderFilled:
        if self.fill.client_order_id != self.client_order_id:
            raise ValueError("fill.client_order_id differs from the event's client_order_id")
        return self


class OrderCancelRequested(OrderEvent):
    kind: Literal["cancel_requested"] = "cancel_requested"


class OrderCancelRejected(OrderEvent):
    kind: Literal["cancel_rejected"] = "cancel_rejected"
    reason: str


class OrderCancelled(OrderEvent):
    kind: Literal["cancelled"] = "cancelled"
    reason: str | None = None


class OrderExpired(OrderEvent):
    kind: Literal["expired"] = "expired"


class OrderAmended(OrderEvent):
    """The venue confirmed new terms; fields left ``None`` are unchanged."""

    kind: Literal["amended"] = "amended"
    quantity: PositiveDecimal | None = None
    price: PositiveDecimal | None = None
    trigger_price: PositiveDecimal | None = None


AnyOrderEvent = Annotated[
    OrderSubmitted
    | OrderAccepted
    | OrderRejected
    | OrderFilled
    | OrderCancelRequested
    | OrderCancelRejected
    | OrderCancelled
    | OrderExpired
    | OrderAmended,
    Field(discriminator="kind"),
]
ORDER_EVENT_ADAPTER: TypeAdapter[AnyOrderEvent] = TypeAdapter(AnyOrderEvent)


def parse_order_event(data: object) -> AnyOrderEvent:
    """A dict or JSON string → the concrete order event (the ``kind`` field decides which)."""
    if isinstance(data, str | bytes):
        return ORDER_EVENT_ADAPTER.validate_json(data)
    return ORDER_EVENT_ADAPTER.validate_python(data)


# --- the order snapshot ----------------------------------------------------------------------

_ZERO = Decimal(0)
_FROM_INTENT_FIELDS = frozenset(
    {"intent", "client_order_id", "quantity", "price", "trigger_price", "created_at", "updated_at"}
)
_ANNOUNCED_FIELDS = _FROM_INTENT_FIELDS | {"status"}  # (``updated_at`` is already one of them)


class Order(DomainModel):
    """The current state of one order, derived by applying its events in order.

    ``quantity``/``price``/``trigger_price`` start as the intent's and change only by amendment.
    ``filled_quantity`` never exceeds ``quantity``: an overfilling event raises instead.
    """

    intent: OrderIntent
    client_order_id: Identifier
    exchange_order_id: str | None = None
    status: OrderStatus = OrderStatus.NEW
    quantity: PositiveDecimal
    price: PositiveDecimal | None = None
    trigger_price: PositiveDecimal | None = None
    filled_quantity: NonNegativeDecimal = Decimal(0)
    avg_fill_price: PositiveDecimal | None = None
    fill_ids: tuple[str, ...] = ()
    reason: str | None = None  # why it was rejected / cancelled, when known
    created_at: UtcDatetime
    updated_at: UtcDatetime

    @model_validator(mode="after")
    def _consistent(self) -> Order:
        if self.client_order_id != self.intent.client_order_id:
            raise ValueError("client_order_id is not the one derived from intent.intent_id")
        if self.filled_quantity > self.quantity:
            raise ValueError(f"filled_quantity {self.filled_quantity} exceeds quantity {self.quantity}")
        if (self.filled_quantity > 0) != (self.avg_fill_price is not None):
            raise ValueError("avg_fill_price is set exactly when something is filled")
        if (self.status is OrderStatus.FILLED) != (self.filled_quantity == self.quantity):
            raise ValueError("status is filled exactly when filled_quantity equals quantity")
        return self

    @classmethod
    def from_intent(cls, intent: OrderIntent) -> Order:
        if type(intent) is OrderIntent:
            # The intent was validated when it was built (the hot path: see ``_valid_snapshot``).
            return _valid_snapshot(cls, intent, OrderStatus.NEW, intent.created_at, _FROM_INTENT_FIELDS)
        return cls(
            intent=intent,
            client_order_id=intent.client_order_id,
            quantity=intent.quantity,
            price=intent.price,
            trigger_price=intent.trigger_price,
            created_at=intent.created_at,
            updated_at=intent.created_at,
        )

    @classmethod
    def announced(cls, intent: OrderIntent, ts: datetime) -> Order:
        """``Order.from_intent(intent).apply(OrderSubmitted(client_order_id=..., ts=ts))`` — the order
        announced as ``pending_submit`` at ``ts`` — built in one step when ``intent`` is a plain
        ``OrderIntent`` and ``ts`` a UTC time (the same snapshot: values and fields set), else that way."""
        if type(intent) is not OrderIntent or not isinstance(ts, datetime) or ts.tzinfo is not UTC:
            return cls.from_intent(intent).apply(
                OrderSubmitted(event_id="submitted", client_order_id=intent.client_order_id, ts=ts)
            )
        return _valid_snapshot(cls, intent, OrderStatus.PENDING_SUBMIT, ts, _ANNOUNCED_FIELDS)

    # Convenience views of the intent.
    @property
    def side(self) -> Side:
        return self.intent.side

    @property
    def symbol(self) -> str:
        return self.intent.symbol

    @property
    def exchange(self) -> str:
        return self.intent.exchange

    @property
    def account(self) -> str:
        return self.intent.account

    @property
    def remaining_quantity(self) -> Decimal:
        return self.quantity - self.filled_quantity

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    def _copy_with(self, changes: dict[str, object]) -> Order:
        """``self.model_copy(update=changes)`` without its generic machinery (this is the hot path of
        every order event): a shallow copy of the fields with ``changes`` applied, not validated."""
        new = object.__new__(type(self))
        values = self.__dict__.copy()
        values.update(changes)
        _set = object.__setattr__
        _set(new, "__dict__", values)
        _set(new, "__pydantic_extra__", None)
        _set(new, "__pydantic_fields_set__", self.__pydantic_fields_set__ | changes.keys())
        _set(new, "__pydantic_private__", None)
        return new

    def apply(self, event: OrderEvent) -> Order:
        """The snapshot after ``event``. Raises ``IllegalStateTransitionError`` for an event the
        lifecycle does not allow (anything after a terminal state, an overfill, …). A fill whose
        ``fill_id`` was already applied is a replay and returns ``self`` unchanged."""
        if event.client_order_id != self.client_order_id:
            raise DataValidationError(
                f"event {event.event_id} is for order {event.client_order_id}, not {self.client_order_id}"
            )
        if isinstance(event, OrderFilled):
            return self._apply_fill(event)
        if self.status.is_terminal:
            raise IllegalStateTransitionError(
                f"order {self.client_order_id} is {self.status.value} (terminal): cannot apply {type(event).__name__}",
                current=self.status.value,
            )
        changes: dict[str, object] = {"updated_at": event.ts}
        if isinstance(event, OrderSubmitted):
            target = OrderStatus.PENDING_SUBMIT
        elif isinstance(event, OrderAccepted):
            changes["exchange_order_id"] = event.exchange_order_id
            if self.status in (OrderStatus.PARTIALLY_FILLED, OrderStatus.PENDING_CANCEL):
                # A late acknowledgement (fills or a cancel request got here first) keeps the status.
                return self._copy_with(changes)
            target = OrderStatus.OPEN
        elif isinstance(event, OrderRejected):
            target = OrderStatus.REJECTED
            changes["reason"] = event.reason
        elif isinstance(event, OrderCancelRequested):
            target = OrderStatus.PENDING_CANCEL
        elif isinstance(event, OrderCancelRejected):
            if self.status is not OrderStatus.PENDING_CANCEL:
                raise IllegalStateTransitionError(
                    f"order {self.client_order_id}: cancel rejected but no cancel is pending "
                    f"(status {self.status.value})",
                    current=self.status.value,
                )
            target = OrderStatus.PARTIALLY_FILLED if self.filled_quantity > 0 else OrderStatus.OPEN
        elif isinstance(event, OrderCancelled):
            target = OrderStatus.CANCELLED
            changes["reason"] = event.reason
        elif isinstance(event, OrderExpired):
            target = OrderStatus.EXPIRED
        elif isinstance(event, OrderAmended):
            return self._apply_amend(event)
        else:
            raise DataValidationError(f"unknown order event type {type(event).__name__}")
        changes["status"] = transition(self.status, target)
        # No validation (as model_copy): every change above keeps the invariants by construction.
        return self._copy_with(changes)

    def _apply_fill(self, event: OrderFilled) -> Order:
        fill = event.fill
        if fill.fill_id in self.fill_ids:
            return self
        if fill.side is not self.side:
            raise DataValidationError(
                f"fill {fill.fill_id} is a {fill.side.value} but order {self.client_order_id} is a {self.side.value}"
            )
        filled = self.filled_quantity + fill.quantity
        if filled > self.quantity:
            raise IllegalStateTransitionError(
                f"fill {fill.fill_id} of {fill.quantity} would overfill order {self.client_order_id}: "
                f"{self.filled_quantity} of {self.quantity} already filled",
                reason="overfill",
            )
        if filled == self.quantity:
            target = OrderStatus.FILLED
        elif self.status is OrderStatus.PENDING_CANCEL:
            target = OrderStatus.PENDING_CANCEL  # the cancel is still in flight
        else:
            target = OrderStatus.PARTIALLY_FILLED
        status = transition(self.status, target)
        previous_cost = (self.avg_fill_price or Decimal(0)) * self.filled_quantity
        avg = (previous_cost + fill.price * fill.quantity) / filled
        return self._copy_with(
            {
                "status": status,
                "filled_quantity": filled,
                "avg_fill_price": avg,
                "fill_ids": (*self.fill_ids, fill.fill_id),
                "exchange_order_id": self.exchange_order_id or fill.exchange_order_id,
                "updated_at": event.ts,
            }
        )

    def _apply_amend(self, event: OrderAmended) -> Order:
        if self.status not in (OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED):
            raise IllegalStateTransitionError(
                f"order {self.client_order_id} is {self.status.value}: only open orders can be amended",
                current=self.status.value,
            )
        quantity = event.quantity if event.quantity is not None else self.quantity
        if quantity <= self.filled_quantity:
            raise IllegalStateTransitionError(
                f"amended quantity {quantity} must exceed filled quantity {self.filled_quantity}",
                reason="invalid_amend",
            )
        if event.price is not None and not self.intent.type.needs_price:
            raise IllegalStateTransitionError(
                f"a {self.intent.type.value} order has no price to amend", reason="invalid_amend"
            )
        return self._copy_with(
            {
                "quantity": quantity,
                "price": event.price if event.price is not None else self.price,
                "trigger_price": event.trigger_price if event.trigger_price is not None else self.trigger_price,
                "updated_at": event.ts,
            }
        )


def _valid_snapshot(
    cls: type[Order], intent: OrderIntent, status: OrderStatus, updated_at: datetime, fields_set: frozenset[str]
) -> Order:
    """A snapshot of a validated plain ``OrderIntent``'s order with nothing filled: what ``model_construct``
    builds, without its per-field default lookups (the hot path). Every value already is valid, and the
    snapshot's invariants hold by construction (nothing filled, derived client order id)."""
    order = object.__new__(cls)
    _set = object.__setattr__
    _set(
        order,
        "__dict__",
        {
            "intent": intent,
            "client_order_id": intent.client_order_id,
            "exchange_order_id": None,
            "status": status,
            "quantity": intent.quantity,
            "price": intent.price,
            "trigger_price": intent.trigger_price,
            "filled_quantity": _ZERO,
            "avg_fill_price": None,
            "fill_ids": (),
            "reason": None,
            "created_at": intent.created_at,
            "updated_at": updated_at,
        },
    )
    _set(order, "__pydantic_extra__", None)
    _set(order, "__pydantic_fields_set__", shared_fields_set(fields_set))  # (never written: see there)
    _set(order, "__pydantic_private__", None)
    return order
