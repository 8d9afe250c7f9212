"""An adapter built from configuration (references for credentials, emulator_url) streams and trades."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from meltica.adapters.factory import adapter_for_account
from meltica.config import load_settings
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side, client_order_id_for
from meltica.emulator import EmulatorConfig, EmulatorServer
from meltica.errors import ConfigurationError
from meltica.secrets import install_log_redaction

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
KEY, SECRET = "cfg-key-0123456789", "cfg-secret-KNOWN-abcdef-987654"


def write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "paper.yaml"
    config.write_text(
        "environment: paper\n"
        "trading_mode: paper\n"
        "accounts:\n"
        "  - name: emu\n"
        "    exchange: binance\n"
        f"    emulator_url: http://127.0.0.1:{port}\n"
        "    api_key: env:EMU_TEST_KEY\n"
        "    api_secret: env:EMU_TEST_SECRET\n"
    )
    return config


def test_configured_account_trades_and_streams_market_data_without_leaking_its_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EMU_TEST_KEY", KEY)
    monkeypatch.setenv("EMU_TEST_SECRET", SECRET)
    install_log_redaction()

    async def body() -> None:
        emu = EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[DATA / "btcusdt-trades.parquet"]))
        await emu.start()
        try:
            await emu.step(20)
            settings = load_settings(config_file=write_config(tmp_path, emu.port))
            adapter = adapter_for_account(settings, "emu")
            await adapter.connect()
            try:
                trades = adapter.stream_trades("BTC/USDT")
                books = adapter.stream_order_book("BTC/USDT", depth=5)
                first_book = await asyncio.wait_for(anext(books), 10)
                assert first_book.bids
                assert first_book.asks
                assert first_book.bids[0].price < first_book.asks[0].price
                waiter = asyncio.create_task(anext(trades))
                # the trade subscription is live before the replay moves on (polled, bounded)
                deadline = asyncio.get_running_loop().time() + 10
                while not emu.hub.has_subscribers("btcusdt@trade"):
                    assert asyncio.get_running_loop().time() < deadline, "the trade stream never subscribed"
                    await asyncio.sleep(0.02)
                await emu.step(5)
                trade = await asyncio.wait_for(waiter, 10)
                assert trade.symbol == "BTC/USDT"
                assert trade.price > 0

                logging.getLogger("meltica.test").warning("signing with %s", SECRET)
                order_intent = OrderIntent(
                    intent_id="cfg-1",
                    account="emu",
                    strategy="cfg",
                    exchange="binance",
                    symbol="BTC/USDT",
                    side=Side.BUY,
                    type=OrderType.LIMIT,
                    quantity=Decimal("0.001"),
                    price=trade.price * Decimal("0.9"),
                    created_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
                placed = await adapter.create_order(order_intent, client_order_id_for("cfg-1"))
                assert placed.status is OrderStatus.OPEN
                assert (await adapter.fetch_open_orders("BTC/USDT"))[0].client_order_id == client_order_id_for("cfg-1")
                await trades.aclose()
                await books.aclose()
            finally:
                await adapter.close()
        finally:
            await emu.stop()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(asyncio.wait_for(body(), 60))
    assert SECRET not in caplog.text
    assert "signing with" in caplog.text


def test_unknown_account_and_emulator_in_prod_are_configuration_errors(tmp_path: Path) -> None:
    settings = load_settings(config_file=write_config(tmp_path, 1))
    with pytest.raises(ConfigurationError, match="no account named 'nope'"):
        adapter_for_account(settings, "nope")
    prod = tmp_path / "prod.yaml"
    prod.write_text(write_config(tmp_path, 1).read_text().replace("environment: paper", "environment: prod"))
    with pytest.raises(ConfigurationError, match="emulator_url"):
        load_settings(env="prod", config_file=prod)
