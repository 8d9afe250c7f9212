"""Crash safety against the Binance emulator with a real process kill, and the lost-response knob.

The emulator runs in this test process; the OMS runs in ``crash_worker.py`` subprocesses with
``MELTICA_CRASH_POINT`` set, which ``os._exit(137)``s at exactly that point inside ``OrderManager``.
A fresh worker then runs ``recover()``; the venue and the database must agree, with no duplicate.
Each test gets its own emulator and its own freshly migrated database (the emulator forgets its orders
when it stops, so a database shared between tests would hold orders no venue knows).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.ccxt import CcxtAdapter, RetryPolicy
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.execution import CRASH_POINT_ENV, NEVER_REACHED_VENUE, OrderManager, OrderStore
from meltica.execution import RetryPolicy as OmsRetry
from meltica.storage import migrate
from meltica.storage.engine import make_engine
from tests.integration.databases import drop_test_database

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
TRADES = DATA / "btcusdt-trades.parquet"
KEY, SECRET = "crash-key", "crash-secret"
WORKER = Path(__file__).with_name("crash_worker.py")
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, max_rate_limit_wait=5)


@pytest.fixture
def database(postgres_endpoint: Any) -> Iterator[tuple[Engine, str]]:
    name = f"meltica_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(postgres_endpoint.url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_endpoint.url_for(name)
    engine = make_engine(url)
    migrate.upgrade(engine)
    try:
        yield engine, url
    finally:
        engine.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            drop_test_database(conn, name)
        admin.dispose()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=180))


def make_intent(**kwargs: Any) -> OrderIntent:
    base: dict[str, Any] = {
        "intent_id": f"crash-{uuid.uuid4().hex[:12]}",
        "account": "main",
        "strategy": "s",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "side": Side.BUY,
        "type": OrderType.LIMIT,
        "quantity": Decimal("0.01"),
        "price": Decimal(30_000),
        "created_at": datetime.now(UTC),
    }
    base.update(kwargs)
    return OrderIntent(**base)


async def started() -> EmulatorServer:
    emu = EmulatorServer(
        EmulatorConfig.single(KEY, SECRET, data=[TRADES], default_balances={"USDT": Decimal(10_000), "BTC": Decimal(1)})
    )
    await emu.start()
    await emu.step(20)  # a last price, so market orders find liquidity
    return emu


def adapter_for(emu: EmulatorServer) -> CcxtAdapter:
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
        retry=FAST,
    )
    assert isinstance(adapter, CcxtAdapter)
    return adapter


async def worker(
    mode: str,
    emu: EmulatorServer,
    db_url: str,
    intent: OrderIntent,
    *,
    crash: str | None = None,
    resend: bool = False,
    extra: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any] | None]:
    env = dict(os.environ)
    env.pop(CRASH_POINT_ENV, None)
    if crash is not None:
        env[CRASH_POINT_ENV] = crash
    args = {
        "db_url": db_url,
        "emulator_url": f"http://127.0.0.1:{emu.port}",
        "api_key": KEY,
        "secret": SECRET,
        "intent": intent.model_dump(mode="json"),
        "resend_unsent": resend,
        **(extra or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        mode,
        json.dumps(args),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    if proc.returncode not in (0, 137):
        raise AssertionError(f"worker failed ({proc.returncode}): {err.decode()[-3000:]}")
    lines = out.decode().strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if proc.returncode == 0 and lines else None)


async def venue_orders(adapter: CcxtAdapter, coid: str) -> list[Any]:
    """Every order of ours on the venue with this client order id (open or not)."""
    from meltica.errors import OrderNotFoundError

    try:
        return [await adapter.fetch_order("BTC/USDT", client_order_id=coid)]
    except OrderNotFoundError:
        return []


def db_order(engine: Engine, coid: str) -> dict[str, Any] | None:
    return OrderStore(engine).order_row(coid)


async def assert_agree(engine: Engine, adapter: CcxtAdapter, coid: str) -> None:
    row = db_order(engine, coid)
    assert row is not None
    on_venue = await venue_orders(adapter, coid)
    assert len(on_venue) == 1
    assert row["status"] == on_venue[0].status.value
    assert row["filled_quantity"] == on_venue[0].filled_quantity
    assert row["exchange_order_id"] == on_venue[0].exchange_order_id
    fills = OrderStore(engine).fills_of(coid)
    assert sum((f["quantity"] for f in fills), Decimal(0)) == on_venue[0].filled_quantity


def open_count(open_orders: list[Any], coid: str) -> int:
    return sum(1 for o in open_orders if o.client_order_id == coid)


def test_crash_after_send_then_recover_finds_the_one_order(database: tuple[Engine, str]) -> None:
    engine, url = database

    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            intent = make_intent()
            code, _ = await worker("submit", emu, url, intent, crash="after_send")
            assert code == 137
            row = db_order(engine, intent.client_order_id)
            assert row is not None and row["status"] == "pending_submit"  # the answer was never stored
            assert open_count(await adapter.fetch_open_orders("BTC/USDT"), intent.client_order_id) == 1

            code, report = await worker("recover", emu, url, intent)
            assert code == 0 and report is not None
            assert report["outcomes"] == {"open": 1}
            await assert_agree(engine, adapter, intent.client_order_id)
            # the replayed intent finds its order: still exactly one on the venue
            code, again = await worker("submit", emu, url, intent)
            assert again == {"status": "open", "filled": "0"}
            assert open_count(await adapter.fetch_open_orders("BTC/USDT"), intent.client_order_id) == 1
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_crash_after_send_of_a_market_order_recovers_its_fills(database: tuple[Engine, str]) -> None:
    engine, url = database

    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            intent = make_intent(type=OrderType.MARKET, price=None, quantity=Decimal("0.002"))
            code, _ = await worker("submit", emu, url, intent, crash="after_send")
            assert code == 137
            code, report = await worker("recover", emu, url, intent)
            assert code == 0 and report is not None
            assert report["outcomes"] == {"filled": 1} and report["fills_added"] >= 1
            await assert_agree(engine, adapter, intent.client_order_id)
            assert db_order(engine, intent.client_order_id)["status"] == "filled"  # type: ignore[index]
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_crash_after_store_default_policy_rejects_and_never_places(database: tuple[Engine, str]) -> None:
    engine, url = database

    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            intent = make_intent()
            code, _ = await worker("submit", emu, url, intent, crash="after_store")
            assert code == 137
            assert db_order(engine, intent.client_order_id)["status"] == "pending_submit"  # type: ignore[index]
            assert await venue_orders(adapter, intent.client_order_id) == []
            code, report = await worker("recover", emu, url, intent)
            assert report is not None and report["outcomes"] == {"never_reached_venue": 1}
            order = OrderStore(engine).get(intent.client_order_id)
            assert order is not None and order.status is OrderStatus.REJECTED and order.reason == NEVER_REACHED_VENUE
            # re-submitting the same intent places nothing: the intent was settled
            code, again = await worker("submit", emu, url, intent)
            assert again is not None and again["status"] == "rejected"
            assert await venue_orders(adapter, intent.client_order_id) == []
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_crash_after_store_resend_policy_places_exactly_one(database: tuple[Engine, str]) -> None:
    engine, url = database

    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            intent = make_intent()
            code, _ = await worker("submit", emu, url, intent, crash="after_store")
            assert code == 137
            code, report = await worker("recover", emu, url, intent, resend=True)
            assert report is not None and report["outcomes"] == {"resent": 1}
            await assert_agree(engine, adapter, intent.client_order_id)
            # a second recovery and a re-submitted intent change nothing
            code, report = await worker("recover", emu, url, intent, resend=True)
            assert report is not None and report["outcomes"] == {"open": 1}
            code, again = await worker("submit", emu, url, intent)
            assert again is not None and again["status"] == "open"
            assert open_count(await adapter.fetch_open_orders("BTC/USDT"), intent.client_order_id) == 1
            await assert_agree(engine, adapter, intent.client_order_id)
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_lost_order_response_is_resolved_by_client_order_id_without_duplicate(database: tuple[Engine, str]) -> None:
    engine, _ = database

    async def body() -> None:
        emu = await started()
        # The adapter's own lost-response handling is off (one attempt, no transient retries), so the
        # OMS sees the ambiguous failure and must resolve it itself.
        adapter = create_adapter(
            "binance",
            account="main",
            credentials={"apiKey": KEY, "secret": SECRET},
            urls={"api": emu.ccxt_urls()},
            options={**CCXT_OPTIONS, "timeout": 2000},
            retry=RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.05),
        )
        assert isinstance(adapter, CcxtAdapter)
        adapter.exchange.timeout = 2000
        try:
            await adapter.connect()
            oms = OrderManager(
                OrderStore(engine),
                {"main": adapter},
                clock=lambda: datetime.now(UTC),
                retry=OmsRetry(max_attempts=3, base_delay=0.01, max_delay=0.05),
            )
            for mode in ("close", "hang"):
                emu.faults.lost_response_mode = mode
                emu.faults.hang_s = 5.0
                emu.faults.lose_next_order_response = 1
                intent = make_intent()
                order = await oms.submit(intent)
                assert order.status is OrderStatus.OPEN, mode
                assert open_count(await adapter.fetch_open_orders("BTC/USDT"), intent.client_order_id) == 1
                await assert_agree(engine, adapter, intent.client_order_id)
                events = [e["event_type"] for e in OrderStore(engine).events_of(intent.client_order_id)]
                assert events[:2] == ["created", "submitted"] and "accepted" in events
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


# --- crashes inside amend and cancel_all --------------------------------------------------------


async def venue_statuses(adapter: CcxtAdapter) -> dict[str, str]:
    """client order id → status of every order on the venue (open or not), from ccxt's ``fetch_orders``."""
    raw = await adapter.exchange.fetch_orders("BTC/USDT")
    return {o["clientOrderId"]: o["status"] for o in raw}


