"""Advanced orders end to end: native on the Binance emulator through ccxt, emulated locally against
the same emulator (callbacks are real adapter calls), and emulated state surviving a restart in
PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Engine, select, text

from meltica.adapters.base import VenueOrder
from meltica.adapters.ccxt import CcxtAdapter, RetryPolicy
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side, Trade
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.execution.emulation import EmulatedOrderList, EmulatedStatus, LocalOrderEmulator, ManagedOrder, route
from meltica.execution.emulation_store import SqlEmulationStore
from meltica.storage import migrate
from meltica.storage import tables as t
from meltica.storage.engine import make_engine
from tests.integration.databases import drop_test_database

pytestmark = pytest.mark.integration

TRADES = Path(__file__).resolve().parents[1] / "data" / "binance" / "btcusdt-trades.parquet"
KEY, SECRET = "adv-key", "adv-secret"
SYMBOL = "BTC/USDT"
WARMUP = 200
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, max_rate_limit_wait=5)
PRICES = [D(str(p)) for p in pd.read_parquet(TRADES)["price"]]


def run(body: Awaitable[None]) -> None:
    async def main() -> None:
        await asyncio.wait_for(body, timeout=240)

    asyncio.run(main())


def intent(side: Side, kind: OrderType, qty: str = "0.002", **kw: Any) -> OrderIntent:
    return OrderIntent(
        intent_id=f"adv-{uuid.uuid4().hex[:12]}",
        account="main",
        strategy="adv",
        exchange="binance",
        symbol=SYMBOL,
        side=side,
        type=kind,
        quantity=D(qty),
        created_at=datetime(2021, 1, 8, tzinfo=UTC),
        **kw,
    )


class Venue:
    """The emulator server, a ccxt adapter on it, and the recorded trades it replays."""

    def __init__(self, emu: EmulatorServer, adapter: CcxtAdapter) -> None:
        self.emu = emu
        self.adapter = adapter
        df = pd.read_parquet(TRADES)
        self.trades = [
            Trade(
                exchange="binance",
                symbol=SYMBOL,
                trade_id=str(r.trade_id),
                price=D(str(r.price)),
                quantity=D(str(r.quantity)),
                ts=r.timestamp.to_pydatetime(),
            )
            for r in df.itertuples()
        ]
        self.cursor = WARMUP

    def engine_status(self, coid: str) -> str:
        return self.emu.engine.get_order("main", "BTCUSDT", client_order_id=coid).status.value

    async def step_until(
        self, done: Callable[[], bool], on_trade: Callable[[Trade], Awaitable[None]] | None = None, limit: int = 2000
    ) -> int | None:
        """Replay one recorded trade at a time; the index of the trade after which ``done()``."""
        while self.cursor < len(self.trades) and limit > 0:
            limit -= 1
            await self.emu.step(1)
            trade = self.trades[self.cursor]
            self.cursor += 1
            if on_trade is not None:
                await on_trade(trade)
            if done():
                return self.cursor - 1
        return None


async def started() -> Venue:
    config = EmulatorConfig.single(KEY, SECRET, data=[TRADES], default_balances={"USDT": D(100_000), "BTC": D(2)})
    emu = EmulatorServer(config)
    await emu.start()
    await emu.step(WARMUP)
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
        retry=FAST,
    )
    assert isinstance(adapter, CcxtAdapter)
    await adapter.connect()
    return Venue(emu, adapter)


async def stopped(venue: Venue) -> None:
    await venue.adapter.close()
    await venue.emu.stop()


def future_low(n: int = 600) -> D:
    return min(PRICES[WARMUP : WARMUP + n])


def future_high(n: int = 600) -> D:
    return max(PRICES[WARMUP : WARMUP + n])


# --- native on the emulator -------------------------------------------------------------------


def test_native_advanced_orders_on_the_emulator_through_ccxt() -> None:
    async def body() -> None:
        venue = await started()
        try:
            caps = venue.adapter.capabilities
            instrument = venue.adapter.instrument(SYMBOL)
            last = PRICES[WARMUP - 1]
            low, high = future_low(), future_high()
            orders = {
                "stop_market": intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=low + D("0.01")),
                "stop_limit": intent(Side.SELL, OrderType.STOP_LIMIT, trigger_price=low + D("0.01"), price=low - D(50)),
                "take_profit": intent(Side.SELL, OrderType.TAKE_PROFIT, trigger_price=high - D("0.01")),
                "take_profit_limit": intent(
                    Side.SELL, OrderType.TAKE_PROFIT_LIMIT, trigger_price=high - D("0.01"), price=high - D(50)
                ),
                "trailing_pct": intent(Side.SELL, OrderType.TRAILING_STOP, trailing_offset_pct=D("0.01")),
            }
            for name, it in orders.items():
                assert route(it, caps, instrument) == "native", name
                placed = await venue.adapter.create_order(it, it.client_order_id)
                assert placed.status is OrderStatus.OPEN, name
            assert last > low
            coids = [it.client_order_id for it in orders.values()]
            await venue.step_until(lambda: all(venue.engine_status(c) == "FILLED" for c in coids))
            for name, it in orders.items():
                fetched = await venue.adapter.fetch_order(SYMBOL, client_order_id=it.client_order_id)
                assert fetched.status is OrderStatus.FILLED, name
        finally:
            await stopped(venue)

    run(body())


def test_native_iceberg_shows_only_its_display_quantity_in_the_book() -> None:
    async def body() -> None:
        venue = await started()
        try:
            price = (PRICES[WARMUP - 1] - D(200)).quantize(D("0.01"))
            ice = intent(Side.BUY, OrderType.LIMIT, "0.05", price=price, display_quantity=D("0.01"))
            assert route(ice, venue.adapter.capabilities, venue.adapter.instrument(SYMBOL)) == "native"
            await venue.adapter.create_order(ice, ice.client_order_id)
            book = await venue.adapter.fetch_order_book(SYMBOL, 100)
            ours = [lvl for lvl in book.bids if lvl.price == price]
            assert [lvl.quantity for lvl in ours] == [D("0.01")]
            fetched = await venue.adapter.fetch_order(SYMBOL, client_order_id=ice.client_order_id)
            assert fetched.quantity == D("0.05")
        finally:
            await stopped(venue)

    run(body())


# --- emulated against the emulator ----------------------------------------------------------------


def emulator_for(venue: Venue, store: Any) -> LocalOrderEmulator:
    async def submit(child: OrderIntent) -> VenueOrder:
        return await venue.adapter.create_order(child, child.client_order_id)

    async def cancel(coid: str) -> VenueOrder:
        return await venue.adapter.cancel_order(SYMBOL, client_order_id=coid)

    return LocalOrderEmulator(
        store,
        lambda: venue.emu.market_now(),
        submit,
        cancel,
        capabilities={"main": venue.adapter.capabilities},
        instruments={("binance", SYMBOL): venue.adapter.instrument(SYMBOL)},
    )


async def sync_children(venue: Venue, emulator: LocalOrderEmulator) -> None:
    """What the user stream would deliver: the venue's state of every live child."""
    for order in emulator.orders():
        for child in order.live_children:
            await emulator.on_order_event(
                await venue.adapter.fetch_order(SYMBOL, client_order_id=child.client_order_id)
            )


