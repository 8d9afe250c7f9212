from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meltica.domain import (
    ALLOWED_TRANSITIONS,
    CLIENT_ORDER_ID_PATTERN,
    TERMINAL_STATUSES,
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
    OrderStatus,
    OrderSubmitted,
    OrderType,
    Side,
    client_order_id_for,
    parse_order_event,
    transition,
)
from meltica.errors import DataValidationError, IllegalStateTransitionError

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def intent(**overrides: Any) -> OrderIntent:
    fields: dict[str, Any] = {
        "intent_id": "intent-1",
        "account": "main",
        "strategy": "sma",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "side": "buy",
        "type": "limit",
        "quantity": "1",
        "price": "100",
        "created_at": T0,
    }
    fields.update(overrides)
    return OrderIntent(**fields)


# --- intents ---------------------------------------------------------------------------------


def test_client_order_id_is_deterministic_and_venue_safe() -> None:
    cid = client_order_id_for("intent-1")
    assert cid == client_order_id_for("intent-1") == intent().client_order_id
    assert cid != client_order_id_for("intent-2")
    assert cid.startswith("mlt-")
    assert len(cid) == 36


@given(st.text(min_size=1, max_size=200))
def test_client_order_id_always_matches_binance_rule(intent_id: str) -> None:
    assert CLIENT_ORDER_ID_PATTERN.match(client_order_id_for(intent_id))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"price": None}, "a limit order needs a price"),
        ({"type": "market"}, "a market order takes no price"),
        ({"type": "stop_market", "price": None}, "a stop_market order needs a trigger_price"),
        ({"type": "stop_limit"}, "a stop_limit order needs a trigger_price"),
        ({"trigger_price": "90"}, "trigger_price is only for stop and take-profit orders"),
        ({"type": "trailing_stop", "price": None}, "exactly one of trailing_offset or trailing_offset_pct"),
        (
            {"type": "trailing_stop", "price": None, "trailing_offset": "5", "trailing_offset_pct": "1"},
            "exactly one of trailing_offset or trailing_offset_pct",
        ),
        ({"type": "trailing_stop", "price": None, "trailing_offset_pct": "150"}, "must be below 100"),
        ({"trailing_offset": "5"}, "trailing_offset only apply to trailing_stop orders"),
        ({"display_quantity": "1"}, "display_quantity 1 must be below quantity 1"),
        ({"type": "market", "price": None, "display_quantity": "0.1"}, "iceberg) needs a limit-priced order"),
        ({"type": "market", "price": None, "post_only": True}, "post_only needs a limit-priced order"),
        ({"post_only": True, "time_in_force": "IOC"}, "post_only cannot be combined with time_in_force IOC"),
        ({"post_only": True, "time_in_force": "FOK"}, "post_only cannot be combined with time_in_force FOK"),
        ({"time_in_force": "GTD"}, "time_in_force GTD needs expire_at"),
        ({"time_in_force": "GTD", "expire_at": T0}, "expire_at must be after created_at"),
        ({"expire_at": T0 + timedelta(hours=1)}, "expire_at needs time_in_force GTD"),
        ({"quantity": "0"}, "must be > 0"),
        ({"quantity": "-1"}, "must be > 0"),
        ({"price": "NaN"}, "NaN and infinity are not allowed"),
        ({"created_at": datetime(2024, 1, 1)}, "naive datetime"),  # noqa: DTZ001
        ({"intent_id": ""}, "at least 1 character"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_intent_validation_messages(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        intent(**overrides)


def test_valid_intents_of_every_kind() -> None:
    assert intent(type="market", price=None).type is OrderType.MARKET
    assert intent(type="stop_limit", trigger_price="95").trigger_price == Decimal(95)
    assert intent(type="take_profit", price=None, trigger_price="120").trigger_price == Decimal(120)
    trailing = intent(type="trailing_stop", price=None, trailing_offset_pct="1.5", activation_price="110")
    assert trailing.trailing_offset_pct == Decimal("1.5")
    iceberg = intent(display_quantity="0.1", post_only=True)
    assert iceberg.is_iceberg
    gtd = intent(time_in_force="GTD", expire_at=T0 + timedelta(hours=1))
    assert gtd.expire_at is not None
    assert intent(price=100.1).price == Decimal("100.1")  # float through str()


def test_intent_is_immutable_and_round_trips_as_json() -> None:
    it = intent()
    with pytest.raises(ValidationError):
        it.quantity = Decimal(2)  # type: ignore[misc]
    assert OrderIntent.model_validate_json(it.model_dump_json()) == it


# --- state machine ---------------------------------------------------------------------------


def test_transition_table_terminal_states_are_absorbing() -> None:
    for status in TERMINAL_STATUSES:
        assert ALLOWED_TRANSITIONS[status] == frozenset()
        for target in OrderStatus:
            with pytest.raises(IllegalStateTransitionError, match="terminal"):
                transition(status, target)
    assert set(ALLOWED_TRANSITIONS) == set(OrderStatus)
    assert transition(OrderStatus.NEW, OrderStatus.PENDING_SUBMIT) is OrderStatus.PENDING_SUBMIT
    with pytest.raises(IllegalStateTransitionError, match="from new to filled"):
        transition(OrderStatus.NEW, OrderStatus.FILLED)


def _fill(order: Order, fill_id: str, qty: str, price: str = "100", side: Side | None = None) -> OrderFilled:
    cid = order.client_order_id
    fill = Fill(
        fill_id=fill_id,
        client_order_id=cid,
        exchange="binance",
        symbol="BTC/USDT",
        side=side or order.side,
        price=price,
        quantity=qty,
        ts=T0,
    )
    return OrderFilled(event_id=f"e-{fill_id}", client_order_id=cid, ts=T0, fill=fill)


def _ev(cls: type[OrderEvent], order: Order, **fields: Any) -> Any:
    return cls(event_id="e", client_order_id=order.client_order_id, ts=T0, **fields)


def test_happy_path_with_partial_fills_and_average_price() -> None:
    order = Order.from_intent(intent(quantity="3"))
    assert order.status is OrderStatus.NEW
    order = order.apply(_ev(OrderSubmitted, order))
    order = order.apply(_ev(OrderAccepted, order, exchange_order_id="123"))
    assert (order.status, order.exchange_order_id) == (OrderStatus.OPEN, "123")
    order = order.apply(_fill(order, "t1", "1", "100"))
    assert order.status is OrderStatus.PARTIALLY_FILLED
    order = order.apply(_fill(order, "t1", "1", "100"))  # replayed fill: no change
    assert order.filled_quantity == 1
    order = order.apply(_fill(order, "t2", "2", "103"))
    assert order.status is OrderStatus.FILLED
    assert order.avg_fill_price == Decimal(102)
    assert order.remaining_quantity == 0
    with pytest.raises(IllegalStateTransitionError, match="terminal"):
        order.apply(_ev(OrderCancelled, order))


def test_overfill_is_impossible() -> None:
    order = Order.from_intent(intent(quantity="1"))
    order = order.apply(_ev(OrderSubmitted, order))
    order = order.apply(_fill(order, "t1", "0.6"))
    with pytest.raises(IllegalStateTransitionError, match="overfill") as info:
        order.apply(_fill(order, "t2", "0.5"))
    assert info.value.reason == "overfill"
    with pytest.raises(ValidationError, match="exceeds quantity"):
        Order.model_validate({**order.model_dump(), "filled_quantity": "2"})


def test_cancel_race_late_ack_and_cancel_reject() -> None:
    order = Order.from_intent(intent(quantity="2"))
    order = order.apply(_ev(OrderSubmitted, order))
    order = order.apply(_ev(OrderCancelRequested, order))
    order = order.apply(_fill(order, "t1", "1"))  # fill raced the cancel
    assert order.status is OrderStatus.PENDING_CANCEL
    order = order.apply(_ev(OrderAccepted, order, exchange_order_id="9"))  # late ack
    assert (order.status, order.exchange_order_id) == (OrderStatus.PENDING_CANCEL, "9")
    order = order.apply(_ev(OrderCancelRejected, order, reason="unknown order"))
    assert order.status is OrderStatus.PARTIALLY_FILLED
    with pytest.raises(IllegalStateTransitionError, match="no cancel is pending"):
        order.apply(_ev(OrderCancelRejected, order, reason="x"))
    order = order.apply(_ev(OrderCancelled, order, reason="user"))
    assert (order.status, order.reason) == (OrderStatus.CANCELLED, "user")


def test_amend() -> None:
    order = Order.from_intent(intent(quantity="2"))
    with pytest.raises(IllegalStateTransitionError, match="only open orders"):
        order.apply(_ev(OrderAmended, order, price="99"))
    order = order.apply(_ev(OrderSubmitted, order)).apply(_ev(OrderAccepted, order, exchange_order_id="1"))
    order = order.apply(_fill(order, "t1", "1"))
    amended = order.apply(_ev(OrderAmended, order, quantity="1.5", price="99"))
    assert (amended.quantity, amended.price, amended.status) == (Decimal("1.5"), Decimal(99), order.status)
    with pytest.raises(IllegalStateTransitionError, match="must exceed filled quantity"):
        order.apply(_ev(OrderAmended, order, quantity="1"))


def test_wrong_order_and_wrong_side_are_refused() -> None:
    order = Order.from_intent(intent()).apply(_ev(OrderSubmitted, Order.from_intent(intent())))
    other = Order.from_intent(intent(intent_id="other"))
    with pytest.raises(DataValidationError, match="is for order"):
        order.apply(_ev(OrderAccepted, other, exchange_order_id="1"))
    with pytest.raises(DataValidationError, match="is a sell"):
        order.apply(_fill(order, "t1", "0.5", side=Side.SELL))


def test_events_parse_by_kind() -> None:
    order = Order.from_intent(intent())
    event = _fill(order, "t1", "0.5")
    assert parse_order_event(event.model_dump_json()) == event
    rejected = _ev(OrderRejected, order, reason="insufficient balance")
    assert parse_order_event(rejected.model_dump(mode="json")) == rejected


_EVENT_KINDS = [
    "submitted",
    "accepted",
    "rejected",
    "fill",
    "cancel_requested",
    "cancel_rejected",
    "cancelled",
    "expired",
    "amended",
    "replay",
]


@settings(max_examples=300)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(_EVENT_KINDS), st.integers(min_value=1, max_value=6)),
        max_size=25,
    )
)
def test_random_event_sequences_never_break_the_order(steps: list[tuple[str, int]]) -> None:
    order = Order.from_intent(intent(quantity="10"))
    fills = 0
    for kind, n in steps:
        before = order
        cid = order.client_order_id
        base: dict[str, Any] = {"event_id": f"e{fills}", "client_order_id": cid, "ts": T0}
        event: OrderEvent
        if kind == "fill":
            fills += 1
            event = _fill(order, f"t{fills}", str(n))
        elif kind == "replay":
            event = _fill(order, "t1", "1")  # t1's quantity may differ; a replay is recognised by id
        elif kind == "accepted":
            event = OrderAccepted(**base, exchange_order_id="x")
        elif kind == "rejected":
            event = OrderRejected(**base, reason="r")
        elif kind == "cancel_rejected":
            event = OrderCancelRejected(**base, reason="r")
        elif kind == "amended":
            event = OrderAmended(**base, quantity=str(n + 6))
        else:
            event = {
                "submitted": OrderSubmitted,
                "cancel_requested": OrderCancelRequested,
                "cancelled": OrderCancelled,
                "expired": OrderExpired,
            }[kind](**base)
        try:
            order = order.apply(event)
        except IllegalStateTransitionError:
            assert order is before
            continue
        # The snapshot still satisfies every invariant (model_copy skipped validation: re-check).
        Order.model_validate(order.model_dump())
        assert order.filled_quantity <= order.quantity
        if before.status.is_terminal:
            assert order == before  # only idempotent replays get through a terminal state
        elif order.status is not before.status:
            assert order.status in ALLOWED_TRANSITIONS[before.status]


