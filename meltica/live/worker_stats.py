"""Per-processor counters of a worker and the stats records it publishes for ``meltica status``.

A worker counts, per processor: messages in and out by logical topic, dead letters by input topic,
handler errors, and the time ``handle`` took (a window of the last :data:`LATENCY_WINDOW` samples gives
p50/p99/max). Every ``interval`` seconds (and once more on shutdown) it publishes one JSON record to the
compacted topic ``<prefix>meltica.worker-stats`` keyed ``<app_id>/<worker_id>``: any process on any host
that reaches the broker reads the latest record of every worker (:func:`read_stats`), which a file
under ``.meltica/run`` would not give when workers of one group run on several machines. The topic is
outside the pipeline catalogue on purpose: it is operations telemetry, not a pipeline message, and the
worker creates it itself (1 partition, compact+delete, 1 day).

Record (``version`` 1)::

    {"version": 1, "app_id": "...", "worker_id": "host:pid", "host": "...", "pid": 123,
     "state": "running" | "stopped", "ts": "2026-...Z", "started_at": "...Z", "interval_s": 5.0,
     "assigned": {"<physical topic>": [partitions...]},
     "processors": {"<name>": {"inputs": [...], "in": {"<topic>": n}, "out": {"<topic>": n},
                               "dead_letters": {"<topic>": n}, "errors": n,
                               "rate_in": msg/s, "rate_out": msg/s (over the last interval),
                               "latency_ms": {"count": n, "p50": x, "p99": x, "max": x} | null}},
     "gc": {"gen2": {"count": n, "total_ms": x, "max_ms": x}, "gen1": {...}, "gen0": {...}}}

``gc``: the garbage collector's pauses in this process since the worker started (a full, generation-2
collection stops the event loop for a time that grows with the number of live objects: it sets the tail of
the pipeline's latency).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meltica.messaging.admin import admin_client

STATS_TOPIC = "meltica.worker-stats"
STATS_VERSION = 1
LATENCY_WINDOW = 4096
STATS_RETENTION_MS = 86_400_000
STATS_TOPIC_CONFIGS = {"cleanup.policy": "compact,delete", "retention.ms": str(STATS_RETENTION_MS)}


def stats_topic_name(prefix: str = "") -> str:
    return f"{prefix}{STATS_TOPIC}"


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    rank = max(1, round(q / 100 * len(ordered) + 0.4999999))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class ProcessorStats:
    """Counters of one processor in this worker (in-process; plain ints, no locking: one event loop)."""

    name: str
    inputs: tuple[str, ...]
    messages_in: Counter[str] = field(default_factory=Counter)
    messages_out: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    _last_in: int = 0
    _last_out: int = 0

    def handled(self, topic: str, seconds: float) -> None:
        self.messages_in[topic] += 1
        self.latencies.append(seconds)

    def sent(self, topic: str, count: int = 1) -> None:
        self.messages_out[topic] += count

    def dead_lettered(self, topic: str) -> None:
        self.messages_in[topic] += 1
        self.dead_letters[topic] += 1

    def latency_ms(self) -> dict[str, float | int] | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return {
            "count": len(ordered),
            "p50": round(_percentile(ordered, 50) * 1000, 3),
            "p99": round(_percentile(ordered, 99) * 1000, 3),
            "max": round(ordered[-1] * 1000, 3),
        }

    def snapshot(self, elapsed: float) -> dict[str, Any]:
        """The processor's part of a record; rates are over ``elapsed`` seconds since the last one."""
        total_in, total_out = sum(self.messages_in.values()), sum(self.messages_out.values())
        rate_in = (total_in - self._last_in) / elapsed if elapsed > 0 else 0.0
        rate_out = (total_out - self._last_out) / elapsed if elapsed > 0 else 0.0
        self._last_in, self._last_out = total_in, total_out
        return {
            "inputs": list(self.inputs),
            "in": dict(self.messages_in),
            "out": dict(self.messages_out),
            "dead_letters": dict(self.dead_letters),
            "errors": self.errors,
            "rate_in": round(rate_in, 3),
            "rate_out": round(rate_out, 3),
            "latency_ms": self.latency_ms(),
        }


