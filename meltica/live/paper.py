"""``meltica paper``: the whole live pipeline on a replay of recorded bars, ending by itself.

One run: fresh topics under a run prefix (``paper.<run>.``), a stream worker process
(``python -m streams.worker``: candles, strategy host, risk gate, execution, sinks — the Faust shell
around ``meltica.live``), the venue (the in-process paper venue inside the worker, or the Binance
emulator served from this process and reached through ccxt), then the replay: the file's bars are
published to ``md.candles.1m`` (paced by ``speed``; 0 = as fast as the pipeline takes them) followed by
an ``EndOfReplayCommand``. This process reads ``orders.events`` while the run goes, prints live PnL and
the position, and when the execution agent reports the end of the replay it stops the worker (SIGTERM:
graceful) and writes the files ``meltica backtest --output`` writes.

The replay is lock-step (``meltica/live/README.md``), so the run's orders and fills equal the
backtest's on the same bars and settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import text

from meltica.backtest import BacktestConfig, write_report
from meltica.backtest.results import BacktestResult
from meltica.emulator import EmulatorConfig, EmulatorServer
from meltica.emulator.config import EmulatorAccount
from meltica.emulator.symbols import spec_for
from meltica.errors import MelticaError
from meltica.live.config import PipelineConfig
from meltica.live.results import PaperRunCollector
from meltica.marketdata.series import BarSeries
from meltica.messaging.admin import create_topics
from meltica.messaging.catalogue import Catalogue, market_key
from meltica.messaging.codec import Codec
from meltica.messaging.schemas import EndOfReplayCommand
from meltica.storage.engine import make_engine

Printer = Callable[[str], None]


class PaperRunError(MelticaError):
    default_reason = "paper_run_failed"


@dataclass
class PaperRun:
    """What a finished run hands back: the result, where the topics were, how long it took."""

    result: BacktestResult
    collector: PaperRunCollector
    prefix: str
    bars_published: int
    seconds: float
    worker_log: Path


def _bars_of(series: BarSeries, limit: int | None) -> list[Any]:
    bars = list(series.bars())
    return bars if limit is None else bars[:limit]


async def _publish(
    bootstrap: str, codec: Codec, bars: Sequence[Any], *, speed: float, exchange: str, symbol: str
) -> int:
    # lazy: aiokafka / kafka-python only in the paper run's own Kafka steps
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    # The run's topics are brand new: the first sends may meet a partition whose leader is still being
    # elected. The producer retries them itself, and a send that finally fails raises here (the run fails),
    # so its warning about that retry is dropped for this run's sends.
    startup = _LeaderElectionNoise(codec.catalogue.prefix)
    sender_log = logging.getLogger("aiokafka.producer.sender")
    sender_log.addFilter(startup)
    await producer.start()
    try:
        key = market_key(exchange, symbol).encode()
        topic = codec.catalogue.topic_name("md.candles.1m")
        started = time.monotonic()
        first = bars[0].ts if bars else None
        for bar in bars:
            if speed > 0 and first is not None:
                due = started + (bar.ts - first).total_seconds() / speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await producer.send(topic, key=key, value=codec.encode("md.candles.1m", bar))
        await producer.flush()
        end = EndOfReplayCommand(
            command_id=f"replay-end-{uuid.uuid4().hex[:12]}",
            actor="meltica paper",
            ts=datetime.now().astimezone(),
            exchange=exchange,
            symbol=symbol,
            last_ts=bars[-1].ts if bars else None,
            count=len(bars),
        )
        await producer.send_and_wait(
            codec.catalogue.topic_name("control"), key=b"replay", value=codec.encode("control", end)
        )
        return len(bars)
    finally:
        sender_log.removeFilter(startup)
        await producer.stop()


async def _collect(
    bootstrap: str,
    codec: Codec,
    collector: PaperRunCollector,
    *,
    say: Printer,
    report_every: int,
    worker: subprocess.Popen[bytes],
    timeout: float,
) -> None:
    # lazy: aiokafka / kafka-python only in the paper run's own Kafka steps
    from aiokafka import AIOKafkaConsumer

    topic = codec.catalogue.topic_name("orders.events")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    startup = _LeaderElectionNoise(topic)
    fetcher_log = logging.getLogger("aiokafka.consumer.fetcher")
    fetcher_log.addFilter(startup)
    await consumer.start()
    deadline = time.monotonic() + timeout
    try:
        last_report = 0
        while not collector.ended:
            if worker.poll() is not None:
                raise PaperRunError(f"the stream worker exited with code {worker.returncode} before the replay ended")
            if time.monotonic() > deadline:
                raise PaperRunError(f"the replay did not end within {timeout:.0f} s ({collector.bars} bars done)")
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batches.values():
                for record in records:
                    startup.over = True  # offsets were fetched: from now on every broker error is reported
                    collector.on_message(codec.decode("orders.events", record.value))
            if collector.bars - last_report >= report_every:
                last_report = collector.bars
                say(_live_line(collector))
    finally:
        fetcher_log.removeFilter(startup)
        await consumer.stop()


class _LeaderElectionNoise(logging.Filter):
    """Drops "NotLeaderForPartitionError" records about this run's brand-new topics (``topic``: a name or the
    run's prefix) until ``over``: the broker is still electing the new partitions' leaders and the client
    retries by itself. Any other record, and that error once ``over`` is set, is logged as usual."""

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic
        self.over = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.over:
            return True
        message = record.getMessage()
        if "NotLeaderForPartitionError" not in message:
            return True
        # ours when it names one of this run's topics, or no topic at all (the producer's "Got error produce
        # response: <class ...NotLeaderForPartitionError>"); an error about any other topic is kept
        names_no_topic = "TopicPartition" not in message and "topic=" not in message
        return not (self.topic in message or names_no_topic)


def _live_line(c: PaperRunCollector) -> str:
    equity = c.equity_now()
    start = c.equity[0].equity if c.equity else None
    pnl = "" if equity is None or start is None else f"  PnL {equity - start:+.2f}"
    return (
        f"bar {c.bars:>6}  close {c.last_close}  position {c.held():f} {c.base}  cash {c.cash():.2f} {c.quote}"
        f"  equity {equity if equity is None else f'{equity:.2f}'}{pnl}  fills {len(c.fills)}"
    )


def worker_command(config_file: Path) -> list[str]:
    """The stream worker's command line (``streams.worker``: meltica/ never imports Faust)."""
    return [sys.executable, "-m", "streams.worker", "--config", str(config_file)]


