"""The generic Faust worker: runs :class:`meltica.live.processor.Processor` objects as agents over Kafka.

For each processor, one agent over one stream of all its input topics (raw bytes, decoded with the core
codec; a malformed message goes to the DLQ with its reason, is counted, and the agent goes on). Each
message becomes an :class:`Incoming` (logical topic, key, value, partition, offset, broker timestamp);
``processor.handle`` is awaited inside a tracing span (child of the message's ``traceparent``, named
``<processor>.handle <topic>``); every :class:`Outgoing` is encoded and sent, in order, with the span's
context in its headers, and (``confirm_outputs``, the default) acknowledged by the broker before the
processor's state is stored and the message is acknowledged — so a stored state never runs ahead of
the messages it produced. Delivery is at least once: after a crash, messages since the last commit are
handed over again and the processor drops what it already handled.

Offsets (:class:`ConsumerGuard`): faust-streaming 0.15.3 drops fetched records (e.g. right after the
seek to the committed offsets that ends a recovery), then books the jump in offsets as a "gap" it
counts as acknowledged, so a commit ran past messages no agent had handled (lost after a SIGKILL
restart or a failover). The worker's consumer never hands an input partition's record over past the
next expected offset: it seeks back and reads the skipped range again (a non-compacted input has no
real holes; a jump still there after :attr:`ConsumerGuard.HOLE_RETRIES` re-reads is accepted as one). Events
of an older consumer generation, which Faust skips but acknowledges, add no offset to commit.

State: a changelogged Faust table ``<name>-state`` (in-memory store, rebuilt from the changelog on start
and after every rebalance). After each message ``table[key] = snapshot(key)`` (JSON bytes; deleted when
the snapshot becomes ``None``, unchanged values are not rewritten). After each recovery and before the
agent takes its first message, ``processor.restore(key, state)`` is called for every key whose stored
state differs from what the processor holds (i.e. keys of newly assigned partitions). A table's changelog
must have as many partitions as the source topics that write it (Faust co-partitioning), so inputs with a
different partition count (``control``: 1) get their own table ``<name>-state-p<n>``; a key must not
appear on inputs of two partition counts.

Lifecycle: ``processor.start(emit)`` before the first message (``emit`` publishes spontaneous output);
on SIGTERM/SIGINT (:func:`run_worker`) the worker stops taking messages (a message taken after that is
neither handled nor committed), lets the in-flight one finish, calls every ``processor.stop()``
(sinks flush), publishes a final stats record, commits offsets and exits 0. An exception from ``handle``
is a bug or an outage: the message is not acknowledged, the worker shuts down the same way and exits 1.

Stats: :mod:`meltica.live.worker_stats` (topic ``<prefix>meltica.worker-stats``, read by ``meltica status``).

Control: by default ``control`` is one more input of the consumer group (one process hears a message).
With ``control: broadcast`` (always for live deployments) every process reads every control message
itself (:class:`ControlBroadcast`, from the end: durable state such as the kill switch is read from the
database at start), so a kill switch reaches every worker.

Stop watchdog: once a stop began (SIGTERM, SIGINT or a failure), a worker still stopping after
``stop_deadline`` seconds (default 30) logs it and exits 1 at once.

Stall watchdog (:class:`StallWatchdog`): a worker that holds input partitions with unhandled messages
(their log end is past the last message an agent finished) and hands no message to any agent for
``stall_deadline`` seconds (default 120; not counting rebalances) — or whose event loop stops turning for
that long — logs where every agent and task waits (as SIGUSR1 does) and exits 3 (:data:`STALLED`), so its
supervisor restarts it and the group gives its partitions to a live consumer: a worker that keeps its
partitions and does nothing loses no message but stops the pipeline without a word.

Run a live deployment's worker: ``python -m streams.worker --settings FILE --worker NAME`` (the settings
file of ``meltica live start``: accounts, ``risk:``, ``live.workers``; refused with exit 2, naming every
missing limit, when the settings fail ``check_live``). Or a free-standing worker:
``python -m streams.worker --config FILE [--app-id ID] [--factory module:function]``. Config (YAML
or JSON)::

    app_id: meltica-pipeline          # Faust app id = consumer group (--app-id overrides)
    bootstrap: 127.0.0.1:19092        # default MELTICA_KAFKA_BOOTSTRAP, else the local dev broker
    topic_prefix: "paper."            # default MELTICA_TOPIC_PREFIX
    factory: package.module:function  # (config: dict) -> Iterable[Processor]  (--factory overrides)
    params: {...}                     # free-form, for the factory
    tracing: none                     # none | console | otlp
    stats_interval: 5.0               # seconds between stats records
    confirm_outputs: true
    batch_inputs: true                # a fetched batch at a time (streams/lanes.py); false: one Faust event at a time
    hand_over: true                   # with batch_inputs: outputs read by a lane of this worker handed over in-process
    fetch_max_wait_ms: 5              # the consumer's fetch wait (null: Faust's 1500)
    control: group                    # group | broadcast (every process hears every control message)
    stop_deadline: 30                 # seconds a stop may take before the process exits 1 (0: no limit)
    stall_deadline: 120               # seconds without progress while input waits before it exits 3 (0: never)
    faust: {}                         # extra Faust settings
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import yaml
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2
from faust.exceptions import ProducerSendError
from faust.types import EventT

from meltica.live import tracing
from meltica.live.processor import Incoming, Outgoing, Processor
from meltica.live.worker_stats import ProcessorStats, WorkerStats, ensure_stats_topic, stats_topic_name
from meltica.messaging.catalogue import PREFIX_ENV, Catalogue
from meltica.messaging.codec import Codec
from streams.app import make_app
from streams.lanes import CHECKPOINT_SECONDS, FETCH_MAX_WAIT_MS, BatchLanes, SentRecord, set_fetch_max_wait
from streams.topics import StreamTopics, incoming_of

log = logging.getLogger(__name__)

STATE_SUFFIX = "-state"
CONTROL = "control"
STOP_DEADLINE = 30.0
"""Seconds a stopping worker may take before the watchdog ends the process (exit 1)."""
STALL_DEADLINE = 120.0
"""Seconds a worker may hand over no message while its partitions hold unread input (exit :data:`STALLED`)."""
STALLED = 3
"""Exit code of a worker the stall watchdog ended."""


GC_THRESHOLDS = (5000, 10, 100)
"""The worker's garbage-collector thresholds (``gc.set_threshold``), set once start-up is frozen."""

STATE_RECORD_MAX_BYTES = 16 * 1024 * 1024
"""The largest state one processor keeps for one key: it is one record of the state table's changelog. The
producer and the changelog topics take records this large (Kafka's default is 1 MB: a strategy host holding
thousands of unanswered orders after a backlog wrote 1.0 MB, Faust's producer buffer crashed on it and the
worker stalled); a larger state stops the worker with :class:`StateTooLargeError`, which names the processor and key."""
_RECORD_OVERHEAD = 64 * 1024  # key, headers and batch framing around the state

PRODUCER_MAX_BATCH_BYTES = 1024 * 1024
"""The producer's batch size per partition (Faust's default is 16 kB). A stage's outputs of one fetch are sent
one after another before the worker awaits anything, so at 1,000 orders/s a 16 kB batch filled up and every
further send waited for the sender task to take it (``MessageAccumulator.add_message`` → ``wait_drain``: a timer
and a context switch per full batch, ≈ 3 % of the trading worker's CPU) and each fetch went out as many small
batches. Records still go out at once (linger 0); a larger batch only means fewer, fuller ones
(``bench/live_pipeline_bench.py``: 5-46 % less worker CPU per bar with an order on every bar, 4 pairs of runs)."""


