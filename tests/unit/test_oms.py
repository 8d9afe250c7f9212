"""OrderManager on the paper venue with the in-memory store: submit, idempotency, events, cancel,
amend, retries, risk and kill switch, recovery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any, TypeVar

import pytest

from meltica.adapters.base import UserEvent, UserEventKind, VenueOrder
from meltica.adapters.in_process import InProcessAdapter, InProcessVenue
from meltica.domain import (
    Fill,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
)
from meltica.errors import (
    ConfigurationError,
    ExchangeUnavailableError,
    IllegalStateTransitionError,
    InvalidOrderError,
    NetworkError,
    OrderNotFoundError,
    RateLimitError,
    RequestTimeoutError,
)
from meltica.execution import NEVER_REACHED_VENUE, MemoryOrderStore, OrderManager, RetryPolicy
from meltica.execution.store import ILLEGAL_TRANSITION, RECOVERED
from meltica.portfolio import Portfolio
from meltica.risk import KillSwitch, KillSwitchMode
from tests.kit import ManualClock, spot_instrument

T = TypeVar("T")
SYMBOL = "BTC/USDT"
T0 = datetime(2024, 1, 10, tzinfo=UTC)
FAST = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, resolve_attempts=2)


async def turns_until(condition: Callable[[], bool], what: str, turns: int = 200) -> None:
    """Let the event loop run (no wall clock: the venue is in this process) until ``condition`` holds;
    fail naming ``what`` if it still does not after ``turns`` turns."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition(), f"not after {turns} event-loop turns: {what}"


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(body(), timeout=20))


def make_venue() -> tuple[InProcessVenue, ManualClock]:
    clock = ManualClock(T0)
    instrument = spot_instrument(SYMBOL)
    venue = InProcessVenue([instrument], clock=clock)
    for account in ("alice", "bob"):
        venue.deposit(account, "USDT", D(100_000))
        venue.deposit(account, "BTC", D(2))
    return venue, clock


_n = iter(range(1, 10**9))


def intent(
    side: Side = Side.BUY,
    order_type: OrderType = OrderType.LIMIT,
    qty: str = "0.5",
    *,
    account: str = "alice",
    strategy: str = "s1",
    intent_id: str | None = None,
    **kw: Any,
) -> OrderIntent:
    if order_type is OrderType.LIMIT:
        kw.setdefault("price", D("40000"))
    return OrderIntent(
        intent_id=intent_id or f"i-{next(_n)}",
        account=account,
        strategy=strategy,
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        type=order_type,
        quantity=D(qty),
        created_at=T0,
        **kw,
    )


class Recorder:
    """Stands in for Portfolio and RiskEngine: records what the OMS hands them."""

    def __init__(self, approve: bool = True) -> None:
        self.fills: list[Fill] = []
        self.risk_fills: list[Fill] = []
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.approve = approve

    def apply_fill(self, fill: Fill, *, account: str, strategy: str) -> None:
        self.fills.append(fill)

    def check(self, intent: OrderIntent) -> Any:
        @dataclass
        class Decision:
            approved: bool
            rule: str | None
            reason: str | None

        return Decision(self.approve, None if self.approve else "max_qty", None if self.approve else "too big")

    def on_fill(self, fill: Fill, *, account: str, strategy: str) -> list[Any]:
        self.risk_fills.append(fill)
        return []

    def on_order_open(self, client_order_id: str, intent: OrderIntent) -> None:
        self.opened.append(client_order_id)

    def on_order_closed(self, client_order_id: str) -> None:
        self.closed.append(client_order_id)


def make_oms(
    venue: InProcessVenue, clock: ManualClock, store: MemoryOrderStore | None = None, **kw: Any
) -> tuple[OrderManager, MemoryOrderStore]:
    store = store or MemoryOrderStore()
    venues = kw.pop("venues", None) or {"alice": venue.adapter("alice")}
    kw.setdefault("retry", FAST)
    return OrderManager(store, venues, clock=clock, **kw), store


def assert_row_matches(store: MemoryOrderStore, oms: OrderManager, coid: str) -> None:
    order = oms.order(coid)
    row = store.order_row(coid)
    assert row is not None
    assert row["status"] == order.status.value
    assert row["filled_quantity"] == order.filled_quantity
    assert row["average_fill_price"] == order.avg_fill_price
    assert row["exchange_order_id"] == order.exchange_order_id
    assert row["quantity"] == order.quantity and row["price"] == order.price
    assert store.get(coid) == order  # replaying the stored events gives the in-memory order
    fills = store.fills_of(coid)
    assert sorted(f["trade_id"] for f in fills) == sorted(order.fill_ids)
    assert sum((f["quantity"] for f in fills), D(0)) == order.filled_quantity
    seqs = [e["seq"] for e in store.events_of(coid)]
    assert seqs == list(range(1, len(seqs) + 1)) and row["last_event_seq"] == len(seqs)


async def rest_ask(venue: InProcessVenue, price: str = "40000", qty: str = "1") -> None:
    """Bob's resting sell, the liquidity alice's buys take."""
    bob = venue.adapter("bob")
    ask = intent(Side.SELL, OrderType.LIMIT, qty, account="bob", price=D(price))
    await bob.create_order(ask, ask.client_order_id)