def children(engine: Engine, parent: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT client_order_id, status FROM orders WHERE parent_client_order_id = :p"), {"p": parent}
        )
        return [dict(r._mapping) for r in rows]


def test_crash_before_the_amend_is_sent_leaves_the_original_the_one_live_order(database: tuple[Engine, str]) -> None:
    """The venue never saw the amend: recover() rejects the stored replacement and the original stands
    (at its old price), as an unsent submit is rejected by default — never two live orders."""
    engine, url = database

    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            intent = make_intent()
            code, placed = await worker("submit", emu, url, intent)
            assert placed == {"status": "open", "filled": "0"}
            code, _ = await worker("amend", emu, url, intent, crash="after_amend_request", extra={"price": "29000"})
            assert code == 137
            [replacement] = children(engine, intent.client_order_id)
            assert replacement["status"] == "pending_submit"
            events = [e["event_type"] for e in OrderStore(engine).events_of(intent.client_order_id)]
            assert "amend_requested" in events

            code, report = await worker("recover", emu, url, intent)
            assert code == 0 and report is not None
            assert report["outcomes"] == {"open": 1, "never_reached_venue": 1}
            assert await venue_statuses(adapter) == {intent.client_order_id: "open"}
            open_orders = await adapter.fetch_open_orders("BTC/USDT")
            assert [(o.client_order_id, o.price) for o in open_orders] == [(intent.client_order_id, Decimal(30_000))]
            await assert_agree(engine, adapter, intent.client_order_id)
            assert db_order(engine, replacement["client_order_id"])["status"] == "rejected"  # type: ignore[index]
            assert await venue_orders(adapter, replacement["client_order_id"]) == []
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_crash_after_the_amend_was_sent_recovers_one_live_order_at_the_new_price(database: tuple[Engine, str]) -> None:
    engine, url = database

    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            intent = make_intent()
            await worker("submit", emu, url, intent)
            code, _ = await worker(
                "amend", emu, url, intent, crash="after_amend_send", extra={"price": "29000", "quantity": "0.02"}
            )
            assert code == 137
            [replacement] = children(engine, intent.client_order_id)
            rep_id = replacement["client_order_id"]
            assert replacement["status"] == "pending_submit"  # the venue's answer was never stored
            assert db_order(engine, intent.client_order_id)["status"] == "open"  # type: ignore[index]

            code, report = await worker("recover", emu, url, intent)
            assert code == 0 and report is not None, report
            # the venue cancel-replaced: the original cancelled, the replacement the one open order
            assert await venue_statuses(adapter) == {intent.client_order_id: "canceled", rep_id: "open"}
            # exactly one live order on the venue, at the new price and quantity, and the database agrees
            open_orders = await adapter.fetch_open_orders("BTC/USDT")
            assert len(open_orders) == 1
            live = open_orders[0]
            assert (live.price, live.quantity) == (Decimal(29_000), Decimal("0.02"))
            live_row = db_order(engine, live.client_order_id or "")
            assert live_row is not None and live_row["status"] == "open"
            assert live_row["price"] == Decimal(29_000) and live_row["quantity"] == Decimal("0.02")
            assert live.client_order_id == rep_id
            for coid in (intent.client_order_id, rep_id):
                await assert_agree(engine, adapter, coid)
            # a second recovery changes nothing
            code, report = await worker("recover", emu, url, intent)
            assert report is not None and report["outcomes"] == {"open": 1}
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_crash_midway_through_cancel_all_then_recover_leaves_nothing_resting(database: tuple[Engine, str]) -> None:
    engine, url = database

    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            intents = [make_intent(price=Decimal(30_000 - i * 100)) for i in range(4)]
            for intent in intents:
                await worker("submit", emu, url, intent)
            assert len(await adapter.fetch_open_orders("BTC/USDT")) == 4
            code, _ = await worker("cancel_all", emu, url, intents[0], crash="cancel_all_midway")
            assert code == 137
            statuses = Counter(db_order(engine, i.client_order_id)["status"] for i in intents)  # type: ignore[index]
            # some cancels were answered and stored, the others only requested (sent or not: the venue's
            # answer was never stored)
            assert statuses["cancelled"] >= 1 and statuses["pending_cancel"] >= 1, statuses
            assert statuses["cancelled"] + statuses["pending_cancel"] == 4, statuses

            code, report = await worker("recover", emu, url, intents[0])
            assert code == 0 and report is not None
            assert report["outcomes"] == {"cancelled": statuses["pending_cancel"]}
            assert await adapter.fetch_open_orders("BTC/USDT") == []
            assert await venue_statuses(adapter) == {i.client_order_id: "canceled" for i in intents}
            for intent in intents:
                assert db_order(engine, intent.client_order_id)["status"] == "cancelled"  # type: ignore[index]
                await assert_agree(engine, adapter, intent.client_order_id)
        finally:
            await adapter.close()
            await emu.stop()

    run(body)
