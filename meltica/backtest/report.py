"""The report of one backtest run: ``report.html`` with interactive charts, and three PNG charts.

* ``equity.png``: the equity curve;
* ``drawdown.png``: the drawdown from the running peak, in percent;
* ``positions.png``: per symbol, the price with round-trip entries and exits marked, and the net position
  (rebuilt from the fills) as a step plot underneath.

``report.html`` shows the same four charts as one interactive plotly figure (zoom and pan on a shared
time axis, hover on every marked entry and exit for its trade's times, prices, quantity and PnL). The
plotly.js library is inlined, so the page is one self-contained file that opens offline (no CDN, no
network); it weighs about 5-6 MB, 4.8 MB of it the library. The PNGs are written next to it for documents
and e-mails, drawn with matplotlib's object API onto Agg canvases (the report never changes the process's
pyplot backend and can be written from any thread). Long series are decimated for plotting (min/max per
bucket, so peaks and troughs survive); the numbers in the tables always come from the full data.
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from meltica.backtest.metrics import Metrics, RoundTrip, drawdown_series
from meltica.backtest.results import BacktestResult, jsonable
from meltica.domain.orders import Fill

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PriceSeries = Sequence[tuple[datetime, Decimal]]
FloatArray = npt.NDArray[np.float64]
TimeArray = npt.NDArray[np.datetime64]

MAX_PLOT_POINTS = 4000
"""Points per plotted line after decimation."""
MAX_MARKERS = 400
"""Entry (and exit) markers per symbol in ``positions.png``; more are thinned evenly."""
MAX_INTERACTIVE_MARKERS = 2000
"""Entry (and exit) markers per symbol in report.html's interactive chart (each carries its hover text)."""
MAX_SYMBOL_PANELS = 4
"""``positions.png`` shows at most this many symbols (the first ones of ``result.symbols``)."""
DEFAULT_MAX_TRADES = 200
"""Round trips listed in ``report.html``."""

_PERCENT = {"total_return", "cagr", "volatility", "max_drawdown", "win_rate", "exposure"}
_LABELS = {
    "periods": "Equity points",
    "periods_per_year": "Periods per year",
    "initial_equity": "Initial equity",
    "final_equity": "Final equity",
    "total_return": "Total return",
    "cagr": "CAGR",
    "volatility": "Volatility (annualised)",
    "sharpe": "Sharpe ratio",
    "sortino": "Sortino ratio",
    "max_drawdown": "Max drawdown",
    "max_drawdown_duration": "Max drawdown duration",
    "max_drawdown_recovered": "Max drawdown recovered",
    "calmar": "Calmar ratio",
    "trades": "Closed trades",
    "open_trades": "Open trades",
    "winning_trades": "Winning trades",
    "losing_trades": "Losing trades",
    "win_rate": "Win rate",
    "gross_profit": "Gross profit",
    "gross_loss": "Gross loss",
    "profit_factor": "Profit factor",
    "average_trade": "Average trade PnL",
    "exposure": "Exposure",
    "turnover": "Turnover (× mean equity)",
    "fees": "Fees paid",
}


# --- public API ------------------------------------------------------------------------------


