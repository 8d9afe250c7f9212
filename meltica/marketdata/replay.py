"""Replay recorded market data: bars and trades as domain objects, in time order, paced at a speed.

No Kafka or Faust here (the publisher is ``streams/replay.py``). Time is injected: ``clock`` returns
seconds on a monotonic scale and ``sleep`` awaits a number of seconds, so tests run a 1x replay of
an hour in no wall time.

Event time: a bar is emitted when it *closes* (``ts + timeframe``), a trade at its ``ts``. Events with
equal event times keep their source order, bars before trades. ``speed=None`` (or ``inf``) is as
fast as possible (no sleeping at all); ``speed=60`` plays one recorded minute per wall second.
Callers that take a speed from a user (``--speed 0`` = as fast as possible) pass it through
:func:`replay_speed` first.

Sources: files (:func:`load_bars`, :func:`load_trades`) or the database (:func:`load_bars_from_database`:
the ``candles`` table, rolled up by the database when the timeframe is a multiple of a stored one).
:class:`ReplayTally` counts what a replay published per market; its :meth:`ReplayTally.end_commands`
are the ``EndOfReplayCommand``s a publisher sends on ``control`` when the replay is over.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from meltica.domain import Bar, Timeframe, Trade
from meltica.marketdata.series import BarSeries, TradeSeries
from meltica.messaging.schemas import EndOfReplayCommand

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
MarketEvent = Bar | Trade


def event_time(event: MarketEvent) -> datetime:
    """When ``event`` became known: a bar's close time, a trade's time."""
    if isinstance(event, Bar):
        return event.ts + _delta(event.timeframe)
    return event.ts


@functools.cache
def _delta(timeframe: str) -> timedelta:
    return Timeframe.parse(timeframe).delta


def iter_bars(series: BarSeries, limit: int | None = None) -> Iterator[Bar]:
    """The series' bars in order (built without re-validation: the loader checked them)."""
    n = len(series) if limit is None else min(limit, len(series))
    bars = BarSeries(
        series.exchange,
        series.symbol,
        series.timeframe,
        series.ts[:n],
        series.open[:n],
        series.high[:n],
        series.low[:n],
        series.close[:n],
        series.volume[:n],
    ).bars()
    return iter(bars)


def iter_trades(series: TradeSeries, limit: int | None = None) -> Iterator[Trade]:
    n = len(series) if limit is None else min(limit, len(series))
    return (series.trade(i) for i in range(n))


def load_bars(
    path: str | Path, *, exchange: str, symbol: str, timeframe: str = "1m", limit: int | None = None
) -> list[Bar]:
    """Bars of a candle file (``BarSeries.from_file``), the first ``limit`` of them if given."""
    return list(iter_bars(BarSeries.from_file(path, exchange=exchange, symbol=symbol, timeframe=timeframe), limit))


def load_trades(path: str | Path, *, exchange: str, symbol: str, limit: int | None = None) -> list[Trade]:
    return list(iter_trades(TradeSeries.from_file(path, exchange=exchange, symbol=symbol), limit))


def load_bars_from_database(
    engine: Any,
    *,
    exchange: str,
    symbol: str,
    timeframe: str = "1m",
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int | None = None,
) -> list[Bar]:
    """Stored candles ``[start, end)`` of a market (``meltica.storage.candles.read_candles``), in time
    order, the first ``limit`` of them if given. ``DataValidationError`` when none are stored."""
    series = BarSeries.from_database(
        engine, exchange=exchange, symbol=symbol, timeframe=timeframe, start=start, end=end
    )
    return list(iter_bars(series, limit))


def replay_speed(speed: float | None) -> float | None:
    """A user's speed → :class:`Pacer`'s: ``0``, ``None`` and ``inf`` mean as fast as possible (``None``)."""
    if speed is None or speed == 0 or speed == math.inf:
        return None
    if not speed > 0:  # negative or NaN
        raise ValueError(f"speed must be >= 0, got {speed}")
    return float(speed)


@dataclass
class MarketTally:
    count: int = 0
    last_ts: datetime | None = None  # ``ts`` of the last event (a bar's open time, a trade's time)


