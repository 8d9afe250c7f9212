"""RiskGate (meltica.live.risk_gate) driven through ``handle``: decisions, lists, amends, kill switch over
the control topic, lock-step holding, redelivery and snapshot/restore equivalence."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel

from meltica.config.settings import RiskLimits
from meltica.domain import Fill, Instrument, OrderIntent, OrderType, Side
from meltica.domain.market_data import Bar
from meltica.domain.orders import Order, OrderAccepted, OrderCancelled, OrderFilled, OrderSubmitted
from meltica.live.processor import Incoming, Outgoing
from meltica.live.risk_gate import RiskGate
from meltica.messaging.schemas import (
    AmendRequest,
    CancelRequest,
    KillSwitchCommand,
    MarketStatus,
    OrderListRequest,
    OrderUpdate,
    RejectedIntent,
    RejectionNotice,
    RiskDecisionMessage,
    StrategyProgress,
    SubmitRequest,
    VenueProgress,
)
from meltica.risk import InMemoryKillSwitchStore, InMemoryRecorder, KillSwitchMode
from tests.kit import OutageKillSwitchStore, OutageRecorder

D = Decimal
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
EX, SYM, ACCT, STRAT = "binance", "BTC/USDT", "main", "mm"
_ids = itertools.count()


def btc() -> Instrument:
    return Instrument(
        exchange=EX, symbol=SYM, base="BTC", quote="USDT", tick_size="0.01", step_size="0.001", min_notional="10"
    )


def gate(*, lockstep: bool = False, recorder: InMemoryRecorder | None = None, **limits: Any) -> RiskGate:
    return RiskGate(RiskLimits.model_validate(limits), {(EX, SYM): btc()}, lockstep=lockstep, recorder=recorder)


def intent(qty: str = "0.01", price: str | None = "20000", side: Side = Side.BUY, **kw: Any) -> OrderIntent:
    kind = kw.pop("type", OrderType.LIMIT if price is not None else OrderType.MARKET)
    return OrderIntent(
        intent_id=kw.pop("intent_id", f"{STRAT}:{next(_ids)}"),
        account=kw.pop("account", ACCT),
        strategy=STRAT,
        exchange=EX,
        symbol=SYM,
        side=side,
        type=kind,
        quantity=D(qty),
        price=None if price is None else D(price),
        created_at=T0,
        **kw,
    )


def submit(order: OrderIntent, ts: datetime = T0) -> SubmitRequest:
    return SubmitRequest(request_id=order.intent_id, account=order.account, strategy=STRAT, ts=ts, intent=order)


def progress_marker(seq: int, ts: datetime = T0) -> StrategyProgress:
    return StrategyProgress(
        request_id=f"{STRAT}:progress:{seq}", account=ACCT, strategy=STRAT, ts=ts, exchange=EX, seq=seq
    )


def venue_progress(
    seq: int, ts: datetime, phase: Literal["open", "close", "end"] = "close", close: str | None = None
) -> VenueProgress:
    bar = None
    if close is not None:
        c = D(close)
        bar = Bar(
            exchange=EX,
            symbol=SYM,
            timeframe="1m",
            ts=ts - timedelta(minutes=1),
            open=c,
            high=c,
            low=c,
            close=c,
            volume=D(1),
        )
    return VenueProgress(account=ACCT, exchange=EX, symbol=SYM, seq=seq, phase=phase, bar=bar, ts=ts)


def candle(close: str, ts: datetime = T0) -> Bar:
    c = D(close)
    return Bar(exchange=EX, symbol=SYM, timeframe="1m", ts=ts, open=c, high=c, low=c, close=c, volume=D(1))


def kill(
    mode: Literal["off", "halt", "reduce_only"], scope: str = "global", ts: datetime = T0, command_id: str | None = None
) -> KillSwitchCommand:
    return KillSwitchCommand(
        command_id=command_id or f"cmd-{next(_ids)}",
        actor="ops",
        ts=ts,
        scope=scope,
        mode=mode,
        reason="test",
    )


def accepted(order_intent: OrderIntent, ts: datetime = T0) -> OrderUpdate:
    coid = order_intent.client_order_id
    order = Order.from_intent(order_intent).apply(OrderSubmitted(event_id="submitted", client_order_id=coid, ts=ts))
    order = order.apply(OrderAccepted(event_id="accepted", client_order_id=coid, ts=ts, exchange_order_id=f"x{coid}"))
    return OrderUpdate(account=order.account, strategy=STRAT, order=order, event=order_event_accepted(coid, ts))


def order_event_accepted(coid: str, ts: datetime) -> OrderAccepted:
    return OrderAccepted(event_id="accepted", client_order_id=coid, ts=ts, exchange_order_id=f"x{coid}")


def filled(update: OrderUpdate, qty: str, price: str, fill_id: str, ts: datetime = T0) -> OrderUpdate:
    order = update.order
    fill = Fill(
        fill_id=fill_id,
        client_order_id=order.client_order_id,
        exchange=EX,
        symbol=SYM,
        side=order.side,
        price=D(price),
        quantity=D(qty),
        ts=ts,
    )
    event = OrderFilled(event_id=f"fill-{fill_id}", client_order_id=order.client_order_id, ts=ts, fill=fill)
    return OrderUpdate(account=order.account, strategy=STRAT, order=order.apply(event), event=event)


def cancelled(update: OrderUpdate, ts: datetime = T0) -> OrderUpdate:
    event = OrderCancelled(event_id="cancelled", client_order_id=update.order.client_order_id, ts=ts)
    return OrderUpdate(account=ACCT, strategy=STRAT, order=update.order.apply(event), event=event)


TOPIC = {
    SubmitRequest: "orders.intents",
    OrderListRequest: "orders.intents",
    CancelRequest: "orders.intents",
    AmendRequest: "orders.intents",
    StrategyProgress: "orders.intents",
    OrderUpdate: "orders.events",
    VenueProgress: "orders.events",
    KillSwitchCommand: "control",
    MarketStatus: "control",
    Bar: "md.candles.1m",
}


def feed(g: RiskGate, *values: BaseModel) -> list[Outgoing]:
    out: list[Outgoing] = []
    for value in values:
        key = getattr(value, "account", None) or getattr(value, "scope", None) or f"{EX}:{SYM}"
        if isinstance(value, MarketStatus):
            key = f"market:{value.exchange}:{value.symbol}"
        out.extend(asyncio.run(g.handle(Incoming(TOPIC[type(value)], key, value))))
    return out


def on(out: Sequence[Outgoing], topic: str) -> list[Any]:
    return [o.value for o in out if o.topic == topic]


def mode_of(g: RiskGate, scope: str = "global") -> KillSwitchMode:
    return g.kill_switch.state_of(scope).mode


def worst_case(g: RiskGate) -> tuple[Decimal, Decimal, Decimal]:
    return g.engine.worst_case_position(ACCT, EX, SYM)


# --- decisions -------------------------------------------------------------------------------------


def test_an_approved_submit_is_forwarded_and_its_decision_published_and_recorded() -> None:
    recorder = InMemoryRecorder()
    g = gate(recorder=recorder, max_order_quantity="1")
    request = submit(intent("0.5"))
    out = feed(g, request)
    assert [(o.topic, o.key) for o in out] == [("orders.approved", ACCT), ("risk.decisions", ACCT)]
    assert out[0].value is request
    decision = out[1].value
    assert (
        isinstance(decision, RiskDecisionMessage)
        and decision.approved
        and decision.intent_id == request.intent.intent_id
    )
    assert decision.ts == T0  # event time: the request's ts
    assert [d.approved for d in recorder.decisions] == [True]
    assert worst_case(g) == (D(0), D("0.5"), D(0))  # reserved as if filled


def test_a_refusal_is_a_notice_in_place_names_the_yaml_path_and_reserves_nothing() -> None:
    recorder = InMemoryRecorder()
    g = gate(recorder=recorder, symbols={SYM: {"max_order_quantity": "0.5"}})
    request = submit(intent("0.6"))
    out = feed(g, request, progress_marker(1))
    assert [o.topic for o in out] == ["orders.approved", "orders.rejected", "risk.decisions", "orders.approved"]
    notice = out[0].value
    assert isinstance(notice, RejectionNotice)
    assert notice.request == request and notice.request_id == request.request_id
    assert notice.decision.rule == "max_order_quantity"
    assert "risk.symbols.BTC/USDT.max_order_quantity" in (notice.decision.reason or "")
    assert notice.decision.details["source"] == "risk.symbols.BTC/USDT.max_order_quantity"
    rejected = out[1].value
    assert isinstance(rejected, RejectedIntent) and rejected.intent == request.intent
    assert not on(out, "risk.decisions")[0].approved
    assert isinstance(out[3].value, StrategyProgress)  # progress follows, in order
    assert g.engine.open_order_count() == 0
    assert [(d.approved, d.rule) for d in recorder.decisions] == [(False, "max_order_quantity")]


def test_an_order_list_is_all_or_nothing_and_a_refused_list_leaves_no_trace() -> None:
    g = gate(max_order_quantity="0.5", orders_per_minute=2)
    legs_bad = (
        intent("0.2", "21000", Side.SELL),
        intent("0.7", None, Side.SELL, type=OrderType.STOP_MARKET, trigger_price=D("19000")),
    )
    bad = OrderListRequest(
        request_id="list-1", account=ACCT, strategy=STRAT, ts=T0, list_kind="oco", list_id="L1", legs=legs_bad
    )
    out = feed(g, bad)
    notice = on(out, "orders.approved")[0]
    assert isinstance(notice, RejectionNotice) and notice.decision.rule == "max_order_quantity"
    assert notice.decision.intent_id == legs_bad[1].intent_id
    decisions = on(out, "risk.decisions")
    assert [(d.intent_id, d.approved, d.rule) for d in decisions] == [
        (legs_bad[0].intent_id, False, "order_list"),
        (legs_bad[1].intent_id, False, "max_order_quantity"),
    ]
    assert "L1" in decisions[0].reason and legs_bad[1].intent_id in decisions[0].reason
    assert [r.intent for r in on(out, "orders.rejected")] == list(legs_bad)
    assert g.engine.open_order_count() == 0 and worst_case(g) == (D(0), D(0), D(0))

    # the passing leg's approval was taken back from the order-rate window too: two more fit in the minute
    legs_good = (
        intent("0.2", "21000", Side.SELL),
        intent("0.2", None, Side.SELL, type=OrderType.STOP_MARKET, trigger_price=D("19000")),
    )
    good = OrderListRequest(
        request_id="list-2", account=ACCT, strategy=STRAT, ts=T0, list_kind="oco", list_id="L2", legs=legs_good
    )
    out = feed(g, good)
    assert on(out, "orders.approved") == [good]
    assert [d.approved for d in on(out, "risk.decisions")] == [True, True]
    assert g.engine.open_order_count() == 2
    third = feed(g, submit(intent("0.1")))
    assert on(third, "risk.decisions")[0].rule == "orders_per_minute"


def order_list(kind: Literal["oco", "bracket"], *legs: OrderIntent) -> OrderListRequest:
    return OrderListRequest(
        request_id=f"list-{next(_ids)}", account=ACCT, strategy=STRAT, ts=T0, list_kind=kind, list_id=f"L{next(_ids)}",
        legs=legs,
    )  # fmt: skip


def stop_sell(qty: str, trigger: str, **kw: Any) -> OrderIntent:
    return intent(qty, None, Side.SELL, type=OrderType.STOP_MARKET, trigger_price=D(trigger), **kw)


def test_an_ocos_reduce_only_legs_are_alternatives_each_checked_on_its_own() -> None:
    """Take profit and stop of one position: each may close all of it (only one fills), and both stay
    reserved. A leg that would flip the position on its own is still refused."""
    g = gate()
    buy = intent("0.3")
    update = accepted(buy)
    feed(g, submit(buy), update, filled(update, "0.3", "20000", "f1"))
    exits = order_list(
        "oco", intent("0.3", "21000", Side.SELL, reduce_only=True), stop_sell("0.3", "19000", reduce_only=True)
    )
    out = feed(g, exits)
    assert on(out, "orders.approved") == [exits]
    assert [d.approved for d in on(out, "risk.decisions")] == [True, True]
    assert g.engine.open_order_count() == 2
    too_big = order_list(
        "oco", intent("0.3", "21000", Side.SELL, reduce_only=True), stop_sell("0.4", "19000", reduce_only=True)
    )
    refused = feed(g, too_big)
    assert isinstance(on(refused, "orders.approved")[0], RejectionNotice)
    assert on(refused, "risk.decisions")[1].rule == "reduce_only"
    assert g.engine.open_order_count() == 2  # the refused list left nothing reserved


def test_a_brackets_exits_are_checked_as_closing_what_the_entry_opens() -> None:
    """From flat, a bracket's reduce-only exits cannot reduce today's position — they act once the entry
    filled — so they are not refused for it; the rest of the rules still apply to them, and exits on the
    entry's own side are refused as before."""
    g = gate(max_open_orders=3)
    entry = intent("0.3", "20000")
    bracket = order_list(
        "bracket",
        entry,
        intent("0.3", "21000", Side.SELL, reduce_only=True),
        stop_sell("0.3", "19000", reduce_only=True),
    )
    out = feed(g, bracket)
    assert on(out, "orders.approved") == [bracket]
    assert g.engine.open_order_count() == 3
    wrong_side = order_list(
        "bracket",
        intent("0.1", "20000"),
        intent("0.1", "21000", reduce_only=True),
        intent("0.1", "19000", reduce_only=True),
    )
    assert on(feed(g, wrong_side), "risk.decisions")[1].rule == "reduce_only"
    g2 = gate(max_order_quantity="0.2")
    big_exit = order_list(
        "bracket",
        intent("0.2"),
        intent("0.3", "21000", Side.SELL, reduce_only=True),
        stop_sell("0.2", "19000", reduce_only=True),
    )
    assert on(feed(g2, big_exit), "risk.decisions")[1].rule == "max_order_quantity"


