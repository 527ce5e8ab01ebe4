"""Issue 17, spec 15.2: the documented bare-array lists (listclients, listmodels,
getdomainfeatures, listmodeleventsubscriptions) return every row unless ``?limit=`` is passed;
a long list is streamed page by page (no query reads more than a page)."""

from __future__ import annotations

import pytest
from factories import create_domain, domain_url, feature, make_client
from sqlalchemy import event, text

from pie import db, pagination

ECHO = {"type": "in_process", "value": "echo"}


@pytest.fixture
def small_pages(monkeypatch):
    """Stream in pages of 10 rows, and record how many rows each SELECT read."""
    monkeypatch.setattr(pagination, "STREAM_PAGE", 10)
    counts: list[tuple[str, int]] = []

    def after(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            counts.append((statement, cursor.rowcount))

    engine = db.get_engine().sync_engine
    event.listen(engine, "after_cursor_execute", after)
    yield counts
    event.remove(engine, "after_cursor_execute", after)


async def create_models(client, admin, n: int) -> list[str]:
    ids = [f"m{i:03d}" for i in range(1, n + 1)]
    for model_id in ids:
        r = await client.post(
            "/v2/models",
            json={
                "id": model_id,
                "name": model_id,
                "description": "",
                "handlers": {"training": ECHO, "inference": ECHO},
            },
            headers=admin,
        )
        assert r.status_code == 201, r.text
    return ids


async def test_the_105th_model_is_in_listmodels(client, admin):
    ids = await create_models(client, admin, 105)
    r = await client.get("/v2/models", headers=admin)
    assert r.status_code == 200 and "x-next-cursor" not in r.headers
    assert [m["id"] for m in r.json()] == ids
    # ?limit= pages as before
    r = await client.get("/v2/models?limit=100", headers=admin)
    assert [m["id"] for m in r.json()] == ids[:100]
    r = await client.get(f"/v2/models?limit=100&cursor={r.headers['x-next-cursor']}", headers=admin)
    assert [m["id"] for m in r.json()] == ids[100:] and "x-next-cursor" not in r.headers
    # a cursor alone pages too (the default page size)
    first = await client.get("/v2/models?limit=3", headers=admin)
    r = await client.get(f"/v2/models?cursor={first.headers['x-next-cursor']}", headers=admin)
    assert [m["id"] for m in r.json()] == ids[3:103] and "x-next-cursor" in r.headers


async def test_a_long_list_is_streamed_page_by_page(client, admin, small_pages):
    ids = await create_models(client, admin, 35)
    small_pages.clear()
    r = await client.get("/v2/models", headers=admin)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "content-length" not in r.headers  # streamed
    body = r.json()
    assert [m["id"] for m in body] == ids
    reads = [rows for statement, rows in small_pages if "FROM models" in statement]
    assert reads == [11, 11, 11, 5], reads  # 10 a page (+1 to see whether more follow)
    # each model reads exactly as the single GET does
    assert body[17] == (await client.get("/v2/models/m018", headers=admin)).json()
    # a list that fits in one page is a plain answer
    r = await client.get("/v2/models/m001/event-subscriptions", headers=admin)
    assert r.status_code == 200 and r.json() == [] and r.headers["content-length"] == "2"


async def test_listclients_and_listmodeleventsubscriptions_are_complete(client, session, admin, auth, small_pages):
    ids = [f"c{i:03d}" for i in range(1, 106)]
    await session.execute(
        text("INSERT INTO clients (client_id, name) SELECT x, x FROM unnest(CAST(:ids AS text[])) AS x"), {"ids": ids}
    )
    await session.commit()
    r = await client.get("/v2/clients", headers=admin)
    assert [c["client_id"] for c in r.json()] == ids
    assert r.json()[104] == (await client.get("/v2/clients/c105", headers=admin)).json()
    # a tenant still sees only its own
    r = await client.get("/v2/clients", headers=auth(groups=["client:c007", "client:c050"]))
    assert [c["client_id"] for c in r.json()] == ["c007", "c050"]
    assert len((await client.get("/v2/clients?limit=100", headers=admin)).json()) == 100

    r = await client.post(
        "/v2/models",
        json={"id": "src", "name": "src", "description": "", "handlers": {"training": ECHO, "inference": ECHO}},
        headers=admin,
    )
    assert r.status_code == 201
    await session.execute(
        text(
            """INSERT INTO event_subscriptions (source_model_id, trigger_event, target_model_id, target_action,
                   input_source, input, label)
               SELECT 'src', 'training_complete', 'src', 'inference', 'stored', jsonb_build_object('n', g), 'n' || g
               FROM generate_series(1, 105) AS g"""
        )
    )
    await session.commit()
    r = await client.get("/v2/models/src/event-subscriptions", headers=admin)
    assert sorted(s["input"]["n"] for s in r.json()) == list(range(1, 106))
    assert len({s["id"] for s in r.json()}) == 105
    page = await client.get("/v2/models/src/event-subscriptions?limit=100", headers=admin)
    assert len(page.json()) == 100 and page.headers["x-next-cursor"]


async def test_getdomainfeatures_is_complete_and_pages_with_limit(client, session, admin):
    await make_client(session, "client-1")
    features = [feature(f"f{i:03d}", {"type": "integer"}) for i in range(1, 106)]
    await create_domain(client, admin, features=features)
    url = domain_url("client-1", "south_australia") + "/features"
    r = await client.get(url, headers=admin)
    assert r.json() == features and "x-next-cursor" not in r.headers
    r = await client.get(f"{url}?limit=100", headers=admin)
    assert r.json() == features[:100]
    r = await client.get(f"{url}?limit=100&cursor={r.headers['x-next-cursor']}", headers=admin)
    assert r.json() == features[100:] and "x-next-cursor" not in r.headers
    for bad in ("limit=0", "limit=1001", "cursor=nope", "cursor=" + "W10"):  # W10: base64 of "[]"
        assert (await client.get(f"{url}?{bad}", headers=admin)).status_code == 400, bad
