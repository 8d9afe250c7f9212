"""Database errors as one line: what Meltica was doing, and the server's first line of reason."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from meltica.errors import AuthenticationError, InfrastructureUnavailableError, MelticaError, StorageError

# What the server says when it refuses the login itself (psycopg gives no SQLSTATE for a failed connection):
# repeating the same credentials cannot succeed, so these are terminal, not an outage.
_REFUSED_LOGIN = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "pam authentication failed",
    "authentication failed for user",
    "password is required",
    'role "',  # FATAL: role "x" does not exist
)


def server_reason(exc: DBAPIError | psycopg.Error) -> str:
    """The first line of the driver's message (never the statement or its parameters)."""
    source = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(source).strip().splitlines()
    return lines[0] if lines else type(source).__name__


def classify_database_error(exc: BaseException, doing: str, engine: Engine | None = None) -> MelticaError | None:
    """The taxonomy's error for a database failure, with the server's reason kept in the message (None when
    ``exc`` is not a database error):

    * the server refused the login (wrong password, unknown role, no pg_hba entry) — :class:`AuthenticationError`,
      terminal: retrying the same credentials cannot help;
    * a connection that cannot be made or was lost — :class:`InfrastructureUnavailableError`, retryable;
    * anything the server refused — :class:`StorageError`, terminal.
    """
    where = f" ({engine.url.render_as_string(hide_password=True)})" if engine is not None else ""
    if isinstance(exc, OperationalError | InterfaceError | psycopg.OperationalError | psycopg.InterfaceError):
        reason = server_reason(exc)
        if any(marker in reason.lower() for marker in _REFUSED_LOGIN):
            return AuthenticationError(
                f"{doing}: the database refused the login{where}: {reason}", reason="database_login_refused"
            )
        return InfrastructureUnavailableError(
            f"{doing}: the database is unavailable{where}: {reason}", reason="database_unavailable"
        )
    if isinstance(exc, DBAPIError | psycopg.Error):
        return StorageError(f"{doing}: the database refused it: {server_reason(exc)}")
    return None


@contextmanager
def storage_errors(engine: Engine, doing: str) -> Iterator[None]:
    """Turn a database failure inside the block into a Meltica error with one clear line: a connection that
    cannot be made is :class:`InfrastructureUnavailableError` (retryable), anything the server refused is
    :class:`StorageError` (terminal). The SQLAlchemy chain is dropped: it repeats the statement."""
    try:
        yield
    except (DBAPIError, psycopg.Error) as exc:  # psycopg's own: raised by the raw COPY cursor
        classified = classify_database_error(exc, doing, engine)
        assert classified is not None
        raise classified from None
