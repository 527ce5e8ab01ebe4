"""Webhooks (issue #22, spec 15.6) against a real HTTP receiver on loopback: signatures verified
with the ``standardwebhooks`` package, tenant scoping, retries with the same ``webhook-id``, 410,
secret rotation, the outbox written in the change's transaction, SSRF refusals."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from factories import init_service, make_client, tenant_setup
from sqlalchemy import event, select, text
from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks import WebhookVerificationError
from webhook_receiver import Receiver

from pie import db
from pie.dispatch.dispatcher import dispatch_until_idle
from pie.jobs.logic import Completion, create_job, finish_jobs
from pie.tables.webhooks import WebhookDelivery, WebhookEvent
from pie.webhooks.delivery import Deliverer

A, B = "tenant-a", "tenant-b"
ROUTE = {"route": "Adelaide to Sydney"}
JOB_EVENTS = ["job.failed", "job.succeeded", "service.available", "service.failed"]


@pytest.fixture
def dev(settings, monkeypatch):
    """The development switches on (receivers on loopback over http)."""
    monkeypatch.setattr(settings, "webhooks_allow_http", True)
    monkeypatch.setattr(settings, "webhooks_allow_private", True)
    return settings


@pytest.fixture
def receiver() -> Any:
    with Receiver() as r:
        yield r


@contextlib.asynccontextmanager
async def delivering(settings: Any, **overrides: Any) -> AsyncIterator[Deliverer]:
    """The delivery loop of this process, with fast retries."""
    fast = {"webhooks_backoff_base": 0.1, "webhooks_backoff_max": 0.3, "webhooks_poll_interval": 0.1, **overrides}
    deliverer = Deliverer(settings.model_copy(update=fast), name="test")
    await deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.stop(grace=2.0)


async def eventually(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


async def create_webhook(client, headers, url, events, client_id: str | None = A, expect: int = 201) -> dict[str, Any]:
    prefix = f"/v2/clients/{client_id}/webhooks" if client_id else "/v2/webhooks"
    r = await client.post(prefix, json={"url": url, "events": events}, headers=headers)
    assert r.status_code == expect, r.text
    return r.json()


def verified(secret: str, request: Any) -> dict[str, Any]:
    """The body, after the standardwebhooks library verified the signature."""
    return StandardWebhook(secret).verify(request.body, request.headers)


async def deliveries(client, headers, webhook_id, client_id: str | None = A) -> list[dict[str, Any]]:
    prefix = f"/v2/clients/{client_id}/webhooks" if client_id else "/v2/webhooks"
    r = await client.get(f"{prefix}/{webhook_id}/deliveries", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


# -- the contract ---------------------------------------------------------------------------------


async def test_a_job_that_succeeds_is_pushed_signed_to_the_tenant_receiver(client, session, admin, dev, receiver):
    await tenant_setup(client, session, admin, client_id=A)
    hook = await create_webhook(client, admin, receiver.url("/a"), JOB_EVENTS)
    assert hook["secret"].startswith("whsec_") and hook["status"] == "active" and hook["client_id"] == A
    job_id = (await init_service(client, admin, "svc-1", ROUTE, client_id=A)).json()["job_id"]
    await dispatch_until_idle(dev)
    async with delivering(dev):
        await eventually(lambda: len(receiver.on("/a")) >= 2)
        await eventually(lambda: _delivered(client, admin, hook["id"]))
    by_type = {}
    for request in receiver.on("/a"):
        body = verified(hook["secret"], request)  # raises unless the signature verifies
        by_type[body["type"]] = (body, request)
    assert set(by_type) == {"job.succeeded", "service.available"}
    job, request = by_type["job.succeeded"]
    assert job["data"]["job_id"] == job_id and job["data"]["status"] == "success"
    assert "input" not in job["data"] and job["data"]["output"]["recommended_price"] is not None
    assert job["timestamp"].endswith("Z") and request.headers["content-type"] == "application/json"
    service, _ = by_type["service.available"]
    assert service["data"]["service_id"] == "svc-1" and service["data"]["job_id"] == job_id
    assert service["data"]["status"] == "available"
    # a tampered body does not verify
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(hook["secret"]).verify(request.body + b" ", request.headers)
    # the delivery log: the event id is the webhook-id the receiver saw
    log = await deliveries(client, admin, hook["id"])
    assert {d["event_id"] for d in log} == {r.headers["webhook-id"] for r in receiver.on("/a")}
    assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["last_status_code"] == 200 for d in log)
    assert [d["id"] for d in log] == sorted((d["id"] for d in log), reverse=True)  # newest first


async def test_the_secret_is_shown_once_and_never_logged(client, session, admin, dev, receiver, caplog):
    await make_client(session, A)
    hook = await create_webhook(client, admin, receiver.url(), ["job.succeeded"])
    secret = hook["secret"]
    listed = (await client.get(f"/v2/clients/{A}/webhooks", headers=admin)).json()
    got = (await client.get(f"/v2/clients/{A}/webhooks/{hook['id']}", headers=admin)).json()
    patched = await client.patch(f"/v2/clients/{A}/webhooks/{hook['id']}", json={"description": "d"}, headers=admin)
    for body in (listed, got, patched.json()):
        assert secret not in json.dumps(body) and "secret" not in json.dumps(body).replace("previous_secret", "")
    audit = (await client.get("/v2/audit?target_type=webhook", headers=admin)).json()
    assert [a["action"] for a in audit] == ["updatewebhook", "createwebhook"]
    assert all(a["target_id"] == hook["id"] for a in audit) and secret not in json.dumps(audit)
    r = await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/rotate_secret", headers=admin)
    assert r.status_code == 200 and r.json()["secret"].startswith("whsec_") and r.json()["secret"] != secret
    assert secret not in caplog.text and r.json()["secret"] not in caplog.text


async def test_tenant_scoping(client, session, admin, auth, dev, receiver):
    await tenant_setup(client, session, admin, client_id=A)
    await make_client(session, B)
    await client.post(f"/v2/clients/{B}/domains", json={"domain_id": "south_australia", "features": []}, headers=admin)
    from factories import assign

    await assign(client, admin, B)
    hook_a = await create_webhook(client, admin, receiver.url("/a"), JOB_EVENTS)
    hook_b = await create_webhook(client, admin, receiver.url("/b"), JOB_EVENTS, client_id=B)
    platform = await create_webhook(
        client, admin, receiver.url("/platform"), [*JOB_EVENTS, "version.status_changed"], client_id=None
    )
    # a tenant cannot subscribe to registry events; tenant B cannot see or touch A's webhook
    r = await client.post(
        f"/v2/clients/{A}/webhooks", json={"url": receiver.url(), "events": ["version.status_changed"]}, headers=admin
    )
    assert r.status_code == 422 and "platform webhooks" in r.json()["message"]
    b_user = auth(username="bob", groups=[f"client:{B}"])
    assert (await client.get(f"/v2/clients/{A}/webhooks", headers=b_user)).status_code == 403
    assert (await client.get(f"/v2/clients/{B}/webhooks/{hook_a['id']}", headers=b_user)).status_code == 404
    assert [w["id"] for w in (await client.get(f"/v2/clients/{B}/webhooks", headers=b_user)).json()] == [hook_b["id"]]
    assert (await client.get("/v2/webhooks", headers=b_user)).status_code == 403
    assert [w["id"] for w in (await client.get("/v2/webhooks", headers=admin)).json()] == [platform["id"]]
    assert (await client.get(f"/v2/webhooks/{hook_a['id']}", headers=admin)).status_code == 404

    job_a = (await init_service(client, admin, "svc-a", ROUTE, client_id=A)).json()["job_id"]
    job_b = (await init_service(client, admin, "svc-b", {}, client_id=B)).json()["job_id"]
    r = await client.post("/v2/models/pricing-model/new_version", json={}, headers=admin)
    r = await client.post("/v2/models/pricing-model/versions/2/new_status", json={"status": "training"}, headers=admin)
    assert r.status_code == 200, r.text
    await dispatch_until_idle(dev)
    async with delivering(dev):
        await eventually(lambda: len(receiver.on("/a")) == 2 and len(receiver.on("/b")) == 2)
        await eventually(lambda: len(receiver.on("/platform")) == 5)

    def jobs_seen(path: str, secret: str) -> set[str]:
        return {
            body["data"]["job_id"]
            for body in (verified(secret, r) for r in receiver.on(path))
            if body["type"].startswith("job.")
        }

    assert jobs_seen("/a", hook_a["secret"]) == {job_a}
    assert jobs_seen("/b", hook_b["secret"]) == {job_b}
    assert jobs_seen("/platform", platform["secret"]) == {job_a, job_b}
    versions = [verified(platform["secret"], r) for r in receiver.on("/platform")]
    changed = [v for v in versions if v["type"] == "version.status_changed"]
    assert [(c["data"]["version"], c["data"]["previous_status"], c["data"]["status"]) for c in changed] == [
        ("2", "pending", "training")
    ]


async def test_a_500_is_retried_with_the_same_webhook_id(client, session, admin, dev, receiver):
    await tenant_setup(client, session, admin, client_id=A)
    hook = await create_webhook(client, admin, receiver.url("/flaky"), ["job.succeeded"])
    receiver.plan("/flaky", (500, b"boom"), 503)
    await init_service(client, admin, "svc-1", ROUTE, client_id=A)
    await dispatch_until_idle(dev)
    async with delivering(dev):
        await eventually(lambda: len(receiver.on("/flaky")) == 3)
        await eventually(lambda: _delivered(client, admin, hook["id"]))
    seen = receiver.on("/flaky")
    assert len({r.headers["webhook-id"] for r in seen}) == 1  # one event, the same id on every attempt
    assert all(verified(hook["secret"], r)["type"] == "job.succeeded" for r in seen)
    assert len({r.body for r in seen}) == 1  # and the same body
    (log,) = await deliveries(client, admin, hook["id"])
    assert log["attempts"] == 3 and log["status"] == "delivered" and log["last_status_code"] == 200


async def _delivered(client, admin, webhook_id, client_id: str | None = A) -> bool:
    log = await deliveries(client, admin, webhook_id, client_id)
    return bool(log) and all(d["status"] == "delivered" for d in log)


async def test_failed_attempts_are_logged_and_given_up_after_the_retry_window(client, session, admin, dev, receiver):
    await tenant_setup(client, session, admin, client_id=A)
    hook = await create_webhook(client, admin, receiver.url("/down"), ["job.succeeded"])
    receiver.plan("/down", *[(500, b"x" * 5000)] * 50)
    await init_service(client, admin, "svc-1", ROUTE, client_id=A)
    await dispatch_until_idle(dev)
    async with delivering(dev, webhooks_retry_hours=2 / 3600):  # a 2-second window
        await eventually(lambda: _status_is(client, admin, hook["id"], "failed"))
    (log,) = await deliveries(client, admin, hook["id"])
    assert log["attempts"] >= 2 and log["last_status_code"] == 500 and log["last_error"] == "the receiver answered 500"
    assert log["last_response"] == "x" * 1024 and log["next_attempt_at"] is None  # at most 1 KiB kept


async def _status_is(client, admin, webhook_id, status: str, client_id: str | None = A) -> bool:
    log = await deliveries(client, admin, webhook_id, client_id)
    return bool(log) and all(d["status"] == status for d in log)


async def test_410_disables_the_webhook(client, session, admin, dev, receiver):
    await tenant_setup(client, session, admin, client_id=A)
    hook = await create_webhook(client, admin, receiver.url("/gone"), ["job.succeeded"])
    receiver.plan("/gone", 410)
    await init_service(client, admin, "svc-1", ROUTE, client_id=A)
    await dispatch_until_idle(dev)
    async with delivering(dev):
        await eventually(lambda: _status_is(client, admin, hook["id"], "failed"))
        got = (await client.get(f"/v2/clients/{A}/webhooks/{hook['id']}", headers=admin)).json()
        assert got["status"] == "disabled" and "410" in got["disabled_reason"]
        # later events are not queued for it, and it cannot be tested
        await init_service(client, admin, "svc-2", ROUTE, client_id=A)
        await dispatch_until_idle(dev)
        assert len(await deliveries(client, admin, hook["id"])) == 1
        r = await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
        assert r.status_code == 422
        # re-enabled: a ping goes out
        r = await client.patch(f"/v2/clients/{A}/webhooks/{hook['id']}", json={"status": "active"}, headers=admin)
        assert r.status_code == 200 and r.json()["status"] == "active" and r.json()["disabled_reason"] is None
        r = await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
        assert r.status_code == 202 and r.json()["type"] == "ping"
        await eventually(lambda: len(receiver.on("/gone")) == 2)
    ping = verified(hook["secret"], receiver.on("/gone")[1])
    assert ping["type"] == "ping" and ping["data"]["webhook_id"] == hook["id"]
    assert receiver.on("/gone")[1].headers["webhook-id"] == r.json()["event_id"]


async def test_rotation_signs_with_both_secrets_for_the_overlap(client, session, admin, dev, receiver):
    await make_client(session, A)
    hook = await create_webhook(client, admin, receiver.url("/rot"), ["job.succeeded"])
    r = await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/rotate_secret", headers=admin)
    new = r.json()["secret"]
    got = (await client.get(f"/v2/clients/{A}/webhooks/{hook['id']}", headers=admin)).json()
    assert got["previous_secret_expires_at"] == r.json()["previous_secret_expires_at"]
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    async with delivering(dev):
        await eventually(lambda: receiver.on("/rot"))
    (request,) = receiver.on("/rot")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verified(hook["secret"], request)["type"] == "ping" and verified(new, request)["type"] == "ping"
    # after the overlap only the new secret signs
    async with db.get_engine().begin() as conn:
        await conn.execute(text("UPDATE webhooks SET previous_secret_expires_at = now() - interval '1 second'"))
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    async with delivering(dev):
        await eventually(lambda: len(receiver.on("/rot")) == 2)
    later = receiver.on("/rot")[1]
    assert verified(new, later)["type"] == "ping"
    with pytest.raises(WebhookVerificationError):
        verified(hook["secret"], later)


async def test_assignment_changes_and_large_outputs(client, session, admin, dev, receiver):
    await tenant_setup(client, session, admin, client_id=A)
    hook = await create_webhook(client, admin, receiver.url("/x"), ["assignment.changed", "job.succeeded"])
    from factories import assign

    revision = (await assign(client, admin, A, key="forecast")).json()
    job = await _job(session, client_id=A)
    big = {"blob": "y" * (70 * 1024)}
    async with db.sessionmaker()() as s, s.begin():
        await finish_jobs(s, [Completion(job, "success", output=big)])
    async with delivering(dev):
        await eventually(lambda: len(receiver.on("/x")) == 2)
    bodies = {b["type"]: b for b in (verified(hook["secret"], r) for r in receiver.on("/x"))}
    changed = bodies["assignment.changed"]["data"]
    assert changed["assignment_id"] == revision["assignment_id"] and changed["assignment_key"] == "forecast"
    assert changed["status"] == "active" and changed["model_version"] == "1"
    done = bodies["job.succeeded"]["data"]
    assert done["job_id"] == job and "output" not in done and done["output_omitted"] is True


async def _job(session, client_id: str | None) -> str:
    async with db.sessionmaker()() as s, s.begin():
        job = await create_job(
            s, job_type="inference", model_id="pricing-model", model_version="1", client_id=client_id
        )
    return job.job_id


async def test_the_outbox_is_written_in_the_transaction_of_the_change_and_set_based(client, session, admin, dev):
    await tenant_setup(client, session, admin, client_id=A)
    await create_webhook(client, admin, "http://127.0.0.1:9/x", JOB_EVENTS)
    ids = [await _job(session, A) for _ in range(30)]
    # rolled back: no event
    async with db.sessionmaker()() as s:
        await s.begin()
        await finish_jobs(s, [Completion(i, "success", output={}) for i in ids])
        await s.rollback()
    async with db.sessionmaker()() as s:
        assert (await s.scalar(select(text("count(*)")).select_from(WebhookEvent))) == 0
    # committed: one event per job, written by ONE statement for the whole batch
    statements: list[str] = []

    def count(conn, cursor, statement, *args: Any) -> None:
        if "webhook_events" in statement:
            statements.append(statement)

    engine = db.get_engine().sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        async with db.sessionmaker()() as s, s.begin():
            await finish_jobs(
                s, [Completion(i, "success" if n % 2 else "failure", output={}) for n, i in enumerate(ids)]
            )
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == 1
    async with db.sessionmaker()() as s:
        events = (await s.scalars(select(WebhookEvent))).all()
        assert sorted(e.data["job_id"] for e in events) == sorted(ids)
        assert {e.type for e in events} == {"job.succeeded", "job.failed"}
        assert (await s.scalar(select(text("count(*)")).select_from(WebhookDelivery))) == 30


async def test_no_webhook_no_rows(client, session, admin):
    await tenant_setup(client, session, admin, client_id=A)
    job = await _job(session, A)
    async with db.sessionmaker()() as s, s.begin():
        await finish_jobs(s, [Completion(job, "success", output={})])
    async with db.sessionmaker()() as s:
        assert (await s.scalar(select(text("count(*)")).select_from(WebhookEvent))) == 0


# -- safety -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://93.184.216.34/hook", "must use https"),
        ("ftp://93.184.216.34/hook", "https"),
        ("hook.example.com/path", "https"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://localhost:8443/hook", "localhost resolves to 127.0.0.1"),  # a name resolving to loopback
        ("https://[::1]/hook", "loopback"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
        ("https://10.1.2.3/hook", "private"),
        ("https://192.168.0.10/hook", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://0.0.0.0/hook", "unspecified"),
        ("https://user:pw@93.184.216.34/hook", "credentials"),
        ("https://no-such-host.invalid/hook", "does not resolve"),
    ],
)
async def test_unsafe_urls_are_refused_at_creation(client, session, admin, url, reason):
    await make_client(session, A)
    r = await client.post(f"/v2/clients/{A}/webhooks", json={"url": url, "events": ["job.failed"]}, headers=admin)
    assert r.status_code == 422, r.text
    assert reason in r.json()["message"]
    hook = await create_webhook(client, admin, "https://93.184.216.34/hook", ["job.failed"])
    r = await client.patch(f"/v2/clients/{A}/webhooks/{hook['id']}", json={"url": url}, headers=admin)
    assert r.status_code == 422 and reason in r.json()["message"]


async def test_a_name_that_turns_private_is_not_sent_to_at_delivery(client, session, admin, dev, receiver, monkeypatch):
    """DNS rebinding: the address is checked at every connection, not only at creation."""
    await make_client(session, A)
    hook = await create_webhook(client, admin, receiver.url("/rebind", host="localhost"), ["job.succeeded"])
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    monkeypatch.setattr(dev, "webhooks_allow_private", False)
    async with delivering(dev):
        await eventually(lambda: _attempted(client, admin, hook["id"]))
    (log,) = await deliveries(client, admin, hook["id"])
    assert receiver.on("/rebind") == []
    assert log["status"] == "pending" and log["last_status_code"] is None
    assert "localhost resolves to 127.0.0.1" in log["last_error"] and log["last_error"].startswith("not sent")


async def _attempted(client, admin, webhook_id) -> bool:
    log = await deliveries(client, admin, webhook_id)
    return bool(log) and log[0]["attempts"] >= 1 and log[0]["last_error"] is not None


async def test_bad_bodies_are_400(client, session, admin):
    await make_client(session, A)
    for body in (
        {"url": "https://93.184.216.34/"},
        {"url": "https://93.184.216.34/", "events": []},
        {"url": "https://93.184.216.34/", "events": ["job.exploded"]},
        {"url": "https://93.184.216.34/", "events": ["job.failed"], "secret": "mine"},
        {"url": "https://93.184.216.34/" + "a" * 3000, "events": ["job.failed"]},
    ):
        r = await client.post(f"/v2/clients/{A}/webhooks", json=body, headers=admin)
        assert r.status_code == 400, (body, r.text)
    assert (await client.get(f"/v2/clients/{A}/webhooks/not-a-uuid", headers=admin)).status_code == 400


async def test_delete_stops_deliveries(client, session, admin, dev, receiver):
    await make_client(session, A)
    hook = await create_webhook(client, admin, receiver.url("/del"), ["job.succeeded"])
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    r = await client.delete(f"/v2/clients/{A}/webhooks/{hook['id']}", headers=admin)
    assert r.status_code == 204
    assert (await client.get(f"/v2/clients/{A}/webhooks/{hook['id']}", headers=admin)).status_code == 404
    async with delivering(dev):
        await asyncio.sleep(0.5)
    assert receiver.on("/del") == []


# -- observability ------------------------------------------------------------------------------


async def test_metrics_and_the_console_page(client, session, admin, dev, receiver, make_token):
    await make_client(session, A)
    hook = await create_webhook(client, admin, receiver.url("/m"), ["job.succeeded"])
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    async with delivering(dev):
        await eventually(lambda: _delivered(client, admin, hook["id"]))
    metrics = (await client.get("/metrics")).text
    assert 'pie_webhook_delivery_attempts_total{outcome="delivered"}' in metrics
    assert "pie_webhook_delivery_duration_seconds_bucket" in metrics
    assert 'pie_webhook_deliveries_ended_total{status="delivered"}' in metrics
    client.cookies.set("pie_console", make_token(admin=True), path="/console")
    page = await client.get(f"/console/clients/{A}/webhooks")
    assert page.status_code == 200
    assert receiver.url("/m") in page.text and "ping" in page.text and hook["secret"] not in page.text
    (log,) = await deliveries(client, admin, hook["id"])
    assert log["event_id"] in page.text


# -- layering ---------------------------------------------------------------------------------


def test_the_webhooks_package_imports_none_of_the_capabilities_that_call_it():
    """pie.webhooks is a lower layer: jobs, assignments and registry call into it, so it must not
    import them (nor what imports them), not even inside functions."""
    root = Path(__file__).resolve().parents[1] / "src" / "pie" / "webhooks"
    forbidden = ("pie.jobs", "pie.assignments", "pie.registry", "pie.tenancy", "pie.dispatch", "pie.console")
    found = []
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.startswith(forbidden)]
    assert found == []


async def test_the_retention_sweep_keeps_what_is_still_pending(client, session, admin, dev, receiver):
    await make_client(session, A)
    hook = await create_webhook(client, admin, receiver.url("/keep"), ["job.succeeded"])
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    async with delivering(dev):
        await eventually(lambda: _delivered(client, admin, hook["id"]))
    (delivered,) = await deliveries(client, admin, hook["id"])
    # a second event stays pending (its webhook is disabled); both are older than the retention
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    await client.patch(f"/v2/clients/{A}/webhooks/{hook['id']}", json={"status": "disabled"}, headers=admin)
    async with db.get_engine().begin() as conn:
        await conn.execute(text("UPDATE webhook_events SET created_at = now() - interval '40 days'"))
    async with delivering(dev):
        await eventually(lambda: _log_ids(client, admin, hook["id"], delivered["id"]))
    (left,) = await deliveries(client, admin, hook["id"])
    assert left["status"] == "pending" and left["id"] != delivered["id"]


async def _log_ids(client, admin, webhook_id, gone_id) -> bool:
    return gone_id not in [d["id"] for d in await deliveries(client, admin, webhook_id)]


async def test_a_graceful_stop_records_the_results_it_holds(client, session, admin, dev, receiver, monkeypatch):
    """Stopping while a result waits to be recorded records it: the delivery is not sent again."""
    import pie.webhooks.delivery as delivery

    monkeypatch.setattr(delivery, "RESULT_LINGER", 1.0)  # the recorder holds the result when stop() comes
    await make_client(session, A)
    hook = await create_webhook(client, admin, receiver.url("/stop"), ["job.succeeded"])
    await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
    async with delivering(dev):
        await eventually(lambda: receiver.on("/stop"))
    (log,) = await deliveries(client, admin, hook["id"])
    assert log["status"] == "delivered" and log["attempts"] == 1
    async with delivering(dev):
        await asyncio.sleep(0.5)
    assert len(receiver.on("/stop")) == 1


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for the name ``localhost`` only (no IP address in it), and its key."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_https_is_verified_for_the_url_host_while_connecting_to_the_checked_address(
    client, session, admin, dev, tmp_path, monkeypatch
):
    """Deliveries connect to the address the safety check resolved, and TLS is still verified
    for the URL's host name: a certificate for `localhost` is accepted at https://localhost
    and refused at https://127.0.0.1."""
    import ssl

    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the receiver's certificate is the trusted root
    monkeypatch.setattr(dev, "webhooks_allow_http", False)
    with Receiver() as receiver:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
        await make_client(session, A)
        by_name = await create_webhook(client, admin, f"https://localhost:{receiver.port}/tls", ["job.succeeded"])
        by_ip = await create_webhook(client, admin, f"https://127.0.0.1:{receiver.port}/ip", ["job.succeeded"])
        for hook in (by_name, by_ip):
            await client.post(f"/v2/clients/{A}/webhooks/{hook['id']}/test", headers=admin)
        async with delivering(dev):
            await eventually(lambda: _delivered(client, admin, by_name["id"]))
            await eventually(lambda: _attempted(client, admin, by_ip["id"]))
    assert verified(by_name["secret"], receiver.on("/tls")[0])["type"] == "ping"
    assert receiver.on("/ip") == []
    (refused,) = await deliveries(client, admin, by_ip["id"])
    assert refused["status"] == "pending" and "certificate" in refused["last_error"].lower()


