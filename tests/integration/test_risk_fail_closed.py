"""The post-trade breaker fails closed (issue 12, item 1): real faults, real PostgreSQL.

* a post-trade check that raises (its state store's database refuses connections) halts the account
  through the OMS, and the next order is refused;
* a breach whose recording fails (the ``risk_events`` table is gone for a while) still engages the kill
  switch, is not forgotten, and is stored once when the database is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal as D

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.in_process import InProcessVenue
from meltica.config.settings import RiskLimits
from meltica.domain import Fill, Instrument, OrderIntent, OrderStatus, OrderType, Side
from meltica.errors import InfrastructureUnavailableError
from meltica.execution import MemoryOrderStore, OrderManager, RetryPolicy
from meltica.portfolio import Portfolio
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore, RiskEngine, RiskRecorder, RiskStateStore
from meltica.storage.engine import make_engine

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
SYMBOL = "BTC/USDT"


@pytest.fixture(scope="module")
def database(module_database: Engine) -> Engine:
    """A fresh database migrated to head, shared by this module's tests (tests/integration/conftest.py)."""
    return module_database


def intent(
    n: str, side: Side, qty: str, *, account: str = "alice", order_type: OrderType = OrderType.MARKET, **kw: object
) -> OrderIntent:
    return OrderIntent(
        intent_id=f"fc-{n}",
        account=account,
        strategy="s1",
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        type=order_type,
        quantity=D(qty),
        created_at=T0,
        **kw,  # type: ignore[arg-type]
    )


def kill_events(engine: Engine, scope: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT decision FROM risk_events WHERE details->>'scope' = :scope AND rule = 'kill_switch' ORDER BY ts"
            ),
            {"scope": scope},
        )
        return [r[0] for r in rows]


def test_a_post_trade_check_that_raises_halts_the_account(
    database: Engine, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    # The engine's durable state lives in a database that refuses connections: the daily-loss check
    # raises on the first fill, for real.
    unreachable = make_engine(f"postgresql+psycopg://meltica:x@127.0.0.1:{free_port()}/meltica")
    clock = lambda: T0  # noqa: E731
    instrument = Instrument(
        exchange="paper", symbol=SYMBOL, base="BTC", quote="USDT", tick_size=D("0.01"), step_size=D("0.00001")
    )
    venue = InProcessVenue([instrument], clock=clock)
    for account in ("alice", "bob"):
        venue.deposit(account, "USDT", D(100_000))
        venue.deposit(account, "BTC", D(2))
    portfolio = Portfolio(valuation_currency="USDT")
    switch = KillSwitch(KillSwitchStore(database), clock=clock)
    risk = RiskEngine(
        RiskLimits(daily_loss_limit=D(100)),
        portfolio,
        clock=clock,
        instruments={("paper", SYMBOL): instrument},
        kill_switch=switch,
        state_store=RiskStateStore(unreachable),
    )

    async def body() -> None:
        oms = OrderManager(
            MemoryOrderStore(),
            {"alice": venue.adapter("alice")},
            clock=clock,
            risk=risk,
            portfolio=portfolio,
            retry=RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0),
        )
        ask = intent("ask", Side.SELL, "1", account="bob", order_type=OrderType.LIMIT, price=D(40000))
        await venue.adapter("bob").create_order(ask, ask.client_order_id)
        with caplog.at_level(logging.CRITICAL):
            bought = await oms.submit(intent("1", Side.BUY, "0.3"))
        assert bought.status is OrderStatus.FILLED, bought.reason
        # the fill is booked; the check that failed halted the account, and said so
        assert portfolio.positions(strategy="s1", include_flat=False)[0].quantity == D("0.3")
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert [a.kind for a in oms.anomalies] == ["risk_path_failure"]
        assert any("halting account:alice" in r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL)
        refused = await oms.submit(intent("2", Side.BUY, "0.3"))
        assert refused.status is OrderStatus.REJECTED and refused.reason == "kill switch halt"

    asyncio.run(asyncio.wait_for(body(), timeout=30))
    assert kill_events(database, "account:alice") == ["kill_switch_on"]  # persisted: a restart still halts
    assert KillSwitch(KillSwitchStore(database)).state_of("account:alice").mode is KillSwitchMode.HALT


def fill(n: int, side: Side, qty: str, price: str) -> Fill:
    return Fill(
        fill_id=f"f-{n}",
        client_order_id=f"c-{n}",
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        quantity=D(qty),
        price=D(price),
        fee=D(0),
        ts=T0,
    )


