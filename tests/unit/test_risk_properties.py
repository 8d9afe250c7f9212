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
from meltica.portfolio import Portfolio
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
    daily_loss_limit=D(60),  # post-trade: a loss beyond it switches the account to reduce-only
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
# Sized from the headroom left under a limit: a fraction of it just under, at, or just over 100 %, so the
# flows reach the limits instead of idling at half of them.
edge_op = st.tuples(
    st.just("edge"),
    st.sampled_from(["a", "b"]),
    st.sampled_from(list(PRICES)),
    st.sampled_from([Side.BUY, Side.SELL]),
    st.sampled_from(["gross", "net", "position"]),
    st.sampled_from([D("0.5"), D("0.95"), D("0.999"), D(1), D("1.001"), D("1.05"), D(2)]),
)
move_op = st.tuples(st.just("move"), st.sampled_from(list(PRICES)), st.integers(-400, 400))  # bps
op = st.one_of(
    intent_op,
    intent_op,
    edge_op,
    edge_op,
    move_op,
    st.tuples(st.just("fill"), st.integers(0, 50), st.integers(1, 100)),  # order index, percent
    st.tuples(st.just("fill"), st.integers(0, 50), st.just(100)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
)


def _worst(
    positions: dict[tuple[str, str], Decimal], orders: list[list[object]], prices: dict[str, Decimal]
) -> dict[str, Decimal]:
    """From scratch: worst-case numbers of the account at ``prices``, per the limits' definitions."""
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
    for s, px in prices.items():
        hi, lo = pos[s] + buys[s], pos[s] - sells[s]
        out["pos:" + s] = max(abs(hi), abs(lo)) * px
        out["gross"] += max(abs(hi), abs(lo)) * px
        out["net_hi"] += hi * px
        out["net_lo"] += lo * px
        out["pos"] = max(out["pos"], max(abs(hi), abs(lo)) * px)
        key = ("b", s)
        shi = strat_pos.get(key, D(0)) + sbuys.get(key, D(0))
        slo = strat_pos.get(key, D(0)) - ssells.get(key, D(0))
        out["strat_b"] = max(out["strat_b"], max(abs(shi), abs(slo)) * px)
    return out


def run_flow(ops: list[tuple[object, ...]]) -> dict[str, object]:
    """Replay ``ops`` against a risk engine with a portfolio attached (post-trade checks run on every fill
    and price move); assert the invariants after every step; return what the flow reached."""
    portfolio = Portfolio(clock=lambda: T0)
    switch = KillSwitch(InMemoryKillSwitchStore(), clock=lambda: T0)
    engine = RiskEngine(LIMITS, portfolio, clock=lambda: T0, instruments=instruments(), kill_switch=switch)
    prices = dict(PRICES)
    for symbol, px in prices.items():
        portfolio.mark("binance", symbol, px)
        engine.on_market("binance", symbol, px)
    orders: list[list[object]] = []  # [strategy, symbol, side, remaining, coid, intent]
    positions: dict[tuple[str, str], Decimal] = {}
    rejected_by: set[str] = set()
    peak_gross = D(0)
    breached = False
    for n, item in enumerate(ops):
        qty: Decimal | None = None
        if item[0] == "intent":
            _, strategy, symbol, side, milli, reduce_only = item
            assert isinstance(symbol, str) and isinstance(strategy, str) and isinstance(milli, int)
            qty = max(D("0.001"), D(milli) / 1000 * (D(20000) / prices[symbol]) / 2)
        elif item[0] == "edge":
            _, strategy, symbol, side, which, factor = item
            assert isinstance(symbol, str) and isinstance(strategy, str) and isinstance(factor, Decimal)
            reduce_only = False
            worst = _worst(positions, orders, prices)
            used = {
                "gross": (LIMITS.max_gross_exposure, worst["gross"]),
                "net": (LIMITS.max_net_exposure, max(abs(worst["net_hi"]), abs(worst["net_lo"]))),
                "position": (LIMITS.max_position_notional, worst[f"pos:{symbol}"]),
            }[str(which)]
            headroom = max(D(0), used[0] - used[1])  # type: ignore[operator]
            qty = max(D("0.001"), headroom * factor / prices[symbol])
        if qty is not None:
            intent = OrderIntent(
                intent_id=f"p-{n}",
                account="acc",
                strategy=strategy,  # type: ignore[arg-type]
                exchange="binance",
                symbol=symbol,  # type: ignore[arg-type]
                side=side,  # type: ignore[arg-type]
                type=OrderType.LIMIT,
                quantity=qty.quantize(D("0.001")),
                price=prices[symbol],  # type: ignore[index]
                reduce_only=bool(reduce_only),
                created_at=T0,
            )
            before = _worst(positions, orders, prices)
            decision = engine.check(intent)
            if decision.approved:
                assert not (breached and not intent.reduce_only), "approved a new position after a halt"
                orders.append([strategy, symbol, side, intent.quantity, intent.client_order_id, intent])
                worst = _worst(positions, orders, prices)  # at approval time, at the prices of that moment
                # An approval never takes a measured worst case beyond its limit; one already beyond (a price
                # move did it) may only stay or shrink. The account's position limit holds on the account
                # whichever strategy trades; strategy b's own limit holds on b in addition.
                net, net_before = (max(abs(w["net_hi"]), abs(w["net_lo"])) for w in (worst, before))
                assert worst["gross"] <= max(LIMITS.max_gross_exposure, before["gross"])  # type: ignore[type-var]
                assert net <= max(LIMITS.max_net_exposure, net_before)  # type: ignore[type-var]
                assert worst["strat_b"] <= max(D(1500), before["strat_b"])
                key = f"pos:{symbol}"
                assert worst[key] <= max(LIMITS.max_position_notional, before[key])  # type: ignore[type-var]
                assert len(orders) <= 4
                peak_gross = max(peak_gross, worst["gross"])
            else:
                rejected_by.add(str(decision.rule))
        elif item[0] == "move":
            _, symbol, bps = item
            assert isinstance(symbol, str) and isinstance(bps, int)
            prices[symbol] = (prices[symbol] * (1 + D(bps) / 10_000)).quantize(D("0.01"))
            portfolio.mark("binance", symbol, prices[symbol])
            breached |= bool(engine.on_market("binance", symbol, prices[symbol]))
        elif item[0] == "fill" and orders:
            _, index, percent = item
            assert isinstance(index, int) and isinstance(percent, int)
            order = orders[index % len(orders)]
            strategy, symbol, side, remaining = order[0], order[1], order[2], order[3]
            assert isinstance(remaining, Decimal) and isinstance(symbol, str) and isinstance(strategy, str)
            fill_qty = min(max(D("0.001"), (remaining * percent / 100).quantize(D("0.001"))), remaining)
            fill = Fill(
                fill_id=f"f-{n}",
                client_order_id=str(order[4]),
                exchange="binance",
                symbol=symbol,
                side=side,  # type: ignore[arg-type]
                price=prices[symbol],
                quantity=fill_qty,
                ts=T0,
            )
            portfolio.apply_fill(fill, account="acc", strategy=strategy)
            breached |= bool(engine.on_fill(fill, account="acc", strategy=strategy))
            signed = fill_qty if side is Side.BUY else -fill_qty
            positions[(strategy, symbol)] = positions.get((strategy, symbol), D(0)) + signed
            order[3] = remaining - fill_qty
            if order[3] == 0:
                orders.remove(order)
        elif item[0] == "cancel" and orders:
            _, index = item
            assert isinstance(index, int)
            order = orders.pop(index % len(orders))
            engine.on_order_closed(str(order[4]))

        worst = _worst(positions, orders, prices)
        assert engine.exposure("acc") == (worst["gross"], max(abs(worst["net_hi"]), abs(worst["net_lo"])))
        assert engine.open_order_count() == len(orders)
        if breached:
            assert switch.effective("acc", "a")[0] is not KillSwitchMode.OFF
    return {"rejected_by": rejected_by, "peak_gross": peak_gross, "breached": breached}


@settings(max_examples=200, deadline=None)
@given(st.lists(op, min_size=20, max_size=80))
def test_no_interleaving_takes_approved_exposure_beyond_a_limit(ops: list[tuple[object, ...]]) -> None:
    run_flow(ops)


def test_the_generated_flows_reach_every_limit() -> None:
    """The property above is only as strong as the flows it sees: over a fixed (derandomised) sample,
    every exposure limit rejects something, the gross limit is used to >= 95 %, and loss breaches happen."""
    reached: list[dict[str, object]] = []

    @settings(max_examples=120, derandomize=True, database=None, deadline=None)
    @given(st.lists(op, min_size=20, max_size=80))
    def collect(ops: list[tuple[object, ...]]) -> None:
        reached.append(run_flow(ops))

    collect()
    rules: set[str] = set().union(*(r["rejected_by"] for r in reached))  # type: ignore[arg-type]
    assert {"max_gross_exposure", "max_net_exposure", "max_position_notional", "max_open_orders"} <= rules, rules
    peak = max(r["peak_gross"] for r in reached)  # type: ignore[type-var]
    assert peak >= LIMITS.max_gross_exposure * D("0.95"), peak  # type: ignore[operator]
    assert any(r["breached"] for r in reached)


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


# --- every level's limit holds on what it measures ----------------------------------------------

LEVEL_PRICES = {"BTC/USDT": D(20000), "ETH/USDT": D(1000)}
level_limits = st.fixed_dictionaries(
    {},
    optional={
        "max_order_quantity": st.sampled_from([D("0.05"), D("0.5"), D(5)]),
        "max_order_notional": st.sampled_from([D(300), D(1200), D(5000)]),
        "max_position_notional": st.sampled_from([D(500), D(1500), D(3000), D(8000)]),
        "max_open_orders": st.integers(0, 10),
        "price_band_bps": st.sampled_from([D(0), D(40), D(200)]),
        "orders_per_minute": st.integers(1, 8),
    },
)
level_configs = st.fixed_dictionaries(
    {
        "defaults": level_limits,
        "accounts": st.dictionaries(st.sampled_from(["acc", "other"]), level_limits, max_size=2),
        "strategies": st.dictionaries(st.sampled_from(["a", "b", "c"]), level_limits, max_size=3),
        "symbols": st.dictionaries(st.sampled_from(list(LEVEL_PRICES)), level_limits, max_size=2),
        "legacy": st.dictionaries(st.sampled_from(list(LEVEL_PRICES)), st.sampled_from([D(700), D(2500)]), max_size=1),
    }
)
level_intent = st.tuples(
    st.just("intent"),
    st.sampled_from(["acc", "acc", "other"]),
    st.sampled_from(["a", "a", "b", "c"]),  # uneven: one strategy's own limits get reached too
    st.sampled_from(list(LEVEL_PRICES)),
    st.sampled_from([Side.BUY, Side.SELL]),
    st.integers(1, 100),  # notional, tens of USDT
    st.sampled_from([0, 0, 0, 10, -10, 39, -41, 150]),  # limit price offset from the last trade, bps
)
# the same intent several times in a row: one route's own counts and position reach its limits
level_burst = st.tuples(st.integers(2, 8), level_intent).map(lambda burst: [burst[1]] * burst[0])
level_op = st.one_of(
    level_intent.map(lambda op: [op]),
    level_intent.map(lambda op: [op]),
    level_burst,
    st.tuples(st.just("fill"), st.integers(0, 30), st.integers(1, 100)).map(lambda op: [op]),
    st.tuples(st.just("cancel"), st.integers(0, 30)).map(lambda op: [op]),
    st.tuples(st.just("wait"), st.integers(1, 20)).map(lambda op: [op]),  # seconds
    st.tuples(st.just("move"), st.sampled_from(list(LEVEL_PRICES)), st.integers(-300, 300)).map(lambda op: [op]),
)
level_ops = st.lists(level_op, min_size=20, max_size=60).map(lambda groups: [op for group in groups for op in group])


def _level_limit(cfg: dict[str, dict[str, object]], level: str, key: str, name: str) -> Decimal | None:
    if level == "account":  # the account's own, else the default
        own = cfg["accounts"].get(key, {})
        value = own.get(name, cfg["defaults"].get(name))  # type: ignore[attr-defined]
    elif level == "symbol" and name == "max_position_notional":
        values = [v for v in (cfg["symbols"].get(key, {}).get(name), cfg["legacy"].get(key)) if v is not None]  # type: ignore[attr-defined]
        value = min(values) if values else None
    else:
        value = cfg[{"strategy": "strategies", "symbol": "symbols"}[level]].get(key, {}).get(name)  # type: ignore[attr-defined]
    return None if value is None else D(str(value))


def run_level_flow(cfg: dict[str, dict[str, object]], ops: list[tuple[object, ...]]) -> dict[str, set[str]]:
    """Random limits at the default, account, strategy and symbol levels: after every approval, no level's
    measured quantity is beyond its limit (a worst-case position already beyond it, after a price move,
    may only stay or shrink); returns the rejections' sources."""
    limits = RiskLimits.model_validate(
        {
            **cfg["defaults"],
            "accounts": cfg["accounts"],
            "strategies": cfg["strategies"],
            "symbols": cfg["symbols"],
            "max_position_notional_by_symbol": cfg["legacy"],
        }
    )
    now = [T0]
    instruments = {
        ("binance", s): Instrument(
            exchange="binance", symbol=s, base=s[:3], quote="USDT", tick_size="0.01", step_size="0.001"
        )
        for s in LEVEL_PRICES
    }
    engine = RiskEngine(limits, None, clock=lambda: now[0], instruments=instruments)
    prices = dict(LEVEL_PRICES)
    for symbol, px in prices.items():
        engine.on_market("binance", symbol, px)
    orders: list[list[object]] = []  # [account, strategy, symbol, side, remaining, coid]
    positions: dict[tuple[str, str, str], Decimal] = {}
    approvals: list[tuple[str, str, str, datetime]] = []
    sources: set[str] = set()

    def position(account: str, symbol: str, strategy: str | None) -> Decimal:
        """Worst-case position notional of the account (or of one strategy in it) in ``symbol``."""
        pos = sum(
            (q for (a, s, sym), q in positions.items() if a == account and sym == symbol and strategy in (None, s)),
            D(0),
        )
        mine = [o for o in orders if o[0] == account and o[2] == symbol and strategy in (None, o[1])]
        buys = sum((o[4] for o in mine if o[3] is Side.BUY), D(0))  # type: ignore[misc]
        sells = sum((o[4] for o in mine if o[3] is Side.SELL), D(0))  # type: ignore[misc]
        return max(abs(pos + buys), abs(pos - sells)) * prices[symbol]

    def measured(account: str, strategy: str, symbol: str) -> dict[tuple[str, str], Decimal]:
        """(level, rule) → what that level's limit is measured on, for the route."""
        cutoff = now[0] - timedelta(seconds=60)
        recent = [t for t in approvals if t[0] == account and t[3] > cutoff]
        mine = [o for o in orders if o[0] == account]
        return {
            ("account", "max_position_notional"): position(account, symbol, None),
            ("strategy", "max_position_notional"): position(account, symbol, strategy),
            ("symbol", "max_position_notional"): position(account, symbol, None),
            ("account", "max_open_orders"): D(len(mine)),
            ("strategy", "max_open_orders"): D(sum(1 for o in mine if o[1] == strategy)),
            ("symbol", "max_open_orders"): D(sum(1 for o in mine if o[2] == symbol)),
            ("account", "orders_per_minute"): D(len(recent)),
            ("strategy", "orders_per_minute"): D(sum(1 for t in recent if t[1] == strategy)),
            ("symbol", "orders_per_minute"): D(sum(1 for t in recent if t[2] == symbol)),
        }

    for n, item in enumerate(ops):
        if item[0] == "intent":
            _, account, strategy, symbol, side, tens, offset = item
            assert isinstance(account, str) and isinstance(strategy, str) and isinstance(symbol, str)
            assert isinstance(tens, int) and isinstance(offset, int)
            ref = prices[symbol]
            qty = max(D("0.001"), (D(tens) * 10 / ref).quantize(D("0.001")))  # 10 to 1000 USDT
            price = (ref * (1 + D(offset) / 10_000)).quantize(D("0.01"))
            intent = OrderIntent(
                intent_id=f"l-{n}",
                account=account,
                strategy=strategy,
                exchange="binance",
                symbol=symbol,
                side=side,  # type: ignore[arg-type]
                type=OrderType.LIMIT,
                quantity=qty,
                price=price,
                created_at=T0,
            )
            before = measured(account, strategy, symbol)
            decision = engine.check(intent)
            if not decision.approved:
                sources.add(str(decision.details.get("source")))
                continue
            orders.append([account, strategy, symbol, side, qty, intent.client_order_id])
            approvals.append((account, strategy, symbol, now[0]))
            after = measured(account, strategy, symbol)
            keys = {"account": account, "strategy": strategy, "symbol": symbol}
            for (level, rule), value in after.items():
                lim = _level_limit(cfg, level, keys[level], rule)
                if lim is None:
                    continue
                ceiling = max(lim, before[(level, rule)]) if rule == "max_position_notional" else lim
                assert value <= ceiling, (level, rule, value, lim, decision)
            for level, key in keys.items():
                lim = _level_limit(cfg, level, key, "max_order_quantity")
                assert lim is None or qty <= lim, (level, qty, lim)
                lim = _level_limit(cfg, level, key, "max_order_notional")
                assert lim is None or qty * price <= lim, (level, qty * price, lim)
                lim = _level_limit(cfg, level, key, "price_band_bps")
                assert lim is None or abs(price - ref) * 10_000 <= lim * ref, (level, price, ref, lim)
        elif item[0] == "fill" and orders:
            _, index, percent = item
            assert isinstance(index, int) and isinstance(percent, int)
            order = orders[index % len(orders)]
            account, strategy, symbol, side, remaining = order[0], order[1], order[2], order[3], order[4]
            assert isinstance(remaining, Decimal) and isinstance(symbol, str)
            assert isinstance(account, str) and isinstance(strategy, str)
            fill_qty = min(max(D("0.001"), (remaining * percent / 100).quantize(D("0.001"))), remaining)
            fill = Fill(
                fill_id=f"lf-{n}",
                client_order_id=str(order[5]),
                exchange="binance",
                symbol=symbol,
                side=side,  # type: ignore[arg-type]
                price=prices[symbol],
                quantity=fill_qty,
                ts=T0,
            )
            engine.on_fill(fill, account=account, strategy=strategy)
            signed = fill_qty if side is Side.BUY else -fill_qty
            positions[(account, strategy, symbol)] = positions.get((account, strategy, symbol), D(0)) + signed
            order[4] = remaining - fill_qty
            if order[4] == 0:
                orders.remove(order)
                engine.on_order_closed(str(order[5]))
        elif item[0] == "cancel" and orders:
            _, index = item
            assert isinstance(index, int)
            engine.on_order_closed(str(orders.pop(index % len(orders))[5]))
        elif item[0] == "wait":
            _, seconds = item
            assert isinstance(seconds, int)
            now[0] += timedelta(seconds=seconds)
        elif item[0] == "move":
            _, symbol, bps = item
            assert isinstance(symbol, str) and isinstance(bps, int)
            prices[symbol] = (prices[symbol] * (1 + D(bps) / 10_000)).quantize(D("0.01"))
            engine.on_market("binance", symbol, prices[symbol])
        assert engine.open_order_count() == len(orders)
    return {"sources": sources}


@settings(max_examples=200, deadline=None)
@given(level_configs, level_ops)
def test_no_approval_takes_any_levels_measure_beyond_its_limit(
    cfg: dict[str, dict[str, object]], ops: list[tuple[object, ...]]
) -> None:
    run_level_flow(cfg, ops)


def test_the_generated_level_flows_are_refused_by_every_level() -> None:
    """The property above is only as strong as the flows it sees: over a fixed (derandomised) sample,
    every rule refuses something at every level (default, account, strategy, symbol)."""
    refused: set[tuple[str, str]] = set()  # (rule, level)

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(level_configs, level_ops)
    def collect(cfg: dict[str, dict[str, object]], ops: list[tuple[object, ...]]) -> None:
        for source in run_level_flow(cfg, ops)["sources"]:
            if source.startswith("risk.max_position_notional_by_symbol."):
                refused.add(("max_position_notional", "symbols"))
                continue
            rule = source.rsplit(".", 1)[1]
            refused.add((rule, "default" if source == f"risk.{rule}" else source.split(".")[1]))

    collect()
    rules = ("max_order_quantity", "max_order_notional", "price_band_bps")
    rules += ("max_position_notional", "max_open_orders", "orders_per_minute")
    missing = {(r, lv) for r in rules for lv in ("default", "accounts", "strategies", "symbols")} - refused
    assert not missing, missing
