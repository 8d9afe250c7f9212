"""Round trips of the public state of the risk engine, the portfolio, the strategy context and the OMS
(``export_state`` / ``import_state``, what the live risk gate's and strategy host's restart snapshots are
made of): whatever the history, the state survives JSON and a fresh object restored from it exports the
same state, holds the same exposure, PnL and orders, and decides the next intent the same way."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meltica.config.settings import RiskLimits
from meltica.domain import Balance, Bar, Fill, Instrument, OrderIntent, OrderType, Side
from meltica.execution import MemoryOrderStore, OrderManager
from meltica.live.config import StrategyInstanceConfig
from meltica.live.strategy_host import LiveStrategyContext
from meltica.portfolio import Portfolio
from meltica.risk import InMemoryKillSwitchStore, KillSwitch, RiskEngine
from meltica.strategies import build_strategy, validate_params
from tests.unit.test_oms_properties import History, NoVenue, histories, messages, pending_order

D = Decimal
T0 = datetime(2024, 3, 1, tzinfo=UTC)
ACCOUNT, VENUE = "acc", "binance"
PRICES = {"BTC/USDT": D(20000), "ETH/USDT": D(1000)}
LIMITS = RiskLimits(
    max_position_notional=D(3000),
    max_gross_exposure=D(4000),
    max_net_exposure=D(2500),
    max_open_orders=4,
    orders_per_minute=50,
    strategies={"b": {"max_position_notional": D(1500)}},
    daily_loss_limit=D(60),
)

intent_op = st.tuples(
    st.just("intent"),
    st.sampled_from(["a", "b"]),
    st.sampled_from(list(PRICES)),
    st.sampled_from([Side.BUY, Side.SELL]),
    st.integers(min_value=1, max_value=120),
)
ops = st.lists(
    st.one_of(
        intent_op,
        intent_op,
        st.tuples(st.just("fill"), st.integers(0, 20), st.integers(1, 100)),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("move"), st.sampled_from(list(PRICES)), st.integers(-400, 400)),
    ),
    max_size=40,
)


def instruments() -> dict[tuple[str, str], Instrument]:
    return {
        (VENUE, s): Instrument(exchange=VENUE, symbol=s, base=s[:3], quote="USDT", tick_size="0.01", step_size="0.001")
        for s in PRICES
    }


def fresh() -> tuple[RiskEngine, Portfolio, KillSwitch]:
    portfolio = Portfolio(clock=lambda: T0)
    switch = KillSwitch(InMemoryKillSwitchStore(), clock=lambda: T0)
    engine = RiskEngine(LIMITS, portfolio, clock=lambda: T0, instruments=instruments(), kill_switch=switch)
    return engine, portfolio, switch


def probe(n: int, strategy: str, symbol: str, side: Side, milli: int) -> OrderIntent:
    return OrderIntent(
        intent_id=f"i-{n}",
        account=ACCOUNT,
        strategy=strategy,
        exchange=VENUE,
        symbol=symbol,
        side=side,
        type=OrderType.LIMIT,
        quantity=max(D("0.001"), (D(milli) / 1000 * (D(20000) / PRICES[symbol]) / 2).quantize(D("0.001"))),
        price=PRICES[symbol],
        created_at=T0,
    )


def run(history: list[tuple[Any, ...]]) -> tuple[RiskEngine, Portfolio, KillSwitch]:
    engine, portfolio, switch = fresh()
    portfolio.set_balances(ACCOUNT, VENUE, {"USDT": Balance(asset="USDT", free=D(10_000))})
    prices = dict(PRICES)
    for symbol, px in prices.items():
        portfolio.mark(VENUE, symbol, px)
        engine.on_market(VENUE, symbol, px)
    orders: list[list[Any]] = []  # [strategy, symbol, side, remaining, coid]
    for n, item in enumerate(history):
        if item[0] == "intent":
            intent = probe(n, *item[1:])
            if engine.check(intent).approved:
                orders.append([intent.strategy, intent.symbol, intent.side, intent.quantity, intent.client_order_id])
        elif item[0] == "fill" and orders:
            order = orders[item[1] % len(orders)]
            strategy, symbol, side, remaining, coid = order
            qty = min(max(D("0.001"), (remaining * item[2] / 100).quantize(D("0.001"))), remaining)
            fill = Fill(
                fill_id=f"f-{n}",
                client_order_id=coid,
                exchange=VENUE,
                symbol=symbol,
                side=side,
                price=prices[symbol],
                quantity=qty,
                fee=D("0.1"),
                fee_currency="BNB",
                ts=T0,
            )
            portfolio.apply_fill(fill, account=ACCOUNT, strategy=strategy)
            engine.on_fill(fill, account=ACCOUNT, strategy=strategy)
            order[3] = remaining - qty
            if order[3] == 0:
                orders.remove(order)
        elif item[0] == "cancel" and orders:
            engine.on_order_closed(orders.pop(item[1] % len(orders))[4])
        elif item[0] == "move":
            symbol = item[1]
            prices[symbol] = (prices[symbol] * (1 + D(item[2]) / 10_000)).quantize(D("0.01"))
            portfolio.mark(VENUE, symbol, prices[symbol])
            engine.on_market(VENUE, symbol, prices[symbol])
    return engine, portfolio, switch


def through_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def restored(engine: RiskEngine, portfolio: Portfolio, switch: KillSwitch) -> tuple[RiskEngine, Portfolio]:
    """What a restarted risk gate rebuilds: portfolio, marks, kill switch, markets, then the engine."""
    engine2, portfolio2, switch2 = fresh()
    portfolio2.import_state(ACCOUNT, through_json(portfolio.export_state(ACCOUNT)))
    for symbol in PRICES:
        mark = portfolio.mark_price(VENUE, symbol)
        if mark is not None:
            portfolio2.restore_mark(VENUE, symbol, mark)
    for scope, state in switch.states().items():
        switch2.restore(scope, state)
    state, _ = engine.export_state(ACCOUNT)
    for symbol in PRICES:
        prices = engine.export_market(VENUE, symbol)
        assert prices is not None
        engine2.import_market(VENUE, symbol, through_json(prices), newer=True, first=True)
    engine2.import_state(ACCOUNT, through_json(state))
    return engine2, portfolio2


@settings(max_examples=100, deadline=None)
@given(history=ops, next_intent=intent_op)
def test_risk_engine_state_round_trips(history: list[tuple[Any, ...]], next_intent: tuple[Any, ...]) -> None:
    engine, portfolio, switch = run(history)
    engine2, _ = restored(engine, portfolio, switch)

    assert engine2.export_state(ACCOUNT) == engine.export_state(ACCOUNT)
    assert [engine2.export_market(VENUE, s) for s in PRICES] == [engine.export_market(VENUE, s) for s in PRICES]
    assert engine2.exposure(ACCOUNT) == engine.exposure(ACCOUNT)
    assert engine2.open_order_count() == engine.open_order_count()
    intent = probe(999, *next_intent[1:])
    first, second = engine.check(intent), engine2.check(intent)
    assert (second.approved, second.rule, second.reason) == (first.approved, first.rule, first.reason)


@settings(max_examples=100, deadline=None)
@given(history=ops)
def test_portfolio_state_round_trips(history: list[tuple[Any, ...]]) -> None:
    engine, portfolio, switch = run(history)
    _, portfolio2 = restored(engine, portfolio, switch)

    assert portfolio2.export_state(ACCOUNT) == portfolio.export_state(ACCOUNT)
    assert portfolio2.ledger_state() == portfolio.ledger_state()
    for strategy in ["a", "b", None]:
        assert portfolio2.pnl(account=ACCOUNT, strategy=strategy) == portfolio.pnl(account=ACCOUNT, strategy=strategy)
    assert portfolio2.positions(account=ACCOUNT) == portfolio.positions(account=ACCOUNT)


def test_a_suspended_reservation_resumes_exactly() -> None:
    engine, _, _ = run([("intent", "a", "BTC/USDT", Side.BUY, 60)])
    (coid,) = [row[0] for row in engine.export_state(ACCOUNT)[0]["open"]]
    before = engine.export_state(ACCOUNT)
    held = engine.suspend(coid)
    assert not engine.is_reserved(coid)
    assert engine.open_order_count() == 0
    engine.resume(held)
    assert engine.is_reserved(coid)
    assert engine.export_state(ACCOUNT) == before


# --- the strategy context ------------------------------------------------------------------------

closes = st.lists(st.integers(min_value=-300, max_value=300), min_size=1, max_size=12)
timers = st.dictionaries(
    st.sampled_from(["rebalance", "heartbeat", "flush"]),
    st.one_of(st.integers(1, 3600).map(lambda s: ("every", s)), st.integers(1, 3600).map(lambda s: ("at", s))),
    max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(moves=closes, timer_specs=timers, epoch=st.sampled_from(["", "e1", "7f3a"]))
def test_strategy_context_state_round_trips(
    moves: list[int], timer_specs: dict[str, tuple[str, int]], epoch: str
) -> None:
    config = StrategyInstanceConfig(
        instance_id="grid-1",
        strategy="grid",
        params={"symbol": "BTC/USDT", "quantity": "0.01", "levels": 3},
        account=ACCOUNT,
        exchange=VENUE,
        symbols=("BTC/USDT",),
    )

    def context() -> LiveStrategyContext:
        ctx = LiveStrategyContext(config, {symbol: inst for (_, symbol), inst in instruments().items()})
        ctx.attach(build_strategy(config.strategy, validate_params(config.strategy, config.params), ctx))
        return ctx

    ctx = context()
    ctx.id_epoch = epoch
    close = D(40000)
    for i, move in enumerate(moves):
        close += move
        ctx.clock.now = T0 + timedelta(minutes=i + 1)
        bar = Bar(exchange=VENUE, symbol="BTC/USDT", timeframe="1m", ts=T0 + timedelta(minutes=i),
                  open=close, high=close + 10, low=close - 10, close=close, volume=D(5))  # fmt: skip
        ctx.strategy.on_bar(bar)
    for name, (kind, seconds) in timer_specs.items():
        if kind == "every":
            ctx.set_timer(name, every=timedelta(seconds=seconds))
        else:
            ctx.set_timer(name, at=T0 + timedelta(seconds=seconds))
    state = ctx.export_state()

    ctx2 = context()
    ctx2.import_state(through_json(state))

    assert ctx2.export_state() == state
    assert ctx2.open_orders() == ctx.open_orders()
    assert ctx2.id_epoch == epoch
    # the next intent id continues the sequence, in the same namespace
    assert ctx2.buy("BTC/USDT", D("0.01"), price=D(39000)) == ctx.buy("BTC/USDT", D("0.01"), price=D(39000))


# --- the OMS ---------------------------------------------------------------------------------------


async def _oms_round_trip(n: int, history: History, prefix: list[int]) -> None:
    store = MemoryOrderStore()
    oms = OrderManager(store, {"a": NoVenue()}, clock=lambda: T0)
    coid = pending_order(store, n).client_order_id
    msgs = messages(coid, history)
    for index in prefix:
        await oms.on_user_event(msgs[index % len(msgs)], account="a")
    state = oms.export_state()

    store2 = copy.deepcopy(store)  # the same stored rows, as a restarted process finds them
    oms2 = OrderManager(store2, {"a": NoVenue()}, clock=lambda: T0)
    oms2.import_state(through_json(state))
    assert oms2.export_state() == state
    assert oms2.order(coid) == oms.order(coid)
    # the rest of the venue's messages lead both to the same order and the same rows
    for msg in msgs:
        await oms.on_user_event(msg, account="a")
        await oms2.on_user_event(msg, account="a")
        assert oms2.order(coid) == oms.order(coid)
    assert oms2.export_state() == oms.export_state()
    assert store2.events_of(coid) == store.events_of(coid)


@settings(max_examples=150, deadline=None)
@given(history=histories(), prefix=st.lists(st.integers(0, 50), max_size=20))
def test_oms_state_round_trips(history: History, prefix: list[int]) -> None:
    asyncio.run(_oms_round_trip(next(_oms_counter), history, prefix))


_oms_counter = iter(range(10**9))
