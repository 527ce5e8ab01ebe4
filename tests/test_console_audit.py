"""The console, phase 2, over HTTP: moving an assignment key with a dry-run preview, audit rows
for the console's write actions, the audit log page and its tenant rules, who wrote what
(created_by) and the version status history on the pages."""

from __future__ import annotations

import re

from factories import IN_PROCESS_HANDLERS, create_domain, init_service, make_client, make_version, tenant_setup
from sqlalchemy import insert, select
from test_assignments_freeze import LIVE, V2_FEATURES
from test_audit import audit_rows, table_counts
from test_console import csrf_of, sign_in

from pie.tables.assignments import Assignment
from pie.tables.audit import AuditRecord

A = "/console/clients/acme/domains/south_australia/assignments/default"
V2 = {"model_id": "pricing-model", "model_version": "2"}


async def _blocked_world(client, session, admin) -> None:
    """Version 2 freezes a schema two services of acme's domain do not satisfy."""
    await tenant_setup(client, session, admin, client_id="acme", features=LIVE)
    await init_service(
        client, admin, "svc-a", {"route": "Adelaide to Sydney", "competitor_count": 15}, client_id="acme"
    )
    await init_service(client, admin, "svc-c", {"route": "Sydney to Adelaide", "cabin": "cave"}, client_id="acme")
    await make_version(session, version="2", features=V2_FEATURES)


async def _passing_world(client, session, admin) -> None:
    await tenant_setup(client, session, admin, client_id="acme", features=LIVE)
    await init_service(client, admin, "svc-1", {"route": "Adelaide to Sydney", "cabin": "deck"}, client_id="acme")
    await init_service(client, admin, "svc-2", {"route": "Sydney to Adelaide", "cabin": "suite"}, client_id="acme")
    await make_version(session, version="2", features=V2_FEATURES)


async def _revisions(session) -> list[tuple[str, str]]:
    session.expire_all()
    rows = (await session.scalars(select(Assignment).order_by(Assignment.created_at))).all()
    return [(r.model_version, r.status) for r in rows]


# -- moving a key: preview, confirm ------------------------------------------------------------------


async def test_preview_of_a_blocked_move_lists_the_blocking_services_and_writes_nothing(
    client, session, admin, make_token
):
    await _blocked_world(client, session, admin)
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = (await client.get(A)).text
    assert "Preview move" in page and 'for="move-version"' in page
    before = await table_counts(session)

    r = await client.post(A + "/move/preview", data={"csrf_token": csrf_of(page), **V2})
    assert r.status_code == 422
    assert "Blocking services" in r.text and "Nothing was written" in r.text
    table = r.text.split('class="blocking', 1)[1]
    assert "svc-a" in table and "svc-c" in table and "competitor_count" in table and "cabin" in table
    assert "Confirm move" not in r.text  # a blocked move cannot be confirmed
    assert await table_counts(session) == before  # no revision, no re-resolve, no audit row
    # the API's dry run agrees on the blocking services
    api = await client.put(
        "/v2/clients/acme/domains/south_australia/assignments/default?dry_run=true", json=V2, headers=admin
    )
    assert api.status_code == 422
    assert {b["service_id"] for b in api.json()["blocking_services"]} == {"svc-a", "svc-c"}


async def test_a_confirmed_move_writes_a_revision_and_an_audit_row_of_the_api_operation(
    client, session, admin, make_token
):
    await _passing_world(client, session, admin)
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    csrf = csrf_of((await client.get(A)).text)
    before = await table_counts(session)

    preview = await client.post(A + "/move/preview", data={"csrf_token": csrf, **V2})
    assert preview.status_code == 200
    assert "The dry run passed" in preview.text
    assert (
        "2 services checked" in preview.text
        and "2 services would have their resolved features re-resolved" in preview.text
    )
    assert await table_counts(session) == before  # the preview wrote nothing
    expected = re.search(r'name="expected" value="([^"]*)"', preview.text).group(1)

    r = await client.post(A + "/move", data={"csrf_token": csrf, "expected": expected, **V2})
    assert r.status_code == 303 and r.headers["location"] == A + "?moved=1"
    assert await _revisions(session) == [("1", "archived"), ("2", "active")]

    history = (await client.get(r.headers["location"])).text
    assert 'role="status"' in history
    rows = re.findall(r"<tr>\s*<td data-label=\"When\"><time.*?</tr>", history, re.S)
    assert "pricing-model v2" in rows[0] and "pricing-model v1" in rows[0] and "alice" in rows[0]

    row = (await audit_rows(session))[-1]
    assert (row.action, row.target_type, row.target_id, row.client_id) == (
        "putdomainmodelassignment",
        "assignment",
        "south_australia/default",
        "acme",
    )
    assert row.actor == {"sub": "pie-dev-user", "username": "alice", "client_id": None}
    assert row.summary["model_version"] == "2" and row.summary["via"] == "console"
    assert row.method == "POST" and row.path == A + "/move"

    # the API reads the same log
    api = await client.get("/v2/audit", params={"target_type": "assignment"}, headers=admin)
    assert api.json()[0]["action"] == "putdomainmodelassignment" and api.json()[0]["actor"]["username"] == "alice"
    audit_page = (await client.get("/console/audit", params={"action": "putdomainmodelassignment"})).text
    assert "south_australia/default" in audit_page and "alice" in audit_page


