"""Agreement 4.1 (prepaid: service begins after payment) and 4.2 (postpaid: use first), through
the API on both backends: a prepaid account's domains wait, suspended with the awaiting reason,
until a payment or a package lets it serve; that request activates them through the change log.
What an edge does with the log is checked with the edge's own `controlstate` (403 with the reason).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from control.domains import AWAITING_REASON
from control.scheduler import CLOCK
from edge import controlstate

from .conftest import Api
from .test_billing import add_usage, billed_account, local, state_changes, tick

GB = 10**9


async def upserts(api: Api, name: str) -> list[tuple[str, str]]:
    return [
        (c.payload["domain"]["state"], c.payload["domain"]["reason"])
        for c in await api.changes()
        if c.kind == "domain.upsert" and c.payload["domain"]["name"] == name
    ]


async def edge_answer(api: Api, name: str) -> tuple[int, str] | None:
    """What an edge that applied the whole change log answers for `name` (None: it serves)."""
    state = controlstate.EMPTY
    for change in await api.changes():
        applied = controlstate.apply(state, change.version, change.kind, change.payload)
        assert applied.problems == ()
        state = applied.state
    assert name in state.serving
    gate = state.gates.get(name)
    return None if gate is None else gate.refusal("/index.html")


async def pay(api: Api, account_id: int, fen: int, reference: str = "p") -> Any:
    body = {"amount_fen": fen, "reference": reference}
    return await api.ok("POST", f"/v1/accounts/{account_id}/payments", body=body, status=201)


async def test_prepaid_domain_waits_for_payment_and_the_payment_activates_it(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "pre")
    made = await api.domain(token, "www.pre.test")
    assert (made["state"], made["reason"]) == ("suspended", AWAITING_REASON)
    assert await upserts(api, "www.pre.test") == [("suspended", AWAITING_REASON)]
    assert await state_changes(api, "www.pre.test") == []
    refusal = await edge_answer(api, "www.pre.test")
    assert refusal is not None and refusal[0] == 403 and AWAITING_REASON in refusal[1]

    before = await api.version()
    paid = await pay(api, a, 1)
    assert paid["balance_fen"] == 1
    # the same request: the change is in the log when the payment's answer arrives
    assert await state_changes(api, "www.pre.test") == [("active", "")]
    assert [c.kind for c in await api.changes(before)] == ["domain.state"]
    assert (await api.ok("GET", "/v1/domains/www.pre.test", token))["state"] == "active"
    assert await edge_answer(api, "www.pre.test") is None
    # a replayed payment changes nothing; a domain added now is active at once
    await pay(api, a, 1)
    assert await state_changes(api, "www.pre.test") == [("active", "")]
    assert (await api.domain(token, "img.pre.test"))["state"] == "active"


async def test_a_package_grant_activates_waiting_domains(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "pkg")
    await api.domain(token, "www.pkg.test")
    await api.domain(token, "img.pkg.test")
    body = {"quota_bytes": 10 * GB, "valid_days": 1}  # free: the balance stays 0
    await api.ok("POST", f"/v1/accounts/{a}/packages", body=body, status=201)
    for name in ("img.pkg.test", "www.pkg.test"):
        assert await state_changes(api, name) == [("active", "")]
        assert await edge_answer(api, name) is None
    # once the package has expired (balance still 0), a new domain waits again
    api.app[CLOCK].set(local(2, 1))
    assert (await api.domain(token, "new.pkg.test"))["reason"] == AWAITING_REASON
    # and only that one, ever: running out later is arrears, not this gate
    assert await state_changes(api, "www.pkg.test") == [("active", "")]


async def test_prepaid_with_balance_and_postpaid_are_active_at_once(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "rich")
    await pay(api, a, 500)
    made = await api.domain(token, "www.rich.test")
    assert (made["state"], made["reason"]) == ("active", "")
    _, later = await billed_account(api, "later", "postpaid")
    assert (await api.domain(later, "www.later.test"))["state"] == "active"
    _, bare = await api.account("bare", "postpaid")  # no billing terms: use first (4.2)
    assert (await api.domain(bare, "www.bare.test"))["state"] == "active"
    for name in ("www.rich.test", "www.later.test", "www.bare.test"):
        assert await upserts(api, name) == [("active", "")]
        assert await edge_answer(api, name) is None


async def test_prepaid_without_billing_terms_cannot_serve(api: Api) -> None:
    _, token = await api.account("terms", "prepaid")
    made = await api.domain(token, "www.terms.test")
    assert (made["state"], made["reason"]) == ("suspended", AWAITING_REASON)
    # the account may delete a domain that only waits (adding it again would wait again)
    assert (await api.call("DELETE", "/v1/domains/www.terms.test", token)).status == 204


async def test_a_payment_does_not_resume_what_the_operator_suspended(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "op")
    await api.domain(token, "www.op.test")
    await api.domain(token, "img.op.test")
    await api.ok("POST", "/v1/domains/www.op.test/suspend", body={"reason": "abuse"})
    await pay(api, a, 100)
    assert (await state_changes(api, "www.op.test"))[-1] == ("suspended", "abuse")
    assert await state_changes(api, "img.op.test") == [("active", "")]
    deleting = await api.call("DELETE", "/v1/domains/www.op.test", token)
    assert deleting.status == 409  # the operator's suspension stays


async def test_a_payment_during_the_accounts_suspension_hands_them_to_it(api: Api) -> None:
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "held")
    await api.domain(token, "www.held.test")
    await api.ok("POST", f"/v1/accounts/{a}/suspend", body={"reason": "audit"})
    assert await state_changes(api, "www.held.test") == []  # it was not serving anyway
    await pay(api, a, 100)
    assert await state_changes(api, "www.held.test") == [("suspended", "account suspended: audit")]
    await api.ok("POST", f"/v1/accounts/{a}/resume")
    assert (await state_changes(api, "www.held.test"))[-1] == ("active", "")


async def test_a_prepaid_account_in_arrears_adds_waiting_domains(api: Api) -> None:
    """Running out is the arrears path (notice, grace, suspension); a domain added meanwhile
    waits until a payment brings the balance above zero."""
    api.app[CLOCK].set(local(1))
    a, token = await billed_account(api, "owes")
    await pay(api, a, 100)
    await api.domain(token, "www.owes.test")
    await add_usage(api, a, "www.owes.test", local(1, 1), GB)  # 200 fen
    await tick(api, local(2, 0, 1))
    assert (await api.ok("GET", f"/v1/accounts/{a}/balance"))["balance_fen"] == -100
    assert await state_changes(api, "www.owes.test") == []  # within the grace: still serving
    assert (await api.domain(token, "new.owes.test"))["reason"] == AWAITING_REASON
    await tick(api, local(2, 0, 1) + timedelta(hours=24))
    [(state, reason)] = await state_changes(api, "www.owes.test")
    assert state == "suspended" and reason.startswith("arrears: ")
    owed = -(await api.ok("GET", f"/v1/accounts/{a}/balance"))["balance_fen"]
    await pay(api, a, owed, "even")  # balance 0: the arrears end, but nothing is prepaid
    assert (await state_changes(api, "www.owes.test"))[-1] == ("active", "")
    assert await state_changes(api, "new.owes.test") == []
    await pay(api, a, 1, "plus")
    assert await state_changes(api, "new.owes.test") == [("active", "")]
