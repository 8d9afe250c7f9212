"""``ExecutionService`` over the ``SimulatedVenueDriver``: live and lock-step handling, rejections, kill switch,
end of replay, idempotence, and the service inside the in-memory pipeline."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

from meltica.backtest.intents import END_OF_DATA
from meltica.domain import Bar, OrderIntent, OrderStatus, OrderType, Side
from meltica.execution.recovery import LOST_AT_RESTART
from meltica.live.bus import InMemoryBus
from meltica.live.config import AccountVenueConfig, PipelineConfig, StrategyInstanceConfig
from meltica.live.execution import ExecutionService
from meltica.live.processor import Incoming, Outgoing
from meltica.live.simulated_driver import SimulatedVenueDriver
from meltica.live.strategy_host import StrategyHost
from meltica.live.venue import VenueDriver
from meltica.messaging.schemas import (
    AccountFill,
    CancelRequest,
    EndOfReplayCommand,
    KillSwitchCommand,
    OrderListRequest,
    OrderUpdate,
    RejectionNotice,
    RiskDecisionMessage,
    StrategyProgress,
    SubmitRequest,
    VenueProgress,
)

SYMBOL = "BTC/USDT"
T0 = datetime(2022, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def config(*, lockstep: bool) -> PipelineConfig:
    return PipelineConfig(
        instances=(
            StrategyInstanceConfig(
                instance_id="s1", strategy="grid", params={"symbol": SYMBOL}, account="acc",
                exchange="binance", symbols=(SYMBOL,),
            ),
        ),
        accounts={"acc": AccountVenueConfig(exchange="binance", initial_balances={"USDT": D(100_000)})},
        lockstep=lockstep,
    )  # fmt: skip


def bar(i: int, low: str = "39990", high: str = "40010") -> Bar:
    return Bar(
        exchange="binance", symbol=SYMBOL, timeframe="1m", ts=T0 + i * MINUTE,
        open=D(40000), high=D(high), low=D(low), close=D(40000), volume=D(5),
    )  # fmt: skip


def submit(n: int, price: str, *, ts: datetime = T0, side: Side = Side.BUY) -> SubmitRequest:
    intent = OrderIntent(
        intent_id=f"s1:{n}", account="acc", strategy="s1", exchange="binance", symbol=SYMBOL, side=side,
        type=OrderType.LIMIT, quantity=D("0.01"), price=D(price), created_at=ts,
    )  # fmt: skip
    return SubmitRequest(request_id=intent.intent_id, account="acc", strategy="s1", ts=ts, intent=intent)


def run(service: ExecutionService, *messages: tuple[str, Any]) -> list[Outgoing]:
    async def main() -> list[Outgoing]:
        out: list[Outgoing] = []
        for topic, value in messages:
            out += await service.handle(Incoming(topic, "acc", value))
        return out

    return asyncio.run(main())


def updates(out: list[Outgoing]) -> list[OrderUpdate]:
    return [o.value for o in out if isinstance(o.value, OrderUpdate)]


def test_paper_driver_is_a_venue_driver() -> None:
    driver = SimulatedVenueDriver.from_config(config(lockstep=True), "acc")
    assert isinstance(driver, VenueDriver)
    assert driver.adapter.exchange_id == "binance"


def test_live_requests_go_out_at_once_and_a_redelivered_request_does_nothing() -> None:
    service = ExecutionService.simulated(config(lockstep=False))
    assert run(service, ("md.candles.1m", bar(0))) == []  # the market moves; nothing of ours
    request = submit(1, "39000")
    out = run(service, ("orders.approved", request))
    assert [(u.event.__class__.__name__, u.order.status) for u in updates(out)] == [
        ("OrderSubmitted", OrderStatus.PENDING_SUBMIT),
        ("OrderAccepted", OrderStatus.OPEN),
    ]
    assert all(o.topic == "orders.events" and o.key == "acc" for o in out)
    assert updates(out)[0].strategy == "s1"
    assert run(service, ("orders.approved", request)) == []
    # a bar through the limit fills it: update, fill and position published
    filled = run(service, ("md.candles.1m", bar(1, low="38900")))
    topics = [o.topic for o in filled]
    assert topics == ["orders.events", "fills", "positions"]
    assert isinstance(filled[1].value, AccountFill) and filled[1].value.fill.price == D(39000)
    assert filled[2].value.quantity == D("0.01")


def test_rejection_notice_reports_the_order_rejected_with_the_decisions_reason() -> None:
    service = ExecutionService.simulated(config(lockstep=False))
    request = submit(1, "39000")
    decision = RiskDecisionMessage(intent_id="s1:1", approved=False, rule="max_order_notional", reason="too big", ts=T0)
    notice = RejectionNotice(request_id="s1:1", account="acc", strategy="s1", ts=T0, request=request, decision=decision)
    out = updates(run(service, ("orders.approved", notice)))
    assert len(out) == 1
    assert out[0].order.status is OrderStatus.REJECTED
    assert out[0].order.reason == "risk: max_order_notional: too big"
    assert run(service, ("orders.approved", request)) == []  # the same request id: already handled


def test_kill_switch_halt_cancels_open_orders_and_refuses_new_ones() -> None:
    service = ExecutionService.simulated(config(lockstep=False))
    run(service, ("orders.approved", submit(1, "39000")), ("orders.approved", submit(2, "38000")))
    lane = service.lanes["acc"]
    assert len(lane.oms.open_orders()) == 2
    halt = KillSwitchCommand(command_id="k1", actor="test", ts=T0, scope="global", mode="halt", reason="test")
    out = updates(run(service, ("control", halt)))
    cancelled = {u.order.client_order_id for u in out if u.order.status is OrderStatus.CANCELLED}
    assert len(cancelled) == 2
    assert lane.oms.open_orders() == []
    refused = updates(run(service, ("orders.approved", submit(3, "37000"))))
    assert [u.order.status for u in refused] == [OrderStatus.REJECTED]
    assert "kill switch halt" in (refused[0].order.reason or "")


def oco(n: int) -> OrderListRequest:
    """Take profit at 41,000 and a stop at 38,000 for 0.01: the in-process venue has no OCO, so the
    execution stage's emulation holds both legs until one triggers."""

    def leg(k: int, kind: OrderType, **kw: Any) -> OrderIntent:
        return OrderIntent(
            intent_id=f"s1:{n}.{k}", account="acc", strategy="s1", exchange="binance", symbol=SYMBOL,
            side=Side.SELL, type=kind, quantity=D("0.01"), created_at=T0, reduce_only=True, **kw,
        )  # fmt: skip

    legs = (
        leg(0, OrderType.TAKE_PROFIT, trigger_price=D(41000)),
        leg(1, OrderType.STOP_MARKET, trigger_price=D(38000)),
    )
    return OrderListRequest(
        request_id=f"s1:{n}", account="acc", strategy="s1", ts=T0, list_kind="oco", list_id=f"s1:{n}:oco", legs=legs
    )