def test_cancel_and_progress_always_pass() -> None:
    g = gate(max_order_quantity="0.001")
    cancel = CancelRequest(request_id="c-1", account=ACCT, strategy=STRAT, ts=T0, client_order_id="mlt-x")
    out = feed(g, kill("halt"), cancel, progress_marker(3))
    assert [o.value for o in out] == [cancel, progress_marker(3)]
    assert all(o.topic == "orders.approved" for o in out)


# --- amends ----------------------------------------------------------------------------------------


def test_an_amend_that_grows_is_checked_with_the_orders_own_reservation_set_aside() -> None:
    # position limit 10,000: the 0.4 @ 20,000 order (8,000) may grow to 0.45 (9,000) but not to 0.55
    g = gate(max_position_notional="10000", max_order_notional="12000")
    order = intent("0.4")
    feed(g, submit(order), accepted(order))
    coid = order.client_order_id

    too_big = AmendRequest(
        request_id="a-1", account=ACCT, strategy=STRAT, ts=T0, client_order_id=coid, quantity=D("0.55")
    )
    out = feed(g, too_big)
    # forwarded as a rejection notice in its place, so execution tells the strategy
    (notice,) = on(out, "orders.approved")
    assert isinstance(notice, RejectionNotice) and notice.request == too_big
    assert (notice.decision.approved, notice.decision.rule) == (False, "max_position_notional")
    (decision,) = on(out, "risk.decisions")
    assert (decision.approved, decision.rule, decision.intent_id) == (False, "max_position_notional", "a-1")
    assert "risk.max_position_notional" in decision.reason
    assert on(out, "orders.rejected")[0].intent.quantity == D("0.55")
    assert worst_case(g) == (D(0), D("0.4"), D(0))  # untouched
    assert g.engine.open_order_count() == 1

    grows = AmendRequest(
        request_id="a-2", account=ACCT, strategy=STRAT, ts=T0, client_order_id=coid, quantity=D("0.45")
    )
    out = feed(g, grows)
    assert on(out, "orders.approved") == [grows] and on(out, "risk.decisions")[0].approved
    assert worst_case(g) == (D(0), D("0.45"), D(0))  # the order's reservation is now the amended one
    assert g.engine.open_order_count() == 1

    price_up = AmendRequest(
        request_id="a-3", account=ACCT, strategy=STRAT, ts=T0, client_order_id=coid, price=D("30000")
    )
    out = feed(g, price_up)  # 0.45 x 30,000 = 13,500: the notional grows, checked, refused
    assert [type(m) for m in on(out, "orders.approved")] == [RejectionNotice]
    assert on(out, "risk.decisions")[0].rule == "max_order_notional"

    shrink = AmendRequest(
        request_id="a-4", account=ACCT, strategy=STRAT, ts=T0, client_order_id=coid, quantity=D("0.1")
    )
    out = feed(g, shrink)
    assert out == [Outgoing("orders.approved", ACCT, shrink)]  # a decrease passes unchecked

    # the order ends: everything it reserved is released
    feed(g, cancelled(accepted(order)))
    assert worst_case(g) == (D(0), D(0), D(0)) and g.engine.open_order_count() == 0