@pytest.mark.parametrize(
    "ts", [T0 + timedelta(seconds=5), datetime(2024, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))]
)
@pytest.mark.parametrize("kind", ["limit", "market"])
def test_announced_is_from_intent_then_submitted(ts: datetime, kind: str) -> None:
    """``Order.announced`` (one step, the backtest's hot path) builds what ``from_intent`` and the
    ``OrderSubmitted`` event build: the same values, the same fields set, the same dump."""
    i = intent() if kind == "limit" else intent(type="market", price=None)
    expected = Order.from_intent(i).apply(
        OrderSubmitted(event_id="submitted", client_order_id=i.client_order_id, ts=ts)
    )
    got = Order.announced(i, ts)
    assert got == expected and got.__dict__ == expected.__dict__
    assert got.model_fields_set == expected.model_fields_set
    assert got.model_dump(exclude_unset=True) == expected.model_dump(exclude_unset=True)
    assert got.status is OrderStatus.PENDING_SUBMIT


def test_intents_and_snapshots_built_from_valid_values_share_one_fields_set_never_written() -> None:
    """``OrderIntent.from_validated_values`` and ``Order.from_intent`` / ``Order.announced`` give each model
    the one shared set of its field names (``shared_fields_set``): equal to what validation would record,
    and a change (``model_copy``, an applied event) gets a new set, leaving the shared one as it was."""
    from meltica.domain import OrderAccepted, OrderSubmitted, OrderType, Side, TimeInForce
    from meltica.domain.values import is_shared_fields_set

    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    values: dict[str, Any] = {
        "intent_id": "s:1",
        "account": "acct",
        "strategy": "s",
        "exchange": "paper",
        "symbol": "BTC/USDT",
        "side": Side.BUY,
        "type": OrderType.MARKET,
        "quantity": Decimal("0.5"),
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
        "created_at": t0,
    }
    first = OrderIntent.from_validated_values(values)
    second = OrderIntent.from_validated_values({**values, "intent_id": "s:2"})
    assert first is not None and second is not None
    assert first == OrderIntent(**values) and first.model_fields_set == OrderIntent(**values).model_fields_set
    assert first.model_fields_set is second.model_fields_set and is_shared_fields_set(first.model_fields_set)
    names = set(first.model_fields_set)
    changed = first.model_copy(update={"quantity": Decimal(1)})
    assert changed.model_fields_set is not first.model_fields_set and first.model_fields_set == names
    announced = Order.announced(first, t0)
    assert announced == Order.from_intent(first).apply(
        OrderSubmitted(event_id="submitted", client_order_id=first.client_order_id, ts=t0)
    )
    shared = announced.model_fields_set
    assert is_shared_fields_set(shared) and Order.announced(second, t0).model_fields_set is shared
    before = set(shared)
    accepted = announced.apply(
        OrderAccepted(event_id="accepted", client_order_id=first.client_order_id, ts=t0, exchange_order_id="1")
    )
    assert accepted.model_fields_set is not shared and shared == before


