"""Alembic migrations on real PostgreSQL: up, down, up again; append-only facts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from meltica.storage import migrate
from meltica.storage.tables import APPEND_ONLY_TABLES, metadata

pytestmark = pytest.mark.integration


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _views(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT matviewname FROM pg_matviews")).scalars())


def _primary_key(engine: Engine, table: str) -> list[str]:
    return list(inspect(engine).get_pk_constraint(table)["constrained_columns"])


def test_upgrade_creates_every_table_and_downgrade_removes_them(empty_database: Engine) -> None:
    assert migrate.current_revision(empty_database) is None

    migrate.upgrade(empty_database)
    assert migrate.current_revision(empty_database) == migrate.head_revision(empty_database)
    assert _tables(empty_database) == set(metadata.tables)
    assert "candles_1h" in _views(empty_database)

    migrate.downgrade(empty_database, "base")
    assert migrate.current_revision(empty_database) is None
    assert _tables(empty_database) == set()
    assert _views(empty_database) == set()

    migrate.upgrade(empty_database)
    assert _tables(empty_database) == set(metadata.tables)


def test_stepping_down_revision_by_revision(empty_database: Engine) -> None:
    migrate.upgrade(empty_database)
    tables_0004 = {"backtest_orders", "backtest_fills"}
    later_tables = tables_0004 | {"order_lists", "emulated_orders", "kill_switch_state", "risk_state"}

    assert _primary_key(empty_database, "fills") == ["exchange", "account", "trade_id", "side"]
    migrate.downgrade(empty_database, "-1")
    assert migrate.current_revision(empty_database) == "0004"
    assert _primary_key(empty_database, "fills") == ["exchange", "account", "trade_id"]
    assert _tables(empty_database) == set(metadata.tables)

    migrate.downgrade(empty_database, "-1")
    assert migrate.current_revision(empty_database) == "0003"
    assert _tables(empty_database) == set(metadata.tables) - tables_0004

    migrate.downgrade(empty_database, "-1")
    assert migrate.current_revision(empty_database) == "0002"
    assert _tables(empty_database) == set(metadata.tables) - later_tables
    assert "candles_1h" in _views(empty_database)

    migrate.downgrade(empty_database, "-1")
    assert migrate.current_revision(empty_database) == "0001"
    assert _tables(empty_database) == set(metadata.tables) - later_tables
    assert "candles_1h" not in _views(empty_database)


def test_schema_matches_table_definitions(empty_database: Engine) -> None:
    """The migrations produce exactly what meltica.storage.tables describes (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    migrate.upgrade(empty_database)
    with empty_database.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def test_facts_are_append_only(empty_database: Engine) -> None:
    migrate.upgrade(empty_database)
    assert set(APPEND_ONLY_TABLES) <= _tables(empty_database)
    with empty_database.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO fills (exchange, account, trade_id, symbol, side, price, quantity, fee, ts) "
                "VALUES ('binance', 'main', 't1', 'BTC/USDT', 'buy', 42000.5, 0.01, 0.0001, :ts)"
            ),
            {"ts": datetime(2022, 1, 1, tzinfo=UTC)},
        )
    with pytest.raises(DBAPIError, match="append-only"), empty_database.begin() as conn:
        conn.execute(text("UPDATE fills SET price = 1 WHERE trade_id = 't1'"))
    with empty_database.connect() as conn:
        price = conn.execute(text("SELECT price FROM fills WHERE trade_id = 't1'")).scalar_one()
    assert str(price) == "42000.5"

    with empty_database.begin() as conn:
        conn.execute(
            text("INSERT INTO risk_events (event_id, ts, decision, reason) VALUES (:id, now(), 'rejected', 'x')"),
            {"id": uuid.uuid4()},
        )
    with pytest.raises(DBAPIError, match="append-only"), empty_database.begin() as conn:
        conn.execute(text("UPDATE risk_events SET decision = 'approved'"))


def test_money_columns_are_numeric(empty_database: Engine) -> None:
    migrate.upgrade(empty_database)
    with empty_database.connect() as conn:
        types = dict(
            conn.execute(
                text(
                    "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND column_name IN "
                    "('price', 'quantity', 'fee', 'open', 'close', 'volume', 'free', 'realized_pnl', 'equity')"
                )
            ).all()
        )
    assert types
    assert set(types.values()) == {"numeric"}, types
