"""Parity: the live pipeline's core (strategy host → risk stage → execution over the paper venue, in
lock-step) produces exactly the orders and fills of ``run_backtest`` on the same bars and settings."""

from __future__ import annotations

import asyncio
import gzip
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any, ClassVar

import pytest

from meltica.backtest import BacktestConfig, BarSeries, run_backtest
from meltica.backtest.results import BacktestResult
from meltica.config.settings import RiskLimits
from meltica.domain import Bar, Fill, Order, OrderStatus, Side
from meltica.live.bus import InMemoryBus
from meltica.live.config import PipelineConfig
from meltica.live.execution import ExecutionService
from meltica.live.processor import Emit, Incoming, Outgoing
from meltica.live.results import PaperRunCollector
from meltica.live.risk_gate import RiskGate
from meltica.live.strategy_host import StrategyHost
from meltica.messaging.catalogue import market_key
from meltica.messaging.schemas import AccountFill, EndOfReplayCommand, PipelineRequest
from meltica.strategies import Strategy, StrategyParams, register_strategy

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
SYMBOL = "BTC/USDT:USDT"
BARS = 3000

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("momentum", {"symbol": SYMBOL, "fast": 10, "slow": 50, "quantity": "0.1"}, {}),
    ("momentum", {"symbol": SYMBOL, "stop": "trailing", "stop_pct": "0.3", "quantity": "0.1"}, {"slippage_bps": 3}),
    ("mean_reversion", {"symbol": SYMBOL, "quantity": "0.1"}, {"taker_fee_bps": 5, "maker_fee_bps": 2}),
    ("grid", {"symbol": SYMBOL}, {}),
]


class PassThroughRisk:
    """The risk stage's place in the topology, approving everything (the real gate is ``RiskGate``)."""

    name = "risk-pass"
    inputs = ("orders.intents",)

    async def start(self, emit: Emit) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        assert isinstance(message.value, PipelineRequest)
        return [Outgoing("orders.approved", message.key or "", message.value)]

    def snapshot(self, key: str) -> dict[str, Any] | None:
        return None

    def restore(self, key: str, state: dict[str, Any]) -> None:
        return None


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> BarSeries:
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with gzip.open(DATA, "rt") as src:
        path.write_text("".join(itertools.islice(src, BARS + 1)))
    return BarSeries.from_file(path, exchange="binance", symbol=SYMBOL, timeframe="1m")


def make_config(name: str, params: dict[str, Any], extra: dict[str, Any]) -> BacktestConfig:
    return BacktestConfig.create(
        strategy=name, params=params, symbol=SYMBOL, initial_balances={"USDT": D(100_000), "BTC": D(1)}, **extra
    )


def end_of_replay(config: BacktestConfig, bars: list[Bar]) -> EndOfReplayCommand:
    return EndOfReplayCommand(
        command_id="end-1",
        actor="test",
        ts=datetime(2022, 2, 1, tzinfo=UTC),
        exchange=config.exchange,
        symbol=config.symbol,
        last_ts=bars[-1].ts,
        count=len(bars),
    )


def pipeline(config: BacktestConfig) -> tuple[StrategyHost, PassThroughRisk, ExecutionService]:
    pipe = PipelineConfig.from_backtest(config)
    return StrategyHost(pipe), PassThroughRisk(), ExecutionService.simulated(pipe)


def collect(config: BacktestConfig, bus: InMemoryBus) -> PaperRunCollector:
    instrument = config.market()
    collector = PaperRunCollector(
        account=config.account,
        exchange=config.exchange,
        symbol=config.symbol,
        base=instrument.base,
        quote=instrument.quote,
        initial_balances=config.balances(),
    )
    for value in bus.messages("orders.events"):
        collector.on_message(value)
    return collector


async def replay(bus: InMemoryBus, config: BacktestConfig, bars: list[Bar], *, end: bool = True) -> None:
    key = market_key(config.exchange, config.symbol)
    for bar in bars:
        await bus.publish("md.candles.1m", key, bar)
        await bus.run_until_idle()
    if end:
        await bus.publish("control", "replay", end_of_replay(config, bars))
        await bus.run_until_idle()


def fills_of(fills: list[Fill]) -> list[tuple[Any, ...]]:
    return [(f.client_order_id, f.side, f.price, f.quantity, f.fee, f.ts) for f in fills]


def orders_of(orders: list[Order]) -> list[tuple[Any, ...]]:
    return [(o.client_order_id, o.status, o.filled_quantity) for o in orders]


