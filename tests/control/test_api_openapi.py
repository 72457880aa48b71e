"""The OpenAPI document: served without a token, OpenAPI 3.1, and listing exactly the routes the
app serves (the edge feed's included), with request schemas from the validating models."""

from __future__ import annotations

import re
from typing import Any

from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from control.api import Route
from control.app import ROUTES
from control.models import (
    MAX_ORIGINS,
    MAX_QUERY_PARAMS,
    MAX_RULE_VALUES,
    MAX_RULES,
    MAX_STRING,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_URL_LENGTH,
)
from control.openapi import EDGE_ROUTES
from tests.control.conftest import Api


def _served(api: Api) -> set[tuple[str, str]]:
    routes = set()
    for route in api.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/v1/") and route.method not in ("HEAD", "*"):
            routes.add((route.method, path))
    return routes


def _resolve(document: dict[str, Any], node: Any) -> None:
    """Every $ref in `node` points at something in `document`."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            target: Any = document
            for part in ref.removeprefix("#/").split("/"):
                target = target[part]
        for value in node.values():
            _resolve(document, value)
    elif isinstance(node, list):
        for value in node:
            _resolve(document, value)


async def test_document_lists_exactly_the_served_routes(api: Api) -> None:
    reply = await api.call("GET", "/v1/openapi.json", token=None)
    assert reply.status == 200
    document = reply.body
    assert document["openapi"].startswith("3.1.")
    validate(document, cls=OpenAPIV31SpecValidator)
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert documented == _served(api)
    edge_paths = {(r.method, r.path) for r in EDGE_ROUTES}
    assert edge_paths <= documented
    assert edge_paths.isdisjoint({(r.method, r.path) for r in ROUTES})
    _resolve(document, document)
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


async def test_operations_carry_access_bodies_and_parameters(api: Api) -> None:
    document = (await api.call("GET", "/v1/openapi.json", token=None)).body
    paths = document["paths"]
    assert paths["/v1/openapi.json"]["get"]["security"] == []
    create = paths["/v1/domains"]["post"]
    assert create["x-scope"] == "domains:write"
    assert create["x-allowed"] == ["account", "subaccount"]
    assert "201" in create["responses"] and "422" in create["responses"]
    schema = document["components"]["schemas"]["NewDomain"]
    assert schema["additionalProperties"] is False
    assert {"name", "origins"} <= set(schema["required"])
    purge = document["components"]["schemas"]["PurgeRequest"]
    assert purge["properties"]["urls"]["anyOf"][0]["maxItems"] == 1000
    assert purge["properties"]["urls"]["anyOf"][0]["items"]["maxLength"] == MAX_URL_LENGTH
    assert purge["properties"]["tags"]["anyOf"][0]["maxItems"] == MAX_TAGS
    assert purge["properties"]["tags"]["anyOf"][0]["items"]["maxLength"] == MAX_TAG_LENGTH
    assert schema["properties"]["origins"]["maxItems"] == MAX_ORIGINS
    assert schema["properties"]["origins"]["items"]["maxLength"] == MAX_STRING
    assert schema["properties"]["rules"]["anyOf"][0]["maxItems"] == MAX_RULES
    rule = document["components"]["schemas"]["CacheRuleBody"]["properties"]["suffix"]["anyOf"][0]
    assert (rule["maxItems"], rule["items"]["maxLength"]) == (MAX_RULE_VALUES, MAX_STRING)
    params = document["components"]["schemas"]["QueryBody"]["properties"]["params"]["anyOf"][0]
    assert (params["maxItems"], params["items"]["maxLength"]) == (MAX_QUERY_PARAMS, MAX_STRING)
    created = paths["/v1/accounts"]["post"]["responses"]["201"]["content"]["application/json"]
    assert created["schema"] == {"$ref": "#/components/schemas/AccountCreated"}
    assert "text/event-stream" in paths["/v1/edge/events"]["get"]["responses"]["200"]["content"]
    account = paths["/v1/accounts/{id}"]["get"]
    assert account["parameters"][0]["schema"]["type"] == "integer"
    feed_params = paths["/v1/edge/events"]["get"]["parameters"]
    assert [p["name"] for p in feed_params] == ["since", "at"]
    assert feed_params[1]["schema"] == {"type": "string", "format": "date-time"}
    snapshot = document["components"]["schemas"]["Snapshot"]
    assert "at" in snapshot["required"]
    for route in ROUTES:
        operation = paths[route.path][route.method.lower()]
        assert str(route.status) in operation["responses"]
        params = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert params == set(re.findall(r"{(\w+)}", route.path))


def test_every_route_is_declared_once() -> None:
    keys = [(r.method, r.path) for r in (*ROUTES, *EDGE_ROUTES)]
    assert len(keys) == len(set(keys))
    assert all(isinstance(r, Route) and r.handler is not None for r in ROUTES)


async def test_log_routes_document_their_raw_bodies_and_errors(api: Api) -> None:
    paths = (await api.call("GET", "/v1/openapi.json", token=None)).body["paths"]
    upload = paths["/v1/edge/logs/{domain}/{hour}/{piece}"]["put"]
    assert list(upload["requestBody"]["content"]) == ["application/gzip"]
    assert {"201", "400", "401", "409", "413", "503"} <= set(upload["responses"])
    assert list(paths["/v1/logs/{domain}/{hour}"]["get"]["responses"]["200"]["content"]) == [
        "application/gzip"
    ]
    assert "application/x-tar" in paths["/v1/logs/export"]["post"]["responses"]["200"]["content"]
    assert paths["/v1/logs"]["get"]["x-scope"] == "logs:read"