def test_a_cancel_replace_replacement_takes_over_the_reservation() -> None:
    g = gate()
    order = intent("0.3")
    feed(g, submit(order), accepted(order))
    coid = order.client_order_id
    amend = AmendRequest(request_id="a-1", account=ACCT, strategy=STRAT, ts=T0, client_order_id=coid, quantity=D("0.4"))
    assert on(feed(g, amend), "orders.approved") == [amend]
    replacement = order.model_copy(update={"intent_id": f"{order.intent_id}~a1", "quantity": D("0.4")})
    feed(g, cancelled(accepted(order)))  # the venue cancel-replaces: the original ends...
    assert worst_case(g) == (D(0), D(0), D(0))
    feed(g, accepted(replacement))  # ...and the replacement, approved through the amend, is reserved
    assert worst_case(g) == (D(0), D("0.4"), D(0)) and g.engine.open_order_count() == 1


def test_an_emulated_orders_child_is_counted_in_its_parent() -> None:
    g = gate()
    parent = intent("0.3", None, type=OrderType.STOP_MARKET, trigger_price=D("21000"))
    feed(g, submit(parent))
    child = intent("0.3", None, intent_id=f"{parent.client_order_id}.c1")
    child_update = accepted(child)
    feed(g, child_update)
    assert worst_case(g) == (D(0), D("0.3"), D(0))  # not twice
    feed(g, filled(child_update, "0.3", "21000", "f1"))
    assert worst_case(g) == (D("0.3"), D("0.3"), D("0.3"))
    assert g.engine.open_order_count() == 0  # the parent's reservation is used up by its child's fill
    assert g.portfolio.position(ACCT, EX, SYM, STRAT).quantity == D("0.3")