def write_report(
    result: BacktestResult,
    directory: str | Path,
    *,
    prices: Mapping[str, PriceSeries] | None = None,
    max_trades: int = DEFAULT_MAX_TRADES,
) -> Path:
    """Write ``report.html``, ``equity.png``, ``drawdown.png`` and ``positions.png`` into ``directory``
    (created if missing) and return the path of ``report.html``.

    ``prices``: symbol → ``(timestamp, price)`` series (e.g. bar closes) to draw under the positions;
    without it, the line joins the fill prices. ``max_trades``: how many round trips the HTML lists.
    The data files (``metrics.json``, CSVs) are ``result.write_files(directory)``'s job.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    charts = {
        "equity.png": plot_equity(result),
        "drawdown.png": plot_drawdown(result),
        "positions.png": plot_positions(result, prices=prices),
    }
    for name, figure in charts.items():
        figure.savefig(out / name, dpi=110)
    report = out / "report.html"
    page = render_html(
        result, charts=list(charts), max_trades=max_trades, interactive=interactive_charts(result, prices=prices)
    )
    report.write_text(page, encoding="utf-8")
    return report


# --- charts ----------------------------------------------------------------------------------


def _new_figure(height: float = 4.2, rows: int = 1, ratios: Sequence[float] | None = None) -> tuple[Figure, list[Axes]]:
    # lazy: matplotlib / plotly take about a second to import; only writing a report needs them
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, height), layout="constrained")
    grid = fig.add_gridspec(rows, 1, height_ratios=list(ratios) if ratios else None)
    axes: list[Axes] = []
    for i in range(rows):
        axes.append(fig.add_subplot(grid[i, 0], sharex=axes[0] if axes else None))
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _times(ts: Sequence[datetime]) -> TimeArray:
    """Aware datetimes → naive UTC ``datetime64[us]`` (what matplotlib plots fastest)."""
    seconds = np.fromiter((t.timestamp() for t in ts), dtype=np.float64, count=len(ts))
    return np.round(seconds * 1e6).astype("int64").astype("datetime64[us]")


def _floats(values: Sequence[Decimal]) -> FloatArray:
    return np.fromiter((float(v) for v in values), dtype=np.float64, count=len(values))


def decimate(y: FloatArray, max_points: int = MAX_PLOT_POINTS) -> npt.NDArray[np.intp]:
    """Indices of at most ``max_points`` points of ``y`` that keep its shape: the first and last point and
    the minimum and maximum of each of ``max_points // 2`` equal buckets, in order."""
    n = y.size
    if n <= max_points:
        return np.arange(n, dtype=np.intp)
    buckets = max(max_points // 2 - 1, 1)
    edges = np.linspace(0, n, buckets + 1).astype(np.intp)
    keep = [0, n - 1]
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            chunk = y[lo:hi]
            keep.append(int(lo + np.argmin(chunk)))
            keep.append(int(lo + np.argmax(chunk)))
    return np.unique(np.array(keep, dtype=np.intp))


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="grey")


def _title(result: BacktestResult, what: str) -> str:
    symbols = ", ".join(result.symbols)
    tf = f" {result.timeframe}" if result.timeframe else ""
    return f"{result.strategy} · {symbols}{tf} — {what}"


def plot_equity(result: BacktestResult) -> Figure:
    fig, (ax,) = _new_figure()
    m = result.metrics
    ax.set_title(_title(result, f"equity (total return {_pct(m.total_return)})"))
    if not result.equity:
        _no_data(ax, "equity curve")
        return fig
    x = _times([p.ts for p in result.equity])
    y = _floats([p.equity for p in result.equity])
    idx = decimate(y)
    ax.plot(x[idx], y[idx], color="#1f77b4", linewidth=1.2, label="equity")
    ax.axhline(y[0], color="grey", linewidth=0.8, linestyle="--", label="initial equity")
    ax.set_ylabel("equity")
    ax.set_xlabel("time (UTC)")
    ax.legend(loc="best")
    return fig


def plot_drawdown(result: BacktestResult) -> Figure:
    fig, (ax,) = _new_figure(height=3.2)
    m = result.metrics
    ax.set_title(_title(result, f"drawdown (max {_pct(m.max_drawdown)}, {_duration(m.max_drawdown_duration)})"))
    if not result.equity:
        _no_data(ax, "equity curve")
        return fig
    x = _times([p.ts for p in result.equity])
    dd = drawdown_series(_floats([p.equity for p in result.equity])) * 100.0
    idx = decimate(dd)
    ax.fill_between(x[idx], dd[idx], 0.0, color="#d62728", alpha=0.35, linewidth=0)
    ax.plot(x[idx], dd[idx], color="#d62728", linewidth=0.9)
    ax.set_ylabel("drawdown (%)")
    ax.set_xlabel("time (UTC)")
    ax.set_ylim(top=0.5 if dd.size and float(dd.min()) < 0 else 1.0)
    return fig


def _position_steps(
    fills: Sequence[Fill], start: datetime | None, end: datetime | None
) -> tuple[list[datetime], list[Decimal]]:
    """Net position after each fill, starting flat at ``start`` and held to ``end``."""
    ts: list[datetime] = []
    qty: list[Decimal] = []
    position = Decimal(0)
    first = fills[0].ts if fills else None
    if start is not None and (first is None or start < first):
        ts.append(start)
        qty.append(position)
    for fill in fills:
        position += fill.quantity * fill.side.sign
        ts.append(fill.ts)
        qty.append(position)
    if end is not None and ts and end > ts[-1]:
        ts.append(end)
        qty.append(position)
    return ts, qty


