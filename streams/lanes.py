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
worker reads is handed to that lane as soon as it is sent, instead of waiting for the consumer to fetch it back,
and the outputs of every stage of one fetch are confirmed by the broker together, once, at the end of the fetch
(and before any checkpoint): a hop between stages costs neither a fetch cycle nor a produce round trip. The
worker chooses each output's partition (the producer's default partitioner, :meth:`WorkerRuntime.send_outputs`)
and CreateTime, so the record handed over is the record the broker stores, offset aside: that is known at the
confirmation (-1 until then). It is handed over only to a lane in step on its partition: one that has fetched
from it and handled everything this worker sent to it before (a record of this worker not handed to the lane —
sent by ``emit``, or while the lane was not in step — stops hand-over on that partition until the lane fetched
past it), so order per partition holds for this worker's records; it is handled once every lane handled the
fetch it came from (a stage sees it after what was fetched with its cause, as when it is fetched). A record of
another producer that the broker put between (seen at the confirmation) is handled when fetched, after ours, as
if ours had been sent a moment earlier; ours are then skipped when fetched, never handled twice. A record handed
over is acknowledged — and so committed — only when the consumer fetches it (then skipped, as handled), so a crash
in between makes the worker handle it again after the restart, as for any record handled but not committed.

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
from faust.types import TP

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


def _count_down(counts: dict[Any, int], key: Any) -> None:
    """One fewer of ``key`` in ``counts`` (the key goes at zero)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class SentRecord(NamedTuple):
    """An output as it was sent (logical topic, encoded key and value, headers) and the model it encodes; where
    it went (physical topic, the partition chosen at the send: None when the producer chose it), its CreateTime
    (seconds, whole milliseconds; None when the producer set it) and the future of the broker's ack."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, Any]]
    model: Any = None
    physical: str = ""
    partition: int | None = None
    timestamp: float | None = None
    future: Any = None


