"""The OpenAPI document: response schemas, and one decorator that describes a route.

sanic-ext builds the document from what `describe` attaches to each handler; the query
parameters come from `params.ROUTE_PARAMETERS` and `params.SCHEMAS`, the same tables the
parser reads, so the document says exactly what the routes accept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sanic_ext.extensions.openapi import openapi, types

from api.params import ROUTE_PARAMETERS, SCHEMAS

__all__ = ["ERRORS", "SCHEMA", "describe", "json_content", "list_of"]

F = TypeVar("F", bound=Callable[..., Any])
Schema: Any = types.Schema  # sanic-ext's schema objects are untyped

_INT = {"type": "integer", "minimum": 0}
_MS = {"type": "number", "nullable": True, "minimum": 0}
_TIME = {"type": "string", "format": "date-time"}


def _object(properties: dict[str, Any], *, nullable: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    props = {name: ({**schema, "nullable": True} if name in nullable else schema)
             for name, schema in properties.items()}
    return {"type": "object", "required": list(properties), "properties": props,
            "additionalProperties": False}


def list_of(item: dict[str, Any], **extra: dict[str, Any]) -> dict[str, Any]:
    """A list response of `item`s."""
    return _object({
        "items": {"type": "array", "items": item},
        "limit": {"type": "integer", "minimum": 1},
        "offset": _INT,
        "total": _INT,
        **extra,
    })


_COUNTS = {"connections": _INT, "bytes_in": _INT, "bytes_out": _INT, "bytes_total": _INT}
_LATENCY = {
    "count": _INT,
    "avg_ms": _MS, "p50_ms": _MS, "p95_ms": _MS, "p99_ms": _MS, "max_ms": _MS,
    "histogram": {"type": "array", "items": _object({
        "le_ms": {"type": "number", "nullable": True,
                  "description": "upper bound; null for the last, unbounded bucket"},
        "count": _INT,
    })},
}
_ANY_TEXT = {"type": "string"}

SCHEMA: dict[str, dict[str, Any]] = {
    "error": _object({"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": _ANY_TEXT, "message": _ANY_TEXT, "parameter": _ANY_TEXT},
        "additionalProperties": False,
    }}),
    "top_domains": list_of(_object({"domain": _ANY_TEXT, **_COUNTS, "avg_connect_ms": _MS})),
    "source_ips": list_of(_object({"source_ip": _ANY_TEXT, **_COUNTS, "users": _INT})),
    "users": list_of(_object({"user": _ANY_TEXT, **_COUNTS, "source_ips": _INT})),
    "traffic": _object({
        "interval": {"type": "string", "enum": ["1m", "5m", "1h", "1d"]},
        "points": {"type": "array", "items": _object(
            {"ts": _TIME, "connections": _INT, "bytes_in": _INT, "bytes_out": _INT}
        )},
    }),
    "latency": {"oneOf": [
        _object(_LATENCY),
        list_of(_object({"domain": _ANY_TEXT, **_LATENCY})),
    ]},
    "statuses": list_of(_object({"status": _ANY_TEXT, "connections": _INT})),
    "logs": list_of(
        _object({
            "event_id": {"type": "string", "format": "uuid"},
            "node_id": _ANY_TEXT,
            "started_at": _TIME, "ended_at": _TIME,
            "source_ip": _ANY_TEXT, "source_port": _INT,
            "user": _ANY_TEXT, "command": _ANY_TEXT, "protocol": _ANY_TEXT,
            "dest_host": _ANY_TEXT, "domain": _ANY_TEXT, "dest_ip": _ANY_TEXT,
            "dest_port": _INT, "registered_domain": _ANY_TEXT,
            "status": _ANY_TEXT, "reply_code": _INT, "close_reason": _ANY_TEXT,
            "connect_ms": _MS, "ttfb_ms": _MS, "duration_ms": {"type": "number"},
            "bytes_out": _INT, "bytes_in": _INT, "trace_id": _ANY_TEXT,
        }, nullable={"dest_host", "domain", "dest_ip", "dest_port", "registered_domain",
                     "reply_code", "trace_id"}),
        next_cursor={"type": "string", "nullable": True},
    ),
    "nodes": list_of(_object({
        "node_id": _ANY_TEXT, "version": _ANY_TEXT, "started_at": _TIME, "last_seen": _TIME,
        "policy_version": _ANY_TEXT, "active_connections": _INT,
    })),
    "health": _object({"status": {"type": "string"}}),
    "ready": _object({"status": {"type": "string"}, "schema_revision": _ANY_TEXT}),
}

ERRORS = {
    400: "Bad input: an unknown, repeated, malformed or out-of-range parameter",
    401: "A token is configured (`api.token`) and the request did not carry it as "
         "`Authorization: Bearer <token>`",
    503: "The database is unavailable or did not answer in time",
}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    """A response's JSON content, `schema` whole.

    Given as a plain mapping: sanic-ext's `Schema(**schema)` keeps only the keywords its
    class annotates and would drop `properties` and `items`, leaving an object schema that
    no body matches."""
    return {"application/json": {"schema": schema}}


def describe(
    *,
    route: str,
    summary: str,
    description: str,
    response: str,
    tag: str,
    secured: bool,
    errors: tuple[int, ...] = (400, 401, 503),
) -> Callable[[F], F]:
    """Attach the summary, the query parameters of `route`, the 200 and error responses.

    `errors` lists 401 for every route that needs the token when one is configured, whether
    or not this server has one: it is part of the route's contract. `secured` (a token is
    configured) adds the security requirement."""

    def decorate(handler: F) -> F:
        handler = openapi.summary(summary)(handler)
        handler = openapi.description(description)(handler)
        handler = openapi.tag(tag)(handler)
        for name in ROUTE_PARAMETERS[route]:
            spec = dict(SCHEMAS[name])
            text = spec.pop("description", "")
            handler = openapi.parameter(name, Schema(**spec), "query",
                                        description=text, required=False)(handler)
        if response in ("text", "html"):
            content = {f"text/{'plain' if response == 'text' else 'html'}":
                       Schema(type="string")}
        else:
            content = json_content(SCHEMA[response])
        handler = openapi.response(200, content, "OK")(handler)
        for status in errors:
            handler = openapi.response(status, json_content(SCHEMA["error"]),
                                       ERRORS[status])(handler)
        if secured:
            handler = openapi.secured("token")(handler)
        return handler

    return decorate
