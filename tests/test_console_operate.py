"""The console's write forms over HTTP (no browser): clients, domains and the live-features
editor, services, the model registry; CSRF on every console write; tenant rules; one audit row
per write with the console as its channel; the readable tables. Effects are checked through the
API (``/v2``), as a user would."""

from __future__ import annotations

import html
import json
import re
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from factories import SEVEN_FEATURES, init_service, make_client, make_version, seven_features, tenant_setup
from test_audit import audit_rows, table_counts
from test_console import csrf_of, sign_in
from test_webhooks import _delivered, delivering, dev, eventually, receiver, verified  # noqa: F401 (fixtures)

from pie import metrics
from pie.console import forms, readable
from pie.http.routing import flat_routes
from pie.jobs.channels import NOTIFY_CHANNEL

ROUTE = {"route": "Adelaide to Sydney"}
D = "/console/clients/acme/domains/south_australia"


async def api(client: httpx.AsyncClient, headers: dict[str, str], path: str, expect: int = 200) -> Any:
    r = await client.get(path, headers=headers)
    assert r.status_code == expect, r.text
    return r.json()


async def page_csrf(client: httpx.AsyncClient, path: str) -> str:
    r = await client.get(path)
    assert r.status_code == 200, r.text
    return csrf_of(r.text)


async def last_audit(session) -> Any:
    return (await audit_rows(session))[-1]


def assert_console_row(row, action: str, actor: str | None = None) -> None:
    assert row.action == action, (row.action, row.summary)
    assert row.summary.get("via") == "console"
    if actor is not None:
        assert actor in (row.actor_username, row.actor_sub)


# -- CSRF on every console write ----------------------------------------------------------------------


def _console_writes(app) -> list[str]:
    paths = []
    for route in flat_routes(app.routes):
        path, methods = getattr(route, "path", ""), getattr(route, "methods", None) or ()
        if path.startswith("/console") and "POST" in methods and path != "/console/login":
            paths.append(path)
    return paths


async def test_every_console_write_refuses_a_form_without_the_session_csrf_token(
    app, client, session, admin, make_token
):
    await tenant_setup(client, session, admin, client_id="acme")
    await init_service(client, admin, "ferry-1", ROUTE, client_id="acme")
    sub = await client.post(
        "/v2/models/pricing-model/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": "pricing-model",
            "target_action": "inference",
            "input_source": "stored",
            "input": {},
        },
        headers=admin,
    )
    assert sub.status_code == 201, sub.text
    values = {
        "client_id": "acme",
        "domain_id": "south_australia",
        "service_id": "ferry-1",
        "assignment_key": "default",
        "model_id": "pricing-model",
        "model_version": "1",
        "subscription_id": sub.json()["id"],
        "job_id": str(uuid.uuid4()),
        "webhook_id": str(uuid.uuid4()),
    }
    writes = _console_writes(app)
    assert len(writes) >= 16, writes  # every form of the console, the new ones included
    before = await table_counts(session)
    await sign_in(client, make_token(admin=True))
    for template in writes:
        path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)
        for data in ({}, {"csrf_token": "0" * 64}):  # no token, a forged one
            r = await client.post(path, data={**data, "confirm": "yes", "name": "x", "status": "suspended"})
            assert r.status_code == 403 and "CSRF" in r.text, (template, r.status_code, r.text[-300:])
    assert await table_counts(session) == before


