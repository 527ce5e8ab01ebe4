"""Retrying a job (spec 15.4): ``POST /v2/jobs/{job_id}/retry``.

The retry is a new job with the original's type, input, tenant, domain, service and purpose
(a service's init job is retried as an init job: the service is ``initializing`` until it
ends), showing ``retry_of``. An assignment job runs through the same assignment key resolved
again now (the key's active revision in the same scope; 422 when the key has none any more);
any other job runs on the same model version. Every rule of a fresh launch applies again,
under the same locks as a launch: the client active, the domain active (held ``FOR SHARE``, so
a default upsert or a service delete is wholly before or after), the service still there (and,
for an init job, not departed), the version neither failed nor archived (held ``FOR SHARE``),
the input matching the version's contract, the payload within its handler's limit.

Experiments (spec 15.7): an assignment job is a launch through the key, so it takes its arm as
any launch does (a service stays on its arm: the same revision gives the same hash) and gets
shadow copies; a shadow job is retried as a shadow copy of the same job on its version (422
when the active revision no longer shadows that version).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pie.assignments import arms
from pie.assignments.logic import launch_domain_features
from pie.assignments.models import Assignment
from pie.audit import context as audit
from pie.auth import Principal
from pie.clients.models import Client
from pie.errors import Conflict, NotFound, Unprocessable
from pie.jobs.cancel import SERVICE_INIT, ensure_can_launch
from pie.jobs.logic import ENDED, create_job
from pie.jobs.models import Job
from pie.jsonschemas import validation_error
from pie.registry.handlers import input_schema
from pie.registry.logic import UNUSABLE, get_model_version, unusable
from pie.tenancy.logic import ensure_domain_active, load_domain
from pie.tenancy.models import Domain, Service


def _scope_name(revision: Assignment) -> str:
    where = f"domain {revision.domain_id}"
    return where if revision.service_id is None else f"service {revision.service_id} of {where}"


async def _ensure_client_active(session: AsyncSession, client_id: str) -> None:
    """422 when the tenant is suspended; its row is held ``FOR SHARE`` until the retry commits
    (as every launch holds it), so a suspension is wholly before or after."""
    status = await session.scalar(select(Client.status).where(Client.client_id == client_id).with_for_update(read=True))
    if status is None:
        raise Unprocessable(f"client {client_id} no longer exists")
    if status != "active":
        raise Unprocessable(f"client {client_id} is suspended")


async def retry_job(session: AsyncSession, principal: Principal, job_id: str) -> Job:
    """404 unknown job; 403 (``ensure_can_launch``); 409 unless it has ended; 422 when a
    launch now would be refused (see the module docstring). Returns the new job."""
    original = await session.get(Job, job_id, populate_existing=True)
    if original is None:
        raise NotFound(f"job {job_id} not found")
    ensure_can_launch(principal, original)
    if original.status not in ENDED:
        raise Conflict(f"job {job_id} is {original.status}; only an ended job (success or failure) can be retried")

    service: Service | None = None
    domain: Domain | None = None
    if original.client_id is not None:
        if original.domain_id is not None:
            domain = await load_domain(session, original.client_id, original.domain_id, lock="share")
        await _ensure_client_active(session, original.client_id)
        if domain is not None:
            ensure_domain_active(domain)
        if original.domain_id is not None and original.service_id is not None:
            service = await session.scalar(
                select(Service).where(
                    Service.client_id == original.client_id,
                    Service.domain_id == original.domain_id,
                    Service.service_id == original.service_id,
                )
            )
            if service is None:
                raise Unprocessable(
                    f"service {original.service_id} of domain {original.domain_id} no longer exists; "
                    "its jobs cannot be retried"
                )
            if original.purpose == SERVICE_INIT and service.departed:
                raise Unprocessable(f"service {original.service_id} has departed; its init job is not retried")

    model_id, version_id, assignment_id = original.model_id, original.model_version, original.assignment_id
    domain_features = original.domain_features
    if original.assignment_id is not None:
        revision = await session.get(Assignment, original.assignment_id)
        if revision is None:  # jobs reference revisions by foreign key: not expected
            raise Unprocessable(f"the assignment revision of job {job_id} no longer exists")
        active = await session.scalar(
            select(Assignment).where(
                Assignment.client_id == revision.client_id,
                Assignment.domain_id == revision.domain_id,
                Assignment.service_id.is_(None)
                if revision.service_id is None
                else Assignment.service_id == revision.service_id,
                Assignment.assignment_key == revision.assignment_key,
                Assignment.status == "active",
            )
        )
        if active is None:
            raise Unprocessable(
                f"assignment {revision.assignment_key} is archived in {_scope_name(revision)}: no active revision "
                "to retry the job through"
            )
        if domain is not None:
            domain_features = launch_domain_features(domain, original.job_type, revision.service_id)
        assert original.client_id is not None and original.domain_id is not None  # assignment jobs have both
        features = service.resolved_features if service is not None else original.features
        if original.arm == arms.SHADOW:
            job = await _retry_shadow(session, original, active, features, domain_features)
        else:
            # the key resolved again now: its arm by the same hash (the same service stays on
            # the same arm while the revision lasts), its shadow copies
            job = await arms.launch(
                session,
                active,
                job_type=original.job_type,
                input=original.input,
                features=features,
                domain_features=domain_features,
                client_id=original.client_id,
                domain_id=original.domain_id,
                service_id=original.service_id,
                purpose=original.purpose,
                retry_of=original.job_id,
                check_input=True,
            )
        return await _retried(session, original, service, job)

    version = await get_model_version(session, model_id, version_id, for_share=True)
    if version.status in UNUSABLE:
        raise Unprocessable(f"model {model_id} version {version_id} {unusable(version.status)}; it takes no new job")
    schema = input_schema(version.handler_contracts, original.job_type)
    if schema is not None:
        problem = validation_error(schema, original.input)
        if problem is not None:
            raise Unprocessable(
                f"input does not match the {original.job_type} input_schema of model {model_id} "
                f"version {version_id}: {problem}"
            )

    job = await create_job(
        session,
        job_type=original.job_type,
        model_id=model_id,
        model_version=version_id,
        input=original.input,
        # a service's job gets the service's features as they are now (as any launch in it)
        features=service.resolved_features if service is not None else original.features,
        assignment_id=assignment_id,
        client_id=original.client_id,
        domain_id=original.domain_id,
        service_id=original.service_id,
        purpose=original.purpose,
        handlers=version.handlers if isinstance(version.handlers, dict) else None,
        domain_features=domain_features,
        retry_of=original.job_id,
    )
    return await _retried(session, original, service, job)


async def _retried(session: AsyncSession, original: Job, service: Service | None, job: Job) -> Job:
    if original.purpose == SERVICE_INIT and service is not None:
        service.status = "initializing"
        await session.flush()
    audit.describe(session, target_id=job.job_id, client_id=original.client_id, retry_of=original.job_id)
    return job


async def _retry_shadow(
    session: AsyncSession,
    original: Job,
    active: Assignment,
    features: dict[str, Any] | None,
    domain_features: list[Any] | None,
) -> Job:
    """A shadow job is retried as a shadow copy of the same job, on its version, through the
    key's active revision; 422 when that revision no longer shadows the version."""
    named = {"model_id": original.model_id, "model_version": original.model_version}
    if named not in (active.shadow or []):
        raise Unprocessable(
            f"assignment {active.assignment_key} no longer shadows model {original.model_id} version "
            f"{original.model_version}; its shadow job is not retried"
        )
    version = await get_model_version(session, original.model_id, original.model_version, for_share=True)
    if version.status in UNUSABLE:
        raise Unprocessable(
            f"model {version.model_id} version {version.version} {unusable(version.status)}; it takes no new job"
        )
    problem = arms.input_problem(version, original.job_type, original.input)
    if problem is not None:
        raise Unprocessable(problem)
    return await create_job(
        session,
        job_type=original.job_type,
        model_id=version.model_id,
        model_version=version.version,
        input=original.input,
        features=features,
        domain_features=domain_features,
        assignment_id=active.assignment_id,
        client_id=original.client_id,
        domain_id=original.domain_id,
        service_id=original.service_id,
        handlers=version.handlers if isinstance(version.handlers, dict) else None,
        retry_of=original.job_id,
        arm=arms.SHADOW,
        shadow_of=original.shadow_of,
    )