@pytest.fixture
def database(postgres_endpoint: Any) -> Iterator[Engine]:
    name = f"meltica_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(postgres_endpoint.url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(postgres_endpoint.url_for(name))
    migrate.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            drop_test_database(conn, name)
        admin.dispose()


def test_emulated_absolute_trailing_stop_survives_a_restart_and_fires_on_the_emulator(database: Engine) -> None:
    offset = D("6")
    # Independent reference: activation at the last price at placement, then peak − offset.
    path = PRICES[WARMUP - 1 :]
    peak, fire = path[0], None
    for i, p in enumerate(path[1:], start=1):
        peak = max(peak, p)
        if p <= peak - offset:
            fire = (i, p)
            break
    assert fire is not None
    half = fire[0] // 2

    async def body() -> None:
        venue = await started()
        try:
            store = SqlEmulationStore(database)
            emulator = emulator_for(venue, store)
            await emulator.on_market(venue.trades[WARMUP - 1])
            trailing = intent(Side.SELL, OrderType.TRAILING_STOP, trailing_offset=offset)
            assert route(trailing, venue.adapter.capabilities) == "emulated"
            await emulator.add(trailing)
            for _ in range(half):
                await venue.emu.step(1)
                await emulator.on_market(venue.trades[venue.cursor])
                venue.cursor += 1
            saved_peak = emulator.get(trailing.client_order_id).extreme
            assert saved_peak == max(path[: half + 1])

            # Restart: a new emulator instance from the same database.
            restarted = emulator_for(venue, SqlEmulationStore(database))
            assert restarted.restore() == 1
            order = restarted.get(trailing.client_order_id)
            assert order.extreme == saved_peak and order.status is EmulatedStatus.PENDING

            async def feed(trade: Trade) -> None:
                await restarted.on_market(trade)

            index = await venue.step_until(lambda: order.status is not EmulatedStatus.PENDING, feed)
            assert index is not None
            assert (index - (WARMUP - 1), order.triggered_price) == fire
            await sync_children(venue, restarted)
            assert order.status is EmulatedStatus.FILLED
            child = order.children[0].client_order_id
            assert venue.engine_status(child) == "FILLED"
            with database.connect() as conn:
                row = conn.execute(
                    select(t.emulated_orders).where(t.emulated_orders.c.client_order_id == trailing.client_order_id)
                ).one()
                assert row.active is False and row.state["status"] == "filled"
                assert (
                    conn.execute(
                        select(t.orders.c.emulated).where(t.orders.c.client_order_id == trailing.client_order_id)
                    ).scalar_one()
                    is True
                )
        finally:
            await stopped(venue)

    run(body())


