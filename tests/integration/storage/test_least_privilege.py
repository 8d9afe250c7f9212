"""Least privilege in the database: the runtime role the migrations grant (``meltica.storage.privileges``)
can run the application but cannot erase a fact, change the schema or switch a trigger off; the roles
`meltica infra up` provisions are not superusers; outside dev a runtime command refuses a schema that is
not at head instead of migrating it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from meltica.domain import Instrument, OrderIntent, OrderStatus, OrderType, Side
from meltica.domain.market_data import Bar
from meltica.errors import ConfigurationError
from meltica.execution import OrderManager, OrderStore, RetryPolicy
from meltica.infra.postgres import PostgresEndpoint
from meltica.live.processor import Incoming
from meltica.live.sinks import SinkWriter
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore
from meltica.storage import candles, migrate
from meltica.storage.engine import make_engine
from meltica.storage.migrate import SchemaNotAtHeadError
from meltica.storage.privileges import DEFAULT_RUNTIME_ROLE
from meltica.storage.tables import APPEND_ONLY_TABLES
from tests.integration.conftest import runtime_url_of

pytestmark = pytest.mark.integration

T0 = datetime(2024, 1, 10, tzinfo=UTC)
SYMBOL = "BTC/USDT"
INSUFFICIENT_PRIVILEGE = "42501"


@pytest.fixture(scope="module")
def owner(module_database: Engine) -> Engine:
    """A database migrated to head by the owner role, shared by this module's tests."""
    return module_database


@pytest.fixture
def runtime(owner: Engine, runtime_engine: Callable[[Engine], Engine]) -> Engine:
    engine = runtime_engine(owner)
    if engine.url.username == owner.url.username:
        pytest.skip("MELTICA_DATABASE_URL without MELTICA_DATABASE_MIGRATION_URL: one role for both")
    return engine


def _refused(engine: Engine, sql: str) -> str:
    """The SQLSTATE ``sql`` fails with as ``engine``'s role (the transaction is rolled back)."""
    with pytest.raises(DBAPIError) as err, engine.begin() as conn:
        conn.execute(text(sql))
    return str(getattr(err.value.orig, "sqlstate", ""))


def _fill(engine: Engine, trade_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO fills (exchange, account, trade_id, symbol, side, price, quantity, fee, ts) "
                "VALUES ('binance', 'main', :t, 'BTC/USDT', 'buy', 42000.5, 0.01, 0, :ts)"
            ),
            {"t": trade_id, "ts": T0},
        )


def test_the_runtime_role_cannot_erase_facts_change_the_schema_or_disable_triggers(
    owner: Engine, runtime: Engine
) -> None:
    with runtime.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == DEFAULT_RUNTIME_ROLE
    _fill(runtime, f"lp-{uuid.uuid4().hex[:8]}")  # it records facts ...

    refused = {
        "DELETE FROM fills": _refused(runtime, "DELETE FROM fills"),  # ... and can never take one back
        "UPDATE fills": _refused(runtime, "UPDATE fills SET price = 1"),
        "TRUNCATE order_events": _refused(runtime, "TRUNCATE order_events"),
        "TRUNCATE fills CASCADE": _refused(runtime, "TRUNCATE fills CASCADE"),
        "DISABLE TRIGGER": _refused(runtime, "ALTER TABLE fills DISABLE TRIGGER ALL"),
        "CREATE TABLE": _refused(runtime, "CREATE TABLE runtime_made (id int)"),
        "DROP TABLE": _refused(runtime, "DROP TABLE risk_events"),
        "session_replication_role": _refused(runtime, "SET session_replication_role = replica"),
        "alembic_version": _refused(runtime, "UPDATE alembic_version SET version_num = '0001'"),
    }
    for table in APPEND_ONLY_TABLES:
        refused[f"DELETE FROM {table}"] = _refused(runtime, f"DELETE FROM {table}")
        refused[f"UPDATE {table}"] = _refused(runtime, f"UPDATE {table} SET ts = ts")
    assert refused == dict.fromkeys(refused, INSUFFICIENT_PRIVILEGE)

    with owner.connect() as conn:  # the owner runs the migrations: it owns what it created
        owners = set(
            conn.execute(text("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")).scalars()
        )
        roles = conn.execute(
            text("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = :r"),
            {"r": DEFAULT_RUNTIME_ROLE},
        ).one()
    assert DEFAULT_RUNTIME_ROLE not in owners
    assert tuple(roles) == (False, False, False)


