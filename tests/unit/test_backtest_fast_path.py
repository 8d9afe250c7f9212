"""The backtest's in-process venue path gives what the full OMS path gives, on real bars.

``run_backtest`` sends a plain market order straight to the matching engine when nothing else can take part
(``BacktestContext.submit_direct``) and everything else through the OMS. Both runs below use the same
real BTC 1-minute bars (the shipped month, sliced); ``fast_path=False`` forces every order through the
OMS. The strategies cover market-only trading, market entries with resting stops (the path switches
order by order), limits, slippage, latency, a volume cap (path off), refused orders (cash too small), and
the strategy's own view (every callback it received, in order, with the order snapshots).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meltica.backtest import BacktestConfig, BarSeries, run_backtest
from meltica.backtest.context import BacktestContext
from meltica.backtest.metrics import compute_metrics
from meltica.backtest.results import BacktestResult, EquityCurve
from meltica.domain import Bar, Fill, FloatBar, Order, OrderType, Side
from meltica.marketdata.series import EpochTimes, FloatColumn, float_values
from meltica.strategies import Strategy, StrategyParams
from meltica.strategies.indicators import EMA

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
SYMBOL = "BTC/USDT"
BARS = 4000


class CrossParams(StrategyParams):
    symbol: str = SYMBOL
    quantity: Decimal = Decimal("0.5")
    fast: int = 5
    slow: int = 20


class Cross(Strategy[CrossParams]):
    """EMA cross with market orders only (the bench workload's shape); records everything it is told."""

    name: ClassVar[str] = "fast_path_cross"
    Params: ClassVar[type[CrossParams]] = CrossParams
    log: ClassVar[list[Any]] = []

    def __init__(self, params: CrossParams, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.fast = EMA(params.fast)
        self.slow = EMA(params.slow)

    def on_order(self, order: Order) -> None:
        self.log.append(("order", order.model_dump()))

    def on_fill(self, fill: Fill) -> None:
        self.log.append(("fill", fill.model_dump(), self.ctx.position(self.params.symbol).quantity))

    def on_bar(self, bar: Bar) -> None:
        close = float(bar.close)
        fast, slow = self.fast.update(close), self.slow.update(close)
        if not self.slow.ready:
            return
        position = self.ctx.position(self.params.symbol).quantity
        if position <= 0 and fast > slow:
            self.ctx.buy(self.params.symbol, self.params.quantity - position)
        elif position >= 0 and fast < slow:
            self.ctx.sell(self.params.symbol, self.params.quantity + position)


class QuietCross(Cross):
    """``Cross`` without callbacks of its own (``Strategy``'s ``on_order`` / ``on_fill``): what nobody
    listens to may be skipped, what the run keeps must not change."""

    name: ClassVar[str] = "fast_path_quiet_cross"
    on_order = Strategy.on_order
    on_fill = Strategy.on_fill


class PeekingQuietCross(QuietCross):
    """``QuietCross`` that reads its orders now and then (``ctx.orders``, ``ctx.open_orders``): the direct
    path's snapshots it leaves unbuilt are built when read, and read as the OMS path's."""

    name: ClassVar[str] = "fast_path_peeking_quiet_cross"

    def on_bar(self, bar: Bar) -> None:
        super().on_bar(bar)
        orders = getattr(self.ctx, "orders", {})
        if len(orders) % 7 == 3:
            self.log.append([o.model_dump() for o in orders.values()])
            self.log.append([o.model_dump() for o in self.ctx.open_orders()])


@pytest.fixture(scope="module")
def series() -> BarSeries:
    month = BarSeries.from_file(DATA, exchange="binance", symbol=SYMBOL, timeframe="1m")
    return BarSeries.from_bars(month.bars()[:BARS])


def run(series: BarSeries, config: dict[str, Any], strategy: type[Strategy[Any]] | None, *, fast: bool) -> Any:
    Cross.log = []
    result = run_backtest(BacktestConfig.model_validate(config), series, strategy=strategy, fast_path=fast)
    return result, list(Cross.log)


def comparable(result: BacktestResult) -> dict[str, Any]:
    return {
        "fills": [f.model_dump() for f in result.fills],
        "orders": [o.__dict__ for o in result.orders],
        "equity": [(p.ts, p.equity, p.cash, p.position_value) for p in result.equity],
        "fill_phases": result.fill_phases,
        "invalid": result.invalid_orders,
        "metrics": result.metrics,
    }


@pytest.fixture
def direct_orders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Client order ids that took the in-process path."""
    taken: list[str] = []
    original = BacktestContext.submit_direct

    def counting(self: BacktestContext, intent: Any) -> bool:
        done = original(self, intent)
        if done:
            taken.append(intent.client_order_id)
        return done

    monkeypatch.setattr(BacktestContext, "submit_direct", counting)
    return taken


CASES: dict[str, tuple[dict[str, Any], type[Strategy[Any]] | None, str]] = {
    # name: (config, strategy class, which orders take the direct path: all | some | none)
    "market-only": ({"strategy": Cross.name, "taker_fee_bps": Decimal(10)}, Cross, "all"),
    "market-only-no-callbacks": ({"strategy": QuietCross.name, "taker_fee_bps": Decimal(10)}, QuietCross, "all"),
    "market-only-no-callbacks-peeking": (
        {"strategy": PeekingQuietCross.name, "taker_fee_bps": Decimal(10)},
        PeekingQuietCross,
        "all",
    ),
    "market-with-latency-no-callbacks": ({"strategy": QuietCross.name, "latency_ms": 30_000}, QuietCross, "some"),
    "market-only-short-and-slippage": (
        {"strategy": Cross.name, "taker_fee_bps": Decimal(4), "slippage_bps": Decimal(2)},
        Cross,
        "all",
    ),
    # decisions overlap while an order is on its way: some sells exceed the holding and are refused
    "market-with-latency": ({"strategy": Cross.name, "latency_ms": 30_000}, Cross, "some"),
    "cash-too-small": (  # long 0.5 BTC, then sells of 1 BTC (to go short) are refused: the OMS reports them
        {"strategy": Cross.name, "initial_balances": {"USDT": Decimal(30_000)}},
        Cross,
        "some",
    ),
    "cash-too-small-no-callbacks": (  # refused on the engine's straight line (_quick_taker): the OMS reports
        {"strategy": QuietCross.name, "initial_balances": {"USDT": Decimal(30_000)}},
        QuietCross,
        "some",
    ),
    "market-only-no-callbacks-fees-in-received-asset-and-slippage": (
        {
            "strategy": QuietCross.name,
            "taker_fee_bps": Decimal(7),
            "maker_fee_bps": Decimal(-1),
            "fee_asset": "received",
            "slippage_bps": Decimal(3),
        },
        QuietCross,
        "all",
    ),
    "volume-cap": ({"strategy": Cross.name, "bar_volume_share": Decimal("0.1")}, Cross, "none"),
    "volume-cap-no-callbacks": ({"strategy": QuietCross.name, "bar_volume_share": Decimal("0.1")}, QuietCross, "none"),
    "beyond-the-book": (  # 6M BTC against the synthetic book's 5 x 1M: a partial fill, the rest expires
        {
            "strategy": Cross.name,
            "params": {"quantity": "6000000"},
            "initial_balances": {"USDT": Decimal(10) ** 12},
        },
        Cross,
        "none",
    ),
    "momentum-atr-stops": (
        {"strategy": "momentum", "params": {"fast": 5, "slow": 20, "quantity": "0.1"}, "slippage_bps": 1},
        None,
        "some",
    ),
    "momentum-no-stop-short": (
        {"strategy": "momentum", "params": {"fast": 8, "slow": 30, "stop": "none", "allow_short": True}},
        None,
        "all",
    ),
    "mean-reversion": ({"strategy": "mean_reversion", "params": {}}, None, "any"),
    "grid": ({"strategy": "grid", "params": {}}, None, "any"),
    "market-making": ({"strategy": "market_making", "params": {}}, None, "any"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_path_gives_the_oms_path_result(series: BarSeries, direct_orders: list[str], case: str) -> None:
    extra, strategy, expected_use = CASES[case]
    config = {"symbol": SYMBOL, "initial_balances": {"USDT": Decimal(100_000), "BTC": Decimal(1)}, **extra}
    slow, slow_log = run(series, config, strategy, fast=False)
    assert direct_orders == []
    fast, fast_log = run(series, config, strategy, fast=True)
    assert comparable(fast) == comparable(slow)
    assert fast_log == slow_log
    sent = [o for o in fast.orders if o.status != "open_at_end"]
    if expected_use == "all":
        assert sent and len(direct_orders) == len(fast.orders)
    elif expected_use == "some":
        assert 0 < len(direct_orders) < len(fast.orders)
    elif expected_use == "none":
        assert fast.orders and direct_orders == []
    if case in ("cash-too-small", "cash-too-small-no-callbacks"):
        assert sum(fast.rejections.values()) > 20  # the refusals are reported, as by the OMS path
    elif case == "beyond-the-book":  # the first buy filled in part (five levels), its remainder expired
        first = fast.orders[0]
        assert first.status not in ("filled", "open_at_end") and 0 < first.filled_quantity < first.quantity
        assert len([f for f in fast.fills if f.client_order_id == first.client_order_id]) == 5
    elif strategy in (Cross, QuietCross, PeekingQuietCross):
        assert len(fast.fills) > 20  # the case trades: the comparison is not vacuous
    if strategy is PeekingQuietCross:
        assert len(fast_log) > 20  # it did read its orders mid-run


def test_the_columnar_equity_curve_reads_as_the_points_it_stands_for(series: BarSeries) -> None:
    """A bar run's curve is kept as columns (``EquityCurve``); read as points it is the bar loop's marks,
    and its metrics are those of the same points passed as pairs."""
    config = {"symbol": SYMBOL, "strategy": Cross.name, "initial_balances": {"USDT": Decimal(100_000)}}
    arrays = {
        "ts": [int(t.timestamp()) * 1_000_000_000 for t in series.ts],
        **{k: [float(x) for x in getattr(series, k)] for k in ("open", "high", "low", "close", "volume")},
    }
    result, _ = run(series, config, Cross, fast=True)
    from_arrays, _ = run(
        BarSeries.from_arrays(arrays, exchange="binance", symbol=SYMBOL, timeframe="1m"), config, Cross, fast=True
    )
    for r in (result, from_arrays):
        curve = r.equity
        points = list(curve)
        assert isinstance(curve, EquityCurve) and len(points) == len(series) == BARS
        # every point: the bar's close time, cash + holding x close, from the fills so far
        cash, held, fills = Decimal(100_000), Decimal(0), list(r.fills)
        for i, point in enumerate(points):
            close_time = series.ts[i] + timedelta(minutes=1)
            while fills and fills[0].ts < close_time:
                f = fills.pop(0)
                held += f.quantity * f.side.sign
                cash -= f.quantity * f.price * f.side.sign + f.fee
            assert point.ts == close_time
            assert (point.cash, point.position_value) == (cash, held * series.close[i])
            assert point.equity == point.cash + point.position_value
        assert curve == tuple(points) and tuple(points) == curve and curve != points[:-1]
        assert curve[-1] == points[-1] and curve[-BARS] == points[0] and curve[10:13] == tuple(points[10:13])
        with pytest.raises(IndexError):
            curve[BARS]
        pairs = compute_metrics([(p.ts, p.equity) for p in points], r.round_trips, r.fills)
        assert r.metrics == pairs
    assert from_arrays.metrics == result.metrics


def test_bar_times_from_arrays_stay_integers_and_read_as_datetimes() -> None:
    """``BarSeries.from_arrays`` keeps integer times (``EpochTimes``); read, sliced or iterated (across
    its chunks) they are the datetimes the file gives."""
    month = BarSeries.from_file(DATA, exchange="binance", symbol=SYMBOL, timeframe="1m")
    times = list(month.ts) * 2
    shift = times[-1] - times[0] + timedelta(minutes=1)
    times[len(month) :] = [t + shift for t in times[len(month) :]]  # two months back to back: 90,062 bars
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    arrays = {
        "ts": [(t - epoch) // timedelta(microseconds=1) * 1000 for t in times],
        **{k: [float(x) for x in getattr(month, k)] * 2 for k in ("open", "high", "low", "close", "volume")},
    }
    series = BarSeries.from_arrays(arrays, exchange="binance", symbol=SYMBOL, timeframe="1m")
    assert isinstance(series.ts, EpochTimes) and len(series.ts) == len(times) > 65_536
    assert list(series.ts) == times and series.ts == times and times == series.ts
    assert series.ts[0] == times[0] and series.ts[-1] == times[-1] and series.ts[70_000] == times[70_000]
    assert series.ts[65_530:65_540] == times[65_530:65_540]
    assert series.ts != times[:-1] and series.ts != [*times[:-1], times[-1] + timedelta(minutes=1)]
    assert series.validate() is series


# --- Strategy.bar_prices = "float": a FloatBar per bar, everything else as with Decimal bars --------------


class FloatCross(Cross):
    """``Cross`` declaring that it reads floats: it gets a ``FloatBar`` (and checks it does)."""

    name: ClassVar[str] = Cross.name  # (the twin's name: the same instance and order ids)
    bar_prices = "float"
    seen: ClassVar[set[type]] = set()

    def on_bar(self, bar: Any) -> None:
        FloatCross.seen.add(type(bar))
        assert isinstance(bar.close, float) and isinstance(bar.volume, float) and bar.ts.tzinfo is UTC
        super().on_bar(bar)


class QuietFloatCross(FloatCross):
    name: ClassVar[str] = QuietCross.name
    on_order = Strategy.on_order
    on_fill = Strategy.on_fill


class StopCross(Cross):
    """``Cross`` (long only) that also keeps a resting stop under a long position: the bar's path runs."""

    name: ClassVar[str] = "fast_path_stop_cross"

    def on_bar(self, bar: Any) -> None:
        super().on_bar(bar)
        ctx, symbol = self.ctx, self.params.symbol
        if ctx.position(symbol).quantity > 0 and not ctx.open_orders(symbol):
            trigger = ctx.instrument(symbol).round_price(Decimal(repr(float(bar.close) * 0.998)), Side.SELL)
            ctx.sell(symbol, ctx.position(symbol).quantity, type=OrderType.STOP_MARKET, trigger_price=trigger)


class FloatStopCross(StopCross):
    name: ClassVar[str] = StopCross.name
    bar_prices = "float"

    def on_bar(self, bar: Any) -> None:
        assert isinstance(bar, FloatBar)
        super().on_bar(bar)


FLOAT_CASES: dict[str, tuple[dict[str, Any], type[Strategy[Any]], type[Strategy[Any]]]] = {
    # name: (config, the Decimal-bar strategy, its float-bar twin)
    "market-fees": ({"taker_fee_bps": Decimal(10)}, Cross, FloatCross),
    "market-no-callbacks": ({"taker_fee_bps": Decimal(10)}, QuietCross, QuietFloatCross),
    "latency": ({"latency_ms": 30_000}, Cross, FloatCross),
    "cash-too-small": ({"initial_balances": {"USDT": Decimal(30_000)}}, Cross, FloatCross),
    "volume-cap-slippage": ({"bar_volume_share": Decimal("0.1"), "slippage_bps": Decimal(2)}, Cross, FloatCross),
    "risk-limits": ({"risk": {"max_order_notional": Decimal(25_000)}}, Cross, FloatCross),
    "resting-stops": ({"taker_fee_bps": Decimal(4)}, StopCross, FloatStopCross),
}


@pytest.mark.parametrize("arrays", [False, True], ids=["decimal-columns", "float-columns"])
@pytest.mark.parametrize("case", list(FLOAT_CASES))
def test_float_bars_give_what_decimal_bars_give(series: BarSeries, case: str, arrays: bool) -> None:
    """A strategy declaring ``bar_prices = "float"`` gets a ``FloatBar`` per bar and nothing else changes:
    the same orders, fills, equity, metrics and callbacks as its Decimal-bar twin — on the direct path and
    the OMS path, on Decimal columns (a file) and on float columns (arrays, ``FloatColumn``)."""
    extra, decimal_strategy, float_strategy = FLOAT_CASES[case]
    config = {"symbol": SYMBOL, "initial_balances": {"USDT": Decimal(100_000), "BTC": Decimal(1)}, **extra}
    data = series
    if arrays:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        data = BarSeries.from_arrays(
            {
                "ts": [(t - epoch) // timedelta(microseconds=1) * 1000 for t in series.ts],
                **{k: [float(x) for x in getattr(series, k)] for k in ("open", "high", "low", "close", "volume")},
            },
            exchange="binance",
            symbol=SYMBOL,
            timeframe="1m",
        )
        assert isinstance(data.close, FloatColumn)
    expected, expected_log = run(series, {**config, "strategy": decimal_strategy.name}, decimal_strategy, fast=False)
    FloatCross.seen = set()
    for fast in (True, False):
        result, log = run(data, {**config, "strategy": float_strategy.name}, float_strategy, fast=fast)
        assert result.strategy == expected.strategy
        assert comparable(result) == comparable(expected)
        assert log == expected_log
    assert len(expected.fills) > (0 if case in ("cash-too-small", "risk-limits") else 10)
    if issubclass(float_strategy, FloatCross):
        assert FloatCross.seen == {FloatBar}
    if case in ("cash-too-small", "risk-limits"):  # refused orders: by the venue, by the risk engine
        assert sum(expected.rejections.values()) > 20
    if case == "resting-stops":
        assert any(o.order_type == "stop_market" and o.status == "filled" for o in expected.orders)


def test_float_columns_read_as_the_decimals_of_their_reprs() -> None:
    """``FloatColumn``: read, sliced or iterated (across its chunks) it is ``Decimal(repr(x))`` of each
    value; ``floats()`` gives the floats themselves."""
    values = [float(i % 977) + 0.1 for i in range(70_000)]
    column = FloatColumn(np.array(values))
    decimals = [Decimal(repr(x)) for x in values]
    assert len(column) == 70_000 and list(column) == decimals and column == decimals and decimals == column
    assert column[0] == decimals[0] and column[-1] == decimals[-1] and column[65_540] == decimals[65_540]
    assert column[65_530:65_540] == decimals[65_530:65_540] and column != decimals[:-1]
    assert list(column.floats()) == values and list(float_values(decimals)) == values
    assert all(type(x) is float for x in column.floats()) and type(column[3]) is Decimal


_PRICES = (
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal(100_000), places=2, allow_nan=False),
    st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(100), places=8, allow_nan=False),
    st.floats(min_value=1e-9, max_value=1e7, allow_nan=False, allow_infinity=False).map(lambda x: Decimal(repr(x))),
)
"""Closes of a few places (the integer way), of many, any float's (mostly the ``Decimal`` way)."""
_AMOUNT = st.one_of(
    st.decimals(min_value=Decimal(-(10**6)), max_value=Decimal(10**6), places=2, allow_nan=False),
    st.decimals(min_value=Decimal(-(10**4)), max_value=Decimal(10**4), places=4, allow_nan=False),
    st.decimals(min_value=Decimal(-(10**9)), max_value=Decimal(10**9), places=12, allow_nan=False),
)
"""Cash and holdings of a few places, and of more than the integers hold."""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    closes=st.one_of(*(st.lists(price, min_size=1, max_size=60) for price in _PRICES)),
    changes=st.lists(st.tuples(st.integers(0, 59), _AMOUNT, _AMOUNT), max_size=8),
    first=st.tuples(_AMOUNT, _AMOUNT),
)
def test_the_equity_columns_of_float_closes_are_those_of_their_decimals(
    closes: list[Decimal], changes: list[tuple[int, Decimal, Decimal]], first: tuple[Decimal, Decimal]
) -> None:
    """``EquityCurve.columns`` on a float column (exact integer arithmetic when the closes have few places,
    ``FloatColumn.scaled_integers``) gives, digit for digit, what it gives on the closes' ``Decimal`` s:
    ``float(equity)`` per point, the first and last equity and their ``Decimal`` sum — whatever the places
    of the closes, the cash and the holdings (more than the integers hold: the ``Decimal`` way)."""
    floats = np.array([float(c) for c in closes])
    column = FloatColumn(floats)
    scaled = column.scaled_integers()
    if scaled is not None:
        places, ints = scaled
        assert [Decimal(int(i)).scaleb(-places) for i in ints] == list(column)
    marks = sorted({(i % len(closes), cash, held) for i, cash, held in changes}, key=lambda c: c[0])
    steps = [(0, *first), *[m for m in marks if m[0] > 0]]
    times = [datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=i) for i in range(len(closes))]
    on_floats = EquityCurve(times, timedelta(minutes=1), column, steps).columns()
    on_decimals = EquityCurve(times, timedelta(minutes=1), list(column), steps).columns()
    assert np.array_equal(on_floats[0], on_decimals[0]) and on_floats[1:] == on_decimals[1:]
    assert [float(p.equity) for p in EquityCurve(times, timedelta(minutes=1), column, steps)] == on_floats[0].tolist()


def test_a_float_column_of_few_places_reads_as_integers() -> None:
    """``FloatColumn.scaled_integers``: the fewest places that read every value exactly, else ``None``."""
    places, ints = FloatColumn(np.array([43210.5, 0.1, 7.0])).scaled_integers() or (None, None)
    assert places == 1 and ints is not None and ints.tolist() == [432105, 1, 70]
    assert FloatColumn(np.array([0.1 + 0.2])).scaled_integers() is None  # 0.30000000000000004: 17 places
    assert FloatColumn(np.array([1.5, float("nan")])).scaled_integers() is None
    assert FloatColumn(np.array([], dtype=np.float64)).scaled_integers() is None