EMULATOR_SECRET_ENV = "MELTICA_PAPER_EMULATOR_SECRET"  # noqa: S105 — a variable name, not a secret
"""The run's emulator secret reaches the worker through its environment, never a file."""
EMULATOR_ADMIN_TOKEN_ENV = "MELTICA_PAPER_EMULATOR_ADMIN_TOKEN"  # noqa: S105 — a variable name, not a secret
"""So does the emulator's admin token (the worker's driver moves the market over the admin API)."""


def run_paper(
    config: BacktestConfig,
    data: Path,
    *,
    bootstrap: str,
    output: Path | None = None,
    speed: float = 0.0,
    max_bars: int | None = None,
    venue: str = "paper",
    say: Printer = print,
    report_every: int = 100,
    timeout: float = 3600.0,
    keep_topics: bool = False,
    state_root: Path | None = None,
    database_url: str | None = None,
) -> PaperRun:
    """Run ``config``'s strategy through the live pipeline on ``data`` (a candle file); see the module
    docstring. ``venue``: ``paper`` (in-process paper venue in the worker) or ``emulator`` (the Binance
    emulator, served from this process, through ccxt; the symbol must be a spot symbol it lists).
    ``database_url``: also run a sink worker (``python -m streams.sinks``) writing market data, orders,
    fills, positions and risk decisions there; the run returns once the database holds every order and
    fill of the run. Orders and fills are keyed by client order id and (account, trade id), so a run that
    stores them trades as account ``paper-<run>`` / instance ``<strategy>-<run>`` unless ``config`` names
    its own (a paper venue's trade ids restart with every run)."""
    if venue not in ("paper", "emulator"):
        raise PaperRunError(f"venue {venue!r}: expected paper or emulator")
    if venue == "emulator":
        config = with_emulator_instrument(config)
    series = BarSeries.from_file(data, exchange=config.exchange, symbol=config.symbol, timeframe=config.timeframe)
    bars = _bars_of(series, max_bars)
    if not bars:
        raise PaperRunError(f"{data}: no bars to replay")
    run = uuid.uuid4().hex[:10]
    if database_url is not None:
        fields = config.model_fields_set
        update: dict[str, Any] = {}
        if "account" not in fields:
            update["account"] = f"paper-{run}"
        if "instance_id" not in fields:
            update["instance_id"] = f"{config.strategy_instance}-{run}"
        config = config.model_copy(update=update)
    prefix = f"paper.{run}."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    state_dir = (state_root or Path(os.environ.get("MELTICA_STATE_DIR", ".meltica"))) / "paper" / run
    state_dir.mkdir(parents=True, exist_ok=True)
    instrument = config.market()
    collector = PaperRunCollector(
        account=config.account,
        exchange=config.exchange,
        symbol=config.symbol,
        base=instrument.base,
        quote=instrument.quote,
        initial_balances=config.balances(),
    )
    printed: list[str] = []

    def progress(line: str) -> None:
        # the final line after the replay repeats the last periodic one when nothing changed since: say it once
        if not printed or printed[-1] != line:
            printed.append(line)
            say(line)

    log_path = state_dir / "worker.log"
    api_key, api_secret = f"paper-{run}", secrets.token_hex(24)  # a throwaway key pair for this run's emulator
    t0 = time.monotonic()

    async def main() -> int:
        emulator = await _start_emulator(config, api_key, api_secret) if venue == "emulator" else None
        try:
            settings = worker_settings(
                config,
                bootstrap,
                prefix,
                app_id=f"meltica-paper-{run}",
                emulator_url=emulator.rest_url if emulator is not None else None,
                emulator_key=api_key,
            )
            config_file = state_dir / "worker.json"
            config_file.write_text(json.dumps(settings, indent=2))
            env = {**os.environ, "MELTICA_TOPIC_PREFIX": prefix, EMULATOR_SECRET_ENV: api_secret}
            if emulator is not None:
                env[EMULATOR_ADMIN_TOKEN_ENV] = emulator.admin_token
            with log_path.open("wb") as log, (state_dir / "sinks.log").open("wb") as sinks_log:
                worker = subprocess.Popen(worker_command(config_file), stdout=log, stderr=subprocess.STDOUT, env=env)
                sinks = None
                if database_url is not None:
                    # The URL (with its password) travels in the environment, not on the command line.
                    sinks = subprocess.Popen(
                        [sys.executable, "-m", "streams.sinks", "--app-id", f"meltica-paper-sinks-{run}"],
                        stdout=sinks_log,
                        stderr=subprocess.STDOUT,
                        env={**env, "MELTICA_DATABASE_URL": database_url},
                    )
                try:
                    collecting = asyncio.create_task(
                        _collect(
                            bootstrap,
                            codec,
                            collector,
                            say=progress,
                            report_every=report_every,
                            worker=worker,
                            timeout=timeout,
                        )
                    )
                    published = await _publish(
                        bootstrap, codec, bars, speed=speed, exchange=config.exchange, symbol=config.symbol
                    )
                    await collecting
                    if sinks is not None:
                        await _wait_stored(database_url or "", collector, sinks, timeout=min(timeout, 120.0))
                    return published
                finally:
                    await asyncio.to_thread(_stop_worker, worker)
                    if sinks is not None:
                        await asyncio.to_thread(_stop_worker, sinks)
        finally:
            if emulator is not None:
                await emulator.stop()

    published = asyncio.run(main())
    seconds = time.monotonic() - t0
    if collector.equity:
        progress(_live_line(collector))
    result = collector.result(
        strategy=config.strategy,
        params=dict(config.params),
        timeframe=config.timeframe,
        fill_model=config.fill_model_info(),
    )
    if output is not None:
        result.write_files(output)
        write_report(result, output, prices={config.symbol: [(b.ts, b.close) for b in bars]})
    if not keep_topics:
        _delete_topics(bootstrap, catalogue, say)
    return PaperRun(result, collector, prefix, published, seconds, log_path)


