"""Reconciliation that sees everything, at start of an execution lane and from `meltica reconcile --local`.

Real PostgreSQL; ccxt's own ``binance`` class against the in-process emulator. What happens "behind
Meltica's back" is done by a second ccxt client on the same emulator account (or the emulator's deposit
knob), as a person with the API key would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt.async_support as ccxt_async
import pytest
from sqlalchemy import Engine, select

from meltica.adapters.ccxt import CcxtAdapter
from meltica.adapters.registry import create_adapter
from meltica.config.settings import MelticaSettings
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer, ccxt_config
from meltica.emulator.config import EmulatorAccount
from meltica.execution import OrderManager, OrderStore
from meltica.portfolio import Portfolio
from meltica.reconciliation import Case, DiscrepancyKind
from meltica.reconciliation.reconcile import LOCAL_SOURCE, store_balances
from meltica.reconciliation.startup import startup_hook
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore
from meltica.storage import tables as t

pytestmark = pytest.mark.integration

KEY, SECRET = "startup-key-0123456789", "startup-secret-abcdef-987654"
BTC, ETH = "BTC/USDT", "ETH/USDT"
REPO = Path(__file__).resolve().parents[2]


TRADES = Path(__file__).resolve().parents[1] / "data" / "binance" / "btcusdt-trades.parquet"


def now() -> datetime:
    return datetime.now(UTC)


def emulator() -> EmulatorServer:
    return EmulatorServer(
        EmulatorConfig(
            accounts=[EmulatorAccount("main", KEY, SECRET)],
            symbols=["BTCUSDT", "ETHUSDT"],
            initial_prices={"ETHUSDT": Decimal(2000)},
            data=[TRADES],
            data_symbol="BTCUSDT",
        )
    )


async def meltica_adapter(emu: EmulatorServer) -> CcxtAdapter:
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
    )
    assert isinstance(adapter, CcxtAdapter)
    await adapter.connect()
    return adapter


def behind_the_back(emu: EmulatorServer) -> Any:
    """A second ccxt client with the account's API key: a person (or another bot) trading it."""
    return ccxt_async.binance(ccxt_config(emu, KEY, SECRET))


def intent(n: int, side: Side, price: Decimal, strategy: str, quantity: str = "0.001") -> OrderIntent:
    return OrderIntent(
        intent_id=f"startup-{n}",
        account="main",
        strategy=strategy,
        exchange="binance",
        symbol=BTC,
        side=side,
        type=OrderType.LIMIT,
        quantity=Decimal(quantity),
        price=price,
        created_at=now(),
    )


def settings() -> MelticaSettings:
    return MelticaSettings.model_validate({"environment": "paper", "trading_mode": "paper"})


async def deposit(emu: EmulatorServer, asset: str, amount: str) -> None:
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"{emu.rest_url}/_emulator/deposit",
            json={"account": "main", "asset": asset, "amount": amount},
            headers=emu.admin_headers(),
        )
        assert response.status == 200, await response.text()


