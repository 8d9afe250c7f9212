"""The ccxt adapter (ccxt.pro binance) against the local Binance emulator: full order cycle and faults."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meltica.adapters.base import UserEventKind
from meltica.adapters.ccxt import CcxtAdapter, RetryPolicy, StreamPolicy
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side, client_order_id_for
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.errors import ClockSkewError, ExchangeUnavailableError, OrderNotFoundError, RateLimitError

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
TRADES = DATA / "btcusdt-trades.parquet"
KEY, SECRET = "adapter-key", "adapter-secret"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, max_rate_limit_wait=5)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=60))


def adapter_for(emu: EmulatorServer, **kwargs: Any) -> CcxtAdapter:
    kwargs.setdefault("retry", FAST)
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
        **kwargs,
    )
    assert isinstance(adapter, CcxtAdapter)
    return adapter


def intent(n: int, **kwargs: Any) -> OrderIntent:
    base: dict[str, Any] = {
        "intent_id": f"it-{n}-{id(kwargs)}",
        "account": "main",
        "strategy": "s",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "side": Side.BUY,
        "type": OrderType.LIMIT,
        "quantity": Decimal("0.01"),
        "price": Decimal(30_000),
        "created_at": T0,
    }
    base.update(kwargs)
    return OrderIntent(**base)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


def user_data_sockets(emu: EmulatorServer) -> set[Any]:
    """The emulator's connections that carry a user-data subscription (WebSocket API or listenKey)."""
    return {c for c in emu.hub.connections if c.user_subscriptions or c.listen_account is not None}


async def started(**config: Any) -> EmulatorServer:
    config.setdefault("data", [TRADES])
    config.setdefault("default_balances", {"USDT": Decimal(10_000), "BTC": Decimal(1)})
    emu = EmulatorServer(EmulatorConfig.single(KEY, SECRET, **config))
    await emu.start()
    await emu.step(20)  # a last price, so market orders find liquidity
    return emu