# --- submit ------------------------------------------------------------------------------------


def test_submit_stores_before_sending_and_a_known_intent_never_sends_twice() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        adapter = oms.venues["alice"]
        seen_in_store: list[str | None] = []
        original = adapter.create_order

        async def spying(i: OrderIntent, coid: str) -> VenueOrder:
            row = store.order_row(coid)
            seen_in_store.append(None if row is None else row["status"])
            return await original(i, coid)

        adapter.create_order = spying  # type: ignore[method-assign,assignment]
        it = intent()
        order = await oms.submit(it)
        assert order.status is OrderStatus.OPEN and order.exchange_order_id
        assert seen_in_store == ["pending_submit"]  # write-ahead: committed before the venue call
        again = await oms.submit(it)
        assert again == order
        # a fresh OMS on the same store (a restart) also finds it instead of sending
        oms2, _ = make_oms(venue, clock, store, venues={"alice": adapter})
        assert (await oms2.submit(it)).client_order_id == order.client_order_id
        assert seen_in_store == ["pending_submit"]
        assert len(await adapter.fetch_open_orders(SYMBOL)) == 1
        assert [e["event_type"] for e in store.events_of(order.client_order_id)] == [
            "created",
            "submitted",
            "accepted",
        ]
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_market_order_fills_are_recorded_once_and_stream_replays_change_nothing() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        rec = Recorder()
        oms, store = make_oms(venue, clock, portfolio=rec, risk=rec)
        adapter = oms.venues["alice"]
        stream = adapter.stream_user_events()
        events: list[UserEvent] = []

        async def collect() -> None:
            async for e in stream:
                events.append(e)

        task = asyncio.create_task(collect())
        await asyncio.sleep(0)  # the collector subscribes before the order exists (a condition, not a wait)
        await rest_ask(venue)
        order = await oms.submit(intent(order_type=OrderType.MARKET, qty="0.3"))
        await turns_until(lambda: any(e.kind is UserEventKind.FILL for e in events), "the stream's fill")
        # the REST answer said filled: the OMS fetched the trades itself
        assert order.status is OrderStatus.FILLED and order.filled_quantity == D("0.3")
        assert len(rec.fills) == 1 and len(rec.risk_fills) == 1
        assert rec.opened == [order.client_order_id] and rec.closed == [order.client_order_id]
        # the stream delivers the same order update and fill (twice): nothing changes
        for e in events + events:
            await oms.on_user_event(e)
        assert oms.order(order.client_order_id) == order
        assert len(rec.fills) == 1
        assert_row_matches(store, oms, order.client_order_id)
        task.cancel()

    run(body)


def test_stream_driven_partial_fills_and_fill_before_ack() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        rec = Recorder()
        oms, store = make_oms(venue, clock, portfolio=rec)
        await oms.start()
        await asyncio.sleep(0)  # the OMS's user stream subscribes before the order exists
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        assert order.status is OrderStatus.OPEN
        bob = venue.adapter("bob")
        sell = intent(Side.SELL, OrderType.MARKET, "0.2", account="bob")
        await bob.create_order(sell, sell.client_order_id)
        coid = order.client_order_id
        await turns_until(lambda: oms.order(coid).filled_quantity > 0, "the stream's fill applied")
        now = oms.order(order.client_order_id)
        assert now.status is OrderStatus.PARTIALLY_FILLED and now.filled_quantity == D("0.2")
        assert len(rec.fills) == 1
        assert_row_matches(store, oms, order.client_order_id)
        await oms.stop()

        # A fill that arrives before the acknowledgement: pending_submit → partially_filled.
        it = intent(qty="1")
        pending = it.client_order_id
        stored = await _pending_only(oms, it)
        assert stored.status is OrderStatus.PENDING_SUBMIT
        fill = Fill(
            fill_id="x-1",
            client_order_id=pending,
            exchange_order_id="99",
            exchange="paper",
            symbol=SYMBOL,
            side=Side.BUY,
            price=D("40000"),
            quantity=D("0.4"),
            ts=T0,
        )
        await oms.on_user_event(UserEvent(UserEventKind.FILL, T0, fill=fill))
        assert oms.order(pending).status is OrderStatus.PARTIALLY_FILLED
        ack = _vo(pending, OrderStatus.OPEN, "0", exchange_order_id="99")
        await oms.on_user_event(UserEvent(UserEventKind.ORDER, T0, order=ack))
        assert oms.order(pending).status is OrderStatus.PARTIALLY_FILLED  # the late ack keeps the status
        assert_row_matches(store, oms, pending)

    run(body)


def _vo(coid: str, status: OrderStatus, filled: str, *, qty: str = "1", exchange_order_id: str = "99") -> VenueOrder:
    return VenueOrder(
        exchange="paper",
        symbol=SYMBOL,
        client_order_id=coid,
        exchange_order_id=exchange_order_id,
        status=status,
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=D(qty),
        filled_quantity=D(filled),
        price=D("40000"),
    )


