"""The default price list: it bills accounts without billing terms of their own (issue 5).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("price_lists", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("is_default", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        # At most one default: a unique index over the rows that are it.
        batch_op.create_index(
            "uq_price_lists_default",
            ["is_default"],
            unique=True,
            sqlite_where=sa.text("is_default"),
            postgresql_where=sa.text("is_default"),
        )


def downgrade() -> None:
    with op.batch_alter_table("price_lists", schema=None) as batch_op:
        batch_op.drop_index("uq_price_lists_default")
        batch_op.drop_column("is_default")