async def test_a_suspended_client_cannot_change_its_webhooks(client, session, admin):
    await make_client(session, A)
    hook = await create_webhook(client, admin, "https://93.184.216.34/hook", ["job.failed"])
    r = await client.patch(f"/v2/clients/{A}", json={"status": "suspended"}, headers=admin)
    assert r.status_code == 200, r.text
    base = f"/v2/clients/{A}/webhooks"
    for method, url, body in (
        ("POST", base, {"url": "https://93.184.216.34/other", "events": ["job.failed"]}),
        ("PATCH", f"{base}/{hook['id']}", {"description": "x"}),
        ("POST", f"{base}/{hook['id']}/rotate_secret", None),
        ("POST", f"{base}/{hook['id']}/test", None),
        ("DELETE", f"{base}/{hook['id']}", None),
    ):
        r = await client.request(method, url, json=body, headers=admin)
        assert r.status_code == 422 and r.json()["message"] == f"client {A} is suspended", (method, url, r.text)
    assert (await client.get(f"{base}/{hook['id']}", headers=admin)).status_code == 200  # still readable


async def test_a_slow_receiver_does_not_hold_up_the_others(client, session, admin, dev, receiver):
    """At most PIE_WEBHOOKS_ENDPOINT_CONCURRENCY attempts per webhook at once: a slow receiver
    with a backlog leaves the other slots to the other webhooks."""
    await make_client(session, A)
    slow = await create_webhook(client, admin, receiver.url("/slow"), ["job.succeeded"])
    fast = await create_webhook(client, admin, receiver.url("/fast"), ["job.succeeded"])
    receiver.gates["/slow"] = held = threading.Event()  # the slow receiver answers when released
    for _ in range(12):
        await client.post(f"/v2/clients/{A}/webhooks/{slow['id']}/test", headers=admin)
    async with delivering(dev, webhooks_endpoint_concurrency=2, webhooks_concurrency=4):
        try:
            await eventually(lambda: receiver.active["/slow"] == 2)  # the slow webhook's two slots are busy
            await client.post(f"/v2/clients/{A}/webhooks/{fast['id']}/test", headers=admin)
            # delivered while the slow backlog is held: not behind it
            await eventually(lambda: receiver.on("/fast"))
            assert receiver.on("/slow") == [] and receiver.active["/slow"] == 2
        finally:
            held.set()
        await eventually(lambda: len(receiver.on("/slow")) == 12)
    assert receiver.most_active["/slow"] == 2  # never more than the bound at once


