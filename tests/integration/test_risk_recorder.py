"""RiskRecorder and RiskStateStore on a real PostgreSQL: decisions appended, never updated."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from meltica.config.settings import RiskLimits
from meltica.domain import Instrument, OrderIntent, OrderType, Side
from meltica.risk import KillSwitch, KillSwitchStore, RiskEngine, RiskRecorder, RiskStateStore

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def database(module_database: Engine) -> Engine:
    """A fresh database migrated to head, shared by this module's tests (tests/integration/conftest.py)."""
    return module_database


def intent(n: int, qty: str) -> OrderIntent:
    return OrderIntent(
        intent_id=f"rec-{n}",
        account="main",
        strategy="mm",
        exchange="binance",
        symbol="BTC/USDT",
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=Decimal(qty),
        price=Decimal(20000),
        created_at=T0,
    )


def test_decisions_are_batched_flushed_and_append_only(database: Engine) -> None:
    recorder = RiskRecorder(database, batch_size=3)
    engine = RiskEngine(
        RiskLimits(max_order_quantity=Decimal(1)),
        None,
        clock=lambda: T0,
        instruments={
            ("binance", "BTC/USDT"): Instrument(
                exchange="binance", symbol="BTC/USDT", base="BTC", quote="USDT", tick_size="0.01", step_size="0.001"
            )
        },
        kill_switch=KillSwitch(KillSwitchStore(database), clock=lambda: T0),
        recorder=recorder,
    )
    decisions = [engine.check(intent(n, "2" if n % 2 else "0.5")) for n in range(4)]
    assert recorder.written == 3 and recorder.pending == 1  # one batch of three went out
    assert recorder.flush() == 1

    with database.connect() as conn:
        rows = (
            conn.execute(text("SELECT * FROM risk_events WHERE intent_id LIKE 'rec-%' ORDER BY intent_id"))
            .mappings()
            .all()
        )
    assert [(r["intent_id"], r["decision"], r["rule"]) for r in rows] == [
        (d.intent_id, "approved" if d.approved else "rejected", d.rule) for d in decisions
    ]
    rejected = rows[1]
    assert rejected["reason"] == decisions[1].reason and "max_order_quantity 1" in rejected["reason"]
    assert rejected["details"] == {
        "exchange": "binance",
        "value": "2",
        "limit": "1",
        "source": "risk.max_order_quantity",
    }
    assert (rejected["account"], rejected["strategy"], rejected["symbol"]) == ("main", "mm", "BTC/USDT")

    with pytest.raises(DBAPIError, match="append-only"), database.begin() as conn:
        conn.execute(text("UPDATE risk_events SET reason = 'edited' WHERE intent_id = 'rec-1'"))


def test_risk_state_upserts(database: Engine) -> None:
    store = RiskStateStore(database)
    assert store.get("equity_peak:x") is None
    store.put("equity_peak:x", {"peak": Decimal("100.5")}, T0)
    store.put("equity_peak:x", {"peak": Decimal("101")}, T0)
    assert store.get("equity_peak:x") == {"peak": "101"}
