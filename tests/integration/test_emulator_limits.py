"""Binance's request-weight and order-count limits, enforced by the emulator, met by ccxt's own binance class
and by Meltica's ccxt adapter (which must back off as told, never get banned for it, and wait out a ban)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
import ccxt
import ccxt.async_support as ccxt_async
import pytest

from meltica.adapters.ccxt import CcxtAdapter, RetryPolicy
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer, ccxt_config
from meltica.emulator.limits import RateLimits
from meltica.errors import RateLimitError

pytestmark = pytest.mark.integration

KEY, SECRET = "limits-key", "limits-secret"
PATIENT = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, max_rate_limit_wait=10)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=45))


def emulator(limits: RateLimits) -> EmulatorServer:
    return EmulatorServer(
        EmulatorConfig.single(
            KEY,
            SECRET,
            rate_limits=limits,
            initial_prices={"BTCUSDT": Decimal(40_000)},
            default_balances={"USDT": Decimal(100_000), "BTC": Decimal(1)},
        )
    )


def adapter_for(emu: EmulatorServer) -> CcxtAdapter:
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
        retry=PATIENT,
    )
    assert isinstance(adapter, CcxtAdapter)
    return adapter


async def window_start(seconds: int) -> None:
    """Until a fresh fixed window has just begun, so a test's burst cannot straddle two windows."""
    while int(datetime.now(UTC).timestamp() * 1000) % (seconds * 1000) > 150:
        await asyncio.sleep(0.005)


async def burst_until(http: aiohttp.ClientSession, url: str, status: int) -> aiohttp.ClientResponse:
    """GET ``url`` until it answers ``status`` (bounded); the last answer."""
    for _ in range(500):
        response = await http.get(url)
        await response.read()
        if response.status == status:
            return response
    raise AssertionError(f"{url} never answered {status}")


def test_every_answer_reports_its_weight_and_429_tells_how_long() -> None:
    async def body() -> None:
        async with emulator(RateLimits()) as emu, aiohttp.ClientSession() as http:
            async with http.get(emu.rest_url + "/api/v3/exchangeInfo") as r:
                assert r.status == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == "20"
                limits = (await r.json())["rateLimits"]
                assert {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100} in limits
            async with http.get(emu.rest_url + "/api/v3/nope") as r:  # even an unknown endpoint
                assert r.status == 404 and r.headers["X-MBX-USED-WEIGHT-1M"] == "20"
            async with http.get(emu.rest_url + "/api/v3/depth", params={"symbol": "BTCUSDT"}) as r:
                assert r.headers["X-MBX-USED-WEIGHT-1M"] == "25"  # depth: 5

        async with emulator(RateLimits(request_weight=30, weight_interval_s=5)) as emu, aiohttp.ClientSession() as http:
            await window_start(5)
            refused = await burst_until(http, emu.rest_url + "/api/v3/ping", 429)
            body = await refused.json()
            assert body["code"] == -1003 and "30 request weight per 5 SECOND" in body["msg"]
            assert 1 <= int(refused.headers["Retry-After"]) <= 5
            assert refused.headers["X-MBX-USED-WEIGHT-5S"] == "30"

    run(body)


def test_the_adapter_backs_off_on_429_and_is_not_banned() -> None:
    async def body() -> None:
        limits = RateLimits(request_weight=60, weight_interval_s=3, ban_after_429s=2)
        async with emulator(limits) as emu, aiohttp.ClientSession() as http:
            adapter = adapter_for(emu)
            try:
                await adapter.connect()
                await window_start(3)
                await burst_until(http, emu.rest_url + "/api/v3/ping", 429)  # this IP must now back off
                ticker = await adapter.fetch_ticker("BTC/USDT")  # 429 once, waits Retry-After, then succeeds
                assert ticker.last == Decimal(40_000)
                told = [f for f in adapter.faults if isinstance(f, RateLimitError)]
                assert told and told[0].reason == "rate_limited" and told[0].retry_after is not None
                assert 1 <= told[0].retry_after <= 3
                # one request while backing off is allowed here (ban_after_429s=2): the adapter sent no second
                assert all(f.reason != "ip_banned" for f in told)
                async with http.get(emu.rest_url + "/api/v3/ping") as r:
                    assert r.status == 200
            finally:
                await adapter.close()

    run(body)


