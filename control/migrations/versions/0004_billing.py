"""Billing: price lists, account money, packages, payments, settled days and bill lines.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from control.schema import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "price_lists",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("traffic_tiers", JSON, nullable=False),
        sa.Column("fen_per_mbps_day", sa.Text(), nullable=False),
        sa.Column("gb_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_lists")),
        sa.UniqueConstraint("name", name=op.f("uq_price_lists_name")),
    )
    op.create_table(
        "account_billing",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("charge_by", sa.Text(), nullable=False),
        sa.Column("price_list_id", sa.Integer(), nullable=False),
        sa.Column("balance_fen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("month_billable_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("penalty_accrued_fen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("arrears_since", UTCDateTime(), nullable=True),
        sa.Column("low_balance_fen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("termination_at", UTCDateTime(), nullable=True),
        sa.Column("termination_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "charge_by IN ('traffic', 'bandwidth')", name=op.f("ck_account_billing_charge_by")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_billing_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["price_list_id"],
            ["price_lists.id"],
            name=op.f("fk_account_billing_price_list_id_price_lists"),
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_billing")),
    )
    op.create_table(
        "packages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger(), nullable=False),
        sa.Column("remaining_bytes", sa.BigInteger(), nullable=False),
        sa.Column("activated_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("price_fen", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_packages_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_packages")),
    )
    op.create_index(op.f("ix_packages_account_id"), "packages", ["account_id"])
    op.create_table(
        "payments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_payments_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
        sa.UniqueConstraint("account_id", "reference", name="uq_payments_account_reference"),
    )
    op.create_table(
        "day_settlements",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("record", JSON, nullable=False),
        sa.Column("settled_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_day_settlements_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", "day", name=op.f("pk_day_settlements")),
    )
    op.create_table(
        "bill_lines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("quantity", sa.Text(), nullable=False),
        sa.Column("unit", sa.Text(), nullable=False),
        sa.Column("unit_price", sa.Text(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("ref", sa.Text(), server_default="", nullable=False),
        sa.Column("adjustment", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_bill_lines_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bill_lines")),
    )
    op.create_index("ix_bill_lines_account_day", "bill_lines", ["account_id", "day"])


def downgrade() -> None:
    op.drop_index("ix_bill_lines_account_day", table_name="bill_lines")
    op.drop_table("bill_lines")
    op.drop_table("day_settlements")
    op.drop_table("payments")
    op.drop_index(op.f("ix_packages_account_id"), table_name="packages")
    op.drop_table("packages")
    op.drop_table("account_billing")
    op.drop_table("price_lists")
