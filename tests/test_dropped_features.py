"""A feature dropped by a newer default version must not trap services (issue 9): a service
update validates the keys it sends; stored keys the governing schema no longer defines are
kept in ``provided_features``, reported in ``undefined_features`` and left out of
``resolved_features``."""

from __future__ import annotations

from factories import assign, feature, init_service, make_version, stored_service, tenant_setup

D = "/v2/clients/client-1/domains/south_australia"
V1 = [feature("route", {"type": "string"}, True), feature("legacy_fare", {"type": "number"})]
V2 = [feature("route", {"type": "string"}, True), feature("fare", {"type": "number", "default": 10})]


async def _dropped(client, session, admin) -> None:
    """Service s1 provides `legacy_fare`; the default key then moves to version 2, whose frozen
    schema no longer defines it (the freeze check lets an unknown key through: it was provided)."""
    await tenant_setup(client, session, admin, version_features=V1)
    await init_service(client, admin, "s1", {"route": "A-B", "legacy_fare": 12.5})
    await make_version(session, version="2", features=V2)
    await assign(client, admin, model_version="2")
    stored = await stored_service(session, "s1")
    assert stored.provided_features == {"route": "A-B", "legacy_fare": 12.5}
    assert stored.resolved_features == {"route": "A-B", "fare": 10}


async def test_update_of_a_service_with_a_dropped_feature_keeps_and_reports_it(client, session, admin):
    await _dropped(client, session, admin)
    r = await client.put(f"{D}/service/s1", json={"static_features": {"route": "B-A"}}, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["provided_features"] == {"route": "B-A", "legacy_fare": 12.5}
    assert body["resolved_features"] == {"route": "B-A", "fare": 10}
    assert body["undefined_features"] == ["legacy_fare"]
    stored = await stored_service(session, "s1")
    assert stored.provided_features == {"route": "B-A", "legacy_fare": 12.5}
    # an update that sends nothing about features works too
    r = await client.put(f"{D}/service/s1", json={}, headers=admin)
    assert r.status_code == 200 and r.json()["undefined_features"] == ["legacy_fare"]


async def test_a_dropped_feature_can_be_removed_but_not_sent(client, session, admin):
    await _dropped(client, session, admin)
    # sending the undefined key is validated: 422 naming it, nothing written
    r = await client.put(f"{D}/service/s1", json={"static_features": {"legacy_fare": 13}}, headers=admin)
    assert r.status_code == 422 and "legacy_fare" in r.json()["message"]
    assert (await stored_service(session, "s1")).provided_features["legacy_fare"] == 12.5
    # null removes it
    r = await client.put(f"{D}/service/s1", json={"static_features": {"legacy_fare": None}}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["provided_features"] == {"route": "A-B"} and r.json()["undefined_features"] == []


async def test_keys_the_request_sends_are_still_validated(client, session, admin):
    await _dropped(client, session, admin)
    r = await client.put(f"{D}/service/s1", json={"static_features": {"fare": "cheap"}}, headers=admin)
    assert r.status_code == 422 and "fare" in r.json()["message"]
    r = await client.put(f"{D}/service/s1", json={"static_features": {"route": None}}, headers=admin)
    assert r.status_code == 422 and "route" in r.json()["message"]
