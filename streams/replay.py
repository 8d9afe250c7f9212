"""Publish replayed market data to Kafka: bars → ``md.candles.1m``, trades → ``md.trades``.

aiokafka producer, each message keyed by ``market_key(exchange, symbol)`` and encoded with the core
codec. Messages are appended to per-partition batches (``create_batch``/``send_batch``, STACK-NOTES.md:
~10x the throughput of one ``send`` per message); the partition is what aiokafka's default partitioner
gives the key (murmur2, as Java clients), so one market stays on one partition, in order. A batch is
sent when full, or when ``linger_ms`` has passed since its first message (so a slow, paced replay
still flows), and at the end. Batches of one partition are sent one after the other (in order).

:meth:`ReplayPublisher.replay` is the whole replay source: merge the streams (files or
``load_bars_from_database``), pace them at ``speed`` (``0``: as fast as possible), publish, wait for
every ack, then send one ``EndOfReplayCommand`` per market on ``control`` (``count``: events of that
market published since the last end; ``last_ts``: the ``ts`` of its last event; key
``exchange:symbol``). The command goes out only after the data was acknowledged, but it travels on
another topic: consumers wait for ``count`` messages before acting on it (see ``CandleProcessor``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from meltica.domain import Bar, Trade
from meltica.marketdata.replay import Clock, MarketEvent, ReplayTally, Sleep, replay_speed
from meltica.marketdata.replay import replay as paced_replay
from meltica.messaging.catalogue import Catalogue, market_key
from meltica.messaging.codec import Codec
from meltica.messaging.schemas import ControlMessage, EndOfReplayCommand

CANDLES_1M = "md.candles.1m"
TRADES = "md.trades"
CONTROL = "control"


def topic_for(event: MarketEvent) -> str:
    """The logical topic of a replayed event."""
    if isinstance(event, Bar):
        if event.timeframe != "1m":
            raise ValueError(f"only 1m bars have a topic, not {event.timeframe}")
        return CANDLES_1M
    if isinstance(event, Trade):
        return TRADES
    raise TypeError(f"cannot publish {type(event).__name__}")


@dataclass
class PublishStats:
    messages: int = 0
    batches: int = 0
    seconds: float = 0.0
    per_topic: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Messages per second (acknowledged)."""
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Pending:
    batch: Any
    count: int
    opened: float