async def _pending_only(oms: OrderManager, it: OrderIntent) -> Any:
    """Store an order as the OMS would just before sending (write-ahead), without sending it."""
    from meltica.domain import Order, OrderSubmitted

    event = OrderSubmitted(event_id="submitted", client_order_id=it.client_order_id, ts=T0)
    order = Order.from_intent(it).apply(event)
    oms.store.insert_order(order, event)
    return oms.order(it.client_order_id)


def test_cancel_update_before_its_fills_is_held_until_they_arrive() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        it = intent(qty="1")
        coid = it.client_order_id
        await _pending_only(oms, it)
        await oms.on_user_event(UserEvent(UserEventKind.ORDER, T0, order=_vo(coid, OrderStatus.CANCELLED, "0.3")))
        assert oms.order(coid).status is OrderStatus.OPEN  # acknowledged; the cancel waits for its fill
        fill = Fill(
            fill_id="f1",
            client_order_id=coid,
            exchange_order_id="99",
            exchange="paper",
            symbol=SYMBOL,
            side=Side.BUY,
            price=D("40000"),
            quantity=D("0.3"),
            ts=T0,
        )
        await oms.on_user_event(UserEvent(UserEventKind.FILL, T0, fill=fill))
        final = oms.order(coid)
        assert final.status is OrderStatus.CANCELLED and final.filled_quantity == D("0.3")
        assert_row_matches(store, oms, coid)
        # a contradicting terminal update afterwards is recorded, not applied
        await oms.on_user_event(UserEvent(UserEventKind.ORDER, T0, order=_vo(coid, OrderStatus.EXPIRED, "0.3")))
        assert oms.order(coid).status is OrderStatus.CANCELLED
        assert [e for e in store.events_of(coid) if e["event_type"] == ILLEGAL_TRANSITION]
        assert oms.anomalies

    run(body)


def test_venue_refusal_is_a_rejected_order_with_the_reason() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        order = await oms.submit(intent(qty="100", price=D("40000")))  # 4M USDT: far more than alice has
        assert order.status is OrderStatus.REJECTED
        assert order.reason and "insufficient" in order.reason
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


# --- cancel / cancel all / amend -------------------------------------------------------------


def test_cancel_and_cancel_all_filters() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        a = await oms.submit(intent(strategy="s1", price=D("30000")))
        b = await oms.submit(intent(strategy="s2", price=D("30001")))
        c = await oms.submit(intent(strategy="s2", price=D("30002")))
        cancelled = await oms.cancel(a.client_order_id)
        assert cancelled.status is OrderStatus.CANCELLED
        assert (await oms.cancel(a.client_order_id)) == cancelled  # idempotent
        kinds = [e["event_type"] for e in store.events_of(a.client_order_id)]
        assert kinds[-2:] == ["cancel_requested", "cancelled"]
        out = await oms.cancel_all(strategy="s2")
        assert {o.client_order_id for o in out} == {b.client_order_id, c.client_order_id}
        assert all(o.status is OrderStatus.CANCELLED for o in out)
        assert await oms.venues["alice"].fetch_open_orders(SYMBOL) == []
        assert await oms.cancel_all(account="alice", symbol=SYMBOL) == []
        for o in (a, b, c):
            assert_row_matches(store, oms, o.client_order_id)

    run(body)


def test_cancelling_a_filled_order_is_refused_and_recorded() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        await rest_ask(venue)
        filled = await oms.submit(intent(order_type=OrderType.MARKET, qty="0.1"))
        assert filled.status is OrderStatus.FILLED
        with pytest.raises(IllegalStateTransitionError):
            await oms.cancel(filled.client_order_id)
        assert store.events_of(filled.client_order_id)[-1]["event_type"] == ILLEGAL_TRANSITION
        assert oms.order(filled.client_order_id).status is OrderStatus.FILLED

    run(body)


def test_cancel_races_a_fill() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        bob = venue.adapter("bob")
        sell = intent(Side.SELL, OrderType.MARKET, "0.2", account="bob")
        await bob.create_order(sell, sell.client_order_id)  # the OMS has not seen this fill
        done = await oms.cancel(order.client_order_id)
        assert done.status is OrderStatus.CANCELLED and done.filled_quantity == D("0.2")
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_amend_price_cancel_replaces_and_amend_quantity_down_is_in_place() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        order = await oms.submit(intent(qty="0.5", price=D("39000")))
        reduced = await oms.amend(order.client_order_id, quantity=D("0.3"))
        assert reduced.client_order_id == order.client_order_id
        assert reduced.quantity == D("0.3") and reduced.status is OrderStatus.OPEN
        moved = await oms.amend(order.client_order_id, price=D("39500"))
        assert moved.client_order_id != order.client_order_id
        assert moved.status is OrderStatus.OPEN and moved.price == D("39500") and moved.quantity == D("0.3")
        assert oms.order(order.client_order_id).status is OrderStatus.CANCELLED
        assert store.order_row(moved.client_order_id)["parent_client_order_id"] == order.client_order_id  # type: ignore[index]
        on_venue = await oms.venues["alice"].fetch_open_orders(SYMBOL)
        assert [o.client_order_id for o in on_venue] == [moved.client_order_id]
        for coid in (order.client_order_id, moved.client_order_id):
            assert_row_matches(store, oms, coid)
        # the unused replacement of the in-place amendment is stored, and closed
        kids = [r for r in store.orders.values() if r["parent_client_order_id"] == order.client_order_id]
        assert sorted(r["status"] for r in kids) == ["cancelled", "open"]

    run(body)


