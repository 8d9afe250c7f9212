"""a fill's identity includes its side

Two orders of one account that trade with each other make one venue trade: one trade id, a buy leg
and a sell leg. With ``(exchange, account, trade_id)`` as the key the second leg was dropped as a
"redelivery"; the key is now ``(exchange, account, trade_id, side)``. ``fills`` is an ordinary table
on both flavours (not a hypertable), so no time column is needed in the key.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("pk_fills", "fills", type_="primary")
    op.create_primary_key("pk_fills", "fills", ["exchange", "account", "trade_id", "side"])


def downgrade() -> None:
    # Refused while a self-trade's two legs are stored (they would violate the narrower key).
    op.drop_constraint("pk_fills", "fills", type_="primary")
    op.create_primary_key("pk_fills", "fills", ["exchange", "account", "trade_id"])
