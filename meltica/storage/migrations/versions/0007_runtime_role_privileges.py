"""The runtime role: what the application may do, and nothing more.

Grants the runtime role (``database_runtime_role``, default ``meltica_app``; the migration reads the
value ``meltica db upgrade`` hands it, else ``MELTICA_DATABASE_RUNTIME_ROLE``) ``SELECT`` and ``INSERT``
on every table, ``UPDATE``/``DELETE`` on the state tables of ``meltica.storage.privileges`` only, the
sequences, and default privileges for the tables later migrations create. It owns nothing, so it can
neither change the schema nor disable the facts' triggers. The role must exist (an operator creates it
in production; ``meltica infra up`` does locally): the migration refuses otherwise. When it is the
migrating role itself (one role for both, a development setup) nothing is granted: it owns everything.

Roll-ups: plain PostgreSQL gets ``meltica_refresh_candles_1h()``, a ``SECURITY DEFINER`` function of the
owner that refreshes ``candles_1h`` (refreshing needs the owner); on TimescaleDB ``candles_1h`` switches
to real-time aggregation (the runtime role cannot refresh a continuous aggregate: its policy does, and
reads add what is not materialized yet). Chunks of hypertables take the hypertable's grants.

Downgrade revokes everything granted here and drops the function.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op
from sqlalchemy import text

from meltica.storage import privileges, timeseries

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _role() -> str:
    return privileges.runtime_role(context.config.attributes.get("runtime_role"))


def upgrade() -> None:
    conn = op.get_bind()
    role = _role()
    privileges.require_role(conn, role)
    # One role for both (a development database configured by MELTICA_DATABASE_URL alone): it owns
    # everything already, and revoking from it would take away what the migrations themselves need.
    same_role = conn.execute(text("SELECT current_user = :r"), {"r": role}).scalar()
    view = timeseries.CANDLES_1H_VIEW
    if timeseries.detect_flavour(conn) is timeseries.Flavour.TIMESCALEDB:
        op.execute(f"ALTER MATERIALIZED VIEW {view} SET (timescaledb.materialized_only = false)")
    else:
        op.execute(privileges.refresh_function_sql(view))
        op.execute(f"REVOKE ALL ON FUNCTION {privileges.REFRESH_CANDLES_FUNCTION}() FROM PUBLIC")
        op.execute(f'GRANT EXECUTE ON FUNCTION {privileges.REFRESH_CANDLES_FUNCTION}() TO "{role}"')
    if not same_role:
        privileges.grant_runtime(conn, role)


def downgrade() -> None:
    conn = op.get_bind()
    role = _role()
    exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r AND rolname <> current_user"), {"r": role})
    if exists.first():
        privileges.revoke_runtime(conn, role)
    op.execute(f"DROP FUNCTION IF EXISTS {privileges.REFRESH_CANDLES_FUNCTION}()")
    if timeseries.detect_flavour(conn) is timeseries.Flavour.TIMESCALEDB:
        op.execute(f"ALTER MATERIALIZED VIEW {timeseries.CANDLES_1H_VIEW} SET (timescaledb.materialized_only = true)")