def test_a_breach_that_cannot_be_recorded_still_engages_the_switch_and_is_stored_once_later(
    database: Engine,
) -> None:
    clock = lambda: T0  # noqa: E731
    portfolio = Portfolio(valuation_currency="USDT")
    switch = KillSwitch(KillSwitchStore(database), clock=clock)
    recorder = RiskRecorder(database, batch_size=1)
    limits = RiskLimits(accounts={"carol": {"daily_loss_limit": D(100)}}, breach_action="reduce_only")
    risk = RiskEngine(limits, portfolio, clock=clock, kill_switch=switch, recorder=recorder)

    portfolio.apply_fill(fill(1, Side.BUY, "1", "40000"), account="carol", strategy="s1")
    portfolio.mark("paper", SYMBOL, D(40000))
    assert risk.on_fill(fill(1, Side.BUY, "1", "40000"), account="carol", strategy="s1") == []  # anchors the day

    with database.begin() as conn:  # the database refuses every risk_events write from now on
        conn.execute(text("ALTER TABLE risk_events RENAME TO risk_events_away"))
    try:
        portfolio.mark("paper", SYMBOL, D(39000))  # a loss of 1000 > 100
        breaches = risk.on_market("paper", SYMBOL, D(39000))
        assert [b.rule for b in breaches] == ["daily_loss_limit"]
        # recording failed: the switch is engaged anyway — halt, the strictest, as the breach is unrecorded
        assert switch.effective("carol", "s1") == (KillSwitchMode.HALT, "account:carol")
        assert [b.rule for b in risk.unrecorded] == ["daily_loss_limit"]
        assert switch.unsaved  # held in this process, not yet in the database
        assert risk.retry_pending() > 0  # still down: still waiting, still held
        assert switch.effective("carol", "s1")[0] is KillSwitchMode.HALT
    finally:
        with database.begin() as conn:
            conn.execute(text("ALTER TABLE risk_events_away RENAME TO risk_events"))

    assert risk.retry_pending() == 0  # the database is back: everything stored
    assert not switch.unsaved and not risk.unrecorded
    recorder.flush()  # the recorder's own retry of the same breach: same id, no second row
    with database.connect() as conn:
        breach_rows = conn.execute(
            text("SELECT count(*) FROM risk_events WHERE decision = 'breach' AND account = 'carol'")
        ).scalar_one()
    assert breach_rows == 1
    assert kill_events(database, "account:carol") == ["kill_switch_on", "kill_switch_on"]  # reduce_only, then halt
    assert KillSwitch(KillSwitchStore(database)).state_of("account:carol").mode is KillSwitchMode.HALT
    # the breaker stays armed: the same breach is not acted on twice, and the switch is not loosened
    assert risk.evaluate("carol") == []
    assert switch.effective("carol", "s1")[0] is KillSwitchMode.HALT


def test_a_halt_the_database_refuses_holds_in_the_process_and_a_release_is_refused(database: Engine) -> None:
    """The kill switch's table is gone for a while: a halt still holds (and is retried until stored); a
    release, which would loosen it without a record, is refused."""
    switch = KillSwitch(KillSwitchStore(database))
    heard: list[str] = []
    switch.subscribe(lambda change: heard.append(f"{change.scope}:{change.current.mode}"))
    with database.begin() as conn:
        conn.execute(text("ALTER TABLE kill_switch_state RENAME TO kill_switch_state_away"))
    try:
        switch.engage("halt", "operator saw a runaway strategy", "ops", scope="account:dave")
        assert switch.effective("dave", "s1") == (KillSwitchMode.HALT, "account:dave")
        assert heard == ["account:dave:halt"]  # the OMS hears it and cancels
        assert [c.scope for c in switch.unsaved] == ["account:dave"]
        with pytest.raises(InfrastructureUnavailableError, match="not stored yet"):
            switch.release("ops", "false alarm", scope="account:dave")
        assert switch.effective("dave", "s1")[0] is KillSwitchMode.HALT
        assert switch.retry_unsaved() == 1  # still failing
    finally:
        with database.begin() as conn:
            conn.execute(text("ALTER TABLE kill_switch_state_away RENAME TO kill_switch_state"))

    assert switch.retry_unsaved() == 0
    assert KillSwitch(KillSwitchStore(database)).state_of("account:dave").mode is KillSwitchMode.HALT
    switch.release("ops", "false alarm", scope="account:dave")  # now recorded, so allowed
    assert KillSwitch(KillSwitchStore(database)).state_of("account:dave").mode is KillSwitchMode.OFF
