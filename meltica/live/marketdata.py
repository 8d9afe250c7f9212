"""Market data in the live pipeline: trades → closed 1-minute candles, and the venue ingest service.

No Kafka or Faust here (the shell is ``streams/marketdata.py``).

:class:`CandleAggregator` — event-time tumbling windows per ``exchange:symbol``:

* a trade belongs to the window of ``floor(ts, 1m)``; the bar's ``ts`` is that open time;
* a window **closes** when a trade of a later minute of the same market arrives, on :meth:`flush`
  (end of a replay) or on :meth:`close_until` (a watermark: live feeds with quiet markets);
* **empty minutes produce no bar** (no trade, no candle): a bar is always made of real trades.
  Binance's own klines carry a zero-volume bar at the previous close instead; consumers that need a
  dense series fill gaps themselves (the backtest does the same with stored candles);
* OHLC follow event time, not arrival: ``open`` is the earliest trade of the window (ties: first to
  arrive), ``close`` the latest (ties: last to arrive); ``volume`` is the sum of base quantities;
* a trade older than the open window (or of an already closed minute) is **late**: counted
  (``late``) and dropped with a warning — a closed bar is never re-opened;
* a trade id already in the open window is a **duplicate** (a redelivery, a reconnecting feed):
  counted (``duplicates``) and dropped.

:class:`CandleProcessor` runs the aggregator as a pipeline stage (``meltica.live.processor``):
``md.trades`` + ``control`` → ``md.candles.1m`` keyed ``exchange:symbol``. It also drops messages it
already handled by broker position (partition/offset per market, in the snapshot), so a redelivery
after a restart changes nothing. ``EndOfReplayCommand(exchange, symbol, count, last_ts)`` flushes the
market's open window once the processor has received ``count`` trade messages of that market: the
command travels on another topic than the trades, so it may overtake the replay's last trades and is
held until they are in (a later trade past ``last_ts`` also ends the wait).

:class:`MarketDataIngest` runs venue streams for a set of subscriptions (``exchange:symbol`` and a
channel) and hands each item to ``emit`` as an :class:`~meltica.live.processor.Outgoing`:

* ``trades`` (``ExchangeAdapter.stream_trades``) → ``md.trades``;
* ``candles.1m`` (``stream_bars``; only **closed** klines, see :func:`closed_bars`) → ``md.candles.1m``;
* ``ticker`` (``stream_top_of_book``: Binance ``bookTicker``; else the top of the maintained book) →
  ``md.ticker`` (``TopOfBook``);
* ``book`` (``stream_order_book``: snapshot + diffs, re-snapshotted by ccxt after a gap or a
  reconnect) → ``md.book``.

``SubscribeCommand`` on ``control`` adds or removes subscriptions at runtime. Reconnecting is the
adapter's job (it retries with backoff and resubscribes); the ingest learns of each interruption from
the adapter's fault reports.

Bars are published once per market and open time, in order. A closed kline more than one minute after
the last published bar of its market (a dropped websocket, a restart) makes the ingest fetch the missing
closed bars by REST (``fetch_ohlcv``) and publish them first; after an interruption the closing bar
itself is taken from REST too (the stream may have lost its final update). Each gap is logged (market,
from, to, bars missing and fetched) and kept in :attr:`MarketDataIngest.gaps`. A bar at or before the
last published one is dropped. At start the shell hands over the newest bar per market already on
``md.candles.1m``, so a restart neither repeats a bar nor skips the downtime (downstream, the strategy
host also drops bars by time per symbol).

Staleness: a subscribed stream silent for ``stale_after`` seconds is stale. The ingest publishes a
``MarketStatus`` on ``control`` (key ``market:<exchange>:<symbol>``) when a stream goes stale and when it
recovers, and one per stream every ``heartbeat`` seconds; the risk gate refuses new orders on a market
while its trades or bars stream is stale (rule ``stale_market_data``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, cast, get_args

from meltica.adapters.base import ExchangeAdapter
from meltica.domain import Bar, OrderBookSnapshot, Timeframe, TopOfBook, Trade
from meltica.errors import MelticaError
from meltica.live.processor import Emit, Incoming, Outgoing
from meltica.messaging.catalogue import market_key, market_status_key
from meltica.messaging.schemas import EndOfReplayCommand, MarketStatus, SubscribeCommand

log = logging.getLogger(__name__)

TRADES = "md.trades"
BOOK = "md.book"
CANDLES_1M = "md.candles.1m"
TICKER = "md.ticker"
CONTROL = "control"

STATE_VERSION = 1


# --- the aggregator --------------------------------------------------------------------------------


@dataclass
class OpenCandle:
    """The open window of one market: OHLCV so far and the trade ids in it (for dedupe)."""

    exchange: str
    symbol: str
    start: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    open_ts: datetime
    close_ts: datetime
    trade_ids: dict[str, None] = field(default_factory=dict)  # insertion-ordered set

    @classmethod
    def first(cls, trade: Trade, start: datetime) -> OpenCandle:
        return cls(
            exchange=trade.exchange,
            symbol=trade.symbol,
            start=start,
            open=trade.price,
            high=trade.price,
            low=trade.price,
            close=trade.price,
            volume=trade.quantity,
            open_ts=trade.ts,
            close_ts=trade.ts,
            trade_ids={trade.trade_id: None},
        )

    def add(self, trade: Trade) -> None:
        price = trade.price
        if price > self.high:
            self.high = price
        if price < self.low:
            self.low = price
        if trade.ts < self.open_ts:  # arrived out of order inside the window: event time decides
            self.open, self.open_ts = price, trade.ts
        if trade.ts >= self.close_ts:
            self.close, self.close_ts = price, trade.ts
        self.volume += trade.quantity
        self.trade_ids[trade.trade_id] = None

    def bar(self, timeframe: str) -> Bar:
        return Bar(
            exchange=self.exchange,
            symbol=self.symbol,
            timeframe=timeframe,
            ts=self.start,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "symbol": self.symbol,
            "start": self.start.isoformat(),
            "open": str(self.open),
            "high": str(self.high),
            "low": str(self.low),
            "close": str(self.close),
            "volume": str(self.volume),
            "open_ts": self.open_ts.isoformat(),
            "close_ts": self.close_ts.isoformat(),
            "trade_ids": list(self.trade_ids),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OpenCandle:
        return cls(
            exchange=str(state["exchange"]),
            symbol=str(state["symbol"]),
            start=datetime.fromisoformat(state["start"]),
            open=Decimal(state["open"]),
            high=Decimal(state["high"]),
            low=Decimal(state["low"]),
            close=Decimal(state["close"]),
            volume=Decimal(state["volume"]),
            open_ts=datetime.fromisoformat(state["open_ts"]),
            close_ts=datetime.fromisoformat(state["close_ts"]),
            trade_ids=dict.fromkeys(str(i) for i in state["trade_ids"]),
        )


@dataclass
class MarketWindows:
    """Everything the aggregator keeps for one market."""

    window: OpenCandle | None = None
    last_closed: datetime | None = None  # open time of the newest closed window
    trades: int = 0  # trades aggregated
    late: int = 0
    duplicates: int = 0
    bars: int = 0  # windows closed

    def to_state(self) -> dict[str, Any]:
        return {
            "window": None if self.window is None else self.window.to_state(),
            "last_closed": None if self.last_closed is None else self.last_closed.isoformat(),
            "trades": self.trades,
            "late": self.late,
            "duplicates": self.duplicates,
            "bars": self.bars,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MarketWindows:
        window = state.get("window")
        last_closed = state.get("last_closed")
        return cls(
            window=None if window is None else OpenCandle.from_state(window),
            last_closed=None if last_closed is None else datetime.fromisoformat(last_closed),
            trades=int(state.get("trades", 0)),
            late=int(state.get("late", 0)),
            duplicates=int(state.get("duplicates", 0)),
            bars=int(state.get("bars", 0)),
        )


class CandleAggregator:
    """Trades → closed bars of ``timeframe`` (default 1m), per ``exchange:symbol``; see the module doc."""

    def __init__(self, timeframe: str = "1m") -> None:
        self.tf = Timeframe.parse(timeframe)
        self.timeframe = self.tf.value
        self._markets: dict[str, MarketWindows] = {}

    def market(self, key: str) -> MarketWindows:
        found = self._markets.get(key)
        if found is None:
            found = self._markets[key] = MarketWindows()
        return found

    def keys(self) -> list[str]:
        return list(self._markets)

    def open_window(self, key: str) -> OpenCandle | None:
        found = self._markets.get(key)
        return None if found is None else found.window

    @property
    def late(self) -> int:
        return sum(m.late for m in self._markets.values())

    @property
    def duplicates(self) -> int:
        return sum(m.duplicates for m in self._markets.values())

    def add(self, trade: Trade) -> list[Bar]:
        """Aggregate one trade; return the bar it closed (a trade of a later minute), if any."""
        key = market_key(trade.exchange, trade.symbol)
        state = self.market(key)
        start = self.tf.floor(trade.ts)
        window = state.window
        if window is not None and start == window.start:
            if trade.trade_id in window.trade_ids:
                state.duplicates += 1
                log.debug("candles %s: duplicate trade %s dropped", key, trade.trade_id)
                return []
            window.add(trade)
            state.trades += 1
            return []
        newest: datetime | None
        if window is not None:
            late, newest = start < window.start, window.start
        else:
            late, newest = state.last_closed is not None and start <= state.last_closed, state.last_closed
        if late:
            state.late += 1
            log.warning(
                "candles %s: late trade %s at %s dropped (window %s is %s)",
                key,
                trade.trade_id,
                trade.ts.isoformat(),
                newest.isoformat() if newest is not None else "-",
                "open" if window is not None else "closed",
            )
            return []
        closed = self._close(state) if window is not None else []
        state.window = OpenCandle.first(trade, start)
        state.trades += 1
        return closed

    def _close(self, state: MarketWindows) -> list[Bar]:
        window = state.window
        if window is None:
            return []
        state.window = None
        state.last_closed = window.start
        state.bars += 1
        return [window.bar(self.timeframe)]

    def flush(self, key: str) -> list[Bar]:
        """Close the open window of ``key`` now (end of a replay); later trades of that minute are late."""
        state = self._markets.get(key)
        return [] if state is None else self._close(state)

    def flush_all(self) -> list[Bar]:
        return [bar for key in list(self._markets) for bar in self.flush(key)]

    def close_until(self, watermark: datetime) -> list[Bar]:
        """Close every window that ended at or before ``watermark`` (event time everyone has passed)."""
        out: list[Bar] = []
        for state in self._markets.values():
            if state.window is not None and state.window.start + self.tf.delta <= watermark:
                out.extend(self._close(state))
        return out

    def snapshot(self, key: str) -> dict[str, Any] | None:
        state = self._markets.get(key)
        return None if state is None else state.to_state()

    def restore(self, key: str, state: Mapping[str, Any]) -> None:
        self._markets[key] = MarketWindows.from_state(state)

    def forget(self, key: str | None = None) -> None:
        """Drop in-memory state (of one key, or all): after a partition moved away."""
        if key is None:
            self._markets.clear()
        else:
            self._markets.pop(key, None)


def aggregate(trades: Iterable[Trade], timeframe: str = "1m") -> list[Bar]:
    """Every bar of ``trades`` (the last window flushed): what the live pipeline publishes for them."""
    aggregator = CandleAggregator(timeframe)
    bars: list[Bar] = []
    for trade in trades:
        bars.extend(aggregator.add(trade))
    bars.extend(aggregator.flush_all())
    return bars


# --- the candle processor --------------------------------------------------------------------------


@dataclass
class _Position:
    """Per market: what was received (for redelivery and end-of-replay) and a pending flush."""

    partition: int | None = None
    offset: int = -1
    received: int = 0  # trade messages of this market handled (duplicates and late ones included)
    flush_count: int | None = None  # an end of replay is waiting for ``received`` to reach this
    flush_last_ts: datetime | None = None
    redelivered: int = 0


class CandleProcessor:
    """The ``candles`` stage: ``md.trades`` (+ end of replay on ``control``) → ``md.candles.1m``."""

    name = "candles"
    inputs: tuple[str, ...] = (TRADES, CONTROL)

    def __init__(self, aggregator: CandleAggregator | None = None) -> None:
        self.aggregator = aggregator or CandleAggregator("1m")
        self._positions: dict[str, _Position] = {}
        self.published = 0

    async def start(self, emit: Emit) -> None:
        """Nothing to connect: bars are returned from :meth:`handle`."""

    async def stop(self) -> None:
        """The open windows are state (kept by :meth:`snapshot`), not output: nothing to flush."""

    def _position(self, key: str) -> _Position:
        found = self._positions.get(key)
        if found is None:
            found = self._positions[key] = _Position()
        return found

    def state_keys(self, message: Incoming) -> tuple[str, ...]:
        """The keys whose :meth:`snapshot` a message may change (a control command's key is its scope)."""
        value = message.value
        if isinstance(value, Trade):
            return (market_key(value.exchange, value.symbol),)
        if isinstance(value, EndOfReplayCommand):
            return (market_key(value.exchange, value.symbol),)
        return ()

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        value = message.value
        if isinstance(value, Trade):
            return self._on_trade(message, value)
        if isinstance(value, EndOfReplayCommand):
            return self._on_end_of_replay(value)
        return ()

    def _on_trade(self, message: Incoming, trade: Trade) -> list[Outgoing]:
        key = market_key(trade.exchange, trade.symbol)
        pos = self._position(key)
        if message.offset >= 0:
            if pos.partition == message.partition and message.offset <= pos.offset:
                pos.redelivered += 1  # handled before a restart: the snapshot already has it
                return []
            pos.partition, pos.offset = message.partition, message.offset
        pos.received += 1
        bars = self.aggregator.add(trade)
        if pos.flush_count is not None:
            if pos.received >= pos.flush_count:
                bars.extend(self._flush(key, pos))
            elif pos.flush_last_ts is not None and trade.ts > pos.flush_last_ts:
                pos.flush_count = pos.flush_last_ts = None  # data past the replay's end: nothing to wait for
        return self._out(key, bars)

    def _on_end_of_replay(self, command: EndOfReplayCommand) -> list[Outgoing]:
        key = market_key(command.exchange, command.symbol)
        pos = self._position(key)
        pos.flush_count, pos.flush_last_ts = command.count, command.last_ts
        if pos.received >= command.count:
            return self._out(key, self._flush(key, pos))
        log.info("candles %s: end of replay after %d trades, %d received so far", key, command.count, pos.received)
        return []

    def _flush(self, key: str, pos: _Position) -> list[Bar]:
        pos.flush_count = pos.flush_last_ts = None
        return self.aggregator.flush(key)

    def _out(self, key: str, bars: list[Bar]) -> list[Outgoing]:
        self.published += len(bars)
        return [Outgoing(CANDLES_1M, key, bar) for bar in bars]

    def snapshot(self, key: str) -> dict[str, Any] | None:
        windows = self.aggregator.snapshot(key)
        pos = self._positions.get(key)
        if windows is None and pos is None:
            return None
        pos = pos or _Position()
        return {
            "version": STATE_VERSION,
            "windows": windows,
            "partition": pos.partition,
            "offset": pos.offset,
            "received": pos.received,
            "flush_count": pos.flush_count,
            "flush_last_ts": None if pos.flush_last_ts is None else pos.flush_last_ts.isoformat(),
        }

    def restore(self, key: str, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"candles {key}: unknown state version {state.get('version')!r}")
        windows = state.get("windows")
        if windows is None:
            self.aggregator.forget(key)
        else:
            self.aggregator.restore(key, windows)
        last_ts = state.get("flush_last_ts")
        self._positions[key] = _Position(
            partition=state.get("partition"),
            offset=int(state.get("offset", -1)),
            received=int(state.get("received", 0)),
            flush_count=state.get("flush_count"),
            flush_last_ts=None if last_ts is None else datetime.fromisoformat(last_ts),
        )

    def forget(self, key: str | None = None) -> None:
        """Drop in-memory state (one key or all), e.g. when partitions are revoked."""
        self.aggregator.forget(key)
        if key is None:
            self._positions.clear()
        else:
            self._positions.pop(key, None)

    @property
    def redelivered(self) -> int:
        return sum(p.redelivered for p in self._positions.values())


# --- ingest ----------------------------------------------------------------------------------------

Channel = Literal["trades", "book", "candles.1m", "ticker"]
CHANNELS: tuple[Channel, ...] = get_args(Channel)
CHANNEL_TOPICS: dict[str, str] = {"trades": TRADES, "book": BOOK, "candles.1m": CANDLES_1M, "ticker": TICKER}
INGEST_STATE_KEY = "ingest"
ONE_MINUTE = timedelta(minutes=1)

AdapterFactory = Callable[[str], ExchangeAdapter]
Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, order=True)
class Subscription:
    exchange: str
    symbol: str
    channel: Channel

    @property
    def key(self) -> str:
        return market_key(self.exchange, self.symbol)

    @property
    def topic(self) -> str:
        return CHANNEL_TOPICS[self.channel]

    def __str__(self) -> str:
        return f"{self.exchange}:{self.symbol}/{self.channel}"

    @classmethod
    def of(cls, command: SubscribeCommand) -> list[Subscription]:
        return [cls(command.exchange, command.symbol, channel) for channel in command.channels]


