"""Faust shell of the market-data side: the candle agent and the ingest service (no business rule here;
the logic is ``meltica.live.marketdata``).

Candles — ``register_candle_agents(app, topics)``
    An agent on ``md.trades`` runs the core :class:`~meltica.live.marketdata.CandleProcessor`; a second
    agent on ``control`` hands it ``EndOfReplayCommand`` (flush). The open window of every market lives
    in a **changelogged Faust table** keyed ``exchange:symbol`` (``candles-open-window``): after each
    message the processor's snapshot of that key is written to it, and before a key's first message on
    this worker (or after a rebalance) it is restored from it. So a restarted or re-assigned worker
    continues the minute it was in, and drops what it had already handled (the snapshot carries the
    partition/offset it reached).

    Why not Faust's windowed table (``app.Table(...).tumbling(60, expires=...)``): in faust-streaming
    0.15.3 a window closes only in the table's cleanup timer, which compares the window's end with the
    **wall clock** (``window.stale(ts, time.time())``) every ``table_cleanup_interval``: a replay of old
    data would close every window at once and in timer order, a live quiet market a random time after
    the minute, and the last window of a replay never on a flush command. ``on_window_close`` also skips
    any window older than the newest closed one *of the partition*, so with several markets on one
    partition bars would be lost. Event-time tumbling windows are therefore computed by the core
    aggregator (closed by the next minute's trade, a flush, or a watermark) and the table keeps the one
    open window per key — a window table keyed by market, changelogged like Faust's own.

    The table is co-partitioned with ``md.trades`` (same partition count, ``use_partitioner=True``:
    the changelog record of ``exchange:symbol`` goes to the partition the producer's murmur2 gives that
    key — the partition of the market's trades). That also lets the control agent write it. The control
    agent acts only for markets whose ``md.trades`` partition this worker holds; ``control`` has one
    partition, so with several workers only the one that consumes ``control`` sees the command.

Ingest — ``register_ingest(app, topics, ingest)``
    :class:`IngestService` (a ``mode.Service`` started with the app) runs
    :class:`~meltica.live.marketdata.MarketDataIngest`, whose streams publish through
    ``StreamTopics.send``; an agent on ``control`` forwards ``SubscribeCommand``s to it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP
from mode import Service

from meltica.live.marketdata import (
    CONTROL,
    TRADES,
    CandleProcessor,
    MarketDataIngest,
)
from meltica.live.processor import Incoming, Outgoing
from meltica.messaging.catalogue import market_key
from meltica.messaging.schemas import EndOfReplayCommand, SubscribeCommand
from streams.topics import StreamTopics

log = logging.getLogger(__name__)

CANDLE_TABLE = "candles-open-window"


@dataclass
class CandleAgents:
    """What :func:`register_candle_agents` registered: the processor, its table and counters."""

    processor: CandleProcessor
    table: Any  # faust.Table
    trades_agent: Any
    control_agent: Any
    topics: StreamTopics
    restored: set[str] = field(default_factory=set)
    handled: int = 0
    published: int = 0
    skipped_commands: int = 0  # end-of-replay commands for markets this worker does not hold

    async def publish(self, outs: list[Outgoing] | tuple[Outgoing, ...]) -> None:
        for out in outs:
            await self.topics.send(out.topic, out.key, out.value)
            self.published += 1

    def ensure_restored(self, key: str) -> None:
        if key in self.restored:
            return
        stored = self.table.get(key)
        if stored is not None:
            # written as JSON bytes; after a changelog recovery faust 0.15.3 hands it back
            # JSON-decoded (a dict), despite the table's raw value serializer
            state = stored if isinstance(stored, dict) else json.loads(stored)
            self.processor.restore(key, state)
        self.restored.add(key)

    def store(self, key: str) -> None:
        state = self.processor.snapshot(key)
        if state is not None:
            self.table[key] = json.dumps(state, separators=(",", ":")).encode()

    def forget_all(self) -> None:
        self.processor.forget()
        self.restored.clear()


def register_candle_agents(
    app: faust.App,
    topics: StreamTopics,
    processor: CandleProcessor | None = None,
    *,
    table_name: str = CANDLE_TABLE,
    name: str = "candles",
) -> CandleAgents:
    """Register the candle agent (``md.trades`` → ``md.candles.1m``), its control agent and its table."""
    processor = processor or CandleProcessor()
    trades_spec = topics.catalogue.spec(TRADES)
    trades_topic = topics.catalogue.topic_name(TRADES)
    table = app.Table(
        table_name,
        default=None,
        partitions=trades_spec.partitions,
        schema=faust.Schema(key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"),
        use_partitioner=True,
        help="open 1-minute candle window (CandleProcessor snapshot, JSON) per exchange:symbol",
    )
    partitioner = DefaultPartitioner()

    def holds(key: str) -> bool:
        """Whether this worker consumes the ``md.trades`` partition of ``key`` (so owns its window)."""
        parts = app.consumer.topic_partitions(trades_topic) or trades_spec.partitions
        all_parts = list(range(parts))
        partition = int(partitioner(key.encode(), all_parts, all_parts))
        return TP(trades_topic, partition) in app.assignor.assigned_actives()

    async def trades_agent(stream: Any) -> None:
        async for event in stream.events():
            trade = await topics.decode_event(TRADES, event)
            if trade is None:
                continue
            key = market_key(trade.exchange, trade.symbol)
            shell.ensure_restored(key)
            message = event.message
            outs = await processor.handle(
                Incoming(TRADES, key, trade, partition=message.partition, offset=message.offset)
            )
            await shell.publish(list(outs))
            shell.store(key)
            shell.handled += 1

    async def control_agent(stream: Any) -> None:
        async for event in stream.events():
            command = await topics.decode_event(CONTROL, event)
            if not isinstance(command, EndOfReplayCommand):
                continue
            key = market_key(command.exchange, command.symbol)
            if not holds(key):
                shell.skipped_commands += 1
                continue
            shell.ensure_restored(key)
            message = event.message
            outs = await processor.handle(
                Incoming(CONTROL, key, command, partition=message.partition, offset=message.offset)
            )
            await shell.publish(list(outs))
            shell.store(key)

    trades = app.agent(topics[TRADES], name=f"{name}-trades")(trades_agent)
    control = app.agent(topics[CONTROL], name=f"{name}-control")(control_agent)
    shell = CandleAgents(processor, table, trades, control, topics)
    from streams.worker import guard_inputs  # Faust drops fetched records after a recovery seek

    guard_inputs(app, [trades_topic, topics.catalogue.topic_name(CONTROL)])

    async def revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        # State of markets that may now belong to another worker: reload from the table when seen again.
        shell.forget_all()

    app.on_partitions_revoked.connect(revoked)  # type: ignore[arg-type]  # strong reference (mode's default)
    return shell


class IngestService(Service):
    """Runs :class:`MarketDataIngest` for the app's lifetime; items go out through ``StreamTopics``."""

    def __init__(self, ingest: MarketDataIngest, topics: StreamTopics, **kwargs: Any) -> None:
        self.ingest = ingest
        self.topics = topics
        self.sent = 0
        super().__init__(**kwargs)

    async def _emit(self, out: Outgoing) -> None:
        await self.topics.send(out.topic, out.key, out.value)
        self.sent += 1

    async def on_start(self) -> None:
        await self.ingest.start(self._emit)

    async def on_stop(self) -> None:
        await self.ingest.stop()


@dataclass
class IngestAgents:
    service: IngestService
    control_agent: Any
    commands: int = 0


def register_ingest(
    app: faust.App, topics: StreamTopics, ingest: MarketDataIngest, *, name: str = "ingest"
) -> IngestAgents:
    """Start ``ingest`` with the app and forward ``SubscribeCommand``s from ``control`` to it."""
    service = IngestService(ingest, topics, beacon=app.beacon)
    app.service(service)  # type: ignore[arg-type]  # faust accepts an instance as well as a class

    async def control_agent(stream: Any) -> None:
        async for event in stream.events():
            command = await topics.decode_event(CONTROL, event)
            if isinstance(command, SubscribeCommand):
                message = event.message
                await ingest.handle(
                    Incoming(CONTROL, None, command, partition=message.partition, offset=message.offset)
                )
                agents.commands += 1

    control = app.agent(topics[CONTROL], name=f"{name}-control")(control_agent)
    agents = IngestAgents(service, control)
    return agents
