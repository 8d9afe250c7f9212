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
import itertools
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from meltica.adapters.local_venue import ccxt_urls_for
from meltica.domain.enums import Side
from meltica.domain.values import utc_to_ms
from meltica.emulator import auth, binance_format, errors
from meltica.emulator.admin import AdminEndpoints, admin_refusal
from meltica.emulator.config import ADMIN_TOKEN_HEADER, EmulatorAccount, EmulatorConfig
from meltica.emulator.core import MarketTimeConflictError
from meltica.emulator.errors import BinanceError
from meltica.emulator.faults import Faults
from meltica.emulator.limits import RateLimiter, request_weight
from meltica.emulator.market import MarketTrade, SymbolMarket
from meltica.emulator.params import Handler, Params
from meltica.emulator.publishing import Publisher
from meltica.emulator.replay import (
    BarEvent,
    DepthEvent,
    PathTradeEvent,
    ReplayEvent,
    TradeEvent,
    bar_path,
    load_file,
    merge,
    to_wall_clock,
)
from meltica.emulator.rest_market import MarketDataEndpoints
from meltica.emulator.rest_trading import TradingEndpoints
from meltica.emulator.streams import StreamHub
from meltica.emulator.symbols import SymbolSpec, spec_for
from meltica.emulator.ws_endpoints import WebSocketEndpoints
from meltica.matching import FeeSchedule, MatchingEngine
from meltica.sim.step import BarStep