def test_a_table_a_later_migration_creates_is_readable_and_insertable_but_not_erasable(
    owner: Engine, runtime: Engine
) -> None:
    table = f"later_{uuid.uuid4().hex[:8]}"
    with owner.begin() as conn:  # what a future migration does, as the owner role
        conn.execute(text(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, note text)"))
    try:
        with runtime.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} (note) VALUES ('x')"))  # the sequence too
            assert conn.execute(text(f"SELECT note FROM {table}")).scalars().all() == ["x"]
        assert _refused(runtime, f"DELETE FROM {table}") == INSUFFICIENT_PRIVILEGE
        assert _refused(runtime, f"UPDATE {table} SET note = 'y'") == INSUFFICIENT_PRIVILEGE
    finally:
        with owner.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))


def _instrument() -> Instrument:
    return Instrument(
        exchange="paper",
        symbol=SYMBOL,
        base="BTC",
        quote="USDT",
        tick_size=D("0.01"),
        step_size=D("0.00001"),
        min_quantity=D("0.00001"),
        min_notional=D("5"),
    )


def test_the_application_runs_as_the_runtime_role(runtime: Engine) -> None:
    """The OMS's write-ahead store, the kill switch, a sink batch, a candle load with its roll-up refresh."""
    import asyncio

    from meltica.adapters.in_process import InProcessVenue

    venue = InProcessVenue([_instrument()], clock=lambda: T0)
    venue.deposit("alice", "USDT", D(100_000))
    store = OrderStore(runtime)
    intent = OrderIntent(
        intent_id=f"lp-{uuid.uuid4().hex}",
        account="alice",
        strategy="s",
        exchange="paper",
        symbol=SYMBOL,
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=D("0.1"),
        price=D("30000"),
        created_at=T0,
    )

    async def trade() -> None:
        oms = OrderManager(store, {"alice": venue.adapter("alice")}, clock=lambda: T0, retry=RetryPolicy(base_delay=0))
        order = await oms.submit(intent)
        assert order.status is OrderStatus.OPEN
        cancelled = await oms.cancel(order.client_order_id)
        assert cancelled.status is OrderStatus.CANCELLED

    asyncio.run(trade())
    stored = OrderStore(runtime).get(intent.client_order_id)
    assert stored is not None and stored.status is OrderStatus.CANCELLED

    switch = KillSwitch(KillSwitchStore(runtime))
    switch.engage("halt", "drill", "ops", scope="account:alice")
    assert KillSwitch(KillSwitchStore(runtime)).state_of("account:alice").mode is KillSwitchMode.HALT
    switch.release("ops", "drill over", scope="account:alice")
    assert KillSwitch(KillSwitchStore(runtime)).state_of("account:alice").mode is KillSwitchMode.OFF

    bars = [
        Bar(
            exchange="binance",
            symbol=SYMBOL,
            timeframe="1m",
            ts=T0 + timedelta(minutes=i),
            open=D(100 + i),
            high=D(101 + i),
            low=D(99 + i),
            close=D(100 + i),
            volume=D(1),
        )
        for i in range(3)
    ]
    batch = [Incoming(topic="md.candles.1m", key=None, value=b, offset=i, timestamp=T0) for i, b in enumerate(bars)]
    result = SinkWriter(runtime).write(batch)
    assert result.written == {"candles": 3}

    # the plain-PostgreSQL roll-up is refreshed through the owner's function (REFRESH needs the owner)
    candles.refresh(runtime)
    with runtime.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM candles_1h WHERE symbol = :s"), {"s": SYMBOL}).scalar_one() == 1