def _thin(trips: list[RoundTrip], limit: int = MAX_MARKERS) -> tuple[list[RoundTrip], int]:
    if len(trips) <= limit:
        return trips, 1
    step = -(-len(trips) // limit)
    return trips[::step], step


def plot_positions(result: BacktestResult, *, prices: Mapping[str, PriceSeries] | None = None) -> Figure:
    symbols = list(result.symbols)[:MAX_SYMBOL_PANELS] or sorted({f.symbol for f in result.fills})[:MAX_SYMBOL_PANELS]
    panels = max(len(symbols), 1)
    fig, axes = _new_figure(height=3.6 * panels + 0.6, rows=2 * panels, ratios=[3.0, 1.2] * panels)
    if not symbols:
        _no_data(axes[0], "symbols")
        return fig
    start = result.equity[0].ts if result.equity else None
    end = result.equity[-1].ts if result.equity else None
    fills_by_symbol: dict[str, list[Fill]] = {s: [] for s in symbols}
    for f in sorted(result.fills, key=lambda f: f.ts):
        if f.symbol in fills_by_symbol:
            fills_by_symbol[f.symbol].append(f)
    for i, symbol in enumerate(symbols):
        price_ax, pos_ax = axes[2 * i], axes[2 * i + 1]
        fills = fills_by_symbol[symbol]
        series = (prices or {}).get(symbol)
        if series:
            px = _times([t for t, _ in series])
            py = _floats([p for _, p in series])
            label = "price"
        else:
            px = _times([f.ts for f in fills])
            py = _floats([f.price for f in fills])
            label = "fill price"
        trips = [t for t in result.round_trips if t.symbol == symbol]
        shown, step = _thin(trips)
        thinned = f" (1 in {step} marked)" if step > 1 else ""
        price_ax.set_title(f"{symbol}: {len(trips)} round trips{thinned}")
        if py.size:
            idx = decimate(py)
            price_ax.plot(px[idx], py[idx], color="#555555", linewidth=0.9, label=label)
        else:
            _no_data(price_ax, "prices or fills")
        for direction, marker, colour, name in (
            ("long", "^", "#2ca02c", "long entry"),
            ("short", "v", "#d62728", "short entry"),
        ):
            entries = [t for t in shown if t.direction == direction]
            if entries:
                price_ax.scatter(
                    _times([t.entry_ts for t in entries]),
                    _floats([t.entry_price for t in entries]),
                    marker=marker,
                    color=colour,
                    s=42,
                    zorder=3,
                    label=name,
                )
        exits = [t for t in shown if t.exit_ts is not None and t.exit_price is not None]
        if exits:
            price_ax.scatter(
                _times([t.exit_ts for t in exits if t.exit_ts is not None]),
                _floats([t.exit_price for t in exits if t.exit_price is not None]),
                marker="x",
                color="black",
                s=36,
                zorder=3,
                label="exit",
            )
        price_ax.set_ylabel("price")
        if price_ax.get_legend_handles_labels()[0]:
            price_ax.legend(loc="best", fontsize="small")
        steps_ts, steps_qty = _position_steps(fills, start, end)
        if steps_ts:
            sy = _floats(steps_qty)
            sx = _times(steps_ts)
            idx = decimate(sy)
            pos_ax.step(sx[idx], sy[idx], where="post", color="#9467bd", linewidth=1.0)
            pos_ax.fill_between(sx[idx], sy[idx], 0.0, step="post", color="#9467bd", alpha=0.25, linewidth=0)
        pos_ax.axhline(0.0, color="grey", linewidth=0.6)
        pos_ax.set_ylabel("position")
        price_ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("time (UTC)")
    return fig


# --- interactive chart (report.html) ---------------------------------------------------------------


def _trip_hover(trip: RoundTrip) -> str:
    exit_text = (
        f"{trip.exit_ts:%Y-%m-%d %H:%M:%S} @ {_money(trip.exit_price)}"
        if trip.exit_ts is not None and trip.exit_price is not None
        else "open at the end of the data"
    )
    pnl = "—" if trip.pnl is None else _money(trip.pnl)
    ret = "—" if trip.return_pct is None else _pct(trip.return_pct)
    return (
        f"<b>{html.escape(trip.symbol)} {trip.direction}</b><br>"
        f"entry {trip.entry_ts:%Y-%m-%d %H:%M:%S} @ {_money(trip.entry_price)}<br>"
        f"exit {exit_text}<br>quantity {_money(trip.quantity)} · fees {_money(trip.fees)}<br>"
        f"PnL {pnl} ({ret})"
    )


def interactive_charts(result: BacktestResult, *, prices: Mapping[str, PriceSeries] | None = None) -> str:
    """The report's charts as one plotly figure (an HTML ``<div>`` with plotly.js inlined): equity,
    drawdown, and per symbol the price with trade markers (hover: the round trip) and the net position,
    all on one time axis so zooming or panning one pans all."""
    # lazy: matplotlib / plotly take about a second to import; only writing a report needs them
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    symbols = list(result.symbols)[:MAX_SYMBOL_PANELS] or sorted({f.symbol for f in result.fills})[:MAX_SYMBOL_PANELS]
    m = result.metrics
    titles = [
        f"equity (total return {_pct(m.total_return)})",
        f"drawdown (max {_pct(m.max_drawdown)}, {_duration(m.max_drawdown_duration)})",
    ]
    heights = [3.0, 1.5]
    trips_by_symbol = {s: [t for t in result.round_trips if t.symbol == s] for s in symbols}
    for symbol in symbols:
        shown, step = _thin(trips_by_symbol[symbol], MAX_INTERACTIVE_MARKERS)
        thinned = f", 1 in {step} marked" if step > 1 else ""
        titles += [f"{symbol}: price and {len(trips_by_symbol[symbol])} round trips{thinned}", f"{symbol}: position"]
        heights += [3.0, 1.2]
    fig = make_subplots(
        rows=len(heights),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.05,
        row_heights=heights,
        subplot_titles=titles,
    )
    if result.equity:
        x = _times([p.ts for p in result.equity])
        y = _floats([p.equity for p in result.equity])
        idx = decimate(y)
        fig.add_trace(go.Scatter(x=x[idx], y=y[idx], name="equity", line={"color": "#1f77b4", "width": 1.4}), 1, 1)
        dd = drawdown_series(y) * 100.0
        idx = decimate(dd)
        fig.add_trace(
            go.Scatter(
                x=x[idx],
                y=dd[idx],
                name="drawdown (%)",
                fill="tozeroy",
                line={"color": "#d62728", "width": 1.0},
            ),
            2,
            1,
        )
    start = result.equity[0].ts if result.equity else None
    end = result.equity[-1].ts if result.equity else None
    fills = sorted(result.fills, key=lambda f: f.ts)
    for i, symbol in enumerate(symbols):
        price_row, pos_row = 3 + 2 * i, 4 + 2 * i
        series = (prices or {}).get(symbol)
        symbol_fills = [f for f in fills if f.symbol == symbol]
        if series:
            px, py = _times([t for t, _ in series]), _floats([p for _, p in series])
        else:
            px, py = _times([f.ts for f in symbol_fills]), _floats([f.price for f in symbol_fills])
        if py.size:
            idx = decimate(py)
            fig.add_trace(
                go.Scatter(x=px[idx], y=py[idx], name=f"{symbol} price", line={"color": "#555555", "width": 1.0}),
                price_row,
                1,
            )
        shown, _ = _thin(trips_by_symbol[symbol], MAX_INTERACTIVE_MARKERS)
        for direction, shape, colour in (("long", "triangle-up", "#2ca02c"), ("short", "triangle-down", "#d62728")):
            entries = [t for t in shown if t.direction == direction]
            if entries:
                fig.add_trace(
                    go.Scatter(
                        x=_times([t.entry_ts for t in entries]),
                        y=_floats([t.entry_price for t in entries]),
                        mode="markers",
                        name=f"{symbol} {direction} entry",
                        marker={"symbol": shape, "size": 10, "color": colour},
                        hovertext=[_trip_hover(t) for t in entries],
                        hoverinfo="text",
                    ),
                    price_row,
                    1,
                )
        exits = [t for t in shown if t.exit_ts is not None and t.exit_price is not None]
        if exits:
            fig.add_trace(
                go.Scatter(
                    x=_times([t.exit_ts for t in exits if t.exit_ts is not None]),
                    y=_floats([t.exit_price for t in exits if t.exit_price is not None]),
                    mode="markers",
                    name=f"{symbol} exit",
                    marker={"symbol": "x", "size": 9, "color": "black"},
                    hovertext=[_trip_hover(t) for t in exits],
                    hoverinfo="text",
                ),
                price_row,
                1,
            )
        steps_ts, steps_qty = _position_steps(symbol_fills, start, end)
        if steps_ts:
            sy = _floats(steps_qty)
            idx = decimate(sy)
            fig.add_trace(
                go.Scatter(
                    x=_times(steps_ts)[idx],
                    y=sy[idx],
                    name=f"{symbol} position",
                    line={"shape": "hv", "color": "#9467bd", "width": 1.0},
                    fill="tozeroy",
                ),
                pos_row,
                1,
            )
    fig.update_layout(
        height=int(150 * sum(heights)) + 120,
        margin={"l": 60, "r": 20, "t": 60, "b": 40},
        hovermode="closest",
        dragmode="zoom",
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
        template="plotly_white",
    )
    fig.update_xaxes(showspikes=True, spikemode="across", spikethickness=1)
    fig.update_xaxes(title_text="time (UTC)", row=len(heights), col=1)
    chart: str = fig.to_html(
        full_html=False,
        include_plotlyjs=True,  # inlined: the page must open offline
        div_id="meltica-charts",
        config={"displaylogo": False, "scrollZoom": True, "responsive": True},
    )
    return chart


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1240px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .3rem .7rem; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; gap: 2.5rem; flex-wrap: wrap; align-items: flex-start; }
pre { margin: 0; font-size: .85rem; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; margin: .5rem 0; }
.pos { color: #1a7f37; } .neg { color: #c62828; }
"""


def _pct(value: float) -> str:
    return f"{value * 100:.2f} %" if np.isfinite(value) else ("∞" if value > 0 else "−∞")


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    text = " ".join(p for p in parts if p)
    return text or f"{secs}s"


def _money(value: Decimal) -> str:
    return f"{value:,.4f}" if abs(value) >= 1 else f"{value:,.8f}".rstrip("0").rstrip(".") or "0"


def format_metric(name: str, value: float | int | bool | Decimal | timedelta) -> str:
    """A metric value as the report shows it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, timedelta):
        return _duration(value)
    if isinstance(value, Decimal):
        return _money(value)
    if isinstance(value, int):
        return f"{value:,}"
    if name in _PERCENT:
        return _pct(value)
    if not np.isfinite(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:,.1f}" if name == "periods_per_year" else f"{value:,.3f}"


