"""`meltica db` commands: schema migrations."""

from __future__ import annotations

import logging

import typer

from meltica.cli._common import EXIT_BAD_INPUT, console, err_console, migration_engine, reports_errors
from meltica.config import load_settings
from meltica.storage import migrate
from meltica.storage.engine import masked
from meltica.storage.timeseries import apply_retention, detect_flavour

app = typer.Typer(no_args_is_help=True)
log = logging.getLogger(__name__)


@app.command()
@reports_errors
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Migrate the database up to REVISION (default: the newest), as the owner role
    (database_migration_url), granting the runtime role (database_runtime_role) its rights; then set the
    retention policies to exactly what `storage.retention` configures (TimescaleDB; none by default: history
    is kept)."""
    settings = load_settings()
    engine = migration_engine()
    log.info("migrating %s up to %s", masked(engine.url), revision)
    migrate.upgrade(engine, revision, runtime_role=settings.database_runtime_role)
    with engine.begin() as conn:
        flavour = detect_flavour(conn)
        if migrate.current_revision(engine) == migrate.head_revision(engine):
            for line in apply_retention(conn, settings.storage.retention):
                console.print(line, highlight=False, soft_wrap=True)
    console.print(f"database {masked(engine.url)} at revision {migrate.current_revision(engine)} ({flavour})")


GUARDED_ENVIRONMENTS = ("staging", "prod")


# ignore_unknown_options: `downgrade -1` is a revision, not an option.
@app.command(context_settings={"ignore_unknown_options": True})
@reports_errors
def downgrade(
    revision: str = typer.Argument(..., help="Target revision: -1 (one step down), a revision id, or base."),
    yes_destroy_data: bool = typer.Option(
        False,
        "--yes-destroy-data",
        help="Required in staging and prod, where the downgrade is refused without it (after listing what it drops).",
    ),
) -> None:
    """Migrate the database down to REVISION, as the owner role. A downgrade drops tables, columns and
    guards — with their data. In staging and prod it first lists what it would drop, and is refused
    without --yes-destroy-data."""
    settings = load_settings()
    environment = settings.environment
    engine = migration_engine()
    if environment in GUARDED_ENVIRONMENTS:
        preview = migrate.downgrade_preview(engine, revision, runtime_role=settings.database_runtime_role)
        for line in describe_preview(preview):
            console.print(line, highlight=False, soft_wrap=True)
        if not yes_destroy_data:
            err_console.print(
                f"[bold red]error:[/] refusing to downgrade the {environment} database: it destroys what is "
                "listed above; pass --yes-destroy-data to do it anyway",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_BAD_INPUT)
    log.info("migrating %s down to %s", masked(engine.url), revision)
    migrate.downgrade(engine, revision, runtime_role=settings.database_runtime_role)
    console.print(f"database {masked(engine.url)} at revision {migrate.current_revision(engine) or 'base'}")


def describe_preview(preview: migrate.DowngradePreview) -> list[str]:
    """The lines ``meltica db downgrade`` prints before it acts in staging and prod."""
    lines = [f"downgrade {preview.current or 'base'} → {preview.target or 'base'} would remove:"]
    lines += [f"  revision {rev}: {doc}" for rev, doc in preview.revisions]
    lines += [f"  table {table} ({rows} rows) — DROPPED with its data" for table, rows in preview.tables.items()]
    lines += [f"  columns of {table}: {', '.join(cols)} — DROPPED" for table, cols in preview.columns.items()]
    lines += [f"  view {view} — dropped" for view in preview.views]
    if not (preview.tables or preview.columns or preview.views):
        lines.append("  no table, column or view (triggers, indexes and constraints only)")
    return lines


@app.command()
@reports_errors
def current() -> None:
    """Show the database's revision and the newest one this code knows."""
    engine = migration_engine()
    console.print(f"current: {migrate.current_revision(engine) or 'base'}  head: {migrate.head_revision(engine)}")
