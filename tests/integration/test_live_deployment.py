"""One live deployment from one settings file (issue 11, "one configuration"), on the real broker and
PostgreSQL:

* a worker refuses settings without risk limits outside ``dev`` (exit 2, every missing limit named);
* credentials: ``env:`` references resolved for key and secret alike and registered for redaction; keys
  from the credential store (``meltica keys add``) used when the file names none;
* the risk gate of a live worker uses the file's ``risk:`` (a 150M-notional order is refused) and, like
  the strategy host, obeys the kill switch persisted in the database from the start; a database that
  cannot be read at start stops the worker from starting;
* an execution worker started while the kill switch is on sends nothing to the venue;
* with two execution workers (same app id), ``meltica kill on`` reaches both.

The accounts trade on ``exchange: paper`` (the in-process paper venue), so no exchange is needed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from meltica.config import load_settings
from meltica.domain import Bar, OrderIntent, OrderType, Side
from meltica.infra.kafka import KafkaEndpoint
from meltica.live import deployment
from meltica.live.processor import Incoming
from meltica.live.risk_gate import RiskGate
from meltica.live.strategy_host import StrategyHost
from meltica.messaging.admin import create_topics
from meltica.messaging.catalogue import Catalogue
from meltica.messaging.codec import Codec
from meltica.messaging.schemas import OrderUpdate, RejectionNotice, SubmitRequest
from meltica.risk import KillSwitch, KillSwitchStore
from meltica.secrets import Credentials, MasterKey, generate_master_key, install_log_redaction, redact
from meltica.storage.engine import make_engine
from streams.pipeline import StartRefusedError, build_live_processors, persisted_kill_switch
from tests.kit import LoggedProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
TS = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LIMITS = "risk:\n  max_order_notional: 1000\n  max_position_notional: 5000\n  max_gross_exposure: 10000\n"
LIMITS += "  daily_loss_limit: 500\n"


def write_settings(
    path: Path,
    *,
    environment: str = "dev",
    database_url: str | None = None,
    bootstrap: str | None = None,
    prefix: str = "live.",
    risk: str = LIMITS,
    accounts: str = "  - name: sim\n    exchange: paper\n",
    account: str = "sim",
    workers: str = "    - name: exec\n      stages: [execution]\n",
) -> Path:
    lines = [f"environment: {environment}", "trading_mode: live"]
    if database_url:
        lines.append(f"database_url: {database_url}")
    if bootstrap:
        lines.append(f"kafka:\n  bootstrap_servers: {bootstrap}")
    text = "\n".join(lines) + "\naccounts:\n" + accounts + risk
    text += (
        "live:\n"
        f'  topic_prefix: "{prefix}"\n'
        "  instances:\n"
        "    - instance_id: mom-1\n"
        "      strategy: momentum\n"
        f"      account: {account}\n"
        "      symbols: [BTC/USDT]\n"
        "  workers:\n" + workers + "  reconcile:\n    at_start: false\n"
    )
    path.write_text(text)
    return path


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def child_env(**extra: str) -> dict[str, str]:
    # The settings file is the whole configuration: no MELTICA_* override from the test's environment.
    overrides = ("MELTICA_ENV", "MELTICA_ENVIRONMENT", "MELTICA_DATABASE_URL", "MELTICA_TRADING_MODE")
    env = {k: v for k, v in os.environ.items() if k not in overrides and not (k.startswith("MELTICA_") and "__" in k)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def intent(quantity: str, price: str, *, n: int = 1, exchange: str = "paper") -> OrderIntent:
    return OrderIntent(
        intent_id=f"mom-1:{n}",
        account="sim",
        strategy="mom-1",
        exchange=exchange,
        symbol="BTC/USDT",
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=Decimal(quantity),
        price=Decimal(price),
        created_at=TS,
    )


def submit(order: OrderIntent) -> SubmitRequest:
    return SubmitRequest(request_id=order.intent_id, account="sim", strategy="mom-1", ts=TS, intent=order)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


# --- refusal -------------------------------------------------------------------------------------------


def test_a_worker_refuses_settings_without_limits_outside_dev_naming_each(tmp_path: Path) -> None:
    settings = write_settings(tmp_path / "staging.yaml", environment="staging", risk="")
    result = subprocess.run(
        [sys.executable, "-m", "meltica", "live", "worker", "--config", str(settings), "--worker", "exec"],
        capture_output=True,
        text=True,
        env=child_env(COLUMNS="250"),
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr
    for limit in ("max_order_notional", "max_position_notional", "max_gross_exposure", "daily_loss_limit"):
        assert f"risk.{limit}" in result.stderr, result.stderr
    assert "staging" in result.stderr


# --- credentials ------------------------------------------------------------------------------------


def test_env_key_and_secret_are_resolved_and_redacted_and_the_store_is_read(
    tmp_path: Path, fresh_database: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_log_redaction()
    key_value, secret_value = "envkey-7b1f0c2d9e", "envsecret-55aa33cc11ee"
    stored_key, stored_secret = "storedkey-0a9b8c7d", "storedsecret-1234abcd5678"
    monkeypatch.setenv("DEPLOY_TEST_KEY", key_value)
    monkeypatch.setenv("DEPLOY_TEST_SECRET", secret_value)
    master = generate_master_key()
    monkeypatch.setenv("MELTICA_MASTER_KEY", master)
    from meltica.secrets.database import DatabaseCredentialStore

    DatabaseCredentialStore(fresh_database, MasterKey(master)).put(
        "kept", "binance", Credentials.of(stored_key, stored_secret)
    )
    accounts = (
        "  - name: refd\n    exchange: binance\n    api_key: env:DEPLOY_TEST_KEY\n"
        "    api_secret: env:DEPLOY_TEST_SECRET\n"
        "  - name: kept\n    exchange: binance\n"
        "  - name: sim\n    exchange: paper\n"
    )
    settings = load_settings(config_file=write_settings(tmp_path / "s.yaml", accounts=accounts))
    store = deployment.credential_store(fresh_database)

    async def credentials_of(account: str) -> tuple[str, str]:
        adapter = deployment.account_adapter(settings, account, store=store)
        try:
            exchange: Any = getattr(adapter, "exchange")  # noqa: B009 - the ccxt object of CcxtAdapter
            return exchange.apiKey, exchange.secret
        finally:
            await adapter.close()

    assert asyncio.run(credentials_of("refd")) == (key_value, secret_value)
    assert asyncio.run(credentials_of("kept")) == (stored_key, stored_secret)
    for value in (key_value, secret_value, stored_key, stored_secret):
        assert value not in redact(f"leaked {value} here"), value


# --- risk limits and the kill switch at start (in process) ----------------------------------------------


def _bar() -> Bar:
    return Bar(
        exchange="paper",
        symbol="BTC/USDT",
        timeframe="1m",
        ts=TS,
        open=Decimal(100_000),
        high=Decimal(100_000),
        low=Decimal(100_000),
        close=Decimal(100_000),
        volume=Decimal(1),
    )


def _gate_and_host(settings: Any, engine: Engine) -> tuple[RiskGate, StrategyHost]:
    processors = asyncio.run(build_live_processors(settings, ["strategies", "risk"], engine))
    host = next(p for p in processors if isinstance(p, StrategyHost))
    gate = next(p for p in processors if isinstance(p, RiskGate))
    return gate, host


def _decide(gate: RiskGate, order: OrderIntent) -> Any:
    async def run() -> Any:
        await gate.handle(Incoming("md.candles.1m", "paper:BTC/USDT", _bar()))
        out = await gate.handle(Incoming("orders.intents", "sim", submit(order)))
        return out[0].value

    return asyncio.run(run())


def test_live_stages_use_the_files_limits_and_the_persisted_kill_switch(tmp_path: Path, fresh_database: Engine) -> None:
    settings = load_settings(config_file=write_settings(tmp_path / "s.yaml"))
    config = deployment.pipeline_config(settings)
    assert config.risk == settings.risk and not config.lockstep
    assert config.account("sim").venue == "paper" and config.instances[0].exchange == "paper"

    gate, host = _gate_and_host(settings, fresh_database)
    huge = _decide(gate, intent("1500", "100000"))  # 150M notional: the finding
    assert isinstance(huge, RejectionNotice) and huge.decision.rule == "max_order_notional", huge
    small = _decide(gate, intent("0.001", "100000", n=2))
    assert not isinstance(small, RejectionNotice), small
    assert host.instances["mom-1"].ctx.kill_mode() == ("off", "global")

    KillSwitch(KillSwitchStore(fresh_database)).engage("halt", "incident at night", "ops")
    gate, host = _gate_and_host(settings, fresh_database)  # a worker started while the switch is on
    halted = _decide(gate, intent("0.001", "100000", n=3))
    assert isinstance(halted, RejectionNotice) and halted.decision.rule == "kill_switch", halted
    assert host.instances["mom-1"].ctx.kill_mode() == ("halt", "global")

    unreadable = make_engine("postgresql+psycopg://nobody:x@127.0.0.1:9/none?connect_timeout=2")
    with pytest.raises(StartRefusedError, match="cannot read the kill switch"):
        persisted_kill_switch(unreadable)


# --- workers on the broker -----------------------------------------------------------------------------


class Worker(LoggedProcess):
    """``python -m streams.worker --settings FILE --worker NAME``, its log in a file."""

    def __init__(self, settings: Path, name: str, log: Path) -> None:
        args = [sys.executable, "-m", "streams.worker", "--settings", str(settings), "--worker", name]
        super().__init__(args, log, child_env())

    def stop(self, timeout: float = 30) -> int:
        return super().stop(timeout)


@pytest.fixture
def deployment_on_broker(
    tmp_path: Path, kafka_endpoint: KafkaEndpoint, fresh_database: Engine, unique_name: Callable[[str], str]
) -> Iterator[tuple[Path, Catalogue, Engine, list[Worker]]]:
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("deploy") + "."
    catalogue = Catalogue(prefix=prefix)
    create_topics(bootstrap, catalogue)
    settings = write_settings(
        tmp_path / "live.yaml", database_url=url_of(fresh_database), bootstrap=bootstrap, prefix=prefix
    )
    workers: list[Worker] = []
    try:
        yield settings, catalogue, fresh_database, workers
    finally:
        for worker in workers:
            worker.stop()


async def _produce(bootstrap: str, topic: str, key: str, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await (await producer.send(topic, key=key.encode(), value=value))
    finally:
        await producer.stop()


async def _order_updates(bootstrap: str, topic: str, codec: Codec) -> list[OrderUpdate]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
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
        out: list[OrderUpdate] = []
        async with asyncio.timeout(20):
            while any([await consumer.position(tp) < end[tp] for tp in tps]):
                for batch in (await consumer.getmany(*tps, timeout_ms=500)).values():
                    out += [codec.decode("orders.events", r.value) for r in batch]
        return [u for u in out if isinstance(u, OrderUpdate)]
    finally:
        await consumer.stop()


def test_an_execution_worker_started_while_the_kill_switch_is_on_sends_nothing(
    deployment_on_broker: tuple[Path, Catalogue, Engine, list[Worker]], tmp_path: Path, kafka_endpoint: KafkaEndpoint
) -> None:
    settings, catalogue, engine, workers = deployment_on_broker
    bootstrap = kafka_endpoint.bootstrap_servers
    KillSwitch(KillSwitchStore(engine)).engage("halt", "halted before the start", "ops")
    worker = Worker(settings, "exec", tmp_path / "exec.log")
    workers.append(worker)
    codec = Codec(catalogue)
    approved = submit(intent("0.001", "100000"))
    asyncio.run(
        _produce(bootstrap, catalogue.topic_name("orders.approved"), "sim", codec.encode("orders.approved", approved))
    )

    updates: list[OrderUpdate] = []

    def answered() -> bool:
        worker.says("")  # a worker that died is reported with its log
        updates[:] = asyncio.run(_order_updates(bootstrap, catalogue.topic_name("orders.events"), codec))
        return any(u.order.client_order_id == approved.intent.client_order_id for u in updates)

    wait_for(answered, 90, "the execution worker's answer on orders.events")
    mine = [u for u in updates if u.order.client_order_id == approved.intent.client_order_id]
    assert [u.order.status.value for u in mine] == ["rejected"], mine
    assert mine[0].order.reason == "kill switch halt", mine[0].order  # refused before the venue saw it
    assert "kill switch global is halt" in worker.output()


def test_kill_on_reaches_both_execution_workers(
    deployment_on_broker: tuple[Path, Catalogue, Engine, list[Worker]], tmp_path: Path, kafka_endpoint: KafkaEndpoint
) -> None:
    settings, catalogue, engine, workers = deployment_on_broker
    for n in (1, 2):
        workers.append(Worker(settings, "exec", tmp_path / f"exec-{n}.log"))
    for worker in workers:
        wait_for(lambda w=worker: w.says("control: every message of"), 90, "the control reader of each worker")
    result = subprocess.run(
        [sys.executable, "-m", "meltica", "kill", "on", "--reason", "both must hear", "--actor", "ops-2"],
        capture_output=True,
        text=True,
        env=child_env(
            MELTICA_DATABASE_URL=url_of(engine),
            MELTICA_TOPIC_PREFIX=catalogue.prefix,
            MELTICA_KAFKA_BOOTSTRAP=kafka_endpoint.bootstrap_servers,
        ),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for worker in workers:  # each process's execution stage engaged the halt (and cancelled its open orders)
        wait_for(lambda w=worker: w.says("kill switch global: off → halt (both must hear, by ops-2)"), 60, "halt")
    assert all(w.process.poll() is None for w in workers)


def test_a_worker_stuck_while_stopping_exits_on_its_own(
    tmp_path: Path, kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("stuck") + "."
    create_topics(bootstrap, Catalogue(prefix=prefix))
    config = tmp_path / "toy.yaml"
    config.write_text(
        f"app_id: {unique_name('stuck')}\nbootstrap: {bootstrap}\ntopic_prefix: {prefix}\n"
        "factory: live_worker_toy:factory\nparams: {hang_on_stop: true}\nstop_deadline: 3\n"
    )
    log = tmp_path / "stuck.log"
    with log.open("w") as out:
        env = child_env()
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env["PYTHONPATH"]])
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.worker", "--config", str(config)], stdout=out, stderr=out, env=env
        )
        try:
            wait_for(lambda: "processor toy-sum started" in log.read_text(), 90, "the toy processor to start")
            proc.send_signal(signal.SIGTERM)  # its stop() never returns
            wait_for(lambda: proc.poll() is not None, 60, "the watchdog to end the stuck worker")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 1
    assert "still stopping after 3 s: exiting now (watchdog)" in log.read_text()


def test_an_execution_stage_started_under_halt_cancels_the_orders_it_recovers(fresh_database: Engine) -> None:
    from meltica.domain import OrderStatus
    from meltica.execution.store import OrderStore
    from meltica.live.config import AccountVenueConfig, PipelineConfig, StrategyInstanceConfig
    from meltica.live.execution import ExecutionService
    from meltica.live.simulated_driver import SimulatedVenueDriver
    from meltica.risk import KillSwitchMode, KillSwitchState

    config = PipelineConfig(
        instances=(
            StrategyInstanceConfig(
                instance_id="mom-1", strategy="momentum", account="sim", exchange="paper", symbols=("BTC/USDT",)
            ),
        ),
        accounts={"sim": AccountVenueConfig(exchange="paper", initial_balances={"USDT": Decimal(100_000)})},
    )
    driver = SimulatedVenueDriver.from_config(config, "sim")  # the venue outlives the first service: the orders rest
    published: list[Any] = []

    async def emit(out: Any) -> None:
        published.append(out.value)

    async def scenario() -> None:
        first = ExecutionService(config, {"sim": driver}, store=OrderStore(fresh_database))
        await first.start(emit)
        await first.handle(Incoming("orders.approved", "sim", submit(intent("0.01", "90000"))))
        await first.stop()
        coid = intent("0.01", "90000").client_order_id
        assert [o.client_order_id for o in await driver.adapter.fetch_open_orders("BTC/USDT")] == [coid]
        halted = {"global": KillSwitchState(mode=KillSwitchMode.HALT, reason="while down", actor="ops", since=TS)}
        second = ExecutionService(
            config, {"sim": driver}, store=OrderStore(fresh_database), kill_switch_at_start=halted
        )
        await second.start(emit)  # recovers the open order, then obeys the halt
        assert await driver.adapter.fetch_open_orders("BTC/USDT") == []
        refused = await second.handle(Incoming("orders.approved", "sim", submit(intent("0.01", "90000", n=2))))
        assert [u.value.order.status for u in refused] == [OrderStatus.REJECTED]
        await second.stop()

    asyncio.run(scenario())
    cancelled = [u for u in published if isinstance(u, OrderUpdate) and u.order.status is OrderStatus.CANCELLED]
    assert [u.order.client_order_id for u in cancelled] == [intent("0.01", "90000").client_order_id]


def test_the_sink_worker_takes_database_broker_and_prefix_from_the_settings(
    deployment_on_broker: tuple[Path, Catalogue, Engine, list[Worker]], tmp_path: Path, kafka_endpoint: KafkaEndpoint
) -> None:
    from sqlalchemy import text

    settings, catalogue, engine, _workers = deployment_on_broker
    codec = Codec(catalogue)
    payload = codec.encode("md.candles.1m", _bar())
    asyncio.run(
        _produce(kafka_endpoint.bootstrap_servers, catalogue.topic_name("md.candles.1m"), "paper:BTC/USDT", payload)
    )
    log = tmp_path / "sinks.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meltica", "live", "sinks", "--config", str(settings)],
            stdout=out,
            stderr=out,
            env=child_env(),
        )
        try:

            def stored() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"sinks exited {proc.returncode}:\n{log.read_text()[-4000:]}")
                with engine.connect() as conn:
                    return bool(conn.execute(text("SELECT count(*) FROM candles WHERE exchange = 'paper'")).scalar())

            wait_for(stored, 90, "the bar in the settings' database")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