def assert_same(result: BacktestResult, collector: PaperRunCollector) -> None:
    assert collector.ended
    assert fills_of(collector.fills) == fills_of(result.fills)
    assert sorted(orders_of(list(collector.orders.values()))) == sorted(orders_of(result.orders))


@pytest.mark.parametrize(("name", "params", "extra"), CASES)
def test_pipeline_in_lockstep_gives_the_backtests_orders_and_fills(
    series: BarSeries, name: str, params: dict[str, Any], extra: dict[str, Any]
) -> None:
    config = make_config(name, params, extra)
    result = run_backtest(config, series)
    bars = list(series.bars())

    async def main() -> InMemoryBus:
        bus = InMemoryBus(pipeline(config))
        async with bus:
            await replay(bus, config, bars)
        return bus

    bus = asyncio.run(main())
    collector = collect(config, bus)
    assert len(result.fills) >= 4 and len(result.orders) >= 8  # something to compare
    assert_same(result, collector)
    # fills topic: the same fills, each once
    account_fills = [m for m in bus.messages("fills") if isinstance(m, AccountFill)]
    assert fills_of([m.fill for m in account_fills]) == fills_of(result.fills)


async def replay_all_at_once(bus: InMemoryBus, config: BacktestConfig, bars: list[Bar]) -> None:
    """Every bar and the end published before anything is handled: the pipeline's watermarks alone
    keep the order (as on a broker, where the replay runs ahead of the agents)."""
    key = market_key(config.exchange, config.symbol)
    for bar in bars:
        await bus.publish("md.candles.1m", key, bar)
    await bus.publish("control", "replay", end_of_replay(config, bars))
    await bus.run_until_idle()


@pytest.mark.parametrize("seed", [1, 7])
@pytest.mark.parametrize(("name", "params", "extra"), [CASES[1], CASES[3]])
def test_parity_holds_whatever_the_interleaving_of_topics(
    series: BarSeries, name: str, params: dict[str, Any], extra: dict[str, Any], seed: int
) -> None:
    config = make_config(name, params, extra)
    bars = list(series.bars())[:1500]
    result = run_backtest(config, bars)

    async def main() -> InMemoryBus:
        bus = InMemoryBus(pipeline(config), seed=seed)
        async with bus:
            await replay_all_at_once(bus, config, bars)
        return bus

    assert_same(result, collect(config, asyncio.run(main())))


@pytest.mark.parametrize(("name", "params", "extra"), [CASES[1], CASES[2]])
def test_redelivering_every_message_changes_nothing(
    series: BarSeries, name: str, params: dict[str, Any], extra: dict[str, Any]
) -> None:
    config = make_config(name, params, extra)
    bars = list(series.bars())[:1500]
    result = run_backtest(config, bars)

    async def main() -> InMemoryBus:
        bus = InMemoryBus(pipeline(config), redeliver=True)
        async with bus:
            await replay(bus, config, bars)
        return bus

    bus = asyncio.run(main())
    assert_same(result, collect(config, bus))
    # nothing executed twice: every order update and fill appears once
    fills = [m.fill.fill_id for m in bus.messages("fills") if isinstance(m, AccountFill)]
    assert len(fills) == len(set(fills)) == len(result.fills)


