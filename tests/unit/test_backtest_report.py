"""Backtest report and result files: report.html, the PNG charts, metrics.json and the CSVs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meltica.backtest import BacktestResult, EquityPoint, OrderRecord, write_report
from meltica.backtest.report import MAX_PLOT_POINTS, decimate, format_metric, plot_positions, render_html
from meltica.backtest.results import jsonable
from meltica.domain import Fill, Order, OrderIntent, OrderType, Side
from meltica.errors import DataValidationError

T0 = datetime(2024, 3, 1, tzinfo=UTC)
SYMBOL = "BTC/USDT"
D = Decimal


def _fill(i: int, side: Side, qty: str, price: Decimal, minute: int) -> Fill:
    return Fill(
        fill_id=f"t{i}",
        client_order_id=f"o{i}",
        exchange="binance",
        symbol=SYMBOL,
        side=side,
        price=price,
        quantity=D(qty),
        fee=(D(qty) * price * D("0.001")).quantize(D("0.0001")),
        fee_currency="USDT",
        ts=T0 + timedelta(minutes=minute),
    )


def _simulated(
    n: int = 3000, *, trade_every: int = 200, strategy: str = "sma_cross"
) -> tuple[BacktestResult, list[tuple[datetime, Decimal]]]:
    """A deterministic long/short toggle on a random-walk price, marked to market every minute."""
    rng = np.random.default_rng(11)
    prices = [D(str(round(p, 2))) for p in 100 * np.cumprod(1 + rng.normal(0, 0.002, n))]
    cash, position = D(10_000), D(0)
    fills: list[Fill] = []
    equity: list[EquityPoint] = []
    for i, price in enumerate(prices):
        if i and i % trade_every == 0:
            target = D(10) if (i // trade_every) % 2 else D(-10)
            delta = target - position
            f = _fill(len(fills), Side.BUY if delta > 0 else Side.SELL, str(abs(delta)), price, i)
            fills.append(f)
            cash -= f.side.sign * f.quantity * f.price + f.fee
            position = target
        equity.append(EquityPoint(T0 + timedelta(minutes=i), cash + position * price, cash, position * price))
    result = BacktestResult.from_run(
        strategy=strategy,
        symbols=[SYMBOL],
        equity=equity,
        fills=fills,
        params={"fast": 10, "slow": 30, "size": D("10"), "note": "<b>bold</b>"},
        exchange="binance",
        timeframe="1m",
        fill_model={"kind": "bar_close", "taker_fee": D("0.001")},
        code_version="v0.1.0-3-gabc1234",
    )
    return result, [(T0 + timedelta(minutes=i), p) for i, p in enumerate(prices)]


@pytest.fixture(scope="module")
def simulated() -> tuple[BacktestResult, list[tuple[datetime, Decimal]]]:
    return _simulated()


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        return image.size


def test_write_report_writes_html_and_charts(
    simulated: tuple[BacktestResult, list[tuple[datetime, Decimal]]], tmp_path: Path
) -> None:
    result, prices = simulated
    page = write_report(result, tmp_path / "run", prices={SYMBOL: prices})
    assert page == tmp_path / "run" / "report.html"
    for name in ("equity.png", "drawdown.png", "positions.png"):
        width, height = _png_size(tmp_path / "run" / name)
        assert width >= 800 and height >= 300
    html = page.read_text(encoding="utf-8")
    # PNGs linked by relative path, so the folder can be moved or zipped as a whole.
    for name in ("equity.png", "drawdown.png", "positions.png"):
        assert f'<a href="{name}"' in html
    # One self-contained file: plotly.js inlined, nothing loaded from elsewhere (tests/unit/test_report_browser.py
    # opens it in Chromium with the network blocked).
    assert 'id="meltica-charts"' in html
    assert "<script src" not in html and 'src="http' not in html
    assert "Sharpe ratio" in html and "Max drawdown" in html and "Profit factor" in html
    assert str(result.run_id) in html
    assert "v0.1.0-3-gabc1234" in html
    assert "2024-03-01T00:00:00+00:00" in html  # data range
    assert "&lt;b&gt;bold&lt;/b&gt;" in html  # parameters are escaped
    assert html.count("<tr><td") == len(result.round_trips)


def test_round_trip_table_is_limited(simulated: tuple[BacktestResult, list[tuple[datetime, Decimal]]]) -> None:
    result, _ = simulated
    assert len(result.round_trips) > 5
    html = render_html(result, charts=["equity.png"], max_trades=5)
    assert html.count("<tr><td") == 5
    assert f"First 5 of {len(result.round_trips)} round trips" in html


def test_report_escapes_the_strategy_name(tmp_path: Path) -> None:
    result, _ = _simulated(400, strategy="<script>alert(1)</script>")
    html = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)" in html


def test_report_without_prices_or_data(tmp_path: Path) -> None:
    """No price series: the positions chart joins the fill prices. No data at all: the charts say so."""
    result, _ = _simulated(500)
    write_report(result, tmp_path / "fills-only")
    assert _png_size(tmp_path / "fills-only" / "positions.png")[0] > 0
    empty = BacktestResult.from_run(strategy="idle", symbols=[], equity=[], code_version="x")
    page = write_report(empty, tmp_path / "empty")
    for name in ("equity.png", "drawdown.png", "positions.png"):
        assert _png_size(tmp_path / "empty" / name)[0] > 0
    assert "Round trips" in page.read_text(encoding="utf-8")


def test_report_on_a_long_curve_is_decimated(tmp_path: Path) -> None:
    result, prices = _simulated(60_000, trade_every=50)  # ~1 200 fills, ~1 200 round trips
    assert len(result.round_trips) == 60_000 // 50 - 1
    figure = plot_positions(result, prices={SYMBOL: prices})
    price_axes = figure.axes[0]
    assert price_axes.get_title() == f"{SYMBOL}: {len(result.round_trips)} round trips (1 in 3 marked)"
    assert all(np.size(line.get_xdata()) <= MAX_PLOT_POINTS for line in price_axes.get_lines())
    write_report(result, tmp_path, prices={SYMBOL: prices})
    assert _png_size(tmp_path / "positions.png")[0] > 0


def test_decimate_keeps_extremes_and_ends() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=100_000)
    y[54_321] = 50.0
    y[12_345] = -50.0
    idx = decimate(y, 1000)
    assert len(idx) <= 1000
    assert idx[0] == 0 and idx[-1] == len(y) - 1
    assert 54_321 in idx and 12_345 in idx
    assert np.all(np.diff(idx) > 0)
    assert list(decimate(y[:10], 1000)) == list(range(10))


def test_format_metric() -> None:
    assert format_metric("total_return", 0.1234) == "12.34 %"
    assert format_metric("sharpe", 1.23456) == "1.235"
    assert format_metric("profit_factor", math.inf) == "∞"
    assert format_metric("max_drawdown_duration", timedelta(days=2, hours=3, minutes=4)) == "2d 3h 4m"
    assert format_metric("fees", D("1234.5")) == "1,234.5000"
    assert format_metric("average_trade", D("0.00012300")) == "0.000123"
    assert format_metric("trades", 1234) == "1,234"
    assert format_metric("max_drawdown_recovered", False) == "no"


# --- files -----------------------------------------------------------------------------------


def test_write_files(simulated: tuple[BacktestResult, list[tuple[datetime, Decimal]]], tmp_path: Path) -> None:
    result, _ = simulated
    written = result.write_files(tmp_path / "out")
    assert sorted(p.name for p in written) == ["equity.csv", "fills.csv", "metrics.json", "orders.csv", "trades.csv"]
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["run"]["run_id"] == str(result.run_id)
    assert doc["run"]["params"]["size"] == "10"  # decimals as exact strings
    assert doc["run"]["fill_model"] == {"kind": "bar_close", "taker_fee": "0.001"}
    assert doc["run"]["data_start"] == "2024-03-01T00:00:00+00:00"
    metrics = doc["metrics"]
    assert D(metrics["fees"]) == result.metrics.fees
    assert D(metrics["final_equity"]) == result.metrics.final_equity
    assert metrics["sharpe"] == result.metrics.sharpe
    assert metrics["max_drawdown_duration"] == result.metrics.max_drawdown_duration.total_seconds()

    with (tmp_path / "out" / "equity.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.equity)
    assert D(rows[-1]["equity"]) == result.equity[-1].equity
    assert datetime.fromisoformat(rows[0]["ts"]) == T0
    with (tmp_path / "out" / "fills.csv").open() as fh:
        fills = list(csv.DictReader(fh))
    assert [f["fill_id"] for f in fills] == [f.fill_id for f in result.fills]
    assert fills[0]["side"] == result.fills[0].side.value
    with (tmp_path / "out" / "trades.csv").open() as fh:
        trades = list(csv.DictReader(fh))
    assert len(trades) == len(result.round_trips)
    assert trades[0]["trade_no"] == "1"
    assert D(trades[0]["pnl"]) == result.round_trips[0].pnl
    assert trades[-1]["exit_ts"] == ""  # still open at the end
    with (tmp_path / "out" / "orders.csv").open() as fh:
        assert next(csv.reader(fh))[0] == "client_order_id"


def test_metrics_json_writes_infinity_as_a_string(tmp_path: Path) -> None:
    rising = [EquityPoint(T0 + timedelta(days=i), D(100 * 2**i), D(100 * 2**i), D(0)) for i in range(3)]
    result = BacktestResult.from_run(strategy="up", symbols=[SYMBOL], equity=rising, code_version="x")
    result.write_files(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]  # strict JSON: no bare Infinity
    assert metrics["sortino"] == "Infinity"
    assert metrics["profit_factor"] == 0.0


def test_order_record_from_domain_order() -> None:
    intent = OrderIntent(
        intent_id="i-1",
        account="bt",
        strategy="s",
        exchange="binance",
        symbol=SYMBOL,
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=D("2"),
        price=D("100"),
        created_at=T0,
    )
    record = OrderRecord.from_order(Order.from_intent(intent))
    assert (record.client_order_id, record.side, record.order_type, record.status) == (
        intent.client_order_id,
        "buy",
        "limit",
        "new",
    )
    result = BacktestResult.from_run(strategy="s", symbols=[SYMBOL], equity=[], orders=[Order.from_intent(intent)])
    # still working when the run ended: marked so, with the status it had then
    assert result.orders == (dataclasses.replace(record, status="open_at_end", reason="new when the data ended"),)


def test_result_validates_the_curve() -> None:
    point = EquityPoint(T0, D(1), D(1), D(0))
    with pytest.raises(DataValidationError, match="strictly increasing"):
        BacktestResult.from_run(strategy="s", symbols=[], equity=[point, point], code_version="x")
    with pytest.raises(DataValidationError, match="timezone-aware"):
        BacktestResult.from_run(
            strategy="s", symbols=[], equity=[EquityPoint(T0.replace(tzinfo=None), D(1), D(1), D(0))], code_version="x"
        )


def test_from_run_defaults() -> None:
    points = [EquityPoint(T0 + timedelta(hours=i), D(100), D(100), D(0)) for i in range(3)]
    result = BacktestResult.from_run(strategy="s", symbols=[SYMBOL], equity=points)
    assert (result.data_start, result.data_end) == (points[0].ts, points[-1].ts)
    assert result.code_version  # git describe or the package version
    assert result.metrics.periods_per_year == pytest.approx(8760)


def test_jsonable() -> None:
    assert jsonable({"a": (D("1.10"), math.inf, -math.inf), "b": {T0}}) == {
        "a": ["1.10", "Infinity", "-Infinity"],
        "b": ["2024-03-01T00:00:00+00:00"],
    }
    with pytest.raises(TypeError):
        jsonable(object())
