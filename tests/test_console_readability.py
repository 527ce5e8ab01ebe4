"""The console's readability (issue #24, item 6) over HTTP: counts, words and tables where pages
showed counters, operation ids and JSON; a no-op move refused; the favicon, the landing page's
console link and ReDoc without a CDN. Each test fails on the console before the issue."""

from __future__ import annotations

import re

from factories import make_version, seven_features, tenant_setup
from test_audit import table_counts
from test_console import csrf_of, sign_in

D = "/console/clients/acme/domains/south_australia"


async def page_csrf(client, path: str) -> str:
    r = await client.get(path)
    assert r.status_code == 200, r.text
    return csrf_of(r.text)


async def test_the_models_list_counts_versions(client, session, make_token):
    """Regression: the Versions column showed the model's version counter (0 for versions given
    explicit names), not how many versions it has."""
    for version in ("1", "2", "beta"):
        await make_version(session, "fares", version)
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console/models")).text
    row = re.search(r"<tr>(?:(?!</tr>).)*>fares</a>.*?</tr>", page, re.S).group(0)
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert "3" in cells and "0" not in cells, cells


async def test_audit_actions_read_as_words_with_the_console_as_channel(client, session, admin, make_token):
    await tenant_setup(client, session, admin, client_id="acme")
    await make_version(session, version="2")
    await sign_in(client, make_token(admin=True))
    url = D + "/assignments/default"
    csrf = await page_csrf(client, url)
    data = {"csrf_token": csrf, "model_id": "pricing-model", "model_version": "2"}
    preview = await client.post(url + "/move/preview", data=data)
    expected = re.search(r'name="expected" value="([^"]*)"', preview.text).group(1)
    assert (await client.post(url + "/move", data={**data, "expected": expected})).status_code == 303
    body = (await client.get("/console/audit")).text.split('class="audit', 1)[1]
    first = body.split("</tr>", 2)[1]
    assert "Moved key default to version 2 of pricing-model" in first
    assert "via console" in first and "putdomainmodelassignment" in first
    assert '"via"' not in body  # the summary is a list of names and values, not JSON
    assert "Created domain south_australia" in body  # API writes read as words too
    assert "via console" not in body.split("Created domain south_australia", 1)[1].split("</tr>", 1)[0]


async def test_the_move_form_refuses_a_move_to_the_version_the_key_is_on(client, session, admin, make_token):
    """Regression: v1 -> v1 went through as "dry run passed" and could be confirmed."""
    await tenant_setup(client, session, admin, client_id="acme")
    await sign_in(client, make_token(admin=True))
    url = D + "/assignments/default"
    page = (await client.get(url)).text
    data = {"csrf_token": csrf_of(page), "model_id": "pricing-model", "model_version": "1"}
    before = await table_counts(session)
    r = await client.post(url + "/move/preview", data=data)
    assert r.status_code == 422 and "already points at pricing-model v1" in r.text
    assert "dry run passed" not in r.text and "Confirm move" not in r.text and 'name="expected"' not in r.text
    current = re.search(r'name="expected"', (await client.get(url)).text)
    r = await client.post(url + "/move", data={**data, "expected": current.group(0) if current else ""})
    assert r.status_code in (409, 422)
    assert await table_counts(session) == before
    # the form says where the key is and does not offer that version
    assert "Now at pricing-model v1" in page and '<option value="1">' not in page


async def test_contracts_handlers_and_frozen_features_are_tables_not_json(client, session, admin, make_token):
    await make_version(session, "fares", "1", features=seven_features())
    await sign_in(client, make_token(admin=True))
    page = (await client.get("/console/models/fares/versions/1")).text
    assert "<pre" not in page.split("Frozen features", 1)[1].split("Metadata", 1)[0]
    assert "No handler contracts" in page and ">null<" not in page
    assert "reference_pricing" in page.split('class="handlers', 1)[1]
    frozen = page.split('class="features-def', 1)[1].split("</table>", 1)[0]
    assert "tuple (string, string)" in frozen and "Adelaide to Sydney" in frozen


async def test_the_favicon_is_served(client):
    r = await client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon" and r.content[:4] == b"\x00\x00\x01\x00"
    assert (await client.get("/console/static/favicon.svg")).status_code == 200


async def test_the_landing_page_links_to_the_console(client):
    assert '<a href="/console">Operator console</a>' in (await client.get("/")).text


async def test_redoc_loads_nothing_from_a_cdn(client):
    """Regression: ReDoc's bundle loaded its logo from cdn.redoc.ly."""
    redoc = (await client.get("/v2/redoc")).text
    js = re.search(r'src="([^"]*redoc[^"]*\.js)"', redoc).group(1)
    bundle = await client.get(js)
    assert bundle.status_code == 200 and "Redoc" in bundle.text[:2000]
    assert "cdn.redoc.ly" not in bundle.text
    assert not re.search(r"https?://[^\"'\s]*\.(svg|png|jpe?g|gif|woff2?|css)\b", bundle.text)


async def test_a_jobs_features_and_error_are_tables(client, session, admin, make_token):
    from sqlalchemy import update

    from pie.tables.jobs import Job

    await tenant_setup(client, session, admin, client_id="acme")
    r = await client.post(
        "/v2/clients/acme/domains/south_australia/service/init",
        json={"service_id": "ferry-1", "static_features": {"route": "Adelaide to Sydney", "competitor_count": 3}},
        headers=admin,
    )
    job_id = r.json()["job_id"]
    await session.execute(
        update(Job)
        .where(Job.job_id == job_id)
        .values(status="failure", error={"code": "handler_error", "message": "boom"})
    )
    await session.commit()
    await sign_in(client, make_token(admin=True))
    page = (await client.get(f"/console/jobs/{job_id}")).text
    features = page.split("resolved features", 1)[1].split("</table>", 1)[0]
    assert "<code>competitor_count</code>" in features and "<code>3</code>" in features
    error = page.split("<caption>Error</caption>", 1)[1].split("</table>", 1)[0]
    assert "handler_error" in error and "boom" in error