class StateTooLargeError(RuntimeError):
    """A processor's state for one key is larger than :data:`STATE_RECORD_MAX_BYTES`."""


def _state_json(state: Mapping[str, Any] | None) -> bytes | None:
    if state is None:
        return None
    return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()


class ProcessorAgent:
    """One processor as a Faust agent with its state tables."""

    def __init__(self, runtime: WorkerRuntime, processor: Processor) -> None:
        self.runtime = runtime
        self.processor = processor
        self.name = processor.name
        self.lock = asyncio.Lock()  # one message at a time; recovery restores never interleave with handle
        self.stats: ProcessorStats = runtime.stats.add(processor.name, tuple(processor.inputs))
        self.doing = "not started"  # what the agent is doing now (logged on SIGUSR1)
        self._started = False
        self._start_lock = asyncio.Lock()
        self._stopped = False
        catalogue = runtime.catalogue
        self.partitions_of: dict[str, int] = {}  # physical topic → partitions
        self.logical_of: dict[str, str] = {}  # physical → logical
        # Broadcast control: every worker process reads ``control`` itself (ControlBroadcast), not
        # through the consumer group, so the agent's Faust stream leaves it out.
        self.hears_control = runtime.control is not None and CONTROL in processor.inputs
        for name in processor.inputs:
            if self.hears_control and name == CONTROL:
                continue
            spec = catalogue.spec(name)
            physical = catalogue.topic_name(spec.name)
            self.partitions_of[physical] = spec.partitions
            self.logical_of[physical] = spec.name
        counts = sorted(set(self.partitions_of.values()), reverse=True)
        app = runtime.app
        self.tables: dict[int, Any] = {}
        for index, count in enumerate(counts):
            table_name = f"{self.name}{STATE_SUFFIX}" if index == 0 else f"{self.name}{STATE_SUFFIX}-p{count}"
            table = app.Table(
                table_name,
                default=None,
                key_type=bytes,  # bytes → raw serializers: keys are UTF-8, values our JSON
                value_type=bytes,
                partitions=count,
                help=f"state of processor {self.name} (Processor.snapshot per key)",
                # applied when Faust creates the changelog topic (an existing one keeps its own setting)
                extra_topic_configs={"max.message.bytes": str(STATE_RECORD_MAX_BYTES + _RECORD_OVERHEAD)},
            )
            table.on_recover(self._restorer(table))
            self.tables[count] = table
        self.agent: Any = None
        self.coroutine: Any = None
        if self.partitions_of:
            self.topic = app.topic(
                *self.partitions_of,
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
            )
            self.agent = app.agent(self.topic, name=f"meltica.{self.name}")(self._run)

    # --- lifecycle -------------------------------------------------------------------------------

    async def ensure_started(self) -> None:
        async with self._start_lock:
            if not self._started:
                self._started = True
                await self.processor.start(self.emit)
                log.info("processor %s started (inputs %s)", self.name, ", ".join(self.processor.inputs))

    async def stop(self) -> None:
        if self._started and not self._stopped:
            self._stopped = True
            await self.processor.stop()
            log.info("processor %s stopped", self.name)

    def _restorer(self, table: Any) -> Any:
        async def restore_after_recovery() -> None:
            await self.ensure_started()
            async with self.lock:
                restored = 0
                for raw_key, raw_state in list(table.items()):
                    if raw_state is None:
                        continue
                    key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                    if _state_json(self.processor.snapshot(key)) == bytes(raw_state):
                        continue  # the processor already holds exactly this (a partition it kept)
                    self.processor.restore(key, json.loads(raw_state))
                    restored += 1
                log.info("processor %s: restored %d key(s) from table %s", self.name, restored, table.name)

        return restore_after_recovery

    # --- the agent -------------------------------------------------------------------------------

    async def _run(self, stream: Any) -> None:
        # The consuming coroutine is kept so SIGUSR1 can show where it waits (a Faust actor's task hides it).
        self.coroutine = self._consume(stream)
        await self.coroutine

    async def _consume(self, stream: Any) -> None:
        await self.ensure_started()
        self.doing = "waiting for a message"
        # Faust acks an event when the loop asks for the next one, and also when the loop is left
        # (cancelled at shutdown): an event we must not handle is parked here with commits frozen, so
        # its ack never reaches the broker.
        async for event in stream.events():
            self.runtime.progress += 1
            self.doing = f"took {_where(event)}"
            if self.runtime.stopping:
                self.runtime.freeze_commits()
                await self.runtime.wait_forever()  # cancelled by app.stop()
            failure: BaseException | None = None
            async with self.lock:
                try:
                    await self.process(event)
                except Exception as exc:
                    failure = exc
            self.runtime.progress += 1
            message = event.message
            self.runtime.handled[message.tp] = max(self.runtime.handled.get(message.tp, 0), message.offset + 1)
            self.doing = f"waiting for a message (last {_where(event)})"
            if failure is not None:
                self.runtime.freeze_commits()  # the failed message is handed over again after a restart
                self.stats.errors += 1
                log.error("processor %s failed on %s", self.name, _where(event), exc_info=failure)
                self.runtime.fail(failure)
                await self.runtime.wait_forever()

    async def process(self, event: EventT[Any]) -> None:
        message = event.message
        physical = message.topic
        logical = self.logical_of[physical]
        model = await self.runtime.topics.decode_event(logical, event)
        if model is None:
            self.stats.dead_lettered(logical)
            return
        incoming = incoming_of(message, logical, model)
        await self.handle_incoming(incoming, physical, message.headers, _where(event))
        if incoming.key is not None:
            self.store_state(self.partitions_of[physical], incoming.key)

    def span_attributes(self, incoming: Incoming, physical: str) -> dict[str, Any]:
        """The attributes of the span around ``processor.handle`` (also the batch lanes')."""
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.destination.name": physical,
            "messaging.kafka.partition": incoming.partition,
            "messaging.kafka.offset": incoming.offset,
            "meltica.processor": self.name,
        }
        if incoming.key is not None:
            attributes["messaging.kafka.message.key"] = incoming.key
        return attributes

    async def handle_incoming(self, incoming: Incoming, physical: str, headers: Any, where: str) -> None:
        """``processor.handle`` in a tracing span, its outputs sent (and confirmed), stats counted."""
        logical = incoming.topic
        attributes = self.span_attributes(incoming, physical) if tracing.records_spans() else None
        started = time.perf_counter()
        self.doing = f"handling {where}"
        with tracing.consume_span(f"{self.name}.handle {logical}", headers, attributes):
            outputs = await self.processor.handle(incoming)
            self.doing = f"sending {len(outputs)} output(s) of {where}"
            await self.runtime.send_all(outputs, self.stats)
        self.stats.handled(logical, time.perf_counter() - started)

    def store_state(self, partitions: int, key: str) -> None:
        """Write the processor's snapshot of ``key`` to its changelog-backed table (lanes call it too)."""
        table = self.tables[partitions]
        raw_key = key.encode()
        new = _state_json(self.processor.snapshot(key))
        if new is not None and len(new) > STATE_RECORD_MAX_BYTES:
            raise StateTooLargeError(
                f"the state of processor {self.name} for key {key!r} is {len(new):,} bytes, more than the "
                f"{STATE_RECORD_MAX_BYTES:,} one changelog record holds: it could not be stored, so it would be lost "
                "at a restart"
            )
        old = table.get(raw_key)
        if new is None:
            if old is not None:
                del table[raw_key]
        elif old is None or bytes(old) != new:
            table[raw_key] = new

    async def emit(self, outgoing: Outgoing) -> None:
        """Spontaneous output (the processor's ``emit``): sent at once, with the current trace context."""
        await self.runtime.send_all([outgoing], self.stats)