# --- retries and timeouts ----------------------------------------------------------------------


class Flaky:
    """Wraps a paper adapter: scripted failures of create_order, before or after executing."""

    def __init__(self, inner: InProcessAdapter, script: list[tuple[str, Exception]]) -> None:
        self.inner = inner
        self.script = script
        self.creates = 0
        self.fetches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def create_order(self, i: OrderIntent, coid: str) -> VenueOrder:
        self.creates += 1
        if self.script:
            when, exc = self.script.pop(0)
            if when == "after":
                await self.inner.create_order(i, coid)
            raise exc
        return await self.inner.create_order(i, coid)

    async def fetch_order(self, symbol: str, **kw: Any) -> VenueOrder:
        self.fetches += 1
        return await self.inner.fetch_order(symbol, **kw)


def test_timeout_after_execution_is_resolved_by_client_order_id_without_resending() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        flaky = Flaky(venue.adapter("alice"), [("after", RequestTimeoutError("lost"))])
        oms, _store = make_oms(venue, clock, venues={"alice": flaky})
        order = await oms.submit(intent())
        assert order.status is OrderStatus.OPEN
        assert flaky.creates == 1 and flaky.fetches == 1
        assert len(await flaky.inner.fetch_open_orders(SYMBOL)) == 1

    run(body)


def test_retryable_failures_before_execution_are_retried_with_backoff() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        slept: list[float] = []

        async def sleep(s: float) -> None:
            slept.append(s)

        script: list[tuple[str, Exception]] = [
            ("before", NetworkError("reset")),
            ("before", RateLimitError("slow down", retry_after=0.5)),
        ]
        flaky = Flaky(venue.adapter("alice"), script)
        oms, _ = make_oms(venue, clock, venues={"alice": flaky}, sleep=sleep)
        order = await oms.submit(intent())
        assert order.status is OrderStatus.OPEN
        assert flaky.creates == 3 and flaky.fetches == 1  # the network error was resolved first
        assert len(slept) == 2 and slept[1] == 0.5
        assert len(await flaky.inner.fetch_open_orders(SYMBOL)) == 1

    run(body)


def test_exhausted_retries_leave_the_order_pending_for_recovery() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        script = [("before", ExchangeUnavailableError("503")) for _ in range(3)]
        flaky = Flaky(venue.adapter("alice"), script)  # type: ignore[arg-type]
        oms, _store = make_oms(venue, clock, venues={"alice": flaky})
        it = intent()
        with pytest.raises(ExchangeUnavailableError):
            await oms.submit(it)
        assert oms.order(it.client_order_id).status is OrderStatus.PENDING_SUBMIT
        report = await oms.recover()
        assert report.outcome("never_reached_venue")[0].client_order_id == it.client_order_id
        assert oms.order(it.client_order_id).reason == NEVER_REACHED_VENUE

    run(body)


# --- risk, kill switch ------------------------------------------------------------------------


class Switch:
    def __init__(self) -> None:
        self.listeners: list[Callable[[Any], Any]] = []
        self.state = type("State", (), {"mode": "off"})()

    def subscribe(self, callback: Callable[[Any], Any]) -> None:
        self.listeners.append(callback)

    def engage(self, mode: str) -> None:
        self.state = type("State", (), {"mode": mode})()
        for cb in self.listeners:
            cb(self.state)


def test_risk_rejection_is_stored_and_kill_switch_halt_cancels_everything() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        switch = Switch()
        rec = Recorder(approve=False)
        oms, store = make_oms(venue, clock, risk=rec, kill_switch=switch)
        refused = await oms.submit(intent())
        assert refused.status is OrderStatus.REJECTED and refused.reason == "risk: max_qty: too big"
        assert_row_matches(store, oms, refused.client_order_id)
        rec.approve = True
        a = await oms.submit(intent(price=D("30000")))
        b = await oms.submit(intent(price=D("30001"), strategy="other"))
        switch.engage("halt")
        await turns_until(
            lambda: (
                {oms.order(a.client_order_id).status, oms.order(b.client_order_id).status} == {OrderStatus.CANCELLED}
            ),
            "the halt's cancels",
        )
        assert oms.order(a.client_order_id).status is OrderStatus.CANCELLED
        assert oms.order(b.client_order_id).status is OrderStatus.CANCELLED
        blocked = await oms.submit(intent())
        assert blocked.status is OrderStatus.REJECTED and blocked.reason == "kill switch halt"

    run(body)


# --- recovery -----------------------------------------------------------------------------------


