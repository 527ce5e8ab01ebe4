"""Caller-supplied JSON Schema patterns cannot freeze the server: a pattern that backtracks
exponentially on a value fails that value (422) instead of running for hours."""

from __future__ import annotations

import pytest

from pie.jsonschemas import validation_error
from pie.tenancy.features import resolve_features

EVIL = "^(a|aa)+$"  # exponential backtracking on 'aaaa...!' with Python's re
EVIL_VALUE = "a" * 64 + "!"


def test_pattern_semantics_are_unchanged():
    schema = {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"}
    assert validation_error(schema, "ADL-12") is None
    assert "does not match" in validation_error(schema, "adl-12")
    props = {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False}
    assert validation_error(props, {"x_a": 1}) is None
    assert validation_error(props, {"x_a": "no"}) is not None
    assert "Additional properties" in validation_error(props, {"y": 1})


@pytest.mark.parametrize(
    "schema, value",
    [
        ({"type": "string", "pattern": EVIL}, EVIL_VALUE),
        ({"type": "object", "patternProperties": {EVIL: {"type": "string"}}}, {EVIL_VALUE: "v"}),
        ({"type": "object", "patternProperties": {EVIL: {}}, "additionalProperties": False}, {EVIL_VALUE: 1}),
    ],
)
def test_an_exponential_pattern_fails_the_value(schema, value):
    assert "too expensive" in validation_error(schema, value)


def test_the_resolver_fails_closed_on_an_exponential_pattern():
    definitions = [{"name": "code", "json_schema": {"type": "string", "pattern": EVIL}, "mandatory": True}]
    resolved, failures = resolve_features({"code": EVIL_VALUE}, definitions)
    assert resolved == {}
    assert [f.feature for f in failures] == ["code"] and "too expensive" in failures[0].reason


async def test_inference_input_with_an_exponential_pattern_is_422(client, admin):
    contracts = {
        "inference": {"input_schema": {"type": "object", "properties": {"x": {"type": "string", "pattern": EVIL}}}}
    }
    echo = {"type": "in_process", "value": "echo"}
    r = await client.post(
        "/v2/models",
        json={
            "id": "m",
            "name": "m",
            "description": "d",
            "handlers": {"training": echo, "inference": echo},
            "handler_contracts": contracts,
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert (await client.post("/v2/models/m/new_version", json={"version": "1"}, headers=admin)).status_code == 201
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": {"x": EVIL_VALUE}}, headers=admin)
    assert r.status_code == 422, r.text
    assert r.json()["success"] is False and "too expensive" in r.json()["message"]
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": {"x": "aaaa"}}, headers=admin)
    assert r.status_code == 202, r.text


def test_unevaluated_properties_next_to_an_exponential_pattern_fails_the_value():
    schema = {"type": "object", "patternProperties": {EVIL: {}}, "unevaluatedProperties": False}
    assert "too expensive" in validation_error(schema, {EVIL_VALUE: 1})
    nested = {"allOf": [{"patternProperties": {EVIL: {}}}], "unevaluatedProperties": False}
    assert validation_error(nested, {EVIL_VALUE: 1}) is not None  # fails (closed), in bounded time
    # ordinary unevaluatedProperties semantics are unchanged
    plain = {"type": "object", "patternProperties": {"^x_": {}}, "unevaluatedProperties": False}
    assert validation_error(plain, {"x_a": 1}) is None
    assert "Unevaluated properties" in validation_error(plain, {"y": 1})