def test_provisioned_roles_are_not_superusers(postgres_endpoint: PostgresEndpoint) -> None:
    if postgres_endpoint.kind == "external":
        pytest.skip("MELTICA_DATABASE_URL: roles are the operator's, not provisioned by meltica infra")
    with psycopg.connect(postgres_endpoint.url.replace("+psycopg", ""), autocommit=True) as conn:
        rows = dict(
            conn.execute(
                "SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN (current_user, %s)", (DEFAULT_RUNTIME_ROLE,)
            ).fetchall()
        )
    assert rows == {"meltica": False, DEFAULT_RUNTIME_ROLE: False}


def test_migrating_needs_the_runtime_role_to_exist(database_factory: Callable[..., object]) -> None:
    with database_factory(migrated=False) as engine:  # type: ignore[attr-defined]
        with pytest.raises(ConfigurationError, match="runtime role 'meltica_nobody' does not exist"):
            migrate.upgrade(engine, runtime_role="meltica_nobody")
        assert migrate.current_revision(engine) is None  # one transaction: nothing half-applied


def test_one_role_for_both_migrates_up_and_down(database_factory: Callable[..., object]) -> None:
    """A development database reached through one URL only: the owner is also the runtime role."""
    with database_factory(migrated=False) as engine:  # type: ignore[attr-defined]
        role = str(engine.url.username)
        migrate.upgrade(engine, runtime_role=role)
        migrate.downgrade(engine, "base", runtime_role=role)
        migrate.upgrade(engine, runtime_role=role)  # the owner kept every right on alembic_version
        assert migrate.current_revision(engine) == migrate.head_revision(engine)


ROOT = Path(__file__).resolve().parents[3]
CANDLE_FILE = "timestamp,open,high,low,close,volume\n2024-01-10 00:00:00.000000,1,2,0.5,1.5,10\n"


def _data_load(runtime_url: str, owner_url: str | None, env: str, file: Path) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MELTICA_") or k == "MELTICA_STATE_DIR"}
    environ.update(MELTICA_ENV=env, MELTICA_DATABASE_URL=runtime_url, COLUMNS="200")
    if owner_url is not None:
        environ["MELTICA_DATABASE_MIGRATION_URL"] = owner_url
    args = ["data", "load", str(file), "--exchange", "binance", "--symbol", SYMBOL, "--timeframe", "1m"]
    return subprocess.run(
        [sys.executable, "-m", "meltica", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
        cwd=ROOT,
        check=False,
    )


def test_outside_dev_a_runtime_command_refuses_a_schema_behind_head(
    database_factory: Callable[..., object], tmp_path: Path
) -> None:
    file = tmp_path / "bars.csv"
    file.write_text(CANDLE_FILE)
    with database_factory(migrated=False) as engine:  # type: ignore[attr-defined]
        migrate.upgrade(engine, "0006")  # the code is newer than the database
        owner_url = engine.url.render_as_string(hide_password=False)

        refused = _data_load(runtime_url_of(engine), owner_url, "staging", file)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "meltica db upgrade" in refused.stderr and "schema" in refused.stderr
        assert migrate.current_revision(engine) == "0006"  # not migrated behind the operator's back

        runtime = make_engine(runtime_url_of(engine))  # what live start checks before any process starts
        try:
            with pytest.raises(SchemaNotAtHeadError, match="meltica db upgrade"):
                migrate.ensure_at_head(runtime, environment="prod")
        finally:
            runtime.dispose()

        # dev migrates by itself, as the owner role, then loads as the runtime role
        loaded = _data_load(runtime_url_of(engine), owner_url, "dev", file)
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        assert migrate.current_revision(engine) == migrate.head_revision(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM candles")).scalar_one() == 1
