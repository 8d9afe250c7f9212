"""Database errors as one line: what Meltica was doing, and the server's first line of reason."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from meltica.errors import InfrastructureUnavailableError, StorageError


def server_reason(exc: DBAPIError | psycopg.Error) -> str:
    """The first line of the driver's message (never the statement or its parameters)."""
    source = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(source).strip().splitlines()
    return lines[0] if lines else type(source).__name__


@contextmanager
def storage_errors(engine: Engine, doing: str) -> Iterator[None]:
    """Turn a database failure inside the block into a Meltica error with one clear line: a connection that
    cannot be made is :class:`InfrastructureUnavailableError` (retryable), anything the server refused is
    :class:`StorageError` (terminal). The SQLAlchemy chain is dropped: it repeats the statement."""
    try:
        yield
    except (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError) as exc:
        where = engine.url.render_as_string(hide_password=True)
        raise InfrastructureUnavailableError(
            f"{doing}: the database is unavailable ({where}): {server_reason(exc)}", url=where
        ) from None
    except (DBAPIError, psycopg.Error) as exc:  # psycopg's own: raised by the raw COPY cursor
        raise StorageError(f"{doing}: the database refused it: {server_reason(exc)}") from None