async def test_a_cross_origin_form_is_refused_even_with_the_token(client, session, admin, make_token):
    await make_client(session, "acme")
    await sign_in(client, make_token(admin=True))
    csrf = await page_csrf(client, "/console/clients/acme")
    r = await client.post(
        "/console/clients/acme/name",
        data={"csrf_token": csrf, "name": "Evil"},
        headers={"Origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert (await api(client, admin, "/v2/clients/acme"))["name"] == "Acme"


# -- tenants ------------------------------------------------------------------------------------------------


async def test_an_admin_creates_renames_suspends_and_reactivates_a_client(client, session, admin, make_token):
    await sign_in(client, make_token(admin=True, username="olivia"))
    page = (await client.get("/console/clients")).text
    assert 'href="/console/clients?new=1#new-client">New client</a>' in page
    form = (await client.get("/console/clients", params={"new": "1"})).text
    assert '<label for="nc-id">Client id</label>' in form and '<label for="nc-name">Name</label>' in form
    csrf = csrf_of(form)

    r = await client.post(
        "/console/clients", data={"csrf_token": csrf, "client_id": "newco", "name": "New Co", "app_client_ids": "app-1"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/console/clients/newco?done=created"
    got = await api(client, admin, "/v2/clients/newco")
    assert (got["name"], got["status"], got["app_client_ids"]) == ("New Co", "active", ["app-1"])
    row = await last_audit(session)
    assert_console_row(row, "createclient", "olivia")
    assert row.target_id == "newco" and row.path == "/console/clients"

    # refusals come back on the form, with the API's own message and what was typed
    r = await client.post("/console/clients", data={"csrf_token": csrf, "client_id": "newco", "name": "Again"})
    assert r.status_code == 409 and "client newco already exists" in r.text and 'value="Again"' in r.text
    r = await client.post("/console/clients", data={"csrf_token": csrf, "client_id": "bad id!", "name": "X"})
    assert r.status_code == 400 and "client_id" in r.text and 'id="new-client-error"' in r.text
    r = await client.post("/console/clients", data={"csrf_token": csrf, "client_id": "other", "name": ""})
    assert r.status_code == 400 and "name" in r.text

    r = await client.post("/console/clients/newco/name", data={"csrf_token": csrf, "name": "Newer Co"})
    assert r.status_code == 303
    assert (await api(client, admin, "/v2/clients/newco"))["name"] == "Newer Co"
    assert "renamed it Newer Co" in readable.action_words(await last_audit(session))

    # suspend: a confirmation first (nothing written), then the change
    r = await client.post("/console/clients/newco/status", data={"csrf_token": csrf, "status": "suspended"})
    assert r.status_code == 200 and "Suspend newco" in r.text and 'name="confirm" value="yes"' in r.text
    assert (await api(client, admin, "/v2/clients/newco"))["status"] == "active"
    r = await client.post(
        "/console/clients/newco/status", data={"csrf_token": csrf, "status": "suspended", "confirm": "yes"}
    )
    assert r.status_code == 303
    assert (await api(client, admin, "/v2/clients/newco"))["status"] == "suspended"
    row = await last_audit(session)
    assert_console_row(row, "updateclient")
    assert readable.action_words(row) == "Updated client newco: suspended it"
    page = (await client.get("/console/clients/newco")).text
    assert "Reactivate client" in page and "New domain" not in page  # no writes under a suspended client
    r = await client.post(
        "/console/clients/newco/status", data={"csrf_token": csrf, "status": "active", "confirm": "yes"}
    )
    assert r.status_code == 303
    assert (await api(client, admin, "/v2/clients/newco"))["status"] == "active"


async def test_an_admin_manages_app_client_ids(client, session, admin, make_token):
    await make_client(session, "acme")
    await make_client(session, "globex")
    r = await client.patch("/v2/clients/globex", json={"app_client_ids": ["globex-app"]}, headers=admin)
    assert r.status_code == 200
    await sign_in(client, make_token(admin=True))
    csrf = await page_csrf(client, "/console/clients/acme")
    url = "/console/clients/acme/app-clients"
    for app_id in ("app-a", "app-b"):
        assert (await client.post(url, data={"csrf_token": csrf, "add": app_id})).status_code == 303
    assert (await api(client, admin, "/v2/clients/acme"))["app_client_ids"] == ["app-a", "app-b"]
    # another client's app client id: the API's 409, shown by the form
    r = await client.post(url, data={"csrf_token": csrf, "add": "globex-app"})
    assert r.status_code == 409 and "globex-app (client globex)" in r.text
    r = await client.post(url, data={"csrf_token": csrf, "add": "bad id!"})
    assert r.status_code == 400 and "app_client_ids" in r.text
    # removal asks first
    r = await client.post(url, data={"csrf_token": csrf, "remove": "app-a"})
    assert r.status_code == 200 and "Remove app-a" in r.text
    assert (await api(client, admin, "/v2/clients/acme"))["app_client_ids"] == ["app-a", "app-b"]
    r = await client.post(url, data={"csrf_token": csrf, "remove": "app-a", "confirm": "yes"})
    assert r.status_code == 303
    assert (await api(client, admin, "/v2/clients/acme"))["app_client_ids"] == ["app-b"]
    assert_console_row(await last_audit(session), "updateclient")


async def test_a_tenant_cannot_create_or_change_clients(client, session, admin, make_token):
    await make_client(session, "acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get("/console/clients")).text
    assert "New client" not in page
    assert (await client.get("/console/clients", params={"new": "1"})).status_code == 403
    csrf = await page_csrf(client, "/console/clients/acme")
    assert "Manage the client" not in (await client.get("/console/clients/acme")).text
    r = await client.post("/console/clients", data={"csrf_token": csrf, "client_id": "mine", "name": "Mine"})
    assert r.status_code == 403 and "missing permission admin" in r.text
    for path, data in (
        ("/console/clients/acme/name", {"name": "Hacked"}),
        ("/console/clients/acme/status", {"status": "suspended", "confirm": "yes"}),
        ("/console/clients/acme/app-clients", {"add": "x"}),
    ):
        assert (await client.post(path, data={"csrf_token": csrf, **data})).status_code == 403
    got = await api(client, admin, "/v2/clients/acme")
    assert (got["name"], got["status"], got["app_client_ids"]) == ("Acme", "active", [])
    assert await api(client, admin, "/v2/clients/mine", expect=404)


# -- domains and the live-features editor --------------------------------------------------------------------


def test_feature_rows_round_trip_every_definition_of_the_spec_example():
    rows = forms.rows_of(SEVEN_FEATURES)
    kinds = {r.name: r.type for r in rows}
    assert kinds["route"] == "string" and kinds["competitor_count"] == "integer" and kinds["on_demand"] == "boolean"
    assert kinds["weekly_demand"] == kinds["origin_destination_pair"] == kinds["market_ref"] == "other"
    assert rows[0].values == "Adelaide to Sydney\nSydney to Adelaide" and rows[1].maximum == "20"
    assert forms.definitions_of(rows) == SEVEN_FEATURES
    described = {r["name"]: r["schema"] for r in readable.feature_rows(SEVEN_FEATURES)}
    assert described["competitor_count"] == "integer 0–20"
    assert described["weekly_demand"] == "array of 7 × number ≥ 0"
    assert described["origin_destination_pair"] == "tuple (string, string)"
    assert described["route"] == 'one of "Adelaide to Sydney", "Sydney to Adelaide"'
    assert described["market_ref"] == 'either: one of "spot", "auction" | integer ≥ 0'


def test_feature_rows_read_typed_fields_and_name_the_culprit():
    row = forms.FeatureRow(name="n", type="integer", values="1\n2", minimum="0", default="2", mandatory=True)
    assert forms.definition_of(row, 1) == {
        "name": "n",
        "json_schema": {"type": "integer", "enum": [1, 2], "minimum": 0, "default": 2},
        "mandatory": True,
    }
    with pytest.raises(Exception, match="feature 'n': default must be a whole number"):
        forms.definition_of(forms.FeatureRow(name="n", type="integer", default="2.5"), 1)
    with pytest.raises(Exception, match="row 3: the JSON schema is not valid JSON"):
        forms.definition_of(forms.FeatureRow(type="other", schema="{oops"), 3)
    kept = forms.definitions_of(
        [forms.FeatureRow(name="a"), forms.FeatureRow(), forms.FeatureRow(name="b", remove=True)]
    )
    assert [d["name"] for d in kept] == ["a"]


def _editor_form(csrf: str, rows: list[forms.FeatureRow], op: str = "preview") -> dict[str, str]:
    data = {"csrf_token": csrf, "op": op}
    for i, row in enumerate(rows, start=1):
        data.update(
            {
                f"f{i}_name": row.name,
                f"f{i}_type": row.type,
                f"f{i}_values": row.values,
                f"f{i}_minimum": row.minimum,
                f"f{i}_maximum": row.maximum,
                f"f{i}_default": row.default,
                f"f{i}_schema": row.schema,
            }
        )
        if row.mandatory:
            data[f"f{i}_mandatory"] = "1"
        if row.remove:
            data[f"f{i}_remove"] = "1"
        if row.extra:
            data[f"f{i}_extra"] = row.extra
    return data


async def test_a_tenant_creates_a_domain_in_its_own_client_only(client, session, admin, make_token):
    await make_client(session, "acme")
    await make_client(session, "globex")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get("/console/clients/acme", params={"new": "domain"})).text
    assert "Create domain" in page
    csrf = csrf_of(page)
    r = await client.post("/console/clients/acme/domains", data={"csrf_token": csrf, "domain_id": "north", "name": "N"})
    assert r.status_code == 303 and r.headers["location"].startswith("/console/clients/acme/domains/north")
    got = await api(client, admin, "/v2/clients/acme/domains/north")
    assert (got["name"], got["features"]) == ("N", [])
    row = await last_audit(session)
    assert_console_row(row, "createdomain", "alice")
    assert row.client_id == "acme" and row.target_id == "north"
    r = await client.post("/console/clients/acme/domains", data={"csrf_token": csrf, "domain_id": "north"})
    assert r.status_code == 409 and "domain north already exists" in r.text
    # another tenant's forms and writes: 403, nothing written
    assert (await client.get("/console/clients/globex", params={"new": "domain"})).status_code == 403
    r = await client.post("/console/clients/globex/domains", data={"csrf_token": csrf, "domain_id": "theirs"})
    assert r.status_code == 403 and "no access to client globex" in r.text
    assert (await client.get("/console/clients/globex/domains/x/features")).status_code == 403
    await api(client, admin, "/v2/clients/globex/domains/theirs", expect=404)


async def test_the_features_editor_previews_the_impact_then_saves_exactly_that(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")  # live features govern (v1 frozen nothing)
    await init_service(client, admin, "ferry-1", {"route": "Adelaide to Sydney"}, client_id="acme")
    await init_service(client, admin, "ferry-2", {"route": "Sydney to Adelaide"}, client_id="acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    editor = (await client.get(D + "/features")).text
    csrf = csrf_of(editor)
    assert editor.count('name="f') and 'value="competitor_count"' in editor and "Preview changes" in editor
    rows = forms.rows_of(seven_features())
    rows[0].values = "Adelaide to Sydney"  # ferry-2's route is no longer allowed
    rows[2].remove = True  # advertising_spend
    rows.append(forms.FeatureRow(name="day_of_week", type="integer", minimum="0", maximum="6", default="1"))
    before = await table_counts(session)

    # "add" gives one more row and keeps what was typed
    r = await client.post(D + "/features", data=_editor_form(csrf, rows, op="add"))
    # (the row marked for removal is gone: 7 - 1 + 1 rows, and a new empty one)
    assert r.status_code == 200 and 'value="day_of_week"' in r.text and 'id="f8-name" name="f8_name" value=""' in r.text
    assert 'value="advertising_spend"' not in r.text

    r = await client.post(D + "/features", data=_editor_form(csrf, rows))
    assert r.status_code == 200, r.text
    assert "1 service would not resolve" in r.text and "of 2 non-departed" in r.text
    blocking = r.text.split('class="blocking', 1)[1].split("</table>", 1)[0]
    assert "ferry-2" in blocking and "ferry-1" not in blocking and "route" in blocking
    changes = r.text.split('class="changes', 1)[1].split("</table>", 1)[0]
    assert re.search(r"day_of_week</code></th>\s*<td[^>]*>added", changes)
    assert re.search(r"advertising_spend</code></th>\s*<td[^>]*>removed", changes)
    assert re.search(r"route</code></th>\s*<td[^>]*>changed \(value schema\)", changes)
    assert "Save features anyway" in r.text
    assert await table_counts(session) == before  # the preview wrote nothing
    save = {
        "csrf_token": csrf,
        "features": re.search(r'name="features" value="([^"]*)"', r.text).group(1).replace("&#34;", '"'),
        "expected": re.search(r'name="expected" value="([0-9a-f]+)"', r.text).group(1),
    }
    save["features"] = html.unescape(save["features"])
    r = await client.post(D + "/features/save", data=save)
    assert r.status_code == 303 and "done=features" in r.headers["location"]
    live = await api(client, admin, "/v2/clients/acme/domains/south_australia/features")
    assert [f["name"] for f in live] == [
        "route",
        "competitor_count",
        "on_demand",
        "weekly_demand",
        "origin_destination_pair",
        "market_ref",
        "day_of_week",
    ]
    assert live[0]["json_schema"]["enum"] == ["Adelaide to Sydney"]
    assert live[-1] == {
        "name": "day_of_week",
        "json_schema": {"type": "integer", "minimum": 0, "maximum": 6, "default": 1},
        "mandatory": False,
    }
    row = await last_audit(session)
    assert_console_row(row, "updatedomainfeatures", "alice")
    assert readable.action_words(row) == "Replaced the live features of domain south_australia"
    # the same preview saved again: the features changed since, nothing written (409)
    r = await client.post(D + "/features/save", data=save)
    assert r.status_code == 409 and "changed since the preview" in r.text
    domain_page = (await client.get(D)).text
    live_table = domain_page.split('id="live-features"', 1)[1].split("</table>", 1)[0]
    assert "day_of_week" in live_table and "integer 0–6" in live_table and "<code>1</code>" in live_table


async def test_the_features_editor_shows_the_apis_refusal_next_to_the_rows(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await sign_in(client, make_token(admin=True))
    csrf = await page_csrf(client, D + "/features")
    rows = [forms.FeatureRow(name="route"), forms.FeatureRow(name="route", type="integer")]
    r = await client.post(D + "/features", data=_editor_form(csrf, rows))
    assert r.status_code == 422 and "invalid feature definitions: feature &#39;route&#39;: name repeats" in r.text
    assert r.text.count('value="route"') == 2  # what was typed is still there
    rows = [forms.FeatureRow(name="n", type="integer", default="two")]
    r = await client.post(D + "/features", data=_editor_form(csrf, rows))
    assert r.status_code == 400 and "feature &#39;n&#39;: default is not valid JSON" in r.text
    features = await api(client, admin, "/v2/clients/acme/domains/south_australia/features")
    assert len(features) == 7


# -- services -------------------------------------------------------------------------------------------------


async def test_service_init_asks_for_confirmation_then_starts_the_init_job(
    client, session, admin, make_token, database_url
):
    await tenant_setup(client, session, admin, client_id="acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get(D, params={"new": "service"})).text
    assert 'name="sf_route"' in page and 'name="sf_competitor_count"' in page and "(mandatory)" in page
    csrf = csrf_of(page)
    data = {
        "csrf_token": csrf,
        "service_id": "ferry-9",
        "departure": "2031-05-01T08:30",
        "sf_route": "Sydney to Adelaide",
        "sf_competitor_count": "4",
        "sf_on_demand": "true",
        "sf_weekly_demand": "[1, 2, 3, 4, 5, 6, 7]",
    }
    before = await table_counts(session)
    created = metrics.JOBS_CREATED.labels("inference")._value.get()
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        r = await client.post(D + "/services", data=data)
        assert r.status_code == 200 and "Initialise ferry-9" in r.text and "pricing-model v1" in r.text
        # the rehearsal left nothing: no row, no audit row, no job, no count, no wake-up
        assert await table_counts(session) == before
        assert metrics.JOBS_CREATED.labels("inference")._value.get() == created
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
        r = await client.post(D + "/services", data={**data, "confirm": "yes"})
        assert r.status_code == 303 and r.headers["location"].endswith("/services/ferry-9?done=initialised")
        assert len(list(listener.notifies(timeout=30, stop_after=1))) == 1  # the real init wakes dispatchers
    assert metrics.JOBS_CREATED.labels("inference")._value.get() == created + 1
    got = await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-9")
    assert got["provided_features"] == {
        "route": "Sydney to Adelaide",
        "competitor_count": 4,
        "on_demand": True,
        "weekly_demand": [1, 2, 3, 4, 5, 6, 7],
    }
    assert got["departure_datetime"] == "2031-05-01T08:30:00Z" and got["status"] == "initializing"
    jobs = await api(client, admin, "/v2/jobs?service_id=ferry-9")
    assert len(jobs) == 1 and jobs[0]["input"]["route"] == "Sydney to Adelaide"
    assert_console_row(await last_audit(session), "initdomainservice", "alice")
    # the API's own refusals, before any confirmation
    r = await client.post(D + "/services", data={**data, "service_id": "ferry-10", "sf_route": "Perth"})
    assert r.status_code == 422 and "&#39;route&#39;" in r.text and "Perth" in r.text
    r = await client.post(D + "/services", data={**data})
    assert r.status_code == 409 and "already exists" in r.text
    await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-10", expect=404)


async def test_service_update_confirms_the_changes_then_applies_them(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await init_service(
        client, admin, "ferry-1", {"route": "Adelaide to Sydney", "competitor_count": 3}, client_id="acme"
    )
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    url = D + "/services/ferry-1"
    page = (await client.get(url)).text
    assert 'name="sf_competitor_count" value="3"' in page and "Review update" in page
    csrf = csrf_of(page)
    data = {
        "csrf_token": csrf,
        "sf_route": "Adelaide to Sydney",
        "sf_competitor_count": "",
        "sf_on_demand": "false",
        "departure": "2032-01-02T03:04:05",
    }
    r = await client.post(url, data=data)
    assert r.status_code == 200 and "Update ferry-1" in r.text
    changes = r.text.split('class="changes', 1)[1]
    assert "competitor_count" in changes and "removed" in changes and "on_demand" in changes
    assert "route" not in changes.split("</table>")[0]  # unchanged values are not sent
    assert (await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-1"))[
        "provided_features"
    ] == {"route": "Adelaide to Sydney", "competitor_count": 3}
    r = await client.post(url, data={**data, "confirm": "yes"})
    assert r.status_code == 303
    got = await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-1")
    assert got["provided_features"] == {"route": "Adelaide to Sydney", "on_demand": False}
    assert got["departure_datetime"] == "2032-01-02T03:04:05Z"
    row = await last_audit(session)
    assert_console_row(row, "updatedomainservice", "alice")
    assert readable.action_words(row) == "Updated service ferry-1"
    r = await client.post(url, data={"csrf_token": csrf, "sf_competitor_count": "99"})
    assert r.status_code == 422 and "competitor_count" in r.text
    r = await client.post(
        url,
        data={
            "csrf_token": csrf,
            "sf_route": "Adelaide to Sydney",
            "sf_on_demand": "false",
            "departure": "2032-01-02T03:04:05",
        },
    )
    assert r.status_code == 400 and "nothing to update" in r.text


# -- the model registry ------------------------------------------------------------------------------------------


def _model_form(csrf: str, **overrides: str) -> dict[str, str]:
    data = {
        "csrf_token": csrf,
        "id": "fares",
        "name": "Fares",
        "description": "fare model",
        "training_type": "in_process",
        "training_value": "echo",
        "inference_type": "lambda",
        "inference_arn": "arn:aws:lambda:us-east-1:123456789012:function:fares",
        "inference_qualifier": "live",
        "inference_timeout": "120",
        "inference_input_schema": '{"type": "object", "properties": {"route": {"type": "string"}}, "required": ["route"]}',
    }
    data.update(overrides)
    return data


async def test_registering_a_model_and_versions_with_the_apis_own_checks(client, session, admin, make_token):
    await sign_in(client, make_token(admin=True, username="olivia"))
    form = (await client.get("/console/models", params={"new": "1"})).text
    csrf = csrf_of(form)
    r = await client.post("/console/models", data=_model_form(csrf, inference_arn="arn:nope"))
    assert r.status_code == 422 and "invalid handlers: inference: arn &#39;arn:nope&#39; is not a Lambda" in r.text
    r = await client.post("/console/models", data=_model_form(csrf, training_value="no-such"))
    assert r.status_code == 422 and "unknown in-process implementation" in r.text
    r = await client.post("/console/models", data=_model_form(csrf, inference_input_schema='{"type": "nope"}'))
    assert r.status_code == 422 and "inference.input_schema is not a valid Draft 2020-12 schema" in r.text
    r = await client.post("/console/models", data=_model_form(csrf, inference_timeout="soon"))
    assert r.status_code == 400 and "time-out must be a number" in r.text
    await api(client, admin, "/v2/models/fares", expect=404)

    r = await client.post("/console/models", data=_model_form(csrf))
    assert r.status_code == 303 and r.headers["location"] == "/console/models/fares?done=created"
    model = await api(client, admin, "/v2/models/fares")
    assert model["handlers"] == {
        "training": {"type": "in_process", "value": "echo"},
        "inference": {
            "type": "lambda",
            "arn": "arn:aws:lambda:us-east-1:123456789012:function:fares",
            "version": "live",
            "timeout_seconds": 120,
        },
    }
    assert model["handler_contracts"]["inference"]["input_schema"]["required"] == ["route"]
    assert_console_row(await last_audit(session), "createmodel", "olivia")

    page = (await client.get("/console/models/fares")).text
    handlers = page.split('class="handlers', 1)[1].split("</table>", 1)[0]
    assert "AWS Lambda" in handlers and "function:fares" in handlers and "120 s" in handlers
    contracts = page.split('class="contracts', 1)[1].split("</table>", 1)[0]
    assert "<code>route</code>" in contracts and "string" in contracts and "yes" in contracts

    # versions: the next number; one freezing a domain's live features
    await make_client(session, "acme")
    await client.post("/v2/clients/acme/domains", json={"domain_id": "sa", "features": seven_features()}, headers=admin)
    r = await client.post("/console/models/fares/versions", data={"csrf_token": csrf, "description": "first"})
    assert r.status_code == 303 and r.headers["location"] == "/console/models/fares/versions/1?done=created"
    r = await client.post(
        "/console/models/fares/versions", data={"csrf_token": csrf, "version": "2", "features_from": "acme/sa"}
    )
    assert r.status_code == 303
    v2 = await api(client, admin, "/v2/models/fares/versions/2")
    assert v2["features"] == SEVEN_FEATURES and v2["status"] == "pending"
    r = await client.post("/console/models/fares/versions", data={"csrf_token": csrf, "version": "2"})
    assert r.status_code == 409 and "already has a version 2" in r.text
    listing = (await client.get("/console/models")).text
    assert re.search(r'data-label="Versions">2<', listing)  # counted, not the version counter


async def test_a_versions_status_moves_along_the_allowed_transitions_only(client, session, admin, make_token):
    await make_version(session, "fares", "1", status="pending")
    await make_version(session, "fares", "2", status="pending")
    r = await client.post(
        "/v2/models/fares/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": "fares",
            "target_action": "inference",
            "input_source": "stored",
            "input": {"x": 1},
        },
        headers=admin,
    )
    assert r.status_code == 201
    await sign_in(client, make_token(admin=True, username="olivia"))
    url = "/console/models/fares/versions/1"
    page = (await client.get(url)).text
    buttons = re.findall(r'name="status" value="(\w+)"', page)
    assert buttons == ["active", "training"]  # from pending; never "failed"
    csrf = csrf_of(page)
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "failed", "confirm": "yes"})
    assert r.status_code == 400 and "may move to active, training, not failed" in r.text
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "training"})
    assert r.status_code == 200 and "Start training v1" in r.text
    assert (await api(client, admin, "/v2/models/fares/versions/1"))["status"] == "pending"
    assert (
        await client.post(url + "/status", data={"csrf_token": csrf, "status": "training", "confirm": "yes"})
    ).status_code == 200
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "active"})
    assert r.status_code == 200 and "It fires 1 training_complete subscription" in r.text
    assert await api(client, admin, "/v2/jobs?model_id=fares") == []  # the rehearsal fired nothing
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "active", "confirm": "yes"})
    assert r.status_code == 200 and "Status changed from training to active" in r.text and "1 subscription" in r.text
    assert (await api(client, admin, "/v2/models/fares/versions/1"))["status"] == "active"
    assert len(await api(client, admin, "/v2/jobs?model_id=fares")) == 1
    row = await last_audit(session)
    assert_console_row(row, "setmodelversionstatus", "olivia")
    assert readable.action_words(row) == "Set version 1 of fares from training to active"
    history = await api(client, admin, "/v2/models/fares/versions/1/status-history")
    assert [(h["from_status"], h["to_status"]) for h in history] == [("pending", "training"), ("training", "active")]


