"""``LiveDriver``: the execution stage's ``VenueDriver`` for wall-clock trading on a real venue.

Any ``ExchangeAdapter`` (the ccxt adapter for any ccxt exchange id; the emulator in its own time is a
ccxt ``binance`` pointed at the emulator's URLs — no admin endpoint is used). Requests go to the venue
when they arrive; the market is the venue's, so ``open``/``path`` do nothing and ``now()`` is the wall
clock (injectable).

What the OMS learns about its orders comes from two sources, both handed to ``on_user_event`` as the
same ``UserEvent``\\ s (the OMS is idempotent on fills by trade id and on order snapshots, so a fact
seen twice changes nothing):

* the venue's **user stream** (``adapter.stream_user_events()``), consumed in the background from
  ``start()`` on; the adapter reconnects it (backoff, resubscribe) and reports faults;
* a **REST poll** — open orders (``fetch_open_orders`` per symbol), every order the OMS has open
  (``fetch_order`` by client order id: filled, cancelled or expired meanwhile) and the account's trades
  (``fetch_my_trades`` since the last trade seen per symbol) — every ``poll_interval`` seconds while the
  stream cannot be trusted: silent for ``stale_after`` seconds while orders are open, failed, or
  reconnecting. After a reconnect the gap is polled at once and ``on_reconnect`` is awaited (e.g. a
  reconciliation).

``settle()`` never waits for the stream and never raises because a message is late: a late message is
the poll's business. Rate limits and retries are the adapter's (``RateBudgets``, ``RetryPolicy``).

``health()``: connected, last stream message time, reconnects, polls, last error (for ``status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from meltica.adapters.base import ExchangeAdapter, UserEvent, UserEventKind
from meltica.domain import Bar, Order, OrderStatus
from meltica.errors import MelticaError, OrderNotFoundError, StaleStreamError

log = logging.getLogger(__name__)

UserEventHandler = Callable[[UserEvent], Awaitable[Any]]
OpenOrders = Callable[[], Iterable[Order]]

_TRADE_OVERLAP = timedelta(seconds=1)  # fetch_my_trades re-reads this much before the last trade seen
_READER_RESTART = 1.0  # seconds before a user stream that ended is opened again
_STOP_TIMEOUT = 10.0


def wall_clock() -> datetime:
    return datetime.now(UTC)


class LiveDriver:
    """A wall-clock ``VenueDriver`` over ``adapter`` for ``account`` (module docstring).

    ``on_user_event``: where the venue's order updates and fills go (settable before ``start()``; the
    execution service sets it to its OMS). ``open_orders``: the orders the OMS holds open (set by the
    execution service; they are looked up one by one when polling). ``symbols``: markets always polled
    (besides those of open orders and of recent trades). ``on_reconnect``: awaited after the user
    stream reconnected and the gap was polled.
    """

    def __init__(
        self,
        adapter: ExchangeAdapter,
        *,
        account: str,
        on_user_event: UserEventHandler | None = None,
        poll_interval: float = 2.0,
        stale_after: float = 10.0,
        clock: Callable[[], datetime] = wall_clock,
        symbols: Iterable[str] = (),
    ) -> None:
        self._adapter = adapter
        self.account = account
        self.on_user_event = on_user_event
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self.clock = clock
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None
        self.open_orders: OpenOrders | None = None
        self._symbols: set[str] = set(symbols)
        self._reader: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._connected = False
        self._stream_up = False  # the reader is consuming (no fault reported since its last message)
        self._started_at: datetime | None = None
        self._last_message: datetime | None = None
        self._last_poll: datetime | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._fault_pending = False  # a stream fault not yet covered by a poll
        self._reconnect_pending = False  # a reconnect whose hook has not run yet
        self._reconnects = 0
        self._messages = 0
        self._polls = 0
        self._poll_failures = 0
        self._polled_events = 0
        self._last_trade_ts: dict[str, datetime] = {}
        self._previous_fault_handler: Callable[[MelticaError], None] | None = None
        self._after_reconnect_failure: Exception | None = None  # set while the hook has not succeeded since

    # --- VenueDriver -------------------------------------------------------------------------------

    @property
    def adapter(self) -> ExchangeAdapter:
        return self._adapter

    def now(self) -> datetime:
        return self.clock()

    async def start(self) -> None:
        """Connect (markets and credentials checked: an unreachable venue raises here), then consume
        the user stream and watch it in the background."""
        if self.on_user_event is None:
            raise MelticaError("LiveDriver needs on_user_event before start()", reason="live_driver")
        await self._adapter.connect()
        await self._adapter.load_instruments()
        self._connected = True
        self._started_at = self.clock()
        if hasattr(self._adapter, "on_fault"):  # the ccxt adapter reports stream faults (reconnects) here
            adapter: Any = self._adapter
            self._previous_fault_handler = adapter.on_fault
            adapter.on_fault = self._on_adapter_fault
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_user_stream(), name=f"live-user-stream-{self.account}")
        self._poller = loop.create_task(self._watch(), name=f"live-poller-{self.account}")

    async def stop(self) -> None:
        tasks = [t for t in (self._reader, self._poller) if t is not None]
        self._reader = self._poller = None
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
            for task in pending:  # a venue library may swallow a cancellation: do not hang on it
                log.error("%s: %s did not stop within %.0f s", self.account, task.get_name(), _STOP_TIMEOUT)
        if hasattr(self._adapter, "on_fault"):
            adapter: Any = self._adapter
            adapter.on_fault = self._previous_fault_handler
        self._connected = False
        self._stream_up = False
        with contextlib.suppress(Exception):
            await self._adapter.close()

    async def open(self, bar: Bar) -> None:
        """Nothing: a live venue moves its own market."""

    async def path(self, bar: Bar) -> None:
        """Nothing: a live venue moves its own market."""

    async def settle(self) -> None:
        """Let the stream reader hand over what it already has; never waits for the venue."""
        await asyncio.sleep(0)

    def untrusted(self) -> Exception | None:
        """The after-reconnect hook's failure while it has not succeeded since (it is retried at every
        check): what the stream missed meanwhile was not reconciled."""
        failure = self._after_reconnect_failure
        if failure is None:
            return None
        error = MelticaError(
            f"{self.account}: the after-reconnect hook failed ({failure!r}); retried until it succeeds",
            reason="after_reconnect_failed",
        )
        error.__cause__ = failure
        return error

    def watch(self, symbols: Iterable[str]) -> None:
        """Markets the REST poll always covers (besides those of open orders and recent trades)."""
        self._symbols.update(symbols)

    @property
    def symbols(self) -> frozenset[str]:
        """Every market the driver polls: configured, and seen in orders and trades."""
        return frozenset(self._symbols)

    # --- health ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "exchange": self._adapter.exchange_id,
            "connected": self._connected,
            "stream_up": self._stream_up,
            "stale": self._stale(),
            "last_message_at": _iso(self._last_message),
            "messages": self._messages,
            "last_poll_at": _iso(self._last_poll),
            "reconnects": self._reconnects,
            "polls": self._polls,
            "poll_failures": self._poll_failures,
            "polled_events": self._polled_events,
            "last_error": self._last_error,
            "last_error_at": _iso(self._last_error_at),
        }

    # --- the user stream -------------------------------------------------------------------------

    async def _read_user_stream(self) -> None:
        handler = self.on_user_event
        assert handler is not None
        while True:
            try:
                async for event in self._adapter.stream_user_events():
                    self._last_message = self.clock()
                    self._messages += 1
                    if not self._stream_up:
                        self._stream_up = True
                    await self._deliver(handler, event)
                raise MelticaError("the user stream ended", reason="user_stream_ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The adapter reconnects transient failures itself; what reaches here ended the stream
                # (auth, not supported …). Poll meanwhile and open it again.
                self._error(f"user stream failed: {exc!r}")
                log.error("%s: user stream failed, polling REST until it is back: %r", self.account, exc)
                self._stream_up = False
                self._fault_pending = True
                self._reconnect_pending = True
                self._reconnects += 1
                self._wake.set()
                await asyncio.sleep(_READER_RESTART)

    async def _deliver(self, handler: UserEventHandler, event: UserEvent) -> None:
        if event.kind is UserEventKind.FILL and event.fill is not None:
            self._saw_trade(event.fill.symbol, event.fill.ts)
        elif event.kind is UserEventKind.ORDER and event.order is not None:
            self._symbols.add(event.order.symbol)
        try:
            await handler(event)
        except Exception as exc:
            # The OMS could not apply it (e.g. the database is away). The handler already halted the account
            # and re-raised (ExecutionService._user_event_handler); here the poll is set to deliver it again.
            self._error(f"user event could not be applied: {exc!r}")
            log.exception("%s: user event could not be applied; the REST poll will deliver it again", self.account)
            self._fault_pending = True
            self._wake.set()

    def _on_adapter_fault(self, error: MelticaError) -> None:
        if self._previous_fault_handler is not None:
            self._previous_fault_handler(error)
        operation = str(error.details.get("operation") or error.details.get("stream") or "")
        if not operation.startswith("watch_"):
            return  # a REST retry: the adapter handles it
        self._error(f"{operation}: {error}")
        if isinstance(error, StaleStreamError) and not self._orders_open():
            return  # a quiet stream with nothing open is normal; the adapter resubscribes anyway
        self._stream_up = False
        self._fault_pending = True
        if not self._reconnect_pending:  # one drop is reported by each of the stream's watchers
            self._reconnect_pending = True
            self._reconnects += 1
        log.warning("%s: user stream fault (%s), reconnecting; polling REST meanwhile", self.account, error.reason)
        self._wake.set()

    # --- the REST poll ---------------------------------------------------------------------------

    def _orders_open(self) -> list[Order]:
        source = self.open_orders
        if source is None:
            return []
        return [o for o in source() if o.account == self.account and not o.is_terminal]

    def _stale(self) -> bool:
        if not self._connected:
            return False
        if self._fault_pending:
            return True
        if not self._orders_open():
            return False
        last = self._last_message or self._started_at
        return last is None or (self.clock() - last).total_seconds() >= self.stale_after

    async def _watch(self) -> None:
        """Poll whenever the stream cannot be trusted; after a reconnect, poll then run the hook."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
            self._wake.clear()
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the safety net must not die quietly: say it, and keep watching
                # poll() records its own failures and the after-reconnect hook halts the account on failure
                # (streams/pipeline.py, halting()): what lands here is a bug in the watch itself. It is recorded
                # in health() (`meltica live status`) and the watch goes on, since stopping it would leave
                # open orders with no REST safety net at all.
                self._error(f"watch failed: {exc!r}")
                log.exception("%s: the user-stream watch failed; retrying", self.account)

    async def _check(self) -> None:
        if self._stale():
            reconnect = self._reconnect_pending
            if await self.poll():
                self._fault_pending = False
                if reconnect:
                    self._reconnect_pending = False
                    if self.on_reconnect is not None:
                        try:
                            await self.on_reconnect()
                        except Exception as exc:
                            # Fail closed: untrusted() names it, so the execution stage refuses every request;
                            # the hook runs again at the next check (after a fresh poll) until it succeeds.
                            self._after_reconnect_failure = exc
                            self._reconnect_pending = True
                            self._fault_pending = True
                            self._error(f"on_reconnect failed: {exc!r}")
                            log.critical(
                                "%s: the after-reconnect hook failed (%r): requests refused until it succeeds",
                                self.account,
                                exc,
                            )
                        else:
                            self._after_reconnect_failure = None

    async def poll(self) -> bool:
        """One REST poll (module docstring); ``True`` when every part of it succeeded. Failures are
        recorded (``health()``) and retried at the next poll, never raised."""
        handler = self.on_user_event
        if handler is None:
            return False
        self._polls += 1
        self._last_poll = self.clock()
        open_orders = self._orders_open()
        symbols = sorted(self._symbols | {o.symbol for o in open_orders} | set(self._last_trade_ts))
        self._symbols.update(symbols)
        ok = True
        events: list[UserEvent] = []
        on_venue: set[str] = set()
        for symbol in symbols:
            try:
                since = self._last_trade_ts.get(symbol)
                fills = await self._adapter.fetch_my_trades(
                    symbol, since=None if since is None else since - _TRADE_OVERLAP
                )
                events += [UserEvent(UserEventKind.FILL, f.ts, fill=f) for f in sorted(fills, key=lambda f: f.ts)]
                for vo in await self._adapter.fetch_open_orders(symbol):
                    if vo.client_order_id:
                        on_venue.add(vo.client_order_id)
                    events.append(UserEvent(UserEventKind.ORDER, vo.ts or self.clock(), order=vo))
            except MelticaError as exc:
                ok = False
                self._error(f"poll {symbol}: {exc}")
                log.warning("%s: REST poll of %s failed: %s", self.account, symbol, exc)
        for order in open_orders:
            if order.client_order_id in on_venue or order.status is OrderStatus.NEW:
                continue  # listed open; or held locally (emulated), never on the venue
            try:  # closed on the venue since (filled, cancelled, expired) or not arrived there yet
                vo = await self._adapter.fetch_order(order.symbol, client_order_id=order.client_order_id)
            except OrderNotFoundError:
                continue  # never reached the venue (yet): the OMS's placement or recovery settles it
            except MelticaError as exc:
                ok = False
                self._error(f"poll {order.client_order_id}: {exc}")
                log.warning("%s: REST poll of order %s failed: %s", self.account, order.client_order_id, exc)
                continue
            events.append(UserEvent(UserEventKind.ORDER, vo.ts or self.clock(), order=vo))
        for event in events:  # fills first: a terminal snapshot finds its fills applied
            self._polled_events += 1
            await self._deliver(handler, event)
        if not ok:
            self._poll_failures += 1
        return ok

    # --- internals -------------------------------------------------------------------------------

    def _saw_trade(self, symbol: str, ts: datetime) -> None:
        self._symbols.add(symbol)
        last = self._last_trade_ts.get(symbol)
        if last is None or ts > last:
            self._last_trade_ts[symbol] = ts

    def _error(self, message: str) -> None:
        self._last_error = message
        self._last_error_at = self.clock()


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()


__all__ = ["LiveDriver", "wall_clock"]