def test_startup_finds_foreign_order_duplicate_client_id_and_deposit_halts_and_seeds_portfolio(
    fresh_database: Engine,
) -> None:
    db = fresh_database
    store = OrderStore(db)

    async def body() -> None:
        emu = emulator()
        await emu.start()
        adapter = await meltica_adapter(emu)
        other = behind_the_back(emu)
        try:
            await emu.step(20)
            bid = emu.engine.book("BTCUSDT", 1).bids[0][0]
            far = (bid * Decimal("0.9")).quantize(Decimal("0.01"))
            # Before the "restart": Meltica trades BTC/USDT only and stored its balances as a local snapshot.
            before = OrderManager(store, {"main": adapter}, clock=now)
            mine = await before.submit(intent(1, Side.BUY, far, "s1"))
            assert mine.status is OrderStatus.OPEN, mine.reason
            store_balances(db, "main", "binance", await adapter.fetch_balances(), now(), source=LOCAL_SOURCE)

            # (a) an order on a symbol Meltica never traded
            foreign = await other.create_order(ETH, "limit", "buy", 0.01, 1500, {"newClientOrderId": "manual-eth-1"})
            # (b) Meltica's order cancelled and re-sent under the same client order id (a request sent twice)
            await other.cancel_order(mine.exchange_order_id, BTC)
            again = await other.create_order(
                BTC, "limit", "buy", 0.001, float(far - 1), {"newClientOrderId": mine.client_order_id}
            )
            assert str(again["id"]) != mine.exchange_order_id
            # (c) a balance change Meltica did not cause
            await deposit(emu, "USDT", "250.5")

            # The restart: a new OMS recovers from the store, then the lane's start-up hook runs.
            own_switch = KillSwitch()  # the worker's switch (the risk gate's): must hear the halts at once
            oms = OrderManager(store, {"main": adapter}, clock=now, kill_switch=own_switch)
            await oms.recover()
            portfolio = Portfolio()
            hook = startup_hook(db, settings())
            await hook("main", adapter, oms, portfolio)
            report = hook.reports["main"]
            assert report is not None and report.status == "completed"
            assert report.trigger == "startup"
            assert ETH in report.symbols and BTC in report.symbols

            unknown = report.of_case(Case.ORDER_UNKNOWN_LOCALLY)
            assert [(d.subject, d.symbol, d.outcome) for d in unknown] == [
                ("order:manual-eth-1", ETH, "halted account:main")
            ]
            assert unknown[0].venue is not None and unknown[0].venue["exchange_order_id"] == str(foreign["id"])

            [dup] = report.of_case(Case.DUPLICATE_CLIENT_ORDER_ID)
            assert (dup.kind, dup.subject, dup.strategy, dup.outcome) == (
                DiscrepancyKind.MISSING_LOCALLY,
                f"order:{mine.client_order_id}",
                "s1",
                "halted strategy:s1",
            )
            assert dup.venue is not None
            assert sorted(dup.venue["exchange_order_ids"]) == sorted([mine.exchange_order_id, str(again["id"])])

            [drift] = report.of_case(Case.BALANCE_DRIFT)
            assert (drift.subject, drift.outcome) == ("balance:USDT", "reported")
            assert drift.venue is not None and Decimal(drift.venue["drift"]) == Decimal("250.5")
            assert report.balance_baseline is not None and report.balance_baseline.startswith("snapshot")

            # the policy: halts persisted, and the worker's own switch already refuses
            persisted = KillSwitch(KillSwitchStore(db))
            for scope in ("account:main", "strategy:s1"):
                assert persisted.state_of(scope).mode is KillSwitchMode.HALT
                assert own_switch.state_of(scope).mode is KillSwitchMode.HALT
            assert sorted(report.halted_scopes) == ["account:main", "strategy:s1"]

            # the portfolio (and so the risk gate) starts from the venue's balances
            venue = await adapter.fetch_balances()
            assert portfolio.holding("main", "binance", "USDT").total == venue["USDT"].total
            assert portfolio.holding("main", "binance", "USDT").total == Decimal(10_000) + Decimal("250.5")
            assert portfolio.holding("main", "binance", "BTC").total == venue["BTC"].total

            # stored: the run, its discrepancies; the seeded balances are the next run's baseline
            with db.connect() as conn:
                run = conn.execute(
                    select(t.reconciliation_runs).where(t.reconciliation_runs.c.run_id == report.run_id)
                ).mappings().one()  # fmt: skip
                rows = conn.execute(
                    select(t.reconciliation_discrepancies.c.action).where(
                        t.reconciliation_discrepancies.c.run_id == report.run_id
                    )
                ).scalars().all()  # fmt: skip
            assert (run["status"], run["trigger"]) == ("completed", "startup")
            assert "halted strategy:s1 (duplicate_client_order_id)" in rows
            assert "halted account:main (order_unknown_locally)" in rows
            assert "reported (balance_drift)" in rows

            later = startup_hook(db, settings(), trigger="schedule")
            await later("main", adapter, oms, portfolio)
            second = later.reports["main"]
            assert second is not None and second.balance_baseline == "portfolio"
            assert second.of_case(Case.BALANCE_DRIFT) == []  # the deposit was adopted with the balances
            assert {d.case for d in second.discrepancies} == {
                Case.ORDER_UNKNOWN_LOCALLY,
                Case.DUPLICATE_CLIENT_ORDER_ID,
            }
        finally:
            await other.close()
            await adapter.close()
            await emu.stop()

    asyncio.run(asyncio.wait_for(body(), 90))


