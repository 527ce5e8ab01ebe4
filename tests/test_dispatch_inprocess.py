"""The dispatcher with in-process handlers: payload, outcomes, service init, chained
subscriptions, LISTEN/NOTIFY wake-up, lease renewal and recovery, time-outs, graceful stop."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from factories import until
from sqlalchemy import select, text

from pie.dispatch.dispatcher import Dispatcher, dispatch_until_idle
from pie.dispatch.inprocess import HandlerFailure, register
from pie.jobs.channels import CANCEL_CHANNEL
from pie.jobs.logic import create_job
from pie.tables.clients import Client
from pie.tables.jobs import Job
from pie.tables.registry import EventSubscription, Model, ModelVersion
from pie.tables.tenancy import Domain, Service


def handlers(inference: str = "echo", training: str = "echo") -> dict[str, Any]:
    return {
        "training": {"type": "in_process", "value": training},
        "inference": {"type": "in_process", "value": inference},
    }


async def seed_version(session, model_id="m1", version="1", *, inference="echo", training="echo", contracts=None):
    if await session.get(Model, model_id) is None:
        session.add(Model(id=model_id, name=model_id, handlers=handlers(inference, training), status="active"))
        await session.flush()
    session.add(
        ModelVersion(
            model_id=model_id,
            version=version,
            status="active",
            handlers=handlers(inference, training),
            handler_contracts=contracts,
        )
    )
    await session.commit()


async def new_job(session, **kw: Any) -> str:
    kw.setdefault("job_type", "inference")
    kw.setdefault("model_id", "m1")
    kw.setdefault("model_version", "1")
    job = await create_job(session, **kw)
    await session.commit()
    return job.job_id


async def stored(session, job_id: str) -> Job:
    return await session.scalar(select(Job).where(Job.job_id == job_id).execution_options(populate_existing=True))


# test implementations, registered in this process only
CAPTURED: list[dict[str, Any]] = []
GATE = threading.Event()
SLOW_CALLS: list[str] = []
_lock = threading.Lock()


@register("test_capture")
def _capture(payload: dict[str, Any]) -> dict[str, Any]:
    CAPTURED.append(payload)
    return {"seen": payload["job_id"]}


@register("test_crash")
def _crash(payload: dict[str, Any]) -> Any:
    raise ZeroDivisionError("division by zero in the model")


@register("test_not_json")
def _not_json(payload: dict[str, Any]) -> Any:
    return {"when": datetime.now()}


@register("test_unstorable")
def _unstorable(payload: dict[str, Any]) -> Any:
    kind = payload["input"]["kind"]
    if kind == "failure":
        raise HandlerFailure("bad\x00code", "bad \ud800 message", {"when": datetime(2026, 1, 2), "ratio": float("inf")})
    if kind == "crash":
        raise ValueError("a NUL \x00 in the message")
    return {"nan": float("nan"), "nul": "a\x00b", "surrogate": "\ud800", "key": {"k\x00": 1}}[kind]


@register("test_gated")
def _gated(payload: dict[str, Any]) -> dict[str, Any]:
    with _lock:
        SLOW_CALLS.append(payload["job_id"])
    GATE.wait(30)
    return {"released": True}


async def test_echo_job_runs_to_success(session, settings):
    await seed_version(session)
    job_id = await new_job(session, input={"route": "ADL-SYD"}, features={"day_of_week": 3})
    assert await dispatch_until_idle(settings) == 1
    job = await stored(session, job_id)
    assert job.status == "success" and job.attempts == 1
    assert job.output == {"input": {"route": "ADL-SYD"}, "features": {"day_of_week": 3}}
    assert job.started_at is not None and job.completed_at is not None and job.error is None
    assert job.locked_by is None and job.lease_expires_at is None
    assert await dispatch_until_idle(settings) == 0  # nothing left


async def test_handler_receives_the_documented_payload(session, settings):
    CAPTURED.clear()
    await seed_version(session, inference="test_capture")
    session.add(Client(client_id="sealink", name="SeaLink"))
    await session.flush()
    session.add(Domain(client_id="sealink", domain_id="pricing"))
    await session.flush()
    session.add(Service(client_id="sealink", domain_id="pricing", service_id="svc-1"))
    await session.commit()
    job_id = await new_job(
        session, input={"a": 1}, features={"f": 2}, client_id="sealink", domain_id="pricing", service_id="svc-1"
    )
    await dispatch_until_idle(settings)
    assert CAPTURED[0].pop("callback_token").count(".") == 2  # spec 14.5 (test_callback_tokens.py)
    assert [
        {
            "job_id": job_id,
            "job_type": "inference",
            "model_id": "m1",
            "model_version": "1",
            "assignment_id": None,
            "client_id": "sealink",
            "domain_id": "pricing",
            "service_id": "svc-1",
            "input": {"a": 1},
            "features": {"f": 2},
            "callback_url": f"http://testserver/v2/models/m1/versions/1/jobs/{job_id}/complete",
        }
    ] == CAPTURED
    assert (await stored(session, job_id)).output == {"seen": job_id}


async def test_failures_become_structured_errors(session, settings):
    await seed_version(session, "fails", inference="fail")
    await seed_version(session, "crashes", inference="test_crash")
    await seed_version(session, "weird", inference="test_not_json")
    await seed_version(session, "ghost", inference="no_such_implementation")
    ids = {m: await new_job(session, model_id=m) for m in ("fails", "crashes", "weird", "ghost")}
    assert await dispatch_until_idle(settings) == 4
    jobs = {m: await stored(session, i) for m, i in ids.items()}
    assert all(j.status == "failure" and j.output is None and j.attempts == 1 for j in jobs.values())
    assert jobs["fails"].error["code"] == "deliberate_failure"
    assert jobs["crashes"].error == {
        "code": "handler_exception",
        "message": "division by zero in the model",
        "exception": "ZeroDivisionError",
    }
    assert jobs["weird"].error["code"] == "invalid_output"
    assert (
        jobs["ghost"].error["code"] == "unknown_in_process_handler"
        and "no_such_implementation" in jobs["ghost"].error["message"]
    )


async def test_output_postgresql_cannot_store_fails_the_job_at_once(session, settings):
    """An implementation returning NaN, a NUL character or a lone surrogate ends its job in
    failure (invalid_output) on the first attempt, instead of a job stuck in started."""
    await seed_version(session, inference="test_unstorable")
    ids = {kind: await new_job(session, input={"kind": kind}) for kind in ("nan", "nul", "surrogate", "key")}
    failed = await new_job(session, input={"kind": "failure"})
    crashed = await new_job(session, input={"kind": "crash"})
    assert await dispatch_until_idle(settings) == 6
    for kind, job_id in ids.items():
        job = await stored(session, job_id)
        assert (job.status, job.attempts, job.output) == ("failure", 1, None), kind
        assert job.error["code"] == "invalid_output", job.error
        assert job.locked_by is None and job.lease_expires_at is None
    # errors with such values are kept, made storable
    job = await stored(session, failed)
    assert (job.status, job.attempts) == ("failure", 1)
    assert job.error == {
        "code": "bad\ufffdcode",
        "message": "bad \ufffd message",
        "details": {"when": "datetime.datetime(2026, 1, 2, 0, 0)", "ratio": "inf"},
    }
    job = await stored(session, crashed)
    assert (job.status, job.error["message"]) == ("failure", "a NUL \ufffd in the message")


async def test_a_result_that_cannot_be_recorded_still_ends_the_job(session, settings, monkeypatch):
    """If recording a handler's result fails (here: an injected error while ending successes),
    the job ends in failure at once instead of waiting for its lease to expire and running again."""
    import pie.dispatch.recording as dispatcher_module

    real = dispatcher_module.finish_jobs

    async def refusing_successes(session, completions):
        if any(c.status == "success" for c in completions):
            raise RuntimeError("cannot record")
        return await real(session, completions)

    monkeypatch.setattr(dispatcher_module, "finish_jobs", refusing_successes)
    await seed_version(session)
    job_id = await new_job(session)
    assert await dispatch_until_idle(settings) == 1
    # a failure that goes away when tried again (a deadlock, say) loses nothing
    failures = iter([RuntimeError("deadlock detected")])

    async def failing_once(session, completions):
        for exc in failures:
            raise exc
        return await real(session, completions)

    monkeypatch.setattr(dispatcher_module, "finish_jobs", failing_once)
    transient = await new_job(session)
    assert await dispatch_until_idle(settings) == 1
    assert (await stored(session, transient)).status == "success"
    job = await stored(session, job_id)
    assert (job.status, job.attempts, job.locked_by) == ("failure", 1, None)
    assert job.error == {
        "code": "unrecordable_result",
        "message": "the handler's result could not be recorded (RuntimeError)",
        "reported_status": "success",
    }


async def test_reference_pricing_and_training_jobs(session, settings):
    await seed_version(session, inference="reference_pricing", training="reference_pricing")
    infer = await new_job(
        session, features={"competitor_count": 5, "advertising_spend": 10, "weekly_demand": [80, 100]}
    )
    train = await new_job(session, job_type="training", features={"competitor_count": 1})
    await dispatch_until_idle(settings)
    out = (await stored(session, infer)).output
    # 100 x 1.1 x 1.03 x (0.85 + 0.3 x 0.9)
    assert out["recommended_price"] == round(100 * 1.1 * 1.03 * 1.12, 2) and out["currency"] == "AUD"
    assert (await stored(session, train)).output["model"] == "reference_pricing"


def test_reference_pricing_stays_within_its_documented_ranges():
    """The documented formula: competition adds up to +40% (0..20 competitors), ad spend up to
    +30% (0..100), the demand index is in 0..1. Out-of-range or absurd inputs are clamped to
    those ranges: never a negative, zero or infinite price."""
    from pie.dispatch.inprocess import reference_pricing

    def price(**features):
        return reference_pricing({"job_type": "inference", "features": features, "input": {}})["recommended_price"]

    lowest, highest = round(100 * 0.85, 2), round(100 * 1.4 * 1.3 * 1.15 * 1.1, 2)
    assert price(competitor_count=-50, advertising_spend=-10, weekly_demand=[-1000] * 7) == lowest
    assert price(competitor_count=10**6, advertising_spend=1e308, weekly_demand=[1e308] * 7, on_demand=True) == highest
    assert price(competitor_count=25) == price(competitor_count=20)
    assert price(weekly_demand=[10**400] * 7) == price(weekly_demand=[100] * 7) == round(100 * 1.15, 2)
    assert price(weekly_demand=[200, 0]) == price(weekly_demand=[100, 100])  # the mean, capped at 1
    # in range, unchanged: 100 x 1.04 x 1.0 x 1.0 (no demand signal: index 0.5)
    assert price(competitor_count=2) == 104.0


async def test_service_init_job_and_chained_subscriptions(session, settings):
    await seed_version(session, "m1")
    await seed_version(session, "m2", "7", inference="fail")
    session.add(Client(client_id="sealink", name="SeaLink"))
    await session.flush()
    session.add(Domain(client_id="sealink", domain_id="pricing"))
    await session.flush()
    session.add(Service(client_id="sealink", domain_id="pricing", service_id="svc-1"))
    session.add(
        EventSubscription(
            source_model_id="m1",
            trigger_event="inference_complete",
            target_model_id="m2",
            target_action="inference",
            input_source="trigger_output",
        )
    )
    await session.commit()
    init = await new_job(
        session,
        job_type="training",
        client_id="sealink",
        domain_id="pricing",
        service_id="svc-1",
        purpose="service_init",
    )
    source = await new_job(session, input={"q": 1})
    # the source job, the init job, and the job its subscription fires
    assert await dispatch_until_idle(settings) == 3
    service = await session.get(Service, ("sealink", "pricing", "svc-1"), populate_existing=True)
    assert service.status == "available"
    assert (await stored(session, init)).status == "success"
    chained = (
        await session.scalars(select(Job).where(Job.model_id == "m2").execution_options(populate_existing=True))
    ).all()
    assert len(chained) == 1 and chained[0].input == {"input": {"q": 1}, "features": None}
    assert chained[0].status == "failure"
    assert (await stored(session, source)).status == "success"


async def listening(session) -> bool:
    """A dispatcher of this database has run its LISTENs (the second is the cancel channel)."""
    found = await session.scalar(
        text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN ' || :channel"
        ),
        {"channel": CANCEL_CHANNEL},
    )
    await session.commit()  # a new snapshot of pg_stat_activity next time
    return bool(found)


async def ended(session, job_id: str) -> Job | None:
    job = await stored(session, job_id)
    return job if job.status in ("success", "failure") else None


async def test_a_started_dispatcher_wakes_on_notify(session, settings):
    """The polling fallback is two minutes here: only LISTEN/NOTIFY can start the job in time."""
    await seed_version(session)
    dispatcher = Dispatcher(settings.model_copy(update={"dispatch_poll_interval": 120.0}), name="listener")
    await dispatcher.start()
    try:
        await until(lambda: listening(session), what="the dispatcher's LISTEN")
        job_id = await new_job(session, input={"n": 1})
        job = await until(lambda: ended(session, job_id), what="the job's end")
        assert job.status == "success" and job.output["input"] == {"n": 1}
    finally:
        await dispatcher.stop()


async def test_expired_lease_is_requeued_and_run_again(session, settings):
    await seed_version(session)
    job_id = await new_job(session)
    job = await stored(session, job_id)
    past = datetime.now(timezone.utc) - timedelta(minutes=5)
    job.status, job.attempts, job.locked_by, job.started_at, job.lease_expires_at = (
        "started",
        1,
        "dead-dispatcher",
        past,
        past,
    )
    await session.commit()
    assert await dispatch_until_idle(settings) == 0  # started jobs are not claimed
    counts = await Dispatcher(settings, name="sweeper").sweep()
    assert counts == {"timed_out": 0, "requeued": 1, "exhausted": 0}
    job = await stored(session, job_id)
    # queued again: no error (it has not failed) and not started; the requeue shows in `dispatch`
    assert job.status == "pending" and job.locked_by is None and job.error is None and job.started_at is None
    assert job.dispatch_error["code"] == "lease_expired"
    assert job.dispatch_error["previous_dispatcher"] == "dead-dispatcher"
    assert await dispatch_until_idle(settings) == 1
    job = await stored(session, job_id)
    assert job.status == "success" and job.attempts == 2 and job.error is None


async def test_expired_lease_after_the_last_attempt_fails_the_job(session, settings):
    await seed_version(session)
    job_id = await new_job(session)
    job = await stored(session, job_id)
    past = datetime.now(timezone.utc) - timedelta(minutes=5)
    job.status, job.locked_by, job.started_at, job.lease_expires_at = "started", "dead", past, past
    job.attempts = settings.dispatch_max_attempts
    await session.commit()
    counts = await Dispatcher(settings, name="sweeper").sweep()
    assert counts == {"timed_out": 0, "requeued": 0, "exhausted": 1}
    job = await stored(session, job_id)
    assert (
        job.status == "failure"
        and job.error["code"] == "lease_expired"
        and job.error["attempts"] == settings.dispatch_max_attempts
    )


async def test_started_jobs_that_never_report_back_time_out(session, settings):
    await seed_version(session)
    session.add(Client(client_id="sealink", name="SeaLink"))
    await session.flush()
    session.add(Domain(client_id="sealink", domain_id="pricing"))
    await session.flush()
    session.add(Service(client_id="sealink", domain_id="pricing", service_id="svc-1"))
    await session.commit()
    old = await new_job(
        session,
        job_type="training",
        client_id="sealink",
        domain_id="pricing",
        service_id="svc-1",
        purpose="service_init",
    )
    fresh = await new_job(session)
    for job_id, age in ((old, timedelta(hours=2)), (fresh, timedelta(seconds=5))):
        job = await stored(session, job_id)
        job.status, job.attempts, job.locked_by = "started", 1, "someone"
        job.started_at = datetime.now(timezone.utc) - age  # a Lambda job: no lease, waiting for its callback
    await session.commit()
    counts = await Dispatcher(settings.model_copy(update={"job_timeout_seconds": 3600}), name="sweeper").sweep()
    assert counts["timed_out"] == 1
    job = await stored(session, old)
    assert job.status == "failure" and job.error["code"] == "timed_out" and "timed out" in job.error["message"]
    service = await session.get(Service, ("sealink", "pricing", "svc-1"), populate_existing=True)
    assert service.status == "failed"
    assert (await stored(session, fresh)).status == "started"


async def test_running_jobs_keep_their_lease_and_are_not_run_twice(session, settings):
    """A lease shorter than the job: the owner renews it, so a sweeping peer never requeues it."""
    SLOW_CALLS.clear()
    GATE.clear()
    await seed_version(session, inference="test_gated")
    fast = settings.model_copy(
        update={"in_process_lease_seconds": 0.6, "dispatch_sweep_interval": 0.1, "dispatch_poll_interval": 0.1}
    )
    owner, peer = Dispatcher(fast, name="owner"), Dispatcher(fast, name="peer")
    await owner.start()
    try:
        job_id = await new_job(session)
        await until(lambda: SLOW_CALLS, what="the handler's start")
        await peer.start()
        for _ in range(15):  # 1.5 s = 2.5 leases, sweeping every 0.1 s
            await asyncio.sleep(0.1)
            assert (await stored(session, job_id)).status == "started"
        GATE.set()
        await until(lambda: ended(session, job_id), what="the job's end")
    finally:
        GATE.set()
        await peer.stop()
        await owner.stop()
    job = await stored(session, job_id)
    assert job.status == "success" and job.attempts == 1 and [job_id] == SLOW_CALLS


async def test_stop_gives_unfinished_jobs_back_to_the_queue(session, settings):
    SLOW_CALLS.clear()
    GATE.clear()
    await seed_version(session, inference="test_gated")
    dispatcher = Dispatcher(settings, name="leaving")
    await dispatcher.start()
    try:
        job_id = await new_job(session)
        await until(lambda: SLOW_CALLS, what="the handler's start")
        assert (await stored(session, job_id)).status == "started"
        await dispatcher.stop(grace=0.2)
        job = await stored(session, job_id)
        assert job.status == "pending" and job.locked_by is None and job.lease_expires_at is None
    finally:
        GATE.set()
        await dispatcher.stop()