def test_full_cycle_through_the_adapter() -> None:
    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        events: list[Any] = []

        async def collect() -> None:
            async for event in adapter.stream_user_events():
                events.append(event)

        try:
            await adapter.connect()
            assert "BTC/USDT" in await adapter.load_instruments()
            balances = await adapter.fetch_balances()
            assert balances["USDT"].free == Decimal(10_000)
            watcher = asyncio.create_task(collect())
            await wait_for(lambda: bool(user_data_sockets(emu)), "the adapter subscribed to user data")

            mkt = intent(1, type=OrderType.MARKET, price=None)
            filled = await adapter.create_order(mkt, mkt.client_order_id)
            assert filled.status is OrderStatus.FILLED
            assert filled.client_order_id == mkt.client_order_id

            lim = intent(2)
            opened = await adapter.create_order(lim, lim.client_order_id)
            assert opened.status is OrderStatus.OPEN
            assert opened.client_order_id == lim.client_order_id

            stop = intent(
                3,
                side=Side.SELL,
                type=OrderType.STOP_LIMIT,
                price=Decimal(20_000),
                trigger_price=Decimal(20_500),
                quantity=Decimal("0.002"),
            )
            s = await adapter.create_order(stop, stop.client_order_id)
            assert s.type is OrderType.STOP_LIMIT
            ice = intent(4, price=Decimal(29_000), display_quantity=Decimal("0.002"))
            i = await adapter.create_order(ice, ice.client_order_id)
            assert i.raw.get("icebergQty") not in (None, "0", "0.00000000")
            trail = intent(
                5,
                side=Side.SELL,
                type=OrderType.TRAILING_STOP,
                price=None,
                quantity=Decimal("0.001"),
                trailing_offset_pct=Decimal(1),
            )
            t = await adapter.create_order(trail, trail.client_order_id)
            assert t.type is OrderType.TRAILING_STOP

            by_cid = await adapter.fetch_order("BTC/USDT", client_order_id=lim.client_order_id)
            assert by_cid.exchange_order_id == opened.exchange_order_id
            open_ids = {o.client_order_id for o in await adapter.fetch_open_orders("BTC/USDT")}
            assert {lim.client_order_id, stop.client_order_id, ice.client_order_id, trail.client_order_id} <= open_ids

            new_cid = client_order_id_for("amend-1")
            amended = await adapter.amend_order(
                "BTC/USDT", client_order_id=lim.client_order_id, new_client_order_id=new_cid, price=Decimal(31_000)
            )
            assert amended.price == Decimal(31_000)
            assert amended.client_order_id == new_cid
            old = await adapter.fetch_order("BTC/USDT", client_order_id=lim.client_order_id)
            assert old.status is OrderStatus.CANCELLED

            cancelled = await adapter.cancel_order("BTC/USDT", client_order_id=new_cid)
            assert cancelled.status is OrderStatus.CANCELLED
            # Binance's answer names the cancel request in clientOrderId; the order is ours, not a stranger
            assert cancelled.client_order_id == new_cid
            by_exchange_id = await adapter.cancel_order("BTC/USDT", exchange_order_id=s.exchange_order_id)
            assert by_exchange_id.client_order_id == stop.client_order_id
            await adapter.cancel_all_orders("BTC/USDT")
            assert await adapter.fetch_open_orders("BTC/USDT") == []
            with pytest.raises(OrderNotFoundError):
                await adapter.fetch_order("BTC/USDT", client_order_id="mlt-does-not-exist")

            fills = await adapter.fetch_my_trades("BTC/USDT")
            assert any(f.client_order_id == mkt.client_order_id for f in fills)

            await wait_for(
                lambda: {UserEventKind.ORDER, UserEventKind.FILL, UserEventKind.BALANCE} <= {e.kind for e in events},
                "order, fill and balance events on the user stream",
            )
            fill_events = [e.fill for e in events if e.kind is UserEventKind.FILL]
            assert any(f is not None and f.client_order_id == mkt.client_order_id for f in fill_events)
            watcher.cancel()
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_5xx_on_reads_is_retried_and_surfaces_when_persistent() -> None:
    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            emu.faults.fail_next = 2
            assert "USDT" in await adapter.fetch_balances()  # 2 failures, third try succeeds
            emu.faults.fail_next = 10
            with pytest.raises(ExchangeUnavailableError):
                await adapter.fetch_balances()
            emu.faults.fail_next = 0
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_429_and_418_back_off_as_told() -> None:
    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            emu.faults.retry_after_s = 0
            emu.faults.rate_limit_next = 1
            assert "USDT" in await adapter.fetch_balances()
            emu.faults.ban_next = 5
            with pytest.raises(RateLimitError) as info:
                await adapter.fetch_balances()
            assert info.value.reason == "ip_banned"
            assert info.value.retry_after == 0
            emu.faults.ban_next = 0
            emu.faults.retry_after_s = 3600
            emu.faults.rate_limit_next = 1
            with pytest.raises(RateLimitError) as info:  # longer than the policy allows: surfaced
                await adapter.fetch_balances()
            assert info.value.retry_after == 3600
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_clock_skew_resynced_and_retried_once() -> None:
    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            emu.faults.clock_skew_ms = 60_000
            balances = await adapter.fetch_balances()  # -1021 → load_time_difference → retry
            assert "USDT" in balances
            assert abs(adapter.exchange.options["timeDifference"]) >= 50_000
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_clock_skew_without_resync_is_a_retryable_clock_error() -> None:
    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            emu.faults.clock_skew_ms = 60_000

            async def no_resync() -> None:
                return None

            adapter.resync_clock = no_resync  # type: ignore[method-assign]
            with pytest.raises(ClockSkewError) as info:
                await adapter.fetch_balances()
            assert info.value.retryable
            assert "-1021" in info.value.message
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_lost_response_resolved_by_client_order_id_without_duplicate() -> None:
    async def body() -> None:
        emu = await started()
        adapter = adapter_for(emu)
        try:
            await adapter.connect()
            emu.faults.lose_next_order_response = 1
            order = intent(10)
            placed = await adapter.create_order(order, order.client_order_id)
            assert placed.client_order_id == order.client_order_id
            assert placed.status is OrderStatus.OPEN
            assert adapter.faults  # the lost response was seen and reported
            mine = [
                o for o in await adapter.fetch_open_orders("BTC/USDT") if o.client_order_id == order.client_order_id
            ]
            assert len(mine) == 1  # executed once, not re-sent
        finally:
            await adapter.close()
            await emu.stop()

    run(body)


def test_dropped_websockets_reconnect_and_resubscribe() -> None:
    async def body() -> None:
        emu = await started()
        adapter = adapter_for(
            emu,
            streams=StreamPolicy(
                stale_after=None, reconnect=RetryPolicy(max_attempts=50, base_delay=0.01, max_delay=0.05)
            ),
        )
        events: list[Any] = []

        async def collect() -> None:
            async for event in adapter.stream_user_events():
                events.append(event)

        try:
            await adapter.connect()
            watcher = asyncio.create_task(collect())
            await wait_for(lambda: bool(user_data_sockets(emu)), "the adapter subscribed to user data")
            before = user_data_sockets(emu)
            assert await emu.drop_websockets() >= len(before) >= 1  # the subscribed socket really was closed
            # Resubscribed on a new socket: a connection the drop did not close carries the subscription.
            await wait_for(lambda: bool(user_data_sockets(emu) - before), "the adapter resubscribed on a new socket")
            order = intent(20)
            await adapter.create_order(order, order.client_order_id)
            await wait_for(
                lambda: any(e.order is not None and e.order.client_order_id == order.client_order_id for e in events),
                "the order's update on the resubscribed stream",
            )
            watcher.cancel()
        finally:
            await adapter.close()
            await emu.stop()

    run(body)