def test_a_request_sent_twice_and_filled_twice_is_a_duplicate_and_the_ledger_explains_the_balances(
    fresh_database: Engine,
) -> None:
    db = fresh_database
    store = OrderStore(db)

    async def body() -> None:
        emu = emulator()
        await emu.start()
        adapter = await meltica_adapter(emu)
        other = behind_the_back(emu)
        try:
            await emu.step(20)
            store_balances(db, "main", "binance", await adapter.fetch_balances(), now(), source=LOCAL_SOURCE)
            oms = OrderManager(store, {"main": adapter}, clock=now)
            market_sell = OrderIntent(
                intent_id="startup-twice", account="main", strategy="s1", exchange="binance", symbol=BTC,
                side=Side.SELL, type=OrderType.MARKET, quantity=Decimal("0.001"), created_at=now(),
            )  # fmt: skip
            sold = await oms.submit(market_sell)
            assert sold.status is OrderStatus.FILLED, sold.reason
            # the same request again under the same client order id (what a restart without a store did)
            twice = await other.create_order(
                BTC, "market", "sell", 0.001, None, {"newClientOrderId": sold.client_order_id}
            )
            assert twice["status"] == "closed"

            hook = startup_hook(db, settings())
            await hook("main", adapter, OrderManager(store, {"main": adapter}, clock=now), Portfolio())
            report = hook.reports["main"]
            assert report is not None
            [dup] = report.of_case(Case.DUPLICATE_CLIENT_ORDER_ID)
            assert dup.venue is not None
            assert sorted(dup.venue["exchange_order_ids"]) == sorted([sold.exchange_order_id, str(twice["id"])])
            [foreign] = report.of_case(Case.FILL_UNKNOWN_ORDER)
            assert foreign.venue is not None and foreign.venue["exchange_order_id"] == str(twice["id"])
            assert foreign.strategy == "s1"
            assert report.halted_scopes == ["strategy:s1"]
            # the second order's trade is not taken for the first's: Meltica's order keeps its one fill
            mine = store.get(sold.client_order_id)
            assert mine is not None and mine.filled_quantity == Decimal("0.001") and len(mine.fill_ids) == 1
            # both sells (and their fees) are in the local ledger: no balance is left unexplained
            assert report.of_case(Case.BALANCE_DRIFT) == []
            assert report.balance_baseline is not None and report.balance_baseline.endswith("+ 2 fills since")
        finally:
            await other.close()
            await adapter.close()
            await emu.stop()

    asyncio.run(asyncio.wait_for(body(), 90))


def test_self_trade_legs_are_two_fills_and_adopted_changes_reach_the_oms(fresh_database: Engine) -> None:
    db = fresh_database
    store = OrderStore(db)

    async def body() -> None:
        emu = emulator()
        await emu.start()
        adapter = await meltica_adapter(emu)
        other = behind_the_back(emu)
        try:
            await emu.step(20)
            book = emu.engine.book("BTCUSDT", 1)
            bid, ask = book.bids[0][0], book.asks[0][0]
            assert ask - bid > Decimal("0.02"), "needs room inside the spread"
            inside = bid + Decimal("0.01")
            # The OMS's user stream is not running: it learns nothing from the venue by itself.
            oms = OrderManager(store, {"main": adapter}, clock=now)
            buy = await oms.submit(intent(1, Side.BUY, inside, "s1"))
            sell = await oms.submit(intent(2, Side.SELL, inside, "s2"))  # trades with Meltica's own bid
            resting = await oms.submit(intent(3, Side.BUY, (bid * Decimal("0.9")).quantize(Decimal("0.01")), "s1"))
            assert oms.order(buy.client_order_id).status is OrderStatus.OPEN
            [leg_buy, leg_sell] = sorted(await adapter.fetch_my_trades(BTC), key=lambda f: f.side.value)
            assert leg_buy.fill_id == leg_sell.fill_id  # one trade, two legs of one account
            await other.cancel_order(resting.exchange_order_id, BTC)

            portfolio = Portfolio()
            hook = startup_hook(db, settings(), trigger="reconnect")
            await hook("main", adapter, oms, portfolio)
            report = hook.reports["main"]
            assert report is not None
            # The taker (sell) leg came with the order's answer and is stored; the maker (buy) leg shares
            # its trade id and was never seen: a check by trade id alone would call it known.
            missed = report.of_case(Case.FILL_MISSING_LOCALLY)
            assert [(d.subject, d.strategy, d.outcome) for d in missed] == [
                (f"fill:{leg_buy.fill_id}:buy", "s1", "adopted")
            ]
            assert [d.subject for d in report.of_case(Case.VENUE_CLOSED)] == [f"order:{resting.client_order_id}"]
            assert report.halted_scopes == []
            # each order carries its own leg, in the store and in the OMS's memory (reloaded after adoption)
            for order in (buy, sell):
                stored = store.get(order.client_order_id)
                assert stored is not None and stored.status is OrderStatus.FILLED
                assert stored.fill_ids == (leg_buy.fill_id,)
                assert oms.order(order.client_order_id).status is OrderStatus.FILLED
            assert oms.order(resting.client_order_id).status is OrderStatus.CANCELLED
            assert oms.open_orders() == []

            again = startup_hook(db, settings(), trigger="schedule")
            await again("main", adapter, oms, portfolio)
            assert again.reports["main"] is not None and again.reports["main"].discrepancies == []
        finally:
            await other.close()
            await adapter.close()
            await emu.stop()

    asyncio.run(asyncio.wait_for(body(), 90))


