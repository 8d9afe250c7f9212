"""Alembic environment: runs migrations on the connection or URL handed in by meltica.storage.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from meltica.storage.engine import make_engine
from meltica.storage.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported: run `meltica db upgrade`")
run_migrations_online()
