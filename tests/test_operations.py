"""Operations, in process: NOTIFY-driven long-polls (no polling), Prometheus metrics after real
traffic (HTTP calls and in-process jobs through the dispatcher), liveness/readiness."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event
from test_jobs_routes import complete_url, new_job, seed_version

from pie import db
from pie.dispatch.dispatcher import dispatch_until_idle
from pie.jobs.waiting import listener


class StatementCounter:
    """Counts the SQL statements the application's engine sends (every pool connection)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> StatementCounter:
        event.listen(db.get_engine().sync_engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(db.get_engine().sync_engine, "before_cursor_execute", self._on)

    def _on(self, *args: object) -> None:
        self.count += 1


async def _until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_fifty_long_polls_wait_without_a_query_and_answer_when_the_job_ends(client, session, admin, auth):
    await seed_version(session)
    job = await new_job(session)
    with StatementCounter() as statements:
        # the longest wait there is (30 s): an answer well before it was woken by the NOTIFY
        waiters = [asyncio.create_task(client.get(f"/v2/jobs/{job.job_id}?wait=30", headers=admin)) for _ in range(50)]
        await _until(lambda: len(listener.waiters.get(job.job_id, ())) == 50)
        # every waiter has made its one read, then nothing: no periodic query while they wait
        await _until(lambda: statements.count >= 50)
        await asyncio.sleep(0.3)
        settled = statements.count
        await asyncio.sleep(1.5)
        assert statements.count == settled, f"{statements.count - settled} statements while 50 requests waited"
        assert not any(w.done() for w in waiters)

        started = time.monotonic()
        r = await client.post(
            complete_url(job),
            json={"status": "success", "output": {"price": 7}},
            headers=auth(scopes=["complete_jobs"]),
        )
        assert r.status_code == 200, r.text
        answers = await asyncio.gather(*waiters)
        assert time.monotonic() - started < 20  # woken by the NOTIFY, not by their 30 s time-out
    assert [a.status_code for a in answers] == [200] * 50
    assert {a.json()["status"] for a in answers} == {"success"}
    assert {str(a.json()["output"]) for a in answers} == {"{'price': 7}"}
    assert job.job_id not in listener.waiters


async def test_long_poll_returns_when_its_wait_is_up(client, session, admin):
    await seed_version(session)
    job = await new_job(session)
    with StatementCounter() as statements:
        started = time.monotonic()
        r = await client.get(f"/v2/jobs/{job.job_id}?wait=1.5", headers=admin)
        elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.json()["status"] == "pending"
    # it waited (the wait is the behaviour: a lower bound); the upper bound only tells it from
    # a long-poll that ignores its `wait` (the longest is 30 s), not how loaded the machine is
    assert 1.4 <= elapsed < 15
    # one read when it starts, one when its time is up (each: the job, plus its session's
    # statements), nothing in between
    assert statements.count <= 4


async def test_shutdown_answers_every_long_poll_at_once_with_the_job_as_it_is(client, session, admin):
    await seed_version(session)
    job = await new_job(session)
    waiters = [asyncio.create_task(client.get(f"/v2/jobs/{job.job_id}?wait=30", headers=admin)) for _ in range(5)]
    await _until(lambda: len(listener.waiters.get(job.job_id, ())) == 5)
    started = time.monotonic()
    listener.shutdown()
    try:
        answers = await asyncio.gather(*waiters)
        assert time.monotonic() - started < 20  # at the shutdown, not at their 30 s time-out
        assert [a.status_code for a in answers] == [200] * 5
        assert {a.json()["status"] for a in answers} == {"pending"}
    finally:
        listener.reset()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _scrape(client) -> dict:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return _samples(r.text)


async def test_metrics_after_http_traffic_and_in_process_jobs(client, session, admin, settings):
    await seed_version(session)
    before = await _scrape(client)
    jobs = [await new_job(session) for _ in range(3)]
    for job in jobs:
        assert (await client.get(f"/v2/jobs/{job.job_id}", headers=admin)).status_code == 200
    assert (await client.get("/v2/jobs/0192f1c4-0000-7000-8000-000000000000", headers=admin)).status_code == 404
    assert (await client.get("/no/such/route/123")).status_code == 404
    assert (await client.get("/v2/openapi.json")).status_code == 200

    queued = await _scrape(client)
    assert _value(queued, "pie_jobs_queue_depth", status="pending", job_type="inference") == 3
    assert _value(queued, "pie_jobs_oldest_age_seconds", status="pending", job_type="inference") >= 0

    await dispatch_until_idle(settings, timeout=20)
    after = await _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    route = "/v2/jobs/{job_id}"
    assert delta("pie_http_requests_total", route=route, method="GET", status="200") == 3
    assert delta("pie_http_requests_total", route=route, method="GET", status="404") == 1
    # unmatched paths never become labels of their own
    assert delta("pie_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert not any("/no/such" in str(key) for key in after)
    assert delta("pie_http_requests_total", route="/v2/openapi.json", method="GET", status="200") == 1
    assert delta("pie_http_request_duration_seconds_count", route=route, method="GET") == 4
    assert delta("pie_jobs_created_total", job_type="inference") == 3
    assert delta("pie_jobs_ended_total", job_type="inference", handler_type="in_process", status="success") == 3
    assert delta("pie_dispatch_attempts_total", backend="in_process") == 3
    assert delta("pie_job_queue_seconds_count", job_type="inference") == 3
    assert delta("pie_job_end_seconds_count", job_type="inference", status="success") == 3
    assert _value(after, "pie_jobs_queue_depth", status="pending", job_type="inference") == 0
    assert _value(after, "pie_jobs_queue_depth", status="started", job_type="inference") == 0


async def test_a_failing_dispatch_and_a_rolled_back_job_count_as_they_should(client, session, admin, settings):
    bad = {"inference": {"type": "in_process", "value": "no_such_implementation"}}
    await seed_version(session, "m9", "1", handlers=bad)
    before = await _scrape(client)
    # a job created in a transaction that rolls back was never created
    from pie.jobs.logic import create_job

    await create_job(session, job_type="inference", model_id="m9", model_version="1")
    await session.rollback()
    await new_job(session, model_id="m9", model_version="1")
    await dispatch_until_idle(settings, timeout=20)
    after = await _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("pie_jobs_created_total", job_type="inference") == 1
    assert delta("pie_dispatch_failures_total", backend="in_process", retryable="false") == 1
    assert delta("pie_jobs_ended_total", job_type="inference", handler_type="in_process", status="failure") == 1


async def test_liveness_and_readiness_on_a_migrated_database(client, engine):
    r = await client.get("/v2/health/live")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/v2/health/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["database"] == "ok"
    assert body["schema_revision"] == body["expected_revision"]
    # the documented health route is unchanged
    assert (await client.get("/v2/health")).json() == {"status": "ok", "database": "ok"}


async def test_tracing_hook_makes_a_span_per_request_with_its_route_and_request_id(engine, settings):
    import httpx
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from pie.app import create_app

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the operator's provider: PIE uses it as it is
    traced = create_app(settings.model_copy(update={"otel_enabled": True}))
    transport = httpx.ASGITransport(app=traced)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert (await http.get("/v2/health", headers={"X-Request-ID": "trace-me-1"})).status_code == 200
        assert (await http.get("/v2/health/live")).status_code == 200  # probes are not traced
    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["GET /v2/health"]
    assert servers[0].attributes["pie.request_id"] == "trace-me-1"
    assert servers[0].attributes["http.route"] == "/v2/health"
