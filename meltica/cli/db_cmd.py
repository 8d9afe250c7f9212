"""`meltica db` commands: schema migrations."""

from __future__ import annotations

import typer

from meltica.cli._common import console, database_engine, reports_errors
from meltica.storage import migrate
from meltica.storage.engine import masked
from meltica.storage.timeseries import detect_flavour

app = typer.Typer(no_args_is_help=True)


@app.command()
@reports_errors
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Migrate the database up to REVISION (default: the newest)."""
    engine = database_engine()
    migrate.upgrade(engine, revision)
    with engine.connect() as conn:
        flavour = detect_flavour(conn)
    console.print(f"database {masked(engine.url)} at revision {migrate.current_revision(engine)} ({flavour})")


@app.command()
@reports_errors
def downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. -1 or base.")) -> None:
    """Migrate the database down to REVISION."""
    engine = database_engine()
    migrate.downgrade(engine, revision)
    console.print(f"database {masked(engine.url)} at revision {migrate.current_revision(engine) or 'base'}")


@app.command()
@reports_errors
def current() -> None:
    """Show the database's revision and the newest one this code knows."""
    engine = database_engine()
    console.print(f"current: {migrate.current_revision(engine) or 'base'}  head: {migrate.head_revision(engine)}")