def _metrics_rows(metrics: Metrics) -> str:
    rows = []
    for name, value in metrics.as_dict().items():
        label = html.escape(_LABELS.get(name, name))
        shown = html.escape(format_metric(name, value))
        rows.append(f'<tr><th title="{html.escape(name)}">{label}</th><td class="num">{shown}</td></tr>')
    return "\n".join(rows)


def _run_rows(result: BacktestResult) -> str:
    def fmt(ts: datetime | None) -> str:
        return ts.isoformat() if ts is not None else "—"

    items: list[tuple[str, str]] = [
        ("Strategy", result.strategy),
        ("Run id", str(result.run_id)),
        ("Exchange", result.exchange or "—"),
        ("Symbols", ", ".join(result.symbols) or "—"),
        ("Timeframe", result.timeframe or "—"),
        ("Data from", fmt(result.data_start)),
        ("Data to", fmt(result.data_end)),
        ("Code version", result.code_version or "—"),
    ]
    if result.sweep_id is not None:
        items.append(("Sweep id", str(result.sweep_id)))
    if result.started_at is not None:
        items.append(("Started", fmt(result.started_at)))
    if result.finished_at is not None:
        items.append(("Finished", fmt(result.finished_at)))
    rows = [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items]
    rejections = result.rejections
    rows.append(
        f"<tr><th>Orders</th><td>{len(result.orders)} placed, {len(result.fills)} fills, "
        f"{sum(rejections.values())} rejected</td></tr>"
    )
    for code, count in rejections.items():
        rows.append(f"<tr><th>Rejected: {html.escape(code)}</th><td>{count}</td></tr>")
    for title, data in (
        ("Parameters (given)", result.params),
        ("Effective parameters", result.effective_params),
        ("Data", result.data_fingerprint),
        ("Fill model", result.fill_model),
        ("Invalid orders", {"first": list(result.invalid_orders[:5])} if result.invalid_orders else {}),
    ):
        text = json.dumps(jsonable(data), indent=2, sort_keys=True) if data else "—"
        rows.append(f"<tr><th>{title}</th><td><pre>{html.escape(text)}</pre></td></tr>")
    return "\n".join(rows)


