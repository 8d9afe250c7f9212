"""Backtest metrics: hand-computed values on a small curve, an independent pandas recomputation, edge cases."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meltica.backtest.metrics import (
    Metrics,
    RoundTrip,
    compute_metrics,
    infer_periods_per_year,
    round_trips_from_fills,
)
from meltica.domain import Fill, Side

T0 = datetime(2023, 1, 1, tzinfo=UTC)
STEP = timedelta(days=73)  # 365 / 73 = 5 periods per year
D = Decimal


def curve(values: list[str], step: timedelta = STEP, start: datetime = T0) -> list[tuple[datetime, Decimal]]:
    return [(start + i * step, D(v)) for i, v in enumerate(values)]


_fill_no = 0


def fill(
    side: str, qty: str, price: str, fee: str = "0", *, at: datetime, order: str | None = None, symbol: str = "BTC/USDT"
) -> Fill:
    global _fill_no
    _fill_no += 1
    return Fill(
        fill_id=f"t{_fill_no}",
        client_order_id=order or f"o{_fill_no}",
        exchange="binance",
        symbol=symbol,
        side=Side(side),
        price=D(price),
        quantity=D(qty),
        fee=D(fee),
        fee_currency="USDT",
        ts=at,
    )


def at(i: int) -> datetime:
    return T0 + i * STEP


# --- the known curve -------------------------------------------------------------------------
# Equity 100 → 120 → 90 → 108 → 135, one point every 73 days.
# Returns: +0.20, -0.25, +0.20, +0.25. mean = 0.40 / 4 = 0.10.
# Deviations from the mean: 0.10, -0.35, 0.10, 0.15; squares sum to 0.01 + 0.1225 + 0.01 + 0.0225 = 0.165,
# so the sample variance (ddof=1) is 0.165 / 3 = 0.055.
# Downside (target 0): only -0.25 → mean of squares 0.0625 / 4 = 0.015625 → downside deviation 0.125.
# Span 4 × 73 = 292 days = 0.8 years. Peak 120 (t1) → trough 90 (t2): drawdown 25 %; back above 120 at t4.
KNOWN = ["100", "120", "90", "108", "135"]
KNOWN_FILLS = [
    # trip 1: long 1 @100 → 110, fees 1 + 1: gross +10, net +8
    fill("buy", "1", "100", "1", at=at(0)),
    fill("sell", "1", "110", "1", at=at(1)),
    # trip 2: long 2 @50 → 45, fees 0.5 + 0.5: gross -10, net -11
    fill("buy", "2", "50", "0.5", at=at(2)),
    fill("sell", "2", "45", "0.5", at=at(3)),
]


@pytest.fixture(scope="module")
def known() -> Metrics:
    return compute_metrics(curve(KNOWN), round_trips_from_fills(KNOWN_FILLS), KNOWN_FILLS)


def test_known_curve_hand_computed(known: Metrics) -> None:
    assert known.periods == 5
    assert known.periods_per_year == pytest.approx(5.0)
    assert known.initial_equity == D("100")
    assert known.final_equity == D("135")
    assert known.total_return == pytest.approx(0.35)
    assert known.cagr == pytest.approx(1.35 ** (1 / 0.8) - 1)  # 0.45518…
    assert known.cagr == pytest.approx(0.455182, abs=1e-6)
    assert known.volatility == pytest.approx(math.sqrt(0.055) * math.sqrt(5))
    assert known.sharpe == pytest.approx(0.10 / math.sqrt(0.055) * math.sqrt(5))  # 0.95346…
    assert known.sharpe == pytest.approx(0.953463, abs=1e-6)
    assert known.sortino == pytest.approx(0.10 / 0.125 * math.sqrt(5))  # 1.78885…
    assert known.max_drawdown == pytest.approx(0.25)
    assert known.max_drawdown_duration == 3 * STEP  # t1 → t4
    assert known.max_drawdown_recovered
    assert known.calmar == pytest.approx((1.35**1.25 - 1) / 0.25)


def test_known_trades_hand_computed(known: Metrics) -> None:
    assert known.trades == 2
    assert known.open_trades == 0
    assert (known.winning_trades, known.losing_trades) == (1, 1)
    assert known.win_rate == 0.5
    assert known.gross_profit == D("8")
    assert known.gross_loss == D("11")
    assert known.profit_factor == pytest.approx(8 / 11)
    assert known.average_trade == D("-1.5")
    # In a position during [t0, t1) and [t2, t3): 2 of the 4 gaps.
    assert known.exposure == pytest.approx(0.5)
    # Traded notional 100 + 110 + 100 + 90 = 400; mean equity 553 / 5 = 110.6.
    assert known.turnover == pytest.approx(400 / 110.6)
    assert known.fees == D("3.0")


def test_known_curve_matches_pandas(known: Metrics) -> None:
    """An independent recomputation with pandas / numpy, following the documented definitions."""
    index = pd.DatetimeIndex([ts for ts, _ in curve(KNOWN)])
    equity = pd.Series([float(v) for v in KNOWN], index=index)
    returns = equity.pct_change().dropna()
    ppy = pd.Timedelta(days=365) / pd.Series(index).diff().dropna().median()
    sharpe = returns.mean() / returns.std(ddof=1) * np.sqrt(ppy)
    downside = np.sqrt((returns.clip(upper=0) ** 2).mean())
    sortino = returns.mean() / downside * np.sqrt(ppy)
    drawdown = equity / equity.cummax() - 1
    years = (index[-1] - index[0]) / pd.Timedelta(days=365)
    cagr = (equity.iloc[-1] / equity.iloc[0]) ** (1 / years) - 1
    assert known.periods_per_year == pytest.approx(ppy)
    assert known.total_return == pytest.approx(equity.iloc[-1] / equity.iloc[0] - 1)
    assert known.volatility == pytest.approx(returns.std(ddof=1) * np.sqrt(ppy))
    assert known.sharpe == pytest.approx(sharpe)
    assert known.sortino == pytest.approx(sortino)
    assert known.max_drawdown == pytest.approx(-drawdown.min())
    assert known.cagr == pytest.approx(cagr)
    assert known.calmar == pytest.approx(cagr / -drawdown.min())


def test_random_walk_matches_pandas() -> None:
    """Hourly random walk, 2000 points, with a risk-free rate: the same numbers as pandas."""
    rng = np.random.default_rng(7)
    values = 10_000 * np.cumprod(1 + rng.normal(0.0002, 0.01, 2000))
    points = [(T0 + timedelta(hours=i), D(str(round(v, 6)))) for i, v in enumerate(values)]
    m = compute_metrics(points, [], risk_free=0.05)
    equity = pd.Series([float(e) for _, e in points])
    returns = equity.pct_change().dropna()
    rf = 1.05 ** (1 / 8760) - 1
    excess = returns - rf
    assert m.periods_per_year == pytest.approx(8760)
    assert m.sharpe == pytest.approx(excess.mean() / returns.std(ddof=1) * np.sqrt(8760))
    assert m.sortino == pytest.approx(excess.mean() / np.sqrt((excess.clip(upper=0) ** 2).mean()) * np.sqrt(8760))
    dd = equity / equity.cummax() - 1
    assert m.max_drawdown == pytest.approx(-dd.min())
    # duration: from the last time at the peak before the trough to the first point back at the peak (or the end)
    trough = int(np.argmin(dd.to_numpy()))
    peak_value = equity[: trough + 1].max()
    peak = int(equity[: trough + 1][equity[: trough + 1] == peak_value].index[-1])
    recovered = equity[trough + 1 :][equity[trough + 1 :] >= peak_value]
    end = int(recovered.index[0]) if len(recovered) else len(equity) - 1
    assert m.max_drawdown_duration == timedelta(hours=end - peak)
    assert m.max_drawdown_recovered == bool(len(recovered))


# --- edge cases ------------------------------------------------------------------------------


def _assert_no_nan(m: Metrics) -> None:
    for name, value in m.as_dict().items():
        if isinstance(value, float):
            assert not math.isnan(value), name
        if isinstance(value, Decimal):
            assert value.is_finite(), name


@pytest.mark.parametrize("values", [[], ["100"]], ids=["empty", "single-point"])
def test_empty_and_single_point(values: list[str]) -> None:
    m = compute_metrics(curve(values), [], [])
    _assert_no_nan(m)
    assert m.periods == len(values)
    assert m.periods_per_year == 0.0
    assert m.total_return == m.cagr == m.volatility == m.sharpe == m.sortino == 0.0
    assert m.max_drawdown == 0.0
    assert m.max_drawdown_duration == timedelta(0)
    assert m.calmar == m.exposure == m.turnover == 0.0
    assert m.initial_equity == m.final_equity == (D(values[0]) if values else D(0))


def test_flat_curve_no_trades() -> None:
    m = compute_metrics(curve(["100"] * 10, step=timedelta(days=1)), [], [])
    _assert_no_nan(m)
    assert m.periods_per_year == pytest.approx(365)
    assert m.total_return == m.cagr == m.volatility == m.sharpe == m.sortino == 0.0
    assert (m.max_drawdown, m.max_drawdown_duration, m.calmar) == (0.0, timedelta(0), 0.0)
    assert (m.trades, m.win_rate, m.profit_factor, m.average_trade) == (0, 0.0, 0.0, D(0))
    assert (m.gross_profit, m.gross_loss, m.fees) == (D(0), D(0), D(0))


def test_only_gains_gives_documented_infinities() -> None:
    t = [fill("buy", "1", "100", at=at(0)), fill("sell", "1", "120", at=at(1))]
    m = compute_metrics(curve(["100", "200", "400"]), round_trips_from_fills(t), t)
    assert m.profit_factor == math.inf  # no losing trade
    assert m.sortino == math.inf  # no period below the target
    assert m.calmar == math.inf  # no drawdown
    assert m.sharpe == math.inf  # +100 % twice: zero deviation, positive mean
    assert m.volatility == 0.0


def test_only_losses_profit_factor_zero() -> None:
    t = [fill("buy", "1", "100", at=at(0)), fill("sell", "1", "90", at=at(1))]
    m = compute_metrics(curve(["100", "90"]), round_trips_from_fills(t), t)
    assert m.profit_factor == 0.0
    assert m.win_rate == 0.0
    assert m.average_trade == D("-10")


def test_unrecovered_drawdown_lasts_to_the_end() -> None:
    m = compute_metrics(curve(["100", "100", "130", "100", "110", "120"]), [], [])
    assert m.max_drawdown == pytest.approx(30 / 130)
    assert m.max_drawdown_duration == 3 * STEP  # from the peak at t2 to the last point t5
    assert not m.max_drawdown_recovered


def test_drawdown_peak_is_the_last_time_at_the_peak() -> None:
    # 120 is reached at t1 and again at t3 before the trough at t4.
    m = compute_metrics(curve(["100", "120", "110", "120", "60", "120"]), [], [])
    assert m.max_drawdown == pytest.approx(0.5)
    assert m.max_drawdown_duration == 2 * STEP  # t3 → t5


def test_wiped_out_account_has_no_nan() -> None:
    m = compute_metrics(curve(["100", "50", "0", "0", "-5"]), [], [])
    _assert_no_nan(m)
    assert m.total_return == pytest.approx(-1.05)
    assert m.cagr == -1.0
    assert m.max_drawdown == pytest.approx(1.05)


def test_huge_cagr_over_a_tiny_span_is_inf_not_an_error() -> None:
    m = compute_metrics(curve(["100", "1000"], step=timedelta(seconds=1)), [], [])
    assert m.cagr == math.inf
    assert m.calmar == math.inf


def test_periods_per_year_inferred_and_overridden() -> None:
    hourly = curve(["100", "101", "102", "101"], step=timedelta(hours=1))
    assert infer_periods_per_year([ts for ts, _ in hourly]) == pytest.approx(8760)
    assert infer_periods_per_year([T0 + timedelta(minutes=i) for i in range(5)]) == pytest.approx(525_600)
    inferred = compute_metrics(hourly, [])
    daily = compute_metrics(hourly, [], periods_per_year=365)
    assert daily.periods_per_year == 365
    assert inferred.sharpe == pytest.approx(daily.sharpe * math.sqrt(8760 / 365))


def test_open_trips_are_not_counted_as_trades() -> None:
    t = [fill("buy", "1", "100", "1", at=at(0))]
    trips = round_trips_from_fills(t)
    m = compute_metrics(curve(["100", "99", "98"]), trips, t)
    assert (m.trades, m.open_trades) == (0, 1)
    assert m.exposure == 1.0
    assert m.fees == D("1")


def test_exposure_counts_time_with_any_symbol_in_a_position() -> None:
    fills = [
        fill("buy", "1", "10", at=at(0), symbol="A"),
        fill("buy", "1", "10", at=at(1), symbol="B"),
        fill("sell", "1", "10", at=at(2), symbol="A"),
        fill("sell", "1", "10", at=at(3), symbol="B"),
        fill("sell", "1", "10", at=at(6), symbol="A"),  # short A from t6 to the end at t8
    ]
    m = compute_metrics(curve(["1"] * 9), round_trips_from_fills(fills), fills)
    assert m.exposure == pytest.approx((3 + 2) / 8)


# --- round trips -----------------------------------------------------------------------------


def test_simple_long_round_trip_with_fees() -> None:
    (trip,) = round_trips_from_fills(
        [fill("buy", "2", "100", "0.2", at=at(0)), fill("sell", "2", "110", "0.22", at=at(1))]
    )
    assert trip == RoundTrip("BTC/USDT", "long", D("2"), at(0), D("100"), at(1), D("110"), D("0.42"), D("19.58"))
    assert trip.gross_pnl == D("20")
    assert trip.duration == STEP
    assert trip.return_pct == pytest.approx(19.58 / 200)


def test_short_round_trip() -> None:
    (trip,) = round_trips_from_fills([fill("sell", "1", "100", "1", at=at(0)), fill("buy", "1", "80", "1", at=at(1))])
    assert trip.direction == "short"
    assert trip.gross_pnl == D("20")
    assert trip.pnl == D("18")


def test_partial_closes_allocate_entry_fees_pro_rata() -> None:
    trips = round_trips_from_fills(
        [
            fill("buy", "2", "100", "2", at=at(0)),
            fill("sell", "0.5", "110", "0.55", at=at(1)),  # closes a quarter of the lot
            fill("sell", "1.5", "90", "1.35", at=at(2)),  # closes the rest
        ]
    )
    assert trips == [
        # fees 2 × 0.5/2 + 0.55 = 1.05; gross (110 - 100) × 0.5 = 5
        RoundTrip("BTC/USDT", "long", D("0.5"), at(0), D("100"), at(1), D("110"), D("1.05"), D("3.95")),
        # fees 1.5 + 1.35 = 2.85; gross (90 - 100) × 1.5 = -15
        RoundTrip("BTC/USDT", "long", D("1.5"), at(0), D("100"), at(2), D("90"), D("2.85"), D("-17.85")),
    ]


def test_fifo_matching_and_open_remainder() -> None:
    trips = round_trips_from_fills(
        [
            fill("buy", "1", "100", "1", at=at(0)),
            fill("buy", "1", "120", "1.2", at=at(1)),
            fill("sell", "1.5", "130", "1.95", at=at(2)),  # all of lot 1, half of lot 2
        ]
    )
    closed, still_open = trips
    assert closed.quantity == D("1.5")
    assert closed.entry_ts == at(0)  # the oldest lot it consumed
    assert closed.entry_price == (D("100") + D("0.5") * D("120")) / D("1.5")
    assert closed.fees == D("1") + D("0.6") + D("1.95")
    assert closed.pnl == D("130") * D("1.5") - D("160") - D("3.55")
    assert still_open == RoundTrip("BTC/USDT", "long", D("0.5"), at(1), D("120"), None, None, D("0.6"), None)
    assert still_open.is_open
    assert still_open.gross_pnl is None and still_open.return_pct is None


def test_flip_closes_and_opens_with_split_fee() -> None:
    trips = round_trips_from_fills(
        [
            fill("buy", "1", "100", "1", at=at(0)),
            fill("sell", "3", "110", "3.3", at=at(1)),  # close 1 long, open 2 short
            fill("buy", "2", "100", "2", at=at(2)),
        ]
    )
    assert trips == [
        RoundTrip("BTC/USDT", "long", D("1"), at(0), D("100"), at(1), D("110"), D("2.1"), D("7.9")),
        # short 2 @110 → 100: gross +20; fees 2.2 (its share of the flip) + 2
        RoundTrip("BTC/USDT", "short", D("2"), at(1), D("110"), at(2), D("100"), D("4.2"), D("15.8")),
    ]


def test_flip_into_an_open_position() -> None:
    trips = round_trips_from_fills([fill("sell", "1", "50", "0.1", at=at(0)), fill("buy", "4", "40", "0.4", at=at(1))])
    assert [t.direction for t in trips] == ["short", "long"]
    assert trips[0].pnl == D("10") - D("0.1") - D("0.1")
    assert trips[1] == RoundTrip("BTC/USDT", "long", D("3"), at(1), D("40"), None, None, D("0.3"), None)


def test_consecutive_fills_of_one_closing_order_make_one_trip() -> None:
    opening = fill("buy", "3", "100", "3", at=at(0))
    sweep = [
        fill("sell", "1", "101", "1", at=at(1), order="exit-1"),
        fill("sell", "1", "100", "1", at=at(1), order="exit-1"),
        fill("sell", "1", "99", "1", at=at(1), order="exit-1"),
    ]
    (trip,) = round_trips_from_fills([opening, *sweep])
    assert trip.quantity == D("3")
    assert trip.exit_price == D("100")
    assert trip.fees == D("6")
    assert trip.pnl == D("-6")
    # Two different closing orders are two trips.
    two = round_trips_from_fills(
        [opening, fill("sell", "1", "101", at=at(1), order="a"), fill("sell", "2", "99", at=at(2), order="b")]
    )
    assert [t.quantity for t in two] == [D("1"), D("2")]


def test_fee_shares_sum_exactly() -> None:
    fills = [fill("buy", "3", "10", "1", at=at(0))] + [fill("sell", "1", "10", at=at(i)) for i in (1, 2, 3)]
    trips = round_trips_from_fills(fills)
    assert len(trips) == 3
    assert sum((t.fees for t in trips), D(0)) == D("1")  # thirds that add up exactly


def test_symbols_are_matched_separately_and_ordered_by_exit() -> None:
    trips = round_trips_from_fills(
        [
            fill("buy", "1", "10", at=at(0), symbol="A"),
            fill("sell", "1", "20", at=at(1), symbol="B"),
            fill("buy", "1", "15", at=at(2), symbol="B"),
            fill("sell", "1", "12", at=at(3), symbol="A"),
            fill("buy", "1", "7", at=at(4), symbol="C"),
        ]
    )
    assert [(t.symbol, t.direction, t.pnl) for t in trips] == [
        ("B", "short", D("5")),
        ("A", "long", D("2")),
        ("C", "long", None),
    ]


def test_fills_are_taken_in_time_order() -> None:
    buy, sell = fill("buy", "1", "100", at=at(0)), fill("sell", "1", "90", at=at(1))
    assert round_trips_from_fills([sell, buy]) == round_trips_from_fills([buy, sell])


def test_no_fills_no_trips() -> None:
    assert round_trips_from_fills([]) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["buy", "sell"]),
            st.integers(min_value=1, max_value=50),  # quantity in tenths
            st.integers(min_value=50, max_value=150),  # price
            st.integers(min_value=0, max_value=30),  # fee in hundredths
            st.booleans(),  # same order as the previous fill
        ),
        max_size=25,
    )
)
def test_round_trip_invariants(raw: list[tuple[str, int, int, int, bool]]) -> None:
    """Fees are conserved exactly; closed quantity + open quantity add up; gross PnL of the closed trips
    plus the open trips' cost basis equals the cash flow of the fills marked at the open entry prices."""
    fills = []
    order = "o0"
    for i, (side, tenths, price, cents, same_order) in enumerate(raw):
        order = order if same_order else f"o{i}"
        fills.append(fill(side, str(D(tenths) / 10), str(price), str(D(cents) / 100), at=at(i), order=order))
    trips = round_trips_from_fills(fills)
    assert sum((t.fees for t in trips), D(0)) == sum((f.fee for f in fills), D(0))
    net = sum((f.quantity * f.side.sign for f in fills), D(0))
    open_trips = [t for t in trips if t.is_open]
    assert len(open_trips) == (1 if net else 0)
    assert sum((t.quantity * t.sign for t in open_trips), D(0)) == net
    # Cash flow: -Σ side × qty × price. Closed gross PnL + open trips valued at their entry = cash flow + that value.
    cash = -sum((f.quantity * f.price * f.side.sign for f in fills), D(0))
    open_value = sum((t.quantity * t.entry_price * t.sign for t in open_trips), D(0))
    realized = sum((t.gross_pnl for t in trips if t.gross_pnl is not None), D(0))
    assert abs(realized - (cash + open_value)) < D("1e-18")
    for t in trips:
        assert t.quantity > 0
        if t.pnl is not None:
            assert t.exit_price is not None
            expected = (t.exit_price - t.entry_price) * t.quantity * t.sign - t.fees
            assert abs(t.pnl - expected) < D("1e-20")
