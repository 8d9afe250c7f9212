"""RiskRecorder and RiskStateStore on a real PostgreSQL: decisions appended, never updated."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from meltica.config.settings import RiskLimits
from meltica.domain import Instrument, OrderIntent, OrderType, Side
from meltica.live.processor import Incoming
from meltica.live.sinks import SinkWriter, decision_event_id
from meltica.messaging import RiskDecisionMessage
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


def test_the_recorder_and_the_decisions_sink_store_a_decision_once(database: Engine) -> None:
    """The risk gate records directly and publishes on ``risk.decisions``, whose sink also writes
    ``risk_events``: the same decision under the same id, whichever writes first, and again after a
    retry."""
    recorder = RiskRecorder(database, batch_size=1)
    engine = RiskEngine(
        RiskLimits(max_order_quantity=Decimal(1)),
        None,
        clock=lambda: T0,
        instruments={
            ("binance", "BTC/USDT"): Instrument(
                exchange="binance", symbol="BTC/USDT", base="BTC", quote="USDT", tick_size="0.01", step_size="0.001"
            )
        },
        recorder=recorder,
    )
    sent = [
        intent(100, "0.5").model_copy(update={"account": "once", "intent_id": "once-1"}),
        intent(101, "2").model_copy(update={"account": "once", "intent_id": "once-2"}),
    ]
    decisions = [engine.check(i) for i in sent]
    assert [d.approved for d in decisions] == [True, False] and decisions[1].details["limit"] == "1"
    # what the sink receives: the decision through Kafka's JSON
    wire = [
        RiskDecisionMessage.model_validate_json(RiskDecisionMessage.from_decision(d).model_dump_json())
        for d in decisions
    ]
    result = SinkWriter(database).write([Incoming(topic="risk.decisions", key=None, value=m) for m in wire])
    assert result.written.get("risk_events", 0) == 0  # both already stored by the recorder
    recorder.record(decisions[0])  # a retry after an ambiguous failure
    assert recorder.flush() == 0
    with database.connect() as conn:
        rows = conn.execute(
            text("SELECT intent_id, event_id FROM risk_events WHERE account = 'once' ORDER BY intent_id")
        ).all()
    assert [r.intent_id for r in rows] == ["once-1", "once-2"]
    assert [r.event_id for r in rows] == [decision_event_id(m) for m in wire]