# Public trade ids of a driven bar's prints: their own sequence, far above the engine's fill ids.
DRIVEN_PRINT_IDS = 1 << 40
ORDER_PATHS = ("/api/v3/order", "/api/v3/order/cancelReplace")


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
        self.accounts_by_key: dict[str, EmulatorAccount] = {a.api_key: a for a in config.accounts}
        self.accounts: dict[str, EmulatorAccount] = {a.name: a for a in config.accounts}
        self.markets: dict[str, SymbolMarket] = {s: SymbolMarket(s) for s in self.specs}
        self.publisher = Publisher(self.hub, self.engine, self.specs, self.markets, self.accounts, self.market_ms)
        # The bar step of a driven market; a driven open with a volume scales the configured fill model's
        # synthetic book (as does a replayed bar, ``depth_from_volume``).
        self.bar_step = BarStep(self.engine, self.publisher.result)
        for spec in self.specs.values():
            self.engine.add_instrument(spec.instrument(config.maker_fee, config.taker_fee), symbol=spec.symbol)
        for acc in config.accounts:
            if acc.fees is not None:
                self.engine.set_fees(acc.name, acc.fees)
            for asset, amount in (acc.balances or config.default_balances).items():
                if amount > 0:
                    self.engine.ledger.deposit(acc.name, asset, amount)
        self.market_data = MarketDataEndpoints(self)
        self.trading = TradingEndpoints(self)
        self.websockets = WebSocketEndpoints(self)
        self.admin = AdminEndpoints(self)
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

    @property
    def driven(self) -> bool:
        """Market time is set by ``/_emulator/market/*`` only (module docstring)."""
        return self._driven

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
            self.publisher.public_trade(
                symbol,
                MarketTrade(trade_id, event.price, event.quantity, utc_to_ms(event.ts), event.buyer_maker),
            )
        elif isinstance(event, BarEvent) and self.config.realtime:
            # the bar is complete: its trades were printed and made the kline; time may expire GTD orders
            result = self.engine.advance()
        elif isinstance(event, BarEvent):
            self.print_bar(event)
            self._depth_from_volume(symbol, event.volume)
            result = self.engine.on_bar(symbol, event.open, event.high, event.low, event.close, event.volume)
        elif isinstance(event, TradeEvent):
            taker = Side.SELL if event.buyer_maker else Side.BUY
            result = self.engine.on_trade(symbol, event.price, event.quantity, taker_side=taker)
            self.publisher.public_trade(
                symbol,
                MarketTrade(event.trade_id, event.price, event.quantity, utc_to_ms(event.ts), event.buyer_maker),
            )
        else:
            assert isinstance(event, DepthEvent)
            if event.snapshot:
                result = self.engine.on_book_snapshot(symbol, event.bids, event.asks, update_id=event.last_update_id)
            else:
                result = self.engine.on_book_delta(symbol, event.bids, event.asks, update_id=event.last_update_id)
        self.publisher.result(result)
        self.publisher.klines(symbol)
        self.publisher.sync_book(symbol)

    def _depth_from_volume(self, symbol: str, volume: Decimal) -> None:
        """A replayed bar sizes the synthetic book (``EmulatorConfig.depth_from_volume``): each level holds
        the bar's volume × ``bar_volume_share`` (1 when unset) / the number of levels, in whole lots."""
        if self.config.depth_from_volume:
            self.bar_step.size_book(symbol, volume, default_share=Decimal(1), whole_lots=True)

    def _seed_price(self, symbol: str, price: Decimal) -> None:
        if symbol in self.specs:
            self.engine.on_trade(symbol, price, self.specs[symbol].step_size)

    def print_bar(self, bar: BarEvent) -> None:
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
            self.publisher.public_trade(
                symbol, MarketTrade(trade_id, point.price, point.quantity, at_ms, point.buyer_maker)
            )
            self.publisher.klines(symbol, at_ms)

    def drive_to(self, ts_ms: int) -> datetime:
        """Market time := ``ts_ms`` (never backwards); the emulator is driven from now on."""
        if self._replay_task is not None and not self._replay_task.done():
            raise MarketTimeConflictError(
                "the emulator is replaying its recorded data (speed is set); "
                "a driven emulator is started without data (or with speed=None)"
            )
        ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
        if self._driven and self._market_anchor is not None and ts < self._market_anchor:
            raise MarketTimeConflictError(
                f"market time cannot go back from {self._market_anchor.isoformat()} to {ts.isoformat()}"
            )
        self._driven = True
        self._market_anchor = ts
        self._wall_anchor = self.config.clock()
        return ts

    # --- publishing (``publishing.Publisher``) ------------------------------------------------------------

    def sync_book(self, symbol: str) -> int:
        """Publish the difference between the last published book and the engine's; return the update id."""
        return self.publisher.sync_book(symbol)

    def book_update_id(self, symbol: str) -> int:
        """The last update id published on ``symbol``'s depth streams (Binance ``u``/``lastUpdateId``)."""
        return self.publisher.book_update_id(symbol)

    def executions(self, account: str, after: int = 0) -> list[dict[str, Any]]:
        """The account's executions with a sequence number (``executionReport`` ``I``) above ``after``."""
        return self.publisher.executions(account, after)

    @property
    def last_execution_seq(self) -> int:
        return self.publisher.last_execution_seq

    def publish_tickers(self) -> None:
        """``<symbol>@ticker``, ``@miniTicker``, ``@bookTicker``, ``!ticker@arr``, ``!miniTicker@arr`` now."""
        self.publisher.tickers()

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

    def user_subscriptions(self) -> dict[str, int]:
        """Live user-data subscriptions per account (WebSocket API and listenKey sockets)."""
        out = dict.fromkeys(self.accounts, 0)
        for conn in self.hub.connections:
            for name in conn.user_subscriptions.values():
                out[name] = out.get(name, 0) + 1
            if conn.listen_account is not None:
                out[conn.listen_account] = out.get(conn.listen_account, 0) + 1
        return out

    async def drop_websockets(self) -> int:
        return await self.hub.drop_all()

    async def _periodic_tickers(self) -> None:
        """Every ``ticker_interval_s``: 24h tickers and the top of book to their subscribers (Binance
        pushes them each second); in real time also GTD expiry, as time passes between events."""
        while True:
            await asyncio.sleep(self.config.ticker_interval_s)
            if self.config.realtime and not self._driven:
                self.catch_up()
                self.publisher.result(self.engine.advance())
            self.publisher.close_klines()
            self.publisher.tickers()

    async def _periodic_drops(self) -> None:
        while True:
            every = self.faults.drop_websockets_every_s
            await asyncio.sleep(every if every else 0.2)
            if every and self.faults.drop_websockets_every_s:
                await self.hub.drop_all()

    # --- HTTP plumbing: the app, admission, faults, authentication ------------------------------------

    def _routes(self, app: web.Application) -> None:
        r = app.router
        for method, path, fn in self.market_data.routes():
            r.add_route(method, path, self._wrap(fn, "none"))
        for method, path, fn in self.trading.routes():
            r.add_route(method, path, self._wrap(fn, "signed"))
        for method, path, fn in self.websockets.listen_key_routes():
            r.add_route(method, path, self._wrap(fn, "key"))
        self.websockets.add_routes(r)
        self.admin.add_routes(r)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_emulator"):
            refusal = admin_refusal(request, self.admin_token)
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
                    account = self.account_for_key(request.headers.get("X-MBX-APIKEY"))
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

    def account_for_key(self, api_key: str | None) -> EmulatorAccount:
        key = auth.check_api_key_format(api_key)
        account = self.accounts_by_key.get(key)
        if account is None:
            raise errors.rejected_api_key()
        return account


def _error_response(err: BinanceError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=err.status,
        text=json.dumps(err.body(), separators=(",", ":")),
        content_type="application/json",
        headers=headers,
    )