def _where(event: EventT[Any]) -> str:
    message = event.message
    return f"{message.topic}[{message.partition}]@{message.offset}"


def guard_inputs(app: faust.App, physical_topics: Iterable[str]) -> ConsumerGuard:
    """Put ``physical_topics`` (non-compacted inputs) under the app's :class:`ConsumerGuard`, installing
    one if the app has none yet: every Faust app of ours (workers, candle agents, sinks) needs it."""
    consumer = app.consumer
    guard: ConsumerGuard | None = getattr(consumer, "_meltica_guard", None)
    if guard is None:
        guard = ConsumerGuard(app, physical_topics)
        guard.install(consumer)
    else:
        guard.guarded.update(physical_topics)
    return guard


class ConsumerGuard:
    """Keeps Faust's consumer from committing offsets of input messages no agent handled.

    faust-streaming 0.15.3 loses messages in two places (seen as offsets committed past what was
    handled, after a SIGKILL restart or a failover):

    * fetched records never reach the streams: seen right after the seek to the committed offsets
      that ends a recovery, the first records handed over were 10-110 offsets past it
      (``Consumer.getmany`` drops a batch's records when the generation changes, the flow stops or
      the partition is not active, while aiokafka's position has moved past them). The jump is
      filed by ``_drain_messages`` as a "gap" (meant for compacted or transactional topics) and
      ``_new_offset`` counts a gap as acknowledged: the commit runs over messages nobody handled;
    * a stream skips events of an older consumer generation but still acknowledges them, so their
      offsets can be committed before they are fetched again and handled.

    * at the end of a recovery Faust resumes the stream partitions, seeks them to the committed offsets and
      only then calls ``flow_control.resume()`` — which clears every agent's queue even though the flow
      was already active (resumed when the changelogs were read). A record fetched in that window is
      dropped unhandled and unacknowledged; and ``_new_offset`` only holds a commit back when the first
      acknowledged offset is *more than one* past the committed one, so a single dropped record is
      committed over as soon as the next is acknowledged: lost. Seen as a worker that took over partitions
      (failover, restart), logged "Worker ready" and then never handled one message of them.

    The guard wraps ``getmany``: for a non-compacted input partition, a record past the next offset
    expected (the one after the last record handed over, or where a seek put the consumer) is not
    handed over; the partition is sought back to the expected offset and read again. Only if the
    same jump is still there after :data:`HOLE_RETRIES` re-reads is it taken as a real hole in the log. And it
    wraps ``ack``: acknowledging a message of an older generation only marks it acked, it adds no
    offset to commit. ``flow_control.resume()`` of a flow that is already active clears nothing, and
    ``_new_offset`` commits nothing on an input partition whose first acknowledged offset is past the
    committed one (a record at the head not acknowledged yet)."""

    HOLE_RETRIES = 3

    def __init__(self, app: faust.App, guarded_topics: Iterable[str]) -> None:
        self.app = app
        self.guarded = set(guarded_topics)
        self.expected: dict[Any, int] = {}  # TP → next offset to hand over
        self.holes: dict[Any, tuple[int, int, int]] = {}  # TP → (expected, got, times seen)
        self.rewinds = 0
        self.stale_acks = 0
        self.lanes: BatchLanes | None = None  # inputs handled a batch at a time (streams/lanes.py)
        self.start: dict[Any, int] = {}  # TP → where the consumer started at the last assignment (known ones)

    def install(self, consumer: Any) -> None:
        if getattr(consumer, "_meltica_guard", None) is self:
            return
        consumer._meltica_guard = self
        original_getmany = consumer.getmany
        original_perform_seek = consumer.perform_seek
        original_seek = consumer.seek
        original_ack = consumer.ack

        async def getmany(timeout: float) -> Any:
            rewound: set[Any] = set()
            diverted: dict[str, list[Any]] = {}
            lanes = self.lanes
            async for tp, message in original_getmany(timeout):
                if tp.topic in self.guarded:
                    if tp in rewound:
                        continue
                    expected = self.expected.get(tp)
                    if (
                        expected is not None
                        and message.offset > expected
                        and not self._accept_hole(tp, expected, message.offset)
                    ):
                        rewound.add(tp)
                        self.rewinds += 1
                        log.warning(
                            "%s[%d]: fetched offset %d but %d..%d were never handed over: reading them again",
                            tp.topic,
                            tp.partition,
                            message.offset,
                            expected,
                            message.offset - 1,
                        )
                        await original_seek(tp, expected)
                        continue
                    # a record below the expected offset (a batch fetched before a seek) moves nothing back
                    self.expected[tp] = max(message.offset + 1, expected or 0)
                if lanes is not None and lanes.takes(tp.topic):
                    diverted.setdefault(tp.topic, []).append(message)
                    continue
                yield tp, message
            if diverted and lanes is not None:
                await lanes.deliver(diverted)

        async def perform_seek() -> None:
            await original_perform_seek()
            await self._reset_expected(consumer)
            if self.lanes is not None:
                self.lanes.forget()  # a new assignment: what was handed over in-process says nothing now

        async def seek(partition: Any, offset: int) -> None:
            await original_seek(partition, offset)
            if partition.topic in self.guarded:
                self.expected[partition] = offset

        def ack(message: Any) -> bool:
            generation = self.app.consumer_generation_id
            if message.generation_id is not None and generation and message.generation_id != generation:
                if not message.acked:
                    message.acked = True  # no offset to commit: it is fetched and handled again
                    consumer._unacked_messages.discard(message)
                    self.stale_acks += 1
                return False
            return bool(original_ack(message))

        original_new_offset = consumer._new_offset

        def new_offset(tp: Any) -> int | None:
            if tp.topic in self.guarded:
                acked = consumer._acked[tp]
                committed = consumer._committed_offset.get(tp)
                if acked and committed is not None and min(acked) > committed:
                    return None  # the record at ``committed`` is not acknowledged yet: nothing to commit
            result: int | None = original_new_offset(tp)
            return result

        consumer.getmany = getmany
        consumer.perform_seek = perform_seek
        consumer.seek = seek
        consumer.ack = ack
        consumer._new_offset = new_offset
        self._keep_queues_on_resume(self.app.flow_control)

    @staticmethod
    def _keep_queues_on_resume(flow: Any) -> None:
        """``resume()`` clears the agents' queues only when the flow was suspended (the rebalance's events,
        sought again afterwards); resuming an active flow drops nothing fetched meanwhile."""
        if getattr(flow, "_meltica_guarded", False):
            return
        original_resume = flow.resume

        def resume() -> None:
            if flow.is_active():
                return
            original_resume()

        flow.resume = resume
        flow._meltica_guarded = True

    async def _reset_expected(self, consumer: Any) -> None:
        """After Faust sought every partition to its committed offset: expect exactly that offset
        (nothing committed: the log start, as ``consumer_auto_offset_reset`` is ``earliest``)."""
        assignment = consumer.assignment()
        for tp in list(self.expected):
            if tp not in assignment:
                del self.expected[tp]
        uncommitted = []
        for tp, offset in list(consumer._read_offset.items()):
            if tp.topic in self.guarded and tp in assignment:
                if offset is None:
                    uncommitted.append(tp)
                else:
                    self.expected[tp] = offset
        for tp in uncommitted:
            self.expected.pop(tp, None)  # unknown unless the log start is: any offset is taken
        if uncommitted and self.app.conf.consumer_auto_offset_reset == "earliest":
            try:
                earliest = await consumer.earliest_offsets(*uncommitted)
            except Exception as exc:
                log.warning("could not read the log start offsets: %r", exc)
            else:
                for tp, offset in earliest.items():
                    if offset is not None and offset >= 0:
                        self.expected[tp] = offset
        self.holes.clear()
        self.start = dict(self.expected)

    def _accept_hole(self, tp: Any, expected: int, got: int) -> bool:
        previous = self.holes.get(tp)
        times = previous[2] + 1 if previous is not None and previous[:2] == (expected, got) else 1
        self.holes[tp] = (expected, got, times)
        if times > self.HOLE_RETRIES:
            log.warning("%s[%d]: offsets %d..%d are not in the log: skipped", tp.topic, tp.partition, expected, got - 1)
            del self.holes[tp]
            return True
        return False


