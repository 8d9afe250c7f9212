"""Stored reports: ``reports`` and ``report_files`` (a backtest's ``report.html`` and charts, served by
``meltica reports serve``).

The runtime role gets ``SELECT`` and ``INSERT`` on both (0007's default privileges already give it; granted
again here so the migration says so): a report is written once and never changed, so no ``UPDATE`` or
``DELETE``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from meltica.storage import privileges

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("reports", "report_files")


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("report_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("report_id", name=op.f("pk_reports")),
    )
    op.create_table(
        "report_files",
        sa.Column("report_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("name ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$'", name=op.f("ck_report_files_name_plain")),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.report_id"],
            name=op.f("fk_report_files_report_id_reports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("report_id", "name", name=op.f("pk_report_files")),
    )
    conn = op.get_bind()
    role = privileges.runtime_role(context.config.attributes.get("runtime_role"))
    same_role = conn.execute(sa.text("SELECT current_user = :r"), {"r": role}).scalar()
    if not same_role and conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first():
        for table in TABLES:
            op.execute(f'GRANT SELECT, INSERT ON {table} TO "{role}"')


def downgrade() -> None:
    op.drop_table("report_files")
    op.drop_table("reports")