def held_views(out: list[Outgoing]) -> dict[str, tuple[OrderStatus, str | None]]:
    return {u.order.client_order_id: (u.order.status, u.order.reason) for u in updates(out) if u.held}


def test_a_halt_ends_the_list_legs_the_emulation_holds_and_a_restart_without_them_says_they_are_lost() -> None:
    """An OCO's legs wait in the execution stage's emulation for their triggers (no venue order yet). A halt
    cancels them (else they would fire after it), and the strategy hears it. Kept in memory, they do not
    survive a restart: the restored lane says they are cancelled, and why, instead of leaving them open."""
    service = ExecutionService.simulated(config(lockstep=False))
    request = oco(1)
    take_profit, stop = (i.client_order_id for i in request.legs)
    out = run(service, ("md.candles.1m", bar(0)), ("orders.approved", request))
    assert held_views(out) == {take_profit: (OrderStatus.NEW, None), stop: (OrderStatus.NEW, None)}
    state = service.snapshot("acc")
    assert state is not None

    halt = KillSwitchCommand(command_id="k1", actor="test", ts=T0, scope="global", mode="halt", reason="test")
    halted = held_views(run(service, ("control", halt)))
    assert {coid: status for coid, (status, _) in halted.items()} == {
        take_profit: OrderStatus.CANCELLED,
        stop: OrderStatus.CANCELLED,
    }
    assert service.lanes["acc"].emulator.orders() == []

    restarted = ExecutionService.simulated(config(lockstep=False))
    restarted.restore("acc", state)
    lost = held_views(run(restarted, ("md.candles.1m", bar(1))))
    assert lost == {
        take_profit: (OrderStatus.CANCELLED, LOST_AT_RESTART),
        stop: (OrderStatus.CANCELLED, LOST_AT_RESTART),
    }


