"""The live pipeline end to end on the real broker: recorded real bars → Kafka → stream worker (strategy
host, risk gate, execution) → the exchange emulator through ccxt → order updates and fills → sinks in
PostgreSQL; equal to a backtest of the same strategy on the same bars (DESIGN.md §2). Plus the kill switch
over the control topic, and malformed messages dead-lettered while the pipeline goes on."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import subprocess
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from meltica.backtest import BacktestConfig, BarSeries, run_backtest
from meltica.domain import OrderStatus
from meltica.infra.kafka import KafkaEndpoint
from meltica.live.paper import run_paper, with_emulator_instrument, worker_command, worker_settings
from meltica.live.results import PaperRunCollector
from meltica.messaging import Catalogue, Codec, KillSwitchCommand, OrderUpdate, VenueProgress, market_key
from meltica.messaging.admin import create_topics
from meltica.messaging.schemas import EndOfReplayCommand

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
SYMBOL = "BTC/USDT"  # the shipped perpetual's bars, traded as the emulator's spot market


@pytest.fixture(scope="module")
def bars_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with gzip.open(DATA, "rt") as src:
        path.write_text("".join(itertools.islice(src, 241)))  # header + 4 hours of 1-minute bars
    return path


def _config(strategy: str, params: dict[str, Any], **extra: Any) -> BacktestConfig:
    run = uuid.uuid4().hex[:8]
    return BacktestConfig.create(
        strategy=strategy,
        params={"symbol": SYMBOL, **params},
        instance_id=f"{strategy}-{run}",
        account=f"e2e-{run}",
        exchange="binance",
        symbol=SYMBOL,
        initial_balances={"USDT": D(100_000), "BTC": D(1)},
        **extra,
    )


def _fills(fills: Any) -> list[tuple[Any, ...]]:
    return [(f.client_order_id, f.side, f.price, f.quantity, f.fee, f.ts) for f in fills]


def test_replay_through_kafka_worker_emulator_and_sinks_equals_the_backtest(
    bars_file: Path, kafka_endpoint: KafkaEndpoint, fresh_database: Engine, tmp_path: Path
) -> None:
    config = with_emulator_instrument(
        _config(
            "momentum",
            {"fast": 5, "slow": 20, "quantity": "0.1", "stop": "trailing", "stop_pct": "0.2"},
            taker_fee_bps=4,
            maker_fee_bps=2,
        )
    )
    run = run_paper(
        config,
        bars_file,
        bootstrap=kafka_endpoint.bootstrap_servers,
        venue="emulator",
        output=tmp_path / "paper",
        say=lambda line: None,
        timeout=300,
        database_url=fresh_database.url.render_as_string(hide_password=False),
        state_root=tmp_path,
    )
    backtest = run_backtest(config, BarSeries.from_file(bars_file, exchange="binance", symbol=SYMBOL, timeframe="1m"))

    assert run.bars_published == 240
    assert len(backtest.fills) >= 10
    assert _fills(run.result.fills) == _fills(backtest.fills)
    want = [(o.client_order_id, o.status, o.filled_quantity) for o in backtest.orders]
    assert [(o.client_order_id, o.status, o.filled_quantity) for o in run.result.orders] == want
    assert [(p.ts, p.equity) for p in run.result.equity] == [(p.ts, p.equity) for p in backtest.equity]
    # The same files as `meltica backtest --output`.
    for name in ("metrics.json", "orders.csv", "fills.csv", "equity.csv", "trades.csv", "report.html"):
        assert (tmp_path / "paper" / name).is_file(), name

    # The sinks stored exactly the run's orders and fills (the emulator's trade ids, the pipeline's states).
    with fresh_database.connect() as conn:
        stored_fills = conn.execute(
            text("SELECT client_order_id, price, quantity, fee FROM fills WHERE account = :a ORDER BY ts, trade_id"),
            {"a": config.account},
        ).all()
        stored_orders = dict(
            conn.execute(
                text("SELECT client_order_id, status FROM orders WHERE account = :a"), {"a": config.account}
            ).all()
        )
        candles = conn.execute(text("SELECT count(*) FROM candles")).scalar_one()
    assert sorted((r[0], r[1], r[2], r[3]) for r in stored_fills) == sorted(
        (f.client_order_id, f.price, f.quantity, f.fee) for f in backtest.fills
    )
    assert stored_orders == {o.client_order_id: o.status for o in backtest.orders}
    assert candles == 240


def test_paper_venue_grid_matches_the_backtest(bars_file: Path, kafka_endpoint: KafkaEndpoint, tmp_path: Path) -> None:
    config = _config("grid", {})
    run = run_paper(
        config,
        bars_file,
        bootstrap=kafka_endpoint.bootstrap_servers,
        venue="paper",
        max_bars=180,
        say=lambda line: None,
        timeout=300,
        state_root=tmp_path,
    )
    series = BarSeries.from_file(bars_file, exchange="binance", symbol=SYMBOL, timeframe="1m")
    backtest = run_backtest(config, list(series.bars())[:180])
    assert len(backtest.fills) >= 3
    assert _fills(run.result.fills) == _fills(backtest.fills)
    want = [(o.client_order_id, o.status, o.filled_quantity) for o in backtest.orders]
    assert [(o.client_order_id, o.status, o.filled_quantity) for o in run.result.orders] == want


# --- kill switch and dead letters on a running worker ------------------------------------------------


async def _drive_kill_switch(bootstrap: str, codec: Codec, config: BacktestConfig, bars: list[Any]) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    catalogue = codec.catalogue
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    consumer = AIOKafkaConsumer(
        catalogue.topic_name("orders.events"),
        catalogue.topic_name("dlq"),
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
    )
    await producer.start()
    await consumer.start()
    collector = PaperRunCollector(
        account=config.account,
        exchange=config.exchange,
        symbol=config.symbol,
        base="BTC",
        quote="USDT",
        initial_balances=config.balances(),
    )
    dead: list[Any] = []
    last_seq = 0
    cancelled_after_kill: set[str] = set()

    async def pump(until: Any, timeout: float = 90.0) -> None:
        nonlocal last_seq
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the pipeline did not get there in time"
            for tp, records in (await consumer.getmany(timeout_ms=100)).items():
                for record in records:
                    if tp.topic == catalogue.topic_name("dlq"):
                        dead.append(codec.decode("dlq", record.value))
                        continue
                    message = codec.decode("orders.events", record.value)
                    collector.on_message(message)
                    if isinstance(message, VenueProgress):
                        last_seq = max(last_seq, message.seq)
                    if isinstance(message, OrderUpdate) and message.order.status is OrderStatus.CANCELLED and kill_sent:
                        cancelled_after_kill.add(message.order.client_order_id)

    kill_sent = False
    key = market_key(config.exchange, config.symbol).encode()
    candles = catalogue.topic_name("md.candles.1m")
    try:
        # Garbage first: the agents dead-letter it and go on.
        await producer.send_and_wait(candles, key=key, value=b"{not json")
        await producer.send_and_wait(catalogue.topic_name("orders.intents"), key=b"x", value=b'{"schema":"Nope"}')
        half = len(bars) // 2
        for bar in bars[:half]:
            await producer.send(candles, key=key, value=codec.encode("md.candles.1m", bar))
        await producer.flush()
        await pump(lambda: collector.bars >= half and len(dead) >= 2)
        open_before = {c for c, o in collector.orders.items() if not o.status.is_terminal}
        kill = KillSwitchCommand(
            command_id=f"kill-{uuid.uuid4().hex[:8]}", actor="test", ts=datetime.now(UTC), mode="halt", reason="drill"
        )
        kill_sent = True
        await producer.send_and_wait(
            catalogue.topic_name("control"), key=b"global", value=codec.encode("control", kill)
        )
        await pump(lambda: open_before <= cancelled_after_kill)
        orders_at_kill = set(collector.orders)
        for bar in bars[half:]:
            await producer.send(candles, key=key, value=codec.encode("md.candles.1m", bar))
        end = EndOfReplayCommand(
            command_id="end",
            actor="test",
            ts=datetime.now(UTC),
            exchange=config.exchange,
            symbol=config.symbol,
            last_ts=bars[-1].ts,
            count=len(bars),
        )
        await producer.send_and_wait(catalogue.topic_name("control"), key=b"replay", value=codec.encode("control", end))
        await pump(lambda: collector.ended)
        return {
            "open_before": open_before,
            "new_orders_after_kill": set(collector.orders) - orders_at_kill,
            "open_after": {c for c, o in collector.orders.items() if not o.status.is_terminal},
            "dead": dead,
            "bars": collector.bars,
        }
    finally:
        await consumer.stop()
        await producer.stop()


def test_kill_switch_cancels_everything_and_bad_messages_are_dead_lettered(
    bars_file: Path, kafka_endpoint: KafkaEndpoint, tmp_path: Path
) -> None:
    _kill_switch_scenario(bars_file, kafka_endpoint, tmp_path)


def _kill_switch_scenario(bars_file: Path, kafka_endpoint: KafkaEndpoint, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    bootstrap = kafka_endpoint.bootstrap_servers
    config = _config("grid", {})
    prefix = f"e2e.{uuid.uuid4().hex[:8]}."
    catalogue = Catalogue(prefix=prefix)
    codec = Codec(catalogue)
    create_topics(bootstrap, catalogue)
    settings = worker_settings(config, bootstrap, prefix, app_id=f"e2e-kill-{uuid.uuid4().hex[:8]}")
    config_file = tmp_path / "worker.json"
    config_file.write_text(json.dumps(settings))
    bars = list(BarSeries.from_file(bars_file, exchange="binance", symbol=SYMBOL, timeframe="1m").bars())[:120]
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            worker_command(config_file),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MELTICA_TOPIC_PREFIX": prefix},
        )
        try:
            outcome = asyncio.run(_drive_kill_switch(bootstrap, codec, config, bars))
        finally:
            worker.terminate()
            try:
                code = worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()  # a worker that cannot stop must not outlive the test
                raise
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert outcome["open_before"], "grid had resting orders when the switch was thrown"
    assert not outcome["open_after"]
    assert not outcome["new_orders_after_kill"], "strategies kept submitting after halt"
    assert outcome["bars"] == len(bars)
    reasons = {d.topic: (d.error_type, d.reason) for d in outcome["dead"]}
    assert reasons[catalogue.topic_name("md.candles.1m")][0] == "invalid_json"
    assert reasons[catalogue.topic_name("orders.intents")][0] in ("not_an_envelope", "wrong_schema")
