"""The live risk gate with real limits, across processes (issue 18 item 4): a live deployment from one
settings file (``python -m streams.worker --settings FILE --worker NAME``) with its risk gate in one worker
process, its execution stage in another, the sinks in a third, on the real broker and PostgreSQL (as the
runtime role), trading the Binance emulator (in this test process, its market driven over its admin API)
through ccxt. The test is the strategy (it produces ``orders.intents`` and reads ``orders.events``) and the
market-data feed (each price is set on the venue and published on ``md.candles.1m``).

* a pre-trade breach: an intent over ``max_order_notional`` is refused by the gate; the strategy side
  hears it (``orders.events``: the order rejected, reason naming the rule), it is recorded in
  ``risk_events``, and nothing of it reaches the venue, while an intent within the limits behind it does;
* a post-trade breach: after a fill on the venue, the price falls until the account's loss passes
  ``daily_loss_limit``; the gate trips the kill switch, publishes it on ``control``, and the execution
  worker (another process) cancels the resting order on the venue; the halt is stored in
  ``kill_switch_state``, new intents are refused, and an execution worker restarted afterwards still
  refuses an approved order (nothing reaches the venue).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, text

from meltica.domain import Bar, OrderIntent, OrderStatus, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.emulator.config import EmulatorAccount
from meltica.infra.kafka import KafkaEndpoint
from meltica.messaging.admin import create_topics
from meltica.messaging.catalogue import Catalogue
from meltica.messaging.codec import Codec
from meltica.messaging.schemas import OrderUpdate, RejectedIntent, SubmitRequest
from tests.integration.conftest import runtime_url_of
from tests.integration.polling import until
from tests.kit import LoggedProcess, child_environment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
KEY, SECRET = "risk-gate-key", "risk-gate-secret"
ACCOUNT, INSTANCE, SYMBOL, MARKET = "emu", "s1", "BTC/USDT", "binance:BTC/USDT"
START_PRICE = Decimal(50_000)
LIMITS = {
    "max_order_notional": 5000,
    "max_position_notional": 20000,
    "max_gross_exposure": 50000,
    "daily_loss_limit": 200,
}


# --- processes ------------------------------------------------------------------------------------


class Process(LoggedProcess):
    """A child process of the deployment, its output in a log file; its settings come from its file alone."""

    def __init__(self, args: list[str], log: Path) -> None:
        env = child_environment(
            drop=["MELTICA_DATABASE_URL"],
            drop_prefixes=("MELTICA_KAFKA", "MELTICA_TOPIC_PREFIX"),
            set_vars={"RG_EMULATOR_KEY": KEY, "RG_EMULATOR_SECRET": SECRET, "COLUMNS": "250"},
        )
        super().__init__(args, log, env)


def worker(settings: Path, name: str, log: Path) -> Process:
    return Process([sys.executable, "-m", "streams.worker", "--settings", str(settings), "--worker", name], log)


# --- the deployment ---------------------------------------------------------------------------------


@dataclass
class Deployment:
    settings: Path
    catalogue: Catalogue
    codec: Codec
    bootstrap: str
    database: Engine
    emulator: EmulatorServer
    logs: Path
    producer: Any
    processes: dict[str, Process]

    def start(self, name: str) -> Process:
        """``risk`` / ``exec``: a worker of the settings file; ``sinks``: ``meltica live sinks``."""
        n = sum(1 for p in self.logs.glob(f"{name}*.log"))
        log = self.logs / f"{name}-{n}.log"
        if name == "sinks":
            args = [sys.executable, "-m", "meltica", "live", "sinks", "--config", str(self.settings)]
            self.processes[name] = Process(args, log)
        else:
            self.processes[name] = worker(self.settings, name, log)
        return self.processes[name]

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in self.processes.values())

    async def send(self, logical: str, key: str, value: Any) -> None:
        topic = self.catalogue.topic_name(logical)
        await self.producer.send_and_wait(topic, key=key.encode(), value=self.codec.encode(logical, value))

    async def read(self, logical: str) -> list[Any]:
        """Every record of a topic so far, decoded."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.catalogue.topic_name(logical)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            out: list[Any] = []
            async with asyncio.timeout(30):
                while any([await consumer.position(tp) < end[tp] for tp in tps]):
                    for batch in (await consumer.getmany(*tps, timeout_ms=500)).values():
                        out += [self.codec.decode(logical, r.value) for r in batch]
            return out
        finally:
            await consumer.stop()

    async def updates_of(self, client_order_id: str) -> list[OrderUpdate]:
        return [
            u
            for u in await self.read("orders.events")
            if isinstance(u, OrderUpdate) and u.order.client_order_id == client_order_id
        ]

    async def price(self, price: Decimal, minute: datetime) -> None:
        """The market moves to ``price``: printed on the venue, and a 1m bar closing there on ``md.candles.1m``
        (what the gate values positions at)."""
        import aiohttp

        async with aiohttp.ClientSession() as http:
            body = {"symbol": "BTCUSDT", "ts_ms": int(time.time() * 1000), "price": str(price), "volume": "10"}
            async with http.post(
                self.emulator.rest_url + "/_emulator/market/open", json=body, headers=self.emulator.admin_headers()
            ) as resp:
                assert resp.status == 200, await resp.text()
        bar = Bar(
            exchange="binance",
            symbol=SYMBOL,
            timeframe="1m",
            ts=minute,
            open=price,
            high=price,
            low=price,
            close=price,
            volume=Decimal(10),
        )
        await self.send("md.candles.1m", MARKET, bar)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.database.connect() as conn:
            return list(conn.execute(text(sql), params).all())