def test_lockstep_holds_bars_until_acknowledged_and_requests_until_the_next_open() -> None:
    service = ExecutionService.simulated(config(lockstep=True))
    assert run(service, ("md.candles.1m", bar(0))) == []  # nobody acknowledged step 0 yet
    ack0 = StrategyProgress(
        request_id="p0", account="acc", strategy="s1", ts=T0, exchange="binance", symbol=SYMBOL, seq=0
    )
    out = run(service, ("orders.approved", ack0))
    progress = [o.value for o in out if isinstance(o.value, VenueProgress)]
    assert [(p.seq, p.phase) for p in progress] == [(1, "close")]
    # a request decided at bar 0's close waits for bar 1's open
    request = submit(1, "39000", ts=bar(0).close_time)
    assert run(service, ("orders.approved", request)) == []
    assert run(service, ("md.candles.1m", bar(1))) == []  # step 1 not acknowledged
    ack1 = ack0.model_copy(update={"request_id": "p1", "seq": 1})
    out = run(service, ("orders.approved", ack1))
    assert [type(o.value).__name__ for o in out] == ["OrderUpdate", "OrderUpdate", "VenueProgress"]
    assert (out[-1].value.seq, out[-1].value.phase, out[-1].value.ts) == (2, "open", bar(1).ts)
    assert run(service, ("orders.approved", ack1)) == []  # a repeated watermark changes nothing
    ack2 = ack0.model_copy(update={"request_id": "p2", "seq": 2})
    out = run(service, ("orders.approved", ack2))
    assert [(o.value.seq, o.value.phase) for o in out if isinstance(o.value, VenueProgress)] == [(3, "close")]


def test_end_of_replay_ends_held_orders_and_publishes_the_end_marker() -> None:
    service = ExecutionService.simulated(config(lockstep=True))
    ack = StrategyProgress(
        request_id="p0", account="acc", strategy="s1", ts=T0, exchange="binance", symbol=SYMBOL, seq=0
    )
    end = EndOfReplayCommand(
        command_id="e1", actor="test", ts=T0, exchange="binance", symbol=SYMBOL, last_ts=bar(0).ts, count=1
    )
    run(service, ("md.candles.1m", bar(0)), ("orders.approved", ack), ("control", end))
    held = submit(1, "39000", ts=bar(0).close_time)
    cancel = CancelRequest(request_id="s1:r1", account="acc", strategy="s1", ts=bar(0).close_time, client_order_id="x")
    assert run(service, ("orders.approved", held), ("orders.approved", cancel)) == []
    # the strategies acknowledge the end step (their on_stop done): the data ends
    out = run(service, ("orders.approved", ack.model_copy(update={"request_id": "p2", "seq": 2})))
    final = updates(out)
    assert [(u.order.status, u.order.reason) for u in final] == [(OrderStatus.CANCELLED, END_OF_DATA)]
    assert isinstance(out[-1].value, VenueProgress) and out[-1].value.phase == "end"


def test_kill_switch_through_the_pipeline_cancels_a_running_strategys_orders() -> None:
    pipe = config(lockstep=True)

    class PassThrough:
        name = "risk-pass"
        inputs = ("orders.intents",)

        async def start(self, emit: Any) -> None: ...

        async def stop(self) -> None: ...

        async def handle(self, message: Incoming) -> list[Outgoing]:
            return [Outgoing("orders.approved", message.key or "", message.value)]

        def snapshot(self, key: str) -> None:
            return None

        def restore(self, key: str, state: dict[str, Any]) -> None: ...

    host, execution = StrategyHost(pipe), ExecutionService.simulated(pipe)

    async def main() -> InMemoryBus:
        bus = InMemoryBus([host, PassThrough(), execution])
        async with bus:
            for i in range(3):
                await bus.publish("md.candles.1m", "binance:BTC/USDT", bar(i))
            await bus.run_until_idle()
            assert len(execution.lanes["acc"].oms.open_orders()) == 5  # the grid's buy levels
            halt = KillSwitchCommand(command_id="k", actor="test", ts=T0, scope="strategy:s1", mode="halt", reason="t")
            await bus.publish("control", "strategy:s1", halt)
            await bus.run_until_idle()
            await bus.publish("md.candles.1m", "binance:BTC/USDT", bar(3))
            await bus.run_until_idle()
        return bus

    bus = asyncio.run(main())
    assert execution.lanes["acc"].oms.open_orders() == []
    cancelled = [
        m
        for m in bus.messages("orders.events")
        if isinstance(m, OrderUpdate) and m.order.status is OrderStatus.CANCELLED
    ]
    assert len(cancelled) == 5
    assert host.instances["s1"].ctx.open_orders() == []  # the strategy heard of it at the next step