def test_a_418_ban_lasts_its_time() -> None:
    async def body() -> None:
        limits = RateLimits(request_weight=50, weight_interval_s=1, ban_after_429s=3, ban_s=3)
        async with emulator(limits) as emu, aiohttp.ClientSession() as http:
            adapter = adapter_for(emu)
            loop = asyncio.get_running_loop()
            try:
                await adapter.connect()
                # a client that keeps hammering after its 429s is banned
                banned = await burst_until(http, emu.rest_url + "/api/v3/ping", 418)
                banned_at = loop.time()
                assert (await banned.json())["code"] == -1003 and banned.headers["Retry-After"] == "3"
                ccxt_rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
                ccxt_rest.markets = adapter.exchange.markets
                ccxt_rest.markets_by_id = adapter.exchange.markets_by_id
                try:
                    with pytest.raises(ccxt.DDoSProtection):  # ccxt's class for 418
                        await ccxt_rest.fetch_ticker("BTC/USDT")
                    assert ccxt_rest.last_response_headers["Retry-After"] in ("1", "2", "3")
                finally:
                    await ccxt_rest.close()
                # the adapter waits the ban out (Retry-After) and then gets its answer
                ticker = await adapter.fetch_ticker("BTC/USDT")
                assert loop.time() - banned_at >= 2.0  # not before the ban ended (Retry-After is whole seconds)
                assert ticker.last == Decimal(40_000)
                assert any(isinstance(f, RateLimitError) and f.reason == "ip_banned" for f in adapter.faults)
            finally:
                await adapter.close()

    run(body)


def intent(n: int) -> OrderIntent:
    return OrderIntent(
        intent_id=f"limits-{n}",
        account="main",
        strategy="s",
        exchange="binance",
        symbol="BTC/USDT",
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=Decimal("0.001"),
        price=Decimal(30_000),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_order_count_limit_answers_1015() -> None:
    async def body() -> None:
        limits = RateLimits(orders=3, orders_interval_s=3)
        async with emulator(limits) as emu:
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            adapter = adapter_for(emu)
            try:
                await rest.load_markets()
                await adapter.connect()
                await window_start(3)
                for n in range(1, 4):
                    await rest.create_order("BTC/USDT", "limit", "buy", 0.001, 30_000)
                    assert rest.last_response_headers["X-MBX-ORDER-COUNT-3S"] == str(n)
                    assert rest.last_response_headers["X-MBX-ORDER-COUNT-1D"] == str(n)
                with pytest.raises(ccxt.BaseError) as refused:
                    await rest.create_order("BTC/USDT", "limit", "buy", 0.001, 30_000)
                assert "-1015" in str(refused.value)
                assert 1 <= int(rest.last_response_headers["Retry-After"]) <= 3
                assert len(await rest.fetch_open_orders("BTC/USDT")) == 3  # the refused order was not placed

                # the adapter is refused too, waits Retry-After and places its order once
                order = intent(1)
                placed = await adapter.create_order(order, order.client_order_id)
                assert placed.status is OrderStatus.OPEN
                assert any(isinstance(f, RateLimitError) for f in adapter.faults)
                opened = await rest.fetch_open_orders("BTC/USDT")
                assert len(opened) == 4
                assert sum(o["clientOrderId"] == order.client_order_id for o in opened) == 1
            finally:
                await rest.close()
                await adapter.close()

    run(body)


def test_limits_are_off_while_driven_in_lock_step() -> None:
    async def body() -> None:
        async with emulator(RateLimits(request_weight=5)) as emu, aiohttp.ClientSession() as http:
            bar = {"symbol": "BTCUSDT", "ts_ms": 1_700_000_000_000, "price": "40000"}
            async with http.post(emu.rest_url + "/_emulator/market/open", json=bar, headers=emu.admin_headers()) as r:
                assert r.status == 200
            for _ in range(10):  # twice the limit: a driven market's time is not the wall clock
                async with http.get(emu.rest_url + "/api/v3/ping") as r:
                    assert r.status == 200
            assert int(r.headers["X-MBX-USED-WEIGHT-1M"]) >= 10

    run(body)
