"""Property tests: approved exposure never exceeds a limit, whatever the interleaving of intents,
fills, partial fills and cancels; the kill switch's state machine; deterministic decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meltica.config.settings import RiskLimits
from meltica.domain import Fill, Instrument, OrderIntent, OrderType, Side
from meltica.risk import InMemoryKillSwitchStore, KillSwitch, KillSwitchMode, RiskEngine

D = Decimal
T0 = datetime(2024, 3, 1, tzinfo=UTC)
PRICES = {"BTC/USDT": D(20000), "ETH/USDT": D(1000)}
LIMITS = RiskLimits(
    max_position_notional=D(3000),
    max_gross_exposure=D(4000),
    max_net_exposure=D(2500),
    max_open_orders=4,
    strategies={"b": {"max_position_notional": D(1500)}},
)


def instruments() -> dict[tuple[str, str], Instrument]:
    return {
        ("binance", s): Instrument(
            exchange="binance", symbol=s, base=s[:3], quote="USDT", tick_size="0.01", step_size="0.001"
        )
        for s in PRICES
    }


intent_op = st.tuples(
    st.just("intent"),
    st.sampled_from(["a", "b"]),
    st.sampled_from(list(PRICES)),
    st.sampled_from([Side.BUY, Side.SELL]),
    st.integers(min_value=1, max_value=120),  # thousandths of a lot
    st.integers(0, 9).map(lambda n: n == 0),  # reduce_only, now and then
)
op = st.one_of(
    intent_op,
    intent_op,
    st.tuples(st.just("fill"), st.integers(0, 50), st.integers(1, 100)),  # order index, percent
    st.tuples(st.just("fill"), st.integers(0, 50), st.just(100)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
)


def _worst(positions: dict[tuple[str, str], Decimal], orders: list[list[object]]) -> dict[str, Decimal]:
    """From scratch: worst-case numbers of the account, per the limits' definitions."""
    pos: dict[str, Decimal] = {s: D(0) for s in PRICES}
    strat_pos: dict[tuple[str, str], Decimal] = {}
    buys = {s: D(0) for s in PRICES}
    sells = {s: D(0) for s in PRICES}
    sbuys: dict[tuple[str, str], Decimal] = {}
    ssells: dict[tuple[str, str], Decimal] = {}
    for (strategy, symbol), qty in positions.items():
        pos[symbol] += qty
        strat_pos[(strategy, symbol)] = qty
    for strategy, symbol, side, remaining, _coid, _intent in orders:
        assert isinstance(remaining, Decimal) and isinstance(symbol, str) and isinstance(strategy, str)
        book, sbook = (buys, sbuys) if side is Side.BUY else (sells, ssells)
        book[symbol] += remaining
        sbook[(strategy, symbol)] = sbook.get((strategy, symbol), D(0)) + remaining
    out = {"gross": D(0), "net_hi": D(0), "net_lo": D(0), "pos": D(0), "strat_b": D(0)}
    for s, px in PRICES.items():
        hi, lo = pos[s] + buys[s], pos[s] - sells[s]
        out["gross"] += max(abs(hi), abs(lo)) * px
        out["net_hi"] += hi * px
        out["net_lo"] += lo * px
        out["pos"] = max(out["pos"], max(abs(hi), abs(lo)) * px)
        key = ("b", s)
        shi = strat_pos.get(key, D(0)) + sbuys.get(key, D(0))
        slo = strat_pos.get(key, D(0)) - ssells.get(key, D(0))
        out["strat_b"] = max(out["strat_b"], max(abs(shi), abs(slo)) * px)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(op, min_size=20, max_size=80))
def test_no_interleaving_takes_approved_exposure_beyond_a_limit(ops: list[tuple[object, ...]]) -> None:
    engine = RiskEngine(LIMITS, None, clock=lambda: T0, instruments=instruments())
    for symbol, px in PRICES.items():
        engine.on_market("binance", symbol, px)
    orders: list[list[object]] = []  # [strategy, symbol, side, remaining, coid, intent]
    positions: dict[tuple[str, str], Decimal] = {}
    for n, item in enumerate(ops):
        if item[0] == "intent":
            _, strategy, symbol, side, milli, reduce_only = item
            assert isinstance(symbol, str) and isinstance(strategy, str) and isinstance(milli, int)
            qty = max(D("0.001"), D(milli) / 1000 * (D(20000) / PRICES[symbol]) / 2)
            intent = OrderIntent(
                intent_id=f"p-{n}",
                account="acc",
                strategy=strategy,
                exchange="binance",
                symbol=symbol,
                side=side,
                type=OrderType.LIMIT,
                quantity=qty.quantize(D("0.001")),
                price=PRICES[symbol],
                reduce_only=bool(reduce_only),
                created_at=T0,
            )
            if engine.check(intent).approved:
                orders.append([strategy, symbol, side, intent.quantity, intent.client_order_id, intent])
        elif item[0] == "fill" and orders:
            _, index, percent = item
            assert isinstance(index, int) and isinstance(percent, int)
            order = orders[index % len(orders)]
            strategy, symbol, side, remaining = order[0], order[1], order[2], order[3]
            assert isinstance(remaining, Decimal) and isinstance(symbol, str) and isinstance(strategy, str)
            qty = max(D("0.001"), (remaining * percent / 100).quantize(D("0.001")))
            qty = min(qty, remaining)
            fill = Fill(
                fill_id=f"f-{n}",
                client_order_id=str(order[4]),
                exchange="binance",
                symbol=symbol,
                side=side,  # type: ignore[arg-type]
                price=PRICES[symbol],
                quantity=qty,
                ts=T0,
            )
            engine.on_fill(fill, account="acc", strategy=strategy)
            signed = qty if side is Side.BUY else -qty
            positions[(strategy, symbol)] = positions.get((strategy, symbol), D(0)) + signed
            order[3] = remaining - qty
            if order[3] == 0:
                orders.remove(order)
        elif item[0] == "cancel" and orders:
            _, index = item
            assert isinstance(index, int)
            order = orders.pop(index % len(orders))
            engine.on_order_closed(str(order[4]))

        worst = _worst(positions, orders)
        assert worst["pos"] <= LIMITS.max_position_notional  # type: ignore[operator]
        assert worst["strat_b"] <= D(1500)
        assert worst["gross"] <= LIMITS.max_gross_exposure  # type: ignore[operator]
        assert max(abs(worst["net_hi"]), abs(worst["net_lo"])) <= LIMITS.max_net_exposure  # type: ignore[operator]
        assert len(orders) <= 4
        assert engine.exposure("acc") == (worst["gross"], max(abs(worst["net_hi"]), abs(worst["net_lo"])))
        assert engine.open_order_count() == len(orders)


