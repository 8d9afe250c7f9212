"""Dropping a test database on either flavour, as whatever role the tests connect with.

``DROP DATABASE … WITH (FORCE)`` must terminate *every* session on the database, and a role that is not a
superuser may not terminate TimescaleDB's background workers (they run as the superuser): under TimescaleDB
it fails. Instead: end the client sessions this role may end, then a plain ``DROP DATABASE`` — TimescaleDB
stops its own workers of a database being dropped."""

from __future__ import annotations

import time

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

DROP_DEADLINE_S = 30.0


def drop_test_database(conn: Connection, name: str) -> None:
    """Drop database ``name`` (if it exists) through ``conn``, an AUTOCOMMIT connection to another database."""
    deadline = time.monotonic() + DROP_DEADLINE_S
    while True:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND usesysid IS NOT NULL AND pg_has_role(current_user, usesysid, 'MEMBER')"
            ),
            {"name": name},
        )
        try:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            return
        except DBAPIError as exc:
            # 55006 object_in_use: a session was still closing (or one this role may not end: give up at the deadline)
            if getattr(exc.orig, "sqlstate", None) != "55006" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
