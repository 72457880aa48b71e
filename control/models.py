"""Request bodies of the `/v1` API.

One pydantic declaration per body gives both the validation (unknown fields refused, no silent
type coercion) and the JSON Schema in the OpenAPI document. Checks that need the database (does
the caller own this domain?) or the edge's own parser (is this origin valid?) are the handlers'.
"""

from __future__ import annotations

import json
import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, field_validator

Scope = Literal["domains:read", "domains:write", "purge", "usage:read", "logs:read", "billing:read"]

# Size caps: every domain is in every snapshot and every write is one change that every edge
# reads, so no account may make either huge (one 64 MiB event stalls every edge's feed).
MAX_URLS = 1000
MAX_PREFIXES = 100
MAX_PREFETCH = 1000
MAX_URL_LENGTH = 4096
MAX_NAMES = 1000  # domains in one purge
MAX_TAGS = 100  # tags in one purge
MAX_TAG_LENGTH = 256
MAX_PURGE_ITEMS = 10_000  # a tag purge's domains x tags
MAX_ORIGINS = 16
MAX_RULES = 100  # per domain
MAX_RULE_VALUES = 100  # suffixes, prefixes or paths per rule
MAX_QUERY_PARAMS = 100
MAX_STRING = 1024  # rule values, origin URLs, origin_host, query parameter names
MAX_ACCESS_BYTES = 65536  # a domain's access rules as JSON (IP lists can be long)

Reason = Annotated[str, Field(min_length=1, max_length=1000)]
Label = Annotated[str, Field(max_length=200)]
Url = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH)]
Name = Annotated[str, Field(min_length=1, max_length=253)]
Text = Annotated[str, Field(max_length=MAX_STRING)]
Tag = Annotated[str, Field(min_length=1, max_length=MAX_TAG_LENGTH)]
RuleValues = Annotated[list[Text], Field(max_length=MAX_RULE_VALUES)]


