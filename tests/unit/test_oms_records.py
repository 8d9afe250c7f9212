"""What the OMS records and says when something goes wrong, on the real paper venue (the test_oms helpers):
the filters of ``cancel_all`` and of a scoped halt, the note a failed cancel or placement leaves, the
kill-switch record of a risk-path failure, the operator's log lines, orders the venue does not know,
late fills, refused amendments. Written from the mutants of ``make mutation`` that survived."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator
from decimal import Decimal as D
from typing import Any

import pytest

from meltica.adapters.base import UserEvent, UserEventKind
from meltica.adapters.in_process import InProcessAdapter, InProcessVenue
from meltica.config.settings import RiskLimits
from meltica.domain import Fill, OrderIntent, OrderStatus, OrderType, Side
from meltica.errors import (
    ExchangeUnavailableError,
    IllegalStateTransitionError,
    InvalidOrderError,
    NetworkError,
    RateLimitError,
    RequestTimeoutError,
)
from meltica.execution import NEVER_REACHED_VENUE, MemoryOrderStore, OrderManager
from meltica.execution.emulation import EmulatedStatus, LocalOrderEmulator, MemoryEmulationStore
from meltica.execution.recovery import LOST_AT_RESTART
from meltica.execution.store import AMEND_REQUESTED, ANOMALY, ILLEGAL_TRANSITION, event_uuid
from meltica.risk import InMemoryKillSwitchStore, KillSwitch, KillSwitchMode, RiskEngine
from tests.kit import ManualClock, spot_instrument, trailing_stop_intent
from tests.unit.test_oms import (
    FAST,
    SYMBOL,
    T0,
    CancelOutage,
    FailingOpenRecorder,
    FailingPostTrade,
    Recorder,
    VenueFaults,
    _pending_only,
    _vo,
    assert_row_matches,
    intent,
    make_oms,
    make_venue,
    rest_ask,
    run,
    turns_until,
)

ETH = "ETH/USDT"


def _notes(store: MemoryOrderStore, coid: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in store.events_of(coid) if e["event_type"] == kind]


def _event_ids(store: MemoryOrderStore, coid: str, kind: str) -> list[Any]:
    return [e["event_id"] for e in store.events_of(coid) if e["event_type"] == kind]


async def _fill_unseen(venue: InProcessVenue, qty: str) -> None:
    """Bob's market sell takes alice's resting bid on the venue; the OMS has not heard of the fill."""
    sell = intent(Side.SELL, OrderType.MARKET, qty, account="bob")
    await venue.adapter("bob").create_order(sell, sell.client_order_id)


# --- cancel_all and scoped halts: only what the filter names ------------------------------------------


def test_cancel_all_cancels_only_what_its_filters_name_and_records_a_cancel_that_failed() -> None:
    clock = ManualClock(T0)
    venue = InProcessVenue([spot_instrument(SYMBOL), spot_instrument(ETH)], clock=clock)
    for account in ("alice", "bob"):
        venue.deposit(account, "USDT", D(100_000))

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"))
        oms, store = make_oms(venue, clock, venues={"alice": faults, "bob": venue.adapter("bob")})
        a1 = await oms.submit(intent(strategy="s1", price=D("30000")))
        a2 = await oms.submit(intent(strategy="s2", price=D("30001")))
        a3 = await oms.submit(intent(strategy="s1", price=D("2000")).model_copy(update={"symbol": ETH}))
        b1 = await oms.submit(intent(strategy="s1", price=D("30002"), account="bob"))
        assert {o.status for o in (a1, a2, a3, b1)} == {OrderStatus.OPEN}

        assert [o.client_order_id for o in await oms.cancel_all(symbol=ETH)] == [a3.client_order_id]
        assert [o.client_order_id for o in await oms.cancel_all(strategy="s2")] == [a2.client_order_id]
        assert [o.client_order_id for o in await oms.cancel_all(account="bob")] == [b1.client_order_id]
        assert [o.client_order_id for o in oms.open_orders()] == [a1.client_order_id]

        # the venue is down for alice's last cancel: the order stays pending_cancel, the failure is recorded
        down = ExchangeUnavailableError("maintenance")
        faults.scripts["cancel_order"] = [("before", down)] * FAST.max_attempts
        clock.advance(seconds=5)
        (left,) = await oms.cancel_all(reason="end of day")
        assert (left.client_order_id, left.status) == (a1.client_order_id, OrderStatus.PENDING_CANCEL)
        anomaly = oms.anomalies[-1]
        assert (anomaly.kind, anomaly.client_order_id, anomaly.message, anomaly.ts) == (
            ANOMALY,
            a1.client_order_id,
            "cancel failed: maintenance",
            clock(),
        )
        (note,) = _notes(store, a1.client_order_id, ANOMALY)
        assert (note["payload"], note["ts"]) == ({"message": "cancel failed: maintenance"}, clock())
        for order in (a1, a2, a3, b1):
            assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_a_halt_of_one_account_or_one_strategy_cancels_only_its_orders() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        oms, _store = make_oms(venue, clock, venues=venues, kill_switch=switch)
        a1 = await oms.submit(intent(strategy="s1", price=D("30000")))
        a2 = await oms.submit(intent(strategy="s2", price=D("30001")))
        b1 = await oms.submit(intent(strategy="s1", price=D("30002"), account="bob"))

        def status(order: Any) -> OrderStatus:
            return oms.order(order.client_order_id).status

        switch.engage("halt", "drill", "ops", scope="account:bob")
        await turns_until(lambda: status(b1) is OrderStatus.CANCELLED, "bob's cancel")
        await turns_until(lambda: not oms._tasks, "the halt's cancel task to end")
        assert (status(a1), status(a2)) == (OrderStatus.OPEN, OrderStatus.OPEN)  # alice is not halted

        switch.engage("halt", "drill", "ops", scope="strategy:s2")
        await turns_until(lambda: status(a2) is OrderStatus.CANCELLED, "s2's cancel")
        await turns_until(lambda: not oms._tasks, "the halt's cancel task to end")
        assert status(a1) is OrderStatus.OPEN  # s1 is not halted
        assert [o.client_order_id for o in await venue.adapter("alice").fetch_open_orders(SYMBOL)] == [
            a1.client_order_id
        ]

    run(body)


def test_a_halt_says_what_stays_open_each_round_and_when_all_is_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    venue, clock = make_venue()
    outage = CancelOutage(venue.adapter("alice"))

    async def sleep(seconds: float) -> None:
        if seconds >= 0.25:  # the halt's back-off: the venue is back after the first round's wait
            outage.down = False
        await asyncio.sleep(0)

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        oms, _ = make_oms(venue, clock, kill_switch=switch, venues={"alice": outage}, sleep=sleep)
        order = await oms.submit(intent(price=D("30000")))
        with caplog.at_level(logging.WARNING, logger="meltica.execution.oms"):
            switch.engage("halt", "drill", "ops")
            await turns_until(lambda: oms.order(order.client_order_id).status is OrderStatus.CANCELLED, "the cancel")
            await turns_until(lambda: not oms._tasks, "the halt's cancel task to end")
        said = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("kill switch halt")]
        assert said == [
            (
                "CRITICAL",
                f"kill switch halt (global): 1 orders still open after cancel round 1 ({order.client_order_id}); "
                "retrying in 0.25 s",
            ),
            ("WARNING", "kill switch halt (global): every order cancelled after 2 rounds"),
        ]

    run(body)


# --- the risk path's failures: what the kill switch and the operator are told -------------------------------


def test_a_risk_path_failure_halts_with_the_cause_recorded_on_the_kill_switch() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        changes = InMemoryKillSwitchStore()
        switch = KillSwitch(changes, clock=clock)
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        oms, _store = make_oms(venue, clock, venues=venues, risk=FailingPostTrade(), kill_switch=switch)
        await rest_ask(venue)
        order = await oms.submit(intent(order_type=OrderType.MARKET, qty="0.3"))
        assert order.status is OrderStatus.FILLED
        (anomaly,) = oms.anomalies
        assert anomaly.ts == T0
        state = switch.state_of("account:alice")
        assert (state.mode, state.reason, state.actor) == (KillSwitchMode.HALT, anomaly.message, "oms")
        what = anomaly.message.removesuffix(" failed: RuntimeError: exposure book corrupted")
        assert what.startswith("risk post-trade check (fill ")
        assert dict(changes.changes[-1].details) == {"failure": what, "error": "RuntimeError"}

    run(body)


def test_a_failing_hook_without_a_kill_switch_says_it_raises(caplog: pytest.LogCaptureFixture) -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock, risk=FailingOpenRecorder())
        with caplog.at_level(logging.CRITICAL, logger="meltica.execution.oms"), pytest.raises(RuntimeError):
            await oms.submit(intent(price=D("30000")))
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert said[-1] == "OMS: no kill switch to engage after risk on_order_open: raising"

    run(body)


def test_a_hook_failing_between_approval_and_send_rejects_it_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        oms, _store = make_oms(venue, clock, venues=venues, risk=FailingOpenRecorder(), kill_switch=switch)
        with caplog.at_level(logging.WARNING, logger="meltica.execution.oms"):
            order = await oms.submit(intent(price=D("30000")))
        assert order.reason == f"kill switch halt: {NEVER_REACHED_VENUE}"
        assert switch.effective("bob", "s1")[0] is KillSwitchMode.OFF  # the order's account only
        assert f"order {order.client_order_id} rejected before sending: kill switch halt: {NEVER_REACHED_VENUE}" in [
            r.getMessage() for r in caplog.records
        ]

    run(body)


# --- placement: rate limits, lost answers, the retry log ------------------------------------------------


def test_a_placement_still_rate_limited_after_every_retry_is_rejected_with_the_venues_words() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        limited = RateLimitError("too many orders")
        faults = VenueFaults(venue.adapter("alice"), create=[("before", limited)] * FAST.max_attempts)
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent())
        assert (order.status, order.reason) == (OrderStatus.REJECTED, "rate_limited: too many orders")
        assert (faults.creates, faults.fetches) == (FAST.max_attempts, 0)  # refused before execution: not asked
        assert _event_ids(store, order.client_order_id, "rejected") == [event_uuid(order.client_order_id, "rejected")]
        assert await venue.adapter("alice").fetch_open_orders(SYMBOL) == []

    run(body)


def test_a_placement_whose_fate_cannot_be_asked_stays_pending_and_says_why() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        lookups_down = [("before", NetworkError("connection reset")) for _ in range(FAST.resolve_attempts + 1)]
        faults = VenueFaults(
            venue.adapter("alice"), create=[("before", RequestTimeoutError("no answer"))], fetch=lookups_down
        )
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        it = intent()
        with pytest.raises(RequestTimeoutError):
            await oms.submit(it)
        assert faults.fetches == FAST.resolve_attempts  # asked as often as the policy says, then gave up
        assert oms.order(it.client_order_id).status is OrderStatus.PENDING_SUBMIT
        (note,) = _notes(store, it.client_order_id, ANOMALY)
        assert note["payload"] == {"message": "placement fate unknown after timeout", "error": "no answer"}

    run(body)


def test_a_lookup_that_fails_once_is_asked_again() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(
            venue.adapter("alice"),
            create=[("after", RequestTimeoutError("no answer"))],
            fetch=[("before", NetworkError("connection reset"))],
        )
        oms, _store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent())
        assert order.status is OrderStatus.OPEN  # found on the second lookup, not sent twice
        assert (faults.creates, faults.fetches) == (1, 2)

    run(body)


def test_placement_retries_are_logged_and_exhausted_retries_noted(caplog: pytest.LogCaptureFixture) -> None:
    venue, clock = make_venue()

    async def body() -> None:
        unavailable = ExchangeUnavailableError("503")
        faults = VenueFaults(venue.adapter("alice"), create=[("before", unavailable)] * FAST.max_attempts)
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        it = intent()
        with caplog.at_level(logging.INFO, logger="meltica.execution.oms"), pytest.raises(ExchangeUnavailableError):
            await oms.submit(it)
        coid = it.client_order_id
        retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"order {coid}: ")]
        assert retries == [
            f"order {coid}: exchange_unavailable, retry 1 in 0.00s",
            f"order {coid}: exchange_unavailable, retry 2 in 0.00s",
            f"order {coid}: anomaly: not placed after 3 attempts: 503",
        ]
        (note,) = _notes(store, coid, ANOMALY)
        assert note["payload"] == {"message": "not placed after 3 attempts: 503", "reason": "exchange_unavailable"}

    run(body)


# --- refusals of user actions ---------------------------------------------------------------------------


def test_cancelling_a_filled_order_or_amending_a_cancelled_one_is_refused_naming_both() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        await rest_ask(venue)
        filled = await oms.submit(intent(order_type=OrderType.MARKET, qty="0.1"))
        with pytest.raises(IllegalStateTransitionError) as refused:
            await oms.cancel(filled.client_order_id)
        message = f"cannot cancel order {filled.client_order_id}: it is filled"
        assert (str(refused.value), refused.value.details) == (message, {"current": "filled"})
        (note,) = _notes(store, filled.client_order_id, ILLEGAL_TRANSITION)
        assert note["payload"] == {"message": message, "action": "cancel", "status": "filled"}
        assert oms.anomalies[-1].message == message

        resting = await oms.submit(intent(price=D("30000")))
        await oms.cancel(resting.client_order_id)
        with pytest.raises(IllegalStateTransitionError, match=r"^cannot amend order .*: it is cancelled$"):
            await oms.amend(resting.client_order_id, price=D("30100"))

    run(body)


def test_cancelling_an_order_the_venue_never_got_ends_cancelled_as_never_reached() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        it = intent()
        await _pending_only(oms, it)  # stored write-ahead, the process died before the send
        done = await oms.cancel(it.client_order_id)
        assert (done.status, done.reason) == (OrderStatus.CANCELLED, NEVER_REACHED_VENUE)
        assert _event_ids(store, it.client_order_id, "cancelled") == [event_uuid(it.client_order_id, "cancelled")]
        assert_row_matches(store, oms, it.client_order_id)

    run(body)


# --- venue events the OMS cannot apply as they come -------------------------------------------------------


class Books(Recorder):
    """Records the account and strategy each fill is booked under."""

    def __init__(self) -> None:
        super().__init__()
        self.booked: list[tuple[str, str, str]] = []

    def apply_fill(self, fill: Fill, *, account: str, strategy: str) -> None:
        super().apply_fill(fill, account=account, strategy=strategy)
        self.booked.append((fill.fill_id, account, strategy))


def test_a_late_fill_on_a_cancelled_order_is_recorded_and_booked_not_applied() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        books = Books()
        oms, store = make_oms(venue, clock, portfolio=books, risk=books)
        order = await oms.submit(intent(price=D("30000"), strategy="mm"))
        coid = order.client_order_id
        await oms.cancel(coid)
        late = Fill(
            fill_id="late-1",
            client_order_id=coid,
            exchange_order_id=order.exchange_order_id,
            exchange="paper",
            symbol=SYMBOL,
            side=Side.BUY,
            price=D("30000"),
            quantity=D("0.1"),
            ts=T0,
        )
        await oms.on_user_event(UserEvent(UserEventKind.FILL, T0, fill=late))
        assert oms.order(coid).status is OrderStatus.CANCELLED  # a terminal order takes no fill
        (note,) = _notes(store, coid, ILLEGAL_TRANSITION)
        assert note["payload"]["status"] == "cancelled" and note["payload"]["event"]["fill"]["fill_id"] == "late-1"
        assert [f["trade_id"] for f in store.fills.values()] == ["late-1"]  # still a fact of the venue
        assert books.booked == [("late-1", "alice", "mm")]
        assert [f.fill_id for f in books.risk_fills] == ["late-1"]

    run(body)


def test_events_for_orders_the_oms_does_not_manage_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock)
        ghost = Fill(
            fill_id="f9",
            client_order_id="ghost",
            exchange="paper",
            symbol=SYMBOL,
            side=Side.BUY,
            price=D("30000"),
            quantity=D("0.1"),
            ts=T0,
        )
        with caplog.at_level(logging.INFO, logger="meltica.execution.oms"):
            await oms.on_user_event(UserEvent(UserEventKind.ORDER, T0, order=_vo("ghost", OrderStatus.OPEN, "0")))
            await oms.on_user_event(UserEvent(UserEventKind.FILL, T0, fill=ghost))
        assert [r.getMessage() for r in caplog.records] == [
            "venue update for an order we do not manage: 99 ghost",
            "fill f9 for unknown order ghost",
        ]
        assert [(a.kind, a.client_order_id, a.message) for a in oms.anomalies] == [
            ("unknown_order_fill", "ghost", "f9")
        ]

    run(body)


def test_terminal_venue_updates_carry_their_deterministic_ids_and_a_default_reason() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        refused, expired = intent(), intent()
        for it in (refused, expired):
            await _pending_only(oms, it)
        rejected_vo = dataclasses.replace(_vo(refused.client_order_id, OrderStatus.REJECTED, "0"), reason=None)
        await oms.on_user_event(UserEvent(UserEventKind.ORDER, T0, order=rejected_vo))
        done = oms.order(refused.client_order_id)
        assert (done.status, done.reason) == (OrderStatus.REJECTED, "rejected by venue")
        await oms.on_user_event(
            UserEvent(UserEventKind.ORDER, T0, order=_vo(expired.client_order_id, OrderStatus.EXPIRED, "0"))
        )
        assert oms.order(expired.client_order_id).status is OrderStatus.EXPIRED
        assert _event_ids(store, refused.client_order_id, "rejected") == [
            event_uuid(refused.client_order_id, "rejected")
        ]
        assert _event_ids(store, expired.client_order_id, "expired") == [event_uuid(expired.client_order_id, "expired")]

    run(body)


# --- amend: the original is settled from the venue whatever happens to the amendment -------------------------


def test_an_amend_the_venue_refuses_still_takes_the_originals_unseen_fill() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), amend=[("before", InvalidOrderError("PRICE_FILTER"))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        await _fill_unseen(venue, "0.2")
        with pytest.raises(InvalidOrderError):
            await oms.amend(order.client_order_id, price=D("40100"))
        original = oms.order(order.client_order_id)
        assert (original.status, original.filled_quantity) == (OrderStatus.PARTIALLY_FILLED, D("0.2"))
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_an_amend_lost_before_the_venue_acted_still_takes_the_originals_unseen_fill() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        faults = VenueFaults(venue.adapter("alice"), amend=[("before", RequestTimeoutError("amend timed out"))])
        oms, store = make_oms(venue, clock, venues={"alice": faults})
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        await _fill_unseen(venue, "0.2")
        with pytest.raises(RequestTimeoutError):
            await oms.amend(order.client_order_id, price=D("40100"))
        original = oms.order(order.client_order_id)
        assert (original.status, original.filled_quantity) == (OrderStatus.PARTIALLY_FILLED, D("0.2"))
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_an_amend_in_place_returns_the_order_with_the_fills_the_venue_made_meanwhile() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        await _fill_unseen(venue, "0.2")
        amended = await oms.amend(order.client_order_id, quantity=D("0.4"))
        assert amended.client_order_id == order.client_order_id  # in place
        assert (amended.quantity, amended.filled_quantity) == (D("0.4"), D("0.2"))
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_a_cancel_replace_whose_original_cannot_be_looked_up_cancels_it_as_replaced() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        books = Recorder()
        lookups_down = [("before", NetworkError("connection reset")) for _ in range(FAST.resolve_attempts)]
        faults = VenueFaults(venue.adapter("alice"))
        oms, store = make_oms(venue, clock, venues={"alice": faults}, risk=books)
        order = await oms.submit(intent(qty="0.5", price=D("39000")))
        faults.scripts["fetch_order"] = list(lookups_down)
        moved = await oms.amend(order.client_order_id, price=D("39500"))
        rep = moved.client_order_id
        assert (moved.status, moved.price) == (OrderStatus.OPEN, D("39500"))
        original = oms.order(order.client_order_id)
        assert (original.status, original.reason) == (OrderStatus.CANCELLED, f"replaced by {rep}")
        assert books.opened == [order.client_order_id, rep]  # the replacement counts as open with the risk gate
        (note,) = _notes(store, order.client_order_id, AMEND_REQUESTED)
        assert note["payload"] == {"replacement": rep, "price": "39500", "quantity": "0.5"}
        assert _event_ids(store, rep, "submitted") == [event_uuid(rep, "submitted")]
        for coid in (order.client_order_id, rep):
            assert_row_matches(store, oms, coid)

    run(body)


def test_an_amend_refused_before_the_venue_stores_its_replacement_rejected(caplog: pytest.LogCaptureFixture) -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        await _fill_unseen(venue, "0.2")
        await oms.sync_order(order.client_order_id)
        with pytest.raises(InvalidOrderError, match=r"^new quantity 0.2 must exceed the filled 0.2$"):
            oms.refuse_amend(order.client_order_id, quantity=D("0.2"), reason="risk: too big")
        with caplog.at_level(logging.WARNING, logger="meltica.execution.oms"):
            refused = oms.refuse_amend(order.client_order_id, quantity=D("0.4"), reason="risk: max_qty: too big")
        assert (refused.status, refused.reason) == (OrderStatus.REJECTED, "risk: max_qty: too big")
        assert refused.quantity == D("0.2")  # what is left of the new total after the fill
        assert store.order_row(refused.client_order_id)["parent_client_order_id"] == order.client_order_id  # type: ignore[index]
        assert oms.order(order.client_order_id).status is OrderStatus.PARTIALLY_FILLED  # untouched
        assert [r.getMessage() for r in caplog.records] == [
            f"amend of {order.client_order_id} refused: risk: max_qty: too big "
            f"(replacement {refused.client_order_id} rejected)"
        ]
        # without a quantity, the order's own total stays: 0.5 - 0.2
        assert oms.refuse_amend(order.client_order_id, price=D("39000"), reason="band").quantity == D("0.3")

    run(body)


def test_a_long_intent_id_gives_its_replacement_an_id_within_the_limit() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock)
        at_limit = await oms.submit(intent(intent_id="x" * 125, price=D("30000")))  # "~a1" makes 128: kept
        longer = await oms.submit(intent(intent_id="y" * 126, price=D("30000")))  # 129: the coid instead
        kept = oms.refuse_amend(at_limit.client_order_id, price=D("30100"), reason="r")
        assert kept.intent.intent_id == "x" * 125 + "~a1"
        shortened = oms.refuse_amend(longer.client_order_id, price=D("30100"), reason="r")
        assert shortened.intent.intent_id == f"{longer.client_order_id}~a1"

    run(body)


# --- restart and shutdown --------------------------------------------------------------------------------


def test_reload_of_an_order_the_store_does_not_have_forgets_it() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock)
        it = intent()
        await _pending_only(oms, it)
        stray = oms.order(it.client_order_id)
        oms.adopt(stray.model_copy(update={"client_order_id": "not-stored"}))
        assert oms.reload("not-stored") is None
        assert oms.known("not-stored") is None

    run(body)


def test_recover_takes_the_resend_policy_given_to_it_over_the_default() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock, resend_unsent=False)
        it = intent()
        await _pending_only(oms, it)
        report = await oms.recover(resend_unsent=True)
        assert [o.client_order_id for o in report.outcome("resent")] == [it.client_order_id]
        assert oms.order(it.client_order_id).status is OrderStatus.OPEN

    run(body)


class StubbornStream:
    """A paper adapter whose user stream swallows a cancellation (as a venue library may) until released."""

    def __init__(self, inner: InProcessAdapter) -> None:
        self.inner = inner
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def stream_user_events(self) -> AsyncIterator[UserEvent]:
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                continue
        return
        yield  # an async generator


def test_stop_says_which_reader_did_not_stop(caplog: pytest.LogCaptureFixture) -> None:
    venue, clock = make_venue()

    async def body() -> None:
        stubborn = StubbornStream(venue.adapter("alice"))
        oms, _store = make_oms(venue, clock, venues={"alice": stubborn})
        await oms.start()
        await asyncio.sleep(0)  # the reader is waiting for events
        try:
            with caplog.at_level(logging.ERROR, logger="meltica.execution.oms"):
                await oms.stop(timeout=0)
        finally:
            stubborn.release.set()  # whatever happened, the reader can end (else the loop never closes)
        (said,) = [r.getMessage() for r in caplog.records]
        assert re.fullmatch(r"background task \S+ did not stop within 0 s", said), said
        await turns_until(lambda: not oms._tasks, "the reader to end once released")

    run(body)


def _trailing(intent_id: str) -> OrderIntent:
    return trailing_stop_intent(intent_id, strategy="s1", created_at=T0)


def _with_emulator(
    oms: OrderManager, venue: InProcessVenue, clock: ManualClock, store: MemoryEmulationStore | None = None
) -> LocalOrderEmulator:
    emulator = LocalOrderEmulator(
        MemoryEmulationStore() if store is None else store,
        clock,
        oms.submit_native,
        oms.cancel,
        capabilities={"alice": venue.adapter("alice").capabilities},
    )
    oms.emulator = emulator
    return emulator


def test_an_emulated_order_is_stored_with_its_links_and_open_with_the_oms() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        _with_emulator(oms, venue, clock)
        held = await oms.submit(_trailing("trail-1"), parent_client_order_id="parent-1", order_list_id="list-1")
        assert held.status is OrderStatus.NEW
        assert [o.client_order_id for o in oms.open_orders()] == [held.client_order_id]
        row = store.order_row(held.client_order_id)
        assert row is not None
        assert (row["emulated"], row["parent_client_order_id"], row["order_list_id"]) == (True, "parent-1", "list-1")

    run(body)


def test_a_native_submit_never_goes_to_the_emulator() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        emulator = _with_emulator(oms, venue, clock)
        sent = await oms.submit_native(_trailing("trail-2"))
        assert sent.status is not OrderStatus.NEW  # the venue's answer, not a locally held order
        assert store.is_emulated(sent.client_order_id) is False
        assert emulator.parent_of(sent.client_order_id) is None

    run(body)


def test_a_hook_failing_before_an_emulated_order_is_held_rejects_it_on_its_account_only() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        oms, _store = make_oms(venue, clock, venues=venues, risk=FailingOpenRecorder(), kill_switch=switch)
        _with_emulator(oms, venue, clock)
        refused = await oms.submit(_trailing("trail-3"))
        assert (refused.status, refused.reason) == (OrderStatus.REJECTED, f"kill switch halt: {NEVER_REACHED_VENUE}")
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert switch.effective("bob", "s1")[0] is KillSwitchMode.OFF

    run(body)


def test_the_real_risk_engine_refuses_through_the_oms_and_the_refusal_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    venue, clock = make_venue()

    async def body() -> None:
        engine = RiskEngine(
            RiskLimits(max_order_quantity=D("0.5")),
            clock=clock,
            instruments={("paper", SYMBOL): spot_instrument(SYMBOL)},
        )
        oms, _store = make_oms(venue, clock, risk=engine)
        ok = await oms.submit(intent(qty="0.5", price=D("30000")))
        assert ok.status is OrderStatus.OPEN and engine.is_reserved(ok.client_order_id)
        with caplog.at_level(logging.INFO, logger="meltica.execution.oms"):
            big = await oms.submit(intent(qty="0.6", price=D("30000")))
        reason = (
            "risk: max_order_quantity: order quantity 0.6: exceeds max_order_quantity 0.5 (risk.max_order_quantity)"
        )
        assert (big.status, big.reason) == (OrderStatus.REJECTED, reason)
        assert [r.getMessage() for r in caplog.records] == [
            f"order {big.client_order_id} rejected before sending: {reason}"
        ]

    run(body)


class BrokenEmulator:
    """A local order emulator that holds orders but breaks when asked to cancel one or told of an event."""

    def __init__(self) -> None:
        self.held: list[str] = []

    def add(self, intent: OrderIntent, client_order_id: str) -> None:
        self.held.append(client_order_id)

    def on_order_event(self, order: Any) -> None:
        raise RuntimeError("emulation store unavailable")

    def cancel(self, client_order_id: str, reason: str) -> None:
        raise RuntimeError("emulation store unavailable")


def test_an_emulator_failure_halts_the_orders_account_only() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        emulator = BrokenEmulator()
        oms, _store = make_oms(venue, clock, venues=venues, kill_switch=switch, emulator=emulator)
        held = await oms.submit(_trailing("trail-4"))
        assert held.status is OrderStatus.NEW and emulator.held == [held.client_order_id]
        with pytest.raises(RuntimeError, match="emulation store unavailable"):
            await oms.cancel(held.client_order_id)
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert switch.effective("bob", "s1")[0] is KillSwitchMode.OFF
        assert [a.message for a in oms.anomalies] == [
            "order emulator cancel failed: RuntimeError: emulation store unavailable"
        ]

    run(body)


def test_an_emulator_failing_on_a_venue_event_halts_that_orders_account_only() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        switch = KillSwitch(clock=clock)
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        oms, _store = make_oms(venue, clock, venues=venues, kill_switch=switch, emulator=BrokenEmulator())
        order = await oms.submit(intent(price=D("30000")))
        assert order.status is OrderStatus.OPEN  # the venue event is applied all the same
        assert switch.effective("alice", "s1") == (KillSwitchMode.HALT, "account:alice")
        assert switch.effective("bob", "s1")[0] is KillSwitchMode.OFF

    run(body)


class TradesWithoutOurIds:
    """A paper adapter whose trade history does not carry our client order ids (many venues' trade
    endpoints report only their own order id)."""

    def __init__(self, inner: InProcessAdapter) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def fetch_my_trades(self, symbol: str, since: Any = None, limit: int | None = None) -> list[Fill]:
        trades = await self.inner.fetch_my_trades(symbol, since, limit)
        return [t.model_copy(update={"client_order_id": f"venue-{t.exchange_order_id}"}) for t in trades]


def test_missing_fills_are_matched_by_the_venues_order_id_when_trades_lack_ours() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock, venues={"alice": TradesWithoutOurIds(venue.adapter("alice"))})
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        await _fill_unseen(venue, "0.2")
        synced = await oms.sync_order(order.client_order_id)
        assert (synced.status, synced.filled_quantity) == (OrderStatus.PARTIALLY_FILLED, D("0.2"))
        assert [f["client_order_id"] for f in store.fills_of(order.client_order_id)] == [order.client_order_id]
        assert_row_matches(store, oms, order.client_order_id)

    run(body)


def test_an_amend_in_place_drops_its_unused_replacement_under_its_deterministic_id() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        order = await oms.submit(intent(qty="0.5", price=D("40000")))
        await oms.amend(order.client_order_id, quantity=D("0.4"))
        (replacement,) = [r for r in store.orders.values() if r["parent_client_order_id"] == order.client_order_id]
        rep = replacement["client_order_id"]
        dropped = oms.order(rep)
        assert (dropped.status, dropped.reason) == (OrderStatus.CANCELLED, "not used: amended in place")
        assert _event_ids(store, rep, "cancelled") == [event_uuid(rep, "cancelled")]

    run(body)


def test_an_iceberg_amended_below_its_visible_part_becomes_a_plain_order() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock)
        iceberg = intent(qty="0.5", price=D("40000"), display_quantity=D("0.2"))
        await _pending_only(oms, iceberg)
        refused = oms.refuse_amend(iceberg.client_order_id, quantity=D("0.2"), reason="risk: too big")
        assert (refused.quantity, refused.intent.display_quantity) == (D("0.2"), None)
        kept = oms.refuse_amend(iceberg.client_order_id, quantity=D("0.3"), reason="risk: too big")
        assert kept.intent.display_quantity == D("0.2")

    run(body)


def test_the_user_streams_record_a_fill_of_an_order_placed_outside_the_oms_under_its_account() -> None:
    venue, clock = make_venue()

    async def body() -> None:
        venues = {"alice": venue.adapter("alice"), "bob": venue.adapter("bob")}
        oms, store = make_oms(venue, clock, venues=venues)
        await oms.start()
        await asyncio.sleep(0)  # the readers are listening
        await rest_ask(venue, qty="0.1")  # bob's ask, placed by hand on the venue
        manual = intent(Side.BUY, OrderType.MARKET, "0.1", account="alice", intent_id="by-hand")
        await venue.adapter("alice").create_order(manual, manual.client_order_id)
        await turns_until(lambda: len(store.fills) == 2, "both sides' fills to be recorded")
        assert sorted(row["account"] for row in store.fills.values()) == ["alice", "bob"]
        assert all(row["strategy"] is None for row in store.fills.values())  # no order of ours: no strategy
        await oms.stop()

    run(body)


def test_after_a_restart_an_order_held_by_the_restored_emulation_is_the_omss_again() -> None:
    """A held stop survives a restart when the emulation's state was stored: recovery hands it back to
    the OMS, so a halt's ``cancel_all`` reaches it (and the emulation stops watching it)."""
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        held_store = MemoryEmulationStore()
        _with_emulator(oms, venue, clock, held_store)
        held = await oms.submit(_trailing("trail-5"))
        coid = held.client_order_id

        restarted, _ = make_oms(venue, clock, store)  # a new process on the same stores
        emulator = _with_emulator(restarted, venue, clock, held_store)
        report = await restarted.recover()
        assert [(o.client_order_id, o.outcome) for o in report.orders] == [(coid, "held_locally")]
        assert report.errors == []
        assert [o.client_order_id for o in restarted.open_orders()] == [coid]
        assert emulator.get(coid).status is EmulatedStatus.PENDING
        await restarted.cancel_all(reason="halt")
        assert restarted.order(coid).status is OrderStatus.CANCELLED
        assert emulator.get(coid).status is EmulatedStatus.CANCELLED

    run(body)


