"""Signed-URL keys in a domain's stored settings (`access.signed_url.key` and `secondary_key`,
issue 7): sealed at rest, opened for edges and for those who may change the domain, masked for
everyone else, hidden in the audit log.

At rest (in `domains.config`, hence in the `domain.upsert` payloads of the change log) a key is
stored as the object `{"fernet": TOKEN}`, TOKEN the key encrypted by `control.cipher`. A key is
never an object anywhere else: the edge's parser accepts only a string, so a sealed key that
reached an edge unopened would make the domain invalid there (served as absent, 404: never served
without its rule), and a sealed key sent to the API is refused like any other non-string.

Rows written before keys were sealed hold plain strings: `seal_stored_keys` seals them at
startup when a `secret_key` is configured; until then they are used as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.db import write_transaction
from control.schema import changes, domains

log = logging.getLogger("control.signing_keys")

KEY_FIELDS = ("key", "secondary_key")
SEALED = "fernet"  # the member of a sealed key's object holding its token
MASK = "********"  # what read-only callers see instead of a key
AUDITED = "(hidden)"  # what the audit log keeps instead of a key
KEY_FIELD = "access.signed_url.key"  # the field named when keys cannot be stored


def _with_keys(config: dict[str, Any], change: Callable[[Any], Any]) -> dict[str, Any]:
    """`config` with each signing key replaced by `change(key)`; `config` itself untouched."""
    access = config.get("access")
    if not isinstance(access, dict) or not isinstance(access.get("signed_url"), dict):
        return config
    signed: dict[str, Any] = access["signed_url"]
    replaced = {k: change(v) if k in KEY_FIELDS else v for k, v in signed.items()}
    return {**config, "access": {**access, "signed_url": replaced}}


def _is_sealed(key: Any) -> bool:
    return isinstance(key, dict) and isinstance(key.get(SEALED), str)


def _has_plaintext_keys(config: dict[str, Any]) -> bool:
    """Whether `config` holds a key not sealed (a row written before keys were sealed)."""
    plain = False

    def note(key: Any) -> Any:
        nonlocal plain
        plain = plain or not _is_sealed(key)
        return key

    _with_keys(config, note)
    return plain


def sealed(config: dict[str, Any], cipher: Fernet) -> dict[str, Any]:
    """`config` as stored: its plaintext keys encrypted (sealed ones stay as they are)."""
    return _with_keys(
        config,
        lambda key: key if _is_sealed(key) else {SEALED: cipher.encrypt(key.encode()).decode()},
    )


def opened(
    name: str, config: dict[str, Any], cipher: Fernet | None, *, otherwise: Any = None
) -> dict[str, Any]:
    """`config` with its keys in plaintext. A key that cannot be opened (no `secret_key`, or not
    the one that sealed it) is logged, naming the domain only, and becomes `otherwise`, or stays
    sealed when that is None."""

    unreadable = False

    def open_key(key: Any) -> Any:
        nonlocal unreadable
        if not _is_sealed(key):
            return key
        if cipher is not None:
            try:
                return cipher.decrypt(key[SEALED].encode()).decode()
            except InvalidToken:
                pass
        unreadable = True
        return key if otherwise is None else otherwise

    config = _with_keys(config, open_key)
    if unreadable:
        log.error(
            "cannot decrypt the signing keys of domain %s: %s", name,
            "no secret_key is configured" if cipher is None else "secret_key was changed",
        )  # fmt: skip
    return config


def masked(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as read-only callers see it."""
    return _with_keys(config, lambda key: MASK)


def audited(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as the audit log keeps it."""
    return _with_keys(config, lambda key: AUDITED)


async def seal_stored_keys(engine: AsyncEngine, cipher: Fernet | None) -> int:
    """Seal the plaintext keys older versions stored, in domain rows and in the change log's
    `domain.upsert` payloads; returns how many rows it sealed. Without a cipher it only warns.

    The rows are read again, locked, in the write transaction, so replicas starting together
    and live writers never lose a write to it."""
    async with engine.connect() as conn:
        plain = await _plaintext_rows(conn)
    if not any(plain):
        return 0
    if cipher is None:
        log.warning(
            "%d domains and %d changes hold signing keys in plaintext: set secret_key to "
            "encrypt them", len(plain[0]), len(plain[1]),
        )  # fmt: skip
        return 0
    async with write_transaction(engine) as conn:
        plain_rows, plain_changes = await _plaintext_rows(conn, lock=True)
        for row in plain_rows:
            await conn.execute(
                update(domains)
                .where(domains.c.id == row.id)
                .values(config=sealed(row.config, cipher))
            )
        for change in plain_changes:
            domain = change.payload["domain"]
            payload = {
                **change.payload,
                "domain": {**domain, "config": sealed(domain["config"], cipher)},
            }
            await conn.execute(
                update(changes).where(changes.c.version == change.version).values(payload=payload)
            )
    log.info(
        "encrypted the plaintext signing keys of %d domains and %d changes",
        len(plain_rows), len(plain_changes),
    )  # fmt: skip
    return len(plain_rows) + len(plain_changes)


async def _plaintext_rows(
    conn: AsyncConnection, *, lock: bool = False
) -> tuple[list[Any], list[Any]]:
    """The domain rows and the `domain.upsert` changes that hold a plaintext key."""
    domain_query = select(domains.c.id, domains.c.config)
    change_query = select(changes.c.version, changes.c.payload).where(
        changes.c.kind == "domain.upsert"
    )
    if lock:
        domain_query = domain_query.with_for_update()
        change_query = change_query.with_for_update()
    rows = [r for r in await conn.execute(domain_query) if _has_plaintext_keys(r.config)]
    upserts = [
        c
        for c in await conn.execute(change_query)
        if _has_plaintext_keys(c.payload.get("domain", {}).get("config", {}))
    ]
    return rows, upserts
