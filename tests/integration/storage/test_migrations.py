"""Alembic migrations on real PostgreSQL: up, down, up again; append-only facts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from meltica.storage import migrate, timeseries
from meltica.storage.tables import APPEND_ONLY_TABLES, metadata

pytestmark = pytest.mark.integration


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _views(engine: Engine) -> set[str]:
    """Materialized views and, on TimescaleDB, continuous aggregates (which ``pg_matviews`` does not list)."""
    with engine.connect() as conn:
        views = set(conn.execute(text("SELECT matviewname FROM pg_matviews")).scalars())
        if conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")).scalar():
            views |= set(
                conn.execute(text("SELECT view_name FROM timescaledb_information.continuous_aggregates")).scalars()
            )
        return views


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
    tables_0009 = {"reports", "report_files"}
    tables_0004 = {"backtest_orders", "backtest_fills"}
    later_tables = tables_0009 | tables_0004 | {"order_lists", "emulated_orders", "kill_switch_state", "risk_state"}

    migrate.downgrade(empty_database, "-1")  # 0009: the stored reports
    assert migrate.current_revision(empty_database) == "0008"
    assert _tables(empty_database) == set(metadata.tables) - tables_0009
    migrate.downgrade(empty_database, "-1")  # 0008: time-series policies only (no table change)
    assert migrate.current_revision(empty_database) == "0007"
    assert _tables(empty_database) == set(metadata.tables) - tables_0009
    migrate.downgrade(empty_database, "-1")  # 0007: the runtime role's rights and the refresh function
    assert migrate.current_revision(empty_database) == "0006"
    with empty_database.connect() as conn:
        granted = conn.execute(
            text("SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = 'meltica_app'")
        ).scalar_one()
        refresh = conn.execute(text("SELECT to_regprocedure('meltica_refresh_candles_1h()')")).scalar()
    assert (granted, refresh) == (0, None)
    migrate.downgrade(empty_database, "-1")  # 0006: the erase guards only
    assert migrate.current_revision(empty_database) == "0005"
    assert _primary_key(empty_database, "fills") == ["exchange", "account", "trade_id", "side"]
    migrate.downgrade(empty_database, "-1")  # 0005: the fills key
    assert migrate.current_revision(empty_database) == "0004"
    assert _primary_key(empty_database, "fills") == ["exchange", "account", "trade_id"]
    assert _tables(empty_database) == set(metadata.tables) - tables_0009

    migrate.downgrade(empty_database, "-1")
    assert migrate.current_revision(empty_database) == "0003"
    assert _tables(empty_database) == set(metadata.tables) - tables_0004 - tables_0009

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
        flavour = timeseries.detect_flavour(conn)
        # TimescaleDB adds a `<table>_ts_idx` index to each hypertable it makes: not drift.
        added_by_timescaledb = (
            {f"{spec.table}_ts_idx" for spec in timeseries.HYPERTABLES}
            if flavour is timeseries.Flavour.TIMESCALEDB
            else set()
        )

        def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
            return not (type_ == "index" and reflected and compare_to is None and name in added_by_timescaledb)

        context = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include_object})
        diff = compare_metadata(context, metadata)
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


def _insert_facts(engine: Engine, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO fills (exchange, account, trade_id, symbol, side, price, quantity, fee, ts) "
                "VALUES ('binance', 'main', :t, 'BTC/USDT', 'buy', 42000.5, 0.01, 0.0001, :ts)"
            ),
            {"t": f"t{n}", "ts": datetime(2022, 1, 1, tzinfo=UTC)},
        )
        conn.execute(
            text("INSERT INTO risk_events (event_id, ts, decision, reason) VALUES (:id, now(), 'rejected', 'x')"),
            {"id": uuid.uuid4()},
        )


def test_facts_refuse_delete_and_truncate_and_downgrade_restores_the_update_guard(empty_database: Engine) -> None:
    """A deleted fill could be re-inserted at another price: facts are never erased, by any statement."""
    migrate.upgrade(empty_database)
    _insert_facts(empty_database, 1)
    for statement in (
        "DELETE FROM fills WHERE trade_id = 't1'",
        "DELETE FROM risk_events",
        "TRUNCATE fills",
        "TRUNCATE order_events",
        "TRUNCATE risk_events",
        "TRUNCATE reconciliation_discrepancies",
        "TRUNCATE reconciliation_runs CASCADE",  # cascades to its discrepancies
    ):
        with pytest.raises(DBAPIError, match="append-only: facts are never erased"), empty_database.begin() as conn:
            conn.execute(text(statement))
    with empty_database.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM fills")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM risk_events")).scalar_one() == 1
        guarded = {
            (row.table, row.trigger)
            for row in conn.execute(
                text(
                    "SELECT c.relname AS table, t.tgname AS trigger FROM pg_trigger t "
                    "JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal"
                )
            )
        }
    for table in APPEND_ONLY_TABLES:
        assert {(table, f"{table}_{kind}") for kind in ("append_only", "no_delete", "no_truncate")} <= guarded

    migrate.downgrade(empty_database, "0004")  # back to UPDATE-only guards
    with empty_database.begin() as conn:
        conn.execute(text("DELETE FROM fills WHERE trade_id = 't1'"))
        conn.execute(text("TRUNCATE risk_events"))
    _insert_facts(empty_database, 2)
    with pytest.raises(DBAPIError, match="append-only"), empty_database.begin() as conn:
        conn.execute(text("UPDATE fills SET price = 1"))
    migrate.upgrade(empty_database)
    with pytest.raises(DBAPIError, match="never erased"), empty_database.begin() as conn:
        conn.execute(text("DELETE FROM fills"))
