"""``OrderStore`` on real PostgreSQL: the OMS on the paper venue, write-ahead rows, idempotent fills,
append-only events, restart from the database, and the state-handling property test with the database
rows compared to the in-memory order after every step."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from meltica.adapters.in_process import InProcessVenue
from meltica.domain import Instrument, OrderIntent, OrderStatus, OrderType, Side
from meltica.execution import OrderManager, OrderStore, RetryPolicy
from tests.unit.test_oms_properties import History, deliver_and_check, histories

pytestmark = pytest.mark.integration

SYMBOL = "BTC/USDT"
T0 = datetime(2024, 1, 10, tzinfo=UTC)


@pytest.fixture(scope="module")
def engine(module_runtime_database: Engine) -> Engine:
    """A fresh database migrated to head, shared by this module's tests, as the runtime role (the rights the
    application has in production; tests/integration/conftest.py)."""
    return module_runtime_database


def make_venue() -> InProcessVenue:
    instrument = Instrument(
        exchange="paper",
        symbol=SYMBOL,
        base="BTC",
        quote="USDT",
        tick_size=D("0.01"),
        step_size=D("0.00001"),
        min_quantity=D("0.00001"),
        min_notional=D("5"),
    )
    venue = InProcessVenue([instrument], clock=lambda: T0)
    for account in ("alice", "bob"):
        venue.deposit(account, "USDT", D(100_000))
        venue.deposit(account, "BTC", D(2))
    return venue


def intent(side: Side, order_type: OrderType, qty: str, *, account: str = "alice", **kw: Any) -> OrderIntent:
    return OrderIntent(
        intent_id=f"pg-{uuid.uuid4().hex}",
        account=account,
        strategy="s",
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        type=order_type,
        quantity=D(qty),
        created_at=T0,
        **kw,
    )


def test_paper_cycle_on_postgres_and_restart_from_the_database(engine: Engine) -> None:
    venue = make_venue()
    store = OrderStore(engine)

    async def body() -> None:
        adapter = venue.adapter("alice")
        oms = OrderManager(store, {"alice": adapter}, clock=lambda: T0, retry=RetryPolicy(base_delay=0))
        resting = await oms.submit(intent(Side.BUY, OrderType.LIMIT, "0.5", price=D("40000")))
        other = await oms.submit(intent(Side.BUY, OrderType.LIMIT, "0.1", price=D("30000")))
        assert resting.status is OrderStatus.OPEN
        sell = intent(Side.SELL, OrderType.MARKET, "0.2", account="bob")
        await venue.adapter("bob").create_order(sell, sell.client_order_id)
        synced = await oms.sync_order(resting.client_order_id)
        assert synced.status is OrderStatus.PARTIALLY_FILLED and synced.filled_quantity == D("0.2")
        again = await oms.sync_order(resting.client_order_id)  # the same trades again: nothing new
        assert again == synced
        assert len(store.fills_of(resting.client_order_id)) == 1
        amended = await oms.amend(other.client_order_id, price=D("30500"))
        assert amended.status is OrderStatus.OPEN

        # restart: a fresh manager rebuilds the orders from the database
        fresh = OrderManager(OrderStore(engine), {"alice": adapter}, clock=lambda: T0)
        report = await fresh.recover()
        assert {o.client_order_id for o in report.orders} == {resting.client_order_id, amended.client_order_id}
        assert fresh.order(resting.client_order_id) == synced
        for coid in (resting.client_order_id, other.client_order_id, amended.client_order_id):
            row = store.order_row(coid)
            assert row is not None and store.get(coid) == fresh.order(coid)
            assert row["status"] == fresh.order(coid).status.value
            assert row["filled_quantity"] == fresh.order(coid).filled_quantity
        done = await fresh.cancel_all(account="alice")
        assert {o.status for o in done} == {OrderStatus.CANCELLED}

    asyncio.run(body())


def test_insert_is_idempotent_and_order_events_are_append_only(engine: Engine) -> None:
    from meltica.domain import Order, OrderSubmitted

    store = OrderStore(engine)
    it = intent(Side.BUY, OrderType.LIMIT, "1", price=D("100"))
    event = OrderSubmitted(event_id="submitted", client_order_id=it.client_order_id, ts=T0)
    order = Order.from_intent(it).apply(event)
    assert store.insert_order(order, event) is True
    assert store.insert_order(order, event) is False
    assert store.append_event(order, event) is None  # a replayed event writes nothing
    assert [e["seq"] for e in store.events_of(it.client_order_id)] == [1, 2]
    with pytest.raises(DBAPIError), engine.begin() as conn:
        conn.execute(
            text("UPDATE order_events SET status = 'open' WHERE client_order_id = :c"), {"c": order.client_order_id}
        )


_n = iter(range(10**9))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(history=histories(), order_of=st.lists(st.integers(0, 50), max_size=25))
def test_state_handling_property_with_database_rows(engine: Engine, history: History, order_of: list[int]) -> None:
    asyncio.run(deliver_and_check(OrderStore(engine), 10**9 + uuid.uuid4().int % 10**12, history, order_of))
