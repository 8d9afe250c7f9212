"""``CcxtAdapter``: the ``ExchangeAdapter`` for any ccxt exchange id (REST via ccxt.pro's async class,
websockets via its ``watch_*`` methods), live or pointed at the local emulator.

Failure policy (DESIGN.md §5):

* every ccxt call runs inside ``venue_call`` (ccxt exceptions → Meltica taxonomy) after drawing on
  the per-account budget (``RateBudgets``); ccxt's ``enableRateLimit`` stays on underneath;
* 429/418 pause the account's budget for ``Retry-After``; reads are retried after it, writes too
  (the venue did not execute them); every retry is bounded by ``RetryPolicy``;
* clock skew (Binance -1021) → ``load_time_difference()`` once, then the call is retried once;
* reads are retried on transient errors (timeouts, 5xx) with exponential backoff and jitter;
* ``create_order`` never blindly re-sends after an ambiguous failure (timeout, lost response, 5xx):
  it first looks the order up by client order id (``resolve_unknown_order``); only when the venue
  does not know it is it sent again, with the same client order id;
* streams reconnect with exponential backoff + jitter and resubscribe; a stream silent for
  ``stale_after`` seconds is a fault (``StaleStreamError``: reported to ``on_fault``, then
  resubscribed, or raised when ``raise_on_stale``); with no websocket for a stream it polls REST.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from meltica.adapters.base import Capabilities, Ticker, UserEvent, UserEventKind, VenueOrder
from meltica.adapters.ccxt.orders import OrderRequest, build_order_request
from meltica.adapters.ccxt.parsing import (
    capabilities_from,
    client_id_of_trade,
    parse_balances,
    parse_fill,
    parse_ohlcv,
    parse_order,
    parse_order_book,
    parse_ticker,
    parse_top_of_book,
    parse_trade,
)
from meltica.adapters.ccxt.venues import VenueProfile, profile_for
from meltica.adapters.errors import venue_call
from meltica.adapters.ratelimit import RateBudgets
from meltica.domain import (
    Balance,
    Bar,
    Fill,
    Instrument,
    OrderBookSnapshot,
    OrderIntent,
    OrderStatus,
    TopOfBook,
    Trade,
    utc_to_ms,
)
from meltica.domain.instrument import CCXT_TICK_SIZE
from meltica.domain.orderbook import L2Book
from meltica.errors import (
    ClockSkewError,
    ConfigurationError,
    InvalidOrderError,
    MelticaError,
    OrderNotFoundError,
    RateLimitError,
    RetryableError,
    StaleStreamError,
    TerminalError,
)
from meltica.retry import RetryPolicy

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
FaultHandler = Callable[[MelticaError], None]


# Streams reconnect (practically) forever, backing off up to 30 s; frozen, so one instance is shared.
_STREAM_RECONNECT = RetryPolicy(max_attempts=1_000_000, base_delay=0.5, max_delay=30.0)


@dataclass(frozen=True)
class StreamPolicy:
    stale_after: float | None = 30.0  # seconds without a message; None disables
    raise_on_stale: bool = False
    reconnect: RetryPolicy = _STREAM_RECONNECT
    poll_interval: float = 2.0  # REST polling when the venue has no websocket for a stream
    book_depth: int | None = None  # levels kept in the streamed snapshots (None: all)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CcxtAdapter:
    """``ExchangeAdapter`` over a ccxt (pro) exchange instance. See the module docstring."""

    def __init__(
        self,
        exchange: Any,
        *,
        account: str,
        profile: VenueProfile | None = None,
        budgets: RateBudgets | None = None,
        retry: RetryPolicy | None = None,
        streams: StreamPolicy | None = None,
        on_fault: FaultHandler | None = None,
        sleep: Sleep = asyncio.sleep,
        now: Callable[[], datetime] = _utc_now,
        seed: int | None = None,
    ) -> None:
        self.exchange = exchange
        self._account = account
        self.profile = profile or profile_for(exchange.id)
        self.budgets = budgets or RateBudgets()
        self.bucket = self.budgets.bucket(exchange.id, account)
        self.retry = retry or RetryPolicy()
        self.streams = streams or StreamPolicy()
        self.on_fault = on_fault
        self.faults: list[MelticaError] = []
        self._sleep = sleep
        self._now = now
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not cryptography
        self._instruments: dict[str, Instrument] = {}
        self._client_ids: dict[str, str] = {}  # exchange order id → client order id
        self._capabilities: Capabilities | None = None

    # --- identity ----------------------------------------------------------------------------

    @property
    def exchange_id(self) -> str:
        return str(self.exchange.id)

    @property
    def account(self) -> str:
        return self._account

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            self._capabilities = capabilities_from(self.exchange.has, self.profile)
        return self._capabilities

    # --- plumbing ------------------------------------------------------------------------------

    def _report(self, error: MelticaError) -> None:
        self.faults.append(error)
        if len(self.faults) > 1000:
            del self.faults[:500]
        if self.on_fault is not None:
            self.on_fault(error)

    async def _once(self, operation: str, call: Callable[[], Awaitable[T]], **context: Any) -> T:
        await self.bucket.acquire()
        try:
            with venue_call(self.exchange, operation, **context):
                return await call()
        except RateLimitError as exc:
            self.bucket.penalize(exc.retry_after if exc.retry_after is not None else self.retry.base_delay * 4)
            raise

    async def _call(
        self, operation: str, call: Callable[[], Awaitable[T]], *, retry_transient: bool = True, **context: Any
    ) -> T:
        """One venue call with the policy above. ``retry_transient`` False: timeouts/5xx surface."""
        attempt = 0
        resynced = False
        while True:
            attempt += 1
            try:
                return await self._once(operation, call, **context)
            except ClockSkewError:
                if resynced:
                    raise
                resynced = True
                await self.resync_clock()
                attempt -= 1  # the resync retry is free
            except RateLimitError as exc:
                wait = exc.retry_after if exc.retry_after is not None else self.retry.delay(attempt, self._rng)
                if attempt >= self.retry.max_attempts or wait > self.retry.max_rate_limit_wait:
                    raise
                self._report(exc)
                await self._sleep(max(wait, self.bucket.blocked_for))
            except RetryableError as exc:
                if not retry_transient or attempt >= self.retry.max_attempts:
                    raise
                self._report(exc)
                await self._sleep(self.retry.delay(attempt, self._rng))

    async def resync_clock(self) -> None:
        """Measure the venue's clock offset (ccxt ``load_time_difference``) and sign with it from now on."""
        self.exchange.options["adjustForTimeDifference"] = True
        loader = getattr(self.exchange, "load_time_difference", None)
        if loader is None:
            return
        with venue_call(self.exchange, "load_time_difference"):
            await loader()

    def instrument(self, symbol: str) -> Instrument:
        try:
            return self._instruments[symbol]
        except KeyError:
            raise InvalidOrderError(f"{self.exchange_id}: unknown symbol {symbol}", reason="unknown_symbol") from None

    # --- lifecycle -----------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.load_instruments()
        if self.exchange.apiKey:
            await self.fetch_balances()  # proves the credentials work

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.exchange.close()

    async def __aenter__(self) -> CcxtAdapter:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- reference and market data -------------------------------------------------------------

    async def load_instruments(self, reload: bool = False) -> dict[str, Instrument]:
        if self._instruments and not reload:
            return dict(self._instruments)
        markets: dict[str, Any] = await self._call("load_markets", lambda: self.exchange.load_markets(reload))
        mode = int(getattr(self.exchange, "precisionMode", CCXT_TICK_SIZE))
        out: dict[str, Instrument] = {}
        for symbol, market in markets.items():
            try:
                out[symbol] = Instrument.from_ccxt_market(self.exchange_id, market, precision_mode=mode)
            except MelticaError as exc:
                self._report(exc)  # one odd market must not make the venue unusable
        self._instruments = out
        return dict(out)

    async def fetch_ticker(self, symbol: str) -> Ticker:
        raw = await self._call("fetch_ticker", lambda: self.exchange.fetch_ticker(symbol), symbol=symbol)
        return parse_ticker(self.exchange_id, raw, self._now)

    async def fetch_order_book(self, symbol: str, limit: int | None = None) -> OrderBookSnapshot:
        raw = await self._call("fetch_order_book", lambda: self.exchange.fetch_order_book(symbol, limit), symbol=symbol)
        return parse_order_book(self.exchange_id, {**raw, "symbol": symbol}, now=self._now)

    async def fetch_trades(self, symbol: str, since: datetime | None = None, limit: int | None = None) -> list[Trade]:
        since_ms = None if since is None else utc_to_ms(since)
        raw = await self._call(
            "fetch_trades", lambda: self.exchange.fetch_trades(symbol, since_ms, limit), symbol=symbol
        )
        return [parse_trade(self.exchange_id, t, self._now) for t in raw]

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since: datetime | None = None, limit: int | None = None
    ) -> list[Bar]:
        since_ms = None if since is None else utc_to_ms(since)
        raw = await self._call(
            "fetch_ohlcv", lambda: self.exchange.fetch_ohlcv(symbol, timeframe, since_ms, limit), symbol=symbol
        )
        return [parse_ohlcv(self.exchange_id, symbol, timeframe, row) for row in raw]

    # --- streams -------------------------------------------------------------------------------

    async def _watch(self, name: str, call: Callable[[], Awaitable[T]], **context: Any) -> AsyncIterator[T]:
        """Yield each answer of a ccxt ``watch_*`` call forever: reconnect with backoff on failure,
        report or raise staleness. Terminal errors (bad symbol, auth) end the stream by raising."""
        policy = self.streams
        failures = 0
        while True:
            try:
                with venue_call(self.exchange, name, **context):
                    if policy.stale_after is None:
                        item = await call()
                    else:
                        try:
                            item = await asyncio.wait_for(call(), timeout=policy.stale_after)
                        except TimeoutError:
                            raise StaleStreamError(
                                f"{self.exchange_id} {name}: no message for {policy.stale_after}s",
                                exchange=self.exchange_id,
                                stream=name,
                                **context,
                            ) from None
            except StaleStreamError as exc:
                _raise_if_cancelling()
                self._report(exc)
                if policy.raise_on_stale:
                    raise
                await self._drop_ws_clients()
                continue
            except RetryableError as exc:
                # ccxt turns a cancelled watch into a closed-connection error: when this task is being
                # cancelled, that must end the stream, not reconnect it.
                _raise_if_cancelling()
                failures += 1
                self._report(exc)
                if failures >= policy.reconnect.max_attempts:
                    raise
                await self._sleep(policy.reconnect.delay(failures, self._rng))
                continue
            failures = 0
            yield item

    async def _drop_ws_clients(self) -> None:
        """Close the websocket clients so the next ``watch_*`` reconnects and resubscribes."""
        clients = getattr(self.exchange, "clients", None)
        if not isinstance(clients, dict):
            return
        for client in list(clients.values()):
            with contextlib.suppress(Exception):
                await client.close()

    async def _poll(self, name: str, call: Callable[[], Awaitable[T]], **context: Any) -> AsyncIterator[T]:
        while True:
            yield await self._call(name, call, **context)
            await self._sleep(self.streams.poll_interval)

    async def stream_trades(self, symbol: str) -> AsyncIterator[Trade]:
        seen: dict[str, None] = {}
        if self.capabilities.watch_trades:
            source = self._watch("watch_trades", lambda: self.exchange.watch_trades(symbol), symbol=symbol)
        else:
            source = self._poll("fetch_trades", lambda: self.exchange.fetch_trades(symbol), symbol=symbol)
        async for batch in source:
            for raw in batch:
                trade = parse_trade(self.exchange_id, raw, self._now)
                if trade.trade_id in seen:
                    continue  # polling overlaps; ccxt caches may repeat after a reconnect
                seen[trade.trade_id] = None
                if len(seen) > 10_000:
                    for key in list(seen)[:5_000]:
                        del seen[key]
                yield trade

    async def stream_order_book(self, symbol: str, depth: int | None = None) -> AsyncIterator[OrderBookSnapshot]:
        """The maintained book after each update. ccxt's ``watch_order_book`` runs Binance's sync
        procedure (buffer, snapshot, U/u/pu checks; a gap raises and is re-snapshotted on resubscribe);
        each answer is loaded into Meltica's ``L2Book``, which serves top-N reads."""
        depth = depth or self.streams.book_depth
        book = L2Book(self.exchange_id, symbol)
        if self.capabilities.watch_order_book:
            source = self._watch(
                "watch_order_book", lambda: self.exchange.watch_order_book(symbol, depth), symbol=symbol
            )
        else:
            source = self._poll(
                "fetch_order_book", lambda: self.exchange.fetch_order_book(symbol, depth), symbol=symbol
            )
        async for raw in source:
            ms = raw.get("timestamp")
            book.apply_snapshot(
                [(p, q) for p, q, *_ in raw.get("bids") or []],
                [(p, q) for p, q, *_ in raw.get("asks") or []],
                raw.get("nonce"),
                datetime.fromtimestamp(ms / 1000, UTC) if ms else self._now(),
            )
            yield book.snapshot(depth)

    async def stream_bars(self, symbol: str, timeframe: str) -> AsyncIterator[Bar]:
        """Candles as they update (the current candle repeats with new values until it closes)."""
        if self.capabilities.watch_ohlcv:
            source = self._watch("watch_ohlcv", lambda: self.exchange.watch_ohlcv(symbol, timeframe), symbol=symbol)
        else:
            source = self._poll(
                "fetch_ohlcv", lambda: self.exchange.fetch_ohlcv(symbol, timeframe, None, 2), symbol=symbol
            )
        last: list[Any] | None = None
        async for rows in source:
            for row in rows:
                if last is not None and row[0] < last[0]:
                    continue
                if row == last:
                    continue
                last = list(row)
                yield parse_ohlcv(self.exchange_id, symbol, timeframe, row)

    async def stream_top_of_book(self, symbol: str) -> AsyncIterator[TopOfBook]:
        """Best bid/ask as it changes: ccxt ``watch_bids_asks`` (Binance ``<symbol>@bookTicker``) where the
        venue has it, else ``watch_ticker``, else REST ``fetch_ticker`` polled. Each quote is complete (no
        book to keep in sync), so a reconnect needs no re-snapshot."""
        has = self.exchange.has
        if has.get("watchBidsAsks"):
            source: AsyncIterator[Any] = self._watch(
                "watch_bids_asks", lambda: self.exchange.watch_bids_asks([symbol]), symbol=symbol
            )
        elif has.get("watchTicker"):
            source = self._watch("watch_ticker", lambda: self.exchange.watch_ticker(symbol), symbol=symbol)
        else:
            source = self._poll("fetch_ticker", lambda: self.exchange.fetch_ticker(symbol), symbol=symbol)
        last: tuple[Any, ...] | None = None
        async for answer in source:
            # watch_bids_asks answers {symbol: ticker}; the others one ticker
            raw = answer.get(symbol) if isinstance(answer, Mapping) and "symbol" not in answer else answer
            if not isinstance(raw, Mapping):
                continue
            quote = parse_top_of_book(self.exchange_id, {**raw, "symbol": symbol}, self._now)
            top = (quote.bid, quote.bid_quantity, quote.ask, quote.ask_quantity)
            if top == last:
                continue  # an unchanged quote repeated (polling, a ccxt cache after a reconnect)
            last = top
            yield quote

    # --- orders ----------------------------------------------------------------------------------

    def build_request(self, intent: OrderIntent, client_order_id: str) -> OrderRequest:
        return build_order_request(
            intent, self.instrument(intent.symbol), client_order_id, self.profile, self.capabilities
        )

    def _remember(self, order: VenueOrder) -> VenueOrder:
        if order.exchange_order_id and order.client_order_id:
            self._client_ids[order.exchange_order_id] = order.client_order_id
        return order

    def _parse_order(self, raw: Mapping[str, Any], client_order_id: str | None = None) -> VenueOrder:
        order = parse_order(self.exchange_id, raw, self._now)
        info = raw.get("info")
        original = info.get("origClientOrderId") if isinstance(info, Mapping) else None
        if original:  # a cancel's answer: clientOrderId is the cancel request's id, this is the order's
            order = VenueOrder(**{**order.__dict__, "client_order_id": str(original)})
        if order.client_order_id is None and client_order_id is not None:
            order = VenueOrder(**{**order.__dict__, "client_order_id": client_order_id})
        return self._remember(order)

    async def create_order(self, intent: OrderIntent, client_order_id: str) -> VenueOrder:
        if intent.exchange != self.exchange_id:
            raise ConfigurationError(
                f"intent {intent.intent_id} is for {intent.exchange}, this adapter is {self.exchange_id}"
            )
        request = self.build_request(intent, client_order_id)
        symbol, type_, side, amount, price, params = request.ccxt_args()
        attempt = 0
        while True:
            attempt += 1
            try:
                raw = await self._call(
                    "create_order",
                    lambda: self.exchange.create_order(symbol, type_, side, amount, price, dict(params)),
                    retry_transient=False,  # never re-send blindly: resolve first (below)
                    symbol=symbol,
                    client_order_id=client_order_id,
                )
                return self._parse_order(raw, client_order_id)
            except RetryableError as exc:
                if isinstance(exc, RateLimitError | ClockSkewError):
                    raise  # refused before execution, and _call already waited/resynced
                self._report(exc)
                found = await self.resolve_unknown_order(symbol, client_order_id)
                if found is not None:
                    return found
                if attempt >= self.retry.max_attempts:
                    raise
                await self._sleep(self.retry.delay(attempt, self._rng))

    async def resolve_unknown_order(self, symbol: str, client_order_id: str) -> VenueOrder | None:
        """After an ambiguous create: the order as the venue knows it, or ``None`` if it never arrived.

        Retries the lookup itself on transient errors; a lookup that keeps failing raises, so the
        caller never re-sends while the first attempt's fate is unknown.
        """
        try:
            return await self.fetch_order(symbol, client_order_id=client_order_id)
        except OrderNotFoundError:
            return None

    def _id_params(
        self, client_order_id: str | None, exchange_order_id: str | None
    ) -> tuple[str | None, dict[str, Any]]:
        if exchange_order_id is not None:
            return exchange_order_id, {}
        if client_order_id is None:
            raise InvalidOrderError("either client_order_id or exchange_order_id is required", reason="no_order_id")
        if self.profile.client_id_query_param is None:
            for exchange_id, client_id in self._client_ids.items():
                if client_id == client_order_id:
                    return exchange_id, {}
            raise OrderNotFoundError(
                f"{self.exchange_id} cannot look orders up by client order id and {client_order_id} is unknown",
                client_order_id=client_order_id,
            )
        return None, {self.profile.client_id_query_param: client_order_id}

    async def fetch_order(
        self, symbol: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> VenueOrder:
        order_id, params = self._id_params(client_order_id, exchange_order_id)
        raw = await self._call(
            "fetch_order",
            lambda: self.exchange.fetch_order(order_id, symbol, params),
            symbol=symbol,
            client_order_id=client_order_id,
            exchange_order_id=exchange_order_id,
        )
        return self._parse_order(raw, client_order_id)

    async def cancel_order(
        self, symbol: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> VenueOrder:
        order_id, params = self._id_params(client_order_id, exchange_order_id)
        raw = await self._call(
            "cancel_order",
            lambda: self.exchange.cancel_order(order_id, symbol, params),
            symbol=symbol,
            client_order_id=client_order_id,
            exchange_order_id=exchange_order_id,
        )
        order = self._parse_order(raw, client_order_id)
        if client_order_id is not None and order.client_order_id != client_order_id:
            # Binance answers a cancel with the cancel request's own id in clientOrderId (the order's is
            # origClientOrderId), which ccxt reports: the answer is about the order we asked for.
            order = self._remember(VenueOrder(**{**order.__dict__, "client_order_id": client_order_id}))
        if order.status in (OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED):
            # Some venues answer a cancel with the pre-cancel state: the cancel was accepted.
            order = VenueOrder(**{**order.__dict__, "status": OrderStatus.CANCELLED})
        return order

    async def cancel_all_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        if self.capabilities.cancel_all and symbol is not None:
            raw = await self._call("cancel_all_orders", lambda: self.exchange.cancel_all_orders(symbol), symbol=symbol)
            return [self._parse_order(o) for o in raw]
        out: list[VenueOrder] = []
        for order in await self.fetch_open_orders(symbol):
            with contextlib.suppress(OrderNotFoundError):  # filled or cancelled meanwhile
                out.append(
                    await self.cancel_order(
                        order.symbol,
                        client_order_id=order.client_order_id,
                        exchange_order_id=order.exchange_order_id,
                    )
                )
        return out

    async def amend_order(
        self,
        symbol: str,
        *,
        client_order_id: str,
        new_client_order_id: str,
        quantity: Decimal | None = None,
        price: Decimal | None = None,
    ) -> VenueOrder:
        current = await self.fetch_order(symbol, client_order_id=client_order_id)
        if current.status.is_terminal:
            raise InvalidOrderError(
                f"order {client_order_id} is {current.status.value}: cannot amend", reason="not_open"
            )
        instrument = self.instrument(symbol)
        new_qty = instrument.round_quantity(quantity if quantity is not None else current.quantity)
        new_price = current.price if price is None else instrument.round_price(price, current.side)
        instrument.validate_order(new_price, new_qty)
        ccxt_type = "limit" if current.type.needs_price else "market"
        params: dict[str, Any] = {self.profile.amend_client_id_param: new_client_order_id}
        if self.capabilities.amend:
            raw = await self._call(
                "edit_order",
                lambda: self.exchange.edit_order(
                    current.exchange_order_id,
                    symbol,
                    ccxt_type,
                    current.side.value,
                    float(new_qty),
                    None if new_price is None else float(new_price),
                    dict(params),
                ),
                retry_transient=False,
                symbol=symbol,
                client_order_id=client_order_id,
            )
            return self._parse_order(raw, new_client_order_id)
        # Cancel-replace: the replacement keeps type, side, trigger and time in force.
        await self.cancel_order(symbol, client_order_id=client_order_id)
        if current.trigger_price is not None:
            params["triggerPrice"] = float(current.trigger_price)
        if current.type.needs_price and current.time_in_force is not None:
            params["timeInForce"] = current.time_in_force.value
        raw = await self._call(
            "create_order",
            lambda: self.exchange.create_order(
                symbol,
                ccxt_type,
                current.side.value,
                float(new_qty),
                None if new_price is None else float(new_price),
                dict(params),
            ),
            retry_transient=False,
            symbol=symbol,
            client_order_id=new_client_order_id,
        )
        return self._parse_order(raw, new_client_order_id)

    async def fetch_open_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        if symbol is None:
            # Every symbol on purpose (reconciliation, cancel-all): acknowledge ccxt's heavier-weight warning
            # (Binance raises without this); a venue that needs a symbol still raises ArgumentsRequired.
            self.exchange.options["warnOnFetchOpenOrdersWithoutSymbol"] = False
        raw = await self._call("fetch_open_orders", lambda: self.exchange.fetch_open_orders(symbol), symbol=symbol)
        return [self._parse_order(o) for o in raw]

    async def _client_id_for(self, symbol: str, trade: Mapping[str, Any]) -> str:
        client_id = client_id_of_trade(trade)
        order_id = None if trade.get("order") is None else str(trade["order"])
        if client_id is None and order_id is not None:
            client_id = self._client_ids.get(order_id)
            if client_id is None:
                with contextlib.suppress(TerminalError):
                    order = await self.fetch_order(symbol, exchange_order_id=order_id)
                    client_id = order.client_order_id
        if order_id is not None and client_id:
            self._client_ids[order_id] = client_id
        return client_id or f"{self.exchange_id}:{order_id or 'unknown'}"

    async def fetch_my_trades(self, symbol: str, since: datetime | None = None, limit: int | None = None) -> list[Fill]:
        since_ms = None if since is None else utc_to_ms(since)
        raw = await self._call(
            "fetch_my_trades", lambda: self.exchange.fetch_my_trades(symbol, since_ms, limit), symbol=symbol
        )
        return [parse_fill(self.exchange_id, t, await self._client_id_for(symbol, t), self._now) for t in raw]

    async def fetch_balances(self) -> dict[str, Balance]:
        raw = await self._call("fetch_balance", lambda: self.exchange.fetch_balance())
        return parse_balances(raw)

    # --- user stream -----------------------------------------------------------------------------

    async def stream_user_events(self) -> AsyncIterator[UserEvent]:
        """Order updates, fills and balance changes, merged from ``watch_orders``,
        ``watch_my_trades`` and ``watch_balance`` (each reconnecting on its own)."""
        queue: asyncio.Queue[UserEvent | BaseException] = asyncio.Queue()
        caps = self.capabilities

        async def pump_orders() -> None:
            async for batch in self._watch("watch_orders", lambda: self.exchange.watch_orders()):
                for raw in batch:
                    order = self._parse_order(raw)
                    await queue.put(UserEvent(UserEventKind.ORDER, order.ts or self._now(), order=order))

        async def pump_trades() -> None:
            async for batch in self._watch("watch_my_trades", lambda: self.exchange.watch_my_trades()):
                for raw in batch:
                    client_id = await self._client_id_for(str(raw.get("symbol")), raw)
                    fill = parse_fill(self.exchange_id, raw, client_id, self._now)
                    await queue.put(UserEvent(UserEventKind.FILL, fill.ts, fill=fill))

        async def pump_balance() -> None:
            async for raw in self._watch("watch_balance", lambda: self.exchange.watch_balance()):
                balances = parse_balances(raw, keep_zero=True)
                ms = raw.get("timestamp")
                ts = datetime.fromtimestamp(ms / 1000, UTC) if ms else self._now()
                await queue.put(UserEvent(UserEventKind.BALANCE, ts, balances=tuple(balances.values())))

        async def guard(pump: Callable[[], Awaitable[None]]) -> None:
            try:
                await pump()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # a terminal stream error ends the merged stream
                await queue.put(exc)

        pumps = [
            pump
            for pump, enabled in (
                (pump_orders, caps.watch_orders),
                (pump_trades, caps.watch_my_trades),
                (pump_balance, caps.watch_balance),
            )
            if enabled
        ]
        if not pumps:
            raise TerminalError(f"{self.exchange_id} has no private websocket streams", reason="not_supported")
        tasks = [asyncio.create_task(guard(pump)) for pump in pumps]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _raise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