@pytest.mark.parametrize(("name", "params", "extra"), [CASES[1], CASES[3]])
def test_snapshot_and_restore_mid_run_continues_exactly(
    series: BarSeries, name: str, params: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Half the replay, then the strategy host and the execution agent's lock-step state are rebuilt
    from their snapshots (the paper venue and the order store survive, as PostgreSQL and the emulator
    would); the rest of the replay gives the backtest's result."""
    config = make_config(name, params, extra)
    bars = list(series.bars())[:2000]
    result = run_backtest(config, bars)

    async def main() -> list[Any]:
        host, risk, execution = pipeline(config)
        first = InMemoryBus([host, risk, execution])
        async with first:
            await replay(first, config, bars[:1000], end=False)
        pipe = PipelineConfig.from_backtest(config)
        host2 = StrategyHost(pipe)
        for key in host.instance_keys():
            state = host.snapshot(key)
            assert state is not None
            host2.restore(key, json_round_trip(state))
        assert host2.instances[config.strategy_instance].ctx._seq == host.instances[config.strategy_instance].ctx._seq
        # the execution agent keeps its venue and store (they are external in production)
        for account in execution.lanes:
            state = execution.snapshot(account)
            assert state is not None
            execution.restore(account, json_round_trip(state))
        second = InMemoryBus([host2, risk, execution])
        async with second:
            await replay(second, config, bars[1000:])
        return [*first.messages("orders.events"), *second.messages("orders.events")]

    events = asyncio.run(main())
    collector = collect_values(config, events)
    assert_same(result, collector)


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    import json

    loaded: dict[str, Any] = json.loads(json.dumps(state))
    return loaded


def collect_values(config: BacktestConfig, values: list[Any]) -> PaperRunCollector:
    instrument = config.market()
    collector = PaperRunCollector(
        account=config.account,
        exchange=config.exchange,
        symbol=config.symbol,
        base=instrument.base,
        quote=instrument.quote,
        initial_balances=config.balances(),
    )
    for value in values:
        collector.on_message(value)
    return collector


class BracketsParams(StrategyParams):
    symbol: str = SYMBOL
    brackets: int = 6
    oco: bool = False  # instead: buy, then an OCO (take profit, stop) that closes the whole position


@register_strategy
class BracketsWhenIdle(Strategy[BracketsParams]):
    """Places a bracket whenever it has no open order (up to ``brackets``): a strategy that believes what
    ``open_orders`` says, and that stops for good if a leg held by the local emulation looks open for ever."""

    name: ClassVar[str] = "test_brackets_when_idle"
    Params: ClassVar[type[StrategyParams]] = BracketsParams

    def __init__(self, params: BracketsParams, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.placed = 0
        self.heard: list[tuple[str, OrderStatus]] = []

    def on_bar(self, bar: Bar) -> None:
        params = self.params
        assert isinstance(params, BracketsParams)
        if self.ctx.open_orders() or self.placed >= params.brackets:
            return
        if params.oco:
            if self.ctx.position(params.symbol).quantity == 0:
                self.ctx.buy(params.symbol, D("0.01"))
                return
            self.placed += 1
            self.ctx.oco(
                params.symbol,
                Side.SELL,
                D("0.01"),
                take_profit_price=bar.close * D("1.002"),
                stop_price=bar.close * D("0.998"),
            )
            return
        self.placed += 1
        self.ctx.bracket(
            params.symbol,
            Side.BUY,
            D("0.01"),
            entry_price=bar.close,
            take_profit_price=bar.close * D("1.002"),
            stop_price=bar.close * D("0.998"),
        )

    def on_order(self, order: Order) -> None:
        self.heard.append((order.client_order_id, order.status))


@pytest.mark.parametrize("oco", [False, True], ids=["bracket", "oco"])
def test_list_legs_held_by_the_emulation_end_in_the_pipeline_as_in_the_backtest(series: BarSeries, oco: bool) -> None:
    """The exits of a bracket are held by the execution stage's local order emulation (they never reach the
    venue under their own ids). Their strategy, the risk gate and the paper run follow the emulation: ``new``
    while held, then how they ended. Before, the strategy saw them ``pending_submit`` and open for ever (so
    it never placed a second bracket), and the risk gate kept their reservations (so ``max_open_orders``
    denied every later order)."""
    config = make_config("test_brackets_when_idle", {"symbol": SYMBOL, "oco": oco}, {})
    result = run_backtest(config, series)
    bars = list(series.bars())
    pipe = PipelineConfig.from_backtest(config)
    host = StrategyHost(pipe)
    limits = RiskLimits.model_validate({"max_open_orders": 3})
    risk = RiskGate(limits, {(config.exchange, SYMBOL): config.market()}, lockstep=True)

    async def main() -> InMemoryBus:
        bus = InMemoryBus((host, risk, ExecutionService.simulated(pipe)))
        async with bus:
            await replay(bus, config, bars)
        return bus

    bus = asyncio.run(main())
    collector = collect(config, bus)
    assert_same(result, collector)
    inst = host.instances[config.strategy_instance]
    assert inst.ctx.open_orders() == []
    strategy = inst.strategy
    assert isinstance(strategy, BracketsWhenIdle)
    assert strategy.placed == 6
    assert not [m for m in bus.messages("risk.decisions") if getattr(m, "approved", True) is False]
    legs = [o for o in collector.orders.values() if o.intent.strategy and not o.intent.intent_id.startswith("mlt-")]
    assert len(legs) == 6 * (2 + 1 if oco else 3)  # six lists (a buy before each OCO; child orders on top)
    assert all(o.is_terminal for o in collector.orders.values())
    assert sum(o.status is OrderStatus.CANCELLED for o in legs) == 6  # the exit that did not fire, each time
    heard = [coid for coid, status in strategy.heard if status is OrderStatus.CANCELLED]
    assert {o.client_order_id for o in legs if o.status is OrderStatus.CANCELLED} <= set(heard)
