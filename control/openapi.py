"""The OpenAPI 3.1 document, generated from the route table the app serves (plus the edge feed's
routes, documented here from control/README.md), with the request bodies' JSON Schemas from the
same pydantic models that validate them. Served without a token at `GET /v1/openapi.json`."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from control.api import EDGE, PUBLIC, QueryParam, Route, RouteTable
from control.models import AckOut, EdgeAck, EdgeTaskResult, Snapshot, TaskResultOut

DOCUMENT = web.AppKey("openapi_document", dict)

TITLE = "cdn-edge control plane"
VERSION = "1"

# Served by control.feed.Feed; listed here so the document covers every route the app serves.
EDGE_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/edge/events",
        "The change feed (text/event-stream): a snapshot when needed, then every change",
        EDGE,
        query=(
            QueryParam(
                "since", {"type": "integer", "minimum": 0}, "the last version the edge applied"
            ),
            QueryParam(
                "at",
                {"type": "string", "format": "date-time"},
                "the `at` of that change as the feed sent it; another time here (a control plane "
                "restored from a backup) gets a snapshot first",
            ),
        ),
        produces="text/event-stream",
    ),
    Route(
        "GET", "/v1/edge/snapshot", "The whole state at the newest version", EDGE, response=Snapshot
    ),
    Route(
        "POST",
        "/v1/edge/ack",
        "Report the version every worker applied",
        EDGE,
        body=EdgeAck,
        response=AckOut,
    ),
    Route(
        "POST",
        "/v1/edge/tasks/{id}/result",
        "Report a prefetch task's result",
        EDGE,
        body=EdgeTaskResult,
        response=TaskResultOut,
    ),
)

routes = RouteTable()

_PARAM = re.compile(r"{(\w+)}")
_PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "scope": {"type": "string", "description": "the scope a sub-account lacks (403)"},
        "errors": {
            "type": "array",
            "description": "every field that failed validation (422)",
            "items": {
                "type": "object",
                "required": ["field", "problem"],
                "properties": {"field": {"type": "string"}, "problem": {"type": "string"}},
            },
        },
    },
}


def document(table: list[Route]) -> dict[str, Any]:
    """The OpenAPI document for `table`."""
    models: list[type[BaseModel]] = sorted(
        {model for route in table for model in (route.body, route.response) if model is not None},
        key=lambda m: m.__name__,
    )
    refs, defs = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = {"Problem": _PROBLEM, **defs.get("$defs", {})}
    paths: dict[str, dict[str, Any]] = {}
    for route in table:
        operation = _operation(route)
        if route.response is not None:
            content = operation["responses"][str(route.status)]["content"]
            content[route.produces]["schema"] = refs[(route.response, "validation")]
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
            }
        elif route.consumes is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {route.consumes: {"schema": {"type": "string", "format": "binary"}}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Accounts, domains, purges and the change feed edges follow. "
            "Errors are RFC 9457 problem details.",
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Problem": {
                    "description": "An error (RFC 9457 problem details)",
                    "content": {"application/problem+json": {"schema": _ref("Problem")}},
                }
            },
        },
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(route: Route) -> dict[str, Any]:
    name = route.handler.__name__ if route.handler is not None else _edge_operation_id(route)
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": route.summary,
        "description": _who(route),
        "tags": [route.path.split("/")[2]],
    }
    parameters: list[dict[str, Any]] = [
        {
            "name": param,
            "in": "path",
            "required": True,
            "schema": {"type": "integer", "minimum": 1} if param == "id" else {"type": "string"},
        }
        for param in _PARAM.findall(route.path)
    ]
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "schema": q.schema,
            "description": q.description,
        }
        for q in route.query
    ]
    if parameters:
        operation["parameters"] = parameters
    success: dict[str, Any] = {"description": HTTPStatus(route.status).phrase}
    if route.status != 204:
        schema = {"type": "object"} if route.produces == "application/json" else {"type": "string"}
        success["content"] = {route.produces: {"schema": schema}}
    responses: dict[str, Any] = {str(route.status): success}
    errors = [*([400, 422] if route.body is not None else []), *route.errors]
    if route.who != PUBLIC:
        operation["x-allowed"] = sorted(route.who)
        if route.scope is not None:
            operation["x-scope"] = route.scope
        errors += [401, 403]
    else:
        operation["security"] = []
    if "{" in route.path:
        errors.append(404)
    if route.method in ("POST", "PUT", "DELETE") and route.who != EDGE:
        errors.append(409)
    for status in sorted(set(errors)):
        responses[str(status)] = {"$ref": "#/components/responses/Problem"}
    operation["responses"] = responses
    return operation


def _who(route: Route) -> str:
    if route.who == PUBLIC:
        return "No token needed."
    kinds = ", ".join(sorted(route.who))
    scope = f"; a sub-account needs the scope `{route.scope}`" if route.scope else ""
    return f"Token kinds: {kinds}{scope}."


def _edge_operation_id(route: Route) -> str:
    words = re.sub(r"{\w+}", "", route.path).removeprefix("/v1/").replace("/", "_")
    return f"{route.method.lower()}_{words.strip('_').replace('__', '_')}"


@routes.route("GET", "/v1/openapi.json", "This document (no token needed)", who=PUBLIC)
async def openapi_document(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[DOCUMENT])