def venue_orders(emulator: EmulatorServer) -> Callable[..., Awaitable[dict[str, str]]]:
    """The venue's orders of the account through ccxt's own binance class (a new client per call)."""

    async def fetch(open_only: bool = False) -> dict[str, str]:
        import ccxt.pro

        exchange = ccxt.pro.binance(
            {"apiKey": KEY, "secret": SECRET, "urls": {"api": emulator.ccxt_urls()}, "options": dict(CCXT_OPTIONS)}
        )
        try:
            orders = await (exchange.fetch_open_orders(SYMBOL) if open_only else exchange.fetch_orders(SYMBOL))
        finally:
            await exchange.close()
        return {o["clientOrderId"]: o["status"] for o in orders}

    return fetch


def intent(n: int, side: Side, quantity: str, price: str) -> SubmitRequest:
    now = datetime.now(UTC)
    order = OrderIntent(
        intent_id=f"{INSTANCE}:rg{n}:{int(now.timestamp() * 1000)}",
        account=ACCOUNT,
        strategy=INSTANCE,
        exchange="binance",
        symbol=SYMBOL,
        side=side,
        type=OrderType.LIMIT,
        quantity=Decimal(quantity),
        price=Decimal(price),
        created_at=now,
    )
    return SubmitRequest(request_id=order.intent_id, account=ACCOUNT, strategy=INSTANCE, ts=now, intent=order)


def this_minute() -> datetime:
    now = datetime.now(UTC)
    return now.replace(second=0, microsecond=0) - timedelta(minutes=1)


@pytest.fixture
def settings_of(
    kafka_endpoint: KafkaEndpoint, fresh_database: Engine, tmp_path: Path, unique_name: Callable[[str], str]
) -> Callable[[EmulatorServer], Path]:
    prefix = unique_name("riskgate") + "."
    create_topics(kafka_endpoint.bootstrap_servers, Catalogue(prefix=prefix))

    def write(emulator: EmulatorServer) -> Path:
        settings = {
            "environment": "staging",  # outside dev: the limits are required and checked
            "trading_mode": "live",
            "log_level": "INFO",
            "database_url": runtime_url_of(fresh_database),
            "kafka": {"bootstrap_servers": kafka_endpoint.bootstrap_servers},
            "symbols": [SYMBOL],
            "accounts": [
                {
                    "name": ACCOUNT,
                    "exchange": "binance",
                    "emulator_url": emulator.rest_url,
                    "api_key": "env:RG_EMULATOR_KEY",
                    "api_secret": "env:RG_EMULATOR_SECRET",
                }
            ],
            "risk": LIMITS,
            "live": {
                "topic_prefix": prefix,
                "instances": [
                    {"instance_id": INSTANCE, "strategy": "momentum", "account": ACCOUNT, "symbols": [SYMBOL]}
                ],
                "workers": [{"name": "risk", "stages": ["risk"]}, {"name": "exec", "stages": ["execution"]}],
                "reconcile": {"at_start": False, "after_reconnect": False, "interval_s": 0},
            },
        }
        path = tmp_path / "live.yaml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        return path

    return write


