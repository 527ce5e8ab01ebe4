"""Domains, live features and services (spec 5). Plain functions over a session: they flush,
never commit (the request's unit of work commits).

Locking (so the freeze check of a ``default`` assignment upsert can never miss a service):
service init/update and batch re-init take the domain row ``FOR SHARE``; a domain assignment
upsert takes it ``FOR NO KEY UPDATE``. The two conflict, so a service is either written before
the upsert checks the domain (and is checked) or after it commits (and is resolved under the
new governing schema).

Every write and job launch holds the client row ``FOR SHARE`` (``ensure_writable``), so it is
either refused by a suspension that committed first or commits before the suspension does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import uuid6
from fastapi import Response
from sqlalchemy import String, and_, bindparam, column, delete, func, literal, or_, select, true, update, values
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import ColumnElement

from pie import metrics, reads
from pie.assignments import arms, freeze
from pie.assignments.models import Assignment
from pie.audit import context as audit
from pie.clients.models import Client
from pie.deps import TenantScope
from pie.errors import Conflict, NotFound, Unprocessable
from pie.features import describe_failures, merge_patch, resolve_features, validate_feature_definitions
from pie.jobs.cancel import cancel_jobs
from pie.jobs.logic import notify_new_jobs
from pie.jobs.models import Job
from pie.pagination import PageParams, paginate
from pie.registry.models import EventSubscription, ModelVersion
from pie.tenancy.models import Domain, Service, departed
from pie.tenancy.schemas import DomainCreate, DomainUpdate, ServiceInit, ServiceUpdate

DomainLock = Literal["share", "update"] | None

DEFAULT_KEY = "default"
SERVICE_INIT = "service_init"  # Job.purpose of init and re-init jobs: their end sets the service status


# -- domains -------------------------------------------------------------------------------------


async def load_domain(session: AsyncSession, client_id: str, domain_id: str, *, lock: DomainLock = None) -> Domain:
    """The domain (404 if absent in this tenant), optionally row-locked ``FOR SHARE`` or
    ``FOR NO KEY UPDATE``."""
    stmt = select(Domain).where(Domain.client_id == client_id, Domain.domain_id == domain_id)
    if lock == "share":
        stmt = stmt.with_for_update(read=True)
    elif lock == "update":
        stmt = stmt.with_for_update(key_share=True)
    if lock is not None:
        # re-read the row after waiting for a lock, not the identity map's stale copy
        stmt = stmt.execution_options(populate_existing=True)
    domain = await session.scalar(stmt)
    if domain is None:
        raise NotFound(f"domain {domain_id} not found")
    return domain


async def ensure_writable(session: AsyncSession, scope: TenantScope) -> None:
    """422 when the client is suspended (spec 4). The client row is held ``FOR SHARE`` until the
    write commits, so a concurrent suspension (which updates that row) lands either before this
    write, which then sees it and is refused, or after the write has committed."""
    status = await session.scalar(
        select(Client.status).where(Client.client_id == scope.client_id).with_for_update(read=True)
    )
    if status != "active":
        raise Unprocessable(f"client {scope.client_id} is suspended")


def ensure_domain_active(domain: Domain) -> None:
    if domain.status != "active":
        raise Unprocessable(f"domain {domain.domain_id} is not active")


async def create_domain(session: AsyncSession, scope: TenantScope, body: DomainCreate) -> Domain:
    await ensure_writable(session, scope)
    features = validate_feature_definitions(body.features) if body.features is not None else []
    domain_id = body.domain_id or str(uuid6.uuid7())
    stmt = (
        insert(Domain)
        .values(
            client_id=scope.client_id,
            domain_id=domain_id,
            name=body.name,
            features=features,
            created_by=audit.actor(session),
        )
        .on_conflict_do_nothing(index_elements=[Domain.client_id, Domain.domain_id])
        .returning(Domain)
    )
    domain = await session.scalar(stmt)
    if domain is None:
        raise Conflict(f"domain {domain_id} already exists")
    audit.describe(session, target_id=domain_id)
    return domain


async def list_domains(session: AsyncSession, scope: TenantScope, page: PageParams, response: Response) -> list[Domain]:
    stmt = select(Domain).where(Domain.client_id == scope.client_id)
    return await paginate(session, stmt, [Domain.domain_id], page, response)


async def update_domain(session: AsyncSession, scope: TenantScope, domain_id: str, body: DomainUpdate) -> Domain:
    domain = await load_domain(session, scope.client_id, domain_id, lock="update")
    await ensure_writable(session, scope)
    if "name" in body.model_fields_set:
        domain.name = body.name
    if body.status is not None:
        domain.status = body.status
    await session.flush()
    await session.refresh(domain)
    return domain


async def replace_features(session: AsyncSession, scope: TenantScope, domain_id: str, features: list[Any]) -> list[Any]:
    """Persist-only (spec 5.2): writes the live definitions, touches no service; the governing
    schema (the snapshot on the active ``default`` revision) does not change."""
    domain = await load_domain(session, scope.client_id, domain_id, lock="update")
    await ensure_writable(session, scope)
    definitions = validate_feature_definitions(features)
    domain.features = definitions
    await session.flush()
    return definitions


@dataclass
class FeaturesDryRun:
    """What ``PUT .../features`` would write, and the services it would not fit (spec 15.1);
    the console's features preview also shows how many services were checked and the provided
    keys the draft no longer defines (the API answers ``features`` and ``blocking_services``)."""

    features: list[Any]
    blocking_services: list[dict[str, Any]]
    services_checked: int = 0
    undefined_keys: list[str] = field(default_factory=list)


async def dry_run_features(
    session: AsyncSession, scope: TenantScope, domain_id: str, features: list[Any]
) -> FeaturesDryRun:
    """``PUT .../features?dry_run=true`` (spec 15.1): the checks of ``replace_features`` (the
    same 4xx), then the non-departed services whose ``provided_features`` would not resolve
    against the draft (the freeze check's set-based machinery); nothing is written, no audit
    row. The domain row is held ``FOR SHARE`` (no service is written while it checks)."""
    await load_domain(session, scope.client_id, domain_id, lock="share")
    await ensure_writable(session, scope)
    definitions = validate_feature_definitions(features)
    audit.skip(session)
    found = await freeze.check_draft(session, client_id=scope.client_id, domain_id=domain_id, definitions=definitions)
    return FeaturesDryRun(definitions, found.blocking_services, found.services_checked, found.unknown_keys)


# -- the governing schema ------------------------------------------------------------------------


async def active_default(
    session: AsyncSession, client_id: str, domain_id: str
) -> tuple[Assignment, ModelVersion] | None:
    """The domain's active ``default`` assignment revision and the version behind it."""
    stmt = (
        select(Assignment, ModelVersion)
        .join(
            ModelVersion,
            and_(ModelVersion.model_id == Assignment.model_id, ModelVersion.version == Assignment.model_version),
        )
        .where(
            Assignment.client_id == client_id,
            Assignment.domain_id == domain_id,
            Assignment.service_id.is_(None),
            Assignment.assignment_key == DEFAULT_KEY,
            Assignment.status == "active",
        )
    )
    row = (await session.execute(stmt)).first()
    return None if row is None else (row[0], row[1])


def schema_of(version: ModelVersion | None, domain: Domain) -> list[Any]:
    """The schema a domain ``default`` revision written now snapshots (spec 15.1): the target
    version's frozen schema, or a copy of the domain's live features when it has none."""
    if version is not None and version.features is not None:
        return version.features
    return domain.features


ContractSource = Literal["model_version", "domain_snapshot"]


@dataclass
class Contract:
    """The governing schema of a domain (spec 15.1) and where it comes from."""

    features: list[Any]
    source: ContractSource
    assignment: Assignment
    version: ModelVersion


def governing(assignment: Assignment, version: ModelVersion, domain: Domain) -> Contract:
    """The schema stored on the active ``default`` revision. A revision without one (written
    behind this release's back, e.g. by raw SQL) is governed by what it would have snapshotted.
    A version's frozen schema never changes once created, so when it has one the snapshot is it."""
    features = assignment.governing_schema
    if features is None:
        features = schema_of(version, domain)
    source: ContractSource = "model_version" if version.features is not None else "domain_snapshot"
    return Contract(features, source, assignment, version)


async def governing_schema(session: AsyncSession, domain: Domain) -> list[Any]:
    """The domain's governing schema; its live features when it has no active ``default``
    (nothing has been deployed: the draft is all there is)."""
    found = await active_default(session, domain.client_id, domain.domain_id)
    if found is None:
        return domain.features
    return governing(found[0], found[1], domain).features


async def get_contract(session: AsyncSession, scope: TenantScope, domain_id: str) -> Contract:
    """``GET .../contract``: 422 "no model assigned" without an active ``default``."""
    domain = await load_domain(session, scope.client_id, domain_id)
    found = await active_default(session, scope.client_id, domain_id)
    if found is None:
        raise Unprocessable(f"no model assigned: domain {domain_id} has no active default assignment")
    return governing(found[0], found[1], domain)


async def require_default(session: AsyncSession, domain: Domain) -> tuple[Assignment, ModelVersion]:
    found = await active_default(session, domain.client_id, domain.domain_id)
    if found is None:
        raise Unprocessable(f"no model assigned: domain {domain.domain_id} has no active default assignment")
    version = found[1]
    if version.status in ("failed", "archived"):
        raise Unprocessable(
            f"the default assignment points at model {version.model_id} version {version.version}, which "
            + ("has failed" if version.status == "failed" else "is archived")
        )
    return found


# -- services ------------------------------------------------------------------------------------


def not_departed() -> ColumnElement[bool]:
    """SQL: the service takes part in freeze checks and batch re-init."""
    return or_(Service.departure_datetime.is_(None), Service.departure_datetime > func.now())


def _resolve_or_422(provided: dict[str, Any], definitions: list[Any]) -> dict[str, Any]:
    resolved, failures = resolve_features(provided, definitions, unknown="reject")
    if failures:
        raise Unprocessable("static_features do not match the governing feature schema: " + describe_failures(failures))
    return resolved


async def init_service(
    session: AsyncSession, scope: TenantScope, domain_id: str, body: ServiceInit
) -> tuple[Service, Job]:
    domain = await load_domain(session, scope.client_id, domain_id, lock="share")
    await ensure_writable(session, scope)
    ensure_domain_active(domain)
    assignment, version = await require_default(session, domain)
    resolved = _resolve_or_422(body.static_features, governing(assignment, version, domain).features)
    stmt = (
        insert(Service)
        .values(
            client_id=scope.client_id,
            domain_id=domain_id,
            service_id=body.service_id,
            status="initializing",
            departure_datetime=body.departure_datetime,
            provided_features=body.static_features,
            resolved_features=resolved,
            created_by=audit.actor(session),
        )
        .on_conflict_do_nothing(index_elements=[Service.client_id, Service.domain_id, Service.service_id])
        .returning(Service)
    )
    service = await session.scalar(stmt)
    if service is None:
        raise Conflict(f"service {body.service_id} already exists in domain {domain_id}")
    # the service's arm of an experiment on default (spec 15.7), and its shadow copies
    job = await arms.launch(
        session,
        assignment,
        job_type="inference",
        client_id=scope.client_id,
        domain_id=domain_id,
        service_id=body.service_id,
        input=resolved,
        features=resolved,
        purpose=SERVICE_INIT,
        primary=version,
    )
    return service, job


async def load_service(
    session: AsyncSession, client_id: str, domain_id: str, service_id: str, *, for_update: bool = False
) -> Service:
    stmt = select(Service).where(
        Service.client_id == client_id, Service.domain_id == domain_id, Service.service_id == service_id
    )
    if for_update:
        stmt = stmt.with_for_update(key_share=True).execution_options(populate_existing=True)
    service = await session.scalar(stmt)
    if service is None:
        raise NotFound(f"service {service_id} not found in domain {domain_id}")
    return service


_READ_SERVICE = select(*Service.__table__.c).where(
    Service.__table__.c.client_id == bindparam("client_id"),
    Service.__table__.c.domain_id == bindparam("domain_id"),
    Service.__table__.c.service_id == bindparam("service_id"),
)


async def read_service(client_id: str, domain_id: str, service_id: str) -> dict[str, Any] | None:
    """The service's ``ServiceOut`` fields from one Core read outside any transaction (None when
    it does not exist: its client and domain exist whenever it does). The read of ``GET
    .../service/{id}``, on the fast layer and in the route."""
    row = await reads.fetch_one(
        _READ_SERVICE, {"client_id": client_id, "domain_id": domain_id, "service_id": service_id}
    )
    if row is None:
        return None
    out = dict(row)
    out["departed"] = departed(out["departure_datetime"])
    return out


async def get_service(session: AsyncSession, scope: TenantScope, domain_id: str, service_id: str) -> Service:
    await load_domain(session, scope.client_id, domain_id)
    return await load_service(session, scope.client_id, domain_id, service_id)


async def list_services(
    session: AsyncSession,
    scope: TenantScope,
    domain_id: str,
    departed: bool | None,
    page: PageParams,
    response: Response,
) -> list[Service]:
    await load_domain(session, scope.client_id, domain_id)
    stmt = select(Service).where(Service.client_id == scope.client_id, Service.domain_id == domain_id)
    if departed is True:
        stmt = stmt.where(~not_departed())
    elif departed is False:
        stmt = stmt.where(not_departed())
    return await paginate(session, stmt, [Service.service_id], page, response)


async def update_service(
    session: AsyncSession, scope: TenantScope, domain_id: str, service_id: str, body: ServiceUpdate
) -> tuple[Service, list[str]]:
    """Shallow-merge ``static_features`` (null removes a key), re-resolve against the governing
    schema (422, nothing written, on failure), replace ``departure_datetime`` when given.

    Stored keys the governing schema no longer defines (a feature dropped by a newer default
    version) are not the caller's doing: they are kept in ``provided_features``, left out of
    ``resolved_features`` and returned as the update's ``undefined_features``. A key the request
    sends is validated as always (an undefined one is 422)."""
    domain = await load_domain(session, scope.client_id, domain_id, lock="share")
    # an unknown service is 404 before any 422, as on every other service-addressed route
    service = await load_service(session, scope.client_id, domain_id, service_id, for_update=True)
    await ensure_writable(session, scope)
    ensure_domain_active(domain)
    definitions = await governing_schema(session, domain)
    provided = merge_patch(service.provided_features, body.static_features)
    defined = {d["name"] for d in definitions}
    undefined = sorted(k for k in provided if k not in defined and k not in body.static_features)
    resolved = _resolve_or_422({k: v for k, v in provided.items() if k not in undefined}, definitions)
    service.provided_features = provided
    service.resolved_features = resolved
    if "departure_datetime" in body.model_fields_set:
        service.departure_datetime = body.departure_datetime
    await session.flush()
    await session.refresh(service)
    return service, undefined


async def reinit_all_services(session: AsyncSession, scope: TenantScope, domain_id: str) -> list[tuple[str, str]]:
    """One fresh inference job per non-departed service through the active default assignment,
    with the stored ``resolved_features``, and every such service set to ``initializing`` until
    its job ends (spec 15.3): one statement (an ``INSERT ... SELECT`` and the ``UPDATE`` of
    exactly the services that got a job), no per-service round trips. Stored features are not
    touched. Returns ``(service_id, job_id)`` pairs in service order."""
    domain = await load_domain(session, scope.client_id, domain_id, lock="share")
    await ensure_writable(session, scope)
    ensure_domain_active(domain)
    assignment, _version = await require_default(session, domain)
    split_versions = await _split_versions(session, assignment)
    shadows = await arms.usable_shadows(session, assignment)
    actor = literal(audit.actor(session), type_=Job.created_by.type)
    scoped = [Service.client_id == scope.client_id, Service.domain_id == domain_id, not_departed()]
    # the arm of each service (spec 15.7), computed in the statement: its bucket by the hash of
    # (assignment_id, service_id), then the CASE of the split ranges (literals without a split)
    services = select(
        Service.client_id,
        Service.domain_id,
        Service.service_id,
        Service.resolved_features,
        (arms.bucket_sql(assignment.assignment_id, Service.service_id) if split_versions else literal(0)).label(
            "bucket"
        ),
    ).where(*scoped)
    src = services.subquery("src")
    arm, model_id, model_version = arms.arm_columns(assignment, src.c.bucket)
    rows = select(
        literal("inference"),
        model_id,
        model_version,
        literal(assignment.assignment_id),
        src.c.client_id,
        src.c.domain_id,
        src.c.service_id,
        literal(SERVICE_INIT),
        src.c.resolved_features,
        src.c.resolved_features,
        actor,
        arm,
    )
    columns = [
        Job.job_type,
        Job.model_id,
        Job.model_version,
        Job.assignment_id,
        Job.client_id,
        Job.domain_id,
        Job.service_id,
        Job.purpose,
        Job.input,
        Job.features,
        Job.created_by,
        Job.arm,
    ]
    launched = (
        insert(Job)
        .from_select(columns, rows)
        .returning(Job.service_id, Job.job_id, Job.features, Job.arm)
        .cte("launched")
    )
    marked = (
        update(Service)
        .where(
            Service.client_id == scope.client_id,
            Service.domain_id == domain_id,
            Service.service_id == launched.c.service_id,
        )
        .values(status="initializing", updated_at=func.clock_timestamp())
        .cte("marked")
    )
    stmt = select(launched.c.service_id, launched.c.job_id, launched.c.arm).add_cte(marked)
    if shadows:
        # one shadow copy per (launched job, shadow version), in the same statement; no
        # purpose: a shadow never sets its service's status
        versions = values(column("model_id", String), column("model_version", String), name="shadow_versions").data(
            [(v.model_id, v.version) for v in shadows]
        )
        copies = (
            insert(Job)
            .from_select(
                [*columns[:7], Job.input, Job.features, Job.created_by, Job.arm, Job.shadow_of],
                select(
                    literal("inference"),
                    versions.c.model_id,
                    versions.c.model_version,
                    literal(assignment.assignment_id),
                    literal(scope.client_id),
                    literal(domain_id),
                    launched.c.service_id,
                    launched.c.features,
                    launched.c.features,
                    actor,
                    literal(arms.SHADOW),
                    launched.c.job_id,
                ).select_from(launched.join(versions, true())),
            )
            .returning(Job.job_id)
            .cte("copies")
        )
        stmt = stmt.add_cte(copies)
    stmt = stmt.order_by(launched.c.service_id)
    # service_id is copied from services' primary key: never NULL here
    result = (await session.execute(stmt)).all()
    jobs = [(row.service_id, row.job_id) for row in result]
    if jobs:
        await notify_new_jobs(session)
        launched_arms = [row.arm for row in result] + [arms.SHADOW] * (len(result) * len(shadows))
        metrics.on_commit(session, metrics.jobs_created(["inference"] * len(launched_arms), launched_arms))
    return jobs


async def _split_versions(session: AsyncSession, assignment: Assignment) -> list[ModelVersion]:
    """The split versions of the revision, held ``FOR SHARE`` until commit; 422 when one takes
    no new job (as for the primary)."""
    found = []
    for entry in assignment.split or []:
        version = await session.scalar(
            select(ModelVersion)
            .where(ModelVersion.model_id == entry["model_id"], ModelVersion.version == entry["model_version"])
            .with_for_update(read=True)
        )
        if version is None or version.status in ("failed", "archived"):
            state = "is missing" if version is None else ("has failed" if version.status == "failed" else "is archived")
            raise Unprocessable(
                f"the default assignment's split arm model {entry['model_id']} version {entry['model_version']} {state}"
            )
        found.append(version)
    return found


async def reinit_service(
    session: AsyncSession, scope: TenantScope, domain_id: str, service_id: str
) -> tuple[Service, Job]:
    """Re-initialise one service (spec 15.4): batch re-init for one service. A fresh init job
    through the active default assignment with the stored ``resolved_features`` (stored
    features are not touched); the service is ``initializing`` until that job ends. 404 unknown
    service; 422 when it has departed, the domain is inactive or has no (usable) model."""
    domain = await load_domain(session, scope.client_id, domain_id, lock="share")
    service = await load_service(session, scope.client_id, domain_id, service_id, for_update=True)
    await ensure_writable(session, scope)
    ensure_domain_active(domain)
    if service.departed:
        raise Unprocessable(f"service {service_id} has departed; departed services are not re-initialised")
    assignment, version = await require_default(session, domain)
    job = await arms.launch(
        session,
        assignment,
        job_type="inference",
        client_id=scope.client_id,
        domain_id=domain_id,
        service_id=service_id,
        input=service.resolved_features,
        features=service.resolved_features,
        purpose=SERVICE_INIT,
        primary=version,
    )
    service.status = "initializing"
    await session.flush()
    await session.refresh(service)
    audit.describe(session, job_id=job.job_id)
    return service, job


async def delete_service(session: AsyncSession, scope: TenantScope, domain_id: str, service_id: str) -> None:
    """Delete a service (spec 15.4): it leaves every list, freeze check and re-init and its id
    may be initialised again; its jobs and history stay. In one transaction:

    - its unfinished jobs are cancelled (``pie.jobs.cancel``: an old init job ending later must
      not set the status of a service re-initialised under the same id);
    - its active service-scope assignment revisions are archived; every revision stays, as the
      history of the id (jobs keep their ``assignment_id``);
    - its replay subscriptions (``subscribe: true`` through its keys) turn ``stale``;
    - the row is deleted.

    The domain row is held ``FOR NO KEY UPDATE``: init, update, launches, re-inits and upserts
    in the domain (which hold it ``FOR SHARE``) are wholly before or after the delete. Jobs are
    locked before the service row, in the order every completion takes them. 404 unknown;
    422 departed (kept as history) or client suspended."""
    await load_domain(session, scope.client_id, domain_id, lock="update")
    service = await load_service(session, scope.client_id, domain_id, service_id)
    await ensure_writable(session, scope)
    if service.departed:
        raise Unprocessable(f"service {service_id} has departed; departed services are kept as history")
    in_scope = (Job.client_id == scope.client_id, Job.domain_id == domain_id, Job.service_id == service_id)
    unfinished = list(
        (await session.scalars(select(Job.job_id).where(*in_scope, Job.status.in_(("pending", "started"))))).all()
    )
    cancelled = await cancel_jobs(session, unfinished, f"service {service_id} was deleted")
    revisions = await session.scalars(
        update(Assignment)
        .where(
            Assignment.client_id == scope.client_id,
            Assignment.domain_id == domain_id,
            Assignment.service_id == service_id,
            Assignment.status == "active",
        )
        .values(status="archived", updated_at=func.clock_timestamp())
        .returning(Assignment.assignment_key)
    )
    archived = sorted(revisions.all())
    replays = await session.scalars(
        update(EventSubscription)
        .where(
            EventSubscription.client_id == scope.client_id,
            EventSubscription.domain_id == domain_id,
            EventSubscription.service_id == service_id,
            EventSubscription.status.in_(("active", "paused")),
        )
        .values(status="stale", updated_at=func.now())
        .returning(EventSubscription.id)
    )
    stale = sorted(str(i) for i in replays.all())
    await session.execute(
        delete(Service).where(
            Service.client_id == scope.client_id, Service.domain_id == domain_id, Service.service_id == service_id
        )
    )
    audit.describe(session, cancelled_jobs=sorted(cancelled), archived_assignments=archived, stale_subscriptions=stale)