# --- kill switch over control ----------------------------------------------------------------------


def test_kill_switch_halt_and_release_from_the_control_topic() -> None:
    g = gate()
    feed(g, kill("halt", ts=T0))
    assert mode_of(g) is KillSwitchMode.HALT
    out = feed(g, submit(intent()))
    assert isinstance(on(out, "orders.approved")[0], RejectionNotice)
    assert on(out, "risk.decisions")[0].rule == "kill_switch"
    release = kill("off")
    feed(g, release)
    assert mode_of(g) is KillSwitchMode.OFF
    feed(g, kill("halt", command_id="cmd-old"), kill("off"), kill("halt", command_id="cmd-old"))  # redelivered
    assert mode_of(g) is KillSwitchMode.OFF
    out = feed(g, submit(intent()))
    assert isinstance(on(out, "orders.approved")[0], SubmitRequest)


def test_reduce_only_on_an_account_scope_lets_only_reducing_orders_through() -> None:
    g = gate()
    buy = intent("0.3")
    update = accepted(buy)
    feed(g, submit(buy), update, filled(update, "0.3", "20000", "f1"))
    assert worst_case(g) == (D("0.3"), D("0.3"), D("0.3"))
    feed(g, kill("reduce_only", scope=f"account:{ACCT}"), kill("halt", scope="account:other"))
    more = feed(g, submit(intent("0.1")))
    assert on(more, "risk.decisions")[0].rule == "kill_switch" and "reduce_only" in on(more, "risk.decisions")[0].reason
    less = feed(g, submit(intent("0.1", "20000", Side.SELL)))
    assert on(less, "risk.decisions")[0].approved
    too_much = feed(g, submit(intent("0.25", "20000", Side.SELL)))  # 0.1 + 0.25 sold would flip the position
    assert on(too_much, "risk.decisions")[0].rule == "kill_switch"


