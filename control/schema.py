"""Control-plane tables (SQLAlchemy Core) and the change log that edges follow.

The change log: every change edges act on is appended to ``changes`` with a version taken from the
single row of ``change_counter``, incremented with ``UPDATE ... RETURNING`` in the writer's own
transaction. The row lock held until commit serialises writers, so versions are handed out in commit
order and a reader never sees version v+1 before v (a PostgreSQL sequence would not give that: a
later ``nextval`` can commit first). A rolled-back writer also rolls back its increment, so
committed versions have no gaps. On SQLite the database write lock gives the same serialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC datetime in Python.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones and stores the UTC wall time, to
    which UTC is re-attached on reading. Naive datetimes are refused on writing.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime: control-plane times must be timezone-aware")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), JSON text on SQLite.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")

change_counter = Table(
    "change_counter",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="single_row"),
)

changes = Table(
    "changes",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", Text, nullable=False),
    Column("payload", JSONDocument, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)


# --- who: accounts, sub-accounts, edges and their tokens --------------------------------------

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("billing", Text, nullable=False),  # "prepaid" | "postpaid" (agreement 4.1, 4.2)
    Column("timezone", Text, nullable=False),  # IANA name; billing days (default Asia/Shanghai)
    Column("state", Text, nullable=False),  # "active" | "suspended" | "terminated"
    Column("state_reason", Text, nullable=False, server_default=""),
    Column("created_at", UTCDateTime(), nullable=False),
    CheckConstraint("billing IN ('prepaid', 'postpaid')", name="billing"),
    CheckConstraint("state IN ('active', 'suspended', 'terminated')", name="state"),
)

subaccounts = Table(
    "subaccounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("scopes", JSONDocument, nullable=False),  # list of scope names
    # The domain names it is limited to; null: all of the account's.
    Column("domains", JSONDocument, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    UniqueConstraint("account_id", "name", name="uq_subaccounts_account_name"),
)

edges = Table(
    "edges",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    # The last change version the edge reported as applied by all its workers, and when.
    Column("applied_version", BigInteger, nullable=False, server_default="0"),
    Column("last_seen", UTCDateTime(), nullable=True),
)

# Every bearer token: an account's own, a sub-account's, or an edge's. Only a SHA-256 of the
# token is kept (tokens are 256 random bits, so a fast hash is enough); the token itself is shown
# once, when created.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("token_hash", Text, nullable=False, unique=True),
    Column("kind", Text, nullable=False),  # "account" | "subaccount" | "edge"
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=True, index=True),
    Column("subaccount_id", Integer, ForeignKey("subaccounts.id"), nullable=True),
    Column("edge_id", Integer, ForeignKey("edges.id"), nullable=True),
    Column("label", Text, nullable=False, server_default=""),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    CheckConstraint("kind IN ('account', 'subaccount', 'edge')", name="kind"),
)

# --- what: domains, legal URL blocks, purge and prefetch tasks ---------------------------------

domains = Table(
    "domains",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", Text, nullable=False, unique=True),  # unique across accounts
    # The edge's `[[domains]]` table without `name`: origins, origin_host, rules, query.
    Column("config", JSONDocument, nullable=False),
    Column("state", Text, nullable=False),  # "active" | "suspended" | "terminated"
    Column("state_reason", Text, nullable=False, server_default=""),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    CheckConstraint("state IN ('active', 'suspended', 'terminated')", name="state"),
)

url_blocks = Table(
    "url_blocks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("domain", Text, nullable=False),  # domain name (blocks outlive a deleted domain row)
    Column("pattern", Text, nullable=False),  # a path, or a path prefix ending in "*"
    Column("reason", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("domain", "pattern", name="uq_url_blocks_domain_pattern"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=True, index=True),
    Column("kind", Text, nullable=False),  # "purge" | "prefetch"
    Column("payload", JSONDocument, nullable=False),
    # The change version that carries it: done when every edge has applied this version.
    Column("version", BigInteger, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

# Per-edge results of a task that an edge reports on its own (prefetch: what it fetched). Purges and
# state changes need no row: an edge's applied_version says it has applied them.
task_results = Table(
    "task_results",
    metadata,
    Column("task_id", Integer, ForeignKey("tasks.id"), primary_key=True),
    Column("edge_id", Integer, ForeignKey("edges.id"), primary_key=True),
    Column("result", JSONDocument, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=True),
    Column("actor", Text, nullable=False),  # "operator" | "account" | "subaccount"
    Column("subaccount_id", Integer, ForeignKey("subaccounts.id"), nullable=True),
    Column("action", Text, nullable=False),  # e.g. "domain.create", "purge", "token.revoke"
    Column("target", Text, nullable=False, server_default=""),
    Column("detail", JSONDocument, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Index("ix_audit_log_account_at", "account_id", "at"),
)


def iso(value: datetime | None) -> str | None:
    """A stored time as the API and the feed show it: ISO 8601 with the offset and always the
    microseconds, so it reads back to the same instant and compares equal as text."""
    return None if value is None else value.isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Change:
    version: int
    kind: str
    payload: dict[str, Any]
    created_at: datetime


async def append_change(conn: AsyncConnection, kind: str, payload: dict[str, Any]) -> int:
    """Append a change in the caller's transaction and return its version.

    The counter row stays locked until the caller commits or rolls back: keep the transaction short.
    """
    bump = (
        update(change_counter)
        .where(change_counter.c.id == 1)
        .values(version=change_counter.c.version + 1)
        .returning(change_counter.c.version)
    )
    version = (await conn.execute(bump)).scalar_one()
    await conn.execute(
        insert(changes).values(
            version=version, kind=kind, payload=payload, created_at=datetime.now(UTC)
        )
    )
    return int(version)


async def changes_since(conn: AsyncConnection, version: int, limit: int) -> list[Change]:
    """Changes with a version greater than ``version``, oldest first, at most ``limit`` of them."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rows = await conn.execute(
        select(changes.c.version, changes.c.kind, changes.c.payload, changes.c.created_at)
        .where(changes.c.version > version)
        .order_by(changes.c.version)
        .limit(limit)
    )
    return [
        Change(version=int(r.version), kind=r.kind, payload=r.payload, created_at=r.created_at)
        for r in rows
    ]


