"""The change feed edges follow: publishing changes, and (below) serving them as SSE.

`publish` appends a change in the writer's transaction; with PostgreSQL it also queues a
`NOTIFY cdn_changes`, which PostgreSQL delivers at commit to every replica listening (a rolled
back writer notifies no one).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from control.schema import append_change

NOTIFY_CHANNEL = "cdn_changes"


async def publish(conn: AsyncConnection, kind: str, payload: dict[str, Any]) -> int:
    """Append a change (see control/README.md for kinds and payloads); returns its version.

    After the transaction commits, the caller wakes this process's feed with `Feed.changed()`.
    """
    version = await append_change(conn, kind, payload)
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_notify(:channel, :version)"),
            {"channel": NOTIFY_CHANNEL, "version": str(version)},
        )
    return version
