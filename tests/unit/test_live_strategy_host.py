"""``StrategyHost``: requests from strategy callbacks, progress watermarks, control, dedupe, state."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

from meltica.domain import Bar, Order, OrderAccepted, OrderSubmitted
from meltica.live.config import PipelineConfig, StrategyInstanceConfig
from meltica.live.processor import Incoming, Outgoing
from meltica.live.strategy_host import StrategyHost
from meltica.messaging.schemas import (
    CancelRequest,
    EndOfReplayCommand,
    KillSwitchCommand,
    OrderUpdate,
    SetParamsCommand,
    StrategyCommand,
    StrategyProgress,
    SubmitRequest,
    VenueProgress,
)

SYMBOL = "BTC/USDT"
T0 = datetime(2022, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def config(*, lockstep: bool = False, **params: Any) -> PipelineConfig:
    return PipelineConfig(
        instances=(
            StrategyInstanceConfig(
                instance_id="grid-1",
                strategy="grid",
                params={"symbol": SYMBOL, "quantity": "0.01", "levels": 3, **params},
                account="acc",
                exchange="binance",
                symbols=(SYMBOL,),
            ),
        ),
        lockstep=lockstep,
    )


def bar(i: int, close: str = "40000") -> Bar:
    price = D(close)
    return Bar(
        exchange="binance", symbol=SYMBOL, timeframe="1m", ts=T0 + i * MINUTE,
        open=price, high=price + 10, low=price - 10, close=price, volume=D(5),
    )  # fmt: skip


def handle(host: StrategyHost, topic: str, value: Any, key: str = "k") -> list[Outgoing]:
    return list(asyncio.run(host.handle(Incoming(topic, key, value))))


def values(out: list[Outgoing]) -> list[Any]:
    return [o.value for o in out]


def control(command_id: str, **fields: Any) -> dict[str, Any]:
    return {"command_id": command_id, "actor": "test", "ts": T0, **fields}


def test_live_bars_become_submit_requests_keyed_by_account_and_a_redelivered_bar_does_nothing() -> None:
    host = StrategyHost(config())
    out = handle(host, "md.candles.1m", bar(0))
    submits = [v for v in values(out) if isinstance(v, SubmitRequest)]
    assert [s.request_id for s in submits] == ["grid-1:1", "grid-1:2", "grid-1:3"]
    assert all(o.topic == "orders.intents" and o.key == "acc" for o in out)
    assert all(s.intent.strategy == "grid-1" and s.ts == bar(0).close_time for s in submits)
    # on_start's watermark precedes: seq 0
    progress = [v for v in values(out) if isinstance(v, StrategyProgress)]
    assert [p.seq for p in progress] == [0]
    assert handle(host, "md.candles.1m", bar(0)) == []
    ctx = host.instances["grid-1"].ctx
    assert len(ctx.open_orders()) == 3
    assert all(o.status.value == "pending_submit" for o in ctx.open_orders())


def test_lockstep_waits_for_the_venue_step_and_acknowledges_it() -> None:
    host = StrategyHost(config(lockstep=True))
    first = handle(host, "md.candles.1m", bar(0))
    assert [type(v).__name__ for v in values(first)] == ["StrategyProgress"]  # no on_bar from market data
    step = VenueProgress(
        account="acc", exchange="binance", symbol=SYMBOL, seq=1, phase="close", bar=bar(0), ts=bar(0).close_time
    )
    out = values(handle(host, "orders.events", step))
    assert [type(v).__name__ for v in out] == ["SubmitRequest"] * 3 + ["StrategyProgress"]
    assert out[-1].seq == 1
    # the same step again (redelivery): the same output again, nothing new decided
    again = values(handle(host, "orders.events", step))
    assert [v.request_id for v in again] == [v.request_id for v in out]
    assert host.instances["grid-1"].ctx._seq == 3


def test_order_updates_are_buffered_until_their_step_in_lockstep_and_deduplicated() -> None:
    host = StrategyHost(config(lockstep=True))
    handle(host, "md.candles.1m", bar(0))
    step1 = VenueProgress(
        account="acc", exchange="binance", symbol=SYMBOL, seq=1, phase="close", bar=bar(0), ts=bar(0).close_time
    )
    submits = [v for v in values(handle(host, "orders.events", step1)) if isinstance(v, SubmitRequest)]
    intent = submits[0].intent
    coid = intent.client_order_id
    order = Order.from_intent(intent).apply(OrderSubmitted(event_id="submitted", client_order_id=coid, ts=bar(1).ts))
    accepted_event = OrderAccepted(event_id="accepted", client_order_id=coid, ts=bar(1).ts, exchange_order_id="9")
    accepted = order.apply(accepted_event)
    update = OrderUpdate(account="acc", strategy="grid-1", order=accepted, event=accepted_event)
    assert handle(host, "orders.events", update) == []
    assert handle(host, "orders.events", update) == []  # a duplicate
    ctx = host.instances["grid-1"].ctx
    assert ctx.orders[coid].status.value == "pending_submit"  # not applied before its step
    step2 = VenueProgress(
        account="acc", exchange="binance", symbol=SYMBOL, seq=2, phase="open", bar=bar(1), ts=bar(1).ts
    )
    handle(host, "orders.events", step2)
    assert ctx.orders[coid].status.value == "open"
    assert host.instances["grid-1"].buffer == []


def test_kill_switch_halt_refuses_new_orders_locally_and_cancels_still_go_out() -> None:
    host = StrategyHost(config())
    halt = KillSwitchCommand(**control("k1", scope="account:acc", mode="halt", reason="test"))
    handle(host, "control", halt)
    out = values(handle(host, "md.candles.1m", bar(0)))
    assert not [v for v in out if isinstance(v, SubmitRequest)]
    ctx = host.instances["grid-1"].ctx
    assert ctx.refused_orders == 3
    assert all(o.status.value == "rejected" and "kill switch halt" in (o.reason or "") for o in ctx.rejections)
    ctx.cancel("whatever")
    assert isinstance(ctx.take_requests()[0], CancelRequest)
    handle(host, "control", KillSwitchCommand(**control("k2", scope="account:acc", mode="off", reason="ok")))
    assert ctx.kill_mode() == ("off", "global")


def test_set_params_validates_and_a_bad_change_is_counted_not_raised() -> None:
    host = StrategyHost(config())
    handle(host, "control", SetParamsCommand(**control("p1", strategy="grid-1", params={"levels": 0})))
    assert host.refused_commands == 1
    handle(host, "control", SetParamsCommand(**control("p2", strategy="grid-1", params={"levels": 2})))
    assert host.instances["grid-1"].strategy.params.levels == 2
    assert host.refused_commands == 1
    out = values(handle(host, "md.candles.1m", bar(0)))
    assert len([v for v in out if isinstance(v, SubmitRequest)]) == 2


def test_pause_resume_and_stop() -> None:
    host = StrategyHost(config())
    handle(host, "control", StrategyCommand(**control("s1", instance="grid-1", action="pause")))
    out = values(handle(host, "md.candles.1m", bar(0)))
    assert not [v for v in out if isinstance(v, SubmitRequest)]
    handle(host, "control", StrategyCommand(**control("s2", instance="grid-1", action="resume")))
    out = values(handle(host, "md.candles.1m", bar(1)))
    assert len([v for v in out if isinstance(v, SubmitRequest)]) == 3
    stop = values(handle(host, "control", StrategyCommand(**control("s3", instance="grid-1", action="stop"))))
    assert len([v for v in stop if isinstance(v, CancelRequest)]) == 3  # grid cancels its orders on stop
    assert handle(host, "md.candles.1m", bar(2)) == []
    handle(host, "control", StrategyCommand(**control("s4", instance="nope", action="pause")))
    assert host.refused_commands == 1


def test_end_of_replay_waits_for_the_last_bar_then_stops_and_acknowledges_the_end_step() -> None:
    host = StrategyHost(config(lockstep=True))
    handle(host, "md.candles.1m", bar(0))
    end = EndOfReplayCommand(**control("e1", exchange="binance", symbol=SYMBOL, last_ts=bar(0).ts, count=1))
    assert [type(v).__name__ for v in values(handle(host, "control", end))] == []
    step = VenueProgress(
        account="acc", exchange="binance", symbol=SYMBOL, seq=1, phase="close", bar=bar(0), ts=bar(0).close_time
    )
    out = values(handle(host, "orders.events", step))
    kinds = [type(v).__name__ for v in out]
    assert kinds == ["SubmitRequest"] * 3 + ["StrategyProgress"] + ["CancelRequest"] * 3 + ["StrategyProgress"]
    assert [v.seq for v in out if isinstance(v, StrategyProgress)] == [1, 2]


def test_snapshot_restore_continues_with_the_same_ids_and_orders() -> None:
    host = StrategyHost(config())
    handle(host, "md.candles.1m", bar(0))
    state = json.loads(json.dumps(host.snapshot("grid-1")))
    assert host.snapshot("unknown") is None
    restored = StrategyHost(config())
    restored.restore("grid-1", state)
    a, b = host.instances["grid-1"], restored.instances["grid-1"]
    assert b.ctx._seq == a.ctx._seq == 3
    assert sorted(b.ctx._open) == sorted(a.ctx._open)
    assert handle(restored, "md.candles.1m", bar(0)) == []  # already handled before the snapshot
    for inst in (a, b):
        inst.ctx.cancel(next(iter(inst.ctx._open)))
    assert a.ctx.take_requests()[0].request_id == b.ctx.take_requests()[0].request_id == "grid-1:r1"
    assert b.strategy.snapshot_state() == a.strategy.snapshot_state()


def test_an_id_epoch_keeps_a_fresh_host_off_the_ids_an_earlier_one_used_and_a_restore_keeps_it() -> None:
    # Two deployments of the same instance on one venue account: without an epoch both would send
    # intent "grid-1:1" (one client order id), and the OMS would take the old order for the new one.
    first, second = StrategyHost(config(), id_epoch="e1"), StrategyHost(config(), id_epoch="e2")
    ids_first = [
        v.intent.client_order_id for v in values(handle(first, "md.candles.1m", bar(0))) if isinstance(v, SubmitRequest)
    ]
    out_second = [v for v in values(handle(second, "md.candles.1m", bar(0))) if isinstance(v, SubmitRequest)]
    assert [s.intent.intent_id for s in out_second] == ["grid-1:e2:1", "grid-1:e2:2", "grid-1:e2:3"]
    assert [s.request_id for s in out_second] == [s.intent.intent_id for s in out_second]
    assert not set(ids_first) & {s.intent.client_order_id for s in out_second}

    # A restart that restores its snapshot keeps its own epoch (redeliveries keep their ids), whatever
    # epoch the new process was given.
    state = json.loads(json.dumps(first.snapshot("grid-1")))
    restarted = StrategyHost(config(), id_epoch="e3")
    restarted.restore("grid-1", state)
    assert restarted.instances["grid-1"].ctx._next_intent_id() == "grid-1:e1:4"
