"""Input PostgreSQL cannot store is a 400 envelope on every tenant write route, never a 500 and
never a half-written change (spec 1, 1.1): NUL characters in text and JSON, date-times whose UTC
instant falls outside years 1-9999, and Unix timestamps posing as date-times."""

from __future__ import annotations

import pytest
from factories import feature, fresh, init_service, jobs_of, stored_service, tenant_setup
from sqlalchemy import func, select

from pie.tables.assignments import Assignment
from pie.tables.tenancy import Domain

C = "/v2/clients/client-1"
D = f"{C}/domains/south_australia"
SA = {"route": "Adelaide to Sydney"}
# a permissive schema, so only the storage rule can refuse the value
OPEN = [feature("route", {"type": "string"}, True), feature("note", {})]
NUL = "a\u0000b"


async def counts(session) -> tuple[int, int, int]:
    domains = await session.scalar(select(func.count()).select_from(Domain))
    assignments = await session.scalar(select(func.count()).select_from(Assignment))
    return domains, assignments, len(await jobs_of(session))


async def test_nul_characters_are_400_on_every_write_route(client, session, admin):
    """(The rule lives in the shared ``RequestBody``; this pins it on every tenant write route.)"""
    await tenant_setup(client, session, admin, features=OPEN)
    await init_service(client, admin, "s1", SA)
    before = await counts(session)
    requests = [
        ("POST", f"{C}/domains", {"domain_id": "d2", "name": NUL}),
        ("POST", f"{C}/domains", {"domain_id": "d2", "features": [feature("x", {"enum": [NUL]})]}),
        ("POST", f"{C}/domains", {"domain_id": "d2", "features": [{**feature("x", {}), "description": NUL}]}),
        ("PATCH", D, {"name": NUL}),
        ("PUT", f"{D}/features", {"features": [feature("route", {"const": NUL}, True)]}),
        ("PUT", f"{D}/features", {"features": [feature("route", {"properties": {NUL: {}}}, True)]}),
        ("POST", f"{D}/service/init", {"service_id": "s2", "static_features": {**SA, "note": NUL}}),
        ("POST", f"{D}/service/init", {"service_id": "s2", "static_features": {**SA, "note": {NUL: 1}}}),
        ("PUT", f"{D}/service/s1", {"static_features": {"note": [NUL]}}),
        ("PUT", f"{D}/assignments/forecast", {"model_id": "pricing-model", "model_version": "1", "role": NUL}),
        (
            "PUT",
            f"{D}/assignments/forecast",
            {"model_id": "pricing-model", "model_version": "1", "metadata": {"a": NUL}},
        ),
        (
            "POST",
            f"{D}/assignments",
            {"assignment_key": "forecast", "model_id": "pricing-model", "model_version": "1", "settings": {NUL: 1}},
        ),
        (
            "PUT",
            f"{D}/assignments/default",
            {
                "model_id": "pricing-model",
                "model_version": "1",
                "service_updates": [{"service_id": "s1", "static_features": {"note": NUL}}],
            },
        ),
        (
            "PUT",
            f"{D}/service/s1/assignments/forecast",
            {"model_id": "pricing-model", "model_version": "1", "role": NUL},
        ),
        ("POST", f"{D}/assignments/default/jobs", {"input": {"text": NUL}}),
        ("POST", f"{D}/service/s1/assignments/default/jobs", {"input": {NUL: True}}),
    ]
    for method, url, body in requests:
        r = await client.request(method, url, json=body, headers=admin)
        assert r.status_code == 400, (method, url, r.status_code, r.text)
        assert r.json()["success"] is False and "NUL" in r.json()["message"], r.text
    assert await counts(session) == before
    domain = (await fresh(session, select(Domain)))[0]
    assert domain.name == "south_australia" and domain.features == OPEN
    assert (await stored_service(session, "s1")).provided_features == SA


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:30:00+01:00",  # UTC instant in year 0
        "9999-12-31T23:30:00-01:00",  # UTC instant in year 10000
        "1700000000",  # a Unix timestamp, not ISO-8601
        "tomorrow",
        17,
    ],
)
async def test_unstorable_or_non_iso_departure_datetimes_are_400(client, session, admin, value):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s1", SA)
    r = await client.post(
        f"{D}/service/init",
        json={"service_id": "s2", "departure_datetime": value, "static_features": SA},
        headers=admin,
    )
    assert r.status_code == 400, r.text
    assert r.json()["success"] is False and "departure_datetime" in r.json()["message"]
    r = await client.put(f"{D}/service/s1", json={"departure_datetime": value}, headers=admin)
    assert r.status_code == 400, r.text
    assert await stored_service(session, "s2") is None
    assert (await stored_service(session, "s1")).departure_datetime is None
    assert len(await jobs_of(session)) == 1


async def test_departure_datetimes_at_the_edges_of_the_range_round_trip(client, session, admin):
    await tenant_setup(client, session, admin)
    r = await init_service(client, admin, "s1", SA, departure_datetime="9999-12-31T23:59:59+00:00")
    r = await client.get(f"{D}/service/s1", headers=admin)
    assert r.json()["departure_datetime"] == "9999-12-31T23:59:59Z" and r.json()["departed"] is False
    r = await client.put(f"{D}/service/s1", json={"departure_datetime": "0001-01-01T01:00:00+01:00"}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["departure_datetime"] == "0001-01-01T00:00:00Z" and r.json()["departed"] is True