async def test_a_confirm_after_the_key_moved_elsewhere_is_refused_and_writes_nothing(
    client, session, admin, make_token
):
    await _passing_world(client, session, admin)
    await make_version(session, version="3", features=V2_FEATURES)
    await sign_in(client, make_token(admin=True, username="olivia"))
    csrf = csrf_of((await client.get(A)).text)
    preview = await client.post(A + "/move/preview", data={"csrf_token": csrf, **V2})
    expected = re.search(r'name="expected" value="([^"]*)"', preview.text).group(1)
    # meanwhile someone moves the key to v3 through the API
    moved = await client.put(
        "/v2/clients/acme/domains/south_australia/assignments/default",
        json={"model_id": "pricing-model", "model_version": "3"},
        headers=admin,
    )
    assert moved.status_code == 200
    before = await table_counts(session)
    r = await client.post(A + "/move", data={"csrf_token": csrf, "expected": expected, **V2})
    assert r.status_code == 409 and "changed since the preview" in r.text and "Preview again" in r.text
    assert await table_counts(session) == before


async def test_two_confirms_of_one_preview_move_the_key_once(client, session, admin, make_token):
    """Two operators confirm the same preview at once: the domain row lock orders them, the
    second sees the key already moved and is refused (409) — one new revision, one audit row."""
    import asyncio

    await _passing_world(client, session, admin)
    await make_version(session, version="3", features=V2_FEATURES)
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    csrf = csrf_of((await client.get(A)).text)
    preview = await client.post(A + "/move/preview", data={"csrf_token": csrf, **V2})
    expected = re.search(r'name="expected" value="([^"]*)"', preview.text).group(1)
    audit_before = len(await audit_rows(session))
    answers = await asyncio.gather(
        client.post(A + "/move", data={"csrf_token": csrf, "expected": expected, **V2}),
        client.post(
            A + "/move",
            data={"csrf_token": csrf, "expected": expected, "model_id": "pricing-model", "model_version": "3"},
        ),
    )
    assert sorted(r.status_code for r in answers) == [303, 409]
    revisions = await _revisions(session)
    assert len(revisions) == 2 and revisions[0] == ("1", "archived") and revisions[1][1] == "active"
    assert len(await audit_rows(session)) == audit_before + 1