def test_live_requests_keep_no_per_order_routing_state() -> None:
    # Live requests go out at once, so no market queue is chosen: nothing is remembered per order for it (it was
    # kept for every order, and in every snapshot of the account, for the life of the worker).
    service = ExecutionService.simulated(config(lockstep=False))
    run(service, *(("orders.approved", submit(n, str(39000 - n))) for n in range(1, 31)))
    lane = service.lanes["acc"]
    assert len(lane.oms.open_orders()) == 30
    assert lane.symbol_of == {}
    snapshot = service.snapshot("acc")
    assert snapshot is not None and snapshot["symbol_of"] == {}


def test_lockstep_remembers_the_market_of_ended_orders_up_to_a_bound(monkeypatch: Any) -> None:
    monkeypatch.setattr("meltica.live.execution._KEEP_IDS", 2)
    service = ExecutionService.simulated(config(lockstep=True))
    ack0 = StrategyProgress(
        request_id="p0", account="acc", strategy="s1", ts=T0, exchange="binance", symbol=SYMBOL, seq=0
    )
    run(service, ("md.candles.1m", bar(0)), ("orders.approved", ack0))
    requests = [submit(n, str(39000 - n), ts=bar(0).close_time) for n in range(1, 5)]
    run(service, *(("orders.approved", r) for r in requests))
    lane = service.lanes["acc"]
    coids = [r.intent.client_order_id for r in requests]
    assert set(lane.symbol_of) == set(coids)  # held: their market is known
    ack1 = ack0.model_copy(update={"request_id": "p1", "seq": 1})
    run(service, ("md.candles.1m", bar(1)), ("orders.approved", ack1))
    assert len(lane.oms.open_orders()) == 4 and lane.ended == {}  # open orders are all remembered
    halt = KillSwitchCommand(command_id="k1", actor="test", ts=T0, scope="global", mode="halt", reason="test")
    run(service, ("control", halt))
    assert lane.oms.open_orders() == []
    # the last two orders that ended are remembered; the others are known from the OMS alone
    assert len(lane.symbol_of) == 2 and list(lane.ended) == list(lane.symbol_of)
    snapshot = service.snapshot("acc")
    assert snapshot is not None
    restored = ExecutionService.simulated(config(lockstep=True))
    restored.restore("acc", snapshot)
    assert restored.lanes["acc"].symbol_of == lane.symbol_of and restored.lanes["acc"].ended == lane.ended


def test_the_snapshot_holds_the_last_remembered_request_ids_oldest_first(monkeypatch: Any) -> None:
    # The snapshot's list is kept up to date from the ids remembered since the last snapshot (it is in every
    # checkpoint): the same list as filtering all remembered ids, across snapshots and past the bound.
    monkeypatch.setattr("meltica.live.execution._KEEP_IDS", 3)
    service = ExecutionService.simulated(config(lockstep=False))

    def handled() -> list[str]:
        snapshot = service.snapshot("acc")
        assert snapshot is not None
        return list(snapshot["handled"])

    assert handled() == []
    run(service, *(("orders.approved", submit(n, str(39000 - n))) for n in (1, 2)))
    assert handled() == ["s1:1", "s1:2"]
    assert handled() == ["s1:1", "s1:2"]  # nothing new
    run(service, ("orders.approved", submit(3, "38997")), ("orders.approved", submit(4, "38996")))
    assert handled() == ["s1:2", "s1:3", "s1:4"]
    run(service, *(("orders.approved", submit(n, str(39000 - n))) for n in range(5, 10)))  # past the bound
    assert handled() == ["s1:7", "s1:8", "s1:9"]
    restored = ExecutionService.simulated(config(lockstep=False))
    restored.restore("acc", service.snapshot("acc") or {})
    assert run(restored, ("orders.approved", submit(9, "38991"))) == []  # remembered: a redelivery does nothing
    snapshot = restored.snapshot("acc")
    assert snapshot is not None and snapshot["handled"] == ["s1:7", "s1:8", "s1:9"]