class ControlBroadcast:
    """Every control message to every worker process: ``control`` read without a consumer group.

    With one consumer group, a control partition is read by one process only: of several workers, one
    would hear a kill switch. Here each process reads every partition of ``control`` itself (manual
    assignment, no group, nothing committed), from ``start_offsets`` (taken before the processors read
    the durable state — the persisted kill switch — at start, so nothing falls between the two) or else
    from the end, and hands each message, in order, to every processor with ``control`` in its inputs.
    A malformed message goes to the DLQ; a processor's exception stops the worker (exit 1)."""

    def __init__(self, runtime: WorkerRuntime, start_offsets: Mapping[int, int] | None = None) -> None:
        self.runtime = runtime
        self.start_offsets = dict(start_offsets or {})
        self.physical = runtime.catalogue.topic_name(CONTROL)
        self.delivered = 0
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        agents = [agent for agent in self.runtime.agents.values() if agent.hears_control]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.runtime.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = await _partitions_of(consumer, self.physical)
            tps = [TopicPartition(self.physical, p) for p in partitions]
            consumer.assign(tps)
            for tp in tps:
                if tp.partition in self.start_offsets:
                    consumer.seek(tp, self.start_offsets[tp.partition])
                else:
                    await consumer.seek_to_end(tp)
            log.info("control: every message of %s goes to %s", self.physical, ", ".join(a.name for a in agents))
            for agent in agents:
                await agent.ensure_started()
            while not self.runtime.stopping:
                batches = await consumer.getmany(timeout_ms=500)
                for tp in sorted(batches, key=lambda t: t.partition):
                    for record in batches[tp]:
                        if self.runtime.stopping:
                            return
                        await self._deliver(agents, record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("control: reading %s failed", self.physical, exc_info=exc)
            self.runtime.fail(exc)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _deliver(self, agents: Sequence[ProcessorAgent], record: Any) -> None:
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        key = None if record.key is None else bytes(record.key).decode("utf-8", "replace")
        model = await self.runtime.topics.decode_or_dead_letter(
            CONTROL,
            record.value,
            key=record.key,
            partition=record.partition,
            offset=record.offset,
            physical_topic=record.topic,
        )
        if model is None:
            for agent in agents:
                agent.stats.dead_lettered(CONTROL)
            return
        timestamp = datetime.fromtimestamp(record.timestamp / 1000, UTC) if record.timestamp else None
        incoming = Incoming(
            topic=CONTROL,
            key=key,
            value=model,
            partition=record.partition,
            offset=record.offset,
            timestamp=timestamp,
        )
        for agent in agents:
            async with agent.lock:
                try:
                    await agent.handle_incoming(incoming, record.topic, list(record.headers or ()), where)
                except Exception as exc:
                    agent.stats.errors += 1
                    log.error("processor %s failed on %s", agent.name, where, exc_info=exc)
                    self.runtime.fail(exc)
                    return
        self.delivered += 1


async def _partitions_of(consumer: Any, topic: str) -> list[int]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise RuntimeError(f"no topic {topic}: create the topics first (meltica streams topics create)")
    return sorted(partitions)


async def control_end_offsets(bootstrap: str, physical_topic: str) -> dict[int, int]:
    """The end offset of every partition of ``control`` now: where :class:`ControlBroadcast` starts when the
    durable state is read after this call (nothing said in between is missed)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(physical_topic, p) for p in await _partitions_of(consumer, physical_topic)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        await consumer.stop()


class StallWatchdog:
    """Ends a worker that holds input partitions with unread messages but hands none over (module doc).

    Every ``deadline / 4`` seconds (a task on the worker's loop) it compares the agents' progress counter
    with the last check and asks the broker, on a connection of its own, for the log end of every input
    partition assigned to the worker; input is waiting when an end is past the last message an agent
    finished (or where the consumer started). No progress for ``deadline`` seconds while input waits: the worker logs
    its agents' and tasks' stacks and exits :data:`STALLED`. Time spent rebalancing, stopping or unable to
    ask the broker does not count (a broker outage is not this worker's fault; a restart would not help).
    A thread checks that the loop itself still turns: a task that blocks it for ``deadline`` seconds ends
    the worker the same way."""

    def __init__(self, runtime: WorkerRuntime, inputs: Iterable[str], deadline: float) -> None:
        self.runtime = runtime
        self.inputs = set(inputs)
        self.deadline = deadline
        self.interval = max(deadline / 4, 0.25)
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._tick = time.monotonic()  # last time the loop ran the heartbeat
        self._beat: asyncio.Task[None] | None = None
        self._consumer: Any = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
            self._beat = asyncio.ensure_future(self._heartbeat())
            self._thread = threading.Thread(target=self._watch_loop, name="stall-watchdog", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        self._stopped.set()
        task, self._task = self._task, None
        beat, self._beat = self._beat, None
        for running in (task, beat):
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await running
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()

    async def _heartbeat(self) -> None:
        """Proof for the thread that the loop turns: a task of its own, as the check below awaits the broker
        (a slow consumer start or offsets request is a turning loop, not a blocked one)."""
        while not self._stopped.is_set():
            self._tick = time.monotonic()
            await asyncio.sleep(self.interval)

    async def _run(self) -> None:
        progress, since = self.runtime.progress, time.monotonic()
        while not self._stopped.is_set():
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            runtime = self.runtime
            if runtime.stopping:
                return  # the stop watchdog takes over
            if runtime.progress != progress or getattr(runtime.app, "rebalancing", False):
                progress, since = runtime.progress, now
                continue
            waiting = await self._waiting_input()
            if not waiting:
                since = now  # nothing to do (or the broker cannot tell): not a stall
                continue
            if now - since >= self.deadline:
                self._expire(f"no message handed over for {now - since:.0f} s while input waits: {waiting}")

    async def _waiting_input(self) -> str:
        """The assigned input partitions whose log end is past the last message handled ("" if none, or if
        the broker cannot be asked)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        runtime = self.runtime
        start = runtime.guard.start if runtime.guard is not None else {}
        try:
            assignment = [tp for tp in runtime.app.consumer.assignment() if tp.topic in self.inputs]
            # where each partition's handling stands: after the last message an agent finished, else where
            # the consumer started (a fetched but unhandled message is still waiting)
            known = {
                tp: max(runtime.handled.get(tp, 0), start[tp]) if tp in start else runtime.handled[tp]
                for tp in assignment
                if tp in start or tp in runtime.handled
            }
            if not known:
                return ""
            if self._consumer is None:
                self._consumer = AIOKafkaConsumer(
                    bootstrap_servers=runtime.bootstrap, group_id=None, enable_auto_commit=False
                )
                await self._consumer.start()
            ends = await asyncio.wait_for(
                self._consumer.end_offsets([TopicPartition(tp.topic, tp.partition) for tp in known]),
                timeout=self.interval * 2,
            )
        except Exception as exc:
            log.warning("stall watchdog: cannot read the input's log end offsets: %r", exc)
            return ""
        behind = [
            f"{tp.topic}[{tp.partition}] {known[tp]}..{ends[TopicPartition(tp.topic, tp.partition)] - 1}"
            for tp in sorted(known, key=lambda t: (t.topic, t.partition))
            if ends.get(TopicPartition(tp.topic, tp.partition), 0) > known[tp]
        ]
        return ", ".join(behind)

    def _watch_loop(self) -> None:
        while not self._stopped.wait(self.interval):
            if self.runtime.stopping:
                return
            silent = time.monotonic() - self._tick
            if silent >= self.deadline + self.interval:
                self._expire(f"the event loop has not turned for {silent:.0f} s")

    def _expire(self, why: str) -> None:
        key = self.runtime.stats.key
        log.critical("worker %s stalled: %s: exiting %d so it is restarted (stall watchdog)", key, why, STALLED)
        with contextlib.suppress(Exception):
            if threading.current_thread() is threading.main_thread():
                _dump_tasks()
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(STALLED)


class WorkerRuntime:
    """What :func:`build_worker_app` wires around the Faust app: agents, stats, graceful stop."""

    def __init__(
        self,
        app: faust.App,
        app_id: str,
        bootstrap: str,
        catalogue: Catalogue,
        codec: Codec,
        *,
        stats_interval: float,
        confirm_outputs: bool,
        worker_id: str | None = None,
        control_broadcast: bool = False,
        control_offsets: Mapping[int, int] | None = None,
        stop_deadline: float = STOP_DEADLINE,
    ) -> None:
        self.app = app
        self.app_id = app_id
        self.catalogue = catalogue
        self.codec = codec
        self.topics = StreamTopics(app, catalogue=catalogue, codec=codec)
        # logical topic → its name on the broker
        self.physical_names = {name: topic.get_topic_name() for name, topic in self.topics.topics.items()}
        self._producer: Any = None
        self._key_hash: dict[bytes, int] = {}  # output key → its murmur2 hash (the producer's partitioner)
        self._tracked: set[str] = set()  # output topics the producer keeps in its metadata
        # Faust's exactly-once sends through a transactional producer per partition, which only Topic.send picks
        guarantee = app.conf.processing_guarantee
        self.direct_send = getattr(guarantee, "value", guarantee) != "exactly_once"
        self.stats = WorkerStats(app_id, worker_id)
        self.stats_interval = stats_interval
        self.confirm_outputs = confirm_outputs
        self.agents: dict[str, ProcessorAgent] = {}
        self.stopping = False
        self.failure: BaseException | None = None
        self.done = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self.bootstrap = bootstrap
        self.stats_topic = app.topic(
            stats_topic_name(catalogue.prefix),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        self._stats_ready = False  # the stats topic is known to exist (checked again until it does)
        self.guard: ConsumerGuard | None = None
        self.control: ControlBroadcast | None = ControlBroadcast(self, control_offsets) if control_broadcast else None
        self.stop_deadline = stop_deadline
        self._watchdog: threading.Timer | None = None
        self.progress = 0  # messages taken and finished by the agents (the stall watchdog's measure)
        self.handled: dict[Any, int] = {}  # TP → the offset after the last message an agent finished
        self.stall: StallWatchdog | None = None

    def add(self, processor: Processor) -> ProcessorAgent:
        if processor.name in self.agents:
            raise ValueError(f"two processors named {processor.name!r}")
        agent = self.agents[processor.name] = ProcessorAgent(self, processor)
        return agent

    async def send_all(self, outputs: Sequence[Outgoing], stats: ProcessorStats) -> None:
        """Encode and send in order; wait for the broker's acks when ``confirm_outputs``."""
        pending = await self.send_outputs(outputs, stats)
        if pending and self.confirm_outputs:
            await asyncio.gather(*pending)

    async def send_outputs(
        self, outputs: Sequence[Outgoing], stats: ProcessorStats, sent: list[SentRecord] | None = None
    ) -> list[Any]:
        """Encode and send in order; the futures of the broker's acks (not awaited here). ``sent`` gets
        each record as sent, in the same order (the batch lanes hand them over in-process); a record of a
        topic the lanes read that is not in ``sent`` is told to them (it is fetched, not handed over)."""
        pending = []
        # Faust's producer, not ``Topic.send``: the topics take raw bytes and no partition, so the record is
        # the same, without the channel's per-message future, sensors and callbacks (≈5 % of the trading
        # worker's CPU in bench/live_pipeline_bench.py)
        producer = self._producer or await self.app.maybe_start_producer()
        self._producer = producer
        lanes = self.guard.lanes if self.guard is not None else None
        for out in outputs:
            headers = dict(out.headers)
            if tracing.TRACEPARENT not in headers:
                tracing.inject(headers)
            key = out.key.encode()
            value = self.codec.encode(out.topic, out.value)
            header_list = list(headers.items())
            physical = self.physical_names[out.topic]
            # the partition and CreateTime are chosen here, not by the producer, so the lanes know where the
            # record goes before the broker acknowledges it (streams/lanes.py); the same partition the
            # producer's default partitioner picks
            partition = self._partition_of(producer, physical, key)
            timestamp_ms = int(time.time() * 1000)
            timestamp = timestamp_ms / 1000.0  # as a fetched record's (aiokafka's milliseconds / 1000)
            if self.direct_send:
                # aiokafka's producer under Faust's, as Faust's ``Producer.send`` calls it (headers only where the
                # broker takes them, a Kafka error raised as Faust's ``ProducerSendError``) without its per-record
                # ``on_produce_message`` signal (no receiver here), headers type check and float → ms round trip:
                # ≈ 3 % of the trading worker's CPU (bench/live_pipeline_bench.py, py-spy)
                try:
                    fut = await producer._ensure_producer().send(
                        physical,
                        value,
                        key=key,
                        partition=partition,
                        timestamp_ms=timestamp_ms,
                        headers=header_list if producer.allow_headers else None,
                    )
                except KafkaError as exc:
                    raise ProducerSendError(f"Error while sending: {exc!r}") from exc
            else:  # (no partition chosen here: Faust picks the transaction's producer by it)
                fut = await self.topics[out.topic].send(key=key, value=value, headers=header_list)
            pending.append(fut)
            record = SentRecord(out.topic, key, value, header_list, out.value, physical, partition, timestamp, fut)
            if sent is not None:
                sent.append(record)
            elif lanes is not None:
                lanes.sent_aside(record)
            stats.sent(out.topic)
        return pending

    def _track(self, client: Any, physical: str) -> None:
        """Keep ``physical`` in the producer's metadata (and, the first time, the state tables' changelogs).

        aiokafka asks the broker about every topic while it tracks none, then only about those it tracks, and
        tracks a topic only when a send finds it missing from what it knows: a topic it knew from the first
        (all-topics) answer drops out of its metadata at the next refresh, and a batch sent to it just then waits
        for a partition leader until another send to that topic: an output awaited before the next send never
        came (the worker stalled, exit 3, in 4 of 6 latency-bench capacity runs at load 4)."""
        if not self._tracked:
            for agent in self.agents.values():
                for table in agent.tables.values():
                    name = table.changelog_topic.get_topic_name()
                    client.client.add_topic(name)
                    self._tracked.add(name)
        client.client.add_topic(physical)
        self._tracked.add(physical)

    def _partition_of(self, producer: Any, physical: str, key: bytes) -> int | None:
        """The partition the producer's default partitioner gives ``key`` on ``physical`` (murmur2 of the key
        modulo the partition count; the hash remembered per key), or None when the producer has no metadata for
        the topic yet or partitions another way (then it picks, and the record is fetched, not handed over)."""
        if not self.direct_send:
            return None
        client = producer._ensure_producer()
        if physical not in self._tracked:
            self._track(client, physical)
        if not isinstance(client._partitioner, DefaultPartitioner):
            return None
        partitions = client._metadata.partitions_for_topic(physical)
        if not partitions:
            return None
        hashed = self._key_hash.get(key)
        if hashed is None:
            hashed = self._key_hash[key] = murmur2(key) & 0x7FFFFFFF
            if len(self._key_hash) > 100_000:
                self._key_hash.clear()  # keys are accounts, markets, positions: few; bounded all the same
        count = len(partitions)
        if count == max(partitions) + 1:
            return hashed % count
        return int(sorted(partitions)[hashed % count])

    # --- stats -----------------------------------------------------------------------------------

    def assigned(self) -> dict[str, list[int]]:
        try:
            assignment = self.app.consumer.assignment()
        except Exception:
            return {}
        out: dict[str, list[int]] = {}
        for tp in assignment:
            out.setdefault(tp.topic, []).append(tp.partition)
        return {topic: sorted(parts) for topic, parts in sorted(out.items())}

    async def publish_stats(self, state: str = "running") -> None:
        record = self.stats.record(state=state, interval=self.stats_interval, assigned=self.assigned())
        lanes = self.guard.lanes if self.guard is not None else None
        if lanes is not None:
            record["lanes"] = {
                "batches": lanes.batches,
                "records": lanes.records,
                "handed_over": lanes.handed_over,
                "checkpoints": lanes.checkpoints,
            }
        key, value = self.stats.encode(record)
        # The final record is what an operator (and `meltica streams status`) reads after the stop: a broker
        # that is slow to answer once (a leader moving, a busy machine) gets two more tries.
        attempts = 3 if state == "stopped" else 1
        for attempt in range(1, attempts + 1):
            try:
                if not self._stats_ready:
                    self._stats_ready = await asyncio.to_thread(
                        ensure_stats_topic, self.bootstrap, self.catalogue.prefix
                    )
                    if not self._stats_ready:
                        raise RuntimeError(f"the stats topic {self.stats_topic.get_topic_name()} could not be made")
                if self.stopping and state != "stopped":
                    # a timer's record that waited (for the topic) while the stop began: sent now it would land
                    # after the final one, and a reader takes a worker's last record for its state
                    return
                stats_name = self.stats_topic.get_topic_name()
                if self._tracked and stats_name not in self._tracked and self._producer is not None:
                    self._track(self._producer._ensure_producer(), stats_name)  # it exists now (see _track)
                fut = await self.stats_topic.send(key=key, value=value)
                await asyncio.wait_for(fut, timeout=max(self.stats_interval, 5.0))
                return
            except Exception as exc:  # telemetry must never stop the pipeline
                log.warning("could not publish worker stats (%s, attempt %d of %d): %r", state, attempt, attempts, exc)

    # --- stop ------------------------------------------------------------------------------------

    @staticmethod
    async def wait_forever() -> None:
        await asyncio.Future()

    def freeze_commits(self) -> None:
        """No offset commit from now on (Faust would commit events acked while cancelling agents).

        Faust's stop also waits until every event an agent took is acknowledged (``stream_wait_empty``),
        but an event taken after the stop began is parked unacknowledged on purpose (it must not be
        committed) and is only cancelled by that same stop: the wait never ended and the worker hung until
        the stop watchdog killed it (exit 1). With commits frozen there is nothing left to wait for (the
        in-flight messages were finished under the agents' locks), so that wait is skipped."""
        with contextlib.suppress(Exception):
            consumer = self.app.consumer
            if not getattr(consumer, "_meltica_frozen", False):

                async def no_commit(*_args: Any, **_kwargs: Any) -> bool:
                    return False

                async def nothing_to_wait_for() -> None:
                    return None

                # Faust's consumer has no hook for this: its own methods are replaced on this instance.
                consumer.commit = no_commit  # type: ignore[method-assign]
                consumer.wait_empty = nothing_to_wait_for  # type: ignore[method-assign]
                consumer._meltica_frozen = True  # type: ignore[attr-defined]

    def request_stop(self) -> None:
        """Start a graceful stop (idempotent; safe from a signal handler), under the watchdog."""
        if self._stop_task is None:
            self._arm_watchdog()
            self._stop_task = asyncio.ensure_future(self.graceful_stop())

    def _arm_watchdog(self) -> None:
        """A stop that has not finished after ``stop_deadline`` seconds ends the process (exit 1): a worker
        stuck in "stopping" (a venue call that never returns, a wedged consumer) must not wait for SIGKILL.
        A thread, so it fires even when the event loop is blocked."""
        if self._watchdog is not None or self.stop_deadline <= 0:
            return
        deadline = self.stop_deadline
        key = self.stats.key

        def expire() -> None:
            log.critical("worker %s still stopping after %.0f s: exiting now (watchdog)", key, deadline)
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            os._exit(1)

        self._watchdog = threading.Timer(deadline, expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def disarm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.request_stop()

    async def graceful_stop(self) -> None:
        """Stop taking messages, finish the in-flight ones, stop processors, commit, stop the app."""
        self.stopping = True
        log.info("worker %s stopping", self.stats.key)
        consumer = None
        with contextlib.suppress(Exception):
            consumer = self.app.consumer
            consumer.pause_partitions(consumer.assignment())
        for agent in self.agents.values():
            async with agent.lock:  # the in-flight message (if any) is handled and acked
                pass
        lanes = self.guard.lanes if self.guard is not None else None
        if lanes is not None:
            try:
                await lanes.checkpoint()  # what was handled: state stored and acknowledged before the commit
            except Exception:
                log.exception("final checkpoint failed: what it covered is handled again after the restart")
        if self.control is not None:
            await self.control.stop()
        for agent in self.agents.values():
            try:
                await agent.stop()
            except Exception:
                log.exception("processor %s failed to stop", agent.name)
        await self.publish_stats(state="stopped")
        if consumer is not None and not getattr(consumer, "_meltica_frozen", False):
            try:
                await consumer.commit()  # flushes the producer first, then commits acked offsets
            except Exception:
                log.exception("final commit failed")
        self.freeze_commits()
        with contextlib.suppress(Exception):
            await self.app.stop()
        log.info("worker %s stopped", self.stats.key)
        self.done.set()


_RUNTIMES: dict[int, WorkerRuntime] = {}


def runtime_of(app: faust.App) -> WorkerRuntime:
    """The :class:`WorkerRuntime` of an app made by :func:`build_worker_app`."""
    return _RUNTIMES[id(app)]


def build_worker_app(
    app_id: str,
    bootstrap: str,
    processors: Iterable[Processor],
    catalogue: Catalogue | None = None,
    *,
    codec: Codec | None = None,
    stats_interval: float = 5.0,
    confirm_outputs: bool = True,
    worker_id: str | None = None,
    control_broadcast: bool = False,
    control_offsets: Mapping[int, int] | None = None,
    stop_deadline: float = STOP_DEADLINE,
    batch_inputs: bool = True,
    hand_over: bool = True,
    fetch_max_wait_ms: int | None = FETCH_MAX_WAIT_MS,
    stall_deadline: float = STALL_DEADLINE,
    **faust_settings: Any,
) -> faust.App:
    """A Faust app (consumer group ``app_id``) running ``processors`` as agents; see the module doc.

    ``catalogue`` defaults to ``Catalogue()`` (prefix from ``MELTICA_TOPIC_PREFIX``). Extra keyword
    arguments are Faust settings (they override :func:`streams.app.make_app`'s and ours). The runtime
    (graceful stop, stats, failure) is :func:`runtime_of(app) <runtime_of>`. ``control_broadcast``: this
    process hears every ``control`` message (:class:`ControlBroadcast`, from ``control_offsets`` or the
    end) instead of the partitions the group gives it. ``stop_deadline``: the stop watchdog (0: none);
    ``stall_deadline``: the stall watchdog (0: none). ``batch_inputs``: inputs handled a fetched batch at a
    time (:mod:`streams.lanes`; else one Faust event at a time); ``hand_over``: the lanes hand a confirmed output
    to a lane of this worker that reads it without waiting for the fetch. ``fetch_max_wait_ms``: the consumer's fetch
    wait (None: Faust's 1500 ms)."""
    codec = codec or Codec(catalogue)
    catalogue = codec.catalogue
    settings: dict[str, Any] = {
        "table_standby_replicas": 0,  # in-memory store: a standby copy does not shorten recovery
        "producer_max_request_size": STATE_RECORD_MAX_BYTES + _RECORD_OVERHEAD,  # a state record (see there)
        "producer_max_batch_size": PRODUCER_MAX_BATCH_BYTES,
    }
    settings.update(faust_settings)
    app = make_app(bootstrap, app_id, **settings)
    runtime = WorkerRuntime(
        app,
        app_id,
        bootstrap,
        catalogue,
        codec,
        stats_interval=stats_interval,
        confirm_outputs=confirm_outputs,
        worker_id=worker_id,
        control_broadcast=control_broadcast,
        control_offsets=control_offsets,
        stop_deadline=stop_deadline,
    )
    for processor in processors:
        if not isinstance(processor, Processor):
            raise TypeError(f"{processor!r} is not a meltica.live.processor.Processor")
        runtime.add(processor)
    if not runtime.agents:
        raise ValueError("a worker needs at least one processor")
    if runtime.control is not None and not any(a.hears_control for a in runtime.agents.values()):
        runtime.control = None  # nobody to hand control messages to
    guarded = {
        physical
        for agent in runtime.agents.values()
        for physical, logical in agent.logical_of.items()
        if not catalogue.spec(logical).compacted  # a compacted log has real holes
    }
    runtime.guard = ConsumerGuard(app, guarded)
    runtime.guard.install(app.consumer)
    if batch_inputs:
        lanes = BatchLanes(runtime, hand_over=hand_over)
        for agent in runtime.agents.values():
            lanes.add(agent)
        runtime.guard.lanes = lanes
    if fetch_max_wait_ms is not None:
        set_fetch_max_wait(app, fetch_max_wait_ms)
    if stall_deadline > 0:
        inputs = {physical for agent in runtime.agents.values() for physical in agent.logical_of}
        runtime.stall = StallWatchdog(runtime, inputs, stall_deadline)

    @app.timer(stats_interval)  # type: ignore[untyped-decorator]  # faust ships no type information
    async def publish_worker_stats() -> None:
        if not runtime.stopping:
            await runtime.publish_stats()

    if batch_inputs:

        @app.timer(CHECKPOINT_SECONDS)  # type: ignore[untyped-decorator]  # faust ships no type information
        async def checkpoint_lanes() -> None:
            if not runtime.stopping and runtime.failure is None:
                try:
                    await lanes.maybe_checkpoint()
                except Exception as exc:  # state that cannot be stored: stop (exit 1), never run on without it
                    log.critical("worker %s: checkpoint failed: %s", runtime.stats.key, exc, exc_info=exc)
                    runtime.freeze_commits()
                    runtime.fail(exc)

    _RUNTIMES[id(app)] = runtime
    return app


async def run_worker(app: faust.App, *, install_signals: bool = True) -> int:
    """Start ``app`` and run until SIGTERM/SIGINT (graceful stop) or a processor failure; exit code."""
    runtime = runtime_of(app)
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    try:
        await app.start()
        # What start-up built (modules, the app, the processors' state) lives as long as the process: kept
        # out of every later full collection, which then scans only what the pipeline allocates (bench: the
        # one full collection of a 100 bars/s run went from 335 to 152 ms). Cyclic garbage among these
        # objects is never freed; start-up leaves little of it.
        gc.collect()
        gc.freeze()
        # Python's default thresholds (700, 10, 10) suit short scripts: a trading worker allocating ~50k objects
        # a second ran 70 young collections and, at 1,000 orders/s, 15 full ones (60-130 ms each) in 25 s. With
        # these, 2 full ones and young/middle pauses of at most ~16 ms (bench/live_pipeline_bench.py).
        gc.set_threshold(*GC_THRESHOLDS)
        # GC pauses in the stats record (they set the latency tail): those of the running worker only. Counted
        # from before the start, they showed start-up's full collections (the one above included: the "2 full, 60-170
        # ms" of the latency bench's runs were these, before any input was taken) as if taken while handling
        runtime.stats.gc.install()
        if runtime.control is not None:
            runtime.control.start()
        if runtime.stall is not None:
            runtime.stall.start()
        log.info("worker %s running: %s", runtime.stats.key, ", ".join(runtime.agents))
        await runtime.done.wait()
        runtime.disarm_watchdog()
        if runtime.stall is not None:
            await runtime.stall.stop()
        return 1 if runtime.failure is not None else 0
    finally:
        runtime.stats.gc.uninstall()


def _producer_state(app: faust.App) -> str:
    """What the app's Kafka producer holds back and why (batches per partition, leader, in flight)."""
    producer = app.producer._producer  # type: ignore[attr-defined]  # the aiokafka producer under Faust's
    if producer is None:
        return "not started"
    accumulator = producer._message_accumulator
    sender = producer._sender
    cluster = producer.client.cluster
    batches = {
        f"{tp.topic}[{tp.partition}]": (len(queue), cluster.leader_for_partition(tp), queue[0].remaining_linger())
        for tp, queue in accumulator._batches.items()
        if queue
    }
    task = sender._sender_task
    return (
        f"batches (count, leader, linger) {batches}; pending {len(accumulator._pending_batches)}; "
        f"in flight nodes {sorted(sender._in_flight)}; muted {sorted(str(tp) for tp in sender._muted_partitions)}; "
        f"sender {'done: ' + repr(task.exception()) if task is not None and task.done() else 'running'}"
    )


DUMP_DONE = "SIGUSR1 dump done"


def _dump_tasks() -> None:
    """SIGUSR1: log what each agent does and every asyncio task's await chain (why is a worker stuck?)."""
    for runtime in _RUNTIMES.values():
        for agent in runtime.agents.values():
            log.warning(
                "agent %s: %s (lock %s):\n  %s",
                agent.name,
                agent.doing,
                "held" if agent.lock.locked() else "free",
                "\n  ".join(_await_chain(agent.coroutine)),
            )
        with contextlib.suppress(Exception):
            log.warning("producer: %s", _producer_state(runtime.app))
    tasks = asyncio.all_tasks()
    for task in tasks:
        log.warning("task %s:\n  %s", task.get_name(), "\n  ".join(_await_chain(task.get_coro())))
    log.warning("%s (%d tasks)", DUMP_DONE, len(tasks))  # the end of the dump (what waits for it looks for this)


def _await_chain(awaitable: Any) -> list[str]:
    frames: list[str] = []
    while awaitable is not None and len(frames) < 40:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        frame = frame or getattr(awaitable, "gi_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "ag_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
            or getattr(awaitable, "it", None)  # a Faust actor wraps the agent's coroutine
        )
    return frames


# --- command line ------------------------------------------------------------------------------------


def load_config(path: str | Path) -> dict[str, Any]:
    """The worker config file (YAML or JSON) as a dict."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the worker config must be a mapping")
    return data


def load_factory(spec: str) -> Any:
    """``package.module:function`` → the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must be 'module:function', got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def resolve_config(config: Mapping[str, Any], app_id: str | None = None, factory: str | None = None) -> dict[str, Any]:
    """Defaults filled in: ``app_id``, ``bootstrap``, ``topic_prefix``, ``factory``."""
    from meltica.messaging.admin import default_bootstrap

    resolved = dict(config)
    resolved["app_id"] = app_id or resolved.get("app_id") or "meltica-worker"
    resolved["bootstrap"] = resolved.get("bootstrap") or default_bootstrap()
    if resolved.get("topic_prefix") is None:
        resolved["topic_prefix"] = os.environ.get(PREFIX_ENV, "")
    resolved["factory"] = factory or resolved.get("factory")
    if not resolved["factory"]:
        raise ValueError("no processor factory: give 'factory: module:function' in the config or --factory")
    return resolved


def app_from_config(config: Mapping[str, Any]) -> faust.App:
    """Build the worker app from a resolved config (the factory makes the processors)."""
    tracing.configure_tracing(str(config.get("tracing") or "none"), service_name=f"meltica-{config['app_id']}")
    processors = list(load_factory(str(config["factory"]))(dict(config)))
    return build_worker_app(
        str(config["app_id"]),
        str(config["bootstrap"]),
        processors,
        Catalogue(prefix=str(config["topic_prefix"])),
        stats_interval=float(config.get("stats_interval", 5.0)),
        confirm_outputs=bool(config.get("confirm_outputs", True)),
        control_broadcast=_control_mode(config) == "broadcast",
        stop_deadline=float(config.get("stop_deadline", STOP_DEADLINE)),
        batch_inputs=bool(config.get("batch_inputs", True)),
        hand_over=bool(config.get("hand_over", True)),
        fetch_max_wait_ms=_fetch_max_wait(config),
        stall_deadline=float(config.get("stall_deadline", STALL_DEADLINE)),
        **dict(config.get("faust") or {}),
    )


def _fetch_max_wait(config: Mapping[str, Any]) -> int | None:
    value = config.get("fetch_max_wait_ms", FETCH_MAX_WAIT_MS)
    return None if value is None else int(value)


def _control_mode(config: Mapping[str, Any]) -> str:
    mode = str(config.get("control") or "group")
    if mode not in ("group", "broadcast"):
        raise ValueError(f"control: {mode!r}; use group or broadcast")
    return mode


async def app_from_settings(
    settings: Any,
    worker_name: str,
    *,
    stop_deadline: float = STOP_DEADLINE,
    stats_interval: float = 5.0,
    stall_deadline: float = STALL_DEADLINE,
) -> faust.App:
    """The worker ``worker_name`` of a live deployment (``settings`` already passed ``check_live``): app id
    ``meltica-<prefix>-<worker>``, the deployment's broker and topic prefix, the worker's stages built by
    :func:`streams.pipeline.build_live_processors`, every control message heard by this process.

    The control topic's end offsets are taken *before* the processors read the persisted kill switch, and
    control is read from there: a command published meanwhile is still heard."""
    from meltica.live import deployment
    from meltica.storage.engine import make_engine
    from streams.pipeline import build_live_processors

    worker = deployment.live_worker(settings, worker_name)
    bootstrap = deployment.kafka_bootstrap(settings)
    catalogue = Catalogue(prefix=deployment.topic_prefix(settings))
    app_id = deployment.app_id(settings, worker.name)
    tracing.configure_tracing("none", service_name=f"meltica-{app_id}")
    offsets = await control_end_offsets(bootstrap, catalogue.topic_name(CONTROL))
    engine = make_engine(deployment.database_url(settings))
    processors = await build_live_processors(settings, list(worker.stages), engine)
    return build_worker_app(
        app_id,
        bootstrap,
        processors,
        catalogue,
        stats_interval=stats_interval,
        control_broadcast=True,
        control_offsets=offsets,
        stop_deadline=stop_deadline,
        stall_deadline=stall_deadline,
        producer_linger=worker.linger_ms() / 1000.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.worker", description="Run Meltica processors on Kafka.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--settings", help="live deployment settings file (YAML); with --worker")
    source.add_argument("--config", help="worker config file (YAML or JSON; see the module docstring)")
    parser.add_argument("--worker", help="the worker of live.workers to run (with --settings)")
    parser.add_argument("--app-id", help="Faust app id = consumer group (overrides the config; --config only)")
    parser.add_argument("--factory", help="processor factory module:function (overrides the config; --config only)")
    parser.add_argument(
        "--stop-deadline",
        type=float,
        default=None,
        help=f"seconds a stop may take before the process exits 1 (default {STOP_DEADLINE:.0f}; 0: no limit)",
    )
    parser.add_argument(
        "--stall-deadline",
        type=float,
        default=None,
        help=f"seconds without progress while input waits before the process exits {STALLED} to be restarted "
        f"(default {STALL_DEADLINE:.0f}; 0: never)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    from meltica.secrets import install_log_redaction

    # Every secret resolved in this process (credentials, database password) is scrubbed from its log
    # records and from uncaught tracebacks, whichever mode it runs in.
    install_log_redaction()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.settings:
        return _main_settings(parser, args)
    config = resolve_config(load_config(args.config), app_id=args.app_id, factory=args.factory)
    if args.stop_deadline is not None:
        config["stop_deadline"] = args.stop_deadline
    if args.stall_deadline is not None:
        config["stall_deadline"] = args.stall_deadline

    async def run() -> int:
        app = app_from_config(config)
        return await run_worker(app)

    return asyncio.run(run())


REFUSED = 2
"""Exit code of a worker that refuses to start (settings not fit for live trading, state unreadable)."""


def _main_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from meltica.errors import ConfigurationError
    from meltica.live.deployment import live_worker, load_live_settings
    from streams.pipeline import StartRefusedError

    if not args.worker:
        parser.error("--settings needs --worker NAME (a name from live.workers)")
    try:
        settings = load_live_settings(args.settings)
        live_worker(settings, args.worker)
    except ConfigurationError as exc:
        print(f"worker {args.worker}: refusing to start: {exc}", file=sys.stderr)
        return REFUSED
    deadline = STOP_DEADLINE if args.stop_deadline is None else args.stop_deadline

    async def run() -> int:
        try:
            app = await app_from_settings(
                settings,
                args.worker,
                stop_deadline=deadline,
                stall_deadline=STALL_DEADLINE if args.stall_deadline is None else args.stall_deadline,
            )
        except (ConfigurationError, StartRefusedError) as exc:
            log.critical("worker %s: refusing to start: %s", args.worker, exc)
            return REFUSED
        return await run_worker(app)

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