def test_a_post_trade_breach_trips_the_kill_switch_and_is_published_on_control() -> None:
    recorder = InMemoryRecorder()
    g = gate(recorder=recorder, daily_loss_limit="100")
    feed(g, candle("20000", T0 - timedelta(minutes=1)))
    buy = intent("1", "20000")
    update = accepted(buy)
    feed(g, submit(buy), update, filled(update, "1", "20000", "f1"))
    out = feed(g, candle("19850", T0))  # unrealized -150
    (command,) = on(out, "control")
    assert isinstance(command, KillSwitchCommand)
    assert (command.scope, command.mode) == (f"account:{ACCT}", "halt")
    assert "risk.daily_loss_limit" in command.reason
    assert out[0].key == f"account:{ACCT}"
    assert [b.rule for b in recorder.breaches] == ["daily_loss_limit"]
    assert feed(g, candle("19800", T0 + timedelta(minutes=1))) == []  # acted on once
    refused = feed(g, submit(intent("0.01", "19800"), ts=T0 + timedelta(minutes=2)))
    assert on(refused, "risk.decisions")[0].rule == "kill_switch"
    assert feed(g, command) == []  # its own command coming back changes nothing


def _breach_on(g: RiskGate) -> list[Outgoing]:
    feed(g, candle("20000", T0 - timedelta(minutes=1)))
    buy = intent("1", "20000")
    update = accepted(buy)
    feed(g, submit(buy), update, filled(update, "1", "20000", "f1"))
    return feed(g, candle("19850", T0))  # unrealized -150 > daily_loss_limit 100


def test_a_breach_halt_is_written_to_the_durable_kill_switch_and_control_commands_are_not() -> None:
    durable = InMemoryKillSwitchStore()
    limits = RiskLimits.model_validate({"daily_loss_limit": "100"})
    g = RiskGate(limits, {(EX, SYM): btc()}, kill_switch_store=durable)
    feed(g, kill("halt", scope="strategy:other"))  # from `meltica kill`, which stored it itself
    assert durable.changes == []
    (command,) = on(_breach_on(g), "control")
    assert [(c.scope, c.current.mode) for c in durable.changes] == [(f"account:{ACCT}", KillSwitchMode.HALT)]
    assert durable.states[f"account:{ACCT}"].reason == command.reason
    feed(g, command)  # its own command coming back is not written again
    assert len(durable.changes) == 1


def test_a_breach_halt_holds_and_is_published_while_the_durable_store_is_down_then_stored() -> None:
    durable = OutageKillSwitchStore()
    limits = RiskLimits.model_validate({"daily_loss_limit": "100"})
    g = RiskGate(limits, {(EX, SYM): btc()}, kill_switch_store=durable)
    durable.down = True
    (command,) = on(_breach_on(g), "control")
    assert (command.scope, command.mode) == (f"account:{ACCT}", "halt")
    assert mode_of(g, f"account:{ACCT}") is KillSwitchMode.HALT and durable.changes == []
    durable.down = False
    feed(g, candle("19840", T0 + timedelta(minutes=1)))  # the next post-trade check writes it
    assert [(c.scope, c.current.mode) for c in durable.changes] == [(f"account:{ACCT}", KillSwitchMode.HALT)]


