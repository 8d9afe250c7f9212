"""Facts refuse DELETE and TRUNCATE as well as UPDATE.

``order_events``, ``fills``, ``risk_events`` and ``reconciliation_discrepancies`` already refuse
``UPDATE`` (0002). A deleted fact could be re-inserted with other values (a fill at another price), so
they now refuse ``DELETE`` (row trigger; also a delete cascading from a parent row) and ``TRUNCATE``
(statement trigger; also a ``TRUNCATE ... CASCADE`` from a parent table). ``DROP TABLE`` (a downgrade)
is not a row change and is not refused here: ``meltica db downgrade`` guards it.

Both flavours: the fact tables are ordinary tables on plain PostgreSQL and on TimescaleDB alike (the
hypertables of ``meltica.storage.timeseries.HYPERTABLES`` are market data and snapshots), so the same
triggers apply. Retention keeps working: TimescaleDB's retention policies call ``drop_chunks`` on the
hypertables only, which drops chunk tables — neither a ``DELETE`` nor a ``TRUNCATE`` of the hypertable, so
no statement or row trigger fires — and no guarded table is a hypertable. Were a fact table ever made a
hypertable, TimescaleDB copies the row trigger to every chunk and keeps the ``TRUNCATE`` trigger on the
hypertable; a retention policy on it would still work and would be the one way facts are ever removed.

Downgrade drops the new triggers and their function: the 0002 ``UPDATE`` guards stay as they were.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from meltica.storage.tables import APPEND_ONLY_TABLES

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ERASE_GUARD_FUNCTION = """
CREATE OR REPLACE FUNCTION meltica_refuse_erase() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only: facts are never erased (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$
"""


def upgrade() -> None:
    op.execute(ERASE_GUARD_FUNCTION)
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION meltica_refuse_erase()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION meltica_refuse_erase()"
        )


def downgrade() -> None:
    for table in APPEND_ONLY_TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete ON {table}")
    op.execute("DROP FUNCTION IF EXISTS meltica_refuse_erase()")