async def closed_bars(updates: AsyncIterator[Bar]) -> AsyncIterator[Bar]:
    """Only closed candles of a stream that repeats the forming candle: a bar is yielded (in its last
    state) when a bar with a later open time arrives."""
    held: Bar | None = None
    async for bar in updates:
        if held is not None and bar.ts > held.ts:
            yield held
        if held is None or bar.ts >= held.ts:
            held = bar


@dataclass(frozen=True)
class BarGap:
    """Closed 1-minute bars of a market that did not come through the stream: ``[start, end)``.

    ``missing`` bars were expected there; ``fetched`` came back from REST (``fetch_ohlcv``) and were
    published; ``reconnect``: the stream had been disrupted (the bar that closed over it was taken from
    REST too); ``error``: why REST could not fill it (the gap stays)."""

    exchange: str
    symbol: str
    start: datetime
    end: datetime
    missing: int
    fetched: int
    reconnect: bool = False
    error: str | None = None


@dataclass
class _Liveness:
    """When a subscription's stream last delivered (ingest clock) and the venue time of that item."""

    since: datetime  # subscribed (or restarted) at: silence is counted from here until a first item
    last_received: datetime | None = None
    last_event: datetime | None = None
    stale: bool | None = None  # as last published (None: nothing published yet)


@dataclass
class _BarTrack:
    """Per market: open time of the newest bar published on ``md.candles.1m``, and whether the kline
    stream was disrupted (a reconnect) since that bar was published."""

    last_published: datetime | None = None
    disrupted: bool = False