def _warnings_block(warnings: Sequence[str]) -> str:
    """The run's warnings (``BacktestResult.warnings``) above everything else, loud."""
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    style = "border:2px solid #b00020;padding:0.5em 1em"
    return f'<div class="warnings" style="{style}"><b>Warnings</b><ul>{items}</ul></div>'


def _trade_rows(trips: Sequence[RoundTrip], limit: int) -> str:
    rows = []
    for no, t in enumerate(trips[:limit], start=1):
        pnl_class = "" if t.pnl is None else (" pos" if t.pnl > 0 else (" neg" if t.pnl < 0 else ""))
        cells = [
            (str(no), "num"),
            (t.symbol, ""),
            (t.direction, ""),
            (t.entry_ts.isoformat(), ""),
            (_money(t.entry_price), "num"),
            (t.exit_ts.isoformat() if t.exit_ts else "open", ""),
            (_money(t.exit_price) if t.exit_price is not None else "—", "num"),
            (_money(t.quantity), "num"),
            (_money(t.fees), "num"),
            (_money(t.pnl) if t.pnl is not None else "—", "num" + pnl_class),
            (_pct(t.return_pct) if t.return_pct is not None else "—", "num" + pnl_class),
        ]
        rows.append("<tr>" + "".join(f'<td class="{c}">{html.escape(v)}</td>' for v, c in cells) + "</tr>")
    return "\n".join(rows)


