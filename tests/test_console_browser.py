"""The console in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright),
against a real ``pie serve`` with its dispatcher on a free loopback port.

Inference jobs go to a Lambda handler whose "AWS" is a loopback stub accepting every Invoke
(202), so a job stays ``started`` until the test reports its end through the completion route,
the way a real handler would: the job page must then turn to ``success`` without a reload.

Set PIE_TEST_CONSOLE_SCREENSHOTS=<dir> to also save screenshots of the main pages (1280 px and
400 px wide); the README's screenshots under docs/console/ come from that.
"""

from __future__ import annotations

import asyncio
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import scratch_pie_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAMBDA_ARN = "arn:aws:lambda:us-east-1:123456789012:function:pie-console-test"
SECRET = "pie-console-browser-secret"

async_api = pytest.importorskip("playwright.async_api")
expect = async_api.expect
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


class _AcceptingLambda(BaseHTTPRequestHandler):
    """Answers every Lambda Invoke like an asynchronous invocation that was accepted."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def console_server():
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _AcceptingLambda)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        with scratch_pie_server(
            PIE_JWT_SECRET=SECRET,
            PIE_RUN_DISPATCHER="true",
            PIE_DISPATCH_POLL_INTERVAL="0.2",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{stub.server_port}",
        ) as server:
            yield server
    finally:
        stub.shutdown()
        stub.server_close()


@pytest.fixture(scope="module")
def world(console_server):
    """Tenants acme and globex; a model whose inference runs on the (stub) Lambda; domain
    south_australia of acme with its default key moved from v1 to v2; service ferry-1."""
    api, admin = console_server.url, console_server.headers(admin=True)

    def call(method: str, path: str, body: dict | None = None, expect: int = 200) -> dict:
        r = httpx.request(method, api + path, json=body, headers=admin, timeout=30)
        assert r.status_code == expect, r.text
        return r.json() if r.content else {}

    for client_id in ("acme", "globex"):
        call("POST", "/v2/clients", {"client_id": client_id, "name": client_id.title()}, 201)
    call(
        "POST",
        "/v2/models",
        {
            "id": "fares",
            "name": "Fare recommender",
            "description": "ferry fares (inference on Lambda)",
            "handlers": {
                "training": {"type": "in_process", "value": "echo"},
                "inference": {"type": "lambda", "arn": LAMBDA_ARN},
            },
        },
        201,
    )
    for _ in range(2):
        version = call("POST", "/v2/models/fares/new_version", {"description": "ferry fares"}, 201)["version"][
            "version"
        ]
        call("POST", f"/v2/models/fares/versions/{version}/new_status", {"status": "active"})
    features = [
        {"name": "route", "json_schema": {"type": "string"}, "mandatory": True},
        {
            "name": "competitor_count",
            "json_schema": {"type": "integer", "minimum": 0, "default": 2},
            "mandatory": False,
        },
    ]
    domain = "/v2/clients/acme/domains"
    call("POST", domain, {"domain_id": "south_australia", "name": "South Australia", "features": features}, 201)
    call("PUT", f"{domain}/south_australia/assignments/default", {"model_id": "fares", "model_version": "1"})
    call("PUT", f"{domain}/south_australia/assignments/default", {"model_id": "fares", "model_version": "2"})
    call(
        "POST",
        f"{domain}/south_australia/service/init",
        {"service_id": "ferry-1", "static_features": {"route": "Adelaide to Kangaroo Island"}},
        202,
    )
    return console_server


@pytest.fixture(scope="module")
async def browser():
    async with async_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        await b.close()


async def _sign_in(browser, server, token: str, width: int = 1280):
    context = await browser.new_context(viewport={"width": width, "height": 900}, base_url=server.url)
    page = await context.new_page()
    await page.goto("/console")
    assert "/console/login" in page.url
    await page.get_by_label("Bearer token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url("**/console")
    return context, page


async def _shoot(page, name: str) -> None:
    target = os.environ.get("PIE_TEST_CONSOLE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        width = page.viewport_size["width"]
        await page.screenshot(path=str(Path(target) / f"{name}-{width}.png"), full_page=True)


async def test_sign_in_then_navigate_client_domain_service_history(browser, world):
    context, page = await _sign_in(browser, world, world.token(groups=["client:acme"], username="alice"))
    try:
        # the session cookie is HttpOnly and SameSite=Strict: page scripts cannot read it
        cookie = next(c for c in await context.cookies() if c["name"] == "pie_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert await page.evaluate("document.cookie") == ""

        await page.get_by_role("link", name="Clients", exact=True).first.click()
        await page.get_by_role("link", name="acme").click()
        await page.get_by_role("link", name="south_australia").click()
        await expect(page.get_by_role("heading", name="Domain south_australia")).to_be_visible()
        await page.get_by_role("link", name="ferry-1").click()
        features = page.locator("table.features")
        await expect(features).to_contain_text("Adelaide to Kangaroo Island")
        await expect(features.locator("tr", has_text="competitor_count")).to_contain_text("(default)")
        await page.get_by_role("link", name="south_australia").click()
        await page.get_by_role("link", name="default", exact=True).click()
        rows = page.locator("table.history tbody tr")
        await expect(rows).to_have_count(2)
        await expect(rows.nth(0)).to_contain_text("fares v2")
        await expect(rows.nth(0)).to_contain_text("fares v1")  # moved from v1
        await expect(rows.nth(1)).to_contain_text("first revision")
    finally:
        await context.close()


async def test_a_tenant_token_sees_only_its_tenant(browser, world):
    context, page = await _sign_in(browser, world, world.token(groups=["client:acme"], username="alice"))
    try:
        await page.goto("/console/clients")
        await expect(page.get_by_role("link", name="acme")).to_be_visible()
        await expect(page.get_by_role("link", name="globex")).to_have_count(0)
        response = await page.goto("/console/clients/globex")
        assert response.status == 403
        await expect(page.get_by_role("heading", name="403 · Forbidden")).to_be_visible()
        await expect(page.locator("main")).to_contain_text("no access to client globex")
        response = await page.goto("/console/clients/globex/domains/south_australia/assignments/default")
        assert response.status == 403
    finally:
        await context.close()


async def test_launched_job_page_turns_to_success_without_a_reload(browser, world):
    context, page = await _sign_in(browser, world, world.token(groups=["client:acme"], username="alice"))
    try:
        await page.goto("/console/clients/acme/domains/south_australia/assignments/default")
        await page.get_by_label("Input (a JSON object", exact=False).fill('{"route": "Adelaide to Sydney"}')
        await page.get_by_role("button", name="Launch through fares v2").click()
        await page.wait_for_url("**/console/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]
        status = page.locator("#job-status")
        # the stub Lambda accepted it: the dispatcher marks it started, the page follows
        await expect(status).to_have_text("started", timeout=20_000)
        await page.evaluate("window.__sameDocument = true")

        r = httpx.post(
            f"{world.url}/v2/models/fares/versions/2/jobs/{job_id}/complete",
            json={"status": "success", "output": {"recommended_price": 123.45}},
            headers=world.headers(scopes=["complete_jobs"], client_id="acme"),
        )
        assert r.status_code == 200, r.text
        await expect(status).to_have_text("success", timeout=10_000)
        assert await page.evaluate("window.__sameDocument") is True  # no reload happened
        await expect(page.locator("#job-live")).to_contain_text("123.45")
        await expect(page.locator("main")).to_contain_text("Adelaide to Sydney")
    finally:
        await context.close()


async def test_keyboard_focus_is_visible_and_narrow_pages_do_not_scroll_sideways(browser, world):
    context, page = await _sign_in(browser, world, world.token(admin=True), width=400)
    try:
        await page.goto("/console/clients/acme/domains/south_australia")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
        assert await page.evaluate("document.activeElement.getBoundingClientRect().left") >= 0  # shown on focus
        assert await page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
        await page.keyboard.press("Enter")  # skip to the main content
        assert await page.evaluate("document.activeElement.id") == "main"
        await page.keyboard.press("Tab")  # the next stop is inside the page's content
        assert await page.evaluate("document.activeElement.closest('main') !== null")
        # the page itself never needs horizontal scrolling at 400 px (wide tables scroll inside)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        await context.close()


async def test_screenshots_of_the_main_pages(browser, world):
    """Renders the main pages at 1280 and 400 px (saved when PIE_TEST_CONSOLE_SCREENSHOTS is set);
    none needs horizontal page scrolling."""
    pages = {
        "clients": "/console/clients",
        "domain": "/console/clients/acme/domains/south_australia",
        "service": "/console/clients/acme/domains/south_australia/services/ferry-1",
        "assignment": "/console/clients/acme/domains/south_australia/assignments/default",
        "model": "/console/models/fares",
        "jobs": "/console/jobs",
        "queue": "/console/queue",
        "version": "/console/models/fares/versions/2",
        "audit": "/console/audit",
    }
    for width in (1280, 400):
        context, page = await _sign_in(browser, world, world.token(admin=True, username="operator"), width=width)
        try:
            for name, path in pages.items():
                assert (await page.goto(path)).status == 200, path
                assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (path, width)
                await _shoot(page, name)
            await page.goto("/console/jobs")
            await page.locator("tbody a").first.click()
            await page.wait_for_url("**/console/jobs/*")
            await _shoot(page, "job")
        finally:
            await context.close()


# -- phase 2: moving an assignment key with a dry-run preview; the audit log ------------------------


def _stored_state(server) -> dict:
    """Row counts of every table of the server's database, plus what the API shows of the key,
    its audit trail and the service (what a blocked move must leave untouched)."""
    admin = server.headers(admin=True)
    d = f"{server.url}/v2/clients/acme/domains/south_australia"
    state = {
        "revisions": httpx.get(f"{d}/assignments/default/revisions", headers=admin, timeout=30).json(),
        "audit": httpx.get(f"{server.url}/v2/audit?limit=1000", headers=admin, timeout=30).json(),
        "service": httpx.get(f"{d}/service/ferry-1", headers=admin, timeout=30).json(),
    }
    url = server.env.get("PIE_DATABASE_URL")
    if url:
        import psycopg

        with psycopg.connect(url) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
            ]
            state["rows"] = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    return state


async def test_the_dry_run_preview_of_a_blocked_move_lists_the_blocking_services_and_writes_nothing(browser, world):
    # version 3 freezes a schema ferry-1's route does not satisfy
    async with httpx.AsyncClient(base_url=world.url, headers=world.headers(admin=True), timeout=30) as api:
        r = await api.post(
            "/v2/models/fares/new_version",
            json={
                "version": "3",
                "description": "Adelaide-Sydney only",
                "features": [
                    {
                        "name": "route",
                        "json_schema": {"type": "string", "enum": ["Adelaide to Sydney"]},
                        "mandatory": True,
                    }
                ],
            },
        )
    assert r.status_code == 201, r.text
    before = await asyncio.to_thread(_stored_state, world)
    for width in (1280, 400):
        context, page = await _sign_in(browser, world, world.token(groups=["client:acme"], username="alice"), width)
        try:
            await page.goto("/console/clients/acme/domains/south_australia/assignments/default")
            await expect(page.get_by_label("Model", exact=True)).to_have_value("fares")
            await page.get_by_label("Version", exact=True).fill("3")
            await page.get_by_role("button", name="Preview move").click()
            await expect(page.get_by_role("heading", name="Move assignment default")).to_be_visible()
            await expect(page.get_by_role("alert")).to_contain_text("Blocked")
            await expect(page.get_by_role("alert")).to_contain_text("Nothing was written")
            rows = page.locator("table.blocking tbody tr")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_contain_text("ferry-1")
            await expect(rows.first).to_contain_text("route")
            await expect(rows.first).to_contain_text("Adelaide to Kangaroo Island")
            await expect(page.get_by_role("button", name="Confirm", exact=False)).to_have_count(0)
            assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            await _shoot(page, "move-blocked")
        finally:
            await context.close()
    assert await asyncio.to_thread(_stored_state, world) == before


async def test_a_confirmed_move_shows_in_the_history_and_in_the_audit_log(browser, world):
    context, page = await _sign_in(browser, world, world.token(groups=["client:acme"], username="alice"))
    try:
        await page.goto("/console/clients/acme/domains/south_australia/assignments/default")
        await page.get_by_label("Version", exact=True).fill("1")
        await page.keyboard.press("Enter")  # the keyboard submits the preview form
        status = page.locator("#move-result")
        await expect(status).to_contain_text("The dry run passed")
        await expect(status).to_contain_text("1 service checked")
        await expect(status).to_contain_text("0 services would have their resolved features re-resolved")  # same schema
        await _shoot(page, "move-preview")
        confirm = page.get_by_role("button", name="Confirm move to fares v1")
        await confirm.focus()
        await page.keyboard.press("Enter")
        await page.wait_for_url("**/assignments/default?moved=1")

        rows = page.locator("table.history tbody tr")
        await expect(rows.nth(0)).to_contain_text("fares v1")
        await expect(rows.nth(0)).to_contain_text("fares v2")  # from v2
        await expect(rows.nth(0)).to_contain_text("alice")  # who
        await expect(rows.nth(0)).to_contain_text("active")

        await page.get_by_role("status").get_by_role("link", name="audit log").click()
        await expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
        first = page.locator("table.audit tbody tr").first
        await expect(first).to_contain_text("putdomainmodelassignment")
        await expect(first).to_contain_text("alice")
        await expect(first).to_contain_text("south_australia/default")
        await expect(first).to_contain_text("Moved key default to version 1 of fares")
        await expect(first).to_contain_text("via console")
        # the filter form: by actor, keyboard only
        await page.get_by_label("Target id").fill("")
        await page.get_by_label("Actor").fill("alice")
        await page.get_by_label("Actor").press("Enter")
        await page.wait_for_url("**actor=alice**")
        await expect(page.locator("table.audit tbody tr")).to_have_count(1)
    finally:
        await context.close()
