"""schemathesis against the running API on a real database: every operation of
/openapi.json, with generated valid and invalid input, under every check schemathesis has.

A 400 is a right answer to input that the document cannot express as invalid (from after
to, a range with too many points); `positive_data_acceptance` would call it wrong, so
those cases are told apart by their error code (see `_cross_field_refusal`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from api_harness import RunningApi, Traffic, api_settings, event
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.generation.modes import GenerationMode

from api.openapi import SCHEMA
from api.params import SCHEMAS

TOKEN = "schemathesis-token-of-the-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = datetime.now(UTC).replace(second=0, microsecond=0)

load_all_checks()
_BY_NAME = {check.__name__: check for check in CHECKS.get_all()}
# Cross-field rules (from <= to, at most max_points buckets) are not expressible in
# OpenAPI 3.0: valid-looking values the API rightly refuses with a 400 naming the rule.
# Nor are a calendar (February 30 matches the documented syntax) and a cursor's meaning.
_CROSS_FIELD_CODES = {"invalid_range", "too_many_points", "invalid_time", "invalid_cursor"}


@pytest.fixture(scope="module")
def api(database_url: str) -> Iterator[RunningApi]:
    traffic = Traffic(events=[event(NOW - timedelta(minutes=n * 7), connect_ms=float(n))
                              for n in range(40)])
    traffic.store(database_url, now=NOW)
    with RunningApi(api_settings(database_url, token=TOKEN)) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(api: RunningApi) -> Any:
    return schemathesis.openapi.from_url(f"{api.url}/openapi.json", headers=AUTH)


def _cross_field_refusal(response: Any) -> bool:
    if response.status_code != 400:
        return False
    try:
        return response.json()["error"]["code"] in _CROSS_FIELD_CODES
    except (ValueError, KeyError, TypeError):
        return False


def _valid_over_http(query: dict[str, Any] | None) -> bool:
    """Whether a "negative" query is valid once on the wire, where every value is text.

    Negative generation may swap a string for a number (`domain=0`) or an integer for a
    numeric string: in a query string the two are the same bytes, which the API rightly
    takes; those cases are not negative at all.
    """
    for name, value in (query or {}).items():
        if value == []:
            continue  # an empty list sends nothing at all
        if name not in SCHEMAS or isinstance(value, (list, dict)):
            return False
        schema = {key: item for key, item in SCHEMAS[name].items() if key != "description"}
        text = {True: "true", False: "false", None: ""}.get(value, str(value)) \
            if isinstance(value, (bool, type(None))) else str(value)
        instance: Any = text
        if schema.get("type") == "integer":
            if not re.fullmatch(r"[0-9]+", text):
                return False
            instance = int(text)
        if not jsonschema_rs.validator_for(schema, validate_formats=True).is_valid(instance):
            return False
    return True


OPERATIONS = ["/stats/top-domains", "/stats/source-ips", "/stats/users", "/stats/traffic",
              "/stats/latency", "/stats/statuses", "/logs", "/nodes", "/healthz", "/readyz",
              "/metrics", "/dashboard", "/openapi.json"]


# schemathesis' own pytest plugin (lazy schemas) does not run under pytest 9 yet, so each
# operation's strategies are driven with hypothesis directly: the same cases and checks.
_NO_PARAMETERS = {"/healthz", "/readyz", "/metrics", "/dashboard", "/openapi.json"}


@pytest.mark.parametrize(("path", "mode"), [
    (path, mode) for path in OPERATIONS for mode in GenerationMode
    if not (path in _NO_PARAMETERS and mode is GenerationMode.NEGATIVE)  # nothing to break
])
def test_api_conforms_to_its_document(api_schema: Any, api: RunningApi, path: str,
                                      mode: GenerationMode) -> None:
    operation = api_schema[path]["GET"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case: Any) -> None:
        checks = list(_BY_NAME.values())
        response = case.call(base_url=api.url, headers=AUTH)
        if _cross_field_refusal(response):
            checks.remove(_BY_NAME["positive_data_acceptance"])
        if mode is GenerationMode.NEGATIVE and _valid_over_http(case.query):
            checks.remove(_BY_NAME["negative_data_rejection"])
        case.validate_response(response, checks=checks, headers=AUTH)

    check()


# The routes that need the token when one is configured, and those that never do.
_TOKEN_ROUTES = {"/stats/top-domains", "/stats/source-ips", "/stats/users", "/stats/traffic",
                 "/stats/latency", "/stats/statuses", "/logs", "/nodes", "/dashboard",
                 "/openapi.json"}
_PUBLIC_ROUTES = {"/healthz", "/readyz", "/metrics"}


def _check_document(document: dict[str, Any], *, secured: bool) -> None:
    assert set(document["paths"]) == _TOKEN_ROUTES | _PUBLIC_ROUTES
    assert document["components"]["securitySchemes"]["token"] == {"type": "http",
                                                                  "scheme": "bearer"}
    error = {"schema": SCHEMA["error"]}
    for path, item in document["paths"].items():
        responses = item["get"]["responses"]
        # Every documented error carries the error object's whole schema.
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"] == error, (path, status)
        if path in _TOKEN_ROUTES:
            # The 401 is part of the route's contract whether or not this server has a
            # token; that it needs one now is what `security` says.
            assert "401" in responses, path
            assert item["get"].get("security") == ([{"token": []}] if secured else None), path
        else:
            assert "401" not in responses and "security" not in item["get"], path
    ok = document["paths"]["/logs"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok == {"schema": SCHEMA["logs"]}


def test_document_lists_every_route(api: RunningApi) -> None:
    document = httpx.get(f"{api.url}/openapi.json", headers=AUTH).json()
    _check_document(document, secured=True)


def test_document_without_a_token_still_lists_the_401s(database_url: str) -> None:
    with RunningApi(api_settings(database_url)) as running:
        document = httpx.get(f"{running.url}/openapi.json").json()
    _check_document(document, secured=False)