async def test_subscriptions_are_created_paused_resumed_and_deleted(client, session, admin, make_token):
    await make_version(session, "fares", "1")
    await make_version(session, "demand", "1")
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console/models/fares", params={"new": "subscription"})).text
    csrf = csrf_of(page)
    data = {
        "csrf_token": csrf,
        "trigger_event": "inference_complete",
        "target_model_id": "demand",
        "target_action": "inference",
        "input_source": "stored",
        "input": "",
        "label": "feed demand",
    }
    r = await client.post("/console/models/fares/subscriptions", data=data)
    assert r.status_code == 422 and "input is required when input_source is &#39;stored&#39;" in r.text
    r = await client.post("/console/models/fares/subscriptions", data={**data, "input": "{not json"})
    assert r.status_code == 400 and "not valid JSON" in r.text
    r = await client.post("/console/models/fares/subscriptions", data={**data, "input": '{"region": "SA"}'})
    assert r.status_code == 303
    subs = await api(client, admin, "/v2/models/fares/event-subscriptions")
    assert [(s["label"], s["status"], s["input"]) for s in subs] == [("feed demand", "active", {"region": "SA"})]
    sub_id = subs[0]["id"]
    assert_console_row(await last_audit(session), "createmodeleventsubscription")
    base = f"/console/models/fares/subscriptions/{sub_id}"
    assert (await client.post(base + "/status", data={"csrf_token": csrf, "status": "paused"})).status_code == 303
    assert (await api(client, admin, f"/v2/models/fares/event-subscriptions/{sub_id}"))["status"] == "paused"
    assert readable.action_words(await last_audit(session)) == "Paused an event subscription"
    assert (await client.post(base + "/status", data={"csrf_token": csrf, "status": "active"})).status_code == 303
    assert (await api(client, admin, f"/v2/models/fares/event-subscriptions/{sub_id}"))["status"] == "active"
    r = await client.post(base + "/delete", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Delete subscription" in r.text
    await api(client, admin, f"/v2/models/fares/event-subscriptions/{sub_id}")
    assert (await client.post(base + "/delete", data={"csrf_token": csrf, "confirm": "yes"})).status_code == 303
    await api(client, admin, f"/v2/models/fares/event-subscriptions/{sub_id}", expect=404)
    assert_console_row(await last_audit(session), "deletemodeleventsubscription")
    r = await client.post(f"/console/models/fares/subscriptions/{uuid.uuid4()}/delete", data={"csrf_token": csrf})
    assert r.status_code == 404


async def test_a_tenant_reads_the_registry_but_cannot_change_it(client, session, admin, make_token):
    await make_version(session, "fares", "1", status="pending")
    await make_client(session, "acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    assert "Register a model" not in (await client.get("/console/models")).text
    assert (await client.get("/console/models", params={"new": "1"})).status_code == 403
    page = (await client.get("/console/models/fares/versions/1")).text
    assert "Change the status" not in page
    csrf = csrf_of(page)
    for path, data in (
        ("/console/models", _model_form(csrf)),
        ("/console/models/fares/versions", {"version": "9"}),
        ("/console/models/fares/versions/1/status", {"status": "active", "confirm": "yes"}),
    ):
        r = await client.post(path, data={**data, "csrf_token": csrf})
        assert r.status_code == 403 and "missing permission manage_models" in r.text
    assert (await api(client, admin, "/v2/models/fares/versions/1"))["status"] == "pending"


def test_a_departure_field_matches_the_stored_instant_with_or_without_seconds():
    from datetime import datetime, timezone

    stored = datetime(2031, 5, 1, 8, 30, 0, 123456, tzinfo=timezone.utc)
    assert forms.local_input(stored) == "2031-05-01T08:30:00"
    assert forms.same_instant("2031-05-01T08:30", stored) and forms.same_instant("2031-05-01T08:30:00", stored)
    assert not forms.same_instant("2031-05-01T08:31", stored) and not forms.same_instant("tomorrow", stored)
    assert not forms.same_instant("2031-05-01T08:30", None)


def test_audit_actions_in_words():
    from types import SimpleNamespace

    def words(action: str, target: str | None, **summary: Any) -> str:
        return readable.action_words(SimpleNamespace(action=action, target_id=target, summary=summary))

    assert words("putdomainmodelassignment", "sa/default", model_id="fares", model_version="3") == (
        "Moved key default to version 3 of fares"
    )
    assert words("putservicemodelassignment", "sa/ferry-1/forecast", model_version="2") == (
        "Moved key forecast of service ferry-1 to version 2"
    )
    assert words("upsertdomainmodelassignment", "sa/default", status="archived") == "Archived key default"
    assert words("createmodelversion", "fares/7") == "Created version 7 of fares"
    assert words("updateclient", "acme", status="active", name="Acme Ltd") == (
        "Updated client acme: reactivated it, renamed it Acme Ltd"
    )
    assert words("initdomainservice", "sa/ferry-1", fields=["static_features"]) == "Initialised service ferry-1"
    assert words("createwebhook", "hook-1", url="https://hooks.example.com/pie") == (
        "Created a webhook to https://hooks.example.com/pie"
    )
    assert words("updateplatformwebhook", "hook-1", status="disabled") == "Disabled a platform webhook"
    assert words("rotatewebhooksecret", "hook-1") == "Rotated the secret of a webhook"
    assert words("somefutureoperation", "x") == "somefutureoperation"  # an operation without words yet: its id


async def test_the_features_preview_lists_at_most_200_blocking_values_and_says_how_many(
    client, session, admin, make_token
):
    from sqlalchemy import text

    await tenant_setup(client, session, admin, client_id="acme")
    await session.execute(
        text(
            """INSERT INTO services (client_id, domain_id, service_id, status, provided_features, resolved_features)
               SELECT 'acme', 'south_australia', 'svc-' || g, 'available',
                      '{"route": "Sydney to Adelaide"}'::jsonb, '{}'::jsonb FROM generate_series(1, 250) g"""
        )
    )
    await session.commit()
    await sign_in(client, make_token(admin=True))
    csrf = await page_csrf(client, D + "/features")
    rows = forms.rows_of(seven_features())
    rows[0].values = "Adelaide to Sydney"
    r = await client.post(D + "/features", data=_editor_form(csrf, rows))
    assert r.status_code == 200 and "250 services would not resolve" in r.text and "of 250 non-departed" in r.text
    table = r.text.split('class="blocking', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr><td") == 200 and "The first 200 of 250 failing values" in r.text


# -- issue 17 in the console: the contract in force, the API's dry run, re-snapshotting default -----------


async def test_the_features_preview_says_saving_does_not_change_the_contract_in_force(
    client, session, admin, make_token
):
    """Since issue 17 the snapshot on the default revision governs: saving live features changes
    nothing services run under until default is re-snapshotted (the preview said the live
    features were the schema in force from the moment they were saved)."""
    await tenant_setup(client, session, admin, client_id="acme")  # v1 has no frozen schema
    await sign_in(client, make_token(admin=True))
    csrf = await page_csrf(client, D + "/features")
    rows = forms.rows_of(seven_features())
    r = await client.post(D + "/features", data=_editor_form(csrf, rows))
    assert r.status_code == 200
    assert "from the moment they are saved" not in r.text
    assert "Re-snapshot default" in r.text and "snapshot" in r.text


async def test_the_domain_page_shows_the_contract_getdomaincontract_answers(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    contract = await api(client, admin, "/v2/clients/acme/domains/south_australia/contract")
    assert contract["source"] == "domain_snapshot"
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get(D)).text
    section = page.split('id="contract"', 1)[1].split("</table>", 1)[0]
    assert "Contract in force (snapshot of the live features)" in section
    assert [f["name"] for f in contract["features"]] == re.findall(
        r'<th scope="row" data-label="Feature"><code>(\w+)', section
    )
    assert 'id="draft-differs"' not in page  # the live features are what was snapshotted
    # a live edit: the contract stays (the API says so too), the page says the draft differs
    draft = [*seven_features(), {"name": "fare", "json_schema": {"type": "number", "default": 99}, "mandatory": False}]
    r = await client.put("/v2/clients/acme/domains/south_australia/features", json={"features": draft}, headers=admin)
    assert r.status_code == 200
    assert await api(client, admin, "/v2/clients/acme/domains/south_australia/contract") == contract
    page = (await client.get(D)).text
    assert 'id="draft-differs"' in page and "fare" not in page.split('id="contract"', 1)[1].split("</table>", 1)[0]
    assert "Re-snapshot default" in page
    # no default: the API's 422 "no model assigned", the page says so
    await client.post("/v2/clients/acme/domains", json={"domain_id": "empty", "name": "E"}, headers=admin)
    await api(client, admin, "/v2/clients/acme/domains/empty/contract", expect=422)
    page = (await client.get("/console/clients/acme/domains/empty")).text
    assert "none: no model assigned" in page and 'id="contract"' not in page
    assert (await client.get("/console/clients/globex/domains/south_australia")).status_code == 403


async def test_the_features_preview_answers_what_the_apis_dry_run_answers(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await init_service(client, admin, "ferry-1", {"route": "Adelaide to Sydney", "on_demand": True}, client_id="acme")
    await init_service(
        client, admin, "ferry-2", {"route": "Sydney to Adelaide", "competitor_count": 5}, client_id="acme"
    )
    draft = seven_features()
    draft[0]["json_schema"]["enum"] = ["Adelaide to Sydney"]
    draft[1]["json_schema"]["maximum"] = 3
    r = await client.put(
        "/v2/clients/acme/domains/south_australia/features?dry_run=true", json={"features": draft}, headers=admin
    )
    assert r.status_code == 200
    expected = r.json()["blocking_services"]
    assert [(b["service_id"], b["feature"]) for b in expected] == [
        ("ferry-2", "competitor_count"),
        ("ferry-2", "route"),
    ]
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    csrf = await page_csrf(client, D + "/features")
    r = await client.post(D + "/features", data=_editor_form(csrf, forms.rows_of(draft)))
    assert r.status_code == 200
    table = r.text.split('class="blocking', 1)[1].split("</table>", 1)[0]
    shown = re.findall(r'data-label="Service"><a [^>]*>([^<]+)</a></td><td data-label="Feature">([^<]+)</td>', table)
    assert shown == [(b["service_id"], b["feature"]) for b in expected]
    assert "1 service would not resolve" in r.text and "of 2 non-departed" in r.text
    # the provided keys a draft no longer defines are named (when every service resolves)
    without = [d for d in seven_features() if d["name"] != "on_demand"]
    r = await client.post(D + "/features", data=_editor_form(csrf, forms.rows_of(without)))
    assert "Every service resolves" in r.text
    assert "no longer define (kept on the services, left out of resolution): on_demand" in r.text
    # the dry run's own refusals: a suspended client (the API's 422), next to the rows
    await client.patch("/v2/clients/acme", json={"status": "suspended"}, headers=admin)
    r = await client.post(D + "/features", data=_editor_form(csrf, forms.rows_of(draft)))
    assert r.status_code == 422 and "client acme is suspended" in r.text and 'id="features-error"' in r.text


async def test_re_snapshotting_default_previews_the_dry_run_then_takes_a_new_snapshot(
    client, session, admin, make_token
):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    await init_service(client, admin, "ferry-1", {"route": "Adelaide to Sydney"}, client_id="acme")
    before_contract = await api(client, admin, "/v2/clients/acme/domains/south_australia/contract")
    draft = [*seven_features(), {"name": "fare", "json_schema": {"type": "number", "default": 99}, "mandatory": False}]
    r = await client.put("/v2/clients/acme/domains/south_australia/features", json={"features": draft}, headers=admin)
    assert r.status_code == 200
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get(D)).text
    csrf = csrf_of(page)
    preview_url = D + "/assignments/default/resnapshot/preview"
    assert f'action="{preview_url}"' in page
    before = await table_counts(session)
    r = await client.post(preview_url, data={"csrf_token": csrf})
    assert r.status_code == 200 and "The dry run passed" in r.text
    assert "1 service checked" in r.text and "1 service would have their resolved features re-resolved" in r.text
    changes = r.text.split('class="changes', 1)[1].split("</table>", 1)[0]
    assert re.search(r"fare</code></th>\s*<td[^>]*>added", changes)
    assert await table_counts(session) == before  # the dry run wrote nothing
    confirm = {
        "csrf_token": csrf,
        "expected": re.search(r'name="expected" value="([^"]+)"', r.text).group(1),
        "features": re.search(r'name="features" value="([0-9a-f]+)"', r.text).group(1),
    }
    # the move form refuses the no-op move and points here
    r2 = await client.post(
        D + "/assignments/default/move/preview",
        data={"csrf_token": csrf, "model_id": "pricing-model", "model_version": "1"},
    )
    assert r2.status_code == 422 and "use Re-snapshot default" in r2.text

    r = await client.post(D + "/assignments/default/resnapshot", data=confirm)
    assert r.status_code == 303 and r.headers["location"].endswith("?done=resnapshot#contract")
    contract = await api(client, admin, "/v2/clients/acme/domains/south_australia/contract")
    assert contract["features"] == draft and contract["model_version"] == "1"
    assert contract["assignment_id"] != before_contract["assignment_id"]
    service = await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-1")
    assert service["resolved_features"]["fare"] == 99
    row = await last_audit(session)
    assert_console_row(row, "putdomainmodelassignment", "alice")
    assert row.target_id == "south_australia/default" and row.summary["model_version"] == "1"
    # the same confirmation again: default moved since the preview, nothing written (409)
    r = await client.post(D + "/assignments/default/resnapshot", data=confirm)
    assert r.status_code == 409 and "changed since the preview" in r.text
    assert (await api(client, admin, "/v2/clients/acme/domains/south_australia/contract")) == contract

    # a draft a service does not fit: the dry run names it, the write is refused too
    bad = seven_features()
    bad[0]["json_schema"]["enum"] = ["Sydney to Adelaide"]
    await client.put("/v2/clients/acme/domains/south_australia/features", json={"features": bad}, headers=admin)
    r = await client.post(preview_url, data={"csrf_token": csrf})
    assert r.status_code == 422 and "Blocked." in r.text
    assert "ferry-1" in r.text.split('class="blocking', 1)[1].split("</table>", 1)[0]
    assert "Confirm: re-snapshot default" not in r.text
    fresh = re.search(r'name="features" value', r.text) is None
    assert fresh
    # a live edit between the preview and the confirmation: 409, nothing written
    r = await client.put("/v2/clients/acme/domains/south_australia/features", json={"features": draft}, headers=admin)
    r = await client.post(preview_url, data={"csrf_token": csrf})
    assert r.status_code == 200
    stale = {
        "csrf_token": csrf,
        "expected": re.search(r'name="expected" value="([^"]+)"', r.text).group(1),
        "features": re.search(r'name="features" value="([0-9a-f]+)"', r.text).group(1),
    }
    await client.put("/v2/clients/acme/domains/south_australia/features", json={"features": bad}, headers=admin)
    r = await client.post(D + "/assignments/default/resnapshot", data=stale)
    assert r.status_code == 409
    assert (await api(client, admin, "/v2/clients/acme/domains/south_australia/contract")) == contract
    # another tenant's domain: 403; without the token: 403
    other = "/console/clients/globex/domains/south_australia/assignments/default/resnapshot"
    assert (await client.post(other + "/preview", data={"csrf_token": csrf})).status_code == 403
    assert (
        await client.post(D + "/assignments/default/resnapshot", data={**stale, "csrf_token": ""})
    ).status_code == 403


# -- issue 19 in the console: archive/restore a version, cancel/retry a job, re-initialise/delete a service ---


async def test_archiving_an_assigned_version_shows_the_409s_assignments_then_archive_and_restore(
    client, session, admin, make_token
):
    await tenant_setup(client, session, admin, client_id="acme")  # acme's default -> pricing-model v1
    await make_version(session, "pricing-model", "2")
    await init_service(client, admin, "ferry-1", ROUTE, client_id="acme")
    await client.put(
        "/v2/clients/acme/domains/south_australia/service/ferry-1/assignments/forecast",
        json={"model_id": "pricing-model", "model_version": "1"},
        headers=admin,
    )
    await sign_in(client, make_token(admin=True, username="olivia"))
    url = "/console/models/pricing-model/versions/1"
    page = (await client.get(url)).text
    assert re.findall(r'name="status" value="(\w+)">\s*<button type="submit"[^>]*>([\w ]+)<', page) == [
        ("archived", "Archive")
    ]
    csrf = csrf_of(page)
    before = await table_counts(session)
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "archived"})
    assert r.status_code == 409 and "cannot be archived: 2 active assignment(s) point at it" in r.text
    table = r.text.split('class="in-use', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td", table)
    assert len(rows) == 2
    assert 'href="/console/clients/acme/domains/south_australia/assignments/default"' in table
    assert 'href="/console/clients/acme/domains/south_australia/services/ferry-1/assignments/forecast"' in table
    assert await table_counts(session) == before
    assert (await api(client, admin, "/v2/models/pricing-model/versions/1"))["status"] == "active"

    # once nothing points at it: a confirmation, then the archive
    await client.put(
        "/v2/clients/acme/domains/south_australia/assignments/default",
        json={"model_id": "pricing-model", "model_version": "2"},
        headers=admin,
    )
    await client.put(
        "/v2/clients/acme/domains/south_australia/service/ferry-1/assignments/forecast",
        json={"model_id": "pricing-model", "model_version": "1", "status": "archived"},
        headers=admin,
    )
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "archived"})
    assert r.status_code == 200 and "Archive v1" in r.text and "takes no new job and no new assignment" in r.text
    assert (await api(client, admin, "/v2/models/pricing-model/versions/1"))["status"] == "active"
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "archived", "confirm": "yes"})
    assert r.status_code == 200 and "Status changed from active to archived" in r.text
    assert (await api(client, admin, "/v2/models/pricing-model/versions/1"))["status"] == "archived"
    row = await last_audit(session)
    assert_console_row(row, "setmodelversionstatus", "olivia")
    assert readable.action_words(row) == "Set version 1 of pricing-model from active to archived"
    assert re.findall(r'name="status" value="(\w+)">\s*<button type="submit"[^>]*>([\w ]+)<', r.text) == [
        ("active", "Restore")
    ]
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "active"})
    assert r.status_code == 200 and "Restore v1" in r.text and "active again" in r.text
    r = await client.post(url + "/status", data={"csrf_token": csrf, "status": "active", "confirm": "yes"})
    assert r.status_code == 200 and "Status changed from archived to active" in r.text
    assert (await api(client, admin, "/v2/models/pricing-model/versions/1"))["status"] == "active"


