"""Operating through the console in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright, one browser and one ``pie serve`` for the module), as an administrator and as a
tenant: every flow ends by checking its effect through the API.

Set PIE_TEST_CONSOLE_SCREENSHOTS=<dir> to also save screenshots of the new pages (docs/console/).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from conftest import scratch_pie_server
from test_console_browser import CHROMIUM_ARGS, _shoot, _sign_in, async_api, expect

from pie.console.readable import describe_schema

CHROMIUM = "/usr/bin/chromium"
FEATURES = [
    {
        "name": "route",
        "json_schema": {"type": "string", "enum": ["Adelaide to Sydney", "Sydney to Adelaide"]},
        "mandatory": True,
    },
    {"name": "competitor_count", "json_schema": {"type": "integer", "minimum": 0, "default": 2}, "mandatory": False},
]


async def _shoot_screen(page, name: str) -> None:
    """A screenshot of what the window shows (a long page's first screen)."""
    target = os.environ.get("PIE_TEST_CONSOLE_SCREENSHOTS")
    if target:
        width = page.viewport_size["width"]
        await page.screenshot(path=str(Path(target) / f"{name}-{width}.png"))


@pytest.fixture(scope="module")
def server():
    with scratch_pie_server(PIE_RUN_DISPATCHER="true", PIE_DISPATCH_POLL_INTERVAL="0.2") as running:
        yield running


class Api:
    """The API as an administrator (to arrange the world and to check effects)."""

    def __init__(self, server):
        self.url = server.url
        self.headers = server.headers(admin=True)

    def call(self, method: str, path: str, body: dict | None = None, expect: int = 200):
        r = httpx.request(method, self.url + path, json=body, headers=self.headers, timeout=30)
        assert r.status_code == expect, r.text
        return r.json() if r.content else None

    def get(self, path: str, expect: int = 200):
        return self.call("GET", path, expect=expect)


@pytest.fixture(scope="module")
def world(server):
    """Tenants acme and globex; model fares (in-process handlers) v1 active; acme's domain
    south_australia with two live features, default -> fares v1, service ferry-1."""
    api = Api(server)
    for client_id in ("acme", "globex"):
        api.call("POST", "/v2/clients", {"client_id": client_id, "name": client_id.title()}, 201)
    handlers = {
        "training": {"type": "in_process", "value": "echo"},
        "inference": {"type": "in_process", "value": "echo"},
    }
    api.call("POST", "/v2/models", {"id": "fares", "name": "Fares", "description": "", "handlers": handlers}, 201)
    api.call("POST", "/v2/models/fares/new_version", {}, 201)
    api.call("POST", "/v2/models/fares/versions/1/new_status", {"status": "active"})
    d = "/v2/clients/acme/domains"
    api.call("POST", d, {"domain_id": "south_australia", "name": "South Australia", "features": FEATURES}, 201)
    api.call("PUT", f"{d}/south_australia/assignments/default", {"model_id": "fares", "model_version": "1"})
    api.call(
        "POST",
        f"{d}/south_australia/service/init",
        {"service_id": "ferry-1", "static_features": {"route": "Sydney to Adelaide"}},
        202,
    )
    return server, api


@pytest.fixture(scope="module")
async def browser():
    async with async_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        await b.close()


async def test_an_admin_creates_a_client_manages_its_app_client_ids_and_suspends_it(browser, world):
    server, api = world
    context, page = await _sign_in(browser, server, server.token(admin=True, username="olivia"))
    try:
        await page.get_by_role("link", name="Clients", exact=True).first.click()
        await page.get_by_role("link", name="New client").click()
        await page.get_by_label("Client id").fill("initech")
        await page.get_by_label("Name", exact=True).fill("Initech")
        await _shoot(page, "client-new")
        await page.get_by_role("button", name="Create client").click()
        await page.wait_for_url("**/console/clients/initech?done=created")
        await expect(page.get_by_role("status")).to_contain_text("Client created")
        assert api.get("/v2/clients/initech")["name"] == "Initech"

        await page.get_by_label("App client id").fill("initech-batch")
        await page.get_by_role("button", name="Add app client id").click()
        await expect(page.get_by_role("status")).to_contain_text("App client ids saved")
        assert api.get("/v2/clients/initech")["app_client_ids"] == ["initech-batch"]
        await _shoot(page, "client-manage")

        await page.get_by_role("button", name="Suspend client").click()
        await expect(page.get_by_role("heading", name="Suspend client initech")).to_be_visible()
        assert api.get("/v2/clients/initech")["status"] == "active"  # asked first, nothing written
        await _shoot(page, "confirm")
        await page.get_by_role("button", name="Suspend initech").click()
        await expect(page.get_by_role("status")).to_contain_text("Client suspended")
        assert api.get("/v2/clients/initech")["status"] == "suspended"

        await page.goto("/console/audit?client=initech")
        await expect(page.locator("table.audit tbody tr").first).to_contain_text("Updated client initech: suspended it")
        await expect(page.locator("table.audit tbody tr").first).to_contain_text("via console")
    finally:
        await context.close()


async def test_a_tenant_creates_a_domain_edits_its_features_with_a_preview_and_runs_services(browser, world):
    server, api = world
    context, page = await _sign_in(browser, server, server.token(groups=["client:acme"], username="alice"))
    try:
        # a new domain, then its first features, row by row
        await page.goto("/console/clients/acme")
        await page.get_by_role("link", name="New domain").click()
        await page.get_by_label("Domain id").fill("east")
        await page.get_by_label("Domain name").fill("East coast")
        await page.get_by_role("button", name="Create domain").click()
        await page.wait_for_url("**/console/clients/acme/domains/east?done=created")
        assert api.get("/v2/clients/acme/domains/east")["name"] == "East coast"

        await page.get_by_role("link", name="Edit features").click()
        await page.get_by_label("Name of feature 1").fill("route")
        await page.get_by_label("Allowed values of feature 1").fill("Sydney to Hobart\nHobart to Sydney")
        await page.get_by_label("Feature 1 is mandatory").check()
        await page.get_by_role("button", name="Add a feature").click()
        await page.get_by_label("Name of feature 2").fill("competitor_count")
        await page.get_by_label("Type of feature 2").select_option("integer")
        await page.get_by_label("Minimum of feature 2").fill("0")
        await page.get_by_label("Default of feature 2").fill("2")
        await _shoot(page, "features-editor")
        await page.get_by_role("button", name="Preview changes").click()
        await expect(page.locator("#impact")).to_contain_text("Every service resolves")
        await page.get_by_role("button", name="Save features").click()
        await expect(page.get_by_role("status")).to_contain_text("Live features saved")
        live = api.get("/v2/clients/acme/domains/east/features")
        assert live == [
            {
                "name": "route",
                "json_schema": {"type": "string", "enum": ["Sydney to Hobart", "Hobart to Sydney"]},
                "mandatory": True,
            },
            {
                "name": "competitor_count",
                "json_schema": {"type": "integer", "minimum": 0, "default": 2},
                "mandatory": False,
            },
        ]
        table = page.locator("table.features-def").first
        await expect(table).to_contain_text(describe_schema({"type": "integer", "minimum": 0}))

        # the preview names the services a change would break (south_australia's ferry-1)
        await page.goto("/console/clients/acme/domains/south_australia/features")
        await page.get_by_label("Allowed values of feature 1").fill("Adelaide to Sydney")
        await page.get_by_role("button", name="Preview changes").click()
        await expect(page.locator("#impact")).to_contain_text("1 service would not resolve")
        await expect(page.locator("table.blocking")).to_contain_text("ferry-1")
        await _shoot(page, "features-preview")
        await page.get_by_role("button", name="Back to the editor").click()
        await expect(page.get_by_label("Allowed values of feature 1")).to_have_value("Adelaide to Sydney")
        assert api.get("/v2/clients/acme/domains/south_australia/features") == FEATURES  # nothing saved

        # initialise a service, with a confirmation
        api.call(
            "PUT", "/v2/clients/acme/domains/east/assignments/default", {"model_id": "fares", "model_version": "1"}
        )
        await page.goto("/console/clients/acme/domains/east")
        await page.get_by_role("link", name="Initialise a service").click()
        await page.get_by_label("Service id").fill("ferry-7")
        await page.get_by_label("route", exact=True).fill("Sydney to Hobart")
        await page.get_by_label("competitor_count", exact=True).fill("5")
        await _shoot(page, "service-init")
        await page.get_by_role("button", name="Review and initialise").click()
        await expect(page.get_by_role("heading", name="Initialise service ferry-7")).to_be_visible()
        api.get("/v2/clients/acme/domains/east/service/ferry-7", expect=404)
        await page.get_by_role("button", name="Initialise ferry-7").click()
        await page.wait_for_url("**/services/ferry-7?done=initialised")
        service = api.get("/v2/clients/acme/domains/east/service/ferry-7")
        assert service["provided_features"] == {"route": "Sydney to Hobart", "competitor_count": 5}

        # update it: one value changed, one removed; confirmed
        await page.get_by_label("competitor_count", exact=True).fill("")
        await page.get_by_label("route", exact=True).fill("Hobart to Sydney")
        await page.get_by_role("button", name="Review update").click()
        await expect(page.locator("table.changes")).to_contain_text("removed")
        await page.get_by_role("button", name="Update ferry-7").click()
        await expect(page.get_by_role("status")).to_contain_text("Service updated")
        service = api.get("/v2/clients/acme/domains/east/service/ferry-7")
        assert service["provided_features"] == {"route": "Hobart to Sydney"}
        assert service["resolved_features"] == {"route": "Hobart to Sydney", "competitor_count": 2}
        await _shoot(page, "service-update")
    finally:
        await context.close()


async def test_an_admin_registers_a_model_activates_a_version_and_manages_subscriptions(browser, world):
    server, api = world
    context, page = await _sign_in(browser, server, server.token(admin=True, username="olivia"))
    try:
        await page.goto("/console/models")
        await page.get_by_role("link", name="Register a model").click()
        await page.get_by_label("Model id").fill("demand")
        await page.get_by_label("Model name").fill("Demand forecast")
        training = page.get_by_role("group", name="Training handler")
        await training.get_by_label("Runs on").select_option("lambda")
        await training.get_by_label("Lambda function ARN").fill("not-an-arn")
        inference = page.get_by_role("group", name="Inference handler")
        await inference.get_by_label("In-process name", exact=False).fill("echo")
        await inference.get_by_label("Inference input contract", exact=False).fill(
            '{"type": "object", "properties": {"route": {"type": "string"}}, "required": ["route"]}'
        )
        await page.get_by_role("button", name="Register model").click()
        # the API's own check, next to the form, what was typed kept
        await expect(page.get_by_role("alert")).to_contain_text("is not a Lambda function ARN")
        training = page.get_by_role("group", name="Training handler")
        await training.get_by_label("Lambda function ARN").fill("arn:aws:lambda:us-east-1:123456789012:function:demand")
        await _shoot(page, "model-new")
        await page.get_by_role("button", name="Register model").click()
        await page.wait_for_url("**/console/models/demand?done=created")
        model = api.get("/v2/models/demand")
        assert model["handlers"]["training"]["arn"].endswith("function:demand")
        assert model["handler_contracts"]["inference"]["input_schema"]["required"] == ["route"]
        await expect(page.locator("table.contracts")).to_contain_text("route")

        await page.get_by_role("link", name="New version").click()
        await page.get_by_label("Version description").fill("first cut")
        await page.get_by_role("button", name="Create version").click()
        await page.wait_for_url("**/console/models/demand/versions/1?done=created")
        await expect(page.get_by_role("button", name="Mark failed")).to_have_count(0)  # not from pending
        await page.get_by_role("button", name="Activate").click()
        await expect(page.get_by_role("heading", name="Activate: demand v1")).to_be_visible()
        await page.get_by_role("button", name="Activate v1").click()
        await expect(page.locator("#status-changed")).to_contain_text("from pending to active")
        assert api.get("/v2/models/demand/versions/1")["status"] == "active"
        await _shoot(page, "version-status")

        await page.goto("/console/models/demand")
        await page.get_by_role("link", name="New subscription").click()
        await page.get_by_label("Stored input", exact=False).fill('{"route": "Adelaide to Sydney"}')
        await page.get_by_label("Label", exact=False).fill("nightly replay")
        await page.get_by_role("button", name="Create subscription").click()
        await expect(page.get_by_role("status")).to_contain_text("Subscription created")
        (sub,) = api.get("/v2/models/demand/event-subscriptions")
        assert (sub["label"], sub["status"], sub["input"]) == (
            "nightly replay",
            "active",
            {"route": "Adelaide to Sydney"},
        )
        await page.get_by_role("button", name="Pause subscription nightly replay").click()
        await expect(page.get_by_role("status")).to_contain_text("Subscription paused")
        assert api.get(f"/v2/models/demand/event-subscriptions/{sub['id']}")["status"] == "paused"
        await _shoot(page, "model-manage")
        await page.get_by_role("button", name="Delete subscription nightly replay").click()
        await page.get_by_role("button", name="Delete subscription").click()
        await expect(page.get_by_role("status")).to_contain_text("Subscription deleted")
        api.get(f"/v2/models/demand/event-subscriptions/{sub['id']}", expect=404)
        listing = await page.goto("/console/models")
        assert listing.status == 200
        await expect(page.locator("tr", has_text="Demand forecast").locator('[data-label="Versions"]')).to_have_text(
            "1"
        )
    finally:
        await context.close()


async def test_a_tenant_cannot_reach_another_tenants_forms_and_a_forged_post_is_refused(browser, world):
    server, api = world
    context, page = await _sign_in(browser, server, server.token(groups=["client:acme"], username="alice"))
    try:
        for path in (
            "/console/clients/globex?new=domain",
            "/console/clients/globex/domains/south_australia/features",
            "/console/models?new=1",
        ):
            response = await page.goto(path)
            assert response.status == 403, path
        await page.goto("/console/clients/acme")
        # a same-origin post without the session's CSRF token (what a forged form sends)
        status = await page.evaluate(
            """async () => (await fetch('/console/clients/acme/domains', {method: 'POST',
                 body: new URLSearchParams({domain_id: 'forged'})})).status"""
        )
        assert status == 403
        # and with this page's token but aimed at another tenant
        token = await page.locator('input[name="csrf_token"]').first.input_value()
        status = await page.evaluate(
            """async (token) => (await fetch('/console/clients/globex/domains', {method: 'POST',
                 body: new URLSearchParams({csrf_token: token, domain_id: 'forged'})})).status""",
            token,
        )
        assert status == 403
        api.get("/v2/clients/acme/domains/forged", expect=404)
        api.get("/v2/clients/globex/domains/forged", expect=404)
    finally:
        await context.close()


async def test_tables_are_readable_at_400_px_and_redoc_stays_offline(browser, world):
    server, api = world
    context, page = await _sign_in(browser, server, server.token(admin=True), width=400)
    try:
        for path in ("/console/jobs", "/console/audit", "/console/models/fares"):
            await page.goto(path)
            # every cell of every table is within the 400 px viewport: nothing scrolls out of sight
            outside = await page.evaluate(
                """() => [...document.querySelectorAll('main td, main tbody th')]
                     .filter(c => c.getBoundingClientRect().right > window.innerWidth + 1).length"""
            )
            assert outside == 0, path
            assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        await page.goto("/console/audit")
        await expect(page.locator("table.audit")).to_contain_text("Moved key default to version 1 of fares")
        await page.locator("table.audit").scroll_into_view_if_needed()
        await _shoot_screen(page, "audit-words")

        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        await page.goto("/v2/redoc")
        await expect(page.locator("body")).to_contain_text("Create Client", timeout=30_000)
        await page.wait_for_load_state("networkidle")
        # (blob: URLs are made by the page itself, a web worker of this origin)
        foreign = [
            u for u in requested if not u.removeprefix("blob:").startswith(server.url) and not u.startswith("data:")
        ]
        assert foreign == [], foreign
        # the icons pages name are served (headless Chromium does not fetch icons by itself)
        for path in ("/v2/redoc", "/console"):
            await page.goto(path)
            icons = await page.eval_on_selector_all("link[rel~=icon]", "links => links.map(l => l.href)")
            assert icons, path
            for icon in icons:
                answer = await context.request.get(icon)
                assert answer.status == 200 and answer.headers["content-type"].startswith("image/"), icon
    finally:
        await context.close()
