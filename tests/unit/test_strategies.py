"""Strategies through the backtest's context (the real OMS over the paper venue, ``BacktestContext``) on real
BTC perpetual 1m bars; registry; the context's contract."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any, ClassVar

import pytest

from meltica.backtest.context import BacktestContext
from meltica.backtest.engine import run_bars
from meltica.domain import Bar, Fill, Instrument, Order, OrderIntent, OrderStatus, OrderType, Side, TimeInForce
from meltica.errors import ConfigurationError
from meltica.strategies import (
    Strategy,
    StrategyContext,
    StrategyParams,
    build_strategy,
    get_strategy,
    list_strategies,
    param_space,
    register_strategy,
)

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
SYMBOL = "BTC/USDT:USDT"
INSTRUMENT = Instrument(
    exchange="binance",
    symbol=SYMBOL,
    base="BTC",
    quote="USDT",
    settle="USDT",
    tick_size=D("0.1"),
    step_size=D("0.001"),
    min_quantity=D("0.001"),
    min_notional=D("5"),
)


def load_bars(n: int, skip: int = 0) -> list[Bar]:
    out: list[Bar] = []
    with gzip.open(DATA, "rt") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i < skip:
                continue
            if len(out) >= n:
                break
            ts = datetime.fromisoformat(row["timestamp"]).replace(tzinfo=UTC)
            out.append(
                Bar(
                    exchange="binance",
                    symbol=SYMBOL,
                    timeframe="1m",
                    ts=ts,
                    open=row["open"],
                    high=row["high"],
                    low=row["low"],
                    close=row["close"],
                    volume=row["volume"],
                )
            )
    return out


BARS = load_bars(3000)


def make_ctx(instance_id: str = "s1", balances: dict[str, D] | None = None) -> BacktestContext:
    return BacktestContext(
        [INSTRUMENT],
        start=BARS[0].ts,
        balances=balances or {"USDT": D(100_000), "BTC": D(1)},
        account="paper",
        instance_id=instance_id,
    )


def intents(ctx: BacktestContext) -> list[OrderIntent]:
    """Every order the instance asked for (amendments' replacements included), in the order asked."""
    return [o.intent for o in ctx.orders.values()]


def balances(ctx: BacktestContext) -> dict[str, tuple[D, D]]:
    """(free, locked) per asset of the context's account on the paper venue."""
    return {a: (b.free, b.locked) for a, b in ctx.engine.ledger.balances(ctx.account).items()}


BUILTINS: list[tuple[str, dict[str, Any]]] = [
    ("momentum", {"symbol": SYMBOL}),
    ("momentum", {"symbol": SYMBOL, "allow_short": True, "stop": "percent", "stop_pct": "0.5"}),
    ("momentum", {"symbol": SYMBOL, "stop": "trailing", "stop_pct": "0.3", "fast": 5, "slow": 20}),
    ("mean_reversion", {"symbol": SYMBOL}),
    ("mean_reversion", {"symbol": SYMBOL, "allow_short": True, "entry_z": 1.5, "max_holding_bars": 20}),
    ("market_making", {"symbol": SYMBOL}),
    ("grid", {"symbol": SYMBOL}),
    ("grid", {"symbol": SYMBOL, "mode": "neutral", "step_pct": "0.1", "levels": 8}),
]


def run(name: str, params: dict[str, Any], bars: list[Bar], ctx: BacktestContext | None = None) -> BacktestContext:
    ctx = ctx or make_ctx(name)
    strategy = build_strategy(name, params, ctx)
    ctx.attach(strategy)
    run_bars(ctx, bars)
    return ctx


@pytest.mark.parametrize(("name", "params"), BUILTINS)
def test_builtin_trades_real_data_without_invalid_intents_or_negative_balances(
    name: str, params: dict[str, Any]
) -> None:
    ctx = run(name, params, BARS)
    submits = intents(ctx)
    assert len(submits) >= 5, "the strategy placed (almost) no orders on 3000 real bars"
    assert ctx.fills, "nothing filled"
    assert ctx.rejections == [], [r.reason for r in ctx.rejections]
    for asset, (free, locked) in balances(ctx).items():
        assert free >= 0, asset
        assert locked >= 0, asset
    # Client order ids derive from deterministic intent ids "<instance>:<seq>", seq counting from 1 (an
    # amendment's replacement is named after the order it replaces: "<intent id>~a<n>").
    asked = [i.intent_id for i in submits if "~" not in i.intent_id]
    assert asked[:3] == [f"{name}:1", f"{name}:2", f"{name}:3"]


@pytest.mark.parametrize(("name", "params"), BUILTINS)
def test_snapshot_restore_mid_run_continues_identically(name: str, params: dict[str, Any]) -> None:
    bars = BARS[:2000]
    reference = run(name, params, bars)

    ctx = make_ctx(name)
    first = build_strategy(name, params, ctx)
    ctx.attach(first)
    run_bars(ctx, bars[:1234], stop=False)
    saved = json.loads(json.dumps(first.snapshot_state()))  # must survive JSON
    # The process restarts: a new instance, restored, on the same venue/OMS state.
    second = build_strategy(name, params, ctx)
    second.restore_state(saved)
    ctx.attach(second)
    run_bars(ctx, bars[1234:], start=False)

    assert ctx.orders == reference.orders
    assert ctx.fills == reference.fills


def test_restore_matters_a_fresh_instance_diverges() -> None:
    params = {"symbol": SYMBOL, "fast": 5, "slow": 20}
    bars = BARS[:1500]
    reference = run("momentum", params, bars)
    ctx = make_ctx("momentum")
    ctx.attach(build_strategy("momentum", params, ctx))
    run_bars(ctx, bars[:700], stop=False)
    ctx.attach(build_strategy("momentum", params, ctx))  # no restore: indicators start over
    run_bars(ctx, bars[700:], start=False)
    assert ctx.orders != reference.orders


def test_market_maker_quotes_post_only_two_sided_and_respects_max_inventory() -> None:
    params = {"symbol": SYMBOL, "quantity": "0.01", "max_inventory": "0.03"}
    ctx = run("market_making", params, BARS[:1500])
    quotes = intents(ctx)
    assert all(i.post_only and i.type is OrderType.LIMIT for i in quotes)
    assert {i.side for i in quotes} == {Side.BUY, Side.SELL}
    position = D(0)
    for fill in ctx.fills:
        position += fill.quantity * fill.side.sign
        assert abs(position) <= D("0.03")
    assert any(o.status is OrderStatus.CANCELLED for o in ctx.orders.values())  # cancel/replace on moves
    assert ctx.open_orders() == []  # on_stop cancels the quotes


def test_momentum_stop_is_a_stop_order_below_the_entry() -> None:
    ctx = run("momentum", {"symbol": SYMBOL, "stop": "atr"}, BARS[:1500])
    stops = [i for i in intents(ctx) if i.type is OrderType.STOP_MARKET]
    assert stops
    assert all(s.side is Side.SELL and s.trigger_price is not None for s in stops)  # long-only: stops sell


def test_long_only_builtins_on_a_mostly_quote_account() -> None:
    # Spot fees are charged in the asset received, so a bought 0.01 BTC holds 0.00999: the small BTC
    # balance covers the fees of exits sized by position (the OMS clamps reduce-only exits later).
    for name in ("momentum", "mean_reversion", "grid"):
        ctx = make_ctx(name, balances={"USDT": D(50_000), "BTC": D("0.002")})
        run(name, {"symbol": SYMBOL}, BARS[:2000], ctx)
        assert ctx.rejections == []
        assert all(free >= 0 and locked >= 0 for free, locked in balances(ctx).values())


# --- registry and parameters ----------------------------------------------------------------------


def test_registry_lists_the_builtins() -> None:
    assert {"momentum", "mean_reversion", "market_making", "grid"} <= set(list_strategies())
    assert get_strategy("momentum").name == "momentum"
    with pytest.raises(ConfigurationError, match="unknown strategy 'nope'") as err:
        get_strategy("nope")
    assert err.value.field == "strategy"


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("momentum", {"fast": 30, "slow": 10}, None),
        ("momentum", {"fast": "x"}, "fast"),
        ("momentum", {"quantity": "-1"}, "quantity"),
        ("momentum", {"stop": "sometimes"}, "stop"),
        ("momentum", {"colour": "red"}, "colour"),
        ("mean_reversion", {"entry_z": 1.0, "exit_z": 1.5}, None),
        ("market_making", {"quantity": "1", "max_inventory": "0.5"}, None),
        ("grid", {"lower_bound": "50000", "upper_bound": "40000"}, None),
        ("grid", {"levels": 0}, "levels"),
    ],
)
def test_bad_parameters_raise_configuration_error_naming_them(
    name: str, params: dict[str, Any], field: str | None
) -> None:
    ctx = make_ctx()
    with pytest.raises(ConfigurationError) as err:
        build_strategy(name, params, ctx)
    assert err.value.field == field
    if field:
        assert field in str(err.value)
    else:  # a cross-field rule: the message says which
        assert "must" in str(err.value)