async def _wait_stored(
    database_url: str, collector: PaperRunCollector, sinks: subprocess.Popen[bytes], *, timeout: float
) -> None:
    """Until the database holds every order and fill the run produced (the sinks lag a little)."""
    engine = make_engine(database_url)
    want_orders, want_fills = len(collector.orders), len(collector.fills)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                orders = conn.execute(
                    text("SELECT count(*) FROM orders WHERE account = :a"), {"a": collector.account}
                ).scalar_one()
                fills = conn.execute(
                    text("SELECT count(*) FROM fills WHERE account = :a"), {"a": collector.account}
                ).scalar_one()
            if orders >= want_orders and fills >= want_fills:
                return
            if sinks.poll() is not None:
                raise PaperRunError(f"the sink worker exited with code {sinks.returncode}")
            if time.monotonic() > deadline:
                raise PaperRunError(
                    f"the sinks stored {orders}/{want_orders} orders and {fills}/{want_fills} fills "
                    f"within {timeout:.0f} s"
                )
            await asyncio.sleep(0.2)
    finally:
        engine.dispose()


def with_emulator_instrument(config: BacktestConfig) -> BacktestConfig:
    """The emulator lists its own spot instruments: trade exactly those filters in the paper run too."""
    spec = spec_for(config.symbol.replace("/", ""))
    instrument = spec.instrument(Decimal(0), Decimal(0)).model_copy(update={"exchange": config.exchange})
    if instrument.symbol != config.symbol:
        raise PaperRunError(f"the emulator lists {instrument.symbol}, not {config.symbol} (a spot symbol is needed)")
    return config.model_copy(update={"instrument": instrument})