# --- usage: what the edges served, per domain and 5-minute window (issue 5) --------------------

# Every batch an edge shipped, kept so that a batch posted twice (a lost acknowledgement, a retry)
# is counted once: its row and its buckets are written in one transaction.
usage_batches = Table(
    "usage_batches",
    metadata,
    Column("batch_id", Text, primary_key=True),
    Column("edge_id", Integer, ForeignKey("edges.id"), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("buckets", Integer, nullable=False),
)

# The sum of every edge's buckets per domain and window. Counters only ever add up (upserts of
# `usage.x + excluded.x`), so batches may arrive in any order. `account_id` is the owner of the
# domain when its first bucket arrived (null: no such domain), so a deleted or moved domain's past
# traffic stays with the account that was served.
usage = Table(
    "usage",
    metadata,
    Column("domain", Text, primary_key=True),
    Column("start", UTCDateTime(), primary_key=True),  # a 5-minute UTC boundary
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=True),
    Column("requests", BigInteger, nullable=False),
    Column("bytes_sent", BigInteger, nullable=False),
    Column("body_bytes", BigInteger, nullable=False),
    Column("origin_bytes", BigInteger, nullable=False),
    Column("hits", BigInteger, nullable=False),
    Column("misses", BigInteger, nullable=False),
    Column("passes", BigInteger, nullable=False),
    Column("refused", BigInteger, nullable=False),
    Column("status_1xx", BigInteger, nullable=False),
    Column("status_2xx", BigInteger, nullable=False),
    Column("status_3xx", BigInteger, nullable=False),
    Column("status_4xx", BigInteger, nullable=False),
    Column("status_5xx", BigInteger, nullable=False),
    Index("ix_usage_account_start", "account_id", "start"),
)


# --- notices: what the account is told (agreement 11) and its webhook deliveries ---------------