class MarketDataIngest:
    """Venue streams → ``emit``; see the module docstring. Implements the ``Processor`` protocol for
    ``control`` (``SubscribeCommand``); its snapshot (key ``"ingest"``) is the subscription set.

    ``stale_after`` (seconds): a subscribed stream silent this long is stale — a ``MarketStatus``
    (``stale=True``) goes out on ``control`` at once, another (``stale=False``) when data flows again,
    and every ``heartbeat`` seconds one per stream; ``None``: no status at all. ``refetch_gaps``: fill
    gaps in closed bars from REST (else they are only logged). ``last_bars``: market key → open time of
    the newest bar already on ``md.candles.1m`` (read by the shell at start), so a restart neither
    publishes a bar twice nor leaves the downtime's bars out. ``clock``: the ingest's notion of now
    (staleness, status times).
    """

    name = "ingest"
    inputs: tuple[str, ...] = (CONTROL,)

    def __init__(
        self,
        adapters: Mapping[str, ExchangeAdapter] | AdapterFactory,
        *,
        subscriptions: Iterable[Subscription] = (),
        book_depth: int | None = 20,
        close_adapters: bool = True,
        stale_after: float | None = None,
        heartbeat: float | None = None,
        refetch_gaps: bool = True,
        max_refetch_bars: int = 1440,
        last_bars: Mapping[str, datetime] | None = None,
        clock: Clock = _utc_now,
        actor: str = "ingest",
    ) -> None:
        if callable(adapters):
            self._factory: AdapterFactory | None = adapters
            self._adapters: dict[str, ExchangeAdapter] = {}
        else:
            self._factory = None
            self._adapters = dict(adapters)
        if stale_after is not None and stale_after <= 0:
            raise ValueError("stale_after must be positive")
        self.book_depth = book_depth
        self.close_adapters = close_adapters
        self.stale_after = stale_after
        self.heartbeat = heartbeat if heartbeat is not None else min(5.0, (stale_after or 10.0) / 2)
        self.refetch_gaps = refetch_gaps
        self.max_refetch_bars = max_refetch_bars
        self.clock = clock
        self.actor = actor
        self._wanted: set[Subscription] = set(subscriptions)
        self._seq = 0  # subscription changes applied (snapshots of several keys: the newest wins)
        self._tasks: dict[Subscription, asyncio.Task[None]] = {}
        self._connected: dict[str, asyncio.Task[ExchangeAdapter]] = {}
        self._emit: Emit | None = None
        self._lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self._liveness: dict[Subscription, _Liveness] = {}
        self._hooked: set[int] = set()  # adapters whose fault reports reach _on_stream_fault
        self._bars: dict[str, _BarTrack] = {key: _BarTrack(last_published=ts) for key, ts in (last_bars or {}).items()}
        self.counts: dict[str, int] = dict.fromkeys(CHANNELS, 0)
        self.failures: dict[Subscription, str] = {}
        self.gaps: list[BarGap] = []
        self.duplicate_bars = 0  # closed bars dropped: already published (a restart, a REST overlap)
        self.statuses = 0  # MarketStatus messages published
        self.status_failures = 0  # ... that could not be published (the broker away)
        self._status_down_since: datetime | None = None
        self._status_outage_said = False

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._emit is not None

    async def start(self, emit: Emit) -> None:
        """Start the streams of every wanted subscription (the constructor's and restored ones)."""
        self._emit = emit
        async with self._lock:
            for sub in sorted(self._wanted):
                self._launch(sub)
        if self.stale_after is not None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch_health(), name="ingest health")

    async def stop(self) -> None:
        self._emit = None
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            await _cancel([monitor])
        async with self._lock:
            tasks = list(self._tasks.values())
            self._tasks.clear()
        await _cancel(tasks)
        connecting = list(self._connected.values())
        self._connected.clear()
        if self.close_adapters:
            for task in connecting:
                if task.done() and not task.cancelled() and task.exception() is None:
                    with contextlib.suppress(Exception):
                        await task.result().close()
        await _cancel([t for t in connecting if not t.done()])

    # --- subscriptions --------------------------------------------------------------------------

    @property
    def subscriptions(self) -> frozenset[Subscription]:
        """What is wanted (running or about to run)."""
        return frozenset(self._wanted)

    @property
    def active(self) -> frozenset[Subscription]:
        """Subscriptions whose stream task is running now."""
        return frozenset(s for s, t in self._tasks.items() if not t.done())

    async def subscribe(self, *subs: Subscription) -> None:
        async with self._lock:
            for sub in subs:
                self._wanted.add(sub)
                self.failures.pop(sub, None)
                if self.running:
                    self._launch(sub)

    async def unsubscribe(self, *subs: Subscription) -> None:
        """Stop the streams of ``subs`` and wait until their tasks have ended; their status says so."""
        async with self._lock:
            tasks = []
            for sub in subs:
                self._wanted.discard(sub)
                task = self._tasks.pop(sub, None)
                if task is not None:
                    tasks.append(task)
        await _cancel(tasks)
        for sub in subs:
            live = self._liveness.pop(sub, None)
            if live is not None and self.stale_after is not None:
                await self._publish_status(sub, live, subscribed=False)

    async def apply(self, command: SubscribeCommand) -> None:
        subs = Subscription.of(command)
        log.info("ingest: %s %s", "subscribe" if command.subscribe else "unsubscribe", ", ".join(map(str, subs)))
        self._seq += 1
        if command.subscribe:
            await self.subscribe(*subs)
        else:
            await self.unsubscribe(*subs)

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        if isinstance(message.value, SubscribeCommand):
            await self.apply(message.value)
        return ()

    def state_keys(self, message: Incoming) -> tuple[str, ...]:
        return (INGEST_STATE_KEY,) if isinstance(message.value, SubscribeCommand) else ()

    def snapshot(self, key: str) -> dict[str, Any] | None:
        """The subscription set, under ``"ingest"`` and under the key of any ``SubscribeCommand`` (a shell
        stores a snapshot under the message's key); ``seq`` orders copies stored under several keys."""
        if key != INGEST_STATE_KEY and self._seq == 0:
            return None
        if key.startswith("market:"):
            return None  # MarketStatus keys: our own output, nothing to keep there
        return {
            "seq": self._seq,
            "subscriptions": [[s.exchange, s.symbol, s.channel] for s in sorted(self._wanted)],
        }

    def restore(self, key: str, state: dict[str, Any]) -> None:
        """Take the stored subscription set if it is newer than what is held (started by :meth:`start`,
        or at once when running)."""
        if "subscriptions" not in state:
            return
        seq = int(state.get("seq", 0))
        restored = {Subscription(str(e), str(s), cast(Channel, c)) for e, s, c in state["subscriptions"]}
        unknown = [s for s in restored if s.channel not in CHANNELS]
        if unknown:
            raise ValueError(f"ingest: unknown channels in stored subscriptions: {unknown}")
        if seq and seq < self._seq:
            return  # an older copy (stored under another key)
        self._seq = max(self._seq, seq)
        self._wanted |= restored
        if self.running:
            for sub in sorted(restored):
                self._launch(sub)

    # --- streams --------------------------------------------------------------------------------

    def _launch(self, sub: Subscription) -> None:
        task = self._tasks.get(sub)
        if task is not None and not task.done():
            return
        if sub not in self._liveness:
            self._liveness[sub] = _Liveness(since=self.clock())
        self._tasks[sub] = asyncio.get_running_loop().create_task(self._run(sub), name=f"ingest {sub}")

    async def adapter(self, exchange: str) -> ExchangeAdapter:
        """The connected adapter for ``exchange`` (connected once, shared by its streams)."""
        task = self._connected.get(exchange)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._connected[exchange] = asyncio.get_running_loop().create_task(self._connect(exchange))
        return await asyncio.shield(task)

    async def _connect(self, exchange: str) -> ExchangeAdapter:
        adapter = self._adapters.get(exchange)
        if adapter is None:
            if self._factory is None:
                raise KeyError(f"ingest: no adapter for exchange {exchange!r}")
            adapter = self._adapters[exchange] = self._factory(exchange)
        self._hook_faults(exchange, adapter)
        await adapter.connect()
        return adapter

    def _hook_faults(self, exchange: str, adapter: ExchangeAdapter) -> None:
        """Learn about stream reconnects from the adapter's fault reports (``CcxtAdapter.on_fault``): the
        bar a kline stream closes after one may have missed its last update, so it is taken from REST."""
        if not hasattr(adapter, "on_fault") or id(adapter) in self._hooked:
            return
        previous = adapter.on_fault

        def on_fault(error: MelticaError) -> None:
            self._on_stream_fault(exchange, error)
            if previous is not None:
                previous(error)

        adapter.on_fault = on_fault
        self._hooked.add(id(adapter))

    def _on_stream_fault(self, exchange: str, error: MelticaError) -> None:
        operation = str(error.details.get("operation") or error.details.get("stream") or "")
        if not operation.startswith("watch_"):
            return  # a REST call: no stream was interrupted
        symbol = error.details.get("symbol")
        for sub in self._wanted:
            if sub.channel != "candles.1m" or sub.exchange != exchange:
                continue
            # one websocket carries every stream of a venue: a drop reported by another stream counts too
            if operation != "watch_ohlcv" or symbol is None or symbol == sub.symbol:
                self._bar_track(sub.key).disrupted = True
        log.warning("ingest %s: stream interrupted (%s): %s", exchange, operation, error)

    def _bar_track(self, key: str) -> _BarTrack:
        track = self._bars.get(key)
        if track is None:
            track = self._bars[key] = _BarTrack()
        return track

    def last_bar(self, key: str) -> datetime | None:
        """Open time of the newest bar published for market ``key`` (``None``: none yet)."""
        track = self._bars.get(key)
        return None if track is None else track.last_published

    async def _tap(self, sub: Subscription, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Every raw item of a stream marks it alive (the forming kline too, not only closed bars)."""
        async for item in source:
            live = self._liveness.get(sub)
            if live is not None:
                live.last_received = self.clock()
                live.last_event = getattr(item, "ts", None)
            yield item

    def _stream(self, adapter: ExchangeAdapter, sub: Subscription) -> AsyncIterator[Any]:
        if sub.channel == "trades":
            return self._tap(sub, adapter.stream_trades(sub.symbol))
        if sub.channel == "book":
            return self._tap(sub, adapter.stream_order_book(sub.symbol, self.book_depth))
        if sub.channel == "ticker":
            top = getattr(adapter, "stream_top_of_book", None)
            if top is not None:
                return self._tap(sub, top(sub.symbol))
            return self._tap(sub, _top_of_book(adapter.stream_order_book(sub.symbol, 1)))
        return _closed_with_next(self._tap(sub, adapter.stream_bars(sub.symbol, "1m")))

    async def _run(self, sub: Subscription) -> None:
        try:
            adapter = await self.adapter(sub.exchange)
            await self._pump(adapter, sub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a terminal venue error (unknown symbol, auth): this stream ends, others go on
            # Fails closed downstream: the failure is published with the stream's status, and the risk gate
            # refuses orders on a market whose data stopped (rule stale_market_data).
            self.failures[sub] = f"{type(exc).__name__}: {exc}"
            log.exception("ingest %s: stream ended", sub)

    async def _pump(self, adapter: ExchangeAdapter, sub: Subscription) -> None:
        """The websocket reads only queue what arrives; a publisher task emits it (and refetches gaps in
        bars by REST). A ccxt pro watch hands over only what arrives while it is awaited, and one kept
        waiting for a fraction of a second by a slow broker or a REST call was seen to stall for good."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def publish() -> None:
            while True:
                item = await queue.get()
                if sub.channel == "candles.1m":
                    closed, next_open = item
                    items: list[Any] = await self._sequence(adapter, closed, next_open - ONE_MINUTE)
                else:
                    items = [item]
                for one in items:
                    emit = self._emit
                    if emit is None:
                        return
                    await emit(Outgoing(sub.topic, market_key(one.exchange, one.symbol), one))
                    self.counts[sub.channel] += 1

        publisher = asyncio.get_running_loop().create_task(publish(), name=f"ingest {sub} publisher")
        try:
            async for item in self._stream(adapter, sub):
                if publisher.done():
                    break
                queue.put_nowait(item)
            if publisher.done() and not publisher.cancelled():
                publisher.result()  # an emit failure ends the stream loudly
        finally:
            await _cancel([publisher])

    # --- closed bars: gaps and duplicates --------------------------------------------------------

    async def _sequence(self, adapter: ExchangeAdapter, bar: Bar, closed_through: datetime) -> list[Bar]:
        """The bars to publish when the stream closed ``bar`` (a kline opening at ``closed_through`` + 1m
        arrived): every bar after the last published one up to ``closed_through``, in order — ``bar``
        from the stream, the others (and ``bar`` too after an interruption: its final update may be
        lost, as when the stream skipped klines after it) from REST. Nothing that was published already."""
        key = market_key(bar.exchange, bar.symbol)
        track = self._bar_track(key)
        last = track.last_published
        if last is not None and closed_through <= last:
            self.duplicate_bars += 1
            log.debug("ingest %s: bar %s already published", key, bar.ts.isoformat())
            return []
        disrupted, track.disrupted = track.disrupted, False
        # the stream skipped klines after this bar: it may have missed this bar's last update as well
        suspect = disrupted or closed_through > bar.ts
        expected = bar.ts if last is None else last + ONE_MINUTE
        from_stream = bar if bar.ts >= expected and not suspect else None
        wanted = int((closed_through - expected) / ONE_MINUTE) + 1
        missing = [expected + i * ONE_MINUTE for i in range(wanted)]
        if from_stream is not None:
            missing.remove(bar.ts)
        if not missing:
            track.last_published = bar.ts
            return [bar]
        start = max(missing[0], closed_through - (self.max_refetch_bars - 1) * ONE_MINUTE)
        fetched: dict[datetime, Bar] = {}
        error: str | None = None
        if self.refetch_gaps:
            try:
                rows = await self._fetch_closed(adapter, bar.symbol, start, closed_through)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the gap stays; the stream goes on (logged loudly below)
                error = f"{type(exc).__name__}: {exc}"
            else:
                fetched = {b.ts: b for b in rows if b.ts in set(missing)}
        by_time = dict(fetched)
        if from_stream is not None:
            by_time[bar.ts] = from_stream
        elif bar.ts not in by_time and bar.ts >= expected:
            by_time[bar.ts] = bar  # REST did not have it: the stream's version is the best there is
        out = [by_time[ts] for ts in sorted(by_time)]
        gap_missing = [ts for ts in missing if ts != bar.ts]
        if gap_missing or error:
            first, end = (gap_missing[0], gap_missing[-1] + ONE_MINUTE) if gap_missing else (bar.ts, bar.ts)
            filled = sum(1 for ts in gap_missing if ts in fetched)
            gap = BarGap(
                exchange=bar.exchange,
                symbol=bar.symbol,
                start=first,
                end=end,
                missing=len(gap_missing),
                fetched=filled,
                reconnect=disrupted,
                error=error,
            )
            self.gaps.append(gap)
            why = "" if self.refetch_gaps else "; refetching is off"
            log.log(
                logging.ERROR if error or filled < len(gap_missing) else logging.WARNING,
                "ingest %s: gap in 1m bars from %s to %s: %d missing, %d fetched by REST%s%s%s",
                key,
                first.isoformat(),
                end.isoformat(),
                len(gap_missing),
                filled,
                " (after a reconnect)" if disrupted else "",
                f"; REST failed: {error}" if error else "",
                why,
            )
        elif suspect:
            log.info("ingest %s: bar %s taken from REST after a reconnect", key, bar.ts.isoformat())
        # the gap is reported once: what could not be fetched now is not asked for again
        track.last_published = max(closed_through, *(b.ts for b in out)) if out else closed_through
        return out

    async def _fetch_closed(self, adapter: ExchangeAdapter, symbol: str, start: datetime, until: datetime) -> list[Bar]:
        """Closed 1-minute bars with open times in ``[start, until]``, page by page."""
        out: list[Bar] = []
        since = start
        while since <= until:
            want = int((until - since) / ONE_MINUTE) + 1
            page = await adapter.fetch_ohlcv(symbol, "1m", since=since, limit=min(want, 1000))
            page = [b for b in page if since <= b.ts <= until]
            if not page:
                break
            out.extend(page)
            since = max(b.ts for b in page) + ONE_MINUTE
        return out

    # --- health: stale streams ---------------------------------------------------------------------

    async def _watch_health(self) -> None:
        """Publish a status when a stream goes stale or recovers, and every ``heartbeat`` for all."""
        assert self.stale_after is not None
        check = min(1.0, self.stale_after / 4, self.heartbeat)
        last_heartbeat: datetime | None = None
        while True:
            now = self.clock()
            beat = last_heartbeat is None or (now - last_heartbeat).total_seconds() >= self.heartbeat
            if beat:
                last_heartbeat = now
            for sub, live in list(self._liveness.items()):
                stale = self.is_stale(sub, now)
                if stale != live.stale or beat:
                    if stale != live.stale and live.stale is not None:
                        log.log(
                            logging.WARNING if stale else logging.INFO,
                            "ingest %s: %s",
                            sub,
                            f"stale: nothing for {self.stale_after:g}s" if stale else "data flows again",
                        )
                    previous, live.stale = live.stale, stale
                    try:
                        await self._publish_status(sub, live, now=now)
                    except Exception as exc:
                        live.stale = previous  # published again next round
                        self._status_failed(sub, exc, now)
                    else:
                        self._status_down_since = None
            await asyncio.sleep(check)

    def _status_failed(self, sub: Subscription, exc: Exception, now: datetime) -> None:
        """A status that did not get out (the broker is away). Fails closed without this process: the risk
        gate expires a market's last status after three heartbeats and then refuses new orders on it, so
        silence is never taken for health. Counted (``status_failures``), said once when it starts and once,
        critically, when it has lasted past that expiry; the watch keeps trying."""
        self.status_failures += 1
        if self._status_down_since is None:
            self._status_down_since = now
            log.error("ingest %s: could not publish its status (%r); retrying every round", sub, exc)
            self._status_outage_said = False
        elif not self._status_outage_said and (now - self._status_down_since).total_seconds() > 3 * self.heartbeat:
            self._status_outage_said = True
            log.critical(
                "ingest: no market status published for %.0f s (%r): the risk gate refuses new orders on "
                "these markets until one gets through",
                (now - self._status_down_since).total_seconds(),
                exc,
            )

    def is_stale(self, sub: Subscription, now: datetime | None = None) -> bool:
        """Whether ``sub``'s stream has been silent for ``stale_after`` (since it started, if never heard)."""
        live = self._liveness.get(sub)
        if live is None or self.stale_after is None:
            return False
        now = now or self.clock()
        heard = live.last_received or live.since
        return (now - heard).total_seconds() >= self.stale_after

    async def _publish_status(
        self, sub: Subscription, live: _Liveness, *, now: datetime | None = None, subscribed: bool = True
    ) -> None:
        emit = self._emit
        if emit is None or self.stale_after is None:
            return
        now = now or self.clock()
        status = MarketStatus(
            command_id=f"status:{sub}:{now.isoformat()}"[:128],
            actor=self.actor,
            ts=now,
            exchange=sub.exchange,
            symbol=sub.symbol,
            stream=sub.channel,
            stale=bool(live.stale) and subscribed,
            subscribed=subscribed,
            last_event_ts=live.last_event,
            last_received_ts=live.last_received,
            stale_after_s=self.stale_after,
            heartbeat_s=self.heartbeat,
        )
        await emit(Outgoing(CONTROL, market_status_key(sub.exchange, sub.symbol), status))
        self.statuses += 1

    def health(self) -> dict[str, Any]:
        """Per subscription: stale or not, last item's venue time and arrival time, failure if it ended."""
        now = self.clock()
        return {
            str(sub): {
                "stale": self.is_stale(sub, now),
                "last_event_ts": None if live.last_event is None else live.last_event.isoformat(),
                "last_received_ts": None if live.last_received is None else live.last_received.isoformat(),
                "failure": self.failures.get(sub),
            }
            for sub, live in sorted(self._liveness.items())
        }


async def _closed_with_next(updates: AsyncIterator[Bar]) -> AsyncIterator[tuple[Bar, datetime]]:
    """:func:`closed_bars` with the open time of the kline that closed each bar: every bar before that
    one is closed too (those the stream skipped are a gap)."""
    held: Bar | None = None
    async for bar in updates:
        if held is not None and bar.ts > held.ts:
            yield held, bar.ts
        if held is None or bar.ts >= held.ts:
            held = bar


async def _top_of_book(books: AsyncIterator[OrderBookSnapshot]) -> AsyncIterator[TopOfBook]:
    """Top of a maintained book, when it changes (a venue without a ticker stream)."""
    last: tuple[Any, ...] | None = None
    async for book in books:
        bid, ask = book.best_bid, book.best_ask
        quote = TopOfBook(
            exchange=book.exchange,
            symbol=book.symbol,
            bid=None if bid is None else bid.price,
            bid_quantity=None if bid is None else bid.quantity,
            ask=None if ask is None else ask.price,
            ask_quantity=None if ask is None else ask.quantity,
            ts=book.ts,
        )
        top = (quote.bid, quote.bid_quantity, quote.ask, quote.ask_quantity)
        if top != last:
            last = top
            yield quote


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