def test_a_breach_that_cannot_be_recorded_still_goes_out_on_control_and_is_recorded_later() -> None:
    recorder = OutageRecorder()
    g = gate(recorder=recorder, daily_loss_limit="100")
    recorder.down = True
    (command,) = on(_breach_on(g), "control")  # before: the recorder's error left the handler, no command
    assert (command.scope, command.mode) == (f"account:{ACCT}", "halt")
    assert recorder.breaches == [] and [b.rule for b in g.unrecorded] == ["daily_loss_limit"]
    feed(g, candle("19845", T0 + timedelta(minutes=1)))  # still down: kept
    assert len(g.unrecorded) == 1
    recorder.down = False
    assert feed(g, candle("19840", T0 + timedelta(minutes=2))) == []  # written, nothing published again
    assert [b.rule for b in recorder.breaches] == ["daily_loss_limit"] and g.unrecorded == []


def test_candles_are_the_reference_price_outside_lockstep() -> None:
    g = gate(price_band_bps="100")
    out = feed(g, submit(intent("0.01", "20000")))
    assert on(out, "risk.decisions")[0].rule == "price_band_bps"  # no price yet
    feed(g, candle("20000"), candle("30000", T0 - timedelta(minutes=5)))  # the older bar is ignored
    assert on(feed(g, submit(intent("0.01", "20150"))), "risk.decisions")[0].approved
    far = on(feed(g, submit(intent("0.01", "20250"))), "risk.decisions")[0]
    assert far.rule == "price_band_bps" and "risk.price_band_bps" in far.reason


# --- lock-step -------------------------------------------------------------------------------------


def test_lockstep_holds_requests_until_the_venue_progress_of_their_time() -> None:
    g = gate(lockstep=True)
    t1 = T0 + timedelta(minutes=1)
    # before any venue progress nothing is held (the strategies' on_start requests)
    start = submit(intent("0.3", "20000"), ts=T0)
    buy = start.intent
    out = feed(g, start, progress_marker(0))
    assert [type(o.value) for o in out] == [SubmitRequest, RiskDecisionMessage, StrategyProgress]
    assert feed(g, venue_progress(1, T0, close="20000")) == []

    # the strategy reacts at t1 to a fill the gate has not seen yet: its reduce-only sell must wait
    sell = submit(intent("0.3", "20000", Side.SELL, reduce_only=True), ts=t1)
    cancel = CancelRequest(request_id="c-1", account=ACCT, strategy=STRAT, ts=t1, client_order_id="mlt-x")
    assert feed(g, sell, cancel, progress_marker(1, t1)) == []  # held, in order
    assert feed(g, sell) == []  # a redelivered held request stays one
    update = accepted(buy)
    assert feed(g, update, filled(update, "0.3", "20000", "f1", t1)) == []
    out = feed(g, venue_progress(2, t1, close="20000"))
    assert [o.value for o in out if o.topic == "orders.approved"] == [sell, cancel, progress_marker(1, t1)]
    assert on(out, "risk.decisions")[0].approved  # the fill was in the state: it reduces

    # without lock-step the same sell would have been decided before the fill, and refused
    free = gate()
    feed(free, candle("20000"), submit(buy))
    refused = feed(free, submit(intent("0.3", "20000", Side.SELL, reduce_only=True), ts=t1))
    assert on(refused, "risk.decisions")[0].rule == "reduce_only"


def test_lockstep_prices_come_from_venue_progress_bars_not_candles() -> None:
    g = gate(lockstep=True, price_band_bps="100")
    feed(g, candle("30000"))  # ignored in lock-step
    feed(g, venue_progress(1, T0, close="20000"))
    assert on(feed(g, submit(intent("0.01", "20150"))), "risk.decisions")[0].approved
    assert on(feed(g, submit(intent("0.01", "29900"))), "risk.decisions")[0].rule == "price_band_bps"


# --- redelivery and restarts -----------------------------------------------------------------------


def test_redelivered_requests_and_events_change_nothing() -> None:
    g = gate()
    buy = intent("0.3")
    request = submit(buy)
    update = accepted(buy)
    fill = filled(update, "0.1", "20000", "f1")
    first = feed(g, request, update, fill)
    assert len(first) == 2
    assert feed(g, request, update, fill) == []
    assert worst_case(g) == (D("0.1"), D("0.3"), D("0.1"))
    assert g.portfolio.position(ACCT, EX, SYM).quantity == D("0.1")
    # a stale update of an order that has ended does not reserve it again
    feed(g, cancelled(fill))
    feed(g, OrderUpdate(account=ACCT, strategy=STRAT, order=update.order, event=None))
    assert g.engine.open_order_count() == 0 and worst_case(g) == (D("0.1"), D("0.1"), D("0.1"))