def test_param_space_describes_numeric_parameters() -> None:
    space = param_space("momentum")
    assert space["fast"].kind == "int"
    assert space["fast"].ge == 2
    assert space["fast"].default == 12
    assert space["atr_multiple"].kind == "float"
    assert space["stop_pct"].kind == "decimal"
    assert space["stop_pct"].gt == 0
    assert "symbol" not in space
    assert "allow_short" not in space
    assert set(param_space("grid")) >= {"quantity", "levels", "step_pct"}


# --- the context contract, with a scripted strategy --------------------------------------------------


class ScriptParams(StrategyParams):
    symbol: str = SYMBOL


@register_strategy
class Script(Strategy[ScriptParams]):
    """Runs ``script[bar_index](ctx)`` on each bar and records every callback."""

    name: ClassVar[str] = "test_script"
    Params: ClassVar[type[StrategyParams]] = ScriptParams
    script: ClassVar[dict[int, Any]] = {}

    def __init__(self, params: ScriptParams, ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        self.events: list[tuple[str, Any]] = []
        self.bar_index = -1
        self.depth = 0

    def _enter(self, kind: str, item: Any) -> None:
        assert self.depth == 0, "callback re-entered"
        self.events.append((kind, item))

    def on_bar(self, bar: Bar) -> None:
        self._enter("bar", bar)
        self.bar_index += 1
        action = self.script.get(self.bar_index)
        if action is not None:
            self.depth += 1
            try:
                action(self.ctx, self)
            finally:
                self.depth -= 1

    def on_order(self, order: Order) -> None:
        self._enter("order", order)

    def on_fill(self, fill: Fill) -> None:
        self._enter("fill", fill)

    def on_timer(self, name: str, ts: datetime) -> None:
        self._enter("timer", (name, ts))


def run_script(script: dict[int, Any], bars: list[Bar] | None = None) -> tuple[BacktestContext, Script]:
    Script.script = script
    ctx = make_ctx("t")
    strategy = build_strategy("test_script", {}, ctx)
    assert isinstance(strategy, Script)
    ctx.attach(strategy)
    run_bars(ctx, bars or BARS[:60], stop=False)
    return ctx, strategy


def orders_of(strategy: Script, coid: str) -> list[Order]:
    return [o for kind, o in strategy.events if kind == "order" and o.client_order_id == coid]


def children_of(ctx: BacktestContext, coid: str) -> list[Order]:
    """The orders the local order emulation sent for ``coid`` (an order list's leg it held), in order."""
    return [o for c, o in ctx.orders.items() if (ctx.store.order_row(c) or {}).get("parent_client_order_id") == coid]


def venue_status(ctx: BacktestContext, coid: str) -> OrderStatus:
    """What became of an order at the venue: its own status, or — for a leg the local order emulation held
    and sent as a child order — its last child's."""
    children = children_of(ctx, coid)
    return (children[-1] if children else ctx.orders[coid]).status


def test_market_order_fill_updates_position_and_arrives_after_the_callback() -> None:
    ids: dict[str, str] = {}

    def buy(ctx: StrategyContext, s: Script) -> None:
        ids["a"] = ctx.buy(SYMBOL, D("0.01"))
        assert ctx.position(SYMBOL).quantity == 0  # not yet delivered: no re-entrancy

    ctx, s = run_script({0: buy})
    statuses = [o.status for o in orders_of(s, ids["a"])]
    assert statuses[-1] is OrderStatus.FILLED
    assert ctx.position(SYMBOL).quantity == D("0.01")
    assert ids["a"] == next(iter(ctx.orders))
    assert ctx.orders[ids["a"]].intent.intent_id == "t:1"


def test_advanced_order_types_pass_through() -> None:
    ids: dict[str, str] = {}

    def place(ctx: StrategyContext, s: Script) -> None:
        last = BARS[0].close
        ids["iceberg"] = ctx.buy(SYMBOL, D("0.05"), price=last * D("0.98"), display_quantity=D("0.01"))
        ids["gtd"] = ctx.buy(
            SYMBOL,
            D("0.01"),
            price=last * D("0.97"),
            time_in_force=TimeInForce.GTD,
            expire_at=ctx.now() + timedelta(minutes=5),
        )
        ids["trail"] = ctx.sell(SYMBOL, D("0.01"), type=OrderType.TRAILING_STOP, trailing_offset_pct=D("0.5"))
        ids["stop_limit"] = ctx.sell(
            SYMBOL, D("0.01"), type=OrderType.STOP_LIMIT, trigger_price=last * D("0.9"), price=last * D("0.89")
        )
        ids["post"] = ctx.sell(SYMBOL, D("0.01"), price=last * D("1.05"), post_only=True)

    ctx, s = run_script({0: place}, BARS[:20])
    assert ctx.rejections == []
    assert orders_of(s, ids["gtd"])[-1].status is OrderStatus.EXPIRED
    open_ids = {o.client_order_id for o in ctx.open_orders(SYMBOL)}
    assert {ids["iceberg"], ids["stop_limit"], ids["post"]} <= open_ids


def test_invalid_intent_is_refused_before_the_venue_and_venue_rejection_is_reported() -> None:
    ids: dict[str, str] = {}

    def bad(ctx: StrategyContext, s: Script) -> None:
        ids["no_price"] = ctx.buy(SYMBOL, D("0.01"), type=OrderType.LIMIT)  # a limit without a price
        ids["zero"] = ctx.buy(SYMBOL, D("0.0001"))  # rounds to zero quantity
        ids["big"] = ctx.buy(SYMBOL, D("100"))  # more than the account can pay
        ids["taker"] = ctx.buy(SYMBOL, D("0.01"), price=BARS[0].close * 2, post_only=True)  # would take

    ctx, s = run_script({0: bad}, BARS[:3])
    # A backtest refuses an impossible order at once (rejected INVALID_INTENT, never sent) and carries on.
    assert {i.client_order_id for i in ctx.invalid_intents} == {ids["no_price"], ids["zero"]}
    assert ctx.engine.open_orders(ctx.account) == []
    assert {o.client_order_id for o in ctx.rejections} == {ids["no_price"], ids["zero"], ids["big"], ids["taker"]}
    assert orders_of(s, ids["big"])[-1].status is OrderStatus.REJECTED


def test_cancel_amend_and_cancel_all() -> None:
    ids: dict[str, str] = {}

    def place(ctx: StrategyContext, s: Script) -> None:
        last = BARS[0].close
        ids["a"] = ctx.buy(SYMBOL, D("0.02"), price=last * D("0.95"))
        ids["b"] = ctx.buy(SYMBOL, D("0.02"), price=last * D("0.94"))
        ids["c"] = ctx.buy(SYMBOL, D("0.02"), price=last * D("0.93"))

    def amend(ctx: StrategyContext, s: Script) -> None:
        ids["a2"] = ctx.amend(ids["a"], price=BARS[0].close * D("0.96"))
        ids["b2"] = ctx.amend(ids["b"], quantity=D("0.01"))
        ctx.cancel(ids["c"])

    def cancel_all(ctx: StrategyContext, s: Script) -> None:
        ctx.cancel_all(SYMBOL)

    ctx, s = run_script({0: place, 1: amend}, BARS[:3])
    assert ids["a2"] != ids["a"]  # cancel-replace: a new deterministic id
    assert ids["b2"] == ids["b"]  # quantity down: amended in place
    open_orders = {o.client_order_id: o for o in ctx.open_orders()}
    assert set(open_orders) == {ids["a2"], ids["b"]}
    assert open_orders[ids["b"]].quantity == D("0.01")
    assert open_orders[ids["a2"]].price == (BARS[0].close * D("0.96")).quantize(D("0.1"), rounding="ROUND_FLOOR")
    assert orders_of(s, ids["a"])[-1].status is OrderStatus.CANCELLED
    ctx2, _ = run_script({0: place, 1: cancel_all}, BARS[:3])
    assert ctx2.open_orders() == []


def test_bracket_submits_exits_after_entry_then_oco_cancels_sibling() -> None:
    result: dict[str, Any] = {}

    def bracket(ctx: StrategyContext, s: Script) -> None:
        last = BARS[0].close
        result["list"] = ctx.bracket(
            SYMBOL,
            Side.BUY,
            D("0.01"),
            entry_price=last * D("0.999"),
            take_profit_price=last * D("1.002"),
            stop_price=last * D("0.9"),
        )
        entry = result["list"].client_order_ids[0]
        result["held"] = len([o for o in ctx.open_orders() if o.client_order_id != entry])

    ctx, s = run_script({0: bracket}, BARS[:400])
    entry, tp, sl = result["list"].client_order_ids
    assert result["held"] == 2  # the exits are visible at once …
    # … and held (by the local order emulation) until the entry fills: neither reaches the venue before it.
    events = [(o.client_order_id, o.status) for kind, o in s.events if kind == "order"]
    sent_exits = {o.client_order_id for o in children_of(ctx, tp) + children_of(ctx, sl)}
    first_exit_sent = min(i for i, (coid, _) in enumerate(events) if coid in sent_exits)
    assert first_exit_sent > events.index((entry, OrderStatus.FILLED))
    assert venue_status(ctx, entry) is OrderStatus.FILLED
    assert venue_status(ctx, tp) is OrderStatus.FILLED  # +0.2 % was reached in 400 minutes
    # the stop: cancelled by its OCO sibling's fill before it was ever sent
    assert children_of(ctx, sl) == []
    assert ctx.emulator.orders() == []
    assert ctx.position(SYMBOL).quantity == 0


def test_list_legs_held_by_the_local_emulation_show_their_real_state() -> None:
    """The legs of an order list that the local order emulation holds never reach the venue under their own
    ids (their child orders do): the strategy sees them ``new`` while held, then how they ended — not
    ``pending_submit`` and open for ever."""
    lists: list[Any] = []

    def bracket(ctx: StrategyContext, s: Script) -> None:
        last = BARS[0].close
        lists.append(
            ctx.bracket(
                SYMBOL,
                Side.BUY,
                D("0.01"),
                entry_price=last * D("0.999"),
                take_profit_price=last * D("1.002"),
                stop_price=last * D("0.9"),
            )
        )

    held, _ = run_script({0: bracket}, BARS[:2])  # the entry rests; the exits wait for it
    entry, tp, sl = lists[-1].client_order_ids
    assert held.orders[entry].status is OrderStatus.OPEN
    assert (held.orders[tp].status, held.orders[sl].status) == (OrderStatus.NEW, OrderStatus.NEW)

    done, s = run_script({0: bracket}, BARS[:400])
    entry, tp, sl = lists[-1].client_order_ids
    assert (done.orders[tp].status, done.orders[sl].status) == (OrderStatus.FILLED, OrderStatus.CANCELLED)
    assert done.orders[tp].filled_quantity == D("0.01")
    assert done.open_orders() == []
    assert orders_of(s, sl)[-1].status is OrderStatus.CANCELLED  # the strategy heard how its stop ended

    oco: list[Any] = []

    def start(ctx: StrategyContext, s: Script) -> None:
        ctx.buy(SYMBOL, D("0.01"))

    def exits(ctx: StrategyContext, s: Script) -> None:
        last = BARS[1].close
        oco.append(
            ctx.oco(SYMBOL, Side.SELL, D("0.01"), take_profit_price=last * D("1.5"), stop_price=last * D("0.999"))
        )

    ctx, _ = run_script({0: start, 1: exits}, BARS[:120])
    tp, sl = oco[-1].client_order_ids
    assert (ctx.orders[tp].status, ctx.orders[sl].status) == (OrderStatus.CANCELLED, OrderStatus.FILLED)
    assert ctx.open_orders() == []


def test_oco_and_timers() -> None:
    result: dict[str, Any] = {}

    def start(ctx: StrategyContext, s: Script) -> None:
        ctx.buy(SYMBOL, D("0.01"))
        ctx.set_timer("every5", every=timedelta(minutes=5))
        ctx.set_timer("once", at=ctx.now() + timedelta(minutes=3))

    def oco(ctx: StrategyContext, s: Script) -> None:
        last = BARS[1].close
        result["list"] = ctx.oco(
            SYMBOL, Side.SELL, D("0.01"), take_profit_price=last * D("1.5"), stop_price=last * D("0.999")
        )

    ctx, s = run_script({0: start, 1: oco}, BARS[:120])
    tp, sl = result["list"].client_order_ids
    assert venue_status(ctx, sl) is OrderStatus.FILLED
    assert venue_status(ctx, tp) is OrderStatus.CANCELLED
    timers = [item for kind, item in s.events if kind == "timer"]
    assert [name for name, _ in timers].count("once") == 1
    every = [ts for name, ts in timers if name == "every5"]
    assert len(every) >= 20
    assert all(b - a == timedelta(minutes=5) for a, b in itertools.pairwise(every))


def test_default_state_is_ctx_state_and_survives_json() -> None:
    def remember(ctx: StrategyContext, s: Script) -> None:
        ctx.state["last"] = str(BARS[0].close)

    ctx, s = run_script({0: remember}, BARS[:2])
    snap = json.loads(json.dumps(s.snapshot_state()))
    ctx.state.clear()
    s.restore_state(snap)
    assert ctx.state == {"last": str(BARS[0].close)}
    assert ctx.log.name.endswith(".t")
    assert ctx.exchange == "paper"
    assert ctx.account == "paper"
    assert isinstance(ctx, StrategyContext)


def test_plain_market_buy_and_sell_ask_for_what_submit_asks_for() -> None:
    """``ctx.buy(symbol, qty)`` / ``ctx.sell(symbol, qty)`` build their intent from its few values
    (``OrderIntent.plain_market``): the intent ``ctx.submit(...)`` builds for the same order, fields set
    included; quantities rounded as ever (one that rounds to nothing is refused as before)."""
    by_side = make_ctx("a"), make_ctx("a")
    fast, slow = by_side
    for ctx in by_side:
        ctx.attach(build_strategy("momentum", {"symbol": SYMBOL}, ctx))
        ctx.clock.now = BARS[1].ts
    fast_ids = [fast.buy(SYMBOL, D("0.0123456")), fast.sell(SYMBOL, D("0.5")), fast.buy(SYMBOL, D("0.0001"))]
    slow_ids = [
        slow.submit(symbol=SYMBOL, side=Side.BUY, type=OrderType.MARKET, quantity=D("0.0123456")),
        slow.submit(symbol=SYMBOL, side=Side.SELL, type=OrderType.MARKET, quantity=D("0.5")),
        slow.submit(symbol=SYMBOL, side=Side.BUY, type=OrderType.MARKET, quantity=D("0.0001")),
    ]
    assert fast_ids == slow_ids
    got, want = intents(fast), intents(slow)
    assert got == want and [i.model_fields_set for i in got] == [i.model_fields_set for i in want]
    assert [o.model_dump() for o in fast.orders.values()] == [o.model_dump() for o in slow.orders.values()]
    assert [i.client_order_id for i in fast.invalid_intents] == [fast_ids[2]]
    assert fast.invalid_intents == slow.invalid_intents