@asynccontextmanager
async def deployment(
    write_settings: Callable[[EmulatorServer], Path], kafka_endpoint: KafkaEndpoint, database: Engine, logs: Path
) -> AsyncIterator[Deployment]:
    from aiokafka import AIOKafkaProducer

    emulator = EmulatorServer(
        EmulatorConfig(
            accounts=[EmulatorAccount(ACCOUNT, KEY, SECRET)],
            default_balances={"USDT": Decimal(100_000), "BTC": Decimal(1)},
            initial_prices={"BTCUSDT": START_PRICE},
        )
    )
    await emulator.start()
    settings = write_settings(emulator)
    prefix = yaml.safe_load(settings.read_text())["live"]["topic_prefix"]
    catalogue = Catalogue(prefix=prefix)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_endpoint.bootstrap_servers, acks="all")
    await producer.start()
    logs.mkdir(exist_ok=True)
    d = Deployment(
        settings=settings,
        catalogue=catalogue,
        codec=Codec(catalogue),
        bootstrap=kafka_endpoint.bootstrap_servers,
        database=database,
        emulator=emulator,
        logs=logs,
        producer=producer,
        processes={},
    )
    try:
        for name in ("risk", "exec", "sinks"):
            d.start(name)
        for name in ("risk", "exec"):  # both hear control from here on; their partitions are assigned
            for needle in ("control: every message of", " running: "):
                await until(partial(d.processes[name].says, needle), f"{name} worker: {needle!r}", 120)
        await d.price(START_PRICE, this_minute())
        yield d
    finally:
        for process in d.processes.values():
            process.stop()
        await producer.stop()
        await emulator.stop()


# --- (a) a pre-trade limit ------------------------------------------------------------------------------


def test_an_intent_over_a_limit_is_refused_reported_recorded_and_never_reaches_the_venue(
    settings_of: Callable[[EmulatorServer], Path], kafka_endpoint: KafkaEndpoint, fresh_database: Engine, tmp_path: Path
) -> None:
    async def body() -> None:
        async with deployment(settings_of, kafka_endpoint, fresh_database, tmp_path / "logs") as d:
            venue = venue_orders(d.emulator)
            huge = intent(1, Side.BUY, "0.2", "50000")  # 10,000 notional > max_order_notional 5,000
            small = intent(2, Side.BUY, "0.01", "45000")  # within every limit: it rests on the venue
            await d.send("orders.intents", ACCOUNT, huge)
            await d.send("orders.intents", ACCOUNT, small)
            big_id, small_id = huge.intent.client_order_id, small.intent.client_order_id

            # the intent behind it reached the venue (same partition, in order): the pipeline sends orders
            resting = "the small order resting on the venue"
            await until(lambda: venue(open_only=True), resting, 120, 0.5, state=d.logs_text)
            assert set(await venue()) == {small_id}  # the refused one never reached the venue

            # the strategy side: its order rejected, with the rule in the reason
            what = "the refusal on orders.events"
            updates = await until(lambda: d.updates_of(big_id), what, 60, 0.5, state=d.logs_text)
            assert [u.order.status for u in updates] == [OrderStatus.REJECTED], updates
            assert updates[0].strategy == INSTANCE
            assert (updates[0].order.reason or "").startswith("risk: max_order_notional: "), updates[0].order
            rejected = [r for r in await d.read("orders.rejected") if isinstance(r, RejectedIntent)]
            assert [(r.intent.intent_id, r.decision.rule) for r in rejected] == [
                (huge.intent.intent_id, "max_order_notional")
            ]

            # recorded in the database (the sinks' copy of risk.decisions), and never an order at the venue
            def recorded() -> list[Any]:
                return d.rows(
                    "SELECT decision, rule, reason FROM risk_events WHERE intent_id = :i", i=huge.intent.intent_id
                )

            rows = await until(recorded, "the refusal in risk_events", 60, state=d.logs_text)
            assert [(r.decision, r.rule) for r in rows] == [("rejected", "max_order_notional")], rows
            assert "5000" in rows[0].reason
            stored = d.rows("SELECT status, exchange_order_id FROM orders WHERE client_order_id = :c", c=big_id)
            assert [(s.status, s.exchange_order_id) for s in stored] == [("rejected", None)], stored  # never sent

    asyncio.run(body())


