"""Alembic driven from code: `meltica db upgrade|downgrade|current` and the test suite use this."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # The URL with its password, kept in memory only; '%' must be escaped for configparser.
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


@dataclass(frozen=True)
class DowngradePreview:
    """What ``downgrade(engine, target)`` would do, found by running it in a transaction rolled back."""

    current: str | None
    target: str | None  # the revision the database would be at (None: base, an empty schema)
    revisions: list[tuple[str, str]] = field(default_factory=list)  # (revision, what it added), newest first
    tables: dict[str, int] = field(default_factory=dict)  # table dropped -> its rows now
    columns: dict[str, list[str]] = field(default_factory=dict)  # table kept -> columns dropped
    views: list[str] = field(default_factory=list)  # (materialized) views dropped


def downgrade_preview(engine: Engine, revision: str) -> DowngradePreview:
    """Run the downgrade to ``revision`` inside one transaction, note what it dropped, and roll it back
    (PostgreSQL DDL is transactional): nothing is changed."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        tables_before, columns_before, views_before = _schema(conn)
        rows = {t: int(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one()) for t in tables_before}
        conn.rollback()
        trans = conn.begin()
        try:
            cfg = alembic_config(engine)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            target = MigrationContext.configure(conn).get_current_revision()
            tables_after, columns_after, views_after = _schema(conn)
        finally:
            trans.rollback()
    script = ScriptDirectory.from_config(alembic_config(engine))
    steps = [
        (rev.revision, (rev.doc or "").strip().splitlines()[0] if rev.doc else "")
        for rev in script.iterate_revisions(current or "base", target or "base")
        if rev is not None and rev.revision != target
    ]
    return DowngradePreview(
        current=current,
        target=target,
        revisions=steps,
        tables={t: rows[t] for t in sorted(tables_before - tables_after)},
        columns={
            t: sorted(columns_before[t] - columns_after[t])
            for t in sorted(tables_after & tables_before)
            if columns_before[t] - columns_after[t]
        },
        views=sorted(views_before - views_after),
    )


def _schema(conn: Connection) -> tuple[set[str], dict[str, set[str]], set[str]]:
    inspector = inspect(conn)
    tables = set(inspector.get_table_names()) - {"alembic_version"}
    columns = {t: {c["name"] for c in inspector.get_columns(t)} for t in tables}
    views = set(inspector.get_view_names()) | set(inspector.get_materialized_view_names())
    return tables, columns, views
