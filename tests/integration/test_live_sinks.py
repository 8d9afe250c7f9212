"""The live sinks on real PostgreSQL (``meltica.live.sinks.SinkWriter``) and as Faust agents on the real
broker (``streams.sinks.register_sinks``): every target table is written, a redelivered batch writes
nothing, an older order update does not regress an order, the OMS's own store and the sink coexist,
and a malformed message lands in the dead-letter topic while the rest is stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine, text

from meltica.domain import (
    Fill,
    LiquiditySide,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
)
from meltica.domain.market_data import Bar, BookLevel, OrderBookSnapshot, Trade
from meltica.domain.orders import (
    AnyOrderEvent,
    OrderAccepted,
    OrderCancelled,
    OrderFilled,
    OrderSubmitted,
)
from meltica.domain.portfolio import Position
from meltica.execution import OrderStore
from meltica.live.processor import Incoming
from meltica.live.sinks import SinkWriter, decision_event_id
from meltica.messaging import (
    AccountFill,
    Catalogue,
    Codec,
    DeadLetter,
    OrderUpdate,
    RejectedIntent,
    RiskDecisionMessage,
    VenueProgress,
    account_key,
    market_key,
    position_key,
)

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
SYMBOL = "BTC/USDT"


# --- builders ---------------------------------------------------------------------------------------


def bar(i: int, *, symbol: str = SYMBOL) -> Bar:
    price = D("65000.5") + i
    return Bar(
        exchange="binance",
        symbol=symbol,
        timeframe="1m",
        ts=T0 + timedelta(minutes=i),
        open=price,
        high=price + 10,
        low=price - 10,
        close=price + D("0.000000001"),
        volume=D("1.25"),
    )


def trade(i: int) -> Trade:
    return Trade(
        exchange="binance",
        symbol=SYMBOL,
        trade_id=f"t{i}",
        price=D("65000.000000001") + i,
        quantity=D("0.001"),
        aggressor_side=Side.BUY if i % 2 else None,
        ts=T0 + timedelta(seconds=i),
    )


def intent(n: int, *, account: str = "alice", qty: str = "0.5") -> OrderIntent:
    return OrderIntent(
        intent_id=f"sink-{account}-{n}",
        account=account,
        strategy="sma",
        exchange="binance",
        symbol=SYMBOL,
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=D(qty),
        price=D("64000.01"),
        created_at=T0,
    )


def fill(order: Order, fill_id: str, qty: str, *, at: int) -> Fill:
    return Fill(
        fill_id=fill_id,
        client_order_id=order.client_order_id,
        exchange_order_id="x-1",
        exchange="binance",
        symbol=SYMBOL,
        side=order.side,
        price=D("64000.01"),
        quantity=D(qty),
        fee=D("0.0000125"),
        fee_currency="BTC",
        liquidity=LiquiditySide.MAKER,
        ts=T0 + timedelta(seconds=at),
    )


def lifecycle(order_intent: OrderIntent, *, cancel: bool = False) -> list[OrderUpdate]:
    """submitted → accepted → partial fill → fill (or cancel), as the execution agent publishes them."""
    order = Order.from_intent(order_intent)
    coid = order.client_order_id
    events: list[AnyOrderEvent] = [
        OrderSubmitted(event_id="e1", client_order_id=coid, ts=T0 + timedelta(seconds=1)),
        OrderAccepted(event_id="e2", client_order_id=coid, ts=T0 + timedelta(seconds=2), exchange_order_id="x-1"),
    ]
    updates: list[OrderUpdate] = []
    for event in events:
        order = order.apply(event)
        updates.append(OrderUpdate(account=order.account, strategy="sma", order=order, event=event))
    part = OrderFilled(
        event_id="e3", client_order_id=coid, ts=T0 + timedelta(seconds=3), fill=fill(order, "f1", "0.2", at=3)
    )
    order = order.apply(part)
    updates.append(OrderUpdate(account=order.account, strategy="sma", order=order, event=part))
    last: AnyOrderEvent
    if cancel:
        last = OrderCancelled(event_id="e4", client_order_id=coid, ts=T0 + timedelta(seconds=4), reason="user")
    else:
        last = OrderFilled(
            event_id="e4", client_order_id=coid, ts=T0 + timedelta(seconds=4), fill=fill(order, "f2", "0.3", at=4)
        )
    order = order.apply(last)
    updates.append(OrderUpdate(account=order.account, strategy="sma", order=order, event=last))
    return updates


def decision(intent_id: str, *, approved: bool) -> RiskDecisionMessage:
    return RiskDecisionMessage(
        intent_id=intent_id,
        approved=approved,
        rule=None if approved else "max_position",
        reason=None if approved else "position 1.5 BTC above the limit 1 BTC",
        ts=T0 + timedelta(seconds=1),
        details={} if approved else {"limit": "1", "would_be": "1.5"},
        account="alice",
        strategy="sma",
        exchange="binance",
        symbol=SYMBOL,
    )


def position(qty: str, *, fills: int) -> Position:
    return Position(
        account="alice",
        exchange="binance",
        symbol=SYMBOL,
        strategy="sma",
        quantity=D(qty),
        avg_entry_price=D("64000.01") if D(qty) else None,
        realized_pnl=D("0.5"),
        fees=D("0.01"),
        fill_count=fills,
    )


def incoming(topic: str, value: BaseModel, *, offset: int = 0, ts: datetime | None = None) -> Incoming:
    return Incoming(topic=topic, key=None, value=value, offset=offset, timestamp=ts)


def counts(engine: Engine) -> dict[str, int]:
    tables = (
        "candles",
        "trades",
        "order_book_snapshots",
        "orders",
        "order_events",
        "fills",
        "position_snapshots",
        "risk_events",
    )
    with engine.connect() as conn:
        return {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in tables}


def order_row(engine: Engine, coid: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM orders WHERE client_order_id = :c"), {"c": coid}).mappings().one())


def event_rows(engine: Engine, coid: str) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT seq, event_type, status FROM order_events WHERE client_order_id = :c ORDER BY seq"),
            {"c": coid},
        ).all()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


# --- SinkWriter on PostgreSQL -----------------------------------------------------------------------


def test_every_target_is_written_once_and_a_redelivered_batch_writes_nothing(fresh_database: Engine) -> None:
    writer = SinkWriter(fresh_database)
    order_updates = lifecycle(intent(1))
    coid = order_updates[0].order.client_order_id
    final = order_updates[-1].order
    rejected_decision = decision("sink-alice-2", approved=False)
    book = OrderBookSnapshot(
        exchange="binance",
        symbol=SYMBOL,
        bids=(BookLevel(price=D("64999.99"), quantity=D("1.5")), BookLevel(price=D("64999.98"), quantity=D("2"))),
        asks=(BookLevel(price=D("65000.01"), quantity=D("0.25")),),
        sequence=None,
        ts=T0,
    )
    batch: list[Incoming] = [
        *(incoming("md.candles.1m", bar(i)) for i in range(3)),
        *(incoming("md.trades", trade(i)) for i in range(4)),
        incoming("md.book", book),
        *(incoming("orders.events", u) for u in order_updates),
        incoming(
            "orders.events",
            VenueProgress(account="alice", exchange="binance", symbol=SYMBOL, seq=1, phase="close", ts=T0),
        ),
        # the same fill as the order's first OrderFilled event: one row
        incoming("fills", AccountFill(account="alice", strategy="sma", fill=order_updates[2].event.fill)),  # type: ignore[union-attr]
        incoming("positions", position("0.2", fills=1), ts=T0 + timedelta(seconds=3)),
        incoming("positions", position("0.5", fills=2), ts=T0 + timedelta(seconds=4)),
        incoming("risk.decisions", decision("sink-alice-1", approved=True)),
        incoming("risk.decisions", rejected_decision),
        incoming("orders.rejected", RejectedIntent(intent=intent(2, qty="1.5"), decision=rejected_decision)),
    ]

    first = writer.write(batch)

    assert first.received == len(batch)
    assert first.ignored == 1  # the VenueProgress
    assert first.written == {
        "candles": 3,
        "trades": 4,
        "order_book_snapshots": 1,
        "orders": 1,
        "order_events": 5,  # created + 4 lifecycle events
        "fills": 2,
        "position_snapshots": 2,
        "risk_events": 2,  # the rejection on orders.rejected is the decision already in the batch
    }
    stored = counts(fresh_database)
    assert stored == first.written

    # values survive exactly (Decimals, arrays, the order's final state)
    with fresh_database.connect() as conn:
        close = conn.execute(text("SELECT close FROM candles ORDER BY ts LIMIT 1")).scalar_one()
        bids = conn.execute(text("SELECT bid_prices, bid_sizes, sequence FROM order_book_snapshots")).one()
        price = conn.execute(text("SELECT price FROM trades WHERE trade_id = 't1'")).scalar_one()
        sides = {str(r[0]): r[1] for r in conn.execute(text("SELECT trade_id, side FROM trades"))}
        risk = conn.execute(
            text("SELECT event_id, decision, rule, reason, details FROM risk_events WHERE decision = 'rejected'")
        ).one()
        pos = conn.execute(text("SELECT quantity, average_entry_price, ts FROM position_snapshots ORDER BY ts")).all()
    assert close == D("65000.500000001")
    assert bids == ([D("64999.99"), D("64999.98")], [D("1.5"), D("2")], 0)
    assert price == D("65001.000000001")
    assert sides == {"t0": None, "t1": "buy", "t2": None, "t3": "buy"}
    assert risk.event_id == decision_event_id(rejected_decision)
    assert (risk.decision, risk.rule, risk.reason) == ("rejected", "max_position", rejected_decision.reason)
    assert risk.details == {"exchange": "binance", "limit": "1", "would_be": "1.5"}
    assert [(p.quantity, p.ts) for p in pos] == [
        (D("0.2"), T0 + timedelta(seconds=3)),
        (D("0.5"), T0 + timedelta(seconds=4)),
    ]
    row = order_row(fresh_database, coid)
    assert row["status"] == "filled"
    assert row["filled_quantity"] == D("0.5")
    assert row["exchange_order_id"] == "x-1"
    assert row["last_event_seq"] == 5
    assert row["updated_at"] == final.updated_at
    assert event_rows(fresh_database, coid) == [
        (1, "created", "new"),
        (2, "submitted", "pending_submit"),
        (3, "accepted", "open"),
        (4, "filled", "partially_filled"),
        (5, "filled", "filled"),
    ]
    # the rows have the OMS store's shape: it rebuilds the order the sink stored
    rebuilt = OrderStore(fresh_database).get(coid)
    assert rebuilt is not None
    assert (rebuilt.status, rebuilt.filled_quantity, rebuilt.fill_ids) == (OrderStatus.FILLED, D("0.5"), ("f1", "f2"))

    again = writer.write(batch)
    assert again.written == {}
    assert again.total_written == 0
    assert counts(fresh_database) == stored
    assert order_row(fresh_database, coid) == row

    # a redelivered suffix split across batches differently writes nothing either
    for chunk in (batch[5:9], batch[9:]):
        assert writer.write(chunk).total_written == 0
    assert counts(fresh_database) == stored
    assert writer.batches == 4


def test_an_older_update_does_not_regress_the_order(fresh_database: Engine) -> None:
    writer = SinkWriter(fresh_database)
    updates = lifecycle(intent(7), cancel=True)
    submitted, accepted, partial, cancelled = updates
    coid = submitted.order.client_order_id

    # one update per batch, in order, up to the partial fill
    for update in (submitted, accepted, partial):
        assert writer.write([update]).written["orders"] == 1
    assert order_row(fresh_database, coid)["status"] == "partially_filled"

    # redelivery of older events (their event ids are stored): nothing at all
    assert writer.write([accepted, submitted]).total_written == 0
    # an older state re-published without an event (after a recovery): refused
    stale = OrderUpdate(account="alice", strategy="sma", order=accepted.order, event=None)
    assert writer.write([stale]).total_written == 0
    row = order_row(fresh_database, coid)
    assert (row["status"], row["filled_quantity"]) == ("partially_filled", D("0.2"))

    # an older event the sink has never seen (a zombie producer): stored as a fact, state not regressed
    late = OrderSubmitted(event_id="e-late", client_order_id=coid, ts=T0 + timedelta(seconds=1))
    zombie = OrderUpdate(account="alice", strategy="sma", order=submitted.order, event=late)
    result = writer.write([zombie])
    assert result.written == {"order_events": 1}
    assert order_row(fresh_database, coid)["status"] == "partially_filled"

    # the newer one goes through, then nothing moves a terminal order
    assert writer.write([cancelled]).written["orders"] == 1
    republished = OrderUpdate(account="alice", strategy="sma", order=partial.order, event=None)
    assert writer.write([republished, stale]).total_written == 0
    row = order_row(fresh_database, coid)
    assert (row["status"], row["filled_quantity"], row["last_event_seq"]) == ("cancelled", D("0.2"), 6)

    # a newer state re-published without an event is applied
    other = lifecycle(intent(8))
    other_coid = other[0].order.client_order_id
    writer.write(other[:2])
    moved = OrderUpdate(account="alice", strategy="sma", order=other[2].order, event=None)
    assert writer.write([moved]).written == {"orders": 1}
    assert order_row(fresh_database, other_coid)["status"] == "partially_filled"
    # a new event followed in its batch by an older state re-published: the event's state is kept
    older = OrderUpdate(account="alice", strategy="sma", order=other[1].order, event=None)
    assert writer.write([other[3], older]).written == {"orders": 1, "order_events": 1, "fills": 1}
    assert order_row(fresh_database, other_coid)["status"] == "filled"


def test_the_oms_store_and_the_sink_write_each_event_once(fresh_database: Engine) -> None:
    """The execution agent may persist through ``OrderStore`` and publish; the sink then adds nothing."""
    store = OrderStore(fresh_database)
    updates = lifecycle(intent(9))
    coid = updates[0].order.client_order_id
    # the OMS writes the order and its first two events (write-ahead), then the sink sees all four
    first = updates[0]
    assert first.event is not None
    store.insert_order(Order.from_intent(first.order.intent), None)
    for update in updates[:2]:
        assert update.event is not None
        store.append_event(update.order, update.event)
    oms_events = event_rows(fresh_database, coid)
    assert len(oms_events) == 3

    result = SinkWriter(fresh_database).write(updates)

    assert result.written["order_events"] == 2  # only the two the OMS had not stored
    assert result.written["fills"] == 2
    assert event_rows(fresh_database, coid) == [
        *oms_events,
        (4, "filled", "partially_filled"),
        (5, "filled", "filled"),
    ]
    assert order_row(fresh_database, coid)["status"] == "filled"
    # and the OMS appending an event the sink already stored is a no-op for it too
    last = updates[-1]
    assert last.event is not None
    assert store.append_event(last.order, last.event) is None


def test_a_batch_is_one_transaction(fresh_database: Engine) -> None:
    """A failing batch leaves nothing behind (its valid rows are written when it is redelivered)."""
    writer = SinkWriter(fresh_database)
    updates = lifecycle(intent(11))
    bad = incoming("positions", position("0.5", fills=2))  # no record timestamp
    with pytest.raises(ValueError, match="timestamp"):
        writer.write([incoming("md.candles.1m", bar(0)), *updates, bad])
    assert set(counts(fresh_database).values()) == {0}

    # a database-side failure (a bar the candles table refuses) rolls back the whole batch too
    broken = bar(1).model_copy(update={"low": D("70000")})
    with pytest.raises(Exception, match="low_is_lowest"):
        writer.write(
            [
                incoming("md.candles.1m", bar(0)),
                *(incoming("orders.events", u) for u in updates),
                incoming("md.candles.1m", broken),
            ]
        )
    assert set(counts(fresh_database).values()) == {0}


def test_position_snapshots_store_changes_and_the_latest_record_wins(fresh_database: Engine) -> None:
    writer = SinkWriter(fresh_database)

    def snap(qty: str, fills: int, second: int) -> Incoming:
        return incoming("positions", position(qty, fills=fills), ts=T0 + timedelta(seconds=second))

    def stored() -> list[tuple[D, int]]:
        with fresh_database.connect() as conn:
            rows = conn.execute(text("SELECT quantity, ts FROM position_snapshots ORDER BY ts")).all()
        return [(r.quantity, int((r.ts - T0).total_seconds())) for r in rows]

    assert writer.write([snap("0.5", 1, 0)]).written == {"position_snapshots": 1}
    # a change, a change back, and the same position re-published later (not a change): two rows
    assert writer.write([snap("0.2", 2, 1), snap("0.5", 3, 2), snap("0.5", 3, 3)]).written == {"position_snapshots": 2}
    # re-published in a later batch: nothing; redelivered: nothing
    assert writer.write([snap("0.5", 3, 9)]).total_written == 0
    assert writer.write([snap("0.2", 2, 1)]).total_written == 0
    # two records with one timestamp: the later one (partition order) wins, also against a stored row
    assert writer.write([snap("0.7", 4, 5), snap("0.8", 5, 5)]).written == {"position_snapshots": 1}
    assert writer.write([snap("0.9", 6, 5)]).written == {"position_snapshots": 1}
    assert stored() == [(D("0.5"), 0), (D("0.2"), 1), (D("0.5"), 2), (D("0.9"), 5)]


def test_a_self_trade_stores_both_legs_and_a_marked_position_its_mark(fresh_database: Engine) -> None:
    writer = SinkWriter(fresh_database)
    buy_leg = Fill(
        fill_id="77",
        client_order_id="mlt-buy",
        exchange_order_id="1",
        exchange="binance",
        symbol=SYMBOL,
        side=Side.BUY,
        price=D("64000.01"),
        quantity=D("0.01"),
        fee=D("0.00001"),
        fee_currency="BTC",
        liquidity=LiquiditySide.MAKER,
        ts=T0,
    )
    sell_leg = buy_leg.model_copy(update={"client_order_id": "mlt-sell", "exchange_order_id": "2", "side": Side.SELL})
    legs = [incoming("fills", AccountFill(account="alice", strategy="sma", fill=f)) for f in (buy_leg, sell_leg)]
    assert writer.write(legs).written == {"fills": 2}
    assert writer.write(legs).total_written == 0  # redelivered: nothing
    marked = position("0.5", fills=1).model_copy(
        update={"mark_price": D("65000"), "unrealized_pnl_at_mark": D("494.995")}
    )
    assert writer.write([incoming("positions", marked, ts=T0)]).written == {"position_snapshots": 1}
    remarked = marked.model_copy(update={"mark_price": D("65001"), "unrealized_pnl_at_mark": D("495.495")})
    assert writer.write([incoming("positions", remarked, ts=T0 + timedelta(seconds=60))]).written == {
        "position_snapshots": 1
    }
    with fresh_database.connect() as conn:
        rows = conn.execute(text("SELECT mark_price, unrealized_pnl FROM position_snapshots ORDER BY ts")).all()
        sides = conn.execute(text("SELECT side, client_order_id FROM fills WHERE trade_id = '77' ORDER BY side")).all()
    assert [tuple(r) for r in rows] == [(D("65000"), D("494.995")), (D("65001"), D("495.495"))]
    assert [tuple(r) for r in sides] == [("buy", "mlt-buy"), ("sell", "mlt-sell")]


def test_failures_are_classified_for_the_shell(fresh_database: Engine, free_port: Callable[[], int]) -> None:
    from meltica.live.sinks import failure_kind
    from meltica.storage.engine import make_engine

    writer = SinkWriter(fresh_database)
    with pytest.raises(Exception, match="NUL") as refused:
        writer.write([bar(0, symbol="BTC/\x00USDT")])  # PostgreSQL text cannot hold NUL
    assert failure_kind(refused.value) == "refused"
    with pytest.raises(Exception, match="low_is_lowest") as constraint:
        writer.write([bar(1).model_copy(update={"low": D("70000")})])
    assert failure_kind(constraint.value) == "refused"

    nowhere = make_engine(fresh_database.url.set(host="127.0.0.1", port=free_port()))
    try:
        with pytest.raises(Exception, match=r"(?i)connect") as outage:
            SinkWriter(nowhere).write([bar(0)])
    finally:
        nowhere.dispose()
    assert failure_kind(outage.value) == "outage"
    assert failure_kind(RuntimeError("a bug")) == "bug"
    assert counts(fresh_database)["candles"] == 0


# --- the Faust agents on the real broker ------------------------------------------------------------


def _published(codec: Codec) -> list[tuple[str, str, bytes]]:
    """(logical topic, key, value): candles, order updates, fills, a position, decisions, a rejection."""
    updates = lifecycle(intent(21))
    fills = [u.event.fill for u in updates if isinstance(u.event, OrderFilled)]
    rejected = decision("sink-alice-22", approved=False)
    out: list[tuple[str, str, BaseModel]] = [
        *(("md.candles.1m", market_key("binance", SYMBOL), bar(i)) for i in range(5)),
        *(("orders.events", account_key("alice"), u) for u in updates),
        (
            "orders.events",
            account_key("alice"),
            VenueProgress(account="alice", exchange="binance", symbol=SYMBOL, seq=1, phase="close", ts=T0),
        ),
        *(("fills", account_key("alice"), AccountFill(account="alice", strategy="sma", fill=f)) for f in fills),
        ("positions", position_key("alice", "binance", SYMBOL, "sma"), position("0.5", fills=2)),
        ("risk.decisions", account_key("alice"), decision("sink-alice-21", approved=True)),
        ("risk.decisions", account_key("alice"), rejected),
        ("orders.rejected", account_key("alice"), RejectedIntent(intent=intent(22, qty="1.5"), decision=rejected)),
    ]
    return [(topic, key, codec.encode(topic, model)) for topic, key, model in out]


def test_sink_agents_store_a_mix_dead_letter_the_malformed_and_ignore_a_republish(
    kafka_endpoint: Any, fresh_database: Engine, unique_name: Callable[[str], str]
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from meltica.messaging.admin import create_topics
    from streams.app import make_app
    from streams.sinks import register_sinks
    from streams.topics import StreamTopics

    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("t") + ".")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    published = _published(codec)
    malformed = json.dumps({"schema": "Bar", "version": 1, "data": {"exchange": "binance"}}).encode()
    # decodes, but PostgreSQL refuses it (NUL in a text): the agent isolates it and dead-letters it
    poison = codec.encode("md.candles.1m", bar(9, symbol="BTC/\x00USDT"))
    group = unique_name("test-sinks")
    expected = {
        "candles": 5,
        "orders": 1,
        "order_events": 5,
        "fills": 2,
        "position_snapshots": 1,
        "risk_events": 2,
    }

    async def publish(producer: Any, items: Sequence[tuple[str, str, bytes]]) -> None:
        for topic, key, value in items:
            await producer.send_and_wait(catalogue.topic_name(topic), key=key.encode(), value=value)

    async def wait_for(condition: Callable[[], bool], seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while not condition():
                await asyncio.sleep(0.05)

    async def scenario() -> tuple[
        dict[str, int], dict[str, int], list[DeadLetter], dict[str, int], dict[tuple[str, str], int]
    ]:
        app = make_app(bootstrap, group)
        topics = StreamTopics(app, catalogue=catalogue, codec=codec)
        sinks = register_sinks(app, topics, fresh_database, batch_size=50, within=0.2)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            candle_key = market_key("binance", SYMBOL).encode()
            await publish(producer, published[:3])
            await producer.send_and_wait(catalogue.topic_name("md.candles.1m"), key=candle_key, value=malformed)
            await producer.send_and_wait(catalogue.topic_name("md.candles.1m"), key=candle_key, value=poison)
            await publish(producer, published[3:])
            await app.start()
            try:
                total = len(published) + 2
                await wait_for(lambda: sum(sinks.events.values()) >= total, 60)
                first = counts(fresh_database)
                # the same messages published again (new offsets): consumed, nothing new written
                await publish(producer, published)
                await wait_for(lambda: sum(sinks.events.values()) >= total + len(published), 30)
                second = counts(fresh_database)
            finally:
                await app.stop()
        finally:
            await producer.stop()

        reader = AIOKafkaConsumer(
            catalogue.topic_name("dlq"),
            bootstrap_servers=bootstrap,
            group_id=unique_name("test-sinks-dlq"),
            auto_offset_reset="earliest",
        )
        await reader.start()
        letters: list[DeadLetter] = []
        try:
            async with asyncio.timeout(20):
                while len(letters) < 2:
                    for messages in (await reader.getmany(timeout_ms=500)).values():
                        letters.extend(codec.decode("dlq", m.value) for m in messages)
        finally:
            await reader.stop()

        # graceful stop committed every consumed offset of the sink topics
        offsets = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await offsets.start()
        lag: dict[str, int] = {}
        try:
            for name in ("md.candles.1m", "orders.events", "fills", "positions", "risk.decisions"):
                physical = catalogue.topic_name(name)
                partitions = [TopicPartition(physical, p) for p in range(catalogue.spec(name).partitions)]
                ends = await offsets.end_offsets(partitions)
                lag[name] = 0
                for tp in partitions:
                    lag[name] += ends[tp] - ((await offsets.committed(tp)) or 0)
        finally:
            await offsets.stop()
        return first, second, letters, lag, dict(topics.dead_letter_counts)

    first, second, letters, lag, dead = asyncio.run(scenario())

    assert {t: n for t, n in first.items() if n} == expected
    assert second == first
    candles_topic = catalogue.topic_name("md.candles.1m")
    letters.sort(key=lambda d: d.offset)
    assert [(d.topic, d.offset, d.error_type) for d in letters] == [
        (candles_topic, 3, "validation_error"),
        (candles_topic, 4, "sink_rejected"),
    ]
    assert letters[0].original_bytes() == malformed
    assert letters[1].original_bytes() == poison
    assert "NUL" in letters[1].reason
    assert dead == {(candles_topic, "validation_error"): 1, (candles_topic, "sink_rejected"): 1}
    assert lag == {name: 0 for name in lag}
    with fresh_database.connect() as conn:
        status = conn.execute(text("SELECT status, filled_quantity FROM orders")).one()
        snapshot_ts = conn.execute(text("SELECT ts FROM position_snapshots")).scalar_one()
    assert tuple(status) == ("filled", D("0.5"))
    assert snapshot_ts.tzinfo is not None


def test_graceful_stop_flushes_the_partial_batch_and_commits(
    kafka_endpoint: Any, fresh_database: Engine, unique_name: Callable[[str], str]
) -> None:
    """A batch still waiting for its ``within`` when the app stops is written and its offsets committed
    before the stop returns (Faust's ``stream_wait_empty``: the stop waits for the acks)."""
    import faust
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from meltica.messaging.admin import create_topics
    from streams.app import make_app
    from streams.sinks import register_sinks
    from streams.topics import StreamTopics

    bootstrap = kafka_endpoint.bootstrap_servers
    catalogue = Catalogue(prefix=unique_name("t") + ".")
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    physical = catalogue.topic_name("md.candles.1m")
    group = unique_name("test-sinks-stop")
    seen: list[int] = []
    all_seen = asyncio.Event()

    class SeenInStream(faust.Sensor):
        def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
            if tp.topic == physical:
                seen.append(offset)
                if len(seen) == 3:
                    all_seen.set()

    async def scenario() -> tuple[int, int, int]:
        app = make_app(bootstrap, group)
        app.sensors.add(SeenInStream())
        topics = StreamTopics(app, catalogue=catalogue, codec=codec)
        # the batch can only be handed over by its ``within`` (3 s) or by the stop
        sinks = register_sinks(app, topics, fresh_database, batch_size=1000, within=3.0, names=["md.candles.1m"])
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(3):
                key = market_key("binance", SYMBOL).encode()
                await producer.send_and_wait(physical, key=key, value=codec.encode("md.candles.1m", bar(i)))
        finally:
            await producer.stop()
        await app.start()
        try:
            async with asyncio.timeout(30):
                await all_seen.wait()
            written_before_stop = sinks.writer.written_total.get("candles", 0)
        finally:
            await app.stop()
        reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await reader.start()
        try:
            partitions = [TopicPartition(physical, p) for p in range(catalogue.spec("md.candles.1m").partitions)]
            ends = await reader.end_offsets(partitions)
            lag = 0
            for tp in partitions:
                lag += ends[tp] - ((await reader.committed(tp)) or 0)
        finally:
            await reader.stop()
        return written_before_stop, sinks.writer.written_total.get("candles", 0), lag

    before, after, lag = asyncio.run(scenario())
    assert before == 0
    assert after == 3
    assert counts(fresh_database)["candles"] == 3
    assert lag == 0


def test_a_leg_held_by_the_local_emulation_is_not_stored_as_a_venue_order(fresh_database: Engine) -> None:
    """An order list's leg the execution stage's emulation holds (``OrderUpdate.held``) never reached the
    venue under its own id: its child orders are the venue orders and carry the fills. Stored in ``orders``
    it would look like an open venue order to recovery and reconciliation, so the sink ignores it."""
    writer = SinkWriter(fresh_database)
    leg = lifecycle(intent(9))[0]
    held = OrderUpdate(account="alice", strategy="sma", order=leg.order, event=None, held=True)
    result = writer.write([held])
    assert (result.received, result.ignored, result.total_written) == (1, 1, 0)
    assert counts(fresh_database)["orders"] == 0
    assert writer.write([leg]).written["orders"] == 1  # the same order as a venue order is stored
