"""Access logs: stored pieces, per-account retention, legal holds, delete requests (issue 6).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from control.schema import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "log_pieces",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("edge_id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("hour", UTCDateTime(), nullable=False),
        sa.Column("piece", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=True),
        sa.Column("stored_at", UTCDateTime(), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["edge_id"], ["edges.id"], name=op.f("fk_log_pieces_edge_id_edges")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_log_pieces_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_log_pieces")),
        sa.UniqueConstraint("storage_key", name=op.f("uq_log_pieces_storage_key")),
        sa.UniqueConstraint("edge_id", "domain", "hour", "piece", name="uq_log_pieces_edge_piece"),
    )
    with op.batch_alter_table("log_pieces", schema=None) as batch_op:
        batch_op.create_index("ix_log_pieces_domain_hour", ["domain", "hour"], unique=False)
        batch_op.create_index("ix_log_pieces_account_hour", ["account_id", "hour"], unique=False)
        batch_op.create_index("ix_log_pieces_hour", ["hour"], unique=False)

    op.create_table(
        "log_retention",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("set_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_log_retention_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_log_retention")),
    )

    op.create_table(
        "log_holds",
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("set_by", sa.Text(), nullable=False),
        sa.Column("set_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_log_holds")),
    )

    op.create_table(
        "log_deletions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("start_hour", UTCDateTime(), nullable=False),
        sa.Column("end_hour", UTCDateTime(), nullable=False),
        sa.Column("requested_at", UTCDateTime(), nullable=False),
        sa.Column("done_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_log_deletions_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_log_deletions")),
    )
    with op.batch_alter_table("log_deletions", schema=None) as batch_op:
        batch_op.create_index("ix_log_deletions_done_at", ["done_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("log_deletions", schema=None) as batch_op:
        batch_op.drop_index("ix_log_deletions_done_at")
    op.drop_table("log_deletions")
    op.drop_table("log_holds")
    op.drop_table("log_retention")
    with op.batch_alter_table("log_pieces", schema=None) as batch_op:
        batch_op.drop_index("ix_log_pieces_hour")
        batch_op.drop_index("ix_log_pieces_account_hour")
        batch_op.drop_index("ix_log_pieces_domain_hour")
    op.drop_table("log_pieces")