def _int_or_string(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer or a string, got {type(value).__name__}")
    return value


# Durations ("1h" or seconds) and sizes ("1MiB" or bytes) as the edge's config writes them; the
# edge's parser checks their form.
IntOrString = Annotated[
    int | str,
    PlainValidator(_int_or_string),
    WithJsonSchema({"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}),
]


class Body(BaseModel):
    """Unknown fields are errors (a typo never becomes a default); no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NewAccount(Body):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    billing: Literal["prepaid", "postpaid"]
    timezone: str = Field("Asia/Shanghai", description="IANA time zone of the billing day")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not an IANA time zone such as 'Asia/Shanghai'"
            ) from None
        return value


class StateChange(Body):
    """Suspend or terminate: the reason is shown to the account (and by edges, on 403)."""

    reason: Reason


class NewToken(Body):
    label: Label = ""


class NewEdge(Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class NewBlock(Body):
    url: Url = Field(description="http(s)://domain/path, or a path prefix ending in '*'")
    reason: Reason


class CacheRuleBody(Body):
    """One `[[domains.rules]]` entry: exactly one of suffix, prefix, path."""

    suffix: RuleValues | None = None
    prefix: RuleValues | None = None
    path: RuleValues | None = None
    ttl: IntOrString | None = None
    respect_origin: bool | None = None
    slice: IntOrString | None = None


class QueryBody(Body):
    mode: Literal["keep_all", "ignore_all", "keep", "drop"] = "keep_all"
    params: Annotated[list[Text], Field(max_length=MAX_QUERY_PARAMS)] | None = None


class DomainSettings(Body):
    """The edge's `[[domains]]` table without `name` (`PUT /v1/domains/{name}`)."""

    origins: Annotated[list[Text], Field(max_length=MAX_ORIGINS)] = Field(
        description="origin URLs, scheme://host[:port]; not at an address in origin_deny"
    )
    origin_host: Text | None = None
    rules: Annotated[list[CacheRuleBody], Field(max_length=MAX_RULES)] | None = None
    query: QueryBody | None = None
    access: dict[str, Any] | None = Field(
        None,
        description=(
            "access rules: the edge's [domains.access] table (signed_url, referer, ip, "
            "user_agent, rate_limit, speed_limits; README.md 'Access rules'), checked by the "
            f"edge's parser; at most {MAX_ACCESS_BYTES} bytes as JSON"
        ),
    )

    @field_validator("access")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_ACCESS_BYTES:
            raise ValueError(f"more than {MAX_ACCESS_BYTES} bytes as JSON")
        return value


class NewDomain(DomainSettings):
    """The edge's whole `[[domains]]` table (`POST /v1/domains`)."""

    name: Name


class PurgeRequest(Body):
    """`type` says which list is given: url -> urls, prefix -> prefixes (URLs whose path is the
    prefix), domain -> domains, tag -> tags (and optionally domains; all the caller's if absent).
    """

    type: Literal["url", "prefix", "domain", "tag"]
    urls: Annotated[list[Url], Field(min_length=1, max_length=MAX_URLS)] | None = None
    prefixes: Annotated[list[Url], Field(min_length=1, max_length=MAX_PREFIXES)] | None = None
    domains: Annotated[list[Name], Field(min_length=1, max_length=MAX_NAMES)] | None = None
    tags: Annotated[list[Tag], Field(min_length=1, max_length=MAX_TAGS)] | None = Field(
        None, description=f"domains x tags at most {MAX_PURGE_ITEMS}"
    )


class PrefetchRequest(Body):
    urls: Annotated[list[Url], Field(min_length=1, max_length=MAX_PREFETCH)]


class NewSubaccount(Body):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    scopes: list[Scope]
    domains: list[Name] | None = Field(
        None, description="domain names it is limited to; absent or null: all of the account's"
    )


class EdgeAck(Body):
    """`POST /v1/edge/ack` (served by the feed)."""

    version: Annotated[int, Field(ge=0)]


class EdgeTaskResult(Body):
    """`POST /v1/edge/tasks/{id}/result` (served by the feed)."""

    fetched: Annotated[int, Field(ge=0)]
    failed: list[str] = Field(description="the URLs it could not fetch")


# --- responses: documented in the OpenAPI document; the tests validate every answer against them


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


State = Literal["active", "suspended", "terminated"]


class AccountOut(Out):
    id: int
    name: str
    billing: Literal["prepaid", "postpaid"]
    timezone: str
    state: State
    reason: str
    created_at: datetime


class AccountCreated(Out):
    account: AccountOut
    token: str = Field(description="shown only here: store it safely")


class AccountList(Out):
    accounts: list[AccountOut]


class TokenCreated(Out):
    id: int
    token: str = Field(description="shown only here: store it safely")


class EdgeOut(Out):
    id: int
    name: str
    applied_version: int = Field(description="the last change version all its workers applied")
    last_seen: datetime | None
    created_at: datetime


class EdgeCreated(Out):
    edge: EdgeOut
    token: str = Field(description="shown only here: the edge's [control] token")


class EdgeList(Out):
    edges: list[EdgeOut]


class DomainOut(Out):
    """The domain's normalised `[[domains]]` table, its state and its CNAME target."""

    name: str
    origins: list[str]
    origin_host: str | None = None
    rules: list[CacheRuleBody] | None = None
    query: QueryBody | None = None
    access: dict[str, Any] | None = Field(
        None,
        description=(
            "access rules; the signing keys (signed_url.key, secondary_key) in plaintext for "
            'callers who may change the domain, "********" for read-only ones'
        ),
    )
    state: State
    reason: str
    cname: str
    created_at: datetime
    updated_at: datetime


class DomainList(Out):
    domains: list[DomainOut]


class EdgeCount(Out):
    total: int
    applied: int


class TaskOut(Out):
    id: int
    kind: Literal["purge", "prefetch"]
    state: Literal["pending", "done"]
    edges: EdgeCount
    pending: list[str] = Field(description="names of the edges not done yet")
    version: int = Field(description="the change version that carries the task")
    created_at: datetime
    results: dict[str, Any] | None = Field(None, description="prefetch: each edge's report")


class BlockOut(Out):
    id: int
    domain: str
    pattern: str
    reason: str
    created_at: datetime


class BlockList(Out):
    blocks: list[BlockOut]


class SubaccountOut(Out):
    id: int
    name: str
    scopes: list[Scope]
    domains: list[str] | None
    created_at: datetime


class SubaccountCreated(Out):
    subaccount: SubaccountOut
    token: str = Field(description="shown only here: store it safely")


class SubaccountList(Out):
    subaccounts: list[SubaccountOut]


class TokenOut(Out):
    id: int
    kind: Literal["account", "subaccount"]
    subaccount_id: int | None
    label: str
    created_at: datetime
    revoked_at: datetime | None


class TokenList(Out):
    tokens: list[TokenOut]


class AuditEntry(Out):
    id: int
    at: datetime
    actor: Literal["operator", "account", "subaccount"]
    subaccount_id: int | None
    action: str
    target: str
    detail: dict[str, Any]


class AuditPage(Out):
    entries: list[AuditEntry]


class AckOut(Out):
    applied_version: int


class TaskResultOut(Out):
    task: int
    edge: int
    fetched: int
    failed: list[str]


class DomainState(Out):
    """DOMAIN of control/README.md."""

    name: str
    state: State
    reason: str
    config: dict[str, Any] | None = Field(
        None, description="the [[domains]] table without name; absent when terminated"
    )


class BlockState(Out):
    domain: str
    pattern: str
    reason: str


class Snapshot(Out):
    """STATE of control/README.md: the whole truth at `version`."""

    version: int
    at: datetime | None = Field(description="when change `version` was made; null at version 0")
    domains: list[DomainState]
    blocks: list[BlockState]
