"""The kill switch a worker reads from the database at start, and the commands it hears since, are not
undone by older snapshots restored later (a rebalance hands a partition over after start)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from meltica.domain import Instrument
from meltica.live.config import PipelineConfig, StrategyInstanceConfig
from meltica.live.processor import Incoming
from meltica.live.risk_gate import RiskGate
from meltica.live.strategy_host import StrategyHost
from meltica.messaging.schemas import KillSwitchCommand
from meltica.risk import KillSwitchMode, KillSwitchState, RiskConfig

T0 = datetime(2026, 12, 1, tzinfo=UTC)
INSTRUMENT = Instrument(
    exchange="binance", symbol="BTC/USDT", base="BTC", quote="USDT", tick_size="0.01", step_size="0.001"
)
CONFIG = PipelineConfig(
    instances=(
        StrategyInstanceConfig(
            instance_id="grid-1", strategy="grid", params={"symbol": "BTC/USDT"}, account="acc",
            exchange="binance", symbols=("BTC/USDT",),
        ),
    )
)  # fmt: skip


def command(n: int, mode: str, ts: datetime) -> KillSwitchCommand:
    return KillSwitchCommand(command_id=f"k{n}", actor="ops", ts=ts, scope="global", mode=mode, reason="test")  # type: ignore[arg-type]


def halt_since(ts: datetime) -> dict[str, KillSwitchState]:
    return {"global": KillSwitchState(mode=KillSwitchMode.HALT, reason="db", actor="ops", since=ts)}


def gate_snapshot_released_at(ts: datetime) -> dict[str, object]:
    gate = RiskGate(RiskConfig(), {("binance", "BTC/USDT"): INSTRUMENT})
    asyncio.run(gate.handle(Incoming("control", "global", command(1, "halt", ts - timedelta(minutes=1)))))
    asyncio.run(gate.handle(Incoming("control", "global", command(2, "off", ts))))
    snapshot = gate.snapshot("global")
    assert snapshot is not None
    return json.loads(json.dumps(snapshot))


def test_the_gate_keeps_a_persisted_halt_later_than_a_restored_release() -> None:
    released = gate_snapshot_released_at(T0)
    gate = RiskGate(
        RiskConfig(), {("binance", "BTC/USDT"): INSTRUMENT}, kill_switch_at_start=halt_since(T0 + timedelta(hours=1))
    )
    assert gate.kill_switch.effective("acc", "grid-1")[0] is KillSwitchMode.HALT
    gate.restore("global", released)
    assert gate.kill_switch.effective("acc", "grid-1")[0] is KillSwitchMode.HALT


def test_the_gate_takes_a_restored_release_later_than_the_persisted_halt() -> None:
    released = gate_snapshot_released_at(T0 + timedelta(hours=1))
    gate = RiskGate(RiskConfig(), {("binance", "BTC/USDT"): INSTRUMENT}, kill_switch_at_start=halt_since(T0))
    gate.restore("global", released)
    assert gate.kill_switch.effective("acc", "grid-1")[0] is KillSwitchMode.OFF


def test_the_host_obeys_the_persisted_halt_and_later_commands_over_restored_snapshots() -> None:
    before = StrategyHost(CONFIG).snapshot("grid-1")  # an instance snapshot from before the halt
    assert before is not None
    stored = json.loads(json.dumps(before))
    host = StrategyHost(CONFIG, kill_switch_at_start=halt_since(T0))
    assert host.instances["grid-1"].ctx.kill_mode() == ("halt", "global")
    host.restore("grid-1", stored)
    assert host.instances["grid-1"].ctx.kill_mode() == ("halt", "global")
    asyncio.run(host.handle(Incoming("control", "global", command(3, "off", T0 + timedelta(hours=1)))))
    host.restore("grid-1", stored)  # the release heard since start stays
    assert host.instances["grid-1"].ctx.kill_mode() == ("off", "global")


def test_a_halt_heard_before_a_restore_is_kept() -> None:
    stored = json.loads(json.dumps(StrategyHost(CONFIG).snapshot("grid-1")))
    host = StrategyHost(CONFIG)  # nothing persisted: the halt comes over control, the partition later
    asyncio.run(host.handle(Incoming("control", "global", command(4, "halt", T0))))
    host.restore("grid-1", stored)
    assert host.instances["grid-1"].ctx.kill_mode() == ("halt", "global")