def test_after_a_restart_an_order_whose_emulation_state_was_lost_is_cancelled_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The emulation kept its state in memory: the stop it held is gone with the process. Recovery does
    not leave it looking open (a strategy would rely on it): cancelled with the reason, reported, logged."""
    venue, clock = make_venue()

    async def body() -> None:
        oms, store = make_oms(venue, clock)
        _with_emulator(oms, venue, clock)
        held = await oms.submit(_trailing("trail-6"))
        coid = held.client_order_id

        restarted, _ = make_oms(venue, clock, store)
        _with_emulator(restarted, venue, clock)  # a new, empty emulation
        with caplog.at_level(logging.ERROR, logger="meltica.execution.recovery"):
            report = await restarted.recover()
        assert [(o.client_order_id, o.outcome, o.after) for o in report.orders] == [
            (coid, "lost_locally", OrderStatus.CANCELLED)
        ]
        assert report.errors == [f"{coid}: {LOST_AT_RESTART}"]
        assert (store.get(coid).status, store.get(coid).reason) == (OrderStatus.CANCELLED, LOST_AT_RESTART)
        assert restarted.open_orders() == []
        assert any(coid in r.getMessage() for r in caplog.records)

    run(body)


def test_cancel_all_ends_the_list_legs_the_emulation_holds_within_its_filters() -> None:
    """An OCO's legs on a venue without OCO wait in the emulation for their triggers: they are no venue's
    orders yet, so the OMS has nothing of them to cancel — but a halt must end them, else they would fire
    after it. Filters apply to them as to the rest."""
    venue, clock = make_venue()

    async def body() -> None:
        oms, _store = make_oms(venue, clock)
        emulator = _with_emulator(oms, venue, clock)
        legs = (
            intent(Side.SELL, OrderType.TAKE_PROFIT, "0.1", trigger_price=D("41000"), reduce_only=True),
            intent(Side.SELL, OrderType.STOP_MARKET, "0.1", trigger_price=D("38000"), reduce_only=True),
        )
        take_profit, stop = (leg.client_order_id for leg in legs)
        await emulator.add_list("oco", list(legs), "oco-1")
        assert {o.client_order_id: o.status for o in emulator.orders()} == {
            take_profit: EmulatedStatus.PENDING,
            stop: EmulatedStatus.PENDING,
        }
        assert oms.open_orders() == []

        for other in ({"account": "bob"}, {"strategy": "s2"}, {"symbol": ETH}):
            await oms.cancel_all(reason="not theirs", **other)
            assert len(emulator.orders()) == 2, other
        await oms.cancel_all(account="alice", strategy="s1", symbol=SYMBOL, reason="halt")
        assert emulator.orders() == []
        assert (emulator.get(take_profit).status, emulator.get(take_profit).reason) == (
            EmulatedStatus.CANCELLED,
            "halt",
        )
        assert emulator.get(stop).status is EmulatedStatus.CANCELLED

    run(body)
