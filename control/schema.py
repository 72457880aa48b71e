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
    CheckConstraint,
    Column,
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
    insert,
    select,
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
