"""Time series: retention becomes opt-in; ``candles_1h`` aggregates in real time (TimescaleDB path only).

0002 put retention policies on ``trades`` (365 days) and ``order_book_snapshots`` (90 days). TimescaleDB
counts retention from *now*, so backfilled history older than the window was deleted by the first policy
run. This revision removes both policies; retention is set per table from ``storage.retention`` by
``meltica db upgrade`` (``meltica.storage.timeseries.apply_retention``), none by default.

It also turns on real-time aggregation of the ``candles_1h`` continuous aggregate
(``timescaledb.materialized_only = false``), so the newest hour, not yet materialised, is still read.

On plain PostgreSQL there are no policies and ``candles_1h`` is a materialized view: nothing changes.

Downgrade restores 0002's policies and materialised-only reads.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

from meltica.storage import timeseries

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What 0002 installed (kept here so the downgrade restores exactly that).
RETENTION_0002: dict[str, str] = {"trades": "365 days", "order_book_snapshots": "90 days"}


def upgrade() -> None:
    conn = op.get_bind()
    if timeseries.detect_flavour(conn) is not timeseries.Flavour.TIMESCALEDB:
        return
    for table in RETENTION_0002:
        conn.execute(text("SELECT remove_retention_policy(CAST(:t AS regclass), if_exists => true)"), {"t": table})
    timeseries.set_realtime_aggregation(conn)


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
    conn.execute(
        text(f"ALTER MATERIALIZED VIEW {timeseries.CANDLES_1H_VIEW} SET (timescaledb.materialized_only = true)")
    )
