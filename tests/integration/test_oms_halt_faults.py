"""The money path under real faults: the OMS, a real ``KillSwitch`` on PostgreSQL and the risk engine,
against the Binance emulator through ccxt's own ``binance`` class.

* a halt whose cancels fail (the venue answers 503 to everything for a while) keeps cancelling, with
  back-off, until nothing of the halted scope rests on the venue;
* scoped halts (``strategy:<name>``, ``account:<name>``) reach the OMS through its kill-switch listener:
  only the scope's orders are cancelled and refused, the rest go on;
* a loss-limit breach while the risk tables are gone (kill-switch state and risk events cannot be written)
  still halts in memory, the OMS cancels on the venue and refuses new intents, and both records are
  stored once the database is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.ccxt import CcxtAdapter
from meltica.adapters.registry import create_adapter
from meltica.config.settings import RiskLimits
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.execution import OrderManager, OrderStore, RetryPolicy
from meltica.portfolio import Portfolio
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore, RiskEngine, RiskRecorder

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
KEY, SECRET = "halt-key", "halt-secret"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SYMBOL = "BTC/USDT"
# Short retries in the adapter and the OMS: an outage is noticed in a fraction of a second, not after the
# production back-off; the halt's own rounds are what the first test is about.
QUICK = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05, resolve_attempts=1)


def intent(n: str, price: Decimal | None, *, strategy: str = "a", side: Side = Side.BUY, **kw: Any) -> OrderIntent:
    return OrderIntent(
        intent_id=f"halt-{n}",
        account="main",
        strategy=strategy,
        exchange="binance",
        symbol=SYMBOL,
        side=side,
        type=OrderType.LIMIT if price is not None else OrderType.MARKET,
        quantity=Decimal("0.01"),
        price=price,
        created_at=T0,
        **kw,
    )


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.25)  # polls the venue: kept well under its request-weight limit


class Rig:
    """Emulator, ccxt adapter, OMS on PostgreSQL, a real kill switch on PostgreSQL, and a risk engine."""

    def __init__(self, db: Engine, limits: RiskLimits | None = None) -> None:
        self.db = db
        self.limits = limits or RiskLimits(max_order_notional=Decimal(5000), price_band_bps=Decimal(5000))
        self.emu = EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[DATA / "btcusdt-trades.parquet"]))

    async def start(self) -> None:
        await self.emu.start()
        await self.emu.step(20)
        adapter = create_adapter(
            "binance",
            account="main",
            credentials={"apiKey": KEY, "secret": SECRET},
            urls={"api": self.emu.ccxt_urls()},
            options=dict(CCXT_OPTIONS),
            retry=QUICK,
        )
        assert isinstance(adapter, CcxtAdapter)
        self.adapter = adapter
        await adapter.connect()
        instruments = await adapter.load_instruments()
        self.portfolio = Portfolio(valuation_currency="USDT")
        self.switch = KillSwitch(KillSwitchStore(self.db))
        self.risk = RiskEngine(
            self.limits,
            self.portfolio,
            instruments={("binance", s): i for s, i in instruments.items()},
            kill_switch=self.switch,
            recorder=RiskRecorder(self.db, batch_size=1),
        )
        ticker = await adapter.fetch_ticker(SYMBOL)
        assert ticker.last is not None
        self.last = ticker.last
        self.risk.on_market("binance", SYMBOL, ticker.last, bid=ticker.bid, ask=ticker.ask)
        self.oms = OrderManager(
            OrderStore(self.db),
            {"main": adapter},
            clock=lambda: datetime.now(UTC),
            risk=self.risk,
            portfolio=self.portfolio,
            kill_switch=self.switch,
            retry=QUICK,
        )
        await self.oms.start()

    async def stop(self) -> None:
        await self.oms.stop()
        await self.adapter.close()
        await self.emu.stop()

    def below(self, fraction: str, ticks: int = 0) -> Decimal:
        return (self.last * Decimal(fraction)).quantize(Decimal("0.01")) - ticks

    async def rest(self, n: str, strategy: str = "a", ticks: int = 0) -> str:
        order = await self.oms.submit(intent(n, self.below("0.95", ticks), strategy=strategy))
        assert order.status is OrderStatus.OPEN, order.reason
        return order.client_order_id

    async def venue_open(self) -> set[str]:
        return {o.client_order_id for o in await self.adapter.fetch_open_orders(SYMBOL)}


def run(db: Engine, body: Callable[[Rig], Awaitable[None]], limits: RiskLimits | None = None) -> None:
    async def main() -> None:
        rig = Rig(db, limits)
        await rig.start()
        try:
            await body(rig)
        finally:
            await rig.stop()

    asyncio.run(asyncio.wait_for(main(), 180))


def test_a_halt_whose_venue_cancels_fail_keeps_cancelling_until_nothing_rests(fresh_database: Engine) -> None:
    async def body(rig: Rig) -> None:
        resting = {await rig.rest(str(i), ticks=i) for i in range(3)}
        assert await rig.venue_open() == resting
        rig.emu.faults.fail_next = 100_000  # an outage: every request answers 503
        rig.switch.engage(KillSwitchMode.HALT, reason="drill during an outage", actor="pytest")

        async def outage_hit_and_cancels_failed() -> bool:
            # the halt's first round ran into the outage: every cancel was tried and failed (recorded)
            failed = {a.client_order_id for a in rig.oms.anomalies if a.message.startswith("cancel failed")}
            return rig.emu.faults.fail_next < 100_000 and failed >= resting

        await eventually(outage_hit_and_cancels_failed, "a cancel round that failed against the outage")
        rig.emu.faults.fail_next = 0  # the venue is back
        assert await rig.venue_open() == resting  # nothing was cancelled during the outage

        async def venue_clear() -> bool:
            return not await rig.venue_open()

        await eventually(venue_clear, "no order of ours resting on the venue after the outage")

        async def all_cancelled() -> bool:
            return all(rig.oms.order(c).status is OrderStatus.CANCELLED for c in resting)

        await eventually(all_cancelled, "every halted order cancelled in the OMS")
        refused = await rig.oms.submit(intent("after", rig.below("0.9")))
        assert refused.status is OrderStatus.REJECTED and "kill switch" in (refused.reason or "")

    run(fresh_database, body)


def test_strategy_and_account_halts_reach_only_their_orders_through_the_oms_listener(
    fresh_database: Engine,
) -> None:
    async def body(rig: Rig) -> None:
        a_orders = {await rig.rest(f"a{i}", strategy="a", ticks=i) for i in range(2)}
        b_orders = {await rig.rest(f"b{i}", strategy="b", ticks=10 + i) for i in range(2)}
        assert await rig.venue_open() == a_orders | b_orders

        # Another account's halt touches nothing of this one.
        rig.switch.engage(KillSwitchMode.HALT, reason="other desk", actor="pytest", scope="account:other")
        still = await rig.oms.submit(intent("a-still", rig.below("0.9"), strategy="a"))
        assert still.status is OrderStatus.OPEN, still.reason
        a_orders.add(still.client_order_id)
        assert await rig.venue_open() == a_orders | b_orders

        rig.switch.engage(KillSwitchMode.HALT, reason="strategy a misbehaves", actor="pytest", scope="strategy:a")

        async def only_b_left() -> bool:
            return await rig.venue_open() == b_orders

        await eventually(only_b_left, "strategy a's orders cancelled on the venue, b's left resting")
        assert all(rig.oms.order(c).status is OrderStatus.CANCELLED for c in a_orders)
        assert all(rig.oms.order(c).status is OrderStatus.OPEN for c in b_orders)
        refused = await rig.oms.submit(intent("a-refused", rig.below("0.9"), strategy="a"))
        assert refused.status is OrderStatus.REJECTED and "kill switch" in (refused.reason or "")
        allowed = await rig.oms.submit(intent("b-allowed", rig.below("0.9"), strategy="b"))
        assert allowed.status is OrderStatus.OPEN, allowed.reason
        b_orders.add(allowed.client_order_id)

        rig.switch.engage(KillSwitchMode.HALT, reason="account limit", actor="pytest", scope="account:main")

        async def nothing_left() -> bool:
            return not await rig.venue_open()

        await eventually(nothing_left, "the account halt cancelled strategy b's orders too")
        assert all(rig.oms.order(c).status is OrderStatus.CANCELLED for c in b_orders)
        refused_b = await rig.oms.submit(intent("b-refused", rig.below("0.9"), strategy="b"))
        assert refused_b.status is OrderStatus.REJECTED

        # Releasing the strategy scope does not lift the account's halt: the strictest scope wins.
        rig.switch.release("pytest", "a fixed", scope="strategy:a")
        again = await rig.oms.submit(intent("a-again", rig.below("0.9"), strategy="a"))
        assert again.status is OrderStatus.REJECTED

    run(fresh_database, body)
    stored = KillSwitch(KillSwitchStore(fresh_database))
    assert stored.state_of("strategy:a").mode is KillSwitchMode.OFF
    assert stored.state_of("account:main").mode is KillSwitchMode.HALT
    assert stored.state_of("account:other").mode is KillSwitchMode.HALT
    assert stored.state_of("global").mode is KillSwitchMode.OFF


def test_a_loss_breach_with_the_risk_tables_gone_still_halts_cancels_and_is_stored_later(
    fresh_database: Engine,
) -> None:
    limits = RiskLimits(
        max_order_notional=Decimal(5000),
        price_band_bps=Decimal(5000),
        daily_loss_limit=Decimal(10),
        breach_action="halt",
    )

    async def body(rig: Rig) -> None:
        bought = await rig.oms.submit(intent("long", None, strategy="a"))
        assert bought.status is OrderStatus.FILLED, bought.reason
        resting = {await rig.rest(str(i), ticks=i) for i in range(2)}
        assert await rig.venue_open() == resting

        # A database outage for the risk path: neither the kill switch's state nor risk events can be written.
        with rig.db.begin() as conn:
            conn.execute(text("ALTER TABLE kill_switch_state RENAME TO kill_switch_state_away"))
            conn.execute(text("ALTER TABLE risk_events RENAME TO risk_events_away"))
        try:
            crash = rig.last * Decimal("0.5")  # 0.01 BTC loses far more than 10 USDT
            rig.portfolio.mark("binance", SYMBOL, crash)
            breaches = rig.risk.on_market("binance", SYMBOL, crash)
            assert [(b.rule, b.scope) for b in breaches] == [("daily_loss_limit", "account:main")]
            assert rig.switch.effective("main", "a")[0] is KillSwitchMode.HALT  # held in memory
            assert [c.scope for c in rig.switch.unsaved] == ["account:main"]
            assert [b.rule for b in rig.risk.unrecorded] == ["daily_loss_limit"]

            async def venue_clear() -> bool:
                return not await rig.venue_open()

            await eventually(venue_clear, "the halt held in memory cancelled the resting orders")
            refused = await rig.oms.submit(intent("refused", rig.below("0.9")))
            assert refused.status is OrderStatus.REJECTED and "kill switch" in (refused.reason or "")
            assert rig.risk.retry_pending() == 2  # both records still waiting
        finally:
            with rig.db.begin() as conn:
                conn.execute(text("ALTER TABLE kill_switch_state_away RENAME TO kill_switch_state"))
                conn.execute(text("ALTER TABLE risk_events_away RENAME TO risk_events"))
        assert rig.risk.retry_pending() == 0

    run(fresh_database, body, limits)
    assert KillSwitch(KillSwitchStore(fresh_database)).state_of("account:main").mode is KillSwitchMode.HALT
    with fresh_database.connect() as conn:
        rules = [r[0] for r in conn.execute(text("SELECT rule FROM risk_events WHERE rule = 'daily_loss_limit'"))]
    assert rules == ["daily_loss_limit"]  # stored once