async def test_an_older_init_job_ending_after_a_re_init_announces_no_service_status(client, session, admin, dev):
    """The service event follows the service row: an init job superseded by a re-init leaves the
    service ``initializing`` (finish_jobs), so its end announces the job but not the service."""
    await tenant_setup(client, session, admin, client_id=A)
    await create_webhook(client, admin, "http://127.0.0.1:9/x", JOB_EVENTS)
    first = (await init_service(client, admin, "svc-1", ROUTE, client_id=A)).json()["job_id"]
    r = await client.post(f"/v2/clients/{A}/domains/south_australia/services/init", headers=admin)
    assert r.status_code == 202, r.text
    (second,) = [j["job_id"] for j in r.json()["jobs"]]
    async with db.sessionmaker()() as s, s.begin():
        await finish_jobs(s, [Completion(first, "success", output={})])
    r = await client.get(f"/v2/clients/{A}/domains/south_australia/service/svc-1", headers=admin)
    assert r.json()["status"] == "initializing"
    async with db.sessionmaker()() as s:
        types = sorted((e.type, e.data.get("job_id")) for e in (await s.scalars(select(WebhookEvent))).all())
    assert types == [("job.succeeded", first)]
    async with db.sessionmaker()() as s, s.begin():
        await finish_jobs(s, [Completion(second, "failure", error={"code": "x", "message": "y"})])
    async with db.sessionmaker()() as s:
        types = sorted((e.type, e.data.get("job_id")) for e in (await s.scalars(select(WebhookEvent))).all())
    assert types == [("job.failed", second), ("job.succeeded", first), ("service.failed", second)]
