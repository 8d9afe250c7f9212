"""A local Binance-spot-compatible exchange: REST ``/api/v3``, market streams, user data stream.

All fills come from ``meltica.matching`` (the paper venue's engine); this module only speaks
Binance's protocol around it. Two clocks:

* **server time** — wall clock (``config.clock``) plus ``faults.clock_skew_ms``: ``/api/v3/time`` and
  the ``timestamp``/``recvWindow`` check of signed requests, so clients sign with their real clock;
* **market time** — the replayed data's time (the last event applied; moving at ``speed`` between
  events), or the wall clock while nothing was replayed. The engine, order/trade timestamps and stream
  event times use market time.

**Real time** (``config.realtime``, what ``meltica emulator binance`` runs): at start the data is shifted
so its first bar opens at the wall clock floored to the bar's interval (trades/book data: the first event
at now), and market time *is* the wall clock (at ``speed`` X ≠ 1 it runs X times faster from the start;
server time stays the wall clock for signatures). Events already due at start are applied at once, the
rest when market time reaches them, and market time never passes an event not yet applied. Each bar is
printed as four public trades along its path (``replay.bar_path``: open, extremes, close, a quarter of
the volume each) that feed the engine (``on_trade``) and build the klines, so ``@trade``/``@aggTrade``,
``/trades``, ``/klines`` and ``@kline_*`` agree; the bar's close marks the kline closed and expires GTD
orders. ``@ticker``/``@miniTicker``/``!miniTicker@arr``/``!ticker@arr``/``@bookTicker`` are pushed every
``ticker_interval_s``. Request weight and order counts are limited as on Binance (``limits.py``) except
while the market is driven.

**Driven market** (``POST /_emulator/market/open`` and ``/_emulator/market/bar``): a client moves the
market bar by bar, in lock-step, with the backtester's own bar step (``meltica.sim.step.BarStep``):
``open`` sets market time to the bar's open and prints the open to the
engine (``MatchingEngine.on_trade(symbol, open, 0)``: stops a gap crossed trigger and fill there);
``bar`` sets market time to the bar's close, runs the bar's path (``MatchingEngine.on_bar``: fills on the
path are stamped with the close) and expires GTD orders (``advance``). From the first such call market
time is exactly the last time set (``speed`` no longer moves it). Both answer with the executions they
caused per account; ``GET /_emulator/executions?account=A&after=SEQ`` lists every execution (also those
of REST orders) after a sequence number — the ``I`` field of the ``executionReport`` — so a driver can
wait until its user stream has delivered them all. GTD (an extension of Binance spot for parity with the
paper venue): ``timeInForce=GTD`` with ``goodTillDate`` (epoch ms), as on Binance futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

from meltica.adapters.local_venue import ccxt_urls_for
from meltica.domain.enums import Side
from meltica.domain.values import utc_to_ms
from meltica.emulator import auth, binance_format, errors
from meltica.emulator.binance_format import f8
from meltica.emulator.config import ADMIN_TOKEN_HEADER, EmulatorAccount, EmulatorConfig
from meltica.emulator.errors import BinanceError
from meltica.emulator.faults import Faults
from meltica.emulator.limits import RateLimiter, request_weight
from meltica.emulator.market import Kline, SymbolMarket, interval_ms, plain
from meltica.emulator.market import PublicTrade as MarketTrade
from meltica.emulator.replay import (
    BarEvent,
    BookEvent,
    PathTradeEvent,
    ReplayEvent,
    TradeEvent,
    bar_path,
    load_file,
    merge,
    to_wall_clock,
)
from meltica.emulator.streams import Connection, StreamHub
from meltica.emulator.symbols import SymbolSpec, spec_for
from meltica.matching import (
    CancelReplacePartialFailureError,
    EngineOrder,
    EngineOrderType,
    EngineRejection,
    EngineTimeInForce,
    ExecutionReport,
    ExecutionType,
    FeeSchedule,
    MatchingEngine,
    MatchResult,
    NewOrder,
    RejectReason,
    SelfTradePrevention,
)
from meltica.sim.step import BarStep

Params = dict[str, str]
Handler = Callable[[web.Request, Params, "EmulatorAccount | None"], Awaitable[Any]]

# Public trade ids of a driven bar's prints: their own sequence, far above the engine's fill ids.
DRIVEN_PRINT_IDS = 1 << 40
ORDER_PATHS = ("/api/v3/order", "/api/v3/order/cancelReplace")
_PARTIAL_DEPTH = re.compile(r"^([a-z0-9]+)@depth(5|10|20)(@100ms|@1000ms)?$")


class EmulatorServer:
    """``async with EmulatorServer(config) as emu:`` — a running emulator on ``emu.rest_url``."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.faults = Faults()
        self.hub = StreamHub()
        self.specs: dict[str, SymbolSpec] = {s: spec_for(s) for s in config.symbols}
        self.engine = MatchingEngine(
            clock=self.market_now,
            fees=FeeSchedule(maker=config.maker_fee, taker=config.taker_fee),
            fill_model=config.fill_model,
        )
        # The bar step of a driven market; a driven open with a volume scales the configured fill model's
        # synthetic book (as does a replayed bar, ``depth_from_volume``).
        self.bar_step = BarStep(self.engine, self._publish_result)
        for spec in self.specs.values():
            self.engine.add_instrument(spec.instrument(config.maker_fee, config.taker_fee), symbol=spec.symbol)
        self.accounts_by_key: dict[str, EmulatorAccount] = {a.api_key: a for a in config.accounts}
        self.accounts: dict[str, EmulatorAccount] = {a.name: a for a in config.accounts}
        for acc in config.accounts:
            if acc.fees is not None:
                self.engine.set_fees(acc.name, acc.fees)
            for asset, amount in (acc.balances or config.default_balances).items():
                if amount > 0:
                    self.engine.ledger.deposit(acc.name, asset, amount)
        self.markets: dict[str, SymbolMarket] = {s: SymbolMarket(s) for s in self.specs}
        # published book per symbol: (bids, asks, last update id), so diffs and /depth agree
        self._books: dict[str, tuple[dict[Decimal, Decimal], dict[Decimal, Decimal], int]] = {
            s: ({}, {}, 1) for s in self.specs
        }
        self._listen_keys: dict[str, str] = {}
        self._execution_ids = itertools.count(1)
        self._client_ids = itertools.count(1)
        self._account_update_ms: dict[str, int] = {}
        # Every execution per account (bounded), for drivers waiting on their user stream.
        self._journal: dict[str, deque[dict[str, Any]]] = {a.name: deque(maxlen=100_000) for a in config.accounts}
        self._driven = False  # market time set by /_emulator/market/* only
        self._driven_print_ids = itertools.count(DRIVEN_PRINT_IDS)
        # replay
        data_symbol = (config.data_symbol or config.symbols[0]).upper()
        self.events: list[ReplayEvent] = merge(
            *[load_file(path, data_symbol, config.candle_timeframe, config.data_volume) for path in config.data]
        )
        self.position = 0
        self._market_anchor: datetime | None = None
        self._wall_anchor: datetime | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._drop_task: asyncio.Task[None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self.limiter = RateLimiter(config.rate_limits)
        self._kline_sent: dict[str, tuple[int, bool]] = {}  # kline stream → (open time, final) last sent
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        for symbol, price in config.initial_prices.items():
            self._seed_price(symbol.upper(), price)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        self._routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await self._site.start()
        server = self._site._server  # noqa: SLF001 - aiohttp keeps the asyncio server (its bound port) private
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.config.port
        loop = asyncio.get_running_loop()
        if self.config.realtime:
            # market time := the wall clock from now on; the data is moved to start here (module docstring)
            now = self.config.clock()
            self.events = to_wall_clock(self.events[self.position :], now, self.config.history_bars)
            self.position = 0
            self._market_anchor = now
            self._wall_anchor = now
            self.catch_up()  # what is due already (history bars, the current bar's first points) is there at once
        if self.config.speed is not None and self.events:
            self._replay_task = loop.create_task(self._autoplay(self.config.speed))
        self._drop_task = loop.create_task(self._periodic_drops())
        self._ticker_task = loop.create_task(self._periodic_tickers())

    async def stop(self) -> None:
        for task in (self._replay_task, self._drop_task, self._ticker_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.hub.drop_all()
        for conn in list(self.hub.connections):
            await self.hub.remove(conn)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- addresses --------------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"

    def ccxt_urls(self) -> dict[str, Any]:
        """The dict for ``exchange.urls['api']`` (ccxt binance / ccxt.pro binance): every entry here."""
        return ccxt_urls_for(self.rest_url)

    @property
    def admin_token(self) -> str:
        """The token every ``/_emulator/...`` request must carry (header ``X-Emulator-Admin-Token``)."""
        assert self.config.admin_token is not None  # EmulatorConfig generates one when none is given
        return self.config.admin_token

    def admin_headers(self) -> dict[str, str]:
        """Headers for an admin request: ``http.post(emu.rest_url + "/_emulator/...", json=..., headers=...)``."""
        return {ADMIN_TOKEN_HEADER: self.admin_token}

    # --- clocks -----------------------------------------------------------------------------------

    def server_ms(self) -> int:
        return utc_to_ms(self.config.clock()) + self.faults.clock_skew_ms

    def market_now(self) -> datetime:
        if self._market_anchor is None:
            return self.config.clock()
        speed = self.config.speed
        if not speed or self._wall_anchor is None or self._driven:
            return self._market_anchor
        elapsed = (self.config.clock() - self._wall_anchor) * speed
        moved = self._market_anchor + elapsed
        if self.position < len(self.events):  # never run past the next event not yet applied (a late replay)
            moved = min(moved, self.events[self.position].ts)
        return moved

    def market_ms(self) -> int:
        return utc_to_ms(self.market_now())

    # --- replay -------------------------------------------------------------------------------------

    @property
    def events_left(self) -> int:
        return len(self.events) - self.position

    async def step(self, n: int = 1) -> int:
        """Apply the next ``n`` recorded events; return how many were applied."""
        done = 0
        while done < n and self.position < len(self.events):
            self._apply(self.events[self.position])
            self.position += 1
            done += 1
        await asyncio.sleep(0)  # let the stream writers run
        return done

    async def replay_all(self) -> int:
        return await self.step(self.events_left)

    async def replay_until(self, ts: datetime) -> int:
        n = 0
        while self.position < len(self.events) and self.events[self.position].ts <= ts:
            n += await self.step(1)
        return n

    async def _autoplay(self, speed: float) -> None:
        while self.position < len(self.events):
            nxt = self.events[self.position]
            if speed > 0 and self._market_anchor is not None and self._wall_anchor is not None:
                due = self._wall_anchor + (nxt.ts - self._market_anchor) / speed
                delay = (due - self.config.clock()).total_seconds()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue  # look again: a request may have caught up meanwhile (``catch_up``)
            await self.step(1)

    def catch_up(self) -> int:
        """Real time: apply every event whose time has come, now — so a request never sees the market
        behind the clock (the replay task may wake late). Returns how many were applied."""
        if not self.config.realtime or self._driven or self._market_anchor is None or self._wall_anchor is None:
            return 0
        speed = self.config.speed or 1.0
        now = self._market_anchor + (self.config.clock() - self._wall_anchor) * speed
        done = 0
        while self.position < len(self.events) and self.events[self.position].ts <= now:
            self._apply(self.events[self.position])
            self.position += 1
            done += 1
        return done

    def _apply(self, event: ReplayEvent) -> None:
        if not self.config.realtime:  # data time: market time jumps to each event
            self._market_anchor = event.ts
            self._wall_anchor = self.config.clock()
        symbol = event.symbol
        if symbol not in self.specs:
            return
        if isinstance(event, PathTradeEvent):
            # a bar's path as public trades (real time): resting orders fill as the price passes them
            trade_id = self.engine.next_trade_id(symbol)  # one id sequence with the engine's fills
            if event.bar_volume is not None:
                self._depth_from_volume(symbol, event.bar_volume)
            result = self.engine.on_trade(symbol, event.price, event.quantity)
            self._publish_public_trade(
                symbol,
                MarketTrade(trade_id, event.price, event.quantity, utc_to_ms(event.ts), event.buyer_maker),
            )
        elif isinstance(event, BarEvent) and self.config.realtime:
            # the bar is complete: its trades were printed and made the kline; time may expire GTD orders
            result = self.engine.advance()
        elif isinstance(event, BarEvent):
            self._print_bar(event)
            self._depth_from_volume(symbol, event.volume)
            result = self.engine.on_bar(symbol, event.open, event.high, event.low, event.close, event.volume)
        elif isinstance(event, TradeEvent):
            taker = Side.SELL if event.buyer_maker else Side.BUY
            result = self.engine.on_trade(symbol, event.price, event.quantity, taker_side=taker)
            self._publish_public_trade(
                symbol,
                MarketTrade(event.trade_id, event.price, event.quantity, utc_to_ms(event.ts), event.buyer_maker),
            )
        else:
            assert isinstance(event, BookEvent)
            if event.snapshot:
                result = self.engine.on_book_snapshot(symbol, event.bids, event.asks, update_id=event.last_update_id)
            else:
                result = self.engine.on_book_delta(symbol, event.bids, event.asks, update_id=event.last_update_id)
        self._publish_result(result)
        self._publish_klines(symbol)
        self.sync_book(symbol)

    def _depth_from_volume(self, symbol: str, volume: Decimal) -> None:
        """A replayed bar sizes the synthetic book (``EmulatorConfig.depth_from_volume``): each level holds
        the bar's volume × ``bar_volume_share`` (1 when unset) / the number of levels, in whole lots."""
        if self.config.depth_from_volume:
            self.bar_step.size_book(symbol, volume, default_share=Decimal(1), whole_lots=True)

    def _seed_price(self, symbol: str, price: Decimal) -> None:
        if symbol in self.specs:
            self.engine.on_trade(symbol, price, self.specs[symbol].step_size)

    # --- publishing ---------------------------------------------------------------------------------

    def sync_book(self, symbol: str) -> int:
        """Publish the difference between the last published book and the engine's; return the update id."""
        bids_old, asks_old, uid = self._books[symbol]
        view = self.engine.book(symbol)
        bids_new = {p: q for p, q in view.bids}
        asks_new = {p: q for p, q in view.asks}
        b_diff = _diff(bids_old, bids_new)
        a_diff = _diff(asks_old, asks_new)
        if not b_diff and not a_diff:
            return uid
        uid += 1
        self._books[symbol] = (bids_new, asks_new, uid)
        low = symbol.lower()
        event = {
            "e": "depthUpdate",
            "E": self.market_ms(),
            "s": symbol,
            "U": uid,
            "u": uid,
            "b": [[f8(p), f8(q)] for p, q in b_diff],
            "a": [[f8(p), f8(q)] for p, q in a_diff],
        }
        for name in (f"{low}@depth", f"{low}@depth@100ms", f"{low}@depth@1000ms"):
            self.hub.publish(name, event)
        for stream in self.hub.subscribed():
            match = _PARTIAL_DEPTH.match(stream)
            if match and match.group(1) == low:
                levels = int(match.group(2))
                self.hub.publish(
                    stream,
                    {
                        "lastUpdateId": uid,
                        "bids": [[f8(p), f8(q)] for p, q in view.bids[:levels]],
                        "asks": [[f8(p), f8(q)] for p, q in view.asks[:levels]],
                    },
                )
        book_ticker = f"{low}@bookTicker"
        if self.hub.has_subscribers(book_ticker) and view.bids and view.asks:
            self.hub.publish(book_ticker, _book_ticker_event(symbol, uid, view.bids[0], view.asks[0]))
        return uid

    def _publish_public_trade(self, symbol: str, trade: MarketTrade) -> None:
        self.markets[symbol].on_trade(trade)
        low = symbol.lower()
        event_ms = self.market_ms()
        self.hub.publish(
            f"{low}@trade",
            {
                "e": "trade",
                "E": event_ms,
                "s": symbol,
                "t": trade.trade_id,
                "p": f8(trade.price),
                "q": f8(trade.quantity),
                "T": trade.time_ms,
                "m": trade.buyer_maker,
                "M": True,
            },
        )
        self.hub.publish(
            f"{low}@aggTrade",
            {
                "e": "aggTrade",
                "E": event_ms,
                "s": symbol,
                "a": trade.trade_id,
                "p": f8(trade.price),
                "q": f8(trade.quantity),
                "f": trade.trade_id,
                "l": trade.trade_id,
                "T": trade.time_ms,
                "m": trade.buyer_maker,
                "M": True,
            },
        )

    def _print_bar(self, bar: BarEvent) -> None:
        """A bar replayed whole (data time, driven) as the four public trades of its path (``bar_path``,
        as in real time): they make its kline (trade count, taker volumes), ``/trades`` and ``@trade``, and
        each updates the forming kline on ``@kline_*`` (``x: false``) before the bar's close sends it final.
        Only published: the engine runs the bar itself (``on_bar``). A bar without volume is no trade."""
        symbol = bar.symbol
        if bar.volume <= 0:
            open_ms = utc_to_ms(bar.open_time)
            self.markets[symbol].on_bar(open_ms, bar.interval_s, bar.open, bar.high, bar.low, bar.close, bar.volume)
            return
        for point in bar_path(bar):
            # one id sequence with the engine's fills, except in lock-step: there the engine's fill ids must
            # stay those of the paper venue it equals
            trade_id = next(self._driven_print_ids) if self._driven else self.engine.next_trade_id(symbol)
            at_ms = utc_to_ms(point.ts)
            self._publish_public_trade(
                symbol, MarketTrade(trade_id, point.price, point.quantity, at_ms, point.buyer_maker)
            )
            self._publish_klines(symbol, at_ms)

    def _publish_klines(self, symbol: str, at_ms: int | None = None) -> None:
        """The current kline of every subscribed ``<symbol>@kline_<i>`` stream (as of ``at_ms``, default
        market time); a kline that ended since the stream's last event is first sent once more, final
        (``x: true``), as Binance does."""
        low = symbol.lower()
        prefix = f"{low}@kline_"
        now = self.market_ms() if at_ms is None else at_ms
        for stream in self.hub.subscribed():
            if not stream.startswith(prefix):
                continue
            interval = stream[len(prefix) :]
            try:
                kline = self.markets[symbol].current_kline(interval, now)
            except BinanceError:
                continue
            if kline is None:
                kline = self.markets[symbol].latest_kline(interval)
            if kline is None:
                continue
            sent = self._kline_sent.get(stream)
            if sent is not None and not sent[1] and sent[0] < kline.open_time:
                previous = self.markets[symbol].current_kline(interval, sent[0])
                if previous is not None:
                    self._send_kline(stream, symbol, interval, previous, now)
            self._send_kline(stream, symbol, interval, kline, now)

    def _send_kline(self, stream: str, symbol: str, interval: str, kline: Kline, now: int) -> None:
        kline.closed = kline.close_time < now  # a fresh copy: marks only what is published
        if self._kline_sent.get(stream) == (kline.open_time, True):
            return  # its final event went out already
        self._kline_sent[stream] = (kline.open_time, kline.closed)
        self.hub.publish(stream, {"e": "kline", "E": now, "s": symbol, "k": kline.stream_payload(symbol, interval)})

    def _close_klines(self) -> None:
        """Final events for klines whose interval ended with no later event (no trade since)."""
        now = self.market_ms()
        for stream, (open_ms, closed) in list(self._kline_sent.items()):
            if closed or not self.hub.has_subscribers(stream):
                continue
            low, _, interval = stream.partition("@kline_")
            symbol = low.upper()
            if symbol not in self.markets or open_ms + interval_ms(interval) > now:
                continue
            kline = self.markets[symbol].current_kline(interval, open_ms)
            if kline is not None:
                self._send_kline(stream, symbol, interval, kline, now)

    def _publish_result(self, result: MatchResult, cancel_client_ids: Mapping[int, str] | None = None) -> None:
        event_ms = self.market_ms()
        for update in result.order_updates:
            cancel_id = (cancel_client_ids or {}).get(update.order.order_id)
            seq = next(self._execution_ids)
            report = binance_format.execution_report(update, event_ms, seq, cancel_id)
            self._journal_execution(seq, update)
            self.hub.publish_user(update.order.account, report)
        by_account: dict[str, list[Any]] = {}
        for bal in result.balance_updates:
            by_account.setdefault(bal.account, []).append(bal)
        for account, updates in by_account.items():
            self._account_update_ms[account] = event_ms
            self.hub.publish_user(account, binance_format.account_position(updates, event_ms))
        # public trades: between user orders (engine) and user takers against recorded liquidity
        seen: set[tuple[str, int]] = set()
        for trade in result.public_trades:
            seen.add((trade.symbol, trade.trade_id))
            self._publish_public_trade(
                trade.symbol,
                MarketTrade(trade.trade_id, trade.price, trade.quantity, utc_to_ms(trade.time), trade.is_buyer_maker),
            )
        for fill in result.fills:
            if fill.is_maker or (fill.symbol, fill.trade_id) in seen:
                continue
            seen.add((fill.symbol, fill.trade_id))
            self._publish_public_trade(
                fill.symbol,
                MarketTrade(fill.trade_id, fill.price, fill.quantity, utc_to_ms(fill.time), fill.side is Side.SELL),
            )
        for symbol in {f.symbol for f in result.fills} | {u.order.symbol for u in result.order_updates}:
            if symbol in self.specs:
                self._publish_klines(symbol)
                self.sync_book(symbol)

    def deposit(self, account: str, asset: str, amount: Decimal) -> None:
        """Credit ``amount`` (a deposit): ``balanceUpdate`` + ``outboundAccountPosition`` on the user stream."""
        if account not in self.accounts:
            raise KeyError(account)
        bal = self.engine.ledger.deposit(account, asset, amount)
        now = self.market_ms()
        self.hub.publish_user(account, binance_format.balance_update(asset, amount, now))
        self.hub.publish_user(
            account,
            {
                "e": "outboundAccountPosition",
                "E": now,
                "u": now,
                "B": [{"a": asset, "f": binance_format.f8(bal.free), "l": binance_format.f8(bal.locked)}],
            },
        )

    def _journal_execution(self, seq: int, update: ExecutionReport) -> None:
        order, fill = update.order, update.fill
        journal = self._journal.get(order.account)
        if journal is None:
            return
        journal.append(
            {
                "seq": seq,
                "symbol": order.symbol,
                "client_order_id": order.client_order_id,
                "order_id": order.order_id,
                "execution_type": update.execution.value,
                "status": order.status.value,
                "executed_quantity": plain(order.executed_quantity),
                "trade_id": fill.trade_id if fill is not None else None,
            }
        )

    def executions(self, account: str, after: int = 0) -> list[dict[str, Any]]:
        """The account's executions with a sequence number (``executionReport`` ``I``) above ``after``."""
        newer: list[dict[str, Any]] = []
        for entry in reversed(self._journal.get(account, ())):  # ascending seq: read back from the end
            if entry["seq"] <= after:
                break
            newer.append(entry)
        newer.reverse()
        return newer

    @property
    def last_execution_seq(self) -> int:
        return max((j[-1]["seq"] for j in self._journal.values() if j), default=0)

    def book_update_id(self, symbol: str) -> int:
        """The last update id published on ``symbol``'s depth streams (Binance ``u``/``lastUpdateId``)."""
        return self._books[symbol][2]

    async def drop_websockets(self) -> int:
        return await self.hub.drop_all()

    async def _periodic_tickers(self) -> None:
        """Every ``ticker_interval_s``: 24h tickers and the top of book to their subscribers (Binance
        pushes them each second); in real time also GTD expiry, as time passes between events."""
        while True:
            await asyncio.sleep(self.config.ticker_interval_s)
            if self.config.realtime and not self._driven:
                self.catch_up()
                self._publish_result(self.engine.advance())
            self._close_klines()
            self.publish_tickers()

    def publish_tickers(self) -> None:
        """``<symbol>@ticker``, ``@miniTicker``, ``@bookTicker``, ``!ticker@arr``, ``!miniTicker@arr`` now."""
        streams = self.hub.subscribed()
        if not streams:
            return
        want_all_full = "!ticker@arr" in streams
        want_all_mini = "!miniTicker@arr" in streams
        full_rows: list[dict[str, Any]] = []
        mini_rows: list[dict[str, Any]] = []
        for symbol in self.specs:
            low = symbol.lower()
            names = (f"{low}@ticker", f"{low}@miniTicker", f"{low}@bookTicker")
            if not (want_all_full or want_all_mini or any(n in streams for n in names)):
                continue
            if self.engine.last_price(symbol) is None:
                continue  # nothing traded yet: Binance lists no ticker either
            full, mini = self._ticker_events(symbol)
            if names[0] in streams:
                self.hub.publish(names[0], full)
            if names[1] in streams:
                self.hub.publish(names[1], mini)
            if names[2] in streams:
                view = self.engine.book(symbol, depth=1)
                if view.bids and view.asks:
                    uid = self.sync_book(symbol)
                    self.hub.publish(names[2], _book_ticker_event(symbol, uid, view.bids[0], view.asks[0]))
            full_rows.append(full)
            mini_rows.append(mini)
        if want_all_full and full_rows:
            self.hub.publish("!ticker@arr", full_rows)
        if want_all_mini and mini_rows:
            self.hub.publish("!miniTicker@arr", mini_rows)

    def _ticker_events(self, symbol: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``24hrTicker`` and ``24hrMiniTicker`` stream events of ``symbol`` (web-socket-streams.md)."""
        t = self._ticker(symbol)
        now = int(t["closeTime"])
        full = {
            "e": "24hrTicker",
            "E": now,
            "s": symbol,
            "p": t["priceChange"],
            "P": t["priceChangePercent"],
            "w": t["weightedAvgPrice"],
            "x": t["prevClosePrice"],
            "c": t["lastPrice"],
            "Q": t["lastQty"],
            "b": t["bidPrice"],
            "B": t["bidQty"],
            "a": t["askPrice"],
            "A": t["askQty"],
            "o": t["openPrice"],
            "h": t["highPrice"],
            "l": t["lowPrice"],
            "v": t["volume"],
            "q": t["quoteVolume"],
            "O": t["openTime"],
            "C": now,
            "F": t["firstId"],
            "L": t["lastId"],
            "n": t["count"],
        }
        mini = {"e": "24hrMiniTicker", "E": now, "s": symbol}
        mini |= {k: full[k] for k in ("c", "o", "h", "l", "v", "q")}
        return full, mini

    async def _periodic_drops(self) -> None:
        while True:
            every = self.faults.drop_websockets_every_s
            await asyncio.sleep(every if every else 0.2)
            if every and self.faults.drop_websockets_every_s:
                await self.hub.drop_all()

    # --- HTTP plumbing --------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_emulator"):
            refusal = self._admin_refusal(request)
            if refusal is not None:
                return refusal
            return await handler(request)
        if self.faults.latency_ms > 0:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if is_ws:
            return await self._handle(request, handler)
        response = await self._handle(request, handler)
        if self.limiter.weight_header not in response.headers and not response.prepared:
            # every REST answer says how much weight the IP used (also refusals that charged nothing)
            used = self.limiter.used_weight(request.remote or "", self._wall_ms())
            response.headers[self.limiter.weight_header] = str(used)
        return response

    def _admin_refusal(self, request: web.Request) -> web.Response | None:
        """Why an admin request is refused (``None``: it may run). Nothing is read or applied before this.

        The token header also stops cross-site requests: a browser sends a custom header only after a CORS
        preflight, which the emulator never grants. A POST must be JSON (a form or ``text/plain`` body is
        what a page can send without a preflight)."""
        given = request.headers.get(ADMIN_TOKEN_HEADER)
        if not given:
            return _admin_error(401, "admin_token_missing", f"the {ADMIN_TOKEN_HEADER} header is required")
        if not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), self.admin_token.encode("utf-8", "surrogateescape")
        ):
            return _admin_error(403, "admin_token_invalid", f"the {ADMIN_TOKEN_HEADER} header is not this emulator's")
        if request.method not in ("GET", "HEAD", "OPTIONS") and request.content_type != "application/json":
            return _admin_error(
                415, "admin_body_not_json", "admin requests send a JSON body (Content-Type: application/json)"
            )
        return None

    async def _handle(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if not is_ws:
            if self.faults.take("ban_next"):
                until = self.server_ms() + self.faults.retry_after_s * 1000
                return _error_response(errors.ip_banned(until), {"Retry-After": str(self.faults.retry_after_s)})
            if self.faults.take("rate_limit_next"):
                return _error_response(errors.too_many_requests(), {"Retry-After": str(self.faults.retry_after_s)})
            if self.faults.take("fail_next"):
                err = errors.internal_error()
                err.status = self.faults.fail_status
                return _error_response(err)
        try:
            return await handler(request)
        except BinanceError as exc:
            return _error_response(exc, exc.headers)
        except web.HTTPNotFound:
            return _error_response(errors.unknown_endpoint())
        except web.HTTPMethodNotAllowed:
            return _error_response(errors.unknown_endpoint())

    def _routes(self, app: web.Application) -> None:
        r = app.router
        public: list[tuple[str, str, Handler]] = [
            ("GET", "/api/v3/ping", self.h_ping),
            ("GET", "/api/v3/time", self.h_time),
            ("GET", "/api/v3/exchangeInfo", self.h_exchange_info),
            ("GET", "/api/v3/depth", self.h_depth),
            ("GET", "/api/v3/trades", self.h_trades),
            ("GET", "/api/v3/historicalTrades", self.h_trades),
            ("GET", "/api/v3/aggTrades", self.h_agg_trades),
            ("GET", "/api/v3/klines", self.h_klines),
            ("GET", "/api/v3/uiKlines", self.h_klines),
            ("GET", "/api/v3/ticker/24hr", self.h_ticker_24hr),
            ("GET", "/api/v3/ticker/price", self.h_ticker_price),
            ("GET", "/api/v3/ticker/bookTicker", self.h_book_ticker),
            ("GET", "/api/v3/avgPrice", self.h_avg_price),
        ]
        signed: list[tuple[str, str, Handler]] = [
            ("POST", "/api/v3/order", self.h_new_order),
            ("POST", "/api/v3/order/test", self.h_test_order),
            ("DELETE", "/api/v3/order", self.h_cancel_order),
            ("GET", "/api/v3/order", self.h_query_order),
            ("POST", "/api/v3/order/cancelReplace", self.h_cancel_replace),
            ("GET", "/api/v3/openOrders", self.h_open_orders),
            ("DELETE", "/api/v3/openOrders", self.h_cancel_all),
            ("GET", "/api/v3/allOrders", self.h_all_orders),
            ("GET", "/api/v3/myTrades", self.h_my_trades),
            ("GET", "/api/v3/account", self.h_account),
            ("GET", "/api/v3/account/commission", self.h_commission),
            ("GET", "/sapi/v1/asset/tradeFee", self.h_trade_fee),
            ("GET", "/sapi/v1/capital/config/getall", self.h_capital_config),
            ("GET", "/sapi/v1/margin/allPairs", self.h_no_margin),
            ("GET", "/sapi/v1/margin/isolated/allPairs", self.h_no_margin),
        ]
        key_only: list[tuple[str, str, Handler]] = [
            ("POST", "/api/v3/userDataStream", self.h_listen_key_new),
            ("PUT", "/api/v3/userDataStream", self.h_listen_key_keepalive),
            ("DELETE", "/api/v3/userDataStream", self.h_listen_key_close),
        ]
        for method, path, fn in public:
            r.add_route(method, path, self._wrap(fn, "none"))
        for method, path, fn in signed:
            r.add_route(method, path, self._wrap(fn, "signed"))
        for method, path, fn in key_only:
            r.add_route(method, path, self._wrap(fn, "key"))
        r.add_get("/ws", self.ws_market)
        r.add_get("/ws/{rest:.*}", self.ws_market)
        r.add_get("/stream", self.ws_market)
        r.add_get("/ws-api/v3", self.ws_api)
        r.add_get("/_emulator/faults", self.admin_get_faults)
        r.add_post("/_emulator/faults", self.admin_set_faults)
        r.add_post("/_emulator/step", self.admin_step)
        r.add_get("/_emulator/state", self.admin_state)
        r.add_post("/_emulator/deposit", self.admin_deposit)
        r.add_post("/_emulator/fees", self.admin_fees)
        r.add_post("/_emulator/market/open", self.admin_market_open)
        r.add_post("/_emulator/market/bar", self.admin_market_bar)
        r.add_get("/_emulator/executions", self.admin_executions)

    def _wall_ms(self) -> int:
        return utc_to_ms(self.config.clock())

    def _wrap(self, fn: Handler, security: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            self.catch_up()
            raw_query = request.rel_url.raw_query_string
            raw_body = await request.text() if request.can_read_body else ""
            params: Params = dict(parse_qsl(raw_query, keep_blank_values=True))
            if raw_body:
                params.update(dict(parse_qsl(raw_body, keep_blank_values=True)))
            # Limits run on the wall clock; a lock-step driven market has its own time: not enforced there.
            enforce = not self._driven
            headers = self.limiter.admit(
                request.remote or "",
                request_weight(request.method, request.path, params),
                self._wall_ms(),
                enforce=enforce,
            )
            try:
                account: EmulatorAccount | None = None
                if security in ("signed", "key"):
                    account = self._account_for_key(request.headers.get("X-MBX-APIKEY"))
                if security == "signed":
                    assert account is not None
                    auth.check_timing(params.get("timestamp"), params.get("recvWindow"), self.server_ms())
                    payload, signature = auth.signed_payload(raw_query, raw_body)
                    auth.check_signature(payload, signature, account.api_secret)
                if request.method == "POST" and request.path in ORDER_PATHS:
                    assert account is not None
                    headers |= self.limiter.count_order(account.name, self._wall_ms(), enforce=enforce)
                lose = (
                    request.method == "POST"
                    and request.path in ORDER_PATHS
                    and self.faults.take("lose_next_order_response")
                )
                body = await fn(request, params, account)
            except BinanceError as exc:
                exc.headers = {**headers, **exc.headers}
                raise
            if lose:
                await self._lose_response(request)
            return web.Response(
                text=json.dumps(body, separators=(",", ":")), content_type="application/json", headers=headers
            )

        return handler

    async def _lose_response(self, request: web.Request) -> None:
        if self.faults.lost_response_mode == "hang":
            await asyncio.sleep(self.faults.hang_s)
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError  # nothing is written: the client sees the connection die

    def _account_for_key(self, api_key: str | None) -> EmulatorAccount:
        key = auth.check_api_key_format(api_key)
        account = self.accounts_by_key.get(key)
        if account is None:
            raise errors.rejected_api_key()
        return account

    def _spec(self, params: Params) -> SymbolSpec:
        symbol = _required(params, "symbol").upper()
        spec = self.specs.get(symbol)
        if spec is None:
            raise errors.bad_symbol()
        return spec

    # --- public endpoints -------------------------------------------------------------------------------

    async def h_ping(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        return {}

    async def h_time(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        return {"serverTime": self.server_ms()}

    async def h_exchange_info(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        wanted = _symbol_list(params)
        if wanted is not None:
            for s in wanted:
                if s not in self.specs:
                    raise errors.bad_symbol()
        return {
            "timezone": "UTC",
            "serverTime": self.server_ms(),
            "rateLimits": self.config.rate_limits.exchange_info(),
            "exchangeFilters": [],
            "symbols": [spec.exchange_info() for s, spec in self.specs.items() if wanted is None or s in wanted],
        }

    async def h_depth(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = self._spec(params)
        limit = min(_int(params, "limit", 100), 5000)
        uid = self.sync_book(spec.symbol)
        view = self.engine.book(spec.symbol, depth=limit)
        return {
            "lastUpdateId": uid,
            "bids": [[f8(p), f8(q)] for p, q in view.bids],
            "asks": [[f8(p), f8(q)] for p, q in view.asks],
        }

    async def h_trades(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = self._spec(params)
        limit = min(_int(params, "limit", 500), 1000)
        trades = list(self.markets[spec.symbol].trades)
        from_id = params.get("fromId")
        if from_id:
            trades = [t for t in trades if t.trade_id >= int(from_id)][:limit]
        else:
            trades = trades[-limit:] if limit > 0 else []
        return [t.rest() for t in trades]

    async def h_agg_trades(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """``/api/v3/aggTrades``: fromId, or a startTime/endTime window (inclusive), oldest first."""
        spec = self._spec(params)
        limit = min(_int(params, "limit", 500), 1000)
        trades = list(self.markets[spec.symbol].trades)
        from_id = params.get("fromId")
        start = _opt_int(params, "startTime")
        end = _opt_int(params, "endTime")
        if from_id:
            trades = [t for t in trades if t.trade_id >= int(from_id)]
        if start is not None:
            trades = [t for t in trades if t.time_ms >= start]
        if end is not None:
            trades = [t for t in trades if t.time_ms <= end]
        # With a lower bound: the oldest `limit` from it; without one: the most recent `limit`.
        bounded = bool(from_id) or start is not None
        selected = trades[:limit] if bounded else trades[-limit:] if limit > 0 else []
        return [t.agg() for t in selected]

    async def h_klines(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = self._spec(params)
        interval = _required(params, "interval")
        interval_ms(interval)
        limit = min(_int(params, "limit", 500), 1000)
        start = _opt_int(params, "startTime")
        end = _opt_int(params, "endTime")
        rows = self.markets[spec.symbol].klines(interval, start, end, limit)
        return [k.rest_row() for k in rows]

    def _ticker(self, symbol: str) -> dict[str, Any]:
        now = self.market_ms()
        o, h, lo, vol, qvol, count, open_time = self.markets[symbol].stats_24h(now)
        view = self.engine.book(symbol, depth=1)
        last = self.engine.last_price(symbol) or Decimal(0)
        trades = self.markets[symbol].trades
        first_id = -1
        last_id = -1
        if trades:
            first_id, last_id = trades[0].trade_id, trades[-1].trade_id
        open_price = o if o is not None else last
        change = last - open_price
        pct = (change / open_price * 100) if open_price else Decimal(0)
        return {
            "symbol": symbol,
            "priceChange": binance_format.f8(change),
            "priceChangePercent": f"{pct:.3f}",
            "weightedAvgPrice": binance_format.f8(qvol / vol if vol else last),
            "prevClosePrice": binance_format.f8(open_price),
            "lastPrice": binance_format.f8(last),
            "lastQty": binance_format.f8(trades[-1].quantity if trades else Decimal(0)),
            "bidPrice": binance_format.f8(view.bids[0][0] if view.bids else Decimal(0)),
            "bidQty": binance_format.f8(view.bids[0][1] if view.bids else Decimal(0)),
            "askPrice": binance_format.f8(view.asks[0][0] if view.asks else Decimal(0)),
            "askQty": binance_format.f8(view.asks[0][1] if view.asks else Decimal(0)),
            "openPrice": binance_format.f8(open_price),
            "highPrice": binance_format.f8(h if h is not None else last),
            "lowPrice": binance_format.f8(lo if lo is not None else last),
            "volume": binance_format.f8(vol),
            "quoteVolume": binance_format.f8(qvol),
            "openTime": open_time,
            "closeTime": now,
            "firstId": first_id,
            "lastId": last_id,
            "count": count,
        }

    def _symbols_param(self, params: Params) -> tuple[list[str], bool]:
        """The symbols asked for and whether the answer is a single object (``symbol=``)."""
        if params.get("symbol"):
            return [self._spec(params).symbol], True
        wanted = _symbol_list(params)
        if wanted is None:
            return list(self.specs), False
        for s in wanted:
            if s not in self.specs:
                raise errors.bad_symbol()
        return wanted, False

    async def h_ticker_24hr(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        symbols, single = self._symbols_param(params)
        kind = (params.get("type") or "FULL").upper()
        if kind not in ("FULL", "MINI"):
            raise errors.invalid_parameter("type")
        rows = [self._ticker(s) for s in symbols]
        if kind == "MINI":
            mini = [
                *("symbol", "openPrice", "highPrice", "lowPrice", "lastPrice", "volume", "quoteVolume"),
                *("openTime", "closeTime", "firstId", "lastId", "count"),
            ]
            rows = [{k: row[k] for k in mini} for row in rows]
        return rows[0] if single else rows

    async def h_ticker_price(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        symbols, single = self._symbols_param(params)
        rows = [{"symbol": s, "price": binance_format.f8(self.engine.last_price(s) or Decimal(0))} for s in symbols]
        return rows[0] if single else rows

    async def h_book_ticker(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        symbols, single = self._symbols_param(params)
        rows = []
        for s in symbols:
            view = self.engine.book(s, depth=1)
            rows.append(
                {
                    "symbol": s,
                    "bidPrice": binance_format.f8(view.bids[0][0] if view.bids else Decimal(0)),
                    "bidQty": binance_format.f8(view.bids[0][1] if view.bids else Decimal(0)),
                    "askPrice": binance_format.f8(view.asks[0][0] if view.asks else Decimal(0)),
                    "askQty": binance_format.f8(view.asks[0][1] if view.asks else Decimal(0)),
                }
            )
        return rows[0] if single else rows

    async def h_avg_price(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = self._spec(params)
        rows = self.markets[spec.symbol].klines("1m", limit=5)
        vol = sum((k.volume for k in rows), Decimal(0))
        qvol = sum((k.quote_volume for k in rows), Decimal(0))
        price = qvol / vol if vol else (self.engine.last_price(spec.symbol) or Decimal(0))
        return {"mins": 5, "price": binance_format.f8(price), "closeTime": self.market_ms()}

    # --- trading endpoints ---------------------------------------------------------------------------

    def _new_order(self, params: Params, account: EmulatorAccount, prefix: str = "") -> NewOrder:
        """A ``NewOrder`` from Binance parameters; ``prefix`` is unused (cancelReplace shares names)."""
        spec = self._spec(params)
        side_text = _required(params, "side").upper()
        if side_text not in ("BUY", "SELL"):
            raise errors.invalid_side()
        type_text = _required(params, "type").upper()
        try:
            order_type = EngineOrderType(type_text)
        except ValueError:
            raise errors.invalid_order_type() from None
        quantity = _decimal(params, "quantity", spec.base_precision)
        quote_qty = _decimal(params, "quoteOrderQty", spec.quote_precision)
        price = _decimal(params, "price", spec.quote_precision)
        stop_price = _decimal(params, "stopPrice", spec.quote_precision)
        iceberg = _decimal(params, "icebergQty", spec.base_precision)
        if iceberg is not None and quantity is not None and iceberg >= quantity:
            raise errors.iceberg_exceeds_quantity()
        trailing = _opt_int(params, "trailingDelta")
        tif_text = params.get("timeInForce")
        tif = EngineTimeInForce.GTC
        expire_at: datetime | None = None
        if tif_text:
            if tif_text not in ("GTC", "IOC", "FOK", "GTD"):
                raise errors.invalid_tif()
            tif = EngineTimeInForce(tif_text)
        if tif is EngineTimeInForce.GTD:  # the extension (module docstring): Binance futures' parameter
            good_till = _opt_int(params, "goodTillDate")
            if good_till is None:
                raise errors.mandatory_param("goodTillDate")
            expire_at = datetime.fromtimestamp(good_till / 1000, UTC)
        # mandatory parameters per type (rest-api.md, "New order" → "Other info")
        if order_type is EngineOrderType.MARKET:
            if quantity is None and quote_qty is None:
                raise BinanceError(-1102, "Param 'quantity' or 'quoteOrderQty' must be sent, but both were empty/null!")
        else:
            if quantity is None:
                raise errors.mandatory_param("quantity")
        if order_type.is_limit_priced and price is None:
            raise errors.mandatory_param("price")
        needs_tif = (EngineOrderType.LIMIT, EngineOrderType.STOP_LOSS_LIMIT, EngineOrderType.TAKE_PROFIT_LIMIT)
        if order_type in needs_tif and not tif_text:
            raise errors.mandatory_param("timeInForce")
        if order_type.is_conditional and stop_price is None and trailing is None:
            raise BinanceError(-1102, "Param 'stopPrice' or 'trailingDelta' must be sent, but both were empty/null!")
        stp_text = params.get("selfTradePreventionMode") or "NONE"  # the symbol's default (exchangeInfo)
        try:
            stp = SelfTradePrevention(stp_text)
        except ValueError:
            raise errors.invalid_parameter("selfTradePreventionMode") from None
        client_id = params.get("newClientOrderId") or self._client_order_id()
        return NewOrder(
            account=account.name,
            symbol=spec.symbol,
            side=Side.BUY if side_text == "BUY" else Side.SELL,
            type=order_type,
            quantity=quantity,
            quote_quantity=quote_qty,
            price=price,
            stop_price=stop_price,
            trailing_delta_bps=trailing,
            iceberg_quantity=iceberg,
            time_in_force=tif,
            client_order_id=client_id,
            expire_at=expire_at,
            self_trade_prevention=stp,
        )

    def _refuse_market_on_empty_book(self, new: NewOrder) -> None:
        """Binance refuses a market order with nothing on the other side (-2010) rather than expiring it."""
        if new.type is not EngineOrderType.MARKET:
            return
        view = self.engine.book(new.symbol, depth=1)
        if not (view.asks if new.side is Side.BUY else view.bids):
            raise errors.no_liquidity()

    def _client_order_id(self) -> str:
        return "emu" + secrets.token_hex(8) + str(next(self._client_ids))

    def _resp_type(self, params: Params, order_type: str) -> str:
        resp = (params.get("newOrderRespType") or binance_format.default_resp_type(order_type)).upper()
        if resp not in ("ACK", "RESULT", "FULL"):
            raise errors.invalid_parameter("newOrderRespType")
        return resp

    async def h_new_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        new = self._new_order(params, account)
        resp_type = self._resp_type(params, new.type.value)
        self._refuse_market_on_empty_book(new)
        try:
            result = self.engine.submit(new)
        except EngineRejection as exc:
            raise _map_rejection(exc, "new") from None
        self._publish_result(result)
        order = _order_of(result, new.client_order_id)
        return binance_format.order_response(order, result.fills, resp_type)

    async def h_test_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        self._new_order(params, account)
        if params.get("computeCommissionRates", "").lower() == "true":
            f8 = binance_format.f8
            return {
                "standardCommissionForOrder": {"maker": f8(self.config.maker_fee), "taker": f8(self.config.taker_fee)},
                "specialCommissionForOrder": {"maker": f8(Decimal(0)), "taker": f8(Decimal(0))},
                "taxCommissionForOrder": {"maker": f8(Decimal(0)), "taker": f8(Decimal(0))},
                "discount": {
                    "enabledForAccount": False,
                    "enabledForSymbol": False,
                    "discountAsset": "BNB",
                    "discount": f8(Decimal(0)),
                },
            }
        return {}

    def _order_ref(self, params: Params, id_name: str, client_name: str) -> tuple[int | None, str | None]:
        order_id = _opt_int(params, id_name)
        client_id = params.get(client_name) or None
        if order_id is None and client_id is None:
            raise BinanceError(-1102, f"Param '{client_name}' or '{id_name}' must be sent, but both were empty/null!")
        return order_id, client_id

    async def h_cancel_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = self._spec(params)
        order_id, client_id = self._order_ref(params, "orderId", "origClientOrderId")
        cancel_id = params.get("newClientOrderId") or self._client_order_id()
        try:
            result = self.engine.cancel(account.name, spec.symbol, order_id=order_id, client_order_id=client_id)
        except EngineRejection as exc:
            raise _map_rejection(exc, "cancel") from None
        order = result.order
        if order is None:
            raise errors.cancel_rejected()
        self._publish_result(result, {order.order_id: cancel_id})
        return binance_format.cancel_response(order, cancel_id, self.market_now())

    async def h_cancel_all(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = self._spec(params)
        if not self.engine.open_orders(account.name, spec.symbol):
            raise errors.cancel_rejected()
        result = self.engine.cancel_all(account.name, spec.symbol)
        cancel_ids = {
            u.order.order_id: self._client_order_id()
            for u in result.order_updates
            if u.execution is ExecutionType.CANCELED
        }
        self._publish_result(result, cancel_ids)
        now = self.market_now()
        return [
            binance_format.cancel_response(u.order, cancel_ids[u.order.order_id], now)
            for u in result.order_updates
            if u.execution is ExecutionType.CANCELED
        ]

    async def h_query_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = self._spec(params)
        order_id, client_id = self._order_ref(params, "orderId", "origClientOrderId")
        try:
            order = self.engine.get_order(account.name, spec.symbol, order_id=order_id, client_order_id=client_id)
        except EngineRejection:
            raise errors.no_such_order() from None
        return binance_format.order_query(order)

    async def h_cancel_replace(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = self._spec(params)
        mode = _required(params, "cancelReplaceMode").upper()
        if mode not in ("STOP_ON_FAILURE", "ALLOW_FAILURE"):
            raise errors.invalid_parameter("cancelReplaceMode")
        cancel_order_id, cancel_client_id = self._order_ref(params, "cancelOrderId", "cancelOrigClientOrderId")
        new = self._new_order(params, account)
        resp_type = self._resp_type(params, new.type.value)
        cancel_new_id = params.get("cancelNewClientOrderId") or self._client_order_id()
        now = self.market_now()
        try:
            result = self.engine.cancel_replace(
                account.name,
                spec.symbol,
                new,
                cancel_order_id=cancel_order_id,
                cancel_client_order_id=cancel_client_id,
            )
        except CancelReplacePartialFailureError as exc:
            cancelled = exc.cancel_result.order
            self._publish_result(exc.cancel_result, {cancelled.order_id: cancel_new_id} if cancelled else None)
            new_err = _map_rejection(exc, "new")
            raise BinanceError(
                -2021,
                "Order cancel-replace partially failed.",
                409,
                {
                    "cancelResult": "SUCCESS",
                    "newOrderResult": "FAILURE",
                    "cancelResponse": binance_format.cancel_response(cancelled, cancel_new_id, now)
                    if cancelled
                    else None,
                    "newOrderResponse": {"code": new_err.code, "msg": new_err.msg},
                },
            ) from None
        except EngineRejection as exc:
            if exc.reject_reason is not RejectReason.UNKNOWN_ORDER:
                # the new order failed its checks before anything changed (filters are evaluated first)
                raise _map_rejection(exc, "new") from None
            cancel_err = errors.cancel_rejected()
            if mode == "STOP_ON_FAILURE":
                raise BinanceError(
                    -2022,
                    "Order cancel-replace failed.",
                    400,
                    {
                        "cancelResult": "FAILURE",
                        "newOrderResult": "NOT_ATTEMPTED",
                        "cancelResponse": cancel_err.body(),
                        "newOrderResponse": None,
                    },
                ) from None
            try:
                placed = self.engine.submit(new)
            except EngineRejection as exc2:
                new_err = _map_rejection(exc2, "new")
                raise BinanceError(
                    -2022,
                    "Order cancel-replace failed.",
                    400,
                    {
                        "cancelResult": "FAILURE",
                        "newOrderResult": "FAILURE",
                        "cancelResponse": cancel_err.body(),
                        "newOrderResponse": {"code": new_err.code, "msg": new_err.msg},
                    },
                ) from None
            self._publish_result(placed)
            order = _order_of(placed, new.client_order_id)
            raise BinanceError(
                -2021,
                "Order cancel-replace partially failed.",
                409,
                {
                    "cancelResult": "FAILURE",
                    "newOrderResult": "SUCCESS",
                    "cancelResponse": cancel_err.body(),
                    "newOrderResponse": binance_format.order_response(order, placed.fills, resp_type),
                },
            ) from None
        cancelled_order = next((u.order for u in result.order_updates if u.execution is ExecutionType.CANCELED), None)
        self._publish_result(result, {cancelled_order.order_id: cancel_new_id} if cancelled_order else None)
        new_order = _order_of(result, new.client_order_id)
        return {
            "cancelResult": "SUCCESS",
            "newOrderResult": "SUCCESS",
            "cancelResponse": binance_format.cancel_response(cancelled_order, cancel_new_id, now)
            if cancelled_order
            else None,
            "newOrderResponse": binance_format.order_response(new_order, result.fills, resp_type),
        }

    async def h_open_orders(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        symbol = None
        if params.get("symbol"):
            symbol = self._spec(params).symbol
        return [binance_format.order_query(o) for o in self.engine.open_orders(account.name, symbol)]

    async def h_all_orders(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = self._spec(params)
        orders = self.engine.all_orders(account.name, spec.symbol)
        from_id = _opt_int(params, "orderId")
        start = _opt_int(params, "startTime")
        end = _opt_int(params, "endTime")
        limit = min(_int(params, "limit", 500), 1000)
        if from_id is not None:
            orders = [o for o in orders if o.order_id >= from_id]
        if start is not None:
            orders = [o for o in orders if utc_to_ms(o.time) >= start]
        if end is not None:
            orders = [o for o in orders if utc_to_ms(o.time) <= end]
        orders = orders[:limit] if (from_id is not None or start is not None) else orders[-limit:]
        return [binance_format.order_query(o) for o in orders]

    async def h_my_trades(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = self._spec(params)
        fills = self.engine.account_trades(account.name, spec.symbol)
        order_id = _opt_int(params, "orderId")
        from_id = _opt_int(params, "fromId")
        start = _opt_int(params, "startTime")
        end = _opt_int(params, "endTime")
        limit = min(_int(params, "limit", 500), 1000)
        if order_id is not None:
            fills = [f for f in fills if f.order_id == order_id]
        if from_id is not None:
            fills = [f for f in fills if f.trade_id >= from_id]
        if start is not None:
            fills = [f for f in fills if utc_to_ms(f.time) >= start]
        if end is not None:
            fills = [f for f in fills if utc_to_ms(f.time) <= end]
        fills = fills[:limit] if (from_id is not None or start is not None) else fills[-limit:]
        return [binance_format.my_trade(f) for f in fills]

    async def h_account(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        balances = self.engine.ledger.balances(account.name)
        if params.get("omitZeroBalances", "").lower() == "true":
            balances = {a: b for a, b in balances.items() if b.free or b.locked}
        uid = list(self.accounts).index(account.name) + 1
        update_ms = self._account_update_ms.get(account.name, 0)
        fees = self.engine.fees(account.name)
        return binance_format.account(balances, fees.maker, fees.taker, update_ms, uid)

    async def h_commission(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = self._spec(params)
        f8 = binance_format.f8
        zero = f8(Decimal(0))
        fees = self.engine.fees(account.name)
        return {
            "symbol": spec.symbol,
            "standardCommission": {
                "maker": f8(fees.maker),
                "taker": f8(fees.taker),
                "buyer": zero,
                "seller": zero,
            },
            "specialCommission": {"maker": zero, "taker": zero, "buyer": zero, "seller": zero},
            "taxCommission": {"maker": zero, "taker": zero, "buyer": zero, "seller": zero},
            "discount": {
                "enabledForAccount": False,
                "enabledForSymbol": False,
                "discountAsset": "BNB",
                "discount": zero,
            },
        }

    async def h_trade_fee(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """``/sapi/v1/asset/tradeFee`` (ccxt ``fetch_trading_fees``): the account's rates per symbol (``symbol``:
        that one), written as Binance does (``"0.001"``, not 8 decimals)."""
        assert account is not None
        symbols = [self._spec(params).symbol] if params.get("symbol") else list(self.specs)
        fees = self.engine.fees(account.name)
        maker, taker = plain(fees.maker.normalize()), plain(fees.taker.normalize())
        return [{"symbol": s, "makerCommission": maker, "takerCommission": taker} for s in symbols]

    async def h_capital_config(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """``/sapi/v1/capital/config/getall`` (ccxt ``fetchCurrencies`` calls it when it has keys)."""
        assert account is not None
        assets: set[str] = set()
        for spec in self.specs.values():
            assets |= {spec.base, spec.quote}
        balances = self.engine.ledger.balances(account.name)
        assets |= set(balances)
        out = []
        for asset in sorted(assets):
            bal = balances.get(asset)
            free = bal.free if bal else Decimal(0)
            locked = bal.locked if bal else Decimal(0)
            out.append(
                {
                    "coin": asset,
                    "name": asset,
                    "depositAllEnable": True,
                    "withdrawAllEnable": True,
                    "free": binance_format.f8(free),
                    "locked": binance_format.f8(locked),
                    "freeze": "0",
                    "withdrawing": "0",
                    "ipoing": "0",
                    "ipoable": "0",
                    "storage": "0",
                    "isLegalMoney": False,
                    "trading": True,
                    "networkList": [
                        {
                            "network": asset,
                            "coin": asset,
                            "withdrawIntegerMultiple": "0.00000001",
                            "isDefault": True,
                            "depositEnable": True,
                            "withdrawEnable": True,
                            "depositDesc": "",
                            "withdrawDesc": "",
                            "specialTips": "",
                            "name": asset,
                            "resetAddressStatus": False,
                            "addressRegex": "",
                            "memoRegex": "",
                            "withdrawFee": "0",
                            "withdrawMin": "0",
                            "withdrawMax": "9999999999",
                            "minConfirm": 1,
                            "unLockConfirm": 0,
                            "sameAddress": False,
                            "estimatedArrivalTime": 1,
                            "busy": False,
                        }
                    ],
                }
            )
        return out

    async def h_no_margin(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """Margin pair lists (ccxt asks with ``fetchMargins``): the emulator trades spot only."""
        return []

    # --- listenKey user data stream (legacy, still used by some clients) ----------------------------

    async def h_listen_key_new(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        for key, name in self._listen_keys.items():
            if name == account.name:
                return {"listenKey": key}
        key = secrets.token_urlsafe(45)[:60]
        self._listen_keys[key] = account.name
        return {"listenKey": key}

    async def h_listen_key_keepalive(
        self, request: web.Request, params: Params, account: EmulatorAccount | None
    ) -> Any:
        self._own_listen_key(params, account)
        return {}

    async def h_listen_key_close(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        self._listen_keys.pop(self._own_listen_key(params, account))
        return {}

    def _own_listen_key(self, params: Params, account: EmulatorAccount | None) -> str:
        """The request's listenKey if it belongs to the calling account. Another account's key is answered
        as Binance answers it, as if it did not exist (-1125): nothing tells a caller whose it is."""
        assert account is not None
        key = _required(params, "listenKey")
        if self._listen_keys.get(key) != account.name:
            raise errors.invalid_listen_key()
        return key

    # --- WebSocket: market streams -------------------------------------------------------------------

    async def ws_market(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20, autoping=True)
        await ws.prepare(request)
        rest = request.match_info.get("rest", "")
        combined = request.path.startswith("/stream")
        conn = Connection(ws=ws, kind="combined" if combined else "raw")
        if combined:
            streams = request.query.get("streams", "")
            conn.streams |= {s for s in streams.split("/") if s}
        elif rest:
            if rest in self._listen_keys:
                conn.kind = "listenkey"
                conn.listen_account = self._listen_keys[rest]
            else:
                conn.streams |= {s for s in rest.split("/") if "@" in s}
        self.hub.add(conn)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                self._market_request(conn, msg.data)
        finally:
            await self.hub.remove(conn)
        return ws

    def _market_request(self, conn: Connection, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            conn.send({"error": {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}, "id": None})
            return
        if not isinstance(req, dict):
            conn.send({"error": {"code": 3, "msg": "Invalid JSON: expected an object"}, "id": None})
            return
        method = req.get("method")
        req_id = req.get("id")
        args = req.get("params") or []
        if method == "SUBSCRIBE" or method == "UNSUBSCRIBE":
            if not isinstance(args, list) or not all(isinstance(s, str) for s in args):
                conn.send({"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": req_id})
                return
            if method == "SUBSCRIBE":
                conn.streams |= set(args)
            else:
                conn.streams -= set(args)
            conn.send({"result": None, "id": req_id})
        elif method == "LIST_SUBSCRIPTIONS":
            conn.send({"result": sorted(conn.streams), "id": req_id})
        elif method == "SET_PROPERTY":
            conn.send({"result": None, "id": req_id})
        elif method == "GET_PROPERTY":
            conn.send({"result": conn.kind == "combined", "id": req_id})
        else:
            conn.send({"error": {"code": 2, "msg": f"Invalid request: unknown method {method}"}, "id": req_id})

    # --- WebSocket API (user data stream subscription) ---------------------------------------------

    async def ws_api(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20, autoping=True)
        await ws.prepare(request)
        conn = Connection(ws=ws, kind="wsapi")
        self.hub.add(conn)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                if self.faults.latency_ms > 0:
                    await asyncio.sleep(self.faults.latency_ms / 1000)
                self._api_request(conn, msg.data)
        finally:
            await self.hub.remove(conn)
        return ws

    def _api_request(self, conn: Connection, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            conn.send({"id": None, "status": 400, "error": {"code": -1135, "msg": "Invalid JSON Request"}})
            return
        req_id = req.get("id") if isinstance(req, dict) else None
        try:
            if not isinstance(req, dict):
                raise BinanceError(-1135, "Invalid JSON Request")
            result = self._api_call(conn, str(req.get("method")), req.get("params") or {})
        except BinanceError as exc:
            conn.send({"id": req_id, "status": exc.status, "error": {"code": exc.code, "msg": exc.msg}})
            return
        conn.send({"id": req_id, "status": 200, "result": result, "rateLimits": []})

    def _api_call(self, conn: Connection, method: str, params: Any) -> Any:
        if not isinstance(params, dict):
            raise BinanceError(-1130, "Data sent for parameter 'params' is not valid.")
        if method == "ping":
            return {}
        if method == "time":
            return {"serverTime": self.server_ms()}
        if method == "userDataStream.subscribe.signature":
            account = self._account_for_key(params.get("apiKey"))
            ts = params.get("timestamp")
            recv = params.get("recvWindow")
            auth.check_timing(None if ts is None else str(ts), None if recv is None else str(recv), self.server_ms())
            auth.check_signature(auth.ws_payload(params), params.get("signature"), account.api_secret)
            if account.name in conn.user_subscriptions.values():
                raise BinanceError(-2035, "User Data Stream subscription already active.")
            sub_id = conn.next_subscription_id
            conn.next_subscription_id += 1
            conn.user_subscriptions[sub_id] = account.name
            return {"subscriptionId": sub_id}
        if method == "userDataStream.unsubscribe":
            sub = params.get("subscriptionId")
            if sub is None:
                conn.user_subscriptions.clear()
            else:
                if int(sub) not in conn.user_subscriptions:
                    raise BinanceError(-2036, "User Data Stream subscription not active.")
                conn.user_subscriptions.pop(int(sub))
            return {}
        if method == "session.subscriptions":
            return [{"subscriptionId": s} for s in sorted(conn.user_subscriptions)]
        raise BinanceError(-1020, "This operation is not supported.")

    # --- admin (fault knobs, replay control) -------------------------------------------------------

    async def admin_get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.faults.as_dict())

    async def admin_set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("expected a JSON object")
            drop = bool(body.pop("drop_websockets", False))
            if body.pop("reset", False):
                self.faults.reset()
            self.faults.update(body)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": f"bad fault settings: {exc}"}, status=400)
        dropped = await self.hub.drop_all() if drop else 0
        return web.json_response({**self.faults.as_dict(), "dropped": dropped})

    async def admin_step(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        n = int(body.get("n", 1)) if isinstance(body, dict) else 1
        done = await self.step(n)
        return web.json_response({"applied": done, "events_left": self.events_left})

    async def admin_state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "market_time": self.market_now().isoformat(),
                "server_time_ms": self.server_ms(),
                "events_total": len(self.events),
                "events_left": self.events_left,
                "connections": len(self.hub.connections),
                "symbols": list(self.specs),
                "accounts": list(self.accounts),
                "market_time_ms": self.market_ms(),
                "driven": self._driven,
                "realtime": self.config.realtime,
                "speed": self.config.speed,
                "last_execution_seq": self.last_execution_seq,
                "user_subscriptions": self.user_subscriptions(),
            }
        )

    def user_subscriptions(self) -> dict[str, int]:
        """Live user-data subscriptions per account (WebSocket API and listenKey sockets)."""
        out = dict.fromkeys(self.accounts, 0)
        for conn in self.hub.connections:
            for name in conn.user_subscriptions.values():
                out[name] = out.get(name, 0) + 1
            if conn.listen_account is not None:
                out[conn.listen_account] = out.get(conn.listen_account, 0) + 1
        return out

    async def admin_deposit(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            self.deposit(str(body["account"]), str(body["asset"]).upper(), Decimal(str(body["amount"])))
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad deposit: {exc}"}, status=400)
        return web.json_response({"ok": True})

    # --- admin: a driven market (lock-step paper runs; module docstring) -----------------------------

    async def admin_fees(self, request: web.Request) -> web.StreamResponse:
        """``{account, maker, taker, quote_commission?}``: the account's fee schedule from now on."""
        try:
            body = await _json_object(request)
            account = str(body["account"])
            if account not in self.accounts:
                raise KeyError(f"unknown account {account!r}")
            fees = FeeSchedule(
                maker=_body_decimal(body, "maker"),
                taker=_body_decimal(body, "taker"),
                quote_commission=bool(body.get("quote_commission", False)),
            )
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad fees: {exc}"}, status=400)
        self.engine.set_fees(account, fees)
        return web.json_response(
            {
                "account": account,
                "maker": plain(fees.maker),
                "taker": plain(fees.taker),
                "quote_commission": fees.quote_commission,
            }
        )

    def _drive_to(self, ts_ms: int) -> datetime:
        """Market time := ``ts_ms`` (never backwards); the emulator is driven from now on."""
        if self._replay_task is not None and not self._replay_task.done():
            raise _AdminConflictError(
                "the emulator is replaying its recorded data (speed is set); "
                "a driven emulator is started without data (or with speed=None)"
            )
        ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
        if self._driven and self._market_anchor is not None and ts < self._market_anchor:
            raise _AdminConflictError(
                f"market time cannot go back from {self._market_anchor.isoformat()} to {ts.isoformat()}"
            )
        self._driven = True
        self._market_anchor = ts
        self._wall_anchor = self.config.clock()
        return ts

    def _driven_symbol(self, body: Mapping[str, Any]) -> str:
        symbol = str(body["symbol"]).replace("/", "").upper()
        if symbol not in self.specs:
            raise KeyError(f"unknown symbol {body['symbol']!r}")
        return symbol

    def _driven_answer(self, after: int) -> web.Response:
        return web.json_response(
            {
                "market_time_ms": self.market_ms(),
                "last_execution_seq": self.last_execution_seq,
                "executions": {name: self.executions(name, after) for name in self.accounts},
            }
        )

    async def admin_market_open(self, request: web.Request) -> web.StreamResponse:
        """``{symbol, ts_ms, price, volume?}``: market time := the bar's open, the open printed
        (``on_trade(symbol, price, 0)``, as the backtester prints it). With ``volume`` and a fill model
        with ``bar_volume_share``, the synthetic book holds that share of the bar's volume (as there)."""
        try:
            body = await _json_object(request)
            symbol = self._driven_symbol(body)
            price = _body_decimal(body, "price")
            volume = None if body.get("volume") is None else _body_decimal(body, "volume")
            ts_ms = int(body["ts_ms"])
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad market open: {exc}"}, status=400)
        after = self.last_execution_seq
        try:
            self._drive_to(ts_ms)
        except _AdminConflictError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        self.bar_step.open(symbol, price, volume)
        self.sync_book(symbol)
        await asyncio.sleep(0)  # let the stream writers run
        return self._driven_answer(after)

    async def admin_market_bar(self, request: web.Request) -> web.StreamResponse:
        """``{symbol, open_time_ms, close_time_ms, open, high, low, close, volume}``: market time := the
        close, the bar's path run (``on_bar``: fills stamped with the close), GTD orders expired, the
        kline stored and published."""
        try:
            body = await _json_object(request)
            symbol = self._driven_symbol(body)
            o, h, lo, c = (_body_decimal(body, k) for k in ("open", "high", "low", "close"))
            volume = _body_decimal(body, "volume")
            open_ms, close_ms = int(body["open_time_ms"]), int(body["close_time_ms"])
            if close_ms <= open_ms:
                raise ValueError("close_time_ms must be after open_time_ms")
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            return web.json_response({"error": f"bad market bar: {exc}"}, status=400)
        after = self.last_execution_seq
        try:
            self._drive_to(close_ms)
        except _AdminConflictError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        open_time = datetime.fromtimestamp(open_ms / 1000, UTC)
        interval_s = (close_ms - open_ms) // 1000
        self._print_bar(BarEvent(self.market_now(), symbol, open_time, o, h, lo, c, volume, interval_s))
        self.bar_step.path(symbol, o, h, lo, c, volume)
        self.bar_step.expire()
        self._publish_klines(symbol)
        self.sync_book(symbol)
        await asyncio.sleep(0)
        return self._driven_answer(after)

    async def admin_executions(self, request: web.Request) -> web.StreamResponse:
        """``?account=A&after=SEQ``: the account's executions after ``SEQ`` (every account without one)."""
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            return web.json_response({"error": "after must be an integer"}, status=400)
        account = request.query.get("account")
        if account is not None and account not in self.accounts:
            return web.json_response({"error": f"unknown account {account!r}"}, status=400)
        names = [account] if account is not None else list(self.accounts)
        return web.json_response(
            {
                "market_time_ms": self.market_ms(),
                "last_execution_seq": self.last_execution_seq,
                "executions": {name: self.executions(name, after) for name in names},
            }
        )


# --- helpers ---------------------------------------------------------------------------------------------


class _AdminConflictError(Exception):
    """An admin request that cannot apply in the emulator's current state (HTTP 409)."""


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise TypeError("expected a JSON object")
    return body


def _body_decimal(body: Mapping[str, Any], name: str) -> Decimal:
    value = Decimal(str(body[name]))
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite number")
    return value


def _book_ticker_event(
    symbol: str, update_id: int, bid: tuple[Decimal, Decimal], ask: tuple[Decimal, Decimal]
) -> dict[str, Any]:
    """A ``<symbol>@bookTicker`` event (it has no event type on Binance)."""
    return {"u": update_id, "s": symbol, "b": f8(bid[0]), "B": f8(bid[1]), "a": f8(ask[0]), "A": f8(ask[1])}


def _diff(old: dict[Decimal, Decimal], new: dict[Decimal, Decimal]) -> list[tuple[Decimal, Decimal]]:
    out = [(p, q) for p, q in new.items() if old.get(p) != q]
    out += [(p, Decimal(0)) for p in old if p not in new]
    return sorted(out)


def _admin_error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


def _error_response(err: BinanceError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=err.status,
        text=json.dumps(err.body(), separators=(",", ":")),
        content_type="application/json",
        headers=headers,
    )


def _required(params: Params, name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise errors.mandatory_param(name)
    return value


_DECIMAL_PARAM = re.compile(r"^([0-9]{1,20})(\.[0-9]{1,20})?$")


def _decimal(params: Params, name: str, max_decimals: int = 8) -> Decimal | None:
    """A decimal parameter as Binance reads it: plain digits (no sign, exponent or spaces: -1100), at most
    ``max_decimals`` significant decimals (the asset's precision: -1111; trailing zeros do not count)."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if not _DECIMAL_PARAM.match(value):
        raise errors.illegal_decimal(name)
    try:
        out = Decimal(value)
    except InvalidOperation:
        raise errors.illegal_decimal(name) from None
    exponent = out.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # the regex admits finite numbers only
    if -exponent > max_decimals:
        raise errors.too_much_precision(name)
    return out


def _opt_int(params: Params, name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.illegal_chars(name) from None


def _int(params: Params, name: str, default: int) -> int:
    value = _opt_int(params, name)
    return default if value is None else value


def _symbol_list(params: Params) -> list[str] | None:
    if params.get("symbol"):
        return [params["symbol"].upper()]
    raw = params.get("symbols")
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise errors.illegal_chars("symbols") from None
    if not isinstance(parsed, list):
        raise errors.illegal_chars("symbols")
    return [str(s).upper() for s in parsed]


def _order_of(result: MatchResult, client_order_id: str | None) -> EngineOrder:
    """The last snapshot of the submitted order (found by its client order id)."""
    snapshots = [u.order for u in result.order_updates if u.order.client_order_id == client_order_id]
    if snapshots:
        return snapshots[-1]
    order = result.order
    if order is None:
        raise errors.internal_error()
    return order


_REJECTIONS: dict[RejectReason, tuple[int, str]] = {
    RejectReason.UNKNOWN_SYMBOL: (-1121, "Invalid symbol."),
    RejectReason.INSUFFICIENT_BALANCE: (-2010, "Account has insufficient balance for requested action."),
    RejectReason.PRICE_FILTER: (-1013, "Filter failure: PRICE_FILTER"),
    RejectReason.LOT_SIZE: (-1013, "Filter failure: LOT_SIZE"),
    RejectReason.MIN_NOTIONAL: (-1013, "Filter failure: NOTIONAL"),
    RejectReason.MAX_NUM_ORDERS: (-1013, "Filter failure: MAX_NUM_ORDERS"),
    RejectReason.WOULD_TAKE: (-2010, "Order would immediately match and take."),
    RejectReason.DUPLICATE_CLIENT_ORDER_ID: (-2010, "Duplicate order sent."),
    RejectReason.STOP_PRICE_WOULD_TRIGGER_IMMEDIATELY: (-2010, "Order would trigger immediately."),
    RejectReason.FOK_NOT_FILLABLE: (-2010, "Order would not be fully filled."),
    RejectReason.INVALID_PARAMETERS: (-1013, "Unsupported order combination"),
}


def _map_rejection(exc: EngineRejection, context: str) -> BinanceError:
    reason = exc.reject_reason
    if reason is RejectReason.UNKNOWN_ORDER:
        return errors.cancel_rejected() if context == "cancel" else errors.no_such_order()
    code, msg = _REJECTIONS.get(reason, (-1013, exc.message))
    if reason is RejectReason.INVALID_PARAMETERS and exc.message:
        msg = f"{msg}: {exc.message}" if not exc.message.startswith(msg) else exc.message
    return BinanceError(code, msg)