async def _start_emulator(config: BacktestConfig, api_key: str, api_secret: str) -> Any:
    account = EmulatorAccount(config.account, api_key, api_secret, balances=dict(config.balances()), fees=config.fees())
    server = EmulatorServer(
        EmulatorConfig(
            accounts=[account],
            symbols=[config.symbol.replace("/", "")],
            fill_model=config.fill_model(),
        )
    )
    await server.start()
    return server


def worker_settings(
    config: BacktestConfig,
    bootstrap: str,
    prefix: str,
    *,
    app_id: str,
    emulator_url: str | None = None,
    emulator_key: str | None = None,
) -> dict[str, Any]:
    """The stream worker's configuration for a one-strategy paper run (``streams.pipeline``)."""
    pipeline = PipelineConfig.from_backtest(config, lockstep=True)
    params: dict[str, Any] = {"pipeline": json.loads(pipeline.model_dump_json())}
    if emulator_url is not None:
        account = pipeline.account(config.account)
        pipeline = pipeline.model_copy(
            update={"accounts": {config.account: account.model_copy(update={"venue": "emulator"})}}
        )
        params["pipeline"] = json.loads(pipeline.model_dump_json())
        params["emulators"] = {
            config.account: {
                "url": emulator_url,
                "api_key": emulator_key,
                "api_secret": f"env:{EMULATOR_SECRET_ENV}",
                "admin_token": f"env:{EMULATOR_ADMIN_TOKEN_ENV}",
            }
        }
    return {
        "app_id": app_id,
        "bootstrap": bootstrap,
        "topic_prefix": prefix,
        "factory": "streams.pipeline:build_processors",
        "params": params,
        "confirm_outputs": os.environ.get("MELTICA_CONFIRM_OUTPUTS", "1") == "1",
    }


def _stop_worker(worker: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(5)


def _delete_topics(bootstrap: str, catalogue: Catalogue, say: Printer) -> None:
    """Best effort: a leftover topic only costs disk, so a failure is reported, not raised."""
    # lazy: aiokafka / kafka-python only in the paper run's own Kafka steps
    from kafka.admin import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            names = [n for n in admin.list_topics() if n.startswith(catalogue.prefix)]
            if names:
                admin.delete_topics(names)
        finally:
            admin.close()
    except Exception as exc:
        say(f"warning: could not delete the run's topics {catalogue.prefix}*: {exc}")


__all__ = ["PaperRun", "PaperRunError", "run_paper", "worker_command", "worker_settings"]
