"""``EmulatorDriver``: the Binance emulator driven in lock-step, orders going through ccxt.

The execution agent's ``VenueDriver`` (``meltica.live.venue``) for paper runs against the emulator
(``meltica.emulator``, reached over HTTP; in-process or not). Orders go through the real ccxt adapter
(``adapter``), the market moves only when the driver says so, over the emulator's admin API:

* ``open(bar)`` → ``POST /_emulator/market/open`` ``{symbol, ts_ms, price, volume}``: market time := the
  bar's open, the open printed to the engine (stops a gap crossed trigger and fill there);
* ``path(bar)`` → ``POST /_emulator/market/bar`` ``{symbol, open_time_ms, close_time_ms, open, high, low,
  close, volume}``: market time := the close, the bar's path run (fills stamped with the close), GTD
  orders expired;
* ``settle()`` → ``GET /_emulator/executions?account=A&after=SEQ``: every execution the account had since
  the last settle (the steps' and those of the OMS's REST orders), then waits until the adapter's user
  stream has handed each to ``on_user_event``: every trade (by trade id) and, per order, a snapshot at
  least as recent as its last execution (the ``executionReport``'s sequence number ``I``; ccxt keeps the
  latest snapshot per order, intermediate ones may be merged). Past ``settle_timeout`` it raises
  ``EmulatorSettleError`` naming what is missing.

The driver owns the user stream: the OMS is not ``start()``-ed; the driver consumes
``adapter.stream_user_events()`` and calls ``on_user_event`` (usually ``OrderManager.on_user_event``).
``now()`` is the emulator's market time (the OMS's clock in a lock-step run).

Binance spot has no GTD; the emulator takes Binance futures' ``timeInForce=GTD`` + ``goodTillDate`` as
an extension, and ``EmulatorAdapter`` (the ccxt adapter, GTD passed that way) sends limit-priced GTD
orders natively, as the paper venue takes them — so they expire at the same close, as ``expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp

from meltica.adapters.base import ExchangeAdapter, UserEvent, UserEventKind
from meltica.adapters.ccxt import CcxtAdapter
from meltica.adapters.ccxt.orders import OrderRequest
from meltica.adapters.registry import create_adapter
from meltica.domain import Bar, OrderIntent, TimeInForce, utc_to_ms
from meltica.emulator import ADMIN_TOKEN_HEADER, CCXT_OPTIONS, ccxt_urls_for
from meltica.errors import MelticaError
from meltica.matching import FeeSchedule
from meltica.secrets import register_secret

log = logging.getLogger(__name__)

REST_FALLBACK_AFTER = 2.0
"""Seconds ``settle()`` waits for an order update on the stream before asking REST for that order."""

UserEventHandler = Callable[[UserEvent], Awaitable[Any]]


class EmulatorDriverError(MelticaError):
    """The emulator refused an admin request or could not be reached."""

    default_reason = "emulator_driver"


class EmulatorSettleError(EmulatorDriverError):
    """The user stream did not deliver every execution the emulator reported within the timeout."""

    default_reason = "emulator_settle_timeout"


class EmulatorAdapter(CcxtAdapter):
    """The ccxt adapter for the emulator: limit-priced GTD orders go as ``timeInForce=GTD`` +
    ``goodTillDate`` (the emulator's extension) instead of being refused as Binance spot refuses them."""

    def build_request(self, intent: OrderIntent, client_order_id: str) -> OrderRequest:
        if intent.time_in_force is TimeInForce.GTD and intent.type.needs_price and not intent.post_only:
            assert intent.expire_at is not None  # the intent validator guarantees it
            plain = intent.model_copy(update={"time_in_force": TimeInForce.GTC, "expire_at": None})
            request = super().build_request(plain, client_order_id)
            params = {**request.params, "timeInForce": "GTD", "goodTillDate": utc_to_ms(intent.expire_at)}
            return dataclasses.replace(request, params=params)
        return super().build_request(intent, client_order_id)


def _ms_to_utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class EmulatorDriver:
    """A lock-step ``VenueDriver`` over the Binance emulator at ``emulator_url`` (module docstring).

    ``account``: the OMS account and the emulator account (its name in ``EmulatorConfig.accounts``);
    ``api_key`` / ``api_secret``: that emulator account's key pair; ``admin_token``: the emulator's admin
    token (``emu.admin_token``; sent with every ``/_emulator/...`` request, never logged); ``on_user_event``:
    where the user stream goes (settable later, before ``start()``: the OMS is usually built on ``driver.adapter``);
    ``fees``: set on the emulator account at ``start()`` (a backtest's ``FeeSchedule``; ``None``: keep
    the emulator's); ``settle_timeout``: seconds ``settle()`` waits for the stream.
    """

    def __init__(
        self,
        emulator_url: str,
        *,
        account: str,
        api_key: str,
        api_secret: str,
        admin_token: str,
        on_user_event: UserEventHandler | None = None,
        fees: FeeSchedule | None = None,
        settle_timeout: float = 10.0,
        subscribe_timeout: float = 10.0,
        adapter_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.emulator_url = emulator_url.rstrip("/")
        self.account = account
        register_secret(api_secret, admin_token)
        self._admin_headers = {ADMIN_TOKEN_HEADER: admin_token}
        self.on_user_event = on_user_event
        self.fees = fees
        self.settle_timeout = settle_timeout
        self._symbols: set[str] = set()
        self.subscribe_timeout = subscribe_timeout
        self._market_time: datetime | None = None
        built = create_adapter(
            "binance",
            account=account,
            credentials={"apiKey": api_key, "secret": api_secret},
            urls={"api": ccxt_urls_for(self.emulator_url)},
            options={**CCXT_OPTIONS, **dict(adapter_options or {})},
        )
        assert isinstance(built, CcxtAdapter)
        # The same ccxt exchange object, behind the adapter that knows the emulator's GTD extension; its
        # clock (defaults for stamps the venue leaves out) is the market's.
        self._adapter = EmulatorAdapter(built.exchange, account=account, now=self.now)
        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_error: BaseException | None = None
        self._progress = asyncio.Event()
        self._settled_seq = 0
        self._seen_trades: set[str] = set()
        self._seen_order_seq: dict[str, int] = {}
        self.last_step_executions: list[dict[str, Any]] = []

    # --- VenueDriver -------------------------------------------------------------------------------

    @property
    def adapter(self) -> ExchangeAdapter:
        return self._adapter

    def now(self) -> datetime:
        if self._market_time is None:
            raise EmulatorDriverError("the emulator driver is not started: no market time yet")
        return self._market_time

    async def start(self) -> None:
        if self.on_user_event is None:
            raise EmulatorDriverError("EmulatorDriver needs on_user_event before start()")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        if self.fees is not None:
            await self._post(
                "/_emulator/fees",
                {
                    "account": self.account,
                    "maker": str(self.fees.maker),
                    "taker": str(self.fees.taker),
                    "quote_commission": self.fees.quote_commission,
                },
            )
        state = await self._get("/_emulator/state")
        if self.account not in state.get("accounts", []):
            raise EmulatorDriverError(f"the emulator has no account {self.account!r}", reason="unknown_account")
        self._market_time = _ms_to_utc(int(state["market_time_ms"]))
        self._settled_seq = int(state["last_execution_seq"])
        await self._adapter.connect()
        await self._adapter.load_instruments()
        before = int(state["user_subscriptions"].get(self.account, 0))
        self._reader = asyncio.get_running_loop().create_task(self._read_user_stream())
        await self._wait_subscribed(before)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        with contextlib.suppress(Exception):
            await self._adapter.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def untrusted(self) -> Exception | None:
        if self._reader_error is None:
            return None
        error = EmulatorDriverError(
            f"the user stream of {self.account} ended: {self._reader_error!r}", reason="user_stream_ended"
        )
        error.__cause__ = self._reader_error
        return error

    def _refuse_if_untrusted(self) -> None:
        untrusted = self.untrusted()
        if untrusted is not None:
            raise untrusted

    async def open(self, bar: Bar) -> None:
        self._refuse_if_untrusted()
        answer = await self._post(
            "/_emulator/market/open",
            {
                "symbol": bar.symbol,
                "ts_ms": utc_to_ms(bar.ts),
                "price": str(bar.open),
                "volume": str(bar.volume),
            },
        )
        self._stepped(answer, bar.symbol)

    async def path(self, bar: Bar) -> None:
        self._refuse_if_untrusted()
        answer = await self._post(
            "/_emulator/market/bar",
            {
                "symbol": bar.symbol,
                "open_time_ms": utc_to_ms(bar.ts),
                "close_time_ms": utc_to_ms(bar.ts + bar.tf.delta),
                "open": str(bar.open),
                "high": str(bar.high),
                "low": str(bar.low),
                "close": str(bar.close),
                "volume": str(bar.volume),
            },
        )
        self._stepped(answer, bar.symbol)

    async def settle(self) -> None:
        self._refuse_if_untrusted()
        answer = await self._get("/_emulator/executions", account=self.account, after=str(self._settled_seq))
        executions: list[dict[str, Any]] = answer["executions"].get(self.account, [])
        if not executions:
            return
        trades = {str(e["trade_id"]) for e in executions if e.get("trade_id") is not None}
        orders: dict[str, int] = {}
        for e in executions:
            orders[e["client_order_id"]] = max(orders.get(e["client_order_id"], 0), int(e["seq"]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_timeout
        rest_tried = False
        while True:
            missing_trades = trades - self._seen_trades
            missing_orders = {c: s for c, s in orders.items() if self._seen_order_seq.get(c, 0) < s}
            if not missing_trades and not missing_orders:
                break
            self._refuse_if_untrusted()
            if (
                missing_orders
                and not missing_trades
                and not rest_tried
                and loop.time() >= deadline - self.settle_timeout + REST_FALLBACK_AFTER
            ):
                # ccxt.pro hands a watched update over only when a later message arrives while it is
                # awaited: the last order update of a burst can sit in its cache. Ask REST instead.
                rest_tried = True
                await self._deliver_by_rest(missing_orders, executions)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EmulatorSettleError(
                    f"user stream of {self.account} did not deliver within {self.settle_timeout:g} s: "
                    f"trades {sorted(missing_trades)}, order updates {missing_orders} (client order id: "
                    "execution seq)",
                    missing_trades=sorted(missing_trades),
                    missing_orders=missing_orders,
                )
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._progress.wait(), timeout=min(remaining, REST_FALLBACK_AFTER) if not rest_tried else remaining
                )
        self._settled_seq = max(self._settled_seq, max(int(e["seq"]) for e in executions))

    async def _deliver_by_rest(self, missing: Mapping[str, int], executions: list[dict[str, Any]]) -> None:
        handler = self.on_user_event
        assert handler is not None
        unified = {s.replace("/", ""): s for s in self._symbols}
        for coid, seq in missing.items():
            raw_symbol = next((str(e["symbol"]) for e in executions if e["client_order_id"] == coid), "")
            symbol = unified.get(raw_symbol, raw_symbol)
            order = await self._adapter.fetch_order(symbol, client_order_id=coid)
            log.info("%s: order %s taken by REST (the stream held its update back)", self.account, coid)
            await handler(UserEvent(kind=UserEventKind.ORDER, ts=self.now(), order=order))
            self._seen_order_seq[coid] = max(self._seen_order_seq.get(coid, 0), seq)

    # --- internals -------------------------------------------------------------------------------

    def _stepped(self, answer: Mapping[str, Any], symbol: str | None = None) -> None:
        if symbol is not None:
            self._symbols.add(symbol)
        self._market_time = _ms_to_utc(int(answer["market_time_ms"]))
        self.last_step_executions = list(answer["executions"].get(self.account, []))

    async def _read_user_stream(self) -> None:
        handler = self.on_user_event
        assert handler is not None
        try:
            async for event in self._adapter.stream_user_events():
                await handler(event)
                if event.kind is UserEventKind.FILL and event.fill is not None:
                    self._seen_trades.add(event.fill.fill_id)
                elif event.kind is UserEventKind.ORDER and event.order is not None:
                    order = event.order
                    seq = order.raw.get("I") if order.raw else None
                    # ccxt names a cancel's report by its original client order id ("C"), as the
                    # emulator's journal does.
                    if order.client_order_id and isinstance(seq, int):
                        coid = order.client_order_id
                        self._seen_order_seq[coid] = max(self._seen_order_seq.get(coid, 0), seq)
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Fail closed: from now on untrusted() names this, every step and settle raises with it as the
            # cause and the execution stage refuses every request; the task ends with it (stop() reaps it).
            log.critical("user stream of %s ended: the account's state is unknown from here", self.account)
            self._reader_error = exc
            self._progress.set()
            raise

    async def _wait_subscribed(self, before: int) -> None:
        """Until the emulator counts one more user-data subscription for the account (ours)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.subscribe_timeout
        while True:
            state = await self._get("/_emulator/state")
            if int(state["user_subscriptions"].get(self.account, 0)) > before:
                return
            self._refuse_if_untrusted()
            if loop.time() > deadline:
                raise EmulatorDriverError(
                    f"the user stream of {self.account} did not subscribe within {self.subscribe_timeout:g} s",
                    reason="user_stream_not_subscribed",
                )
            await asyncio.sleep(0.02)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EmulatorDriverError("the emulator driver is not started")
        return self._session

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            async with self._http().post(
                self.emulator_url + path, json=dict(body), headers=self._admin_headers
            ) as resp:
                answer = await resp.json()
                status = resp.status
        except aiohttp.ClientError as exc:
            raise EmulatorDriverError(f"POST {path}: {exc}", reason="emulator_unreachable") from exc
        if status != 200:
            raise EmulatorDriverError(f"POST {path} {dict(body)}: HTTP {status}: {answer.get('error', answer)}")
        return dict(answer)

    async def _get(self, path: str, **query: str) -> dict[str, Any]:
        try:
            async with self._http().get(self.emulator_url + path, params=query, headers=self._admin_headers) as resp:
                answer = await resp.json()
                status = resp.status
        except aiohttp.ClientError as exc:
            raise EmulatorDriverError(f"GET {path}: {exc}", reason="emulator_unreachable") from exc
        if status != 200:
            raise EmulatorDriverError(f"GET {path}: HTTP {status}: {answer.get('error', answer)}")
        return dict(answer)
