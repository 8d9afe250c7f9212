"""Sink agents: one Faust agent per sink topic, batching into :class:`meltica.live.sinks.SinkWriter`.

Each agent reads its topic with ``stream.noack_take(batch_size, within)``: a batch is handed over when
``batch_size`` events are buffered or ``within`` seconds passed, and **nothing is acknowledged by
Faust**. The agent decodes every event (``StreamTopics.decode_event``: a malformed one goes to the DLQ
and is counted), writes the decoded batch in one PostgreSQL transaction, and only after the commit
acks the batch's events (dead letters are flushed to the broker first). Faust commits an offset only
up to the first unacked event of the partition.

Exactly-once effects from at-least-once delivery: a crash at any point leaves the batch either
unwritten (its offsets uncommitted: it is delivered again and written) or written but not
committed (delivered again: the writer's ``ON CONFLICT`` keys — natural keys, event ids, the
decision's content hash — make the second write a no-op). Either way every fact is stored once.

Failures (classified by ``meltica.live.sinks.failure_kind``). A database outage is retried in place
with backoff, so the partition waits (lag grows, visibly) instead of skipping the batch. A batch the
database refuses as data (a constraint, a NUL byte in a text…) is bisected: the good messages are
written, each refused one goes to the DLQ with ``error_type="sink_rejected"`` (counted like decode
failures), so one poison message does not stop the sink. Anything else is a bug: the exception stops
the agent and the batch stays unacked (its offsets are never committed; a restart redelivers it).

Graceful shutdown flushes: Faust's ``stream_wait_empty`` (on by default, see ``streams/app.py``) makes
``app.stop()`` wait until every delivered event is acked while the agents keep running, so the last
partial batch is written and acked when its ``within`` expires, and the offsets are committed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust
from faust.streams import Stream
from faust.types import AgentT, EventT
from sqlalchemy import Engine

from meltica.live.processor import Incoming
from meltica.live.sinks import SINK_TOPICS, SinkWriter, failure_kind
from meltica.messaging.schemas import DeadLetter
from streams.topics import StreamTopics

log = logging.getLogger(__name__)

SINK_REJECTED = "sink_rejected"
_MAX_BACKOFF = 30.0


@dataclass
class SinkAgents:
    """What :func:`register_sinks` set up: the shared writer (row counts), the agents by topic, and per
    topic the events taken, batches handled, messages refused by the database (dead-lettered) and
    retries after an outage."""

    writer: SinkWriter
    agents: dict[str, AgentT[Any]] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)
    batches: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)


def _incoming(name: str, event: EventT[Any], model: Any) -> Incoming:
    message = event.message
    key = message.key
    return Incoming(
        topic=name,
        key=None if key is None else bytes(key).decode("utf-8", errors="replace"),
        value=model,
        partition=message.partition,
        offset=message.offset,
        timestamp=None if message.timestamp is None else datetime.fromtimestamp(message.timestamp, UTC),
    )


def register_sinks(
    app: faust.App,
    topics: StreamTopics,
    engine: Engine,
    *,
    batch_size: int = 500,
    within: float = 0.5,
    names: Sequence[str] = SINK_TOPICS,
    retry_delay: float = 0.5,
) -> SinkAgents:
    """Register one sink agent (``sink.<topic>``) per logical topic in ``names`` on ``app``.

    Returns the :class:`SinkAgents`; ``result.writer`` is the one :class:`SinkWriter` they share.
    """
    if batch_size < 1 or within <= 0:
        raise ValueError("batch_size must be >= 1 and within > 0")
    unknown = [n for n in names if n not in SINK_TOPICS]
    if unknown:
        raise ValueError(f"not sink topics: {unknown} (sinks: {', '.join(SINK_TOPICS)})")
    sinks = SinkAgents(writer=SinkWriter(engine))
    for name in names:
        sinks.agents[name] = app.agent(topics[name], name=f"sink.{name}")(
            _sink_agent(app, topics, sinks, name, batch_size, within, retry_delay)
        )
    from streams.worker import guard_inputs  # Faust drops fetched records after a recovery seek

    guard_inputs(app, [topics.catalogue.topic_name(n) for n in names if not topics.catalogue.spec(n).compacted])
    return sinks


def _sink_agent(
    app: faust.App,
    topics: StreamTopics,
    sinks: SinkAgents,
    name: str,
    batch_size: int,
    within: float,
    retry_delay: float,
) -> Any:
    physical = topics.catalogue.topic_name(name)

    async def dead_letter(event: EventT[Any], exc: BaseException) -> None:
        message = event.message
        letter = DeadLetter.build(
            topic=physical,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            raw=event.value or b"",
            reason=f"{type(exc).__name__}: {exc}"[:2000],
            error_type=SINK_REJECTED,
            ts=datetime.now(UTC),
        )
        await topics.dlq.send(key=physical.encode(), value=topics.codec.encode(topics.catalogue.dlq, letter))
        topics.dead_letters.counts[(physical, SINK_REJECTED)] += 1
        sinks.refused[name] += 1
        log.warning("sink %s refused %s[%s]@%s: %s", name, physical, message.partition, message.offset, exc)

    async def write(batch: list[tuple[Incoming, EventT[Any]]]) -> None:
        """Write ``batch``; retry outages in place; bisect a refused batch down to the refused messages."""
        delay = retry_delay
        while True:
            try:
                await sinks.writer.write_async([incoming for incoming, _ in batch])
                return
            except Exception as exc:
                kind = failure_kind(exc)
                if kind == "bug":
                    raise
                if kind == "outage":
                    sinks.retries[name] += 1
                    log.warning("sink %s: database unavailable (%s); retrying in %.1fs", name, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _MAX_BACKOFF)
                    continue
                if len(batch) == 1:
                    await dead_letter(batch[0][1], exc)
                    return
                half = len(batch) // 2
                await write(batch[:half])
                await write(batch[half:])
                return

    async def agent(stream: Stream[Any]) -> None:
        async for events in stream.noack_take(batch_size, within):
            letters_before = topics.dead_letters.total
            batch: list[tuple[Incoming, EventT[Any]]] = []
            for event in events:
                model = await topics.decode_event(name, event)
                if model is not None:
                    batch.append((_incoming(name, event, model), event))
            if batch:
                await write(batch)
            if topics.dead_letters.total != letters_before:
                await app.producer.flush()  # the dead letters are on the broker before their offsets commit
            for event in events:
                await stream.ack(event)
            sinks.events[name] += len(events)
            sinks.batches[name] += 1

    agent.__name__ = f"sink_{name.replace('.', '_')}"
    agent.__qualname__ = agent.__name__
    return agent


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streams.sinks --settings FILE`` (a live deployment: database, broker and topic prefix
    from its settings) or ``python -m streams.sinks --database-url URL [--app-id ID] [--bootstrap B]``.

    Its own consumer group (sinks scale and lag apart from the trading agents); without ``--settings`` the
    topic prefix comes from ``MELTICA_TOPIC_PREFIX``. Faust's ``Worker`` handles SIGTERM/SIGINT: agents stop,
    the last partial batches are written and acked, offsets committed.
    """
    import argparse
    import os

    from meltica.messaging.admin import default_bootstrap
    from meltica.messaging.catalogue import Catalogue
    from meltica.storage.engine import make_engine
    from streams.app import make_app

    parser = argparse.ArgumentParser(prog="python -m streams.sinks", description=main.__doc__)
    parser.add_argument("--settings", help="live deployment settings file (database, Kafka, topic prefix)")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--app-id", default=None)
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--within", type=float, default=0.5)
    args = parser.parse_args(argv)
    from meltica.live import deployment
    from meltica.secrets import install_log_redaction

    install_log_redaction()  # secrets resolved in this process never reach its logs or tracebacks
    if args.settings:
        from meltica.config import load_settings
        from meltica.errors import ConfigurationError

        try:
            settings = load_settings(config_file=args.settings)
        except ConfigurationError as exc:
            print(f"sinks: refusing to start: {exc}", file=sys.stderr)
            return 2
        database_url = args.database_url or deployment.database_url(settings)
        bootstrap = args.bootstrap or deployment.kafka_bootstrap(settings)
        app_id = args.app_id or deployment.app_id(settings, "sinks")
        catalogue = Catalogue(prefix=deployment.topic_prefix(settings))
    else:
        database_url = args.database_url or os.environ.get("MELTICA_DATABASE_URL")
        if not database_url:
            parser.error("--settings, --database-url or MELTICA_DATABASE_URL is required")
        bootstrap = args.bootstrap or os.environ.get("MELTICA_KAFKA_BOOTSTRAP") or default_bootstrap()
        app_id = args.app_id or "meltica-sinks"
        catalogue = Catalogue()
    deployment.register_url_password(database_url)
    app = make_app(bootstrap, app_id)
    topics = StreamTopics(app, catalogue)
    register_sinks(app, topics, make_engine(database_url), batch_size=args.batch_size, within=args.within)
    worker = faust.Worker(app, loglevel="INFO", quiet=True)
    worker.execute_from_commandline()  # exits the process when the worker stops
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
