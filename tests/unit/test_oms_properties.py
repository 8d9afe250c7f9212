"""Property tests of the OMS's state handling: any delivery of a venue's events — acks, partial
fills, duplicates, fills before the ack, cancels before their fills, stale updates — never leads to an
illegal state or a negative open quantity, filled never exceeds quantity, the stored rows equal the
in-memory order after every step, and once everything is delivered the order agrees with the venue."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meltica.adapters.base import Capabilities, UserEvent, UserEventKind, VenueOrder
from meltica.domain import (
    ALLOWED_TRANSITIONS,
    Fill,
    Order,
    OrderIntent,
    OrderStatus,
    OrderSubmitted,
    OrderType,
    Side,
)
from meltica.execution import MemoryOrderStore, OrderManager, OrderStoreProtocol
from meltica.execution.store import ILLEGAL_TRANSITION

T0 = datetime(2024, 1, 1, tzinfo=UTC)
QTY = D(10)


@dataclass(frozen=True)
class History:
    """What really happened on the venue to one order."""

    fills: tuple[int, ...]  # fill quantities, in venue order
    end: OrderStatus  # OPEN (still working), FILLED, CANCELLED or EXPIRED


@st.composite
def histories(draw: st.DrawFn) -> History:
    fills: list[int] = []
    left = int(QTY)
    for _ in range(draw(st.integers(0, 5))):
        if left == 0:
            break
        q = draw(st.integers(1, left))
        fills.append(q)
        left -= q
    if left == 0:
        return History(tuple(fills), OrderStatus.FILLED)
    end = draw(st.sampled_from([OrderStatus.OPEN, OrderStatus.CANCELLED, OrderStatus.EXPIRED]))
    return History(tuple(fills), end)


def messages(coid: str, history: History) -> list[UserEvent]:
    """The venue's messages in its own order: ack, then per fill an order update and the fill, then
    the terminal update."""

    def update(status: OrderStatus, filled: int) -> UserEvent:
        vo = VenueOrder(
            exchange="paper",
            symbol="BTC/USDT",
            client_order_id=coid,
            exchange_order_id="77",
            status=status,
            side=Side.BUY,
            type=OrderType.LIMIT,
            quantity=QTY,
            filled_quantity=D(filled),
            price=D(100),
        )
        return UserEvent(UserEventKind.ORDER, T0, order=vo)

    out = [update(OrderStatus.OPEN, 0)]
    filled = 0
    for n, q in enumerate(history.fills):
        filled += q
        fill = Fill(
            fill_id=f"{coid[-12:]}-t{n}",  # venue trade ids are unique per venue account
            client_order_id=coid,
            exchange_order_id="77",
            exchange="paper",
            symbol="BTC/USDT",
            side=Side.BUY,
            price=D(100 + n),
            quantity=D(q),
            ts=T0 + timedelta(seconds=n),
        )
        out.append(UserEvent(UserEventKind.FILL, fill.ts, fill=fill))
        status = OrderStatus.FILLED if filled == QTY else OrderStatus.PARTIALLY_FILLED
        out.append(update(status, filled))
    if history.end in (OrderStatus.CANCELLED, OrderStatus.EXPIRED):
        out.append(update(history.end, filled))
    return out


class NoVenue:
    """The OMS never calls the venue while applying user events; any call is a test failure."""

    exchange_id = "paper"
    account = "a"
    capabilities = Capabilities(order_types=frozenset(OrderType), time_in_force=frozenset())

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the OMS called the venue: {name}")


REACHABLE = {OrderStatus.PENDING_SUBMIT} | {s for targets in ALLOWED_TRANSITIONS.values() for s in targets}


def check_invariants(oms: OrderManager, store: OrderStoreProtocol, coid: str, previous: Order) -> Order:
    order = oms.order(coid)
    assert order.status in REACHABLE
    if previous.is_terminal:
        assert order == previous  # nothing moves a terminal order
    assert order.remaining_quantity >= 0
    assert order.filled_quantity <= order.quantity
    assert (order.status is OrderStatus.FILLED) == (order.filled_quantity == order.quantity)
    row = store.order_row(coid)
    assert row is not None
    assert row["status"] == order.status.value
    assert row["filled_quantity"] == order.filled_quantity
    assert row["average_fill_price"] == order.avg_fill_price
    assert row["exchange_order_id"] == order.exchange_order_id
    assert store.get(coid) == order
    fills = store.fills_of(coid)
    assert sorted(f["trade_id"] for f in fills) == sorted(order.fill_ids)
    assert not [e for e in store.events_of(coid) if e["event_type"] == ILLEGAL_TRANSITION]
    return order


def pending_order(store: OrderStoreProtocol, n: int) -> Order:
    intent = OrderIntent(
        intent_id=f"prop-{n}",
        account="a",
        strategy="s",
        exchange="paper",
        symbol="BTC/USDT",
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=QTY,
        price=D(100),
        created_at=T0,
    )
    event = OrderSubmitted(event_id="submitted", client_order_id=intent.client_order_id, ts=T0)
    order = Order.from_intent(intent).apply(event)
    assert store.insert_order(order, event)
    return order


async def deliver_and_check(store: OrderStoreProtocol, n: int, history: History, order_of: list[int]) -> None:
    oms = OrderManager(store, {"a": NoVenue()}, clock=lambda: T0)
    order = pending_order(store, n)
    coid = order.client_order_id
    msgs = messages(coid, history)
    previous = oms.order(coid)
    for index in order_of:
        await oms.on_user_event(msgs[index % len(msgs)], account="a")
        previous = check_invariants(oms, store, coid, previous)
    # now everything once more, in the venue's order: whatever was missing arrives
    for msg in msgs:
        await oms.on_user_event(msg, account="a")
        previous = check_invariants(oms, store, coid, previous)
    final = oms.order(coid)
    assert final.filled_quantity == sum(history.fills)
    assert final.exchange_order_id == "77"
    if history.end is OrderStatus.OPEN:
        expected = OrderStatus.PARTIALLY_FILLED if history.fills else OrderStatus.OPEN
    else:
        expected = history.end
    assert final.status is expected
    # a full replay afterwards changes nothing
    before_events = len(store.events_of(coid))
    for msg in msgs:
        await oms.on_user_event(msg, account="a")
    assert oms.order(coid) == final and len(store.events_of(coid)) == before_events


_counter = iter(range(10**9))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), order_of=st.lists(st.integers(0, 50), max_size=40))
def test_any_delivery_order_with_duplicates_keeps_the_order_legal_and_stored(
    history: History, order_of: list[int]
) -> None:
    asyncio.run(deliver_and_check(MemoryOrderStore(), next(_counter), history, order_of))


@settings(max_examples=200, deadline=None)
@given(history=histories(), data=st.data())
def test_permutations_of_the_venue_messages_converge_to_the_venue_state(history: History, data: st.DataObject) -> None:
    n = next(_counter)
    count = len(messages("x", history))
    permutation = data.draw(st.permutations(list(range(count))))
    asyncio.run(deliver_and_check(MemoryOrderStore(), n, history, permutation))