async def test_a_tenant_neither_archives_nor_restores_versions(client, session, admin, make_token):
    await make_version(session, "fares", "1", status="archived")
    await make_client(session, "acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get("/console/models/fares/versions/1")).text
    assert "Restore" not in page and "Archive" not in page
    r = await client.post(
        "/console/models/fares/versions/1/status",
        data={"csrf_token": csrf_of(page), "status": "active", "confirm": "yes"},
    )
    assert r.status_code == 403
    assert (await api(client, admin, "/v2/models/fares/versions/1"))["status"] == "archived"


async def _launched(client, headers, key: str = "default", service: str | None = None) -> str:
    base = "/v2/clients/acme/domains/south_australia" + (f"/service/{service}" if service else "")
    r = await client.post(f"{base}/assignments/{key}/jobs", json={"input": ROUTE}, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


async def test_a_tenant_cancels_then_retries_its_job_from_the_job_page(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    job_id = await _launched(client, admin)  # no dispatcher here: the job stays pending
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    url = f"/console/jobs/{job_id}"
    page = (await client.get(url)).text
    assert "Cancel job" in page and ">Retry<" not in page
    csrf = csrf_of(page)
    before = await table_counts(session)
    r = await client.post(url + "/cancel", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Cancel job" in r.text and "Yes, cancel the job" in r.text
    assert "cancelled by alice before it was dispatched" in r.text and "Back to the job" in r.text
    assert await table_counts(session) == before  # the rehearsal left nothing
    assert (await api(client, admin, f"/v2/jobs/{job_id}"))["status"] == "pending"
    r = await client.post(url + "/cancel", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 303 and r.headers["location"] == f"{url}?done=cancelled"
    job = await api(client, admin, f"/v2/jobs/{job_id}")
    assert job["status"] == "failure" and job["error"]["code"] == "cancelled"
    assert job["error"]["cancelled_by"]["username"] == "alice"
    row = await last_audit(session)
    assert_console_row(row, "canceljob", "alice")
    assert row.target_id == job_id and row.client_id == "acme"
    page = (await client.get(f"{url}?done=cancelled")).text
    assert "Job cancelled." in page and "Cancel job" not in page and ">Retry<" in page
    # cancelling again: the API's 409, on the page
    r = await client.post(url + "/cancel", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 409 and "has already ended with status failure (cancelled)" in r.text

    r = await client.post(url + "/retry", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Retry job" in r.text and "resolved again now" in r.text
    assert len(await api(client, admin, "/v2/jobs")) == 1
    r = await client.post(url + "/retry", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 303 and r.headers["location"].endswith("?done=retried")
    new_id = r.headers["location"].split("/console/jobs/", 1)[1].split("?", 1)[0]
    retried = await api(client, admin, f"/v2/jobs/{new_id}")
    assert retried["retry_of"] == job_id and retried["status"] == "pending" and retried["input"] == ROUTE
    assert_console_row(await last_audit(session), "retryjob", "alice")
    page = (await client.get(r.headers["location"])).text
    assert "Retry launched" in page and f'href="/console/jobs/{job_id}"' in page


async def test_job_buttons_only_for_callers_who_may_launch_the_job(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    job_id = await _launched(client, admin)
    # a reader of acme's jobs without run_inference: sees the job, no button, a post is 403
    await sign_in(client, make_token(scopes=["read_models"], client_id="acme"))
    page = (await client.get(f"/console/jobs/{job_id}")).text
    assert "Cancel job" not in page and ">Retry<" not in page
    csrf = csrf_of(page)
    for action in ("cancel", "retry"):
        r = await client.post(f"/console/jobs/{job_id}/{action}", data={"csrf_token": csrf, "confirm": "yes"})
        assert r.status_code == 403 and "missing permission run_inference" in r.text
    # another tenant: the job is not theirs (403), nothing cancelled
    await sign_in(client, make_token(groups=["client:globex"], username="gus"))
    csrf = await page_csrf(client, "/console/clients/globex")
    assert (await client.get(f"/console/jobs/{job_id}")).status_code == 403
    r = await client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 403 and "no access to client acme" in r.text
    assert (await api(client, admin, f"/v2/jobs/{job_id}"))["status"] == "pending"
    # an admin may: the button is there
    await sign_in(client, make_token(admin=True))
    assert "Cancel job" in (await client.get(f"/console/jobs/{job_id}")).text


async def test_the_live_fragment_swaps_in_retry_once_the_job_ends(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    job_id = await _launched(client, admin)
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    live = (await client.get(f"/console/jobs/{job_id}/live")).text
    assert "hx-get" in live and 'id="job-actions"' not in live  # running: the buttons stay as they are
    await client.post(f"/v2/jobs/{job_id}/cancel", headers=admin)
    live = (await client.get(f"/console/jobs/{job_id}/live")).text
    actions = live.split('id="job-actions" hx-swap-oob="true"', 1)[1]
    assert ">Retry<" in actions and "Cancel job" not in actions


async def test_a_tenant_re_initialises_and_deletes_a_service_after_confirmations(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    await init_service(client, admin, "ferry-1", ROUTE, client_id="acme")
    await client.put(
        "/v2/clients/acme/domains/south_australia/service/ferry-1/assignments/forecast",
        json={"model_id": "pricing-model", "model_version": "1"},
        headers=admin,
    )
    (first,) = await api(client, admin, "/v2/jobs?service_id=ferry-1")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    url = D + "/services/ferry-1"
    page = (await client.get(url)).text
    assert ">Re-initialise<" in page and ">Delete<" in page
    csrf = csrf_of(page)
    before = await table_counts(session)
    r = await client.post(url + "/reinit", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Re-initialise ferry-1" in r.text and "pricing-model v1" in r.text
    assert await table_counts(session) == before
    r = await client.post(url + "/reinit", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 303 and r.headers["location"] == url + "?done=reinitialised"
    jobs = await api(client, admin, "/v2/jobs?service_id=ferry-1")
    assert len(jobs) == 2 and {j["service_id"] for j in jobs} == {"ferry-1"}
    service = await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-1")
    assert service["status"] == "initializing"
    assert_console_row(await last_audit(session), "reinitdomainservice", "alice")

    # delete: the confirmation says what it would do now (both init jobs are unfinished)
    before = await table_counts(session)
    r = await client.post(url + "/delete", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Delete service ferry-1" in r.text
    assert "2 job(s)" in r.text and first["job_id"] in r.text and "1 key(s) (forecast)" in r.text
    assert await table_counts(session) == before
    await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-1")
    r = await client.post(url + "/delete", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 303 and r.headers["location"] == D + "?done=deleted"
    await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-1", expect=404)
    jobs = await api(client, admin, "/v2/jobs?service_id=ferry-1")
    assert {(j["status"], j["error"]["code"]) for j in jobs} == {("failure", "cancelled")}
    row = await last_audit(session)
    assert_console_row(row, "deletedomainservice", "alice")
    assert row.summary["archived_assignments"] == ["forecast"]
    assert readable.action_words(row) == "Deleted service ferry-1"
    assert "Service deleted" in (await client.get(D + "?done=deleted")).text
    # gone: its page is a 404, and so are its forms
    assert (await client.post(url + "/delete", data={"csrf_token": csrf})).status_code == 404
    # another tenant's service forms: 403
    for action in ("reinit", "delete"):
        other = f"/console/clients/globex/domains/south_australia/services/ferry-1/{action}"
        assert (await client.post(other, data={"csrf_token": csrf, "confirm": "yes"})).status_code == 403


async def test_a_departed_service_offers_neither_re_init_nor_delete(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await init_service(client, admin, "ferry-1", ROUTE, client_id="acme", departure_datetime="2020-01-01T00:00:00Z")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get(D + "/services/ferry-1")).text
    assert ">Re-initialise<" not in page and "kept as history" in page
    r = await client.post(D + "/services/ferry-1/delete", data={"csrf_token": csrf_of(page)})
    assert r.status_code == 422 and "departed services are kept as history" in r.text
    await api(client, admin, "/v2/clients/acme/domains/south_australia/service/ferry-1")


# -- issue 22 in the console: a tenant's webhook endpoints, platform webhooks for administrators ---------------


def _secret_on(page: str) -> str:
    found = re.search(r'id="webhook-secret" class="secret-value" readonly value="(whsec_[^"]+)"', page)
    assert found, "no secret on the page"
    return html.unescape(found.group(1))


async def test_a_tenant_manages_a_webhook_end_to_end_and_its_secret_is_shown_once(
    client, session, admin, make_token, dev, receiver
):
    await make_client(session, "acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    base = "/console/clients/acme/webhooks"
    listing = (await client.get(base)).text
    assert f'href="{base}?new=1#new-webhook">New webhook</a>' in listing
    form = (await client.get(base, params={"new": "1"})).text
    assert 'value="job.succeeded" checked' in form and "version.status_changed" not in form  # platform only
    csrf = csrf_of(form)
    # the API's refusals on the form, what was typed kept
    r = await client.post(base, data={"csrf_token": csrf, "url": "ftp://x", "events": "job.failed"})
    assert r.status_code == 422 and "invalid webhook url" in r.text and 'value="ftp://x"' in r.text
    assert 'value="job.failed" checked' in r.text and 'value="job.succeeded" checked' not in r.text
    r = await client.post(base, data={"csrf_token": csrf, "url": receiver.url("/a")})
    assert r.status_code == 400 and "events" in r.text
    assert await api(client, admin, "/v2/clients/acme/webhooks") == []

    r = await client.post(
        base,
        data={
            "csrf_token": csrf,
            "url": receiver.url("/a"),
            "events": ["job.succeeded", "service.failed"],
            "description": "pricing bus",
        },
    )
    assert r.status_code == 201 and "shown only now" in r.text
    secret = _secret_on(r.text)
    (hook,) = await api(client, admin, "/v2/clients/acme/webhooks")
    assert (hook["url"], hook["events"], hook["description"], hook["status"]) == (
        receiver.url("/a"),
        ["job.succeeded", "service.failed"],
        "pricing bus",
        "active",
    )
    row = await last_audit(session)
    assert_console_row(row, "createwebhook", "alice")
    assert row.target_id == hook["id"] and row.client_id == "acme" and secret not in json.dumps(row.summary)
    page_url = f"{base}/{hook['id']}"
    page = (await client.get(page_url)).text
    assert secret not in page and 'id="webhook-secret"' not in page  # shown once, never again
    assert secret not in (await client.get(base)).text

    # a test ping, delivered to a real receiver and verified with the secret the page showed
    r = await client.post(page_url + "/test", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == page_url + "?done=ping#deliveries"
    assert_console_row(await last_audit(session), "testwebhook", "alice")
    async with delivering(dev):
        await eventually(lambda: len(receiver.on("/a")) >= 1)
        await eventually(lambda: _delivered(client, admin, hook["id"], "acme"))
    (ping,) = receiver.on("/a")
    assert verified(secret, ping)["type"] == "ping"
    page = (await client.get(page_url)).text
    log = page.split('id="deliveries"', 1)[1]
    assert ping.headers["webhook-id"] in log and "delivered" in log and ">200<" in log

    # edit: a confirmation listing the changes, then the update
    edit = {"csrf_token": csrf, "url": receiver.url("/b"), "events": ["job.failed"], "description": "pricing bus"}
    r = await client.post(page_url, data=edit)
    assert r.status_code == 200 and "Update webhook" in r.text
    changes = r.text.split('class="changes', 1)[1].split("</table>", 1)[0]
    assert receiver.url("/b") in changes and "job.succeeded, service.failed" in changes and "Description" not in changes
    assert (await api(client, admin, f"/v2/clients/acme/webhooks/{hook['id']}"))["url"] == receiver.url("/a")
    r = await client.post(page_url, data={**edit, "confirm": "yes"})
    assert r.status_code == 303
    got = await api(client, admin, f"/v2/clients/acme/webhooks/{hook['id']}")
    assert (got["url"], got["events"]) == (receiver.url("/b"), ["job.failed"])
    assert readable.action_words(await last_audit(session)) == "Updated a webhook"
    r = await client.post(page_url, data={**edit, "confirm": "yes"})
    assert r.status_code == 400 and "nothing to update" in r.text

    # disable (asked first), a test of a disabled webhook is the API's 422, enable again
    r = await client.post(page_url + "/status", data={"csrf_token": csrf, "status": "disabled"})
    assert r.status_code == 200 and "Disable webhook" in r.text
    r = await client.post(page_url + "/status", data={"csrf_token": csrf, "status": "disabled", "confirm": "yes"})
    assert r.status_code == 303 and r.headers["location"].endswith("?done=disabled")
    assert (await api(client, admin, f"/v2/clients/acme/webhooks/{hook['id']}"))["status"] == "disabled"
    assert readable.action_words(await last_audit(session)) == "Disabled a webhook"
    r = await client.post(page_url + "/test", data={"csrf_token": csrf})
    assert r.status_code == 422 and "is disabled" in r.text
    r = await client.post(page_url + "/status", data={"csrf_token": csrf, "status": "active", "confirm": "yes"})
    assert r.status_code == 303
    assert (await api(client, admin, f"/v2/clients/acme/webhooks/{hook['id']}"))["status"] == "active"

    # rotate (asked first): the new secret shown once; a ping carries both signatures
    r = await client.post(page_url + "/rotate", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Rotate secret" in r.text and 'id="webhook-secret"' not in r.text
    r = await client.post(page_url + "/rotate", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 200 and "Secret rotated" in r.text
    rotated = _secret_on(r.text)
    assert rotated != secret
    assert_console_row(await last_audit(session), "rotatewebhooksecret", "alice")
    assert rotated not in (await client.get(page_url)).text
    await client.post(page_url + "/test", data={"csrf_token": csrf})
    async with delivering(dev):
        await eventually(lambda: len(receiver.on("/b")) >= 1)
    (ping,) = receiver.on("/b")
    assert verified(rotated, ping)["type"] == "ping" and verified(secret, ping)["type"] == "ping"

    # delete (asked first)
    r = await client.post(page_url + "/delete", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Delete webhook" in r.text
    await api(client, admin, f"/v2/clients/acme/webhooks/{hook['id']}")
    r = await client.post(page_url + "/delete", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 303 and r.headers["location"] == base + "?done=deleted"
    await api(client, admin, f"/v2/clients/acme/webhooks/{hook['id']}", expect=404)
    assert_console_row(await last_audit(session), "deletewebhook", "alice")
    assert (await client.get(page_url)).status_code == 404


async def test_a_tenant_cannot_reach_another_tenants_or_the_platforms_webhooks(
    client, session, admin, make_token, dev, receiver
):
    await make_client(session, "acme")
    await make_client(session, "globex")
    theirs = (
        await client.post(
            "/v2/clients/globex/webhooks", json={"url": receiver.url(), "events": ["job.failed"]}, headers=admin
        )
    ).json()
    platform = (
        await client.post("/v2/webhooks", json={"url": receiver.url(), "events": ["job.failed"]}, headers=admin)
    ).json()
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    csrf = await page_csrf(client, "/console/clients/acme/webhooks")
    assert "/console/webhooks" not in (await client.get("/console/clients/acme/webhooks")).text  # no nav link
    for path in (
        "/console/clients/globex/webhooks",
        f"/console/clients/globex/webhooks/{theirs['id']}",
        "/console/webhooks",
        f"/console/webhooks/{platform['id']}",
    ):
        assert (await client.get(path)).status_code == 403, path
    for path in (
        f"/console/clients/globex/webhooks/{theirs['id']}/delete",
        f"/console/clients/globex/webhooks/{theirs['id']}/rotate",
        f"/console/webhooks/{platform['id']}/delete",
    ):
        r = await client.post(path, data={"csrf_token": csrf, "confirm": "yes"})
        assert r.status_code == 403, path
    r = await client.post(
        "/console/clients/globex/webhooks", data={"csrf_token": csrf, "url": receiver.url(), "events": "job.failed"}
    )
    assert r.status_code == 403
    # a webhook of another scope addressed under one's own: the API's 404
    assert (await client.get(f"/console/clients/acme/webhooks/{theirs['id']}")).status_code == 404
    r = await client.post(f"/console/clients/acme/webhooks/{theirs['id']}/delete", data={"csrf_token": csrf})
    assert r.status_code == 404
    # a forged post (no token) to one's own tenant: 403
    r = await client.post("/console/clients/acme/webhooks", data={"url": receiver.url(), "events": "job.failed"})
    assert r.status_code == 403 and "CSRF" in r.text
    assert await api(client, admin, "/v2/clients/acme/webhooks") == []
    await api(client, admin, f"/v2/clients/globex/webhooks/{theirs['id']}")
    await api(client, admin, f"/v2/webhooks/{platform['id']}")


async def test_an_admin_manages_platform_webhooks(client, session, admin, make_token, dev, receiver):
    await sign_in(client, make_token(admin=True, username="olivia"))
    page = (await client.get("/console/clients")).text
    assert '<a href="/console/webhooks">Webhooks</a>' in page
    form = (await client.get("/console/webhooks", params={"new": "1"})).text
    assert 'value="version.status_changed"' in form
    csrf = csrf_of(form)
    r = await client.post(
        "/console/webhooks",
        data={"csrf_token": csrf, "url": receiver.url("/p"), "events": ["version.status_changed", "job.failed"]},
    )
    assert r.status_code == 201
    _secret_on(r.text)
    (hook,) = await api(client, admin, "/v2/webhooks")
    assert hook["client_id"] is None and hook["events"] == ["job.failed", "version.status_changed"]
    row = await last_audit(session)
    assert_console_row(row, "createplatformwebhook", "olivia")
    assert readable.action_words(row) == f"Created a platform webhook to {receiver.url('/p')}"
    url = f"/console/webhooks/{hook['id']}"
    r = await client.post(url + "/delete", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 303 and r.headers["location"] == "/console/webhooks?done=deleted"
    assert await api(client, admin, "/v2/webhooks") == []
    assert_console_row(await last_audit(session), "deleteplatformwebhook", "olivia")


async def test_a_suspended_clients_webhooks_are_readable_not_changeable(client, session, admin, make_token, dev):
    await make_client(session, "acme", status="suspended")
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console/clients/acme/webhooks")).text
    assert "New webhook" not in page and "is suspended" in page
    r = await client.post(
        "/console/clients/acme/webhooks",
        data={"csrf_token": csrf_of(page), "url": "https://hooks.example.com/x", "events": "job.failed"},
    )
    assert r.status_code == 422 and "client acme is suspended" in r.text