def test_oco_on_the_emulator_native_take_profit_and_stop_cancel_each_other(database: Engine) -> None:
    async def body() -> None:
        venue = await started()
        try:
            store = SqlEmulationStore(database)
            emulator = emulator_for(venue, store)
            low = future_low(400)
            tp = intent(Side.SELL, OrderType.LIMIT, price=(PRICES[WARMUP - 1] + D(500)).quantize(D("0.01")))
            sl = intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=low + D("0.01"))
            await emulator.add_list("oco", [tp, sl], "oco-int")
            assert emulator.get(sl.client_order_id).mode == "native"  # Binance has STOP_LOSS
            assert venue.engine_status(tp.client_order_id) == "NEW"

            async def feed(trade: Trade) -> None:
                await emulator.on_market(trade)
                if venue.engine_status(sl.client_order_id) == "FILLED":
                    await sync_children(venue, emulator)

            await venue.step_until(lambda: emulator.order_list("oco-int").status == "done", feed)
            assert emulator.get(sl.client_order_id).status is EmulatedStatus.FILLED
            assert venue.engine_status(tp.client_order_id) == "CANCELED"
            with database.connect() as conn:
                status = conn.execute(
                    select(t.order_lists.c.status).where(t.order_lists.c.list_id == "oco-int")
                ).scalar_one()
            assert status == "done"
        finally:
            await stopped(venue)

    run(body())


def test_an_accounts_emulation_store_restores_only_that_accounts_orders_and_lists(database: Engine) -> None:
    """Every account's emulation (one per execution lane) shares the tables: a restart must give each lane
    back its own held orders and lists, not every account's."""
    everyone = SqlEmulationStore(database)
    for account in ("alice", "bob"):
        leg = intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("30000")).model_copy(update={"account": account})
        everyone.save_order(ManagedOrder(client_order_id=leg.client_order_id, intent=leg, quantity=leg.quantity))
        everyone.save_list(
            EmulatedOrderList(
                list_id=f"L-{account}", kind="oco", account=account, strategy="adv", legs=[leg.client_order_id]
            )
        )
    alice = SqlEmulationStore(database, account="alice")
    assert [o.intent.account for o in alice.load_active_orders()] == ["alice"]
    assert [lst.list_id for lst in alice.load_active_lists()] == ["L-alice"]
    assert sorted(o.intent.account for o in everyone.load_active_orders()) == ["alice", "bob"]
    assert sorted(lst.account for lst in everyone.load_active_lists()) == ["alice", "bob"]