def test_recovery_settles_pending_filled_and_cancelled_orders() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        adapter = venue.adapter("alice")
        oms, store = make_oms(venue, clock, venues={"alice": adapter})
        resting = await oms.submit(intent(qty="0.5", price=D("40000")))
        to_cancel = await oms.submit(intent(qty="0.1", price=D("30000")))
        still_open = await oms.submit(intent(qty="0.1", price=D("30001")))
        never_sent = intent(qty="0.1", price=D("30002"))
        await _pending_only(oms, never_sent)
        # sent, the process died before storing the answer
        sent_unrecorded = intent(qty="0.1", price=D("30003"))
        await _pending_only(oms, sent_unrecorded)
        await adapter.create_order(sent_unrecorded, sent_unrecorded.client_order_id)
        # while "down": the resting order fills, another is cancelled on the venue
        sell = intent(Side.SELL, OrderType.MARKET, "0.5", account="bob")
        await venue.adapter("bob").create_order(sell, sell.client_order_id)
        await adapter.cancel_order(SYMBOL, client_order_id=to_cancel.client_order_id)

        fresh, _ = make_oms(venue, clock, store, venues={"alice": adapter})
        report = await fresh.recover()
        outcomes = {o.client_order_id: o.outcome for o in report.orders}
        assert outcomes == {
            resting.client_order_id: "filled",
            to_cancel.client_order_id: "cancelled",
            still_open.client_order_id: "open",
            never_sent.client_order_id: "never_reached_venue",
            sent_unrecorded.client_order_id: "open",
        }
        assert fresh.order(resting.client_order_id).filled_quantity == D("0.5")
        assert report.outcome("filled")[0].fills_added >= 1
        assert fresh.order(never_sent.client_order_id).reason == NEVER_REACHED_VENUE
        for coid in outcomes:
            assert_row_matches(store, fresh, coid)
            assert store.events_of(coid)[-1]["event_type"] == RECOVERED
        # recovery is idempotent: a second run changes nothing
        again = await fresh.recover()
        assert {o.client_order_id for o in again.orders} == {
            still_open.client_order_id,
            sent_unrecorded.client_order_id,
        }
        assert all(o.outcome == "open" for o in again.orders)
        assert len(await adapter.fetch_open_orders(SYMBOL)) == 2

    run(body)


class _ProcessDied(BaseException):
    """Stands for a crash: no ``except Exception`` in the OMS catches it, nothing after it runs."""


class DiesAfterAmend:
    """Wraps a paper adapter: the venue carries out the amend, then the process dies before the answer."""

    def __init__(self, inner: InProcessAdapter) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def amend_order(self, symbol: str, **kw: Any) -> VenueOrder:
        await self.inner.amend_order(symbol, **kw)
        raise _ProcessDied


def test_recovery_adopts_an_amend_the_venue_made_in_place_before_the_crash() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        adapter = venue.adapter("alice")
        oms, store = make_oms(venue, clock, venues={"alice": DiesAfterAmend(adapter)})
        order = await oms.submit(intent(qty="0.5", price=D("39000")))
        with pytest.raises(_ProcessDied):
            await oms.amend(order.client_order_id, quantity=D("0.3"))  # the paper venue amends this in place
        [replacement] = [c for c, r in store.orders.items() if r["parent_client_order_id"] == order.client_order_id]
        assert store.order_row(order.client_order_id)["quantity"] == D("0.5")  # type: ignore[index]

        fresh, _ = make_oms(venue, clock, store, venues={"alice": adapter})
        report = await fresh.recover()
        assert {o.client_order_id: o.outcome for o in report.orders} == {
            order.client_order_id: "open",
            replacement: "never_reached_venue",
        }
        recovered = fresh.order(order.client_order_id)
        assert recovered.status is OrderStatus.OPEN and recovered.quantity == D("0.3")
        on_venue = await adapter.fetch_open_orders(SYMBOL)
        assert [(o.client_order_id, o.quantity) for o in on_venue] == [(order.client_order_id, D("0.3"))]
        for coid in (order.client_order_id, replacement):
            assert_row_matches(store, fresh, coid)
        assert (await fresh.recover()).counts == {"open": 1}  # idempotent

    run(body)


def test_recovery_resend_policy_places_exactly_one() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        adapter = venue.adapter("alice")
        oms, store = make_oms(venue, clock, venues={"alice": adapter})
        it = intent(qty="0.1", price=D("30000"))
        await _pending_only(oms, it)
        fresh, _ = make_oms(venue, clock, store, venues={"alice": adapter}, resend_unsent=True)
        report = await fresh.recover()
        assert report.outcome("resent")[0].after is OrderStatus.OPEN
        await fresh.recover()
        assert await fresh.submit(it) == fresh.order(it.client_order_id)
        assert [o.client_order_id for o in await adapter.fetch_open_orders(SYMBOL)] == [it.client_order_id]

    run(body)


# --- fail closed ---------------------------------------------------------------------------------