class ReplayPublisher:
    """``async with ReplayPublisher(bootstrap, Catalogue(prefix="x.")) as pub: await pub.publish(events)``."""

    def __init__(
        self,
        bootstrap: str,
        catalogue: Catalogue | None = None,
        codec: Codec | None = None,
        *,
        batch_messages: int = 2000,
        linger_ms: float = 20.0,
        acks: int | str = "all",
        producer_options: dict[str, Any] | None = None,
    ) -> None:
        if batch_messages < 1:
            raise ValueError("batch_messages must be >= 1")
        self.codec = codec if codec is not None else Codec(catalogue)
        self.catalogue = self.codec.catalogue
        self.batch_messages = batch_messages
        self.linger = linger_ms / 1000.0
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks=acks,
            max_batch_size=1024 * 1024,
            **(producer_options or {}),
        )
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._partition_of: dict[tuple[str, bytes], int] = {}  # murmur2 is pure Python: once per key
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._keys: dict[tuple[str, str], bytes] = {}
        self.stats = PublishStats()
        self.tally = ReplayTally()  # per market since the last end of replay

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        try:
            await self.flush()
        finally:
            await self._producer.stop()

    async def __aenter__(self) -> ReplayPublisher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def partition_for(self, topic: str, key: bytes) -> int:
        """The partition aiokafka's default partitioner gives ``key`` on physical ``topic``."""
        cached = self._partition_of.get((topic, key))
        if cached is not None:
            return cached
        parts = self._partitions.get(topic)
        if parts is None:
            found = await self._producer.partitions_for(topic)
            if not found:
                raise RuntimeError(f"topic {topic} has no partitions (does it exist?)")
            parts = self._partitions[topic] = sorted(found)
        partition = self._partition_of[(topic, key)] = int(self._partitioner(key, parts, parts))
        return partition

    async def add(self, event: MarketEvent) -> None:
        """Queue one event; sends a batch when it is full or has lingered."""
        logical = topic_for(event)
        topic = self.catalogue.topic_name(logical)
        market = (event.exchange, event.symbol)
        key = self._keys.get(market)
        if key is None:
            key = self._keys[market] = market_key(*market).encode()
        partition = await self.partition_for(topic, key)
        value = self.codec.encode(logical, event)
        now = time.monotonic()
        slot = (topic, partition)
        pending = self._pending.get(slot)
        if pending is None:
            pending = self._pending[slot] = _Pending(self._producer.create_batch(), 0, now)
        if pending.batch.append(key=key, value=value, timestamp=None) is None:  # batch full by bytes
            await self._send(slot)
            pending = self._pending[slot] = _Pending(self._producer.create_batch(), 0, now)
            if pending.batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"message of {len(value)} bytes does not fit an empty batch")
        pending.count += 1
        self.stats.per_topic[logical] = self.stats.per_topic.get(logical, 0) + 1
        self.tally.add(event)
        if pending.count >= self.batch_messages:
            await self._send(slot)
        await self._send_lingering(now)

    async def _send_lingering(self, now: float) -> None:
        for slot in [s for s, p in self._pending.items() if now - p.opened >= self.linger]:
            await self._send(slot)

    async def _send(self, slot: tuple[str, int]) -> None:
        pending = self._pending.pop(slot, None)
        if pending is None or pending.count == 0:
            return
        previous = self._inflight.get(slot)
        if previous is not None:  # keep one partition's batches in order
            await previous
        pending.batch.close()
        self._inflight[slot] = await self._producer.send_batch(pending.batch, slot[0], partition=slot[1])
        self.stats.messages += pending.count
        self.stats.batches += 1

    async def flush(self) -> None:
        """Send every open batch and wait until the broker acknowledged all of them."""
        for slot in list(self._pending):
            await self._send(slot)
        inflight, self._inflight = list(self._inflight.values()), {}
        if inflight:
            await asyncio.gather(*inflight)

    async def publish(self, events: Iterable[MarketEvent] | AsyncIterable[MarketEvent]) -> PublishStats:
        """Publish every event, flush, and return the stats of this call (``seconds``: to the last ack)."""
        before = PublishStats(self.stats.messages, self.stats.batches, per_topic=dict(self.stats.per_topic))
        t0 = time.perf_counter()
        if isinstance(events, AsyncIterable):
            async for event in events:
                await self.add(event)
        else:
            for event in events:
                await self.add(event)
        await self.flush()
        return PublishStats(
            messages=self.stats.messages - before.messages,
            batches=self.stats.batches - before.batches,
            seconds=time.perf_counter() - t0,
            per_topic={t: n - before.per_topic.get(t, 0) for t, n in self.stats.per_topic.items()},
        )

    async def send_control(self, command: ControlMessage, key: str) -> None:
        """Publish one control command and wait for its ack (after everything queued before it)."""
        await self.flush()
        topic = self.catalogue.topic_name(CONTROL)
        await self._producer.send_and_wait(topic, key=key.encode(), value=self.codec.encode(CONTROL, command))

    async def end_replay(self, *, actor: str = "replay", run_id: str = "replay") -> list[EndOfReplayCommand]:
        """Flush, then send an ``EndOfReplayCommand`` for every market published since the last end."""
        await self.flush()
        commands = self.tally.end_commands(actor=actor, run_id=run_id)
        for command in commands:
            await self.send_control(command, market_key(command.exchange, command.symbol))
        self.tally.clear()
        return commands

    async def replay(
        self,
        *streams: Iterable[MarketEvent],
        speed: float | None = 0,
        end_of_replay: bool = True,
        actor: str = "replay",
        run_id: str = "replay",
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> ReplayResult:
        """Merge ``streams`` (each in event-time order), publish them paced at ``speed`` (``0``/``None``:
        as fast as possible; ``60``: a recorded minute per second), then end the replay on ``control``."""
        events = paced_replay(*streams, speed=replay_speed(speed), clock=clock, sleep=sleep)
        stats = await self.publish(events)
        ends = await self.end_replay(actor=actor, run_id=run_id) if end_of_replay else []
        return ReplayResult(stats, ends)


@dataclass
class ReplayResult:
    stats: PublishStats
    end_commands: list[EndOfReplayCommand]