class GcPauses:
    """Pause count, total and longest per generation, from ``gc.callbacks`` (:meth:`install` once per worker)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info.get("generation", 0)
        pause = (time.perf_counter() - self._started) * 1000
        self.count[generation] += 1
        self.total_ms[generation] += pause
        self.max_ms[generation] = max(self.max_ms[generation], pause)

    def snapshot(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "count": self.count[g],
                "total_ms": round(self.total_ms[g], 3),
                "max_ms": round(self.max_ms[g], 3),
            }
            for g in (2, 1, 0)
        }


class WorkerStats:
    """All processors of one worker; :meth:`record` builds the published JSON document."""

    def __init__(self, app_id: str, worker_id: str | None = None) -> None:
        self.app_id = app_id
        self.worker_id = worker_id or default_worker_id()
        self.processors: dict[str, ProcessorStats] = {}
        self.started_at = datetime.now(UTC)
        self._last_record = time.monotonic()
        self.gc = GcPauses()

    @property
    def key(self) -> str:
        return f"{self.app_id}/{self.worker_id}"

    def add(self, name: str, inputs: tuple[str, ...]) -> ProcessorStats:
        stats = self.processors[name] = ProcessorStats(name, inputs)
        return stats

    def record(
        self, *, state: str = "running", interval: float = 0.0, assigned: dict[str, list[int]] | None = None
    ) -> dict[str, Any]:
        now = time.monotonic()
        elapsed, self._last_record = now - self._last_record, now
        return {
            "version": STATS_VERSION,
            "app_id": self.app_id,
            "worker_id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": state,
            "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "started_at": self.started_at.isoformat().replace("+00:00", "Z"),
            "interval_s": interval,
            "assigned": assigned or {},
            "processors": {name: stats.snapshot(elapsed) for name, stats in self.processors.items()},
            "gc": self.gc.snapshot(),
        }

    def encode(self, record: dict[str, Any]) -> tuple[bytes, bytes]:
        """(key, value) for the stats topic."""
        return self.key.encode(), json.dumps(record, sort_keys=True).encode()


def read_stats(bootstrap: str, prefix: str = "", *, timeout_ms: int = 10_000) -> list[dict[str, Any]]:
    """The latest record of every worker in ``<prefix>meltica.worker-stats`` (empty if the topic is absent).

    Reads the one partition from the beginning to its end offset with kafka-python (no group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3 read_text on import
        # lazy: kafka-python (about 0.4 s) only when the stats topic is read or made
        from kafka import KafkaConsumer, TopicPartition

    topic = stats_topic_name(prefix)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=max(timeout_ms, 1000) + 5000,
        consumer_timeout_ms=timeout_ms,
    )
    latest: dict[str, dict[str, Any]] = {}
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_ms / 1000
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for message in records:
                    key = message.key.decode() if message.key else ""
                    if message.value is None:
                        latest.pop(key, None)
                        continue
                    try:
                        latest[key] = json.loads(message.value)
                    except ValueError:
                        continue
    finally:
        consumer.close()
    return [record for _key, record in sorted(latest.items())]


def record_age_seconds(record: dict[str, Any], now: datetime | None = None) -> float | None:
    try:
        ts = datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return ((now or datetime.now(UTC)) - ts).total_seconds()


def ensure_stats_topic(bootstrap: str, prefix: str = "", *, timeout_ms: int = 15_000) -> bool:
    """Create ``<prefix>meltica.worker-stats`` if it is missing (idempotent); ``True`` when it exists.

    Created up front with the admin client: a producer sending to a topic that does not exist yet
    waits for its metadata, and that wait must never hold up a worker."""
    # lazy: kafka-python (about 0.4 s) only when the stats topic is read or made
    from kafka.errors import TopicAlreadyExistsError

    topic = stats_topic_name(prefix)
    admin = admin_client(bootstrap, timeout_ms)
    try:
        if topic in set(admin.list_topics()):
            return True
        request = {topic: {"num_partitions": 1, "replication_factor": 1, "configs": dict(STATS_TOPIC_CONFIGS)}}
        response = admin.create_topics(request, timeout_ms=timeout_ms, raise_errors=False)
        for result in response["topics"]:
            if result.get("error_code", 0) not in (0, TopicAlreadyExistsError.errno):
                return False
        admin.wait_for_topics([topic], timeout_ms=timeout_ms)
        return True
    finally:
        admin.close()