T1 = T0 + timedelta(minutes=1)
T2 = T1 + timedelta(seconds=30)


def _history(g: RiskGate) -> None:
    """Positions, open orders, a rate window, a breach, kill-switch scopes and a held request."""
    feed(g, venue_progress(1, T0, close="20000"))
    a, b = intent("0.5", "20000"), intent("0.2", "19990")
    ua, ub = accepted(a), accepted(b)
    feed(g, submit(a), submit(b), ua, ub, filled(ua, "0.5", "20000", "f1"), filled(ub, "0.05", "19990", "f2"))
    feed(g, kill("reduce_only", scope="strategy:other"))
    breach = feed(g, venue_progress(2, T1, close="19900"))  # unrealized loss 54.5 > 40
    assert [c.mode for c in on(breach, "control")] == ["reduce_only"]
    assert on(feed(g, submit(intent("0.01", "19900", Side.SELL), ts=T1)), "risk.decisions")[0].approved
    assert feed(g, submit(intent("0.01", "19900", Side.SELL), ts=T2)) == []  # held for the next progress


def test_a_restored_gate_decides_exactly_as_the_one_that_stopped() -> None:
    limits: dict[str, Any] = {
        "orders_per_minute": 3,
        "max_position_notional": "20000",
        "accounts": {ACCT: {"daily_loss_limit": "40", "breach_action": "reduce_only"}},
    }
    original = gate(lockstep=True, **limits)
    _history(original)
    keys = (ACCT, "global", f"{EX}:{SYM}", "strategy:other")
    stored = json.loads(json.dumps({key: original.snapshot(key) for key in keys}))  # what a Faust table keeps

    restarted = gate(lockstep=True, **limits)
    for key in reversed(keys):
        restarted.restore(key, stored[key])
    assert restarted.snapshot(ACCT) == original.snapshot(ACCT)
    assert restarted.engine.exposure(ACCT) == original.engine.exposure(ACCT)
    assert restarted.engine.worst_case_position(ACCT, EX, SYM) == (D("0.55"), D("0.7"), D("0.54"))
    assert restarted.kill_switch.state_of("strategy:other").mode is KillSwitchMode.REDUCE_ONLY
    assert restarted.kill_switch.state_of(f"account:{ACCT}").mode is KillSwitchMode.REDUCE_ONLY

    after: list[BaseModel] = [
        venue_progress(3, T2, close="19850"),  # releases the held sell; the deeper loss does not trip again
        submit(intent("0.05", "19850"), ts=T2),  # a buy: refused, reduce-only after the breach
        submit(intent("0.1", "19850", Side.SELL), ts=T2),  # reduces: third order in the minute
        submit(intent("0.1", "19850", Side.SELL), ts=T2),  # fourth: the restored rate window refuses it
        kill("off", scope=f"account:{ACCT}", ts=T2),
        venue_progress(4, T2 + timedelta(minutes=1), close="19800"),  # released by hand: the breach trips again
    ]
    expected = feed(original, *after)
    got = feed(restarted, *after)
    assert [(o.topic, o.key, o.value.model_dump(mode="json")) for o in got] == [
        (o.topic, o.key, o.value.model_dump(mode="json")) for o in expected
    ]
    decisions = on(expected, "risk.decisions")
    assert [(d.approved, d.rule) for d in decisions] == [
        (True, None),
        (False, "kill_switch"),
        (True, None),
        (False, "orders_per_minute"),
    ]
    assert [c.mode for c in on(expected, "control")] == ["reduce_only"]
    assert restarted.snapshot(ACCT) == original.snapshot(ACCT)


def test_redelivery_after_a_restore_is_recognised() -> None:
    original = gate(lockstep=True)
    buy = intent("0.3")
    update = accepted(buy)
    messages: list[BaseModel] = [
        venue_progress(1, T0, close="20000"),
        submit(buy),
        update,
        filled(update, "0.1", "20000", "f1"),
    ]
    feed(original, *messages)
    restarted = gate(lockstep=True)
    restarted.restore(ACCT, json.loads(json.dumps(original.snapshot(ACCT))))
    assert feed(restarted, *messages[1:]) == []
    assert restarted.snapshot(ACCT) == original.snapshot(ACCT)


def test_snapshot_of_an_unknown_account_is_none() -> None:
    assert gate().snapshot("nobody") is None


# --- stale market data -------------------------------------------------------------------------------


