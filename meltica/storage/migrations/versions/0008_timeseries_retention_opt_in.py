"""Time series: retention becomes opt-in; the ``candles_1h`` refresh policy covers the whole history
(TimescaleDB path only).

0002 put retention policies on ``trades`` (365 days) and ``order_book_snapshots`` (90 days). TimescaleDB
counts retention from *now*, so backfilled history older than the window was deleted by the first policy
run. This revision removes both policies; retention is set per table from ``storage.retention`` by
``meltica db upgrade`` (``meltica.storage.timeseries.apply_retention``), none by default.

It also turns on real-time aggregation of the ``candles_1h`` continuous aggregate
(``timescaledb.materialized_only = false``, as 0007 does), so the newest hour, not yet materialised, is still
read, and widens its refresh policy from the last 3 days to the whole history (``start_offset => NULL``): a
refresh recomputes only invalidated hours, and a backfill loaded by the runtime role, which may not refresh
the aggregate itself, is materialised at the policy's next run.

On plain PostgreSQL there are no policies and ``candles_1h`` is a materialized view: nothing changes.

Downgrade restores 0002's retention and refresh policies (real-time reads stay, as 0007 set them).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import Connection, text

from meltica.storage import timeseries

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What 0002 installed (kept here so the downgrade restores exactly that).
RETENTION_0002: dict[str, str] = {"trades": "365 days", "order_book_snapshots": "90 days"}
POLICY_0002 = (
    "start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '15 minutes'"
)


def upgrade() -> None:
    conn = op.get_bind()
    if timeseries.detect_flavour(conn) is not timeseries.Flavour.TIMESCALEDB:
        return
    for table in RETENTION_0002:
        conn.execute(text("SELECT remove_retention_policy(CAST(:t AS regclass), if_exists => true)"), {"t": table})
    timeseries.set_realtime_aggregation(conn)
    _replace_refresh_policy(conn, timeseries.CANDLES_1H_POLICY)


def downgrade() -> None:
    conn = op.get_bind()
    if timeseries.detect_flavour(conn) is not timeseries.Flavour.TIMESCALEDB:
        return
    for table, keep in RETENTION_0002.items():
        conn.execute(text("SELECT remove_retention_policy(CAST(:t AS regclass), if_exists => true)"), {"t": table})
        conn.execute(
            text("SELECT add_retention_policy(CAST(:t AS regclass), CAST(:keep AS interval))"),
            {"t": table, "keep": keep},
        )
    _replace_refresh_policy(conn, POLICY_0002)


def _replace_refresh_policy(conn: Connection, policy: str) -> None:
    view = timeseries.CANDLES_1H_VIEW
    conn.execute(text(f"SELECT remove_continuous_aggregate_policy('{view}', if_exists => true)"))
    conn.execute(text(f"SELECT add_continuous_aggregate_policy('{view}', {policy})"))