async def test_moves_need_the_csrf_token_manage_domains_and_a_valid_version(client, session, admin, make_token):
    await _passing_world(client, session, admin)
    await sign_in(client, make_token(scopes=["read_domains", "run_inference"], client_id="acme"))
    page = (await client.get(A)).text
    assert "Revision history" in page and "Preview move" not in page
    r = await client.post(A + "/move/preview", data={"csrf_token": csrf_of(page), **V2})
    assert r.status_code == 403 and "missing permission manage_domains" in r.text
    r = await client.post(A + "/move", data={"csrf_token": csrf_of(page), "expected": "", **V2})
    assert r.status_code == 403

    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    csrf = csrf_of((await client.get(A)).text)
    before = await table_counts(session)
    assert (await client.post(A + "/move/preview", data={"csrf_token": "0" * 64, **V2})).status_code == 403
    r = await client.post(
        A + "/move", data={"csrf_token": csrf, "expected": "x", **V2}, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 403
    r = await client.post(
        A + "/move/preview", data={"csrf_token": csrf, "model_id": "pricing-model", "model_version": "9"}
    )
    assert r.status_code == 422 and "does not exist" in r.text
    r = await client.post(
        A + "/move/preview", data={"csrf_token": csrf, "model_id": "pricing model", "model_version": ""}
    )
    assert r.status_code == 400 and "model_id" in r.text
    assert await table_counts(session) == before


async def test_launching_a_job_from_the_console_is_audited(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    csrf = csrf_of((await client.get(A)).text)
    r = await client.post(A + "/jobs", data={"csrf_token": csrf, "input": '{"route": "Adelaide to Sydney"}'})
    assert r.status_code == 303
    job_id = r.headers["location"].rsplit("/", 1)[1]
    row = (await audit_rows(session))[-1]
    assert (row.action, row.target_type, row.target_id, row.client_id) == (
        "rundomainmodelassignmentjob",
        "job",
        job_id,
        "acme",
    )
    assert row.actor["username"] == "alice" and row.summary["fields"] == ["input"]
    assert "Adelaide" not in str(row.summary)  # the input stays in the job, not in the log
    job_page = (await client.get(r.headers["location"])).text
    assert "alice" in job_page  # created_by

    # a refused launch leaves no audit row either
    count = len(await audit_rows(session))
    r = await client.post(A + "/jobs", data={"csrf_token": csrf, "input": "{not json"})
    assert r.status_code == 400 and len(await audit_rows(session)) == count


# -- the audit log page: the tenant rules of GET /v2/audit ------------------------------------------


async def _two_tenants(client, session, admin) -> None:
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    await create_domain(client, admin, "globex", "north_sea")
    r = await client.post(
        "/v2/models",
        json={"id": "platform-model", "name": "p", "description": "p", "handlers": IN_PROCESS_HANDLERS},
        headers=admin,
    )
    assert r.status_code == 201, r.text


async def test_the_audit_page_shows_a_tenant_only_its_own_rows(client, session, admin, make_token):
    await _two_tenants(client, session, admin)
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    page = await client.get("/console/audit")
    assert page.status_code == 200
    body = page.text.split('class="audit', 1)[1]
    assert "south_australia" in body and "createdomain" in body
    assert "north_sea" not in body and "globex" not in body  # another tenant's rows
    assert "platform-model" not in body  # platform rows are for admins
    r = await client.get("/console/audit", params={"client": "globex"})
    assert r.status_code == 403 and "no access to client globex" in r.text
    # the API shows the same rows
    token = make_token(groups=["client:acme"], username="alice")
    api = await client.get("/v2/audit", headers={"Authorization": f"Bearer {token}"})
    assert {row["client_id"] for row in api.json()} == {"acme"}
    assert body.split("<tbody>", 1)[1].count("<tr>") == len(api.json())


async def test_the_audit_page_for_admins_and_for_callers_without_a_tenant(client, session, admin, make_token):
    await _two_tenants(client, session, admin)
    await sign_in(client, make_token(admin=True))
    body = (await client.get("/console/audit")).text.split('class="audit', 1)[1]
    assert "south_australia" in body and "north_sea" in body and "platform-model" in body
    await sign_in(client, make_token(scopes=["read_domains", "read_models"]))  # no tenant, not admin
    r = await client.get("/console/audit")
    assert r.status_code == 403 and "needs admin or access to a client" in r.text
    await sign_in(client, make_token(scopes=["read_models"], client_id="acme"))
    assert (await client.get("/console/audit")).status_code == 403  # read_domains, as the API


async def test_the_audit_page_filters_and_pages(client, session, admin, make_token):
    await _two_tenants(client, session, admin)
    await sign_in(client, make_token(admin=True))

    def table(r) -> str:
        assert r.status_code == 200, r.text
        return r.text.split('class="audit', 1)[1]

    by_type = table(await client.get("/console/audit", params={"target_type": "model", "target_id": "", "actor": ""}))
    assert "platform-model" in by_type and "south_australia" not in by_type
    by_action = table(await client.get("/console/audit", params={"action": "putdomainmodelassignment"}))
    assert "south_australia/default" in by_action and "createdomain" not in by_action
    assert "No audit row matches" in table(await client.get("/console/audit", params={"actor": "nobody"}))
    assert "createdomain" in table(await client.get("/console/audit", params={"actor": "pie-dev-user"}))
    assert "No audit row matches" in table(
        await client.get("/console/audit", params={"occurred_after": "2999-01-01T00:00"})
    )
    assert "createdomain" in table(await client.get("/console/audit", params={"occurred_before": "2999-01-01T00:00"}))
    r = await client.get("/console/audit", params={"occurred_after": "yesterday"})
    assert r.status_code == 400 and "occurred after" in r.text
    r = await client.get("/console/audit", params={"action": "DROP TABLE"})
    assert r.status_code == 400 and "action" in r.text

    # cursor paging: 50 rows a page, the next page's link carries the filters on
    await session.execute(
        insert(AuditRecord),
        [
            {
                "action": "updatedomain",
                "method": "PATCH",
                "path": "/x",
                "target_type": "domain",
                "target_id": f"d{i:03}",
                "client_id": "acme",
                "summary": {},
            }
            for i in range(60)
        ],
    )
    await session.commit()
    first = await client.get("/console/audit", params={"action": "updatedomain"})
    ids = re.findall(r">(d\d{3})<", table(first))
    assert ids == [f"d{i:03}" for i in range(59, 9, -1)]
    next_url = re.search(r'href="([^"]+)" rel="next"', first.text).group(1).replace("&amp;", "&")
    assert "action=updatedomain" in next_url
    second = await client.get(next_url)
    assert re.findall(r">(d\d{3})<", table(second)) == [f"d{i:03}" for i in range(9, -1, -1)]
    assert 'rel="next"' not in second.text


# -- who, and the version status history ------------------------------------------------------------


async def test_pages_show_who_wrote_records_and_the_version_status_history(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    alice = {"Authorization": f"Bearer {make_token(groups=['client:acme'], username='alice')}"}
    await init_service(client, alice, "ferry-1", {"route": "Adelaide to Sydney"}, client_id="acme")
    version = await client.post("/v2/models/pricing-model/new_version", json={"description": "v2"}, headers=admin)
    assert version.status_code == 201, version.text
    number = version.json()["version"]["version"]
    operator = {"Authorization": f"Bearer {make_token(admin=True, username='olivia')}"}
    for who, status in ((operator, "training"), (admin, "active")):
        r = await client.post(
            f"/v2/models/pricing-model/versions/{number}/new_status", json={"status": status}, headers=who
        )
        assert r.status_code == 200, r.text
    await sign_in(client, make_token(admin=True))

    domain = (await client.get("/console/clients/acme/domains/south_australia")).text
    service_row = re.search(r"<tr><td data-label=\"Service\"><a [^>]*>ferry-1</a>.*?</tr>", domain, re.S).group(0)
    assert "alice" in service_row
    service = (await client.get("/console/clients/acme/domains/south_australia/services/ferry-1")).text
    assert re.search(r"Created by</dt><dd><span[^>]*>alice", service)

    page = (await client.get(f"/console/models/pricing-model/versions/{number}")).text
    assert "Status history" in page
    history = page.split('class="status-history', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td data-label=\"When\">.*?</tr>", history, re.S)
    assert len(rows) == 2  # oldest first, as the API
    assert "status-pending" in rows[0] and "status-training" in rows[0] and "olivia" in rows[0]
    assert "status-active" in rows[1] and "pie-dev-user" in rows[1]  # no username: the sub
    # a version without a recorded change: an explicit empty state
    old = (await client.get("/console/models/pricing-model/versions/1")).text
    assert "No status change recorded" in old


# -- the queue summary and the metrics read one query ----------------------------------------------


async def test_the_queue_page_and_the_metrics_agree(client, session, admin, make_token):
    from test_operations import _scrape, _value

    await tenant_setup(client, session, admin, client_id="acme")
    for name in ("a", "b", "c"):
        await init_service(client, admin, name, {"route": "Adelaide to Sydney"}, client_id="acme")
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console/queue")).text
    shown = int(re.search(r'status=pending">(\d+)<', page).group(1))
    samples = await _scrape(client)
    exported = sum(
        _value(samples, "pie_jobs_queue_depth", status="pending", job_type=t) for t in ("inference", "training")
    )
    assert shown == exported == 3
    assert _value(samples, "pie_jobs_oldest_age_seconds", status="pending", job_type="inference") >= 0