class ReplayTally:
    """Events published per ``(exchange, symbol)``: what the end-of-replay commands report."""

    def __init__(self) -> None:
        self.markets: dict[tuple[str, str], MarketTally] = {}

    def add(self, event: MarketEvent) -> None:
        market = (event.exchange, event.symbol)
        tally = self.markets.get(market)
        if tally is None:
            tally = self.markets[market] = MarketTally()
        tally.count += 1
        tally.last_ts = event.ts

    def end_commands(self, *, actor: str = "replay", run_id: str = "replay") -> list[EndOfReplayCommand]:
        """One ``EndOfReplayCommand`` per market, ``ts`` = the market's last event time (event time, not
        the wall clock). ``command_id`` is ``end-of-replay:<run_id>:<exchange>:<symbol>``."""
        out: list[EndOfReplayCommand] = []
        for (exchange, symbol), tally in sorted(self.markets.items()):
            assert tally.last_ts is not None
            out.append(
                EndOfReplayCommand(
                    command_id=f"end-of-replay:{run_id}:{exchange}:{symbol}"[:128],
                    actor=actor,
                    ts=tally.last_ts,
                    exchange=exchange,
                    symbol=symbol,
                    last_ts=tally.last_ts,
                    count=tally.count,
                )
            )
        return out

    def clear(self) -> None:
        self.markets.clear()


def merge_streams(*streams: Iterable[MarketEvent]) -> Iterator[MarketEvent]:
    """Merge streams that are each in event-time order into one (ties: earlier stream first, stably).

    Raises ``ValueError`` if a stream goes back in time."""
    if len(streams) == 1:
        yield from _checked(streams[0])
        return
    iterators = [iter(s) for s in streams]
    heap: list[tuple[datetime, int, int, MarketEvent]] = []
    seq = 0
    last: list[datetime | None] = [None] * len(iterators)

    def push(idx: int) -> None:
        nonlocal seq
        for event in iterators[idx]:
            t = event_time(event)
            prev = last[idx]
            if prev is not None and t < prev:
                raise ValueError(f"stream {idx} goes back in time: {t.isoformat()} after {prev.isoformat()}")
            last[idx] = t
            heapq.heappush(heap, (t, idx, seq, event))
            seq += 1
            return

    for idx in range(len(iterators)):
        push(idx)
    while heap:
        _, idx, _, event = heapq.heappop(heap)
        yield event
        push(idx)


def _checked(stream: Iterable[MarketEvent]) -> Iterator[MarketEvent]:
    prev: datetime | None = None
    for event in stream:
        t = event_time(event)
        if prev is not None and t < prev:
            raise ValueError(f"stream 0 goes back in time: {t.isoformat()} after {prev.isoformat()}")
        prev = t
        yield event


def _unpaced(speed: float | None) -> bool:
    """True for max speed; ``ValueError`` unless ``speed`` is ``None`` or > 0."""
    if speed is None or speed == math.inf:
        return True
    if not speed > 0:  # also NaN
        raise ValueError(f"speed must be > 0, got {speed}")
    return False


def pace_delay(first: datetime, current: datetime, started: float, now: float, speed: float | None) -> float:
    """Seconds to wait before emitting an event at ``current`` when the replay of ``first`` began at
    wall time ``started`` and it is ``now``: ``max(0, started + (current - first) / speed - now)``."""
    if _unpaced(speed):
        return 0.0
    assert speed is not None
    due = started + (current - first).total_seconds() / speed
    return max(0.0, due - now)


@dataclass(frozen=True, slots=True)
class Pacer:
    """Replay speed plus the injected clock and sleep (defaults: ``time.monotonic``/``asyncio.sleep``)."""

    speed: float | None = None
    clock: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep

    def __post_init__(self) -> None:
        _unpaced(self.speed)  # validates speed

    @property
    def unpaced(self) -> bool:
        return _unpaced(self.speed)

    async def paced(self, events: Iterable[MarketEvent]) -> AsyncIterator[MarketEvent]:
        """Yield ``events`` (in event-time order) no earlier than their scaled event time."""
        if self.unpaced:
            for event in events:
                yield event
            return
        first: datetime | None = None
        started = 0.0
        for event in events:
            t = event_time(event)
            if first is None:
                first, started = t, self.clock()
            delay = pace_delay(first, t, started, self.clock(), self.speed)
            if delay > 0:
                await self.sleep(delay)
            yield event


def replay(
    *streams: Iterable[MarketEvent],
    speed: float | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> AsyncIterator[MarketEvent]:
    """The merged streams in event-time order, paced at ``speed`` (``None``: as fast as possible)."""
    return Pacer(speed, clock, sleep).paced(merge_streams(*streams))