@pytest.mark.parametrize("side", ["buy", "sell"])
def test_plain_market_intent_is_the_validated_one_and_refuses_what_validation_would(side: str) -> None:
    """``OrderIntent.plain_market`` (``ctx.buy(symbol, qty)``): the intent ``OrderIntent(**values)`` builds,
    fields set included; ``None`` for anything validation would refuse or change (the caller validates)."""
    from meltica.domain import OrderType, Side, TimeInForce

    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    given: dict[str, Any] = {
        "intent_id": "s:7",
        "account": "acct",
        "strategy": "s",
        "exchange": "paper",
        "symbol": "BTC/USDT",
        "side": Side(side),
        "quantity": Decimal("0.010"),
        "created_at": t0,
    }
    built = OrderIntent.plain_market(**given)
    validated = OrderIntent(**given, type=OrderType.MARKET)
    assert built is not None and built == validated
    assert built.model_fields_set == set(OrderIntent.model_fields)
    assert built.__dict__ == validated.__dict__ and built.time_in_force is TimeInForce.GTC
    refused = [
        {"quantity": Decimal(0)},
        {"quantity": Decimal(-1)},
        {"quantity": Decimal("NaN")},
        {"quantity": 1},
        {"symbol": ""},
        {"symbol": "x" * 129},
        {"intent_id": "i" * 129},
        {"side": side},
        {"created_at": datetime(2024, 1, 1)},  # noqa: DTZ001 (naive on purpose)
        {"created_at": datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=1)))},
    ]
    for change in refused:
        assert OrderIntent.plain_market(**{**given, **change}) is None, change
