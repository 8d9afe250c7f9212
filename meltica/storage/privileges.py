"""What the runtime role may do in the database, granted by the migrations (least privilege).

Two roles share a Meltica database:

* the **owner** (migration) role owns the schema and runs ``meltica db upgrade``; it is not a superuser;
* the **runtime** role (``database_runtime_role``, default ``meltica_app``) is what every other command
  connects as: it reads and inserts everywhere, updates and deletes only the state tables listed here,
  uses the sequences, and can neither change the schema nor switch a trigger off (it owns nothing).

The facts (``APPEND_ONLY_TABLES``) get no ``UPDATE``, ``DELETE`` or ``TRUNCATE`` at all: their triggers
refuse those too, but a role that cannot even ask is the stronger guarantee (a table owner or a superuser
could disable the triggers).

Migrations apply the grants (0007 and any later one that adds a table), so a production database whose
roles an operator created gets exactly what the local one gets. 0007 also sets ``ALTER DEFAULT
PRIVILEGES``: a table a later migration creates (as the same owner role) is readable and insertable by
the runtime role at once; a later migration that makes a table updatable adds it to ``RUNTIME_UPDATES``
and grants it.

TimescaleDB: a hypertable's chunks take their privileges from the hypertable (a ``GRANT`` on the
hypertable is applied to its existing chunks and copied to every new chunk), so granting on the tables
is enough; the runtime role inserting into a hypertable needs no right to create chunks. The
continuous aggregate ``candles_1h`` can only be refreshed by its owner: the runtime role leaves that to
the refresh policy, and 0007 turns on real-time aggregation so reads include what is not yet
materialized. On plain PostgreSQL ``REFRESH MATERIALIZED VIEW`` also needs the owner: the runtime role
calls ``meltica_refresh_candles_1h()``, a ``SECURITY DEFINER`` function that refreshes that one view.
"""

from __future__ import annotations

import os
import re

from sqlalchemy import Connection, text

from meltica.errors import ConfigurationError
from meltica.storage.tables import APPEND_ONLY_TABLES
from meltica.storage.timeseries import REFRESH_CANDLES_FUNCTION

# The role the migrations grant the application's rights to (the settings' ``database_runtime_role`` default).
DEFAULT_RUNTIME_ROLE = "meltica_app"

__all__ = [
    "DEFAULT_RUNTIME_ROLE",
    "REFRESH_CANDLES_FUNCTION",
    "RUNTIME_DELETES",
    "RUNTIME_UPDATES",
    "grant_runtime",
    "runtime_role",
]

RUNTIME_ROLE_ENV = "MELTICA_DATABASE_RUNTIME_ROLE"

# Tables the application updates in place (current state, not facts): found by reading every UPDATE,
# upsert (ON CONFLICT DO UPDATE) and SELECT ... FOR UPDATE in meltica/.
RUNTIME_UPDATES: tuple[str, ...] = (
    "orders",  # an order's current state (its history is order_events)
    "order_lists",  # OCO/bracket lists of the order emulator
    "emulated_orders",  # the order emulator's resting orders
    "kill_switch_state",  # the kill switch per scope
    "risk_state",  # daily counters, peaks, stored risk reports
    "reconciliation_runs",  # a run's status when it finishes
    "position_snapshots",  # the sinks keep the latest snapshot per key
    "credentials",  # `meltica keys add` replaces, `keys rotate-master` re-encrypts
)
# Tables the application deletes from (never a fact).
RUNTIME_DELETES: tuple[str, ...] = (
    "position_snapshots",  # a portfolio snapshot replaces the one stored at the same instant
    "balance_snapshots",
    "credentials",  # `meltica keys remove`
)

_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def runtime_role(role: str | None = None) -> str:
    """``role``, else ``MELTICA_DATABASE_RUNTIME_ROLE``, else ``meltica_app``; checked to be a plain name."""
    name = role or os.environ.get(RUNTIME_ROLE_ENV) or DEFAULT_RUNTIME_ROLE
    if not _ROLE.match(name):
        raise ConfigurationError(
            f"database_runtime_role {name!r} is not a plain role name (lower-case letters, digits, '_')",
            field="database_runtime_role",
        )
    return name


def require_role(conn: Connection, role: str) -> None:
    """``ConfigurationError`` naming what to do when ``role`` does not exist on the server."""
    exists = conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :r)"), {"r": role}).scalar()
    if not exists:
        raise ConfigurationError(
            f"the runtime role {role!r} does not exist on this server: create it first "
            f"(CREATE ROLE {role} LOGIN PASSWORD '...'; `meltica infra up` does it locally) or set "
            "database_runtime_role (MELTICA_DATABASE_RUNTIME_ROLE) to the role the application connects as",
            field="database_runtime_role",
        )


def grant_runtime(conn: Connection, role: str) -> None:
    """Grant ``role`` what the application needs on every table of the schema, and no more. Idempotent."""
    quoted = f'"{role}"'
    statements = [
        # Nobody but the owner creates objects in the schema (PostgreSQL < 15 lets PUBLIC do it; only the
        # schema's owner can revoke it, anyone else gets a warning, not an error).
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA public TO {quoted}",
        f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {quoted}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}",
        f"REVOKE INSERT ON alembic_version FROM {quoted}",  # it reads the revision (the head check)
        *(f"GRANT UPDATE ON {table} TO {quoted}" for table in RUNTIME_UPDATES),
        *(f"GRANT DELETE ON {table} TO {quoted}" for table in RUNTIME_DELETES),
        *(f"REVOKE UPDATE, DELETE, TRUNCATE ON {table} FROM {quoted}" for table in APPEND_ONLY_TABLES),
        # Tables and sequences later migrations create (as this owner role): readable, insertable, usable.
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT ON TABLES TO {quoted}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {quoted}",
    ]
    for statement in statements:
        conn.execute(text(statement))


def revoke_runtime(conn: Connection, role: str) -> None:
    """Undo :func:`grant_runtime` (the downgrade)."""
    quoted = f'"{role}"'
    for statement in (
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT, INSERT ON TABLES FROM {quoted}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE USAGE, SELECT ON SEQUENCES FROM {quoted}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quoted}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {quoted}",
        f"REVOKE USAGE ON SCHEMA public FROM {quoted}",
    ):
        conn.execute(text(statement))


def refresh_function_sql(view: str) -> str:
    """The owner's function that refreshes ``view`` on plain PostgreSQL (the runtime role may call it)."""
    return f"""
CREATE OR REPLACE FUNCTION {REFRESH_CANDLES_FUNCTION}() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF (SELECT ispopulated FROM pg_matviews WHERE schemaname = 'public' AND matviewname = '{view}') THEN
        REFRESH MATERIALIZED VIEW CONCURRENTLY public.{view};
    ELSE
        REFRESH MATERIALIZED VIEW public.{view};
    END IF;
END;
$$
"""