def test_a_portfolio_that_refuses_a_fill_halts_the_account_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The portfolio refuses a fill for real ("*" names its account ledger, not a strategy): the OMS
    engages the kill switch on the account instead of logging and going on."""
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        oms, _store = make_oms(venue, clock, portfolio=Portfolio(clock=clock), kill_switch=switch)
        await rest_ask(venue)
        with caplog.at_level(logging.CRITICAL):
            order = await oms.submit(intent(order_type=OrderType.MARKET, qty="0.3", strategy="*"))
        assert order.status is OrderStatus.FILLED  # the venue filled it: a fact, stored
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert switch.effective("bob", "s1")[0] is KillSwitchMode.OFF
        assert [a.kind for a in oms.anomalies] == ["risk_path_failure"]
        assert any("portfolio apply_fill" in r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL)
        blocked = await oms.submit(intent())
        assert blocked.status is OrderStatus.REJECTED and blocked.reason == "kill switch halt"

    run(body)


def test_a_failing_hook_with_no_kill_switch_to_engage_is_raised() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock, portfolio=Portfolio(clock=clock))
        await rest_ask(venue)
        with pytest.raises(ValueError, match="account ledger"):
            await oms.submit(intent(order_type=OrderType.MARKET, qty="0.3", strategy="*"))

    run(body)


class FailingOpenRecorder(Recorder):
    """A risk gate whose bookkeeping breaks after it approved: the failure must stop the send."""

    def on_order_open(self, client_order_id: str, intent: OrderIntent) -> None:
        raise RuntimeError("open-order book corrupted")


def test_a_risk_hook_failing_between_approval_and_send_halts_and_nothing_is_sent() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        oms, store = make_oms(venue, clock, risk=FailingOpenRecorder(), kill_switch=switch)
        order = await oms.submit(intent(price=D("30000")))
        assert order.status is OrderStatus.REJECTED and order.reason == "kill switch halt: never reached venue"
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert await oms.venues["alice"].fetch_open_orders(SYMBOL) == []
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


class CancelOutage:
    """Wraps a paper adapter: ``cancel_order`` answers 503 while ``down`` (a venue outage); counts calls."""

    def __init__(self, inner: InProcessAdapter) -> None:
        self.inner = inner
        self.down = True
        self.cancels = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def cancel_order(self, symbol: str, **kw: Any) -> VenueOrder:
        self.cancels += 1
        if self.down:
            raise ExchangeUnavailableError("503 from the venue")
        return await self.inner.cancel_order(symbol, **kw)


def test_a_halt_repeats_its_cancels_with_back_off_until_the_venue_takes_them() -> None:
    venue, clock = make_venue()
    outage = CancelOutage(venue.adapter("alice"))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        if seconds >= 0.25:  # a halt round's back-off (the OMS's own retries wait 0 here: FAST)
            waits.append(seconds)
            if len(waits) == 4:
                outage.down = False  # the venue is back after the fourth round's wait
        await asyncio.sleep(0)

    async def body() -> None:
        switch = KillSwitch()
        oms, _ = make_oms(venue, clock, kill_switch=switch, venues={"alice": outage}, sleep=sleep)
        order = await oms.submit(intent(price=D("30000")))
        assert order.status is OrderStatus.OPEN
        switch.engage("halt", "drill", "ops")
        await turns_until(lambda: oms.order(order.client_order_id).status is OrderStatus.CANCELLED, "the cancel")
        assert waits == [0.25, 0.5, 1.0, 2.0]  # doubling back-off between rounds
        assert not await outage.inner.fetch_open_orders("BTC/USDT")

    run(body)


def test_halt_cancels_stop_when_the_halt_is_released() -> None:
    venue, clock = make_venue()
    outage = CancelOutage(venue.adapter("alice"))
    rounds: list[float] = []

    async def body() -> None:
        switch = KillSwitch()

        async def sleep(seconds: float) -> None:
            if seconds >= 0.25:
                rounds.append(seconds)
                if len(rounds) == 2:
                    switch.release("ops", "false alarm")
            await asyncio.sleep(0)

        oms, _ = make_oms(venue, clock, kill_switch=switch, venues={"alice": outage}, sleep=sleep)
        order = await oms.submit(intent(price=D("30000")))
        switch.engage("halt", "drill", "ops")
        # 200 turns of the loop (its back-off waits are instant here) give a third round every chance to run
        for _ in range(200):
            await asyncio.sleep(0)
        assert len(rounds) == 2  # no third round after the release
        assert oms.order(order.client_order_id).status is OrderStatus.PENDING_CANCEL  # its fate is the venue's
        await oms.stop()

    run(body)


# --- from surviving mutants (make mutation): a failure's scope, cause and metadata ---------------------------


class FailingPostTrade(Recorder):
    """A risk engine whose post-trade check breaks on a fill."""

    def on_fill(self, fill: Fill, *, account: str, strategy: str) -> list[Any]:
        raise RuntimeError("exposure book corrupted")


def test_a_failing_post_trade_check_halts_the_fills_account_only_and_names_the_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    venue, clock = make_venue()
    venue.deposit("bob", "USDT", D(100_000))

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        oms, _store = make_oms(venue, clock, venues=venues, risk=FailingPostTrade(), kill_switch=switch)
        await rest_ask(venue)
        with caplog.at_level(logging.CRITICAL):
            order = await oms.submit(intent(order_type=OrderType.MARKET, qty="0.3"))
        assert order.status is OrderStatus.FILLED  # the venue's fill stands
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert switch.effective("bob", "s1")[0] is KillSwitchMode.OFF  # not every account: the fill's
        (anomaly,) = oms.anomalies
        assert anomaly.kind == "risk_path_failure"
        assert anomaly.message.startswith("risk post-trade check (fill ")
        assert anomaly.message.endswith("failed: RuntimeError: exposure book corrupted")
        (said,) = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert said == f"OMS: {anomaly.message}; halting account:alice"

    run(body)


class FailingEmulator:
    """A local order emulator that breaks whenever it hears of an order event."""

    def on_order_event(self, order: Any) -> None:
        raise RuntimeError("emulation store unavailable")


def test_a_failing_order_emulator_halts_the_account_without_losing_the_venue_event() -> None:
    """While a venue event is applied, an emulator failure halts the account and records why, but the event
    is applied all the same (raising there would drop a fill the venue made)."""
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        oms, store = make_oms(venue, clock, kill_switch=switch, emulator=FailingEmulator())
        await rest_ask(venue)
        order = await oms.submit(intent(order_type=OrderType.MARKET, qty="0.3"))
        assert order.status is OrderStatus.FILLED
        assert store.orders[order.client_order_id]["status"] == "filled"
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert {a.message for a in oms.anomalies} == {
            "order emulator on_order_event failed: RuntimeError: emulation store unavailable"
        }

    run(body)


def test_errors_name_the_missing_order_and_the_missing_venue() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock)
        with pytest.raises(OrderNotFoundError) as missing:
            oms.order("nope")
        assert missing.value.details == {"client_order_id": "nope"}
        assert oms.known("nope") is None
        with pytest.raises(ConfigurationError, match="no venue configured for account 'carol'") as no_venue:
            await oms.submit(intent(account="carol"))
        assert no_venue.value.field == "venues"

    run(body)


class VenueFaults:
    """Wraps a paper adapter: scripted failures of ``create_order``, ``cancel_order``, ``amend_order`` and
    ``fetch_order``, each raised before the venue acts ("before") or after it did ("after": the answer is
    lost); counts the calls. A script can be extended while the test runs."""

    def __init__(
        self,
        inner: InProcessAdapter,
        *,
        create: Sequence[tuple[str, Exception]] = (),
        cancel: Sequence[tuple[str, Exception]] = (),
        amend: Sequence[tuple[str, Exception]] = (),
        fetch: Sequence[tuple[str, Exception]] = (),
    ) -> None:
        self.inner = inner
        self.scripts = {
            "cancel_order": list(cancel),
            "amend_order": list(amend),
            "fetch_order": list(fetch),
        }
        self.create_script = list(create)
        self.creates = self.cancels = self.amends = self.fetches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _call(self, method: str, symbol: str, **kw: Any) -> VenueOrder:
        script = self.scripts[method]
        if script:
            when, exc = script.pop(0)
            if when == "after":
                await getattr(self.inner, method)(symbol, **kw)
            raise exc
        result: VenueOrder = await getattr(self.inner, method)(symbol, **kw)
        return result

    async def cancel_order(self, symbol: str, **kw: Any) -> VenueOrder:
        self.cancels += 1
        return await self._call("cancel_order", symbol, **kw)

    async def amend_order(self, symbol: str, **kw: Any) -> VenueOrder:
        self.amends += 1
        return await self._call("amend_order", symbol, **kw)

    async def fetch_order(self, symbol: str, **kw: Any) -> VenueOrder:
        self.fetches += 1
        return await self._call("fetch_order", symbol, **kw)

    async def create_order(self, i: OrderIntent, coid: str) -> VenueOrder:
        self.creates += 1
        if self.create_script:
            when, exc = self.create_script.pop(0)
            if when == "after":
                await self.inner.create_order(i, coid)
            raise exc
        return await self.inner.create_order(i, coid)


def test_a_cancel_the_venue_refuses_leaves_the_order_open_with_the_venues_reason() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), cancel=[("before", OrderNotFoundError("Unknown order sent."))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent())
        after = await oms.cancel(order.client_order_id)
        assert after.status is OrderStatus.OPEN  # still resting on the venue: the venue said so
        assert (faults.cancels, faults.fetches) == (1, 1)
        (refused,) = [e for e in store.events_of(order.client_order_id) if e["event_type"] == "cancel_rejected"]
        assert refused["payload"]["reason"] == "order_not_found: Unknown order sent."
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_a_cancel_refused_because_the_order_filled_meanwhile_ends_filled() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), cancel=[("before", OrderNotFoundError("Unknown order sent."))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        sell = intent(Side.SELL, OrderType.MARKET, "0.5", account="bob")
        await venue.adapter("bob").create_order(sell, sell.client_order_id)  # the OMS has not seen this fill
        done = await oms.cancel(order.client_order_id)
        assert done.status is OrderStatus.FILLED and done.filled_quantity == D("0.5")
        assert not [e for e in store.events_of(order.client_order_id) if e["event_type"] == "cancel_rejected"]
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_a_cancel_whose_answer_was_lost_is_resolved_without_cancelling_twice() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), cancel=[("after", RequestTimeoutError("cancel timed out"))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent())
        done = await oms.cancel(order.client_order_id)
        assert done.status is OrderStatus.CANCELLED
        assert (faults.cancels, faults.fetches) == (1, 1)  # asked the venue instead of cancelling again
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_a_rate_limited_cancel_is_sent_again_without_asking_first() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), cancel=[("before", RateLimitError("too many requests"))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent())
        done = await oms.cancel(order.client_order_id)
        assert done.status is OrderStatus.CANCELLED
        assert (faults.cancels, faults.fetches) == (2, 0)  # refused before it ran: nothing to ask about
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_a_cancel_that_keeps_failing_stays_pending_cancel_and_raises() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        down = [("before", ExchangeUnavailableError("maintenance")) for _ in range(FAST.max_attempts)]
        faults = VenueFaults(venue.adapter("alice"), cancel=down)
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent())
        with pytest.raises(ExchangeUnavailableError):
            await oms.cancel(order.client_order_id)
        assert faults.cancels == FAST.max_attempts
        assert oms.order(order.client_order_id).status is OrderStatus.PENDING_CANCEL  # recovery settles it
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def _replacements(store: MemoryOrderStore, parent: str) -> list[dict[str, Any]]:
    return [r for r in store.orders.values() if r["parent_client_order_id"] == parent]


def test_an_amend_the_venue_refuses_rejects_the_replacement_with_the_reason_and_keeps_the_original() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        refused = InvalidOrderError("Filter failure: PRICE_FILTER")
        faults = VenueFaults(venue.adapter("alice"), amend=[("before", refused)])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent(qty="0.5", price=D("39000")))
        with pytest.raises(InvalidOrderError):
            await oms.amend(order.client_order_id, price=D("39500"))
        (replacement,) = _replacements(store, order.client_order_id)
        assert replacement["status"] == "rejected"
        assert oms.order(replacement["client_order_id"]).reason == "invalid_order: Filter failure: PRICE_FILTER"
        assert oms.order(order.client_order_id).status is OrderStatus.OPEN  # untouched on the venue
        assert oms.order(order.client_order_id).price == D("39000")
        for coid in (order.client_order_id, replacement["client_order_id"]):
            assert_row_matches(store, oms, coid)

    run(body)


def test_an_amend_whose_answer_was_lost_before_the_venue_acted_drops_the_replacement_and_raises() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), amend=[("before", RequestTimeoutError("amend timed out"))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent(qty="0.5", price=D("39000")))
        with pytest.raises(RequestTimeoutError):
            await oms.amend(order.client_order_id, price=D("39500"))
        (replacement,) = _replacements(store, order.client_order_id)
        dropped = oms.order(replacement["client_order_id"])
        assert dropped.status is OrderStatus.CANCELLED
        cancelled = [e for e in store.events_of(dropped.client_order_id) if e["event_type"] == "cancelled"]
        assert [e["payload"]["reason"] for e in cancelled] == ["amend failed: timeout: amend timed out"]
        assert oms.order(order.client_order_id).status is OrderStatus.OPEN
        on_venue = await venue.adapter("alice").fetch_open_orders(SYMBOL)
        assert [o.client_order_id for o in on_venue] == [order.client_order_id]

    run(body)


def test_an_amend_whose_answer_was_lost_after_the_venue_replaced_takes_the_replacement() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), amend=[("after", RequestTimeoutError("amend timed out"))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent(qty="0.5", price=D("39000")))
        moved = await oms.amend(order.client_order_id, price=D("39500"))
        assert faults.amends == 1  # found on the venue, not sent again
        assert moved.client_order_id != order.client_order_id
        assert (moved.status, moved.price, moved.quantity) == (OrderStatus.OPEN, D("39500"), D("0.5"))
        assert oms.order(order.client_order_id).status is OrderStatus.CANCELLED  # as the venue has it
        assert store.order_row(moved.client_order_id)["parent_client_order_id"] == order.client_order_id  # type: ignore[index]
        on_venue = await venue.adapter("alice").fetch_open_orders(SYMBOL)
        assert [o.client_order_id for o in on_venue] == [moved.client_order_id]
        for coid in (order.client_order_id, moved.client_order_id):
            assert_row_matches(store, oms, coid)

    run(body)


def test_an_amend_needs_a_change_and_a_quantity_above_what_filled() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock)
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        with pytest.raises(InvalidOrderError, match=r"^amend needs a price or a quantity$"):
            await oms.amend(order.client_order_id)
        sell = intent(Side.SELL, OrderType.MARKET, "0.2", account="bob")
        await venue.adapter("bob").create_order(sell, sell.client_order_id)
        await oms.sync_order(order.client_order_id)
        assert oms.order(order.client_order_id).filled_quantity == D("0.2")
        with pytest.raises(InvalidOrderError, match=r"^new quantity 0.2 must exceed the filled 0.2"):
            await oms.amend(order.client_order_id, quantity=D("0.2"))
        assert not _replacements(_store, order.client_order_id)  # refused before anything was stored

    run(body)
