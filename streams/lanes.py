"""Batch lanes: a worker's inputs handled one fetched batch at a time, beside Faust's per-event streams.

Why: faust-streaming moves every record through its conductor, a channel, a stream and a per-message
``wait_first`` (≈150-200 µs of CPU per record on these machines, measured in ``bench/live_pipeline_bench.py``),
and agents sharing one consumer queue behind each other. A lane takes the records of its processor's input
partitions straight from the consumer's ``getmany`` (through :class:`streams.worker.ConsumerGuard`, which
still checks every offset), hands each to ``processor.handle`` in fetch order, sends the outputs at once
(the producer does not wait for the batch) and waits for the broker's acks once per batch (``confirm_outputs``).
A checkpoint (a timer, every :data:`CHECKPOINT_SECONDS`; also at a stop) stores each key touched since the last
one in the changelogged table, and only then acknowledges the messages it covers to Faust, whose commit
machinery commits them as before. Delivery stays at least once: a batch that fails is not acknowledged (and
commits are frozen), and a stop ends a batch after the chunk in hand: what was not handled is not
acknowledged, so it is never committed and is fetched again after the restart, and a batch of an older
consumer generation adds no offset to commit (the guard's ``ack``). A crash loses at most the handling since
the last checkpoint, which the restart redoes from the committed offsets.

What stays Faust's: the app and its consumer group, rebalancing, flow control (a paused partition is not
fetched), table recovery from the changelog (``processor.restore`` runs under the agent's lock, so it never
interleaves with a batch), offset commits, the producer and the worker CLI.

In-process hand-over (``hand_over``, on by default): a stage's output for a topic another lane of the same
worker reads is handed to that lane as soon as the broker acknowledged it (its partition and offset are then
known), instead of waiting for the consumer to fetch it back: the hop between stages costs one produce round
trip, not a fetch cycle. It is the same record at the same offset, so nothing changes for delivery: it is
handed over only when the reading lane has handled every earlier record of that partition (order per
partition holds; a lane that has fetched nothing of a partition yet is handed nothing of it) and the partition
is assigned to this worker, and handled once every lane handled the fetch it came from (a stage sees it after
what was fetched with its cause, as when it is fetched). It is acknowledged — and so committed — only when
the consumer fetches it (then skipped, as handled), so a crash in between makes the worker handle it again
after the restart, as for any record handled but not committed.

The consumer's fetch wait (``fetch_max_wait_ms``) is what a record produced by one stage waits before the
next stage's fetch can ask for it when the broker holds another fetch for idle partitions: faust-streaming
hard-codes 1500 ms; workers set it (:func:`set_fetch_max_wait`, worker config ``fetch_max_wait_ms``, default
:data:`FETCH_MAX_WAIT_MS`). An upstream fix would be a Faust setting passed to ``AIOKafkaConsumer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from faust.streams import _current_event  # the context Faust's tables read the source partition from

from meltica.live import tracing
from streams.topics import incoming_of

if TYPE_CHECKING:
    from streams.worker import ProcessorAgent, WorkerRuntime

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 5
"""Default for workers: an idle fetch returns after 5 ms, so a partition whose records were just taken is
asked for again within that (≈200 empty fetches/s on an idle worker: negligible CPU)."""

CHUNK_RECORDS = 1000
CHUNK_SECONDS = 0.05
"""A batch is finished (outputs confirmed) in chunks of at most this many records or seconds: what a crash
makes the worker redo stays small."""

CHECKPOINT_SECONDS = 0.5
"""State is stored, and the messages it covers acknowledged, at most this often (a timer; also at a stop and
before a rebalance gives partitions away, which waits for unacknowledged messages): storing a stage's state
after every small batch cost a fifth of the trading worker's CPU (``bench/live_pipeline_bench.py``), and at
0.1 s the execution stage's account state (the request ids it remembers against redelivery: up to 20,000) was
still 13 % of it. A crash makes the worker redo at most this much handling, from the committed offsets."""

_FETCH_WAIT_BY_APP: dict[str, int] = {}
_PATCHED = False


def set_fetch_max_wait(app: Any, milliseconds: int) -> None:
    """Use ``milliseconds`` as the fetch wait of ``app``'s consumer (installed before the app starts)."""
    if milliseconds < 0:
        raise ValueError("fetch_max_wait_ms must be >= 0")
    _FETCH_WAIT_BY_APP[str(app.conf.id)] = milliseconds
    _patch_consumer_factory()


def _patch_consumer_factory() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from faust.transport.drivers import aiokafka as faust_aiokafka

    original = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        wait = _FETCH_WAIT_BY_APP.get(str(self.app.conf.id))
        if wait is not None:
            consumer._fetch_max_wait_ms = wait  # read when the consumer starts its fetcher
        return consumer

    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]
    _PATCHED = True