def render_html(
    result: BacktestResult,
    *,
    charts: Sequence[str],
    max_trades: int = DEFAULT_MAX_TRADES,
    interactive: str | None = None,
) -> str:
    """The report page; ``charts`` are the PNG file names, referenced relative to the page; ``interactive``
    the chart block from ``interactive_charts`` (shown instead of the PNGs, which are then linked)."""
    title = f"Backtest {result.strategy} — {result.run_id}"
    shown = min(len(result.round_trips), max(max_trades, 0))
    more = (
        f"<p class='sub'>First {shown} of {len(result.round_trips)} round trips; all are in trades.csv.</p>"
        if len(result.round_trips) > shown
        else ""
    )
    if interactive is None:
        images = "\n".join(f'<img src="{html.escape(name)}" alt="{html.escape(name[:-4])} chart">' for name in charts)
    else:
        links = " · ".join(f'<a href="{html.escape(name)}">{html.escape(name)}</a>' for name in charts)
        images = (
            "<p class='sub'>Drag to zoom, double-click to reset, hover a marker for its trade. "
            f"Static images: {links}</p>\n{interactive}"
        )
    header = "".join(
        f"<th>{h}</th>"
        for h in (
            "#",
            "Symbol",
            "Side",
            "Entry time",
            "Entry price",
            "Exit time",
            "Exit price",
            "Quantity",
            "Fees",
            "PnL",
            "Return",
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Backtest: {html.escape(result.strategy)}</h1>
<p class="sub">Run {html.escape(str(result.run_id))} · {html.escape(", ".join(result.symbols))}</p>
{_warnings_block(result.warnings)}
<div class="grid">
<section>
<h2>Metrics</h2>
<table>
{_metrics_rows(result.metrics)}
</table>
</section>
<section>
<h2>Run</h2>
<table>
{_run_rows(result)}
</table>
</section>
</div>
<h2>Charts</h2>
{images}
<h2>Round trips</h2>
{more}
<table>
<tr>{header}</tr>
{_trade_rows(result.round_trips, shown)}
</table>
</body>
</html>
"""