def decisions(ops: list[tuple[object, ...]]) -> list[tuple[bool, str | None, str | None]]:
    """The engine's decisions over ``ops`` (rate limit and price band on): compared across processes with
    different hash seeds in ``test_determinism_across_processes.py``."""
    clock_now = [T0]
    engine = RiskEngine(
        LIMITS.model_copy(update={"orders_per_minute": 5, "price_band_bps": D(50)}),
        None,
        clock=lambda: clock_now[0],
        instruments=instruments(),
    )
    for symbol, px in PRICES.items():
        engine.on_market("binance", symbol, px)
    out = []
    for n, item in enumerate(ops):
        clock_now[0] += timedelta(seconds=3)
        if item[0] != "intent":
            engine.on_order_closed(f"nothing-{n}")
            continue
        _, strategy, symbol, side, milli, reduce_only = item
        assert isinstance(symbol, str) and isinstance(strategy, str) and isinstance(milli, int)
        decision = engine.check(
            OrderIntent(
                intent_id=f"d-{n}",
                account="acc",
                strategy=strategy,
                exchange="binance",
                symbol=symbol,
                side=side,  # type: ignore[arg-type]
                type=OrderType.LIMIT,
                quantity=D(milli) / 1000,
                price=PRICES[symbol] + milli,
                reduce_only=bool(reduce_only),
                created_at=T0,
            )
        )
        out.append((decision.approved, decision.rule, decision.reason))
    return out


SCOPES = ["global", "account:main", "strategy:mm"]


class KillSwitchMachine(RuleBasedStateMachine):
    """engage / release / restart in any order: state, store and change log agree."""

    def __init__(self) -> None:
        super().__init__()
        self.store = InMemoryKillSwitchStore()
        self.t = T0
        self.switch = KillSwitch(self.store, clock=self._clock)
        self.model: dict[str, KillSwitchMode] = {}
        self.changes = 0
        self.heard: list[str] = []
        self.heard_since = 0  # index in the store's change log where the current switch began listening
        self.switch.subscribe(lambda change: self.heard.append(change.scope))

    def _clock(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t

    @rule(scope=st.sampled_from(SCOPES), mode=st.sampled_from(["halt", "reduce_only", "reduce-only"]))
    def engage(self, scope: str, mode: str) -> None:
        target = KillSwitchMode.parse(mode)
        if self.model.get(scope, KillSwitchMode.OFF) is not target:
            self.changes += 1
        self.switch.engage(mode, "why", "who", scope=scope)
        self.model[scope] = target

    @rule(scope=st.sampled_from(SCOPES))
    def release(self, scope: str) -> None:
        if self.model.get(scope, KillSwitchMode.OFF) is not KillSwitchMode.OFF:
            self.changes += 1
        self.switch.release("who", "why", scope=scope)
        self.model[scope] = KillSwitchMode.OFF

    @precondition(lambda self: True)
    @rule()
    def restart(self) -> None:
        self.switch = KillSwitch(self.store, clock=self._clock)
        self.heard.clear()
        self.heard_since = len(self.store.changes)
        self.switch.subscribe(lambda change: self.heard.append(change.scope))

    @invariant()
    def agrees(self) -> None:
        for scope in SCOPES:
            assert self.switch.state_of(scope).mode is self.model.get(scope, KillSwitchMode.OFF)
            assert self.store.states.get(scope, self.switch.state_of(scope)) == self.switch.state_of(scope)
        assert len(self.store.changes) == self.changes
        expected = max((self.model.get(s, KillSwitchMode.OFF) for s in SCOPES), key=lambda m: m.severity)
        assert self.switch.effective("main", "mm")[0] is expected
        assert self.switch.effective("other", "other")[0] is self.model.get("global", KillSwitchMode.OFF)
        for change in self.store.changes:
            assert change.previous.mode is not change.current.mode
        # subscribers hear every change, once, in order, and nothing that was not a change
        assert self.heard == [c.scope for c in self.store.changes[self.heard_since :]]


TestKillSwitchMachine = KillSwitchMachine.TestCase
TestKillSwitchMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
