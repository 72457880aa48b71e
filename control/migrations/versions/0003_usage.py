"""Usage: edge batches received and per-domain 5-minute counters.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from control.schema import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = (
    "requests",
    "bytes_sent",
    "body_bytes",
    "origin_bytes",
    "hits",
    "misses",
    "passes",
    "refused",
    "status_1xx",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
)


def upgrade() -> None:
    op.create_table(
        "usage_batches",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("edge_id", sa.Integer(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("buckets", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["edge_id"], ["edges.id"], name=op.f("fk_usage_batches_edge_id_edges")
        ),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_usage_batches")),
    )
    op.create_table(
        "usage",
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("start", UTCDateTime(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=True),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COUNTERS),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_usage_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("domain", "start", name=op.f("pk_usage")),
    )
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.create_index("ix_usage_account_start", ["account_id", "start"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_account_start")

    op.drop_table("usage")
    op.drop_table("usage_batches")