def status_of(d: Deployment, coid: str) -> str | None:
    rows = d.rows("SELECT status FROM orders WHERE client_order_id = :c", c=coid)
    return rows[0].status if rows else None


async def long_with_a_resting_sell(d: Deployment) -> tuple[SubmitRequest, SubmitRequest]:
    """Through the gate: a buy of 0.08 BTC that fills on the venue at about 50,000 (4,040 notional, within every
    limit), and a sell of 0.01 that rests above the market."""
    venue = venue_orders(d.emulator)
    buy = intent(1, Side.BUY, "0.08", "50500")
    rest = intent(2, Side.SELL, "0.01", "60000")
    await d.send("orders.intents", ACCOUNT, buy)
    await d.send("orders.intents", ACCOUNT, rest)
    buy_id = buy.intent.client_order_id
    await until(lambda: status_of(d, buy_id) == "filled", "the buy filled", 120, state=d.logs_text)
    await until(lambda: venue(open_only=True), "the sell resting on the venue", 60, 0.5, state=d.logs_text)
    assert await venue(open_only=True) == {rest.intent.client_order_id: "open"}
    return buy, rest


# --- (b) a post-trade breach ------------------------------------------------------------------------------


def test_a_loss_breach_halts_the_execution_worker_which_cancels_on_the_venue_and_stays_halted_after_a_restart(
    settings_of: Callable[[EmulatorServer], Path], kafka_endpoint: KafkaEndpoint, fresh_database: Engine, tmp_path: Path
) -> None:
    async def body() -> None:
        async with deployment(settings_of, kafka_endpoint, fresh_database, tmp_path / "logs") as d:
            venue = venue_orders(d.emulator)
            buy, rest = await long_with_a_resting_sell(d)
            assert not d.rows("SELECT * FROM kill_switch_state WHERE mode <> 'off'")

            # The price falls 10 %: the account's 0.08 BTC lose about 400 > daily_loss_limit 200.
            await d.price(Decimal(45_000), this_minute() + timedelta(minutes=1))

            def breach() -> list[Any]:
                return d.rows("SELECT rule, reason FROM risk_events WHERE decision = 'breach'")

            rows = await until(breach, "the loss breach in risk_events", 90, state=d.logs_text)
            assert [r.rule for r in rows] == ["daily_loss_limit"], rows

            # the execution worker (another process) heard the halt on control and cancelled on the venue
            async def nothing_open() -> bool:
                return not await venue(open_only=True)

            await until(nothing_open, "no open order on the venue", 60, 0.5, state=d.logs_text)
            assert (await venue())[rest.intent.client_order_id] == "canceled"
            await until(lambda: status_of(d, rest.intent.client_order_id) == "cancelled", "the cancel stored", 60)
            assert d.processes["exec"].says("kill switch account:emu: off → halt")

            # the halt is stored where a worker that starts later reads it
            halted = d.rows("SELECT scope, mode, actor FROM kill_switch_state")
            assert [(r.scope, r.mode, r.actor) for r in halted] == [("account:emu", "halt", "risk-engine")], halted

            # a new intent is refused by the gate, rule kill_switch
            later = intent(3, Side.BUY, "0.001", "45000")
            await d.send("orders.intents", ACCOUNT, later)
            refused = await until(lambda: d.updates_of(later.intent.client_order_id), "the refusal", 60, 0.5)
            assert (refused[0].order.reason or "").startswith("risk: kill_switch"), refused[0].order

            # the execution worker restarted: it reads the halt and refuses an approved order itself
            assert d.processes["exec"].stop() == 0
            restarted = d.start("exec")
            for needle in ("control: every message of", " running: "):
                await until(partial(restarted.says, needle), f"the restarted exec worker: {needle!r}", 120)
            assert restarted.says("kill switch account:emu is halt")
            approved = intent(4, Side.BUY, "0.001", "45000")
            await d.send("orders.approved", ACCOUNT, approved)
            answered = await until(
                lambda: d.updates_of(approved.intent.client_order_id), "the restarted worker's answer", 90
            )
            assert [u.order.status for u in answered] == [OrderStatus.REJECTED], answered
            assert answered[0].order.reason == "kill switch halt", answered[0].order
            venue_now = await venue()
            assert approved.intent.client_order_id not in venue_now, venue_now
            assert set(venue_now) == {buy.intent.client_order_id, rest.intent.client_order_id}

    asyncio.run(body())


