"""The backtest engine: one strategy, the live OMS / risk / matching objects, a simulated clock.

``run_backtest(config, bars)`` is the Python API (the CLI, the optimiser, flows and the bench call it).
It builds a :class:`~meltica.backtest.context.BacktestContext` — the real ``OrderManager`` over a
``InProcessAdapter`` on a ``InProcessVenue`` (the shared ``MatchingEngine``), ``Portfolio``, ``RiskEngine`` when
limits are configured, ``LocalOrderEmulator`` — and drives it bar by bar inside one coroutine.

Per bar (``ts`` = open time, ``close`` = open time + timeframe):

1. held requests whose arrival (decision + latency) is at or before ``ts`` are released: the clock moves
   to ``ts``, the open is printed to the venue (a stop the gap crossed triggers there and fills at the
   open's price — the worse one), then the requests are sent in order (module docstring of
   ``context.py``);
2. the clock moves to ``close``; when we have working orders the venue runs the bar's path (open →
   nearer extreme → other extreme → close, stops before limit fills: conservative), the emulator sees the
   bar, GTD orders expire;
3. timers that are due fire, the equity is marked to the close (one curve point per bar), then
   ``on_bar`` runs; what it asks for is held for step 1 of a later bar.

Fill model (``BacktestConfig``): maker/taker fees in bps (charged in the quote currency by default);
slippage ``s`` bps — takers fill against a synthetic book whose first level is ``s`` bps from the
reference price (``0``: exactly at it) and whose deeper levels are ``3s``, ``5s`` … away; with
``bar_volume_share`` ``q`` the synthetic book holds only ``q`` × the bar's volume (split over its levels),
so a large order walks deeper (volume-dependent slippage) and a remainder beyond it expires (partial
fill), and resting orders may fill at most ``q`` × the bar's volume along its path. When a recorded order
book is replayed (``OrderBookSnapshot`` items), takers walk that book instead.

Event replay (``run_backtest(config, trades=..., book=...)``, optionally with bars too): recorded trades
(``TradeSeries``) and L2 book updates (``BookSeries``) drive the venue one event at a time.

* **Merge order.** Every event has a time: a trade its print time, a book update its event time, a bar
  its *close* time (``ts + timeframe``: when it is known). Events are sorted by time; at equal times book
  updates come first, then trades, then bars, and within one stream the file order is kept (a stable
  sort). The order is therefore deterministic for a given input.
* **Per event** at time ``t``: the clock moves to ``t``; the event is applied to the venue (a trade is
  printed: resting limits it goes *through* fill, stops see its price, and while no book was ever
  recorded the synthetic book is rebuilt around it; a book snapshot replaces / a delta updates the
  recorded book, liquidity at or through a resting order fills it); then the requests held with an
  arrival (decision time + latency) at or before ``t`` are sent, so a market order meets the market *as
  of this event* — the synthetic book around this trade, or the recorded book after this update, which
  it walks level by level (volume-weighted price: the book-walking slippage). Then GTD expiry, timers,
  one equity point (marked to the last trade price, else the book's mid or best price, else the bar's
  close; events sharing a timestamp share one point), and the strategy's ``on_book`` / ``on_trade`` /
  ``on_bar``.
* **No look-ahead.** A decision made on an event at ``t`` (in its callback, or in the reaction to a fill
  that event caused) is held and reaches the venue at the first *later* event whose time is ``>= t +
  latency``: never at the event it was decided on, so never at that event's price if the market moved.
* Bars replayed together with trades or a book are delivered to the strategy (and marked) but not
  printed to the venue: the recorded trades are the finer price path, printing both would fill twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

from pydantic import BaseModel

from meltica.backtest.config import BacktestConfig
from meltica.backtest.context import BacktestContext
from meltica.backtest.results import BacktestResult, EquityCurve, EquityPoint
from meltica.domain import Bar, FloatBar, Trade
from meltica.errors import ConfigurationError, DataValidationError
from meltica.infra.postgres import database_engine
from meltica.marketdata.series import _BAR_FIELDS, BarSeries, BookSeries, TradeSeries, fast_bar, float_values
from meltica.strategies import Strategy, build_strategy

_ZERO = Decimal(0)
Progress = Callable[[int, int], None]
"""``progress(done, total)``, called every ~0.5 % of the bars and at the end."""

BAR_OPEN, BAR_PATH = "bar_open", "bar_path"
"""Where a bar-driven fill happened (``fills.csv`` column ``at``): at the bar's open (stamped with its open
time) or on its intrabar path (stamped with its close time — also the next bar's open time). Event
replay fills are ``event``."""

BarsInput = BarSeries | Iterable[Bar] | Mapping[str, Any]
"""Bars as a ``BarSeries``, domain ``Bar`` objects, or columnar arrays (``BarSeries.from_arrays``)."""


def load_bars(config: BacktestConfig, bars: BarsInput | None = None, *, database: Any = None) -> BarSeries:
    """The run's bars: ``bars`` as given, else the database's candles for the config's market and range."""
    if bars is None:
        if database is None:
            database = database_engine()
        return BarSeries.from_database(
            database,
            exchange=config.exchange,
            symbol=config.symbol,
            timeframe=config.timeframe,
            start=config.start,
            end=config.end,
        )
    if isinstance(bars, BarSeries):
        return bars
    if isinstance(bars, Mapping):
        return BarSeries.from_arrays(bars, exchange=config.exchange, symbol=config.symbol, timeframe=config.timeframe)
    series = BarSeries.from_bars(bars)
    if series.symbol != config.symbol:
        raise ConfigurationError(f"the bars are {series.symbol}, the run trades {config.symbol}", field="symbol")
    return series


TradesInput = TradeSeries | Iterable[Trade]
"""Recorded trades as a ``TradeSeries`` (``TradeSeries.from_file``) or domain ``Trade`` objects."""


def load_trades(config: BacktestConfig, trades: TradesInput) -> TradeSeries:
    series = trades if isinstance(trades, TradeSeries) else TradeSeries.from_trades(trades)
    if series.symbol != config.symbol:
        raise ConfigurationError(f"the trades are {series.symbol}, the run trades {config.symbol}", field="symbol")
    return series


def build_context(config: BacktestConfig, start: datetime) -> BacktestContext:
    instrument = config.market()
    if instrument.exchange != config.exchange:
        instrument = instrument.model_copy(update={"exchange": config.exchange})
    return BacktestContext(
        [instrument],
        start=start,
        balances=config.balances(),
        account=config.account,
        instance_id=config.strategy_instance,
        exchange_id=config.exchange,
        fees=config.fees(),
        fill_model=config.fill_model(),
        risk=config.risk,
        latency=config.latency,
        valuation_currency=instrument.quote,
    )


def run_backtest(
    config: BacktestConfig | Mapping[str, Any],
    bars: BarsInput | None = None,
    *,
    progress: Progress | None = None,
    strategy: type[Strategy[Any]] | None = None,
    database: Any = None,
    sweep_id: Any = None,
    trades: TradesInput | None = None,
    book: BookSeries | None = None,
    fast_path: bool = True,
) -> BacktestResult:
    """Run one backtest and return its result (metrics, equity curve, orders, fills, round trips).

    ``config``: a ``BacktestConfig`` or a mapping validated into one (``ConfigurationError`` naming the
    field). ``bars``: see ``BarsInput``; ``None`` reads the database (``database``: a SQLAlchemy engine,
    default the configured one). ``strategy``: a ``Strategy`` class to run instead of looking
    ``config.strategy`` up in the registry (unregistered strategies, benchmarks). ``trades`` /
    ``book``: recorded trades and L2 book updates to replay (module docstring, "Event replay"); with
    either, ``bars`` is optional and the database is not read. ``fast_path=False`` sends every order
    through the full OMS path (the in-process venue path gives the same orders and fills; for comparison
    and tests). Nothing is written:
    ``result.write_files(dir)``, ``write_report(result, dir)`` and ``result.save(engine)`` do that.
    """
    if not isinstance(config, BacktestConfig):
        config = BacktestConfig.create(config) if strategy is None else BacktestConfig.model_validate(dict(config))
    if trades is not None or book is not None:
        return _run_replay(config, bars, trades, book, progress=progress, strategy=strategy, sweep_id=sweep_id)
    with _paused_gc():  # loading, the run and its result build objects by the million (see _paused_gc)
        series = load_bars(config, bars, database=database)
        if len(series) == 0:
            raise DataValidationError("no bars to backtest", reason="no_data")
        # The coroutine hands back small things: asyncio may repr a finished task's result.
        ctx, equity = asyncio.run(_run(config, series, progress=progress, strategy_class=strategy, fast_path=fast_path))
        return _bar_result(config, series, ctx, equity, sweep_id)


def _bar_result(
    config: BacktestConfig, series: BarSeries, ctx: BacktestContext, equity: EquityCurve, sweep_id: Any
) -> BacktestResult:
    return BacktestResult.from_run(
        strategy=config.strategy,
        symbols=[config.symbol],
        equity=equity,
        fills=ctx.fills,
        orders=ctx.final_orders(),
        params=dict(config.params),
        exchange=config.exchange,
        timeframe=config.timeframe,
        data_start=series.ts[0],
        data_end=series.ts[-1] + series.delta,
        fill_model=config.fill_model_info(bar=series.delta),
        effective_params=ctx.strategy.params.model_dump(mode="json"),
        data_fingerprint={"bars": len(series), "first": series.ts[0], "last": series.ts[-1]},
        invalid_orders=[dataclasses.asdict(i) for i in ctx.invalid_intents],
        fill_phases=ctx.fill_phases,
        sweep_id=sweep_id,
    )


def _run_replay(
    config: BacktestConfig,
    bars: BarsInput | None,
    trades: TradesInput | None,
    book: BookSeries | None,
    *,
    progress: Progress | None,
    strategy: type[Strategy[Any]] | None,
    sweep_id: Any,
) -> BacktestResult:
    series = None if bars is None else load_bars(config, bars)
    trade_series = None if trades is None else load_trades(config, trades)
    if book is not None and book.symbol != config.symbol:
        raise ConfigurationError(f"the book is {book.symbol}, the run trades {config.symbol}", field="symbol")
    events = merge_events(series, trade_series, book)
    if not events:
        raise DataValidationError("no market data to backtest", reason="no_data")
    ctx, equity = asyncio.run(
        _run_events(config, events, series, trade_series, book, progress=progress, strategy_class=strategy)
    )
    start = events[0][0]
    if series is not None and len(series):
        start = min(start, series.ts[0])
    info = config.fill_model_info()
    info["release"] = "next event at or after decision + latency"
    info["description"] = (
        "a decision reaches the venue at the first market-data event at or after decision + latency "
        f"({config.latency_ms} ms)"
    )
    fingerprint: dict[str, Any] = {"events": len(events), "first": events[0][0], "last": events[-1][0]}
    if series is not None:
        fingerprint["bars"] = len(series)
    if trade_series is not None:
        fingerprint["trades"] = len(trade_series.ts)
    return BacktestResult.from_run(
        strategy=config.strategy,
        symbols=[config.symbol],
        equity=equity,
        fills=ctx.fills,
        orders=list(ctx.orders.values()),
        params=dict(config.params),
        exchange=config.exchange,
        timeframe=series.timeframe if series is not None else config.timeframe,
        data_start=start,
        data_end=events[-1][0],
        fill_model=info,
        effective_params=ctx.strategy.params.model_dump(mode="json"),
        data_fingerprint=fingerprint,
        invalid_orders=[dataclasses.asdict(i) for i in ctx.invalid_intents],
        fill_phases=ctx.fill_phases,
        sweep_id=sweep_id,
    )


BOOK, TRADE, BAR = 0, 1, 2
"""Event kinds, in their order at equal timestamps."""

Event = tuple[datetime, int, int]
"""``(time, kind, index in its stream)``."""


def merge_events(bars: BarSeries | None, trades: TradeSeries | None, book: BookSeries | None) -> list[Event]:
    """The replay's events in processing order: by time, then book < trade < bar, then stream order
    (a bar's time is its close time)."""
    events: list[Event] = []
    if book is not None:
        events.extend((e.ts, BOOK, i) for i, e in enumerate(book.events))
    if trades is not None:
        events.extend((t, TRADE, i) for i, t in enumerate(trades.ts))
    if bars is not None:
        delta = bars.delta
        events.extend((t + delta, BAR, i) for i, t in enumerate(bars.ts))
    events.sort()  # (ts, kind, index): deterministic, stream order kept within a kind
    return events


async def _run_events(
    config: BacktestConfig,
    events: list[Event],
    bars: BarSeries | None,
    trades: TradeSeries | None,
    book: BookSeries | None,
    *,
    progress: Progress | None,
    strategy_class: type[Strategy[Any]] | None,
) -> tuple[BacktestContext, list[EquityPoint]]:
    ctx = build_context(config, events[0][0])
    ctx.attach(_strategy(config, ctx, strategy_class))
    ctx.start()
    equity = await _drive_events(ctx, events, bars, trades, book, config, progress)
    await ctx.stop(events[-1][0])
    return ctx, equity


def _strategy(
    config: BacktestConfig, ctx: BacktestContext, strategy_class: type[Strategy[Any]] | None
) -> Strategy[Any]:
    """The run's strategy on ``ctx``: ``config.strategy`` from the registry, else ``strategy_class``."""
    if strategy_class is None:
        return build_strategy(config.strategy, config.params, ctx)
    params: BaseModel = (
        config.params
        if isinstance(config.params, strategy_class.Params)
        else strategy_class.Params.model_validate(config.params)
    )
    return strategy_class(params, ctx)


async def _drive_events(
    ctx: BacktestContext,
    events: list[Event],
    bars: BarSeries | None,
    trades: TradeSeries | None,
    book: BookSeries | None,
    config: BacktestConfig,
    progress: Progress | None,
) -> list[EquityPoint]:
    """The event loop: see the module docstring ("Event replay")."""
    exchange, symbol = config.exchange, config.symbol
    clock = ctx.clock
    venue = ctx.venue
    engine = ctx.engine
    risk = ctx.risk
    portfolio = ctx.portfolio
    strategy = ctx.strategy
    step = ctx.step
    print_bars = trades is None and book is None
    totals = partial(ctx.cash_and_holding, symbol)
    cash, held = totals()
    points: list[EquityPoint] = _Equity()
    mark: Decimal | None = None
    n = len(events)
    every = max(1, n // 200)
    for k, (ts, kind, i) in enumerate(events):
        clock.now = ts
        item: Any
        callback: Callable[[Any], None]
        if kind == TRADE:
            assert trades is not None
            item = trades.trade(i)
            venue.dispatch(engine.on_trade(symbol, item.price, item.quantity, item.aggressor_side))
            mark = item.price
            callback = strategy.on_trade
        elif kind == BOOK:
            assert book is not None
            event = book.events[i]
            if event.snapshot:
                result = engine.on_book_snapshot(symbol, list(event.bids), list(event.asks))
            else:
                result = engine.on_book_delta(symbol, list(event.bids), list(event.asks))
            venue.dispatch(result)
            item = event.book
            if trades is None:
                best_bid = item.bids[0].price if item.bids else None
                best_ask = item.asks[0].price if item.asks else None
                if best_bid is not None and best_ask is not None:
                    mark = (best_bid + best_ask) / 2
                else:
                    mark = best_bid or best_ask or mark
            callback = strategy.on_book
        else:
            assert bars is not None
            item = fast_bar(
                exchange, symbol, bars.timeframe, bars.ts[i], bars.open[i], bars.high[i], bars.low[i],
                bars.close[i], bars.volume[i],
            )  # fmt: skip
            if print_bars:
                step.path(symbol, item.open, item.high, item.low, item.close, item.volume)
            if mark is None or print_bars:
                mark = item.close
            callback = strategy.on_bar
        await ctx.pump()
        if ctx.emulated_active:
            await ctx.oms.on_market_data(item)
            ctx.update_emulated_activity()
        if risk is not None and mark is not None:
            portfolio.mark(exchange, symbol, mark)
            risk.on_market(exchange, symbol, mark)
        if ctx.has_releasable(ts):
            await ctx.release_held_back(ts)
        if not ctx.quiet() and step.expire():
            await ctx.pump()
        if ctx._timers:
            ctx.queue_due_timers()
        if ctx.fills_changed:
            cash, held = totals()
            ctx.fills_changed = False
        if mark is not None:
            value = held * mark if held else _ZERO
            point = EquityPoint(ts=ts, equity=cash + value, cash=cash, position_value=value)
            if points and points[-1].ts == ts:
                points[-1] = point
            else:
                points.append(point)
        ctx._pending.append(partial(callback, item))
        ctx.drain()
        if progress is not None and (k % every == 0):
            progress(k, n)
    if progress is not None:
        progress(n, n)
    return points


class _Equity(list[EquityPoint]):
    """The equity curve; its repr stays short (a million points)."""

    def __repr__(self) -> str:
        return f"<equity curve of {len(self)} points>"


@contextlib.contextmanager
def _paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for the bar loop (restored after it).

    The loop keeps one equity point per bar, so the heap grows by millions of tracked objects and the
    collector's periodic full passes over them cost a fifth of the run; reference counting still frees
    everything acyclic at once, and any cycles made meanwhile are collected once it is enabled again.

    When it is enabled again, what the run made is moved to the oldest generation first (``gc.freeze()``
    then ``gc.unfreeze()``, which puts the frozen objects there): they are mostly the result, kept, and
    the first young collection after the run would otherwise walk all of them at once (a few per cent of
    a million-bar run); the next full collection still sees them, and collects any cycle among them.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


async def _run(
    config: BacktestConfig,
    series: BarSeries,
    *,
    progress: Progress | None,
    strategy_class: type[Strategy[Any]] | None,
    fast_path: bool = True,
) -> tuple[BacktestContext, EquityCurve]:
    ctx = build_context(config, series.ts[0])
    ctx.attach(_strategy(config, ctx, strategy_class))
    ctx.start()
    with _paused_gc():  # (already paused by run_backtest; kept for direct callers)
        equity = await _drive_bars(ctx, series, progress, fast_path)
    await ctx.stop(series.ts[-1] + series.delta)
    return ctx, equity


def run_bars(
    ctx: BacktestContext, bars: BarSeries | Iterable[Bar], *, start: bool = True, stop: bool = True
) -> EquityCurve:
    """Drive ``ctx`` (its strategy attached) through ``bars`` exactly as ``run_backtest`` does, outside it:
    tests, notebooks, a run continued in pieces. ``start``: the strategy's ``on_start`` first; ``stop``:
    its ``on_stop`` and the end of the data after (``False``: more bars follow)."""
    series = bars if isinstance(bars, BarSeries) else BarSeries.from_bars(bars)

    async def run() -> EquityCurve:
        if start:
            ctx.start()
        equity = await _drive_bars(ctx, series, None, fast_path=True)
        if stop:
            await ctx.stop(series.ts[-1] + series.delta)
        return equity

    return asyncio.run(run())


async def _drive_bars(
    ctx: BacktestContext, series: BarSeries, progress: Progress | None, fast_path: bool
) -> EquityCurve:
    """The hot loop: see the module docstring for what happens per bar."""
    exchange, symbol, timeframe = ctx.exchange, series.symbol, series.timeframe
    delta = series.delta
    clock = ctx.clock
    risk = ctx.risk
    portfolio = ctx.portfolio
    pending = ctx._pending
    outbox = ctx._outbox
    # (``Callable[[Any], None]``: a ``FloatBar`` when the strategy declares ``bar_prices = "float"``)
    on_bar: Callable[[Any], None] = ctx.strategy.on_bar
    step = ctx.step
    pump = ctx.pump
    # With a volume share each bar's volume sizes the book an arriving order meets (``BarStep.open``).
    sized = step.base_model.bar_volume_share is not None
    # The venue is the synthetic book at each price, uncapped: plain market orders may take the
    # in-process path (``BacktestContext.submit_direct``), which decides order by order.
    ctx.direct_market_orders = fast_path and not sized
    new_obj = object.__new__
    totals = partial(ctx.cash_and_holding, symbol)
    cash, held = totals()
    # The curve is kept as columns (``EquityCurve``): the bars' times and closes, and (cash, holding)
    # from each bar whose fills changed them on — one point per bar, built when read.
    changes: list[tuple[int, Decimal, Decimal]] = [(0, cash, held)]
    n = len(series)
    every = max(1, n // 200)
    ts_col, o_col, h_col, l_col, c_col, v_col = (
        series.ts,
        series.open,
        series.high,
        series.low,
        series.close,
        series.volume,
    )
    open_orders = ctx._open  # never rebound: its truthiness is "we have working orders"
    timers = ctx._timers
    bar_cls = Bar
    float_bar_cls = FloatBar
    bar_fields = _BAR_FIELDS
    # The pydantic instance slots, stored through their own setters (what ``object.__setattr__`` does).
    set_dict = BaseModel.__dict__["__dict__"].__set__
    set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
    set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
    set_private = BaseModel.__dict__["__pydantic_private__"].__set__
    # ``Strategy.bar_prices = "float"``: the strategy gets a ``FloatBar`` of the columns' floats, and a
    # ``Decimal`` is read from the columns only where the venue, the risk engine or the emulation needs one.
    float_bars = getattr(ctx.strategy, "bar_prices", "decimal") == "float"
    new_tuple = tuple.__new__
    rows: Iterator[tuple[Any, ...]]
    if float_bars:
        rows = zip(ts_col, *map(float_values, (o_col, h_col, l_col, c_col, v_col)), strict=True)
    else:
        rows = zip(ts_col, o_col, h_col, l_col, c_col, v_col, strict=True)
    # (iterated: ``EpochTimes`` builds each time from the previous one)
    for i, (ts, o, h, lo, c, v) in enumerate(rows):
        close_time = ts + delta
        if outbox and outbox[0].arrival <= ts:
            clock.now = ts
            ctx.fill_phase = BAR_OPEN
            opened = o_col[i] if float_bars else o
            step.open(symbol, opened, (v_col[i] if float_bars else v) if sized else None)
            await pump()
            if risk is not None:
                portfolio.mark(exchange, symbol, opened)
                risk.on_market(exchange, symbol, opened)
            await ctx.release(ts)
        bar: Any
        if float_bars:
            bar = new_tuple(float_bar_cls, (exchange, symbol, timeframe, ts, o, h, lo, c, v))
        else:
            # The domain Bar, built as fast_bar does (the series was validated once).
            bar = new_obj(bar_cls)
            set_dict(
                bar,
                {
                    "exchange": exchange,
                    "symbol": symbol,
                    "timeframe": timeframe,
                    "ts": ts,
                    "open": o,
                    "high": h,
                    "low": lo,
                    "close": c,
                    "volume": v,
                },
            )
            set_fields_set(bar, bar_fields)
            set_extra(bar, None)
            set_private(bar, None)
        clock.now = close_time
        if float_bars and (open_orders or ctx._emulated_active or risk is not None):
            o, h, lo, c, v = o_col[i], h_col[i], l_col[i], c_col[i], v_col[i]  # the venue's Decimals
        if open_orders or ctx._emulated_active:
            ctx.fill_phase = BAR_PATH
            step.path(symbol, o, h, lo, c, v)
            await pump()
            if ctx._emulated_active:
                await ctx.oms.on_market_data(
                    fast_bar(exchange, symbol, timeframe, ts, o, h, lo, c, v) if float_bars else bar
                )
                ctx.update_emulated_activity()
            if step.expire():
                await pump()
        if risk is not None:
            portfolio.mark(exchange, symbol, c)
            risk.on_market(exchange, symbol, c)
        if timers:
            ctx.queue_due_timers()
        if ctx.fills_changed:
            if changes[-1][0] == i:
                changes.pop()
            changes.append((i, *totals()))
            ctx.fills_changed = False
        if pending:  # callbacks queued by this bar's fills run before on_bar, as queued
            pending.append(partial(on_bar, bar))
            while pending:
                pending.popleft()()
        else:
            on_bar(bar)
            while pending:
                pending.popleft()()
        if progress is not None and (i % every == 0):
            progress(i, n)
    if progress is not None:
        progress(n, n)
    return EquityCurve(ts_col, delta, c_col, changes, open_micros=series.open_micros)
