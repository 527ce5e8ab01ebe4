"""The operator console over HTTP (no browser): sign-in cookie, CSRF, tenant rules, pages,
launching a job, the Cognito hosted-UI flow against a fake token endpoint, the queue summary."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from factories import assign, init_service, make_client, make_version, stored_job, tenant_setup

from pie.jobs.models import Job
from pie.jobs.summary import queue_summary

ROUTE = {"route": "Adelaide to Sydney"}


async def sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/console/login", data={"token": token, "next": "/console/clients"})


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page)
    assert found, "page has no CSRF field"
    return found.group(1)


async def test_sign_in_sets_an_http_only_strict_cookie_and_pages_need_it(client, admin, make_token):
    r = await client.get("/console/clients")
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next=%2Fconsole%2Fclients")

    r = await sign_in(client, make_token(admin=True))
    assert r.status_code == 303 and r.headers["location"] == "/console/clients"
    cookie = r.headers["set-cookie"]
    assert (
        "pie_console=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    )
    assert "Max-Age" not in cookie and "expires" not in cookie.lower()  # the browser session only

    r = await client.get("/console/clients")
    assert r.status_code == 200 and "<h1>Clients</h1>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]


async def test_a_bad_token_is_refused_on_the_sign_in_page(client):
    r = await sign_in(client, "not-a-token")
    assert r.status_code == 401 and "malformed bearer token" in r.text
    assert "set-cookie" not in r.headers


async def test_an_expired_session_sends_back_to_sign_in(client, make_token):
    client.cookies.set("pie_console", make_token(admin=True, ttl=-10), path="/console")
    r = await client.get("/console/models")
    assert (
        r.status_code == 303
        and "/console/login" in r.headers["location"]
        and "reason=session_ended" in r.headers["location"]
    )
    assert "Your session ended" in (await client.get(r.headers["location"])).text
    # the notice is one of the page's own: text in the URL is never shown
    assert "call 555" not in (await client.get("/console/login", params={"reason": "call 555"})).text


async def test_sign_out_needs_the_csrf_token_and_clears_the_cookie(client, make_token):
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console")).text
    r = await client.post("/console/logout", data={"csrf_token": "0" * 64})
    assert r.status_code == 403 and "CSRF" in r.text
    r = await client.post("/console/logout", data={"csrf_token": csrf_of(page)})
    assert r.status_code == 303 and 'pie_console=""' in r.headers["set-cookie"]


async def test_a_tenant_sees_only_its_own_tenant(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))

    clients_page = (await client.get("/console/clients")).text
    assert "/console/clients/acme" in clients_page and "globex" not in clients_page

    r = await client.get("/console/clients/globex")
    assert r.status_code == 403 and "no access to client globex" in r.text and "<h1>403" in r.text
    r = await client.get("/console/clients/globex/domains/south_australia/assignments/default")
    assert r.status_code == 403
    # the API agrees
    api = await client.get(
        "/v2/clients/globex",
        headers={"Authorization": f"Bearer {make_token(groups=['client:acme'], username='alice')}"},
    )
    assert api.status_code == 403


async def test_without_read_models_the_models_page_is_403(client, make_token):
    await sign_in(client, make_token(scopes=["read_domains"], client_id="acme"))
    r = await client.get("/console/models")
    assert r.status_code == 403 and "missing permission read_models" in r.text


async def test_navigation_shows_services_features_and_assignment_history(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_version(session, version="2")
    await init_service(client, admin, "ferry-1", {**ROUTE, "competitor_count": 3}, client_id="acme")
    await assign(client, admin, "acme", "south_australia", "default", model_version="2")
    await sign_in(client, make_token(admin=True))

    client_page = (await client.get("/console/clients/acme")).text
    assert "/console/clients/acme/domains/south_australia" in client_page

    domain_page = (await client.get("/console/clients/acme/domains/south_australia")).text
    assert "ferry-1" in domain_page and "pricing-model v2" in domain_page

    service_page = (await client.get("/console/clients/acme/domains/south_australia/services/ferry-1")).text
    assert "competitor_count" in service_page and "Provided" in service_page and "Resolved" in service_page

    history = (await client.get("/console/clients/acme/domains/south_australia/assignments/default")).text
    rows = re.findall(r"<tr>\s*<td data-label=\"When\"><time.*?</tr>", history, re.S)
    assert len(rows) == 2
    assert "pricing-model v2" in rows[0] and "pricing-model v1" in rows[0] and "active" in rows[0]  # v1 → v2
    assert "first revision" in rows[1] and "archived" in rows[1]


async def test_launching_a_job_through_an_assignment(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await sign_in(client, make_token(groups=["client:acme"], username="alice"))
    url = "/console/clients/acme/domains/south_australia/assignments/default"
    csrf = csrf_of((await client.get(url)).text)

    r = await client.post(url + "/jobs", data={"csrf_token": csrf, "input": '{"route": "Adelaide to Sydney"}'})
    assert r.status_code == 303
    job_id = r.headers["location"].rsplit("/", 1)[1]
    job = await stored_job(session, job_id)
    assert job.status == "pending" and job.client_id == "acme" and job.input == ROUTE

    page = await client.get(r.headers["location"])
    assert page.status_code == 200 and 'hx-trigger="every 1s"' in page.text and "Adelaide to Sydney" in page.text
    fragment = await client.get(f"/console/jobs/{job_id}/live")
    assert fragment.status_code == 200 and 'id="job-live"' in fragment.text and "<html" not in fragment.text


async def test_service_scope_key_history_and_launch(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await init_service(client, admin, "ferry-1", {**ROUTE, "competitor_count": 3}, client_id="acme")
    await assign(client, admin, "acme", "south_australia", "forecast", service_id="ferry-1")
    await sign_in(client, make_token(admin=True))
    service_page = (await client.get("/console/clients/acme/domains/south_australia/services/ferry-1")).text
    url = "/console/clients/acme/domains/south_australia/services/ferry-1/assignments/forecast"
    assert f'href="{url}"' in service_page
    page = (await client.get(url)).text
    assert "service ferry-1" in page and "first revision" in page
    r = await client.post(url + "/jobs", data={"csrf_token": csrf_of(page), "input": "{}"})
    assert r.status_code == 303
    job = await stored_job(session, r.headers["location"].rsplit("/", 1)[1])
    assert job.service_id == "ferry-1" and job.features["competitor_count"] == 3


async def test_a_refused_launch_shows_the_form_again_and_writes_nothing(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await sign_in(client, make_token(admin=True))
    url = "/console/clients/acme/domains/south_australia/assignments/default"
    csrf = csrf_of((await client.get(url)).text)

    r = await client.post(url + "/jobs", data={"csrf_token": csrf, "input": "{not json"})
    assert r.status_code == 400 and "input is not valid JSON" in r.text and "{not json" in r.text
    r = await client.post(url + "/jobs", data={"csrf_token": csrf, "input": "[1, 2]"})
    assert r.status_code == 400 and "input" in r.text
    r = await client.post(url + "/jobs", data={"csrf_token": "f" * 64, "input": "{}"})
    assert r.status_code == 403
    r = await client.post(
        url + "/jobs", data={"csrf_token": csrf, "input": "{}"}, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 403
    assert (await session.execute(Job.__table__.select())).all() == []


async def test_without_run_inference_there_is_no_launch_form_and_the_post_is_403(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await sign_in(client, make_token(scopes=["read_domains"], client_id="acme"))
    url = "/console/clients/acme/domains/south_australia/assignments/default"
    page = (await client.get(url)).text
    assert "Revision history" in page and "Launch through" not in page
    r = await client.post(url + "/jobs", data={"csrf_token": csrf_of(page), "input": "{}"})
    assert r.status_code == 403 and "missing permission run_inference" in r.text
    assert (await session.execute(Job.__table__.select())).all() == []


async def test_malformed_path_ids_are_a_400_page(client, make_token):
    await sign_in(client, make_token(admin=True))
    r = await client.get("/console/clients/acme/domains/sa/assignments/NOT A KEY")
    assert r.status_code == 400 and "assignment_key" in r.text and "<html" in r.text
    assert (await client.get("/console/jobs/%00")).status_code == 400


async def test_another_tenants_job_page_is_403(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    await init_service(client, admin, "ferry-1", ROUTE, client_id="acme")
    job = (await session.execute(Job.__table__.select())).first()
    await sign_in(client, make_token(groups=["client:globex"], username="bob"))
    r = await client.get(f"/console/jobs/{job.job_id}")
    assert r.status_code == 403 and "no access to client acme" in r.text
    listing = (await client.get("/console/jobs")).text
    assert job.job_id[-12:] not in listing


async def test_jobs_filter_by_status_type_model_and_time(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await init_service(client, admin, "ferry-1", ROUTE, client_id="acme")
    await sign_in(client, make_token(admin=True))
    job_id = (await session.execute(Job.__table__.select())).first().job_id
    short = job_id[-12:]
    now = datetime.now(timezone.utc)
    later = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    earlier = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    assert short in (await client.get("/console/jobs", params={"status": "pending", "job_type": "inference"})).text
    assert short not in (await client.get("/console/jobs", params={"status": "success"})).text
    assert short not in (await client.get("/console/jobs", params={"job_type": "training"})).text
    assert short not in (await client.get("/console/jobs", params={"model": "other"})).text
    assert short in (await client.get("/console/jobs", params={"created_after": earlier, "created_before": later})).text
    assert short not in (await client.get("/console/jobs", params={"created_after": later})).text
    r = await client.get("/console/jobs", params={"created_after": "yesterday"})
    assert r.status_code == 400 and "created after" in r.text


async def test_model_and_version_pages(client, session, make_token):
    await make_version(session, features=[{"name": "route", "json_schema": {"type": "string"}, "mandatory": True}])
    await sign_in(client, make_token(scopes=["read_models"]))
    model_page = (await client.get("/console/models/pricing-model")).text
    assert "/console/models/pricing-model/versions/1" in model_page and "Event subscriptions" in model_page
    version_page = (await client.get("/console/models/pricing-model/versions/1")).text
    assert "Frozen features" in version_page and "reference_pricing" in version_page
    assert (await client.get("/console/models/nope")).status_code == 404


async def test_queue_summary_counts_by_status_in_one_query(client, session, admin, engine):
    await tenant_setup(client, session, admin, client_id="acme")
    for name in ("a", "b", "c"):
        await init_service(client, admin, name, ROUTE, client_id="acme")
    rows = (await session.execute(Job.__table__.select().order_by(Job.job_id))).all()
    await session.execute(
        Job.__table__.update()
        .where(Job.job_id == rows[0].job_id)
        .values(status="failure", completed_at=datetime.now(timezone.utc))
    )
    await session.execute(
        Job.__table__.update()
        .where(Job.job_id == rows[1].job_id)
        .values(status="success", completed_at=datetime.now(timezone.utc))
    )
    await session.commit()

    queries: list[str] = []
    from sqlalchemy import event

    listener = lambda *args: queries.append(args[2])  # noqa: E731
    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    try:
        summary = await queue_summary(session)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", listener)
    assert len(queries) == 1
    assert summary.counts == {"pending": 1, "started": 0, "success": 1, "failure": 1}
    assert summary.failure_rate == 0.5 and summary.oldest_pending_at is not None


async def test_queue_page_counts_only_visible_jobs(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_client(session, "globex")
    await init_service(client, admin, "ferry-1", ROUTE, client_id="acme")
    await sign_in(client, make_token(groups=["client:globex"], username="bob"))
    page = (await client.get("/console/queue")).text
    assert re.search(r'status=pending">0<', page)
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console/queue")).text
    assert re.search(r'status=pending">1<', page)


async def test_an_unknown_console_page_is_a_404_page(client):
    r = await client.get("/console/nowhere/at/all")
    assert r.status_code == 404 and "<html" in r.text and "no console page /console/nowhere/at/all" in r.text
    assert (await client.get("/console/static/nope.js")).status_code == 404


async def test_static_assets_are_served_locally(client):
    r = await client.get("/console/static/htmx.min.js")
    assert r.status_code == 200 and "htmx" in r.text[:2000]
    r = await client.get("/console/static/console.css")
    assert r.status_code == 200 and ":focus-visible" in r.text


# -- Cognito hosted UI (authorization code + PKCE) against a fake token endpoint on loopback -----


class _FakeCognito(BaseHTTPRequestHandler):
    token = ""
    seen: list[dict] = []

    def do_POST(self):
        form = parse_qs(self.rfile.read(int(self.headers["content-length"])).decode())
        type(self).seen.append({k: v[0] for k, v in form.items()})
        body = json.dumps({"access_token": type(self).token, "token_type": "Bearer", "expires_in": 3600}).encode()
        self.send_response(200 if form.get("code") == ["good-code"] else 400)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_cognito(make_token):
    _FakeCognito.token = make_token(groups=["client:acme"], username="alice")
    _FakeCognito.seen = []
    server = HTTPServer(("127.0.0.1", 0), _FakeCognito)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


async def test_cognito_hosted_ui_sign_in_with_pkce(app, engine, session, settings, fake_cognito):
    import base64
    import hashlib

    await make_client(session, "acme")
    cognito_settings = settings.model_copy(
        update={"console_cognito_domain": fake_cognito, "console_cognito_client_id": "console-app"}
    )
    original = app.state.settings
    app.state.settings = cognito_settings
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert "organisation account" in (await client.get("/console/login")).text
            r = await client.get("/console/login/cognito", params={"next": "/console/clients"})
            assert r.status_code == 302
            authorize = urlparse(r.headers["location"])
            assert f"{authorize.scheme}://{authorize.netloc}" == fake_cognito and authorize.path == "/oauth2/authorize"
            query = {k: v[0] for k, v in parse_qs(authorize.query).items()}
            assert query["code_challenge_method"] == "S256" and query["client_id"] == "console-app"
            assert query["redirect_uri"] == "http://testserver/console/auth/callback"

            # a forged state is refused
            r = await client.get("/console/auth/callback", params={"code": "good-code", "state": "forged"})
            assert r.status_code == 400 and "pie_console=" not in r.headers.get("set-cookie", "")

            r = await client.get("/console/auth/callback", params={"code": "good-code", "state": query["state"]})
            assert r.status_code == 200 and "url=/console/clients" in r.text
            assert "HttpOnly" in r.headers["set-cookie"]
            exchange = _FakeCognito.seen[-1]
            assert exchange["grant_type"] == "authorization_code" and exchange["code"] == "good-code"
            challenge = base64.urlsafe_b64encode(hashlib.sha256(exchange["code_verifier"].encode()).digest()).rstrip(
                b"="
            )
            assert challenge.decode() == query["code_challenge"]

            r = await client.get("/console/clients")
            assert r.status_code == 200 and "/console/clients/acme" in r.text
    finally:
        app.state.settings = original


async def test_cognito_routes_are_404_when_not_configured(client):
    assert (await client.get("/console/login/cognito")).status_code == 404
    assert (await client.get("/console/auth/callback", params={"code": "x", "state": "y"})).status_code == 404


# -- zero-setup local mode: the one-time sign-in link --------------------------------------------


async def test_one_time_sign_in_link_works_once_in_local_mode(app, engine, settings, tmp_path):
    from pie.console.signin import issue_signin_code

    local = settings.model_copy(update={"jwt_secret": None, "data_dir": tmp_path})
    original, original_verifier = app.state.settings, app.state.verifier
    from pie.auth import TokenVerifier

    app.state.settings, app.state.verifier = local, TokenVerifier(local)
    try:
        code = issue_signin_code(local)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as browser:
            r = await browser.get("/console/login/once", params={"code": code})
            assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
            assert (await browser.get("/console/clients")).status_code == 200  # an admin session
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as other:
            r = await other.get("/console/login/once", params={"code": code})
            assert r.status_code == 403 and "already used or has expired" in r.text
            assert (await other.get("/console/login/once", params={"code": "guess"})).status_code == 403
    finally:
        app.state.settings, app.state.verifier = original, original_verifier


async def test_one_time_links_are_refused_outside_local_mode(client, settings):
    from pie.console.signin import issue_signin_code

    code = issue_signin_code(settings)  # the test settings have PIE_JWT_SECRET: not local mode
    assert (await client.get("/console/login/once", params={"code": code})).status_code == 403


def _serve_without_a_database(monkeypatch, settings) -> None:
    """`pie serve` with these settings, its database start and migration skipped."""
    from pie import cli, migrate

    monkeypatch.setattr(cli, "load_settings", lambda: settings)
    monkeypatch.setattr(cli, "_database_url", lambda s: "postgresql://unused/unused")
    monkeypatch.setattr(migrate, "upgrade", lambda *a, **k: None)
    monkeypatch.setattr(migrate, "head_revision", lambda *a, **k: "head")


def test_pie_serve_prints_a_working_one_time_link_in_local_mode(settings, tmp_path, monkeypatch, capsys):
    import signal

    import uvicorn

    from pie import cli
    from pie.console.signin import redeem_signin_code

    local = settings.model_copy(update={"jwt_secret": None, "data_dir": tmp_path})
    _serve_without_a_database(monkeypatch, local)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(signal, "signal", lambda *a, **k: None)
    assert cli.main(["serve", "--port", "8123"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Console: "))
    url = line.split()[1]
    assert url.startswith("http://127.0.0.1:8123/console/login/once?code=")
    code = url.split("code=", 1)[1]
    assert redeem_signin_code(local, code) is not None
    assert redeem_signin_code(local, code) is None  # once


def test_pie_serve_prints_no_link_with_a_configured_secret(settings, tmp_path, monkeypatch, capsys):
    import signal

    import uvicorn

    from pie import cli

    _serve_without_a_database(monkeypatch, settings.model_copy(update={"data_dir": tmp_path}))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(signal, "signal", lambda *a, **k: None)
    assert cli.main(["serve", "--port", "8123"]) == 0
    assert "Console:" not in capsys.readouterr().out


async def test_the_domain_page_shows_the_governing_snapshot_not_the_draft(client, session, admin, make_token):
    """Issue 17: version 1 has no frozen schema; after a live edit the page names the snapshot
    taken by the default revision (and shows it), not 'the live features'."""
    await tenant_setup(client, session, admin, client_id="acme")
    draft = [{"name": "route", "json_schema": {"type": "integer"}, "mandatory": True}]
    r = await client.put("/v2/clients/acme/domains/south_australia/features", json={"features": draft}, headers=admin)
    assert r.status_code == 200
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console/clients/acme/domains/south_australia")).text
    assert "a snapshot of the live features" in page and "Contract in force (snapshot of the live features)" in page
    assert "Adelaide to Sydney" in page  # the snapshot's enum, not the draft's integer


async def test_the_assignment_page_shows_the_experiment(client, session, admin, make_token):
    """Issue 24 item 5 (spec 15.7): the arms of the active revision with their jobs and outcomes
    (the logic of GET .../arms) and the newest shadow jobs."""
    await tenant_setup(client, session, admin, client_id="acme")
    for version in ("2", "3"):
        await make_version(session, version=version)
    url = "/console/clients/acme/domains/south_australia/assignments/default"
    await sign_in(client, make_token(admin=True))
    assert "Experiment</h2>" not in (await client.get(url)).text  # no experiment, no panel
    await assign(
        client,
        admin,
        "acme",
        "south_australia",
        "default",
        split=[{"model_id": "pricing-model", "model_version": "2", "percent": 25}],
        shadow=[{"model_id": "pricing-model", "model_version": "3"}],
    )
    job_id = (await init_service(client, admin, "ferry-1", ROUTE, client_id="acme")).json()["job_id"]
    arms = (await client.get("/v2/clients/acme/domains/south_australia/assignments/default/arms", headers=admin)).json()
    page = (await client.get(url)).text
    panel = page.split('id="experiment-h"')[1].split("Revision history")[0]
    rows = re.findall(r"<tr>\s*<td data-label=\"Arm\">(\w+)</td>.*?</tr>", panel, re.S)
    assert rows == ["primary", "split", "shadow"]
    for arm in arms["arms"]:
        row = re.search(rf"<td data-label=\"Arm\">{arm['arm']}</td>(.*?)</tr>", panel, re.S).group(1)
        assert f"pricing-model v{arm['model_version']}" in row
        assert f'<td data-label="Jobs">{arm["jobs"]}</td>' in row
        assert f'<td data-label="Pending">{arm["pending"]}</td>' in row
    assert "25%" in panel and "75%" in panel and "copy of every launch" in panel
    shadow = (await client.get("/v2/jobs", params={"arm": "shadow"}, headers=admin)).json()[0]
    shadows = page.split('id="shadow-jobs-h"')[1]
    assert f"/console/jobs/{shadow['job_id']}" in shadows and f"/console/jobs/{job_id}" in shadows
    assert "ferry-1" in shadows and "pricing-model v3" in shadows
    history = page.split("Revision history")[1]
    assert "split pricing-model v2 25%, shadow pricing-model v3" in history


async def test_re_snapshotting_default_keeps_the_experiment(client, session, admin, make_token):
    """The console's re-snapshot writes default again to the same version: the new revision
    keeps the running experiment (split and shadow), as it keeps role, settings and metadata."""
    await tenant_setup(client, session, admin, client_id="acme")
    for version in ("2", "3"):
        await make_version(session, version=version)
    split = [{"model_id": "pricing-model", "model_version": "2", "percent": 25}]
    shadow = [{"model_id": "pricing-model", "model_version": "3"}]
    before = (await assign(client, admin, "acme", "south_australia", "default", split=split, shadow=shadow)).json()
    await sign_in(client, make_token(admin=True))
    base = "/console/clients/acme/domains/south_australia"
    csrf = csrf_of((await client.get(f"{base}/assignments/default")).text)
    preview = await client.post(f"{base}/assignments/default/resnapshot/preview", data={"csrf_token": csrf})
    assert preview.status_code == 200, preview.text
    confirm = {
        "csrf_token": csrf,
        "expected": re.search(r'name="expected" value="([^"]+)"', preview.text).group(1),
        "features": re.search(r'name="features" value="([0-9a-f]+)"', preview.text).group(1),
    }
    r = await client.post(f"{base}/assignments/default/resnapshot", data=confirm)
    assert r.status_code == 303, r.text
    after = (await client.get("/v2/clients/acme/domains/south_australia/assignments/default", headers=admin)).json()
    assert after["assignment_id"] != before["assignment_id"]
    assert after["split"] == split and after["shadow"] == shadow
