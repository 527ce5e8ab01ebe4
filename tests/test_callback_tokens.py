"""Per-job callback credentials (spec 14.5): the payload's ``callback_token`` completes its own
job and nothing else; it expires; retiring its signing key revokes it; a rotation does not
break jobs in flight; ``pie keys`` manages the keys."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import clean_subprocess_env, pie_command
from jose import jwt
from sqlalchemy import select, text

from pie import callbacks, db
from pie.auth import signing_keys
from pie.dispatch.dispatcher import dispatch_until_idle
from pie.dispatch.inprocess import register
from pie.jobs.logic import create_job
from pie.jobs.payload import callback_token_ttl
from pie.tables.clients import Client
from pie.tables.jobs import Job
from pie.tables.registry import Model, ModelVersion

SEEN: list[dict] = []


@register("test_token_capture")
def _capture(payload):
    SEEN.append(payload)
    raise RuntimeError("captured")  # the job ends; the test only wants the payload


async def seed(session, model_id="cb", handler=None):
    handler = handler or {"type": "ecs_task", "value": "cluster/task", "timeout_seconds": 600}
    hs = {"inference": handler, "training": handler}
    session.add(Model(id=model_id, name=model_id, handlers=hs, status="active"))
    await session.flush()
    session.add(ModelVersion(model_id=model_id, version="1", status="active", handlers=hs))
    await session.commit()


async def started_job(session, settings, model_id="cb", client_id=None, *, key=None, now=None):
    """A job as a dispatcher leaves it (started) and the token the dispatcher signs for it."""
    job = await create_job(
        session, job_type="inference", model_id=model_id, model_version="1", input={"x": 1}, client_id=client_id
    )
    await session.execute(
        text("UPDATE jobs SET status = 'started', attempts = 1, started_at = now() WHERE job_id = :j"),
        {"j": job.job_id},
    )
    await session.commit()
    handler = (await session.get(ModelVersion, (model_id, "1"))).handlers["inference"]
    if key is None:
        key = await signing_key_now(settings)
    return job, callbacks.mint(key, job, callback_token_ttl(settings, handler), now=now)


async def signing_key_now(settings) -> signing_keys.Key:
    """The key a dispatch would sign with now (created when there is none)."""
    conn = await db.connect(settings, autocommit=True)
    try:
        async with conn.transaction():
            return await signing_keys.signing_key(conn)
    finally:
        await conn.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def complete_url(job, model_id="cb"):
    return f"/v2/models/{model_id}/versions/1/jobs/{job.job_id}/complete"


async def status_of(session, job_id):
    return await session.scalar(
        select(Job.status).where(Job.job_id == job_id).execution_options(populate_existing=True)
    )


async def test_dispatched_payload_carries_a_token_bound_to_the_job(session, settings):
    await seed(session, "cap", {"type": "in_process", "value": "test_token_capture", "timeout_seconds": 120})
    SEEN.clear()
    job = await create_job(session, job_type="inference", model_id="cap", model_version="1")
    await session.commit()
    before = int(time.time())
    await dispatch_until_idle(settings)
    (payload,) = SEEN
    claims = jwt.get_unverified_claims(payload["callback_token"])
    assert claims["job_id"] == job.job_id and claims["model_id"] == "cap" and claims["model_version"] == "1"
    # expires after the handler's time-out plus the margin
    assert claims["exp"] - claims["iat"] == 120 + int(settings.callback_token_margin_seconds)
    assert before <= claims["iat"] <= int(time.time())
    assert jwt.get_unverified_header(payload["callback_token"])["kid"] == (
        await session.scalar(text("SELECT kid FROM signing_keys"))
    )


async def test_token_completes_its_own_job_only(client, session, settings, auth):
    await seed(session)
    job_a, token_a = await started_job(session, settings)
    job_b, _ = await started_job(session, settings)

    # another job: 403, nothing changes
    r = await client.post(complete_url(job_b), json={"status": "success", "output": {"p": 1}}, headers=bearer(token_a))
    assert r.status_code == 403 and r.json()["success"] is False and job_a.job_id in r.json()["message"]
    assert await status_of(session, job_b.job_id) == "started"
    # same job id under another model path: 403 too
    r = await client.post(
        f"/v2/models/other/versions/1/jobs/{job_a.job_id}/complete", json={"status": "success"}, headers=bearer(token_a)
    )
    assert r.status_code == 403

    # any other route: 401 (not a caller token)
    for method, path in [("GET", f"/v2/jobs/{job_a.job_id}"), ("GET", "/v2/models"), ("GET", "/v2/jobs")]:
        r = await client.request(method, path, headers=bearer(token_a))
        assert r.status_code == 401, (path, r.text)

    # its own job: 200, the output is kept
    r = await client.post(complete_url(job_a), json={"status": "success", "output": {"p": 1}}, headers=bearer(token_a))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success"
    assert await status_of(session, job_a.job_id) == "success"
    # a repeat is the documented no-op; the other status is 409
    assert (
        await client.post(complete_url(job_a), json={"status": "success", "output": {"p": 1}}, headers=bearer(token_a))
    ).status_code == 200
    assert (
        await client.post(complete_url(job_a), json={"status": "failure"}, headers=bearer(token_a))
    ).status_code == 409

    # regular tokens with complete_jobs keep working; without it they are 403
    r = await client.post(complete_url(job_b), json={"status": "failure"}, headers=auth(scopes=["read_models"]))
    assert r.status_code == 403
    r = await client.post(complete_url(job_b), json={"status": "failure"}, headers=auth(scopes=["complete_jobs"]))
    assert r.status_code == 200 and await status_of(session, job_b.job_id) == "failure"


async def test_token_of_a_tenant_job_needs_no_tenant_access(client, session, settings):
    await seed(session)
    session.add(Client(client_id="sealink", name="SeaLink"))
    await session.commit()
    job, token = await started_job(session, settings, client_id="sealink")
    r = await client.post(complete_url(job), json={"status": "success", "output": 1}, headers=bearer(token))
    assert r.status_code == 200, r.text


async def test_expired_or_forged_token_is_401(client, session, settings):
    await seed(session)
    ttl = 600 + settings.callback_token_margin_seconds
    job, expired = await started_job(session, settings, now=time.time() - ttl - 5)
    r = await client.post(complete_url(job), json={"status": "success"}, headers=bearer(expired))
    assert (
        r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "expired" in r.json()["message"].lower()
    )

    _, good = await started_job(session, settings)
    head, body, sig = good.split(".")
    forged_claims = dict(jwt.get_unverified_claims(good), job_id=job.job_id)
    forged = jwt.encode(forged_claims, "not-the-key", algorithm="HS256", headers=jwt.get_unverified_header(good))
    for bad in (f"{head}.{body}.{sig[::-1]}", forged):
        r = await client.post(complete_url(job), json={"status": "success"}, headers=bearer(bad))
        assert r.status_code == 401, r.text
    # an unknown key id
    unknown = callbacks.mint(signing_keys.new_key(), job, 60)
    assert (
        await client.post(complete_url(job), json={"status": "success"}, headers=bearer(unknown))
    ).status_code == 401
    assert await status_of(session, job.job_id) == "started"


async def test_rotation_keeps_jobs_in_flight_and_retirement_revokes(client, session, settings):
    await seed(session)
    job_old, token_old = await started_job(session, settings)
    old_kid = jwt.get_unverified_header(token_old)["kid"]

    async with db.sessionmaker()() as s, s.begin():
        new = await signing_keys.rotate(s)
    # from now on dispatches sign with the new key ...
    job_new, token_new = await started_job(session, settings)
    assert jwt.get_unverified_header(token_new)["kid"] == new.kid != old_kid
    # ... and the job dispatched before the rotation still completes
    r = await client.post(complete_url(job_old), json={"status": "success", "output": "old"}, headers=bearer(token_old))
    assert r.status_code == 200, r.text

    job_late, token_late = await started_job(
        session, settings, key=signing_keys.Key(old_kid, (await session.get(signing_keys.SigningKey, old_kid)).secret)
    )
    # the key that signs cannot be retired by mistake
    async with db.sessionmaker()() as s, s.begin():
        with pytest.raises(ValueError):
            await signing_keys.retire(s, new.kid)
        await signing_keys.retire(s, old_kid)
    r = await client.post(complete_url(job_late), json={"status": "success"}, headers=bearer(token_late))
    assert r.status_code == 401 and "retired" in r.json()["message"]
    assert await status_of(session, job_late.job_id) == "started"
    r = await client.post(complete_url(job_new), json={"status": "success"}, headers=bearer(token_new))
    assert r.status_code == 200


def test_pie_keys_cli(database_url, tmp_path):
    import psycopg

    env = clean_subprocess_env(PIE_DATABASE_URL=database_url, PIE_DATA_DIR=str(tmp_path))

    def pie(*args):
        return subprocess.run(
            [*pie_command(), "keys", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    old = signing_keys.new_key()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO signing_keys (kid, secret, created_at) VALUES (%s, %s, now() - interval '1 day')",
            (old.kid, old.secret),
        )
    rotated = pie("rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split()[3].rstrip(":")
    refused = pie("retire", new_kid)  # the signing key: refused without --force
    assert refused.returncode == 2 and "pie keys rotate" in refused.stderr
    assert pie("retire", old.kid).returncode == 0
    listed = {line.split()[0]: line for line in pie("list").stdout.splitlines()}
    assert "retired" in listed[old.kid] and listed[new_kid].endswith("active, signing")
    with psycopg.connect(database_url) as conn:  # leave no keys behind for other tests
        conn.execute("DELETE FROM signing_keys WHERE kid = ANY(%s)", ([old.kid, new_kid],))


async def test_a_retirement_waits_for_a_claim_signing_with_the_key_and_later_claims_skip_it(engine, settings):
    """Spec 15.5: the claim transaction share-locks the key it signs with; ``retire`` (even of
    the newest key, forced) waits for it, and a claim after the retirement signs with another key."""
    import asyncio

    key = await signing_key_now(settings)
    claim = await db.connect(settings, autocommit=True)
    watcher = await db.connect(settings, autocommit=True)
    try:
        async with claim.transaction():
            assert await signing_keys.signing_key(claim) == key

            async def retire():
                async with db.sessionmaker()() as s, s.begin():
                    await signing_keys.retire(s, key.kid, force=True)

            task = asyncio.ensure_future(retire())
            for _ in range(600):  # until the retirement waits for the claim's lock (30 s at most)
                waiting = await (
                    await watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock'"
                    )
                ).fetchone()
                if waiting[0] or task.done():
                    break
                await asyncio.sleep(0.05)
            assert not task.done() and waiting[0] == 1
        await asyncio.wait_for(task, timeout=30)
        async with claim.transaction():
            assert (await signing_keys.signing_key(claim)).kid != key.kid
    finally:
        await claim.close()
        await watcher.close()
