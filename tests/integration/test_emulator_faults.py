"""Fault knobs against ccxt's own binance class: 5xx, 429, 418, lost responses, clock skew, ws drops."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import ccxt
import ccxt.async_support as ccxt_async
import ccxt.pro as ccxt_pro
import pytest

from meltica.emulator import EmulatorConfig, EmulatorServer, ccxt_config
from tests.integration.polling import until

pytestmark = pytest.mark.integration

TRADES = Path(__file__).resolve().parents[1] / "data" / "binance" / "btcusdt-trades.parquet"
KEY, SECRET = "fault-key", "fault-secret"


def run(body: Any) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=20))


def test_http_faults_map_to_retryable_ccxt_errors() -> None:
    async def body() -> None:
        async with EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[TRADES])) as emu:
            await emu.step(5)
            ex = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                await ex.load_markets()
                emu.faults.rate_limit_next = 1
                with pytest.raises(ccxt.DDoSProtection):
                    await ex.fetch_balance()
                emu.faults.ban_next = 1
                with pytest.raises(ccxt.DDoSProtection):
                    await ex.fetch_balance()
                emu.faults.fail_next = 1
                with pytest.raises(ccxt.OperationFailed):  # -1001 body, 503: ccxt's retryable family
                    await ex.fetch_balance()
                await ex.fetch_balance()  # counters are used up: back to normal
            finally:
                await ex.close()

    run(body)


def test_retry_after_header_and_admin_endpoint() -> None:
    async def body() -> None:
        async with EmulatorServer(EmulatorConfig.single(KEY, SECRET)) as emu, aiohttp.ClientSession() as http:
            async with http.post(
                emu.rest_url + "/_emulator/faults",
                json={"rate_limit_next": 1, "retry_after_s": 7},
                headers=emu.admin_headers(),
            ) as r:
                assert r.status == 200
            async with http.get(emu.rest_url + "/api/v3/ping") as r:
                assert r.status == 429 and r.headers["Retry-After"] == "7"
                assert (await r.json())["code"] == -1003
            async with http.post(
                emu.rest_url + "/_emulator/faults", json={"nope": 1}, headers=emu.admin_headers()
            ) as r:
                assert r.status == 400

    run(body)


def test_lost_order_response_executes_the_order() -> None:
    async def body() -> None:
        async with EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[TRADES])) as emu:
            await emu.step(5)
            ex = ccxt_async.binance({**ccxt_config(emu, KEY, SECRET), "timeout": 1500})
            try:
                await ex.load_markets()
                emu.faults.lose_next_order_response = 1
                with pytest.raises(ccxt.NetworkError):
                    await ex.create_order("BTC/USDT", "limit", "buy", 0.001, 30_000, {"clientOrderId": "lost-1"})
                found = await ex.fetch_order(None, "BTC/USDT", {"origClientOrderId": "lost-1"})
                assert found["status"] == "open" and found["clientOrderId"] == "lost-1"
            finally:
                await ex.close()

    run(body)


def test_clock_skew_gives_invalid_nonce_until_resync() -> None:
    async def body() -> None:
        async with EmulatorServer(EmulatorConfig.single(KEY, SECRET)) as emu:
            ex = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                await ex.load_markets()
                emu.faults.clock_skew_ms = 120_000  # server runs 2 minutes ahead
                with pytest.raises(ccxt.InvalidNonce):
                    await ex.fetch_balance()
                await ex.load_time_difference()
                await ex.fetch_balance()
            finally:
                await ex.close()

    run(body)


def test_dropped_websockets_reconnect() -> None:
    async def body() -> None:
        async with EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[TRADES])) as emu:
            pro = ccxt_pro.binance(ccxt_config(emu))
            try:
                await pro.load_markets()
                task = asyncio.create_task(pro.watch_trades("BTC/USDT"))
                await until(lambda: emu.hub.has_subscribers("btcusdt@trade"), "the trade stream subscribed", 10, 0.02)
                assert await emu.drop_websockets() >= 1
                with pytest.raises(ccxt.NetworkError):
                    await asyncio.wait_for(task, 5)
                task = asyncio.create_task(pro.watch_trades("BTC/USDT"))
                await until(lambda: emu.hub.has_subscribers("btcusdt@trade"), "the trade stream subscribed", 10, 0.02)
                await emu.step(1)
                trades = await asyncio.wait_for(task, 5)
                assert trades
            finally:
                await pro.close()

    run(body)