class LocalRecord:
    """A record this worker sent, handed to a lane in-process: what a lane reads of a fetched message. Its
    offset is -1 until the broker acknowledged it (:meth:`BatchLanes.confirm`)."""

    __slots__ = ("future", "headers", "key", "model", "offset", "partition", "timestamp", "topic", "tp", "value")

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
        self.future = sent.future


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
        # (agent, partition) → records handed over whose acks (offsets) have not come yet, in send order
        self._chain: dict[tuple[ProcessorAgent, Any], list[LocalRecord]] = {}
        # (agent, partition) → offsets past ``next_offset`` handled in-process (a record of another producer
        # came between): skipped when fetched
        self._ahead: dict[tuple[ProcessorAgent, Any], set[int]] = {}
        # records of this worker a lane reads that were not handed to it (it fetches them): per (agent,
        # partition) how many are not acknowledged yet, then the offset after the last one; per topic, those
        # sent to a partition the producer chose (not known before the ack)
        self._aside: dict[tuple[ProcessorAgent, Any], int] = {}
        self._aside_topic: dict[str, int] = {}
        self._resume: dict[tuple[ProcessorAgent, Any], int] = {}
        self._unconfirmed: list[Any] = []  # futures of the outputs sent and not confirmed yet
        self._confirming = asyncio.Lock()
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
        self._chain.clear()
        self._ahead.clear()

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
                        key = (agent, message.tp)
                        if message.offset < next_offset.get(key, -1) or self._handled_ahead(key, message.offset):
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
        # the outputs of this fetch (of every stage) are confirmed together: one wait for the broker per fetch
        if self._unconfirmed and not await self._confirmed():
            return
        self._acks.extend(shared)  # every lane reading them handled them: acknowledged with their state

    def _handled_ahead(self, key: tuple[ProcessorAgent, Any], offset: int) -> bool:
        """``offset`` was handed over to the agent past a record of another producer (see :meth:`confirm`)."""
        ahead = self._ahead.get(key)
        if not ahead or offset not in ahead:
            return False
        ahead.discard(offset)
        if not ahead:
            del self._ahead[key]
        if offset >= self.next_offset.get(key, -1):
            self.next_offset[key] = offset + 1
        return True

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
            if not await self.handle_batch(agent, records):
                self.forget()
                return False
        return True

    def _hand_over(self, sent: list[SentRecord]) -> None:
        """Queue each output for the lanes of this worker that read its topic and are in step on its
        partition (:meth:`_in_step`), before the broker acknowledged it: it is handled in-process at once, its
        offset known at :meth:`confirm`. A lane not in step fetches it, and takes nothing more of that partition
        in-process until it has (order per partition holds)."""
        assignment: set[Any] | None = None
        for record in sent:
            self._unconfirmed.append(record.future)
            agents = self.agents_of.get(record.physical)
            if not agents:
                continue
            if record.partition is None or record.timestamp is None:
                self._set_aside(record, agents)
                continue
            if assignment is None:
                assignment = set(self.runtime.app.consumer.assignment())
            tp = TP(record.physical, record.partition)
            if tp not in assignment:
                continue  # not ours to read: the worker that reads it fetches it
            local: LocalRecord | None = None
            for agent in agents:
                key = (agent, tp)
                if not self._in_step(key):
                    self._hold(key, record.future)
                    continue
                if local is None:
                    local = LocalRecord(tp, -1, record.timestamp, record)
                self._local.setdefault(agent, []).append(local)
                self._chain.setdefault(key, []).append(local)
                self.handed_over += 1

    def _in_step(self, key: tuple[ProcessorAgent, Any]) -> bool:
        """The agent has handled everything this worker sent to the partition before (fetched or in-process),
        and has fetched from the partition (it knows where it is)."""
        position = self.next_offset.get(key)
        return (
            position is not None
            and key not in self._aside
            and key[1].topic not in self._aside_topic
            and key not in self._ahead
            and position >= self._resume.get(key, 0)
        )

    def sent_aside(self, record: SentRecord) -> None:
        """A record sent outside a lane's batch (a processor's ``emit``): lanes reading it fetch it."""
        if self.hand_over:
            agents = self.agents_of.get(record.physical)
            if agents:
                self._set_aside(record, agents)

    def _set_aside(self, record: SentRecord, agents: list[ProcessorAgent]) -> None:
        if record.partition is not None:
            tp = TP(record.physical, record.partition)
            for agent in agents:
                self._hold((agent, tp), record.future)
            return
        topic = record.physical
        self._aside_topic[topic] = self._aside_topic.get(topic, 0) + 1

        def done(future: Any) -> None:
            _count_down(self._aside_topic, topic)
            if not future.cancelled() and future.exception() is None:
                metadata = future.result()
                tp = TP(topic, metadata.partition)
                for agent in agents:
                    self._resume_after((agent, tp), metadata.offset)

        record.future.add_done_callback(done)

    def _hold(self, key: tuple[ProcessorAgent, Any], future: Any) -> None:
        """Nothing more of ``key``'s partition is handed to its agent until it fetched past this record."""
        self._aside[key] = self._aside.get(key, 0) + 1

        def done(future: Any) -> None:
            _count_down(self._aside, key)
            if not future.cancelled() and future.exception() is None:
                self._resume_after(key, future.result().offset)

        future.add_done_callback(done)

    def _resume_after(self, key: tuple[ProcessorAgent, Any], offset: int) -> None:
        if offset >= self._resume.get(key, 0):
            self._resume[key] = offset + 1

    async def confirm(self) -> None:
        """Wait for the broker's acks of every output sent so far (raises when one failed), then give the
        records handed over their offsets. Where a record of another producer came between (its offset is not
        the next the agent expected), the agent handled ours first, as if it had been sent a moment later: the
        other is handled when fetched, and ours are skipped then (``_ahead``), not handled twice."""
        if not self._unconfirmed:
            return
        async with self._confirming:  # in send order: a later call waits for an earlier one
            futures, self._unconfirmed = self._unconfirmed, []
            chains, self._chain = self._chain, {}
            if futures:
                await asyncio.gather(*futures)
            next_offset = self.next_offset
            for key, handed in chains.items():
                expected = next_offset.get(key)
                if expected is None:
                    continue  # forgotten meanwhile (a new assignment): fetched, and handled, again
                ahead: set[int] | None = self._ahead.get(key)
                for local in handed:
                    offset = local.offset = local.future.result().offset
                    if ahead is None and offset == expected:
                        expected += 1
                    elif offset >= expected:
                        if ahead is None:
                            ahead = self._ahead.setdefault(key, set())
                        ahead.add(offset)
                    else:  # cannot happen: a record is never fetched before the fetch that sent it ends
                        log.error("%s[%d]@%d handed over below the expected %d", *key[1], offset, expected)
                next_offset[key] = expected

    async def _confirmed(self) -> bool:
        """:meth:`confirm`; False when an output failed (the worker is then stopping, commits frozen)."""
        try:
            await self.confirm()
        except Exception as exc:
            runtime = self.runtime
            runtime.freeze_commits()
            log.error("outputs not confirmed by the broker", exc_info=exc)
            runtime.fail(exc)
            self.forget()
            return False
        return True

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
            if type(message) is LocalRecord:  # its place is kept by confirm()
                model = message.model
                if model is None:
                    model = await topics.dead_letters.decode_or_dead_letter(
                        logical,
                        message.value,
                        key=raw_key,
                        partition=message.partition,
                        offset=message.offset,
                        physical_topic=physical,
                    )
            else:
                tp_key = (agent, message.tp)
                if message.offset >= next_offset.get(tp_key, -1):
                    next_offset[tp_key] = message.offset + 1
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
            if self.hand_over:
                # handed over now, confirmed with the fetch (or before a checkpoint: before state and offsets
                # move on), in bounded lots
                self._hand_over(chunk.sent)
                if len(self._unconfirmed) >= CHUNK_RECORDS:
                    await self.confirm()
            else:
                await asyncio.gather(*chunk.pending)  # outputs confirmed before state and offsets move on
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
        before it; each checkpoint stores its keys before acknowledging its messages.) Every output sent so far
        is confirmed first (again under each agent's lock, right before its state is read): no state is stored,
        and no message acknowledged, that covers a handling whose outputs the broker has not got."""
        while self._unconfirmed:
            await self.confirm()
        touched, self._touched = self._touched, {}
        acks, self._acks = self._acks, []
        self._last_checkpoint = time.perf_counter()
        for agent, keys in touched.items():
            if agent is held:
                while self._unconfirmed:
                    await self.confirm()
                self._store(agent, keys)
            else:
                async with agent.lock:
                    while self._unconfirmed:
                        await self.confirm()
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