def test_startup_hook_fails_closed_when_the_venue_is_unreachable(fresh_database: Engine) -> None:
    async def body() -> None:
        emu = emulator()
        await emu.start()
        adapter = await meltica_adapter(emu)
        await emu.stop()  # the venue goes away after the lane connected
        try:
            oms = OrderManager(OrderStore(fresh_database), {"main": adapter}, clock=now)
            portfolio = Portfolio()
            from meltica.errors import RetryableError

            with pytest.raises(RetryableError):
                await startup_hook(fresh_database, settings())("main", adapter, oms, portfolio)
            assert portfolio.holdings("main") == {}
        finally:
            await adapter.close()

    asyncio.run(asyncio.wait_for(body(), 90))
    with fresh_database.connect() as conn:
        status = conn.execute(select(t.reconciliation_runs.c.status)).scalars().all()
    assert status == ["failed"]


# --- meltica reconcile --local ----------------------------------------------------------------------------


class _EmulatorThread:
    """The emulator on its own event loop thread, so a CLI process can talk to it meanwhile."""

    def __init__(self) -> None:
        self.emu = emulator()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _EmulatorThread:
        self.thread.start()
        self.run(self.emu.start())
        self.run(self.emu.step(20))
        return self

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def __exit__(self, *exc: object) -> None:
        self.run(self.emu.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def write_config(tmp_path: Path, port: int, database_url: str) -> Path:
    config = tmp_path / "live.yaml"
    config.write_text(
        "environment: paper\n"
        "trading_mode: paper\n"
        f"database_url: {database_url}\n"
        "accounts:\n"
        "  - name: main\n"
        "    exchange: binance\n"
        f"    emulator_url: http://127.0.0.1:{port}\n"
        "    api_key: env:STARTUP_TEST_KEY\n"
        "    api_secret: env:STARTUP_TEST_SECRET\n"
    )
    return config


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STARTUP_TEST_KEY": KEY,
        "STARTUP_TEST_SECRET": SECRET,
        "PREFECT_API_URL": "",  # no Prefect server is needed (nor used)
    }
    env.pop("MELTICA_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "meltica", "reconcile", "--local", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture
def running_emulator() -> Iterator[_EmulatorThread]:
    with _EmulatorThread() as running:
        yield running


def test_cli_local_reconciles_without_prefect_and_exits_by_outcome(
    fresh_database: Engine, running_emulator: _EmulatorThread, tmp_path: Path, free_port: Any
) -> None:
    url = fresh_database.url.render_as_string(hide_password=False)
    config = write_config(tmp_path, running_emulator.emu.port, url)

    clean = cli(config, "--account", "main")
    assert clean.returncode == 0, clean.stderr
    assert "Reconciliation of `main` on binance — completed" in clean.stdout
    assert "No discrepancies." in clean.stdout
    assert "clean" in clean.stderr

    async def place_foreign() -> None:
        other = behind_the_back(running_emulator.emu)
        try:
            await other.create_order(ETH, "limit", "buy", 0.01, 1500, {"newClientOrderId": "manual-eth-cli"})
        finally:
            await other.close()

    running_emulator.run(place_foreign())
    halted = cli(config, "--json")
    assert halted.returncode == 1, halted.stderr
    assert "halt needed: main: kill switch engaged on account:main" in halted.stderr
    [outcome] = json.loads(halted.stdout)
    assert (outcome["account"], outcome["status"], outcome["ok"]) == ("main", "completed", False)
    assert outcome["halted_scopes"] == ["account:main"]
    assert [(d["case"], d["subject"]) for d in outcome["discrepancy_list"]] == [
        ("order_unknown_locally", "order:manual-eth-cli")
    ]
    assert KillSwitch(KillSwitchStore(fresh_database)).state_of("account:main").mode is KillSwitchMode.HALT
    with fresh_database.connect() as conn:
        runs = conn.execute(select(t.reconciliation_runs.c.trigger, t.reconciliation_runs.c.status)).all()
    assert sorted(tuple(r) for r in runs) == [("cli", "completed"), ("cli", "completed")]

    unreachable = write_config(tmp_path, free_port(), url)
    failed = cli(unreachable)
    assert failed.returncode == 1
    assert "reconciliation failed: main:" in failed.stderr
    assert "halt needed" not in failed.stderr