def status(
    stale: bool, ts: datetime = T0, stream: Literal["trades", "candles.1m", "ticker"] = "candles.1m", **kw: Any
) -> MarketStatus:
    return MarketStatus(
        command_id=f"status-{next(_ids)}",
        actor="ingest",
        ts=ts,
        exchange=kw.pop("exchange", EX),
        symbol=kw.pop("symbol", SYM),
        stream=stream,
        stale=stale,
        last_received_ts=kw.pop("last_received_ts", ts - timedelta(seconds=31) if stale else ts),
        stale_after_s=30,
        heartbeat_s=5,
        **kw,
    )


def test_a_stale_market_refuses_submits_and_lists_not_cancels_and_accepts_again_when_fresh() -> None:
    recorder = InMemoryRecorder()
    g = gate(recorder=recorder)
    assert on(feed(g, submit(intent())), "orders.approved")[0].kind == "submit"  # never heard: fresh
    feed(g, status(False, stream="trades"), status(True, T0 + timedelta(seconds=1)))
    request = submit(intent(), ts=T0 + timedelta(seconds=2))
    out = feed(g, request)
    notice = on(out, "orders.approved")[0]
    assert isinstance(notice, RejectionNotice) and notice.decision.rule == "stale_market_data"
    assert "candles.1m is stale" in (notice.decision.reason or "")
    assert [(d.approved, d.rule) for d in recorder.decisions][-1] == (False, "stale_market_data")
    assert not on(out, "risk.decisions")[0].approved
    legs = (intent("0.01", "21000", Side.SELL), intent("0.01", "19000", Side.SELL))
    order_list = OrderListRequest(
        request_id="list-stale", account=ACCT, strategy=STRAT, ts=T0 + timedelta(seconds=2),
        list_kind="oco", list_id="l-stale", legs=legs,
    )  # fmt: skip
    assert isinstance(on(feed(g, order_list), "orders.approved")[0], RejectionNotice)
    cancel = CancelRequest(request_id="c-stale", account=ACCT, strategy=STRAT, ts=T0, client_order_id="x")
    assert on(feed(g, cancel), "orders.approved") == [cancel]
    # another market is not affected
    assert g.stale_reason(EX, "ETH/USDT", T0) is None
    # fresh again: accepted
    feed(g, status(False, T0 + timedelta(seconds=3)))
    again = submit(intent(), ts=T0 + timedelta(seconds=4))
    assert on(feed(g, again), "orders.approved") == [again]
    assert recorder.decisions[-1].approved


def test_an_older_status_does_not_override_a_newer_one_and_unsubscribed_streams_are_forgotten() -> None:
    g = gate()
    feed(g, status(False, T0 + timedelta(seconds=10)), status(True, T0 + timedelta(seconds=5)))
    assert g.stale_reason(EX, SYM, T0 + timedelta(seconds=11)) is None
    feed(g, status(True, T0 + timedelta(seconds=12), stream="trades"))
    assert "trades is stale" in (g.stale_reason(EX, SYM, T0 + timedelta(seconds=12)) or "")
    feed(g, status(False, T0 + timedelta(seconds=13), stream="trades", subscribed=False))
    assert g.stale_reason(EX, SYM, T0 + timedelta(seconds=13)) is None
    feed(g, status(True, T0 + timedelta(seconds=14), stream="ticker"))  # shown, but nothing reads md.ticker yet
    assert g.stale_reason(EX, SYM, T0 + timedelta(seconds=14)) is None
    assert set(g.market_status(EX, SYM)) == {"candles.1m", "ticker"}


def test_a_market_whose_statuses_stop_is_stale() -> None:
    g = gate()
    feed(g, status(False, T0))
    # three heartbeats (5 s) plus the grace (15 s) later, nothing heard: the ingest is gone
    assert g.stale_reason(EX, SYM, T0 + timedelta(seconds=30)) is None
    late = submit(intent(), ts=T0 + timedelta(seconds=31))
    notice = on(feed(g, late), "orders.approved")[0]
    assert isinstance(notice, RejectionNotice) and notice.decision.rule == "stale_market_data"
    assert "no status from the ingest" in (notice.decision.reason or "")


def test_a_stale_market_stays_stale_across_a_restore() -> None:
    g = gate()
    feed(g, status(True, T0))
    key = f"market:{EX}:{SYM}"
    state = g.snapshot(key)
    assert state is not None
    assert g.snapshot(key) == state  # a heartbeat while stale rewrites nothing
    feed(g, status(True, T0 + timedelta(seconds=5), last_received_ts=T0 - timedelta(seconds=31)))
    assert g.snapshot(key) == state
    restored = gate()
    restored.restore(key, json.loads(json.dumps(state)))
    assert restored.stale_reason(EX, SYM, T0 + timedelta(seconds=6)) is not None
    feed(restored, status(False, T0 + timedelta(seconds=7)))
    assert restored.stale_reason(EX, SYM, T0 + timedelta(seconds=8)) is None
    assert restored.snapshot(key) is None  # nothing stale: nothing to keep