notices = Table(
    "notices",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("kind", Text, nullable=False),  # one of control.notices.NOTICE_KINDS
    Column("detail", JSONDocument, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # Null: never deduplicated (NULLs are distinct in the unique constraint).
    Column("dedupe_key", Text, nullable=True),
    UniqueConstraint("account_id", "kind", "dedupe_key", name="uq_notices_account_kind_key"),
    Index("ix_notices_account_id", "account_id", "id"),
)

# The secret signs deliveries, so it cannot be hashed: it is kept encrypted (Fernet) with the
# operator's `secret_key`.
account_webhooks = Table(
    "account_webhooks",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("url", Text, nullable=False),
    Column("secret_encrypted", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("notice_id", Integer, ForeignKey("notices.id"), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # Null once delivered or given up: nothing more to send.
    Column("next_attempt_at", UTCDateTime(), nullable=True, index=True),
    Column("delivered_at", UTCDateTime(), nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=False, server_default=""),
)


# --- billing: price lists, account money, packages, payments, settled days, bill lines --------
# Money is integer fen (BigInteger); rates are decimal strings, never floats (control.rating).

price_lists = Table(
    "price_lists",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    # [{"up_to_gb": int | null, "fen_per_gb": "23.5"}, ...], ascending, the last unbounded
    Column("traffic_tiers", JSONDocument, nullable=False),
    Column("fen_per_mbps_day", Text, nullable=False),
    Column("gb_bytes", BigInteger, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # the list that bills accounts without terms of their own (control.billing); at most one
    Column("is_default", Boolean, nullable=False, server_default=false()),
    Index(
        "uq_price_lists_default",
        "is_default",
        unique=True,
        sqlite_where=text("is_default"),
        postgresql_where=text("is_default"),
    ),
)

account_billing = Table(
    "account_billing",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("charge_by", Text, nullable=False),  # "traffic" | "bandwidth"
    Column("price_list_id", Integer, ForeignKey("price_lists.id"), nullable=False),
    Column("balance_fen", BigInteger, nullable=False, server_default="0"),
    # billable traffic of the month of the last settled day (informative; rating recomputes)
    Column("month_billable_bytes", BigInteger, nullable=False, server_default="0"),
    Column("penalty_accrued_fen", BigInteger, nullable=False, server_default="0"),
    Column("arrears_since", UTCDateTime(), nullable=True),
    Column("low_balance_fen", BigInteger, nullable=False, server_default="0"),
    Column("termination_at", UTCDateTime(), nullable=True),
    Column("termination_reason", Text, nullable=False, server_default=""),
    # when the terms were first set (the first billing day is the account's creation day)
    Column("created_at", UTCDateTime(), nullable=False),
    CheckConstraint("charge_by IN ('traffic', 'bandwidth')", name="charge_by"),
)

packages = Table(
    "packages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("quota_bytes", BigInteger, nullable=False),
    Column("remaining_bytes", BigInteger, nullable=False),
    Column("activated_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("price_fen", BigInteger, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

payments = Table(
    "payments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("reference", Text, nullable=False),
    UniqueConstraint("account_id", "reference", name="uq_payments_account_reference"),
)

day_settlements = Table(
    "day_settlements",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("day", Date, primary_key=True),  # the billing day in the account's time zone
    Column("record", JSONDocument, nullable=False),  # rating.DayRecord, see control.billing
    Column("settled_at", UTCDateTime(), nullable=False),
)

bill_lines = Table(
    "bill_lines",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("day", Date, nullable=False),
    Column("kind", Text, nullable=False),  # rating.LineKind
    Column("quantity", Text, nullable=False),
    Column("unit", Text, nullable=False),
    Column("unit_price", Text, nullable=False),
    Column("amount_fen", BigInteger, nullable=False),  # positive: charged; negative: credited
    Column("ref", Text, nullable=False, server_default=""),
    Column("adjustment", Boolean, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_bill_lines_account_day", "account_id", "day"),
)


# --- access logs: the pieces edges shipped, retention, legal holds, delete requests (issue 6) ----

# One gzip file an edge shipped for a domain and UTC hour (`PUT /v1/edge/logs/...`). The file
# itself is in the log store (control.logstore) under `storage_key`; `account_id` is the owner of
# the domain when the piece arrived (null: no account had it, operator only), so a deleted or
# moved domain's logs stay with the account whose traffic they record.
log_pieces = Table(
    "log_pieces",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("edge_id", Integer, ForeignKey("edges.id"), nullable=False),
    Column("domain", Text, nullable=False),
    Column("hour", UTCDateTime(), nullable=False),  # the start of a UTC hour
    Column("piece", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),  # hex
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=True),
    Column("stored_at", UTCDateTime(), nullable=False),
    Column("storage_key", Text, nullable=False, unique=True),
    UniqueConstraint("edge_id", "domain", "hour", "piece", name="uq_log_pieces_edge_piece"),
    Index("ix_log_pieces_domain_hour", "domain", "hour"),
    Index("ix_log_pieces_account_hour", "account_id", "hour"),
    Index("ix_log_pieces_hour", "hour"),
)

# An account's log retention when the operator set one; others keep the config's default. Never
# below the config's floor (control.logrules.retention_days applies it when reading).
log_retention = Table(
    "log_retention",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("days", Integer, nullable=False),
    Column("set_at", UTCDateTime(), nullable=False),
)

# Legal holds: a held domain's pieces are never deleted (retention, delete requests) until the
# operator lifts the hold. Keyed by name: a hold outlives the domain's registration, as logs do.
log_holds = Table(
    "log_holds",
    metadata,
    Column("domain", Text, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("set_by", Text, nullable=False),
    Column("set_at", UTCDateTime(), nullable=False),
)

# A customer's delete request for its pieces of a domain with hours in [start_hour, end_hour):
# what had passed the floor went at once; the retention job deletes the rest as each hour passes
# it, and sets `done_at` when the last one has.
log_deletions = Table(
    "log_deletions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("domain", Text, nullable=False),
    Column("start_hour", UTCDateTime(), nullable=False),
    Column("end_hour", UTCDateTime(), nullable=False),
    Column("requested_at", UTCDateTime(), nullable=False),
    Column("done_at", UTCDateTime(), nullable=True),
    Index("ix_log_deletions_done_at", "done_at"),
)
