"""The market-data ingest process of a live deployment: ``python -m streams.ingest --config FILE``.

``FILE`` is the deployment's settings YAML (``live:`` section; see ``meltica.live.ingest_setup`` for
what is subscribed). The process runs :class:`~meltica.live.marketdata.MarketDataIngest` as a processor
of the generic worker (``streams.worker``): consumer group ``<topic_prefix>ingest`` on ``control``
(``SubscribeCommand``; the runtime subscription set is kept in the worker's changelogged state table),
venue streams published on ``md.trades`` / ``md.candles.1m`` / ``md.ticker`` / ``md.book`` keyed
``exchange:symbol``, and ``MarketStatus`` on ``control``. Worker stats go to ``meltica status``.

Before it starts it reads the tail of ``md.candles.1m`` for the newest bar of every market it will
stream (:func:`last_bars_on_topic`): a restart publishes no bar twice, and the bars of its downtime are
fetched by REST before the first new one. SIGTERM/SIGINT stop it gracefully (exit 0); a bad settings
file exits 2 with every problem named.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from meltica.config.loader import check_live, load_settings
from meltica.config.settings import MelticaSettings
from meltica.errors import ConfigurationError
from meltica.live.ingest_setup import ingest_from_settings, ingest_subscriptions
from meltica.live.marketdata import CANDLES_1M, MarketDataIngest
from meltica.messaging.catalogue import Catalogue
from meltica.messaging.codec import Codec, MessageRejected

log = logging.getLogger("streams.ingest")

BOOTSTRAP_ENV = "MELTICA_KAFKA_BOOTSTRAP"


def bootstrap_of(settings: MelticaSettings) -> str:
    """``kafka.bootstrap_servers``, else ``MELTICA_KAFKA_BOOTSTRAP``, else the local dev broker."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    if os.environ.get(BOOTSTRAP_ENV):
        return os.environ[BOOTSTRAP_ENV]
    from meltica.messaging.admin import default_bootstrap

    return default_bootstrap()


def app_id_of(settings: MelticaSettings) -> str:
    """The ingest's consumer group: one per deployment (topic prefix)."""
    return f"{settings.live.topic_prefix}ingest"


async def last_bars_on_topic(
    bootstrap: str, catalogue: Catalogue, markets: Iterable[str], *, scan: int = 20_000, timeout: float = 60.0
) -> dict[str, datetime]:
    """Open time of the newest bar of each of ``markets`` (``exchange:symbol``) on ``md.candles.1m``,
    reading at most the last ``scan`` messages of each partition (a market not found there: none), for at
    most ``timeout`` seconds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    wanted = set(markets)
    codec = Codec(catalogue)
    topic = catalogue.topic_name(CANDLES_1M)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100)
    await consumer.start()
    found: dict[str, datetime] = {}
    try:
        # the catalogue's partition count: what `meltica streams topics create` made
        tps = [TopicPartition(topic, p) for p in range(catalogue.spec(CANDLES_1M).partitions)]
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if end[tp] > begin[tp]}
        for tp in todo:
            consumer.seek(tp, max(begin[tp], end[tp] - scan))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while todo:
            if loop.time() > deadline:
                log.warning(
                    "ingest: %s not read to its end within %gs: a bar may be published again after this restart "
                    "(the strategy host drops bars it already has)",
                    ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(todo)),
                    timeout,
                )
                break
            batch = await consumer.getmany(*todo, timeout_ms=1000)
            for messages in batch.values():
                for message in messages:
                    key = message.key.decode("utf-8", "replace") if message.key else ""
                    if key not in wanted or message.value is None:
                        continue
                    try:
                        bar = codec.decode(CANDLES_1M, message.value)
                    except MessageRejected:
                        continue
                    if key not in found or bar.ts > found[key]:
                        found[key] = bar.ts
            for tp in list(todo):
                if await consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return found


async def prepare(settings: MelticaSettings, bootstrap: str) -> tuple[MarketDataIngest, Catalogue]:
    """Topics made if missing, the last bars read, the ingest built (not started)."""
    from meltica.messaging.admin import create_topics

    catalogue = Catalogue(prefix=settings.live.topic_prefix)
    await asyncio.to_thread(create_topics, bootstrap, catalogue)
    markets = {sub.key for sub in ingest_subscriptions(settings) if sub.channel == "candles.1m"}
    last = await last_bars_on_topic(bootstrap, catalogue, markets) if markets else {}
    for key in sorted(markets):
        log.info("ingest %s: last bar on %s: %s", key, CANDLES_1M, last[key].isoformat() if key in last else "none")
    ingest = ingest_from_settings(settings, last_bars=last)
    return ingest, catalogue


async def run(settings: MelticaSettings, *, install_signals: bool = True) -> int:
    """Run the ingest until SIGTERM/SIGINT; the exit code."""
    from streams.worker import build_worker_app, run_worker

    bootstrap = bootstrap_of(settings)
    ingest, catalogue = await prepare(settings, bootstrap)
    subs = ", ".join(map(str, sorted(ingest.subscriptions))) or "nothing yet (SubscribeCommand on control)"
    log.info("ingest starting on %s (topics %s*): %s", bootstrap, catalogue.prefix, subs)
    app = build_worker_app(app_id_of(settings), bootstrap, [ingest], catalogue, worker_id="ingest")
    return await run_worker(app, install_signals=install_signals)


def load(config: str | Path) -> MelticaSettings:
    """The settings file, checked as every live process checks it, plus the ingest's own checks."""
    from meltica.live.ingest_setup import ingest_problems

    settings = check_live(load_settings(config_file=config), source=str(config))
    problems = ingest_problems(settings)
    if problems:
        raise ConfigurationError(f"{config}: " + "; ".join(problems), field="live.ingest")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streams.ingest", description="Market data from the venues onto the md.* topics."
    )
    parser.add_argument("--config", required=True, help="the deployment's settings YAML (live: section)")
    parser.add_argument("--log-level", default=None, help="default: the settings' log_level")
    args = parser.parse_args(argv)
    from meltica.secrets import install_log_redaction

    install_log_redaction()  # secrets resolved in this process never reach its logs or tracebacks
    try:
        settings = load(args.config)
    except ConfigurationError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    level: Any = (args.log_level or settings.log_level).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    install_log_redaction()  # again: the root logger's handlers exist now
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
