"""Helpers shared by the CLI commands: error reporting, database engine resolution."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from meltica.errors import ConfigurationError, DataValidationError, MelticaError
from meltica.infra.postgres import database_engine as database_engine
from meltica.infra.postgres import ensure_schema_at_head
from meltica.infra.postgres import migration_engine as migration_engine
from meltica.storage.errors import server_reason

P = ParamSpec("P")
R = TypeVar("R")

# Piped output (CI logs, `| less`) would otherwise wrap at 80 columns and fold every table row.
_PIPED_WIDTH = None if sys.stdout.isatty() else 160
console = Console(width=_PIPED_WIDTH)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# Exit codes: 2 = bad input or configuration (the user must change something), 1 = anything else.
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn Meltica errors into one clear line on stderr and a non-zero exit, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (ConfigurationError, DataValidationError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except MelticaError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_FAILURE) from None
        except OperationalError as exc:
            # The database cannot be reached (DESIGN.md §5: infrastructure unavailable, retryable). The
            # driver's message names host and port, never the password.
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else "unreachable"
            err_console.print(
                f"[bold red]error:[/] the database is unavailable: {reason}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(EXIT_FAILURE) from None
        except DBAPIError as exc:
            # Anything else the server refused (a missing table, a permission): its first line, never the
            # statement or its parameters.
            err_console.print(
                f"[bold red]error:[/] the database refused the request: {server_reason(exc)}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper


def is_interactive() -> bool:
    return sys.stderr.isatty()


def schema_at_head(engine: Engine, *, migrate_through_engine: bool = False) -> None:
    """Before a runtime command uses the database: refused in staging/prod unless at head, else migrated
    (dev, paper) as the owner role (see :func:`meltica.infra.postgres.ensure_schema_at_head`)."""
    ensure_schema_at_head(engine, migrate_through_engine=migrate_through_engine)