# --- (c) a post-trade breach while the risk tables cannot be written ---------------------------------------


def test_a_loss_breach_during_a_risk_table_outage_still_halts_the_execution_worker_and_is_stored_later(
    settings_of: Callable[[EmulatorServer], Path], kafka_endpoint: KafkaEndpoint, fresh_database: Engine, tmp_path: Path
) -> None:
    def tables(suffix_from: str, suffix_to: str) -> None:
        with fresh_database.begin() as conn:  # the owner role
            for table in ("kill_switch_state", "risk_events"):
                conn.execute(text(f"ALTER TABLE {table}{suffix_from} RENAME TO {table}{suffix_to}"))

    async def body() -> None:
        async with deployment(settings_of, kafka_endpoint, fresh_database, tmp_path / "logs") as d:
            venue = venue_orders(d.emulator)
            _buy, rest = await long_with_a_resting_sell(d)

            # An outage of the risk path's tables: neither the breach nor the kill switch can be written.
            tables("", "_away")
            try:
                await d.price(Decimal(45_000), this_minute() + timedelta(minutes=1))

                async def nothing_open() -> bool:
                    return not await venue(open_only=True)

                # the halt went out on control all the same: the execution worker cancelled on the venue
                await until(nothing_open, "no open order on the venue", 60, 0.5, state=d.logs_text)
                assert (await venue())[rest.intent.client_order_id] == "canceled"
                assert d.processes["risk"].says("breach(es) not recorded yet")
                assert d.processes["risk"].says("could NOT be stored; it holds in this process")
            finally:
                tables("_away", "")

            # The tables are back: the next price the gate hears writes the breach and the halt.
            await d.price(Decimal(44_900), this_minute() + timedelta(minutes=2))

            # The halt and the breach are separate writes (the kill switch's store, the gate's recorder): wait
            # for both, then check each holds exactly what the outage kept.
            def stored() -> tuple[list[Any], list[Any]] | None:
                halts = d.rows("SELECT scope, mode, actor FROM kill_switch_state")
                breaches = d.rows("SELECT rule FROM risk_events WHERE decision = 'breach'")
                return (halts, breaches) if halts and breaches else None

            found = await until(stored, "the halt and the breach stored after the outage", 60, state=d.logs_text)
            assert found is not None
            halted, rows = found
            assert [(r.scope, r.mode, r.actor) for r in halted] == [("account:emu", "halt", "risk-engine")], halted
            assert [r.rule for r in rows] == ["daily_loss_limit"], rows

    asyncio.run(body())
