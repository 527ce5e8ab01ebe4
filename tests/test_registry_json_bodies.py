"""Request bodies JSON can carry but PostgreSQL cannot store (NUL characters, unpaired UTF-16
surrogates, NaN / Infinity / numbers overflowing to infinity): a 400 envelope naming the
field, never a 500, nothing written (spec 1.1) - on every registry and job route that stores
caller JSON."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from pie.jobs.logic import create_job

ECHO = {"type": "in_process", "value": "echo"}
HANDLERS = '{"training": {"type": "in_process", "value": "echo"}, "inference": {"type": "in_process", "value": "echo"}}'

# raw JSON fragments standing for a value; each parses (Python's json accepts NaN/Infinity and
# lone surrogates) but cannot be stored
UNSTORABLE = {
    "nul in a string": '"a\\u0000b"',
    "lone surrogate": '"\\ud800"',
    "NaN": "NaN",
    "Infinity": "-Infinity",
    "overflow to infinity": "1e400",
    "nul in a key": '{"k\\u0000": 1}',
    "nested": '{"a": [1, {"b": NaN}]}',
}


async def post_raw(client, url, raw, headers, method="POST"):
    return await client.request(
        method, url, content=raw.encode(), headers={**headers, "content-type": "application/json"}
    )


def assert_400(r):
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["success"] is False and "internal" not in body["message"]


async def count(session, table):
    return (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()


@pytest.fixture
async def model(client, admin):
    r = await client.post(
        "/v2/models",
        json={"id": "m", "name": "m", "description": "", "handlers": {"training": ECHO, "inference": ECHO}},
        headers=admin,
    )
    assert r.status_code == 201
    r = await client.post("/v2/models/m/new_version", json={"version": "1"}, headers=admin)
    assert r.status_code == 201


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_createmodel_rejects_unstorable_json(client, admin, session, value):
    raw = f'{{"id": "m2", "name": "m", "description": "d", "handlers": {HANDLERS}, "metadata": {{"x": {value}}}}}'
    assert_400(await post_raw(client, "/v2/models", raw, admin))
    assert await count(session, "models") == 0


async def test_nul_in_a_text_field_is_400(client, admin, session, model):
    raw = f'{{"id": "m2", "name": "a\\u0000b", "description": "d", "handlers": {HANDLERS}}}'
    r = await post_raw(client, "/v2/models", raw, admin)
    assert_400(r)
    assert "name" in r.json()["message"]
    raw = f'{{"name": "m", "description": "\\u0000", "handlers": {HANDLERS}}}'
    assert_400(await post_raw(client, "/v2/models/m", raw, admin, method="PUT"))
    assert_400(await post_raw(client, "/v2/models/m/new_version", '{"description": "x\\u0000"}', admin))
    assert await count(session, "model_versions") == 1


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_inference_and_subscriptions_reject_unstorable_input(client, admin, session, model, value):
    r = await post_raw(client, "/v2/models/m/versions/1/inference", f'{{"input": {{"a": {value}}}}}', admin)
    assert_400(r)
    assert "input" in r.json()["message"]
    raw = (
        '{"trigger_event": "training_complete", "target_model_id": "m", "target_action": "inference", '
        f'"input_source": "stored", "input": {{"a": {value}}}}}'
    )
    assert_400(await post_raw(client, "/v2/models/m/event-subscriptions", raw, admin))
    assert await count(session, "jobs") == 0
    assert await count(session, "event_subscriptions") == 0


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_completion_rejects_unstorable_output_and_leaves_the_job_open(client, admin, session, model, value):
    job = await create_job(session, job_type="inference", model_id="m", model_version="1")
    await session.commit()
    url = f"/v2/models/m/versions/1/jobs/{job.job_id}/complete"
    assert_400(await post_raw(client, url, f'{{"status": "success", "output": {{"a": {value}}}}}', admin))
    assert_400(await post_raw(client, url, f'{{"status": "failure", "error": {value}}}', admin))
    r = await client.get(f"/v2/jobs/{job.job_id}", headers=admin)
    assert r.json()["status"] == "pending"
    # the handler can still report a storable result
    r = await client.post(url, json={"status": "success", "output": {"a": 1}}, headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "success"


async def test_storable_edge_values_are_kept(client, admin, session, model):
    """Valid JSON that only looks unusual is stored as sent: escaped characters, paired
    surrogates (an emoji), big integers and tiny floats."""
    value = {"tab": "a\tb", "emoji": "\U0001f6a2", "big": 10**30, "tiny": 1e-300, "unicode": "Adélaïde"}
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": value}, headers=admin)
    assert r.status_code == 202, r.text
    job = (await client.get(f"/v2/jobs/{r.json()['inference_job_id']}", headers=admin)).json()
    assert job["input"] == value
