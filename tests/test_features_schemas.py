"""Caller-supplied JSON Schemas in feature definitions: references resolve offline or the
definition is invalid (never a network fetch, never a 500 later), and values that cannot be
validated at all are failures, not crashes (spec 5.2, 5.4, 1.1)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest
from factories import feature, init_service, tenant_setup

from pie.jsonschemas import schema_error, validation_error
from pie.tenancy.features import definition_problems, resolve_features

D = "/v2/clients/client-1/domains/south_australia"
SA = {"route": "Adelaide to Sydney"}


@pytest.fixture
def schema_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server serving a JSON Schema; records every request it receives."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = json.dumps({"type": "integer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/schema+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/schema.json", requests
    finally:
        server.shutdown()
        server.server_close()


def test_a_remote_reference_is_never_fetched(schema_server):
    url, requests = schema_server
    schema = {"$ref": url}
    assert "cannot be resolved" in (schema_error(schema) or "")
    problems = definition_problems([feature("fare", schema)])
    assert problems and "cannot be resolved" in problems[0]
    # even a schema stored before this rule existed is applied offline: a failure, no request
    assert validation_error(schema, 5) is not None
    assert requests == []


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/missing"},
        {"$ref": "other.json"},
        {"$ref": "urn:example:fare"},
        {"$dynamicRef": "#nowhere"},
        {"type": "array", "items": {"$ref": "#/$defs/cabin"}},
        {"$id": "https://example.com/fare", "$ref": "cabin"},
    ],
)
def test_unresolvable_references_make_the_definition_invalid(schema):
    problems = definition_problems([feature("fare", schema)])
    assert problems and "cannot be resolved" in problems[0], problems


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        ({"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}, 3, "x"),
        ({"$defs": {"n": {"$anchor": "num", "type": "integer"}}, "$ref": "#num"}, 3, "x"),
        ({"$id": "https://example.com/root", "$defs": {"n": {"$id": "n", "type": "integer"}}, "$ref": "n"}, 3, "x"),
        ({"$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "$ref": "#/$defs/t"}, [[[]]], [1]),
        ({"$ref": "https://json-schema.org/draft/2020-12/schema"}, {"type": "string"}, {"type": 5}),
        # a "$ref" inside data (const) or as a property name is not a reference
        ({"const": {"$ref": "http://example.com"}}, {"$ref": "http://example.com"}, {}),
        ({"properties": {"$ref": {"type": "string"}}}, {"$ref": "x"}, {"$ref": 1}),
    ],
)
def test_references_inside_the_schema_still_work(schema, good, bad):
    assert definition_problems([feature("fare", schema)]) == []
    resolved, failures = resolve_features({"fare": good}, [feature("fare", schema)])
    assert resolved == {"fare": good} and failures == []
    _, failures = resolve_features({"fare": bad}, [feature("fare", schema)])
    assert [f.feature for f in failures] == ["fare"]


def test_values_that_cannot_be_validated_are_failures():
    # an integer beyond float range against a float multipleOf (jsonschema overflows)
    fare = feature("fare", {"type": "number", "multipleOf": 0.5})
    _, failures = resolve_features({"fare": 10**400}, [fare])
    assert [f.feature for f in failures] == ["fare"] and "too large" in failures[0].reason
    # nesting deeper than the validator can recurse through a recursive schema
    tree = feature("tree", {"$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "$ref": "#/$defs/t"})
    deep: list = []
    for _ in range(900):
        deep = [deep]
    _, failures = resolve_features({"tree": deep}, [tree])
    assert [f.feature for f in failures] == ["tree"] and "nested too deeply" in failures[0].reason


async def test_api_refuses_unresolvable_references_in_live_features(client, session, admin, schema_server):
    url, requests = schema_server
    await tenant_setup(client, session, admin)
    before = (await client.get(D + "/features", headers=admin)).json()
    for schema in ({"$ref": url}, {"$ref": "#/$defs/missing"}):
        r = await client.put(D + "/features", json={"features": [feature("route", schema, True)]}, headers=admin)
        assert r.status_code == 422, r.text
        assert "invalid feature definitions" in r.json()["message"] and "route" in r.json()["message"]
        r = await client.post(
            "/v2/clients/client-1/domains",
            json={"domain_id": "other", "features": [feature("route", schema, True)]},
            headers=admin,
        )
        assert r.status_code == 422, r.text
    assert (await client.get(D + "/features", headers=admin)).json() == before
    assert (await client.get("/v2/clients/client-1/domains/other", headers=admin)).status_code == 404
    assert requests == []


async def test_init_with_an_unvalidatable_value_is_422_not_500(client, session, admin):
    await tenant_setup(
        client,
        session,
        admin,
        features=[feature("route", {"type": "string"}, True), feature("fare", {"type": "number", "multipleOf": 0.5})],
    )
    r = await init_service(client, admin, "s1", {**SA, "fare": 10**400}, expect=422)
    assert r.json()["success"] is False and "fare" in r.json()["message"]
