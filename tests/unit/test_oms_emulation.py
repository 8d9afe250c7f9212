"""The OMS with the LocalOrderEmulator: routing by capability, emulated parents stored write-ahead,
triggered children sent natively through the OMS and linked to their parent, cancel of a held order."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal as D

from meltica.adapters.in_process import InProcessVenue
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side, Trade
from meltica.execution import MemoryOrderStore, OrderManager
from meltica.execution.emulation import LocalOrderEmulator, MemoryEmulationStore
from tests.kit import spot_instrument, trailing_stop_intent

SYMBOL = "BTC/USDT"
T0 = datetime(2024, 1, 10, tzinfo=UTC)


def setup() -> tuple[InProcessVenue, OrderManager, MemoryOrderStore]:
    instrument = spot_instrument(SYMBOL)
    venue = InProcessVenue([instrument], clock=lambda: T0)
    for account in ("alice", "bob"):
        venue.deposit(account, "USDT", D(100_000))
        venue.deposit(account, "BTC", D(2))
    store = MemoryOrderStore()
    adapter = venue.adapter("alice")
    oms = OrderManager(store, {"alice": adapter}, clock=lambda: T0)
    # The emulator's callbacks are the OMS's own: wire it after both exist.
    oms.emulator = LocalOrderEmulator(
        MemoryEmulationStore(),
        lambda: T0,
        oms.submit_native,
        oms.cancel,
        capabilities={"alice": adapter.capabilities},
    )
    return venue, oms, store


def trade(price: str, n: int) -> Trade:
    return Trade(exchange="paper", symbol=SYMBOL, trade_id=f"m{n}", price=D(price), quantity=D(1), ts=T0)


def trailing(intent_id: str) -> OrderIntent:
    return trailing_stop_intent(intent_id, created_at=T0)


def test_emulated_trailing_stop_triggers_a_native_child_linked_to_its_parent() -> None:
    venue, oms, store = setup()

    async def body() -> None:
        bid = OrderIntent(
            intent_id="bob-bid",
            account="bob",
            strategy="x",
            exchange="paper",
            symbol=SYMBOL,
            side=Side.BUY,
            type=OrderType.LIMIT,
            quantity=D(1),
            price=D(39_000),
            created_at=T0,
        )
        await venue.adapter("bob").create_order(bid, bid.client_order_id)
        parent = await oms.submit(trailing("trail-1"))
        assert parent.status is OrderStatus.NEW
        row = store.order_row(parent.client_order_id)
        assert row is not None and row["emulated"] is True
        assert await oms.submit(trailing("trail-1")) == parent  # replay: no second emulated order
        for n, price in enumerate(["40000", "40500", "40300"]):
            await oms.on_market_data(trade(price, n))
        children = [r for r in store.orders.values() if r["parent_client_order_id"] == parent.client_order_id]
        assert len(children) == 1
        child = oms.order(children[0]["client_order_id"])
        assert child.intent.type is OrderType.MARKET and child.status is OrderStatus.FILLED
        assert child.filled_quantity == D("0.1")

    asyncio.run(body())


def test_cancelling_a_held_emulated_order_touches_no_venue() -> None:
    _venue, oms, store = setup()

    async def body() -> None:
        parent = await oms.submit(trailing("trail-2"))
        cancelled = await oms.cancel(parent.client_order_id)
        assert cancelled.status is OrderStatus.CANCELLED
        assert oms.emulator is not None
        await oms.on_market_data(trade("40000", 1))
        await oms.on_market_data(trade("30000", 2))
        assert not [r for r in store.orders.values() if r["parent_client_order_id"] == parent.client_order_id]

    asyncio.run(body())