class SentRecord(NamedTuple):
    """An output as it was sent (logical topic, encoded key and value, headers) and the model it encodes."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, Any]]
    model: Any = None


class LocalRecord:
    """A record this worker sent and the broker acknowledged, handed to a lane in-process: what a lane reads
    of a fetched message."""

    __slots__ = ("headers", "key", "model", "offset", "partition", "timestamp", "topic", "tp", "value")

    def __init__(self, tp: Any, offset: int, timestamp: float, sent: SentRecord) -> None:
        self.tp = tp
        self.topic: str = tp.topic
        self.partition: int = tp.partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = sent.key
        self.value = sent.value
        self.headers = sent.headers
        # the model the sender encoded into ``value`` (frozen, so shared as is): the reading lane does not decode
        # the bytes again. None when unknown: then the bytes are decoded, as for a fetched record.
        self.model = sent.model


_UNDECODED = object()


class _ChangelogSource:
    """Stands in for the Faust event a table write reads its source partition from."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, message: Any) -> None:
        self.message = message


class BatchLanes:
    """The worker's lanes: physical input topic → the agent whose processor takes it."""

    def __init__(self, runtime: WorkerRuntime, *, hand_over: bool = True) -> None:
        self.runtime = runtime
        self.agents_of: dict[str, list[ProcessorAgent]] = {}
        self.shared_topics: set[str] = set()  # physical topics more than one lane reads
        self.batches = 0
        self.records = 0
        self.hand_over = hand_over and runtime.confirm_outputs  # offsets are known only from the acks
        self.handed_over = 0
        # (agent, partition) → the offset after the last record the agent handled from it (fetched or handed
        # over); records below it that the consumer fetches later are skipped as handled
        self.next_offset: dict[tuple[ProcessorAgent, Any], int] = {}
        self._local: dict[ProcessorAgent, list[LocalRecord]] = {}  # handed over, not handled yet
        self._queued: dict[tuple[ProcessorAgent, Any], int] = {}  # the offset after the last one queued
        # handled since the last checkpoint: keys whose state to store, then messages to acknowledge
        self._touched: dict[ProcessorAgent, dict[str, tuple[int, Any]]] = {}
        self._acks: list[Any] = []
        self._last_checkpoint = time.perf_counter()
        self.checkpoints = 0
        # a fetched record several lanes read is decoded once: id(message) → model (None: dead-lettered),
        # for the fetch being delivered
        self._decoded: dict[int, Any] = {}

    def forget(self) -> None:
        """Drop what was handed over (a new assignment): from now on every record is fetched first."""
        self.next_offset.clear()
        self._local.clear()
        self._queued.clear()

    def add(self, agent: ProcessorAgent) -> None:
        for physical in agent.partitions_of:
            self.agents_of.setdefault(physical, []).append(agent)
        self.shared_topics = {topic for topic, agents in self.agents_of.items() if len(agents) > 1}

    def takes(self, topic: str) -> bool:
        return topic in self.agents_of

    def _sole_reader(self, topic: str) -> bool:
        return len(self.agents_of[topic]) == 1

    async def deliver(self, diverted: Mapping[str, list[Any]]) -> None:
        """Hand each agent the messages of its topics from one fetch (called by the guard's ``getmany``). A
        message of a topic only one agent reads is acknowledged with its chunk; one read by several agents
        once every one of them handled it."""
        runtime = self.runtime
        if runtime.stopping or runtime.failure is not None:
            return  # neither handled nor acknowledged, so never committed: fetched again after the restart
        consumer = runtime.app.consumer
        by_agent: dict[ProcessorAgent, list[Any]] = {}
        shared: list[Any] = []
        next_offset = self.next_offset
        for topic, messages in diverted.items():
            fresh = await self._unread(consumer, messages)
            sole = self._sole_reader(topic)
            for agent in self.agents_of[topic]:
                if next_offset:
                    taken = []
                    for message in fresh:
                        if message.offset < next_offset.get((agent, message.tp), -1):
                            if sole:  # handed over in-process before: handled, now acknowledged
                                self._acknowledged(message)
                        else:
                            taken.append(message)
                    by_agent.setdefault(agent, []).extend(taken)
                else:
                    by_agent.setdefault(agent, []).extend(fresh)
            if not sole:
                shared.extend(fresh)
        try:
            for agent, messages in by_agent.items():
                if not await self.handle_batch(agent, messages):
                    self.forget()
                    return
        finally:
            self._decoded.clear()
        # what the lanes handed each other waits until every lane handled this fetch: a stage never sees an
        # output before the inputs fetched with what caused it (the risk gate has the bar's price when the
        # strategy's intent on that bar reaches it), as when the output is fetched
        if self._local and not await self._handle_handed_over():
            return
        self._acks.extend(shared)  # every lane reading them handled them: acknowledged with their state

    def _acknowledged(self, message: Any) -> None:
        self._acks.append(message)
        handled = self.runtime.handled
        handled[message.tp] = max(handled.get(message.tp, 0), message.offset + 1)

    async def _handle_handed_over(self) -> bool:
        """Handle what was handed over in-process, and what that hands over in turn; False when a lane failed
        or a stop began (what was not handled is fetched, and handled, after the restart)."""
        while self._local:
            agent = next(iter(self._local))
            records = self._local.pop(agent)
            for key in [k for k in self._queued if k[0] is agent]:
                del self._queued[key]
            if not await self.handle_batch(agent, records):
                self.forget()
                return False
        return True

    def _hand_over(self, results: list[Any], sent: list[SentRecord]) -> None:
        """Queue each acknowledged output for the lanes of this worker that read its topic and have handled
        everything before it on its partition."""
        assignment: set[Any] | None = None
        for metadata, record in zip(results, sent, strict=True):
            agents = self.agents_of.get(metadata.topic)
            if not agents:
                continue
            if assignment is None:
                assignment = set(self.runtime.app.consumer.assignment())
            tp = metadata.topic_partition
            if tp not in assignment:
                continue
            offset = metadata.offset
            local: LocalRecord | None = None
            for agent in agents:
                key = (agent, tp)
                expected = self._queued.get(key, self.next_offset.get(key))
                if expected != offset:
                    continue  # an earlier record of the partition is not handled yet: it is fetched in order
                if local is None:
                    created = metadata.timestamp  # CreateTime in ms (None from old brokers)
                    local = LocalRecord(tp, offset, created / 1000.0 if created else time.time(), record)
                self._local.setdefault(agent, []).append(local)
                self._queued[key] = offset + 1
                self.handed_over += 1

    async def handle_batch(self, agent: ProcessorAgent, messages: list[Any]) -> bool:
        """Handle ``messages`` with ``agent``; False when it failed (the worker is then stopping)."""
        runtime = self.runtime
        if not messages:
            return True
        await agent.ensure_started()
        failure: BaseException | None = None
        async with agent.lock:
            if runtime.stopping or runtime.failure is not None:
                return False  # a stop began meanwhile: not handled nor acknowledged, fetched again after it
            agent.doing = f"handling a batch of {len(messages)}"
            completed = False
            try:
                completed = await self._handle(agent, messages)
            except Exception as exc:
                failure = exc
            agent.doing = "waiting for a batch"
        if failure is not None:
            runtime.freeze_commits()  # the rest of the batch is handed over again after a restart
            agent.stats.errors += 1
            first = messages[0]
            log.error(
                "processor %s failed on a batch from %s[%d]@%d",
                agent.name,
                first.topic,
                first.partition,
                first.offset,
                exc_info=failure,
            )
            runtime.fail(failure)
            return False
        self.batches += 1
        return completed

    async def _unread(self, consumer: Any, messages: list[Any]) -> list[Any]:
        """What Faust's own fetch loop would hand over: nothing below the partition's read offset (a batch
        fetched before a seek), and each taken offset becomes the read offset. A jump in offsets on a
        partition the guard does not check (a compacted input) is a real hole: booked as Faust books it, so
        commits can pass it."""
        read_offset = consumer._read_offset
        guarded = self.runtime.guard.guarded if self.runtime.guard is not None else set()
        fresh = []
        for message in messages:
            tp = message.tp
            last = read_offset.get(tp)
            if last is None or message.offset >= last:
                if last and message.offset - last > 1 and tp.topic not in guarded:
                    await consumer._add_gap(tp, last + 1, message.offset)
                read_offset[tp] = message.offset
                fresh.append(message)
        return fresh

    async def _handle(self, agent: ProcessorAgent, messages: list[Any]) -> bool:
        """Handle ``messages`` in order, finishing a chunk (outputs confirmed, state stored, messages
        acknowledged) every :data:`CHUNK_RECORDS` records or :data:`CHUNK_SECONDS`, so a slow batch still
        stores its progress as it goes. A stop that begins meanwhile ends the batch after the chunk in hand
        (False): the rest is neither handled nor acknowledged, so it is not committed."""
        runtime = self.runtime
        topics = runtime.topics
        processor = agent.processor
        stats = agent.stats
        next_offset = self.next_offset
        decoded = self._decoded
        shared = self.shared_topics
        chunk = _Chunk()
        for message in messages:
            if runtime.stopping:
                await self._finish(agent, chunk)
                return False
            physical = message.topic
            logical = agent.logical_of[physical]
            raw_key = message.key
            chunk.messages.append(message)
            next_offset[(agent, message.tp)] = message.offset + 1
            if type(message) is LocalRecord and message.model is not None:
                model = message.model
            else:
                model = decoded.get(id(message), _UNDECODED) if physical in shared else _UNDECODED
                if model is _UNDECODED:
                    model = await topics.dead_letters.decode_or_dead_letter(
                        logical,
                        message.value,
                        key=raw_key,
                        partition=message.partition,
                        offset=message.offset,
                        physical_topic=physical,
                    )
                    if physical in shared:
                        decoded[id(message)] = model
            if model is None:
                stats.dead_lettered(logical)
                continue
            incoming = incoming_of(message, logical, model)
            key = incoming.key
            started = time.perf_counter()
            attributes = agent.span_attributes(incoming, physical) if tracing.records_spans() else None
            with tracing.consume_span(f"{agent.name}.handle {logical}", message.headers, attributes):
                outputs = await processor.handle(incoming)
                if outputs:
                    chunk.pending.extend(await runtime.send_outputs(outputs, stats, chunk.sent))
            stats.handled(logical, time.perf_counter() - started)
            if key is not None:
                chunk.touched[key] = (agent.partitions_of[physical], message)
            if len(chunk.messages) >= CHUNK_RECORDS or time.perf_counter() - chunk.started >= CHUNK_SECONDS:
                await self._finish(agent, chunk)
                chunk = _Chunk()
        await self._finish(agent, chunk)
        return True

    async def _finish(self, agent: ProcessorAgent, chunk: _Chunk) -> None:
        if chunk.pending and self.runtime.confirm_outputs:
            results = await asyncio.gather(*chunk.pending)  # outputs confirmed before state and offsets move on
            if self.hand_over:
                self._hand_over(results, chunk.sent)
        if chunk.touched:
            self._touched.setdefault(agent, {}).update(chunk.touched)
        runtime = self.runtime
        handled = runtime.handled
        acks = self._acks
        for message in chunk.messages:
            if type(message) is LocalRecord:
                continue  # acknowledged when the consumer fetches it (see the module doc)
            if self._sole_reader(message.topic):
                acks.append(message)  # with the state, at the next checkpoint
            tp = message.tp
            handled[tp] = max(handled.get(tp, 0), message.offset + 1)  # the stall watchdog's measure
        runtime.progress += len(chunk.messages)
        self.records += len(chunk.messages)
        if self._due():
            await self.checkpoint(held=agent)  # a long batch stores its progress as it goes

    async def checkpoint(self, held: ProcessorAgent | None = None) -> None:
        """Store the state of every key handled since the last checkpoint (each agent under its lock, so
        never in the middle of a handle; ``held``: the agent whose lock the caller holds), then acknowledge
        the messages that state covers: Faust commits only acknowledged offsets, so a committed offset never
        runs ahead of the stored state. (A snapshot is the key's state now, so it covers everything handled
        before it; each checkpoint stores its keys before acknowledging its messages.)"""
        touched, self._touched = self._touched, {}
        acks, self._acks = self._acks, []
        self._last_checkpoint = time.perf_counter()
        for agent, keys in touched.items():
            if agent is held:
                self._store(agent, keys)
            else:
                async with agent.lock:
                    self._store(agent, keys)
        if acks:
            consumer = self.runtime.app.consumer
            for message in acks:
                consumer.ack(message)
        self.checkpoints += 1

    @staticmethod
    def _store(agent: ProcessorAgent, keys: Mapping[str, tuple[int, Any]]) -> None:
        for key, (partitions, message) in keys.items():
            source = _ChangelogSource(message)
            token = _current_event.set(weakref.ref(source))  # type: ignore[arg-type]
            try:
                agent.store_state(partitions, key)
            finally:
                _current_event.reset(token)

    def _due(self) -> bool:
        return bool(self._touched or self._acks) and time.perf_counter() - self._last_checkpoint >= CHECKPOINT_SECONDS

    async def maybe_checkpoint(self) -> None:
        """The timer's checkpoint: when anything waits and the last one is :data:`CHECKPOINT_SECONDS` old, and
        no batch is being handled (a batch checkpoints at its chunk ends itself)."""
        if self._due() and not any(agent.lock.locked() for agents in self.agents_of.values() for agent in agents):
            await self.checkpoint()


class _Chunk:
    __slots__ = ("messages", "pending", "sent", "started", "touched")

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.pending: list[Any] = []
        self.sent: list[SentRecord] = []
        self.touched: dict[str, tuple[int, Any]] = {}
        self.started = time.perf_counter()
