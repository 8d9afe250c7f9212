"""Alembic driven from code: `meltica db upgrade|downgrade|current` and the test suite use this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import ProgrammingError

from meltica.errors import ConfigurationError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Where a runtime command refuses to migrate the schema itself: the owner role does it, on purpose.
MIGRATE_EXPLICITLY_IN = ("staging", "prod")


class SchemaNotAtHeadError(ConfigurationError):
    """The database's schema is not the one this code needs, and this command will not migrate it."""

    default_reason = "schema_not_at_head"


def alembic_config(engine: Engine, *, runtime_role: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # The URL with its password, kept in memory only; '%' must be escaped for configparser.
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    # The role the migrations grant the application's rights to (meltica.storage.privileges.runtime_role).
    cfg.attributes["runtime_role"] = runtime_role
    return cfg


def upgrade(engine: Engine, revision: str = "head", *, runtime_role: str | None = None) -> None:
    """Migrate up, as ``engine``'s role (the owner). ``runtime_role``: see ``database_runtime_role``."""
    command.upgrade(alembic_config(engine, runtime_role=runtime_role), revision)


def downgrade(engine: Engine, revision: str, *, runtime_role: str | None = None) -> None:
    command.downgrade(alembic_config(engine, runtime_role=runtime_role), revision)


def ensure_at_head(
    engine: Engine,
    *,
    environment: str,
    migration_engine: Callable[[], Engine] | None = None,
    runtime_role: str | None = None,
) -> bool:
    """What a runtime command does before it uses the database. At head: nothing. Behind, in staging or
    prod: ``SchemaNotAtHeadError`` naming ``meltica db upgrade`` (the owner role migrates, deliberately;
    the runtime role could not anyway). Behind elsewhere (dev, paper): migrate, as the owner role of
    ``migration_engine()`` when given (its engine is disposed afterwards), else through ``engine``.
    True when it migrated."""
    head = head_revision(engine)
    try:
        current = current_revision(engine)
        described = current or "base (empty)"
    except ProgrammingError as exc:
        # A runtime role on a schema older than the grants (0007) may not even read alembic_version.
        if getattr(exc.orig, "sqlstate", None) != "42501":
            raise
        current, described = None, "one the runtime role may not read (older than 0007)"
    if current == head:
        return False
    if environment in MIGRATE_EXPLICITLY_IN:
        raise SchemaNotAtHeadError(
            f"the database schema is at revision {described}, this code needs {head}: "
            f"run `meltica db upgrade` (as the owner role, database_migration_url) first; "
            f"commands do not migrate the {environment} database themselves",
            field="database_url",
        )
    owner = migration_engine() if migration_engine is not None else engine
    try:
        upgrade(owner, runtime_role=runtime_role)
    finally:
        if owner is not engine:
            owner.dispose()
    return True


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


def downgrade_preview(engine: Engine, revision: str, *, runtime_role: str | None = None) -> DowngradePreview:
    """Run the downgrade to ``revision`` inside one transaction, note what it dropped, and roll it back
    (PostgreSQL DDL is transactional): nothing is changed."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        tables_before, columns_before, views_before = _schema(conn)
        rows = {t: int(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one()) for t in tables_before}
        conn.rollback()
        trans = conn.begin()
        try:
            cfg = alembic_config(engine, runtime_role=runtime_role)
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
