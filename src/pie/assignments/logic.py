"""Assignment revisions (spec 6) and assignment jobs (spec 9.1). Plain functions over a
session: they flush, never commit.

Writing a key archives its active revision and inserts the new one in the caller's transaction.
Concurrent upserts of one key serialize on a row lock taken first: the domain row
(``FOR NO KEY UPDATE``) for domain-scope keys, the service row for service-scope keys; the
partial unique indexes ``uq_assignments_active_*`` make a second active revision impossible
regardless.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Response
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from pie import metrics, reads
from pie.assignments import arms, freeze
from pie.assignments.models import Assignment
from pie.assignments.schemas import AssignmentJobRequest, AssignmentUpsert, ShadowEntry, SplitEntry
from pie.audit import context as audit
from pie.deps import TenantScope
from pie.errors import NotFound, Unprocessable
from pie.jobs.models import Job
from pie.pagination import PageParams, paginate
from pie.registry.logic import UNUSABLE, unusable
from pie.registry.models import ModelVersion
from pie.registry.subscriptions import subscribe_inference
from pie.tenancy.logic import (
    DEFAULT_KEY,
    ensure_domain_active,
    ensure_writable,
    governing_schema,
    load_domain,
    load_service,
    schema_of,
)
from pie.tenancy.models import Domain
from pie.webhooks import outbox as webhooks


def _scope_filter(client_id: str, domain_id: str, service_id: str | None) -> list[Any]:
    return [
        Assignment.client_id == client_id,
        Assignment.domain_id == domain_id,
        Assignment.service_id.is_(None) if service_id is None else Assignment.service_id == service_id,
    ]


def _scope_name(domain_id: str, service_id: str | None) -> str:
    return f"domain {domain_id}" if service_id is None else f"service {service_id} of domain {domain_id}"


async def model_reference(session: AsyncSession, model_id: str, model_version: str) -> ModelVersion:
    """The version an upsert points at: it must exist and be neither ``failed`` nor
    ``archived`` (422 otherwise). The row is held ``FOR SHARE`` until the upsert commits, so the
    version can neither turn ``failed`` nor ``archived`` between this check and the commit (an
    archive waits for this lock, then sees the new revision: 409)."""
    version = await session.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id, ModelVersion.version == model_version)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    )
    if version is None:
        raise Unprocessable(f"invalid model reference: model {model_id} version {model_version} does not exist")
    if version.status in UNUSABLE:
        raise Unprocessable(
            f"invalid model reference: model {model_id} version {model_version} {unusable(version.status)}"
        )
    return version


def check_experiment(body: AssignmentUpsert) -> None:
    """The shape rules of ``split`` and ``shadow`` (spec 15.7; 422): percentages integers 1-99
    summing to less than 100, and no version named twice across primary, split and shadow."""
    for entry in body.split:
        if not 1 <= entry.percent <= 99:
            raise Unprocessable(
                f"split percent of model {entry.model_id} version {entry.model_version} is {entry.percent}: "
                "each must be an integer from 1 to 99"
            )
    total = sum(entry.percent for entry in body.split)
    if total >= 100:
        raise Unprocessable(
            f"split percentages sum to {total}: they must sum to less than 100 (the primary takes the rest)"
        )
    seen = {(body.model_id, body.model_version): "primary"}
    named_entries: list[tuple[str, SplitEntry | ShadowEntry]] = [
        *(("split", e) for e in body.split),
        *(("shadow", e) for e in body.shadow),
    ]
    for where, named_entry in named_entries:
        named = (named_entry.model_id, named_entry.model_version)
        if named in seen:
            raise Unprocessable(
                f"model {named[0]} version {named[1]} is named twice (as {seen[named]} and "
                f"{where}): each version may take one place in an experiment"
            )
        seen[named] = where


async def experiment_references(session: AsyncSession, body: AssignmentUpsert) -> list[tuple[str, ModelVersion]]:
    """Every split and shadow version (in listed order, with its arm) passes 6.1 like the
    primary (422 "invalid model reference"), each held ``FOR SHARE`` until commit."""
    found = []
    for where, entries in (("split", body.split), ("shadow", body.shadow)):
        for entry in entries:
            found.append((where, await model_reference(session, entry.model_id, entry.model_version)))
    return found


def _experiment(body: AssignmentUpsert) -> dict[str, list[dict[str, Any]]]:
    """``split`` and ``shadow`` as the revision stores them."""
    return {
        "split": [e.model_dump(include={"model_id", "model_version", "percent"}) for e in body.split],
        "shadow": [e.model_dump(include={"model_id", "model_version"}) for e in body.shadow],
    }


async def _write_revision(
    session: AsyncSession,
    *,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    key: str,
    body: AssignmentUpsert,
    governing_schema: list[Any] | None = None,
) -> Assignment:
    """Archive the active revision of the key (if any) and insert the new one (with the
    governing-schema snapshot of a domain ``default`` revision). The caller holds the scope's
    row lock; ``clock_timestamp()`` orders revisions by when they were written."""
    await session.execute(
        update(Assignment)
        .where(*_scope_filter(client_id, domain_id, service_id), Assignment.assignment_key == key)
        .where(Assignment.status == "active")
        .values(status="archived", updated_at=func.clock_timestamp())
    )
    stmt = (
        insert(Assignment)
        .values(
            client_id=client_id,
            domain_id=domain_id,
            service_id=service_id,
            assignment_key=key,
            model_id=body.model_id,
            model_version=body.model_version,
            status=body.status,
            role=body.role,
            settings=body.settings,
            metadata_=body.metadata,
            governing_schema=governing_schema,
            **_experiment(body),
            created_by=audit.actor(session),
            created_at=func.clock_timestamp(),
            updated_at=func.clock_timestamp(),
        )
        .returning(Assignment)
    )
    revision = (await session.scalars(stmt, execution_options={"populate_existing": True})).one()
    audit.describe(session, assignment_id=str(revision.assignment_id))
    await webhooks.assignment_revisions_written(session, [revision.assignment_id])
    return revision


@dataclass
class DryRun:
    """What a domain upsert would do (spec 14.7): nothing of it is written."""

    revision: dict[str, Any]
    services_checked: int
    services_re_resolved: int


async def upsert_domain_assignment(
    session: AsyncSession,
    scope: TenantScope,
    domain_id: str,
    key: str,
    body: AssignmentUpsert,
    *,
    dry_run: bool = False,
) -> Assignment | DryRun:
    """Domain scope: for an active revision, the freeze check (6.2) of every non-departed
    service first; for the ``default`` key, then the patches and the re-resolve of everyone.

    The schema checked against (spec 15.1): the target version's frozen schema; else, for the
    ``default`` key, a copy of the domain's live features, which the new revision stores as the
    domain's governing schema (writing ``default`` again, even to the same version, rolls the
    live draft onto the deployed services); else, for another key, the governing schema in
    force (the draft is not deployed until ``default`` is written).

    ``dry_run`` (14.7): every check runs (the same 4xx, the same 422 ``blocking_services``),
    then the would-be revision and the counts are answered and nothing is written — no
    revision, no re-resolve, no audit row. It holds the domain row only ``FOR SHARE``."""
    domain = await load_domain(session, scope.client_id, domain_id, lock="share" if dry_run else "update")
    await ensure_writable(session, scope)
    ensure_domain_active(domain)
    updates = body.service_updates or []
    if updates and key != DEFAULT_KEY:
        raise Unprocessable("service_updates are only allowed on the domain's default assignment")
    if updates and body.status != "active":
        raise Unprocessable("service_updates are only allowed when assigning an active default revision")
    seen: set[str] = set()
    for entry in updates:
        if entry.service_id in seen:
            raise Unprocessable(f"service_updates names service {entry.service_id} more than once")
        seen.add(entry.service_id)
    check_experiment(body)
    version = await model_reference(session, body.model_id, body.model_version)
    others = await experiment_references(session, body)
    in_force: list[Any] | None = None

    async def schema_for(target: ModelVersion) -> list[Any]:
        nonlocal in_force
        if key == DEFAULT_KEY:
            return schema_of(target, domain)
        if target.features is not None:
            return target.features
        if in_force is None:
            in_force = await governing_schema(session, domain)
        return in_force

    definitions = await schema_for(version)
    plan = None
    if body.status == "active":
        # the freeze check of every version the revision names (spec 15.7): each must accept
        # every non-departed service; the plan written is the primary's (its schema governs)
        checks = [freeze.Target(body.model_id, body.model_version, definitions, "primary")]
        for where, other in others:
            checks.append(freeze.Target(other.model_id, other.version, await schema_for(other), where))
        with metrics.freeze_check():
            plan = await freeze.check_versions(
                session,
                client_id=scope.client_id,
                domain_id=domain_id,
                targets=checks,
                service_updates=[(u.service_id, u.static_features) for u in updates],
            )
    if dry_run:
        audit.skip(session)
        checked, re_resolved = (
            await freeze.count_plan(
                session, client_id=scope.client_id, domain_id=domain_id, plan=plan, re_resolve=key == DEFAULT_KEY
            )
            if plan is not None
            else (0, 0)
        )
        return DryRun(_would_be(scope.client_id, domain_id, key, body), checked, re_resolved)
    revision = await _write_revision(
        session,
        client_id=scope.client_id,
        domain_id=domain_id,
        service_id=None,
        key=key,
        body=body,
        governing_schema=definitions if key == DEFAULT_KEY and body.status == "active" else None,
    )
    if plan is not None and key == DEFAULT_KEY:
        await freeze.apply_plan(session, client_id=scope.client_id, domain_id=domain_id, plan=plan)
    return revision


def _would_be(client_id: str, domain_id: str, key: str, body: AssignmentUpsert) -> dict[str, Any]:
    """The revision a dry run would insert (no id and no timestamps: it does not exist)."""
    return {
        "assignment_id": None,
        "client_id": client_id,
        "domain_id": domain_id,
        "service_id": None,
        "assignment_key": key,
        "model_id": body.model_id,
        "model_version": body.model_version,
        "status": body.status,
        "role": body.role,
        "settings": body.settings,
        "metadata": body.metadata,
        **_experiment(body),
        "created_by": None,
        "created_at": None,
        "updated_at": None,
    }


async def upsert_service_assignment(
    session: AsyncSession, scope: TenantScope, domain_id: str, service_id: str, key: str, body: AssignmentUpsert
) -> Assignment:
    """Service scope: no domain-wide check."""
    domain = await load_domain(session, scope.client_id, domain_id, lock="share")
    await load_service(session, scope.client_id, domain_id, service_id, for_update=True)
    await ensure_writable(session, scope)
    ensure_domain_active(domain)
    if body.service_updates:
        raise Unprocessable("service_updates are only allowed on the domain's default assignment")
    check_experiment(body)
    await model_reference(session, body.model_id, body.model_version)
    await experiment_references(session, body)
    return await _write_revision(
        session, client_id=scope.client_id, domain_id=domain_id, service_id=service_id, key=key, body=body
    )


async def _ensure_scope(session: AsyncSession, client_id: str, domain_id: str, service_id: str | None) -> Domain:
    domain = await load_domain(session, client_id, domain_id)
    if service_id is not None:
        await load_service(session, client_id, domain_id, service_id)
    return domain


async def list_assignments(
    session: AsyncSession,
    scope: TenantScope,
    domain_id: str,
    service_id: str | None,
    status: str | None,
    page: PageParams,
    response: Response,
) -> list[Assignment]:
    await _ensure_scope(session, scope.client_id, domain_id, service_id)
    stmt = select(Assignment).where(*_scope_filter(scope.client_id, domain_id, service_id))
    if status is not None:
        stmt = stmt.where(Assignment.status == status)
    return await paginate(
        session, stmt, [Assignment.assignment_key, Assignment.created_at, Assignment.assignment_id], page, response
    )


async def get_active(
    session: AsyncSession, scope: TenantScope, domain_id: str, service_id: str | None, key: str
) -> Assignment:
    await _ensure_scope(session, scope.client_id, domain_id, service_id)
    revision = await _active_revision(session, scope.client_id, domain_id, service_id, key)
    if revision is None:
        raise NotFound(f"no active assignment {key} in {_scope_name(domain_id, service_id)}")
    return revision


async def list_revisions(
    session: AsyncSession,
    scope: TenantScope,
    domain_id: str,
    service_id: str | None,
    key: str,
    page: PageParams,
    response: Response,
) -> list[Assignment]:
    """Every revision of the key, newest first (404 if the key never existed in the scope)."""
    await _ensure_scope(session, scope.client_id, domain_id, service_id)
    if not await _key_exists(session, scope.client_id, domain_id, service_id, key):
        raise NotFound(f"assignment {key} not found in {_scope_name(domain_id, service_id)}")
    stmt = select(Assignment).where(
        *_scope_filter(scope.client_id, domain_id, service_id), Assignment.assignment_key == key
    )
    return await paginate(
        session, stmt, [Assignment.created_at, Assignment.assignment_id], page, response, descending=True
    )


_ASSIGNMENTS = Assignment.__table__.c
# the revision as ``AssignmentOut`` shows it (the governing-schema snapshot is read through the
# domain's contract, not with every revision)
_READ_ACTIVE_DOMAIN_REVISION = select(*[c for c in _ASSIGNMENTS if c.key != "governing_schema"]).where(
    _ASSIGNMENTS.client_id == bindparam("client_id"),
    _ASSIGNMENTS.domain_id == bindparam("domain_id"),
    _ASSIGNMENTS.service_id.is_(None),
    _ASSIGNMENTS.assignment_key == bindparam("key"),
    _ASSIGNMENTS.status == "active",
)


async def read_active_domain_revision(client_id: str, domain_id: str, key: str) -> Mapping[str, Any] | None:
    """The key's active domain revision from one Core read outside any transaction (None when
    there is none: its client and domain exist whenever it does). The read of ``GET
    .../assignments/{key}``, on the fast layer and in the route."""
    return await reads.fetch_one(
        _READ_ACTIVE_DOMAIN_REVISION, {"client_id": client_id, "domain_id": domain_id, "key": key}
    )


async def _active_revision(
    session: AsyncSession, client_id: str, domain_id: str, service_id: str | None, key: str
) -> Assignment | None:
    stmt = select(Assignment).where(
        *_scope_filter(client_id, domain_id, service_id),
        Assignment.assignment_key == key,
        Assignment.status == "active",
    )
    return await session.scalar(stmt)


async def _key_exists(session: AsyncSession, client_id: str, domain_id: str, service_id: str | None, key: str) -> bool:
    stmt = (
        select(Assignment.assignment_id)
        .where(*_scope_filter(client_id, domain_id, service_id), Assignment.assignment_key == key)
        .limit(1)
    )
    return (await session.scalar(stmt)) is not None


# -- assignment jobs (spec 9.1) ------------------------------------------------------------------


def launch_domain_features(domain: Domain, job_type: str, service_id: str | None) -> list[Any] | None:
    """What a job launched through an assignment carries as ``domain_features`` (spec 15.1): the
    domain's live features for a training job through a domain-scope key, else nothing."""
    return domain.features if job_type == "training" and service_id is None else None


async def run_assignment_job(
    session: AsyncSession,
    scope: TenantScope,
    domain_id: str,
    service_id: str | None,
    key: str,
    body: AssignmentJobRequest,
) -> Job:
    """Start a job through the key's active revision; the job keeps that revision's id."""
    # the domain row FOR SHARE: a concurrent default upsert (re-resolving services, freezing
    # the schema) is either fully before this job or fully after it
    domain = await load_domain(session, scope.client_id, domain_id, lock="share")
    service = await load_service(session, scope.client_id, domain_id, service_id) if service_id else None
    revision = await _active_revision(session, scope.client_id, domain_id, service_id, key)
    if revision is None and not await _key_exists(session, scope.client_id, domain_id, service_id, key):
        raise NotFound(f"assignment {key} not found in {_scope_name(domain_id, service_id)}")
    await ensure_writable(session, scope)
    ensure_domain_active(domain)
    if revision is None:
        raise Unprocessable(f"assignment {key} is archived in {_scope_name(domain_id, service_id)}: no active revision")
    if body.subscribe and body.job_type != "inference":
        raise Unprocessable("subscribe is only valid for inference jobs")

    # the arm's version row stays locked until commit, so it cannot turn `failed` between this
    # check and the job's commit; with a split, the arm is the service's (or a random one)
    job = await arms.launch(
        session,
        revision,
        job_type=body.job_type,
        input=body.input,
        features=service.resolved_features if service is not None else None,
        # a job never writes a version (spec 15.1): training through a domain assignment carries
        # the domain's live features (the next-train draft) to its handler instead
        domain_features=launch_domain_features(domain, body.job_type, service_id),
        client_id=scope.client_id,
        domain_id=domain_id,
        service_id=service_id,
        check_input=True,
    )
    audit.describe(session, target_id=job.job_id)
    if body.subscribe:
        # the registry's one way to store a replay (UUIDv7 id, input warnings, an identical
        # active replay reused), bound to this key in this scope
        await subscribe_inference(
            session,
            model_id=revision.model_id,
            input=body.input,
            client_id=scope.client_id,
            domain_id=domain_id,
            service_id=service_id,
            assignment_key=key,
            label=f"replay through assignment {key} ({_scope_name(domain_id, service_id)})",
        )
    return job


# -- reading an experiment (spec 15.7) -----------------------------------------------------------


async def experiment_arms(
    session: AsyncSession, scope: TenantScope, domain_id: str, service_id: str | None, key: str
) -> dict[str, Any]:
    """``GET .../assignments/{key}/arms``: every arm of the key's active revision (404 if none)
    with the jobs launched through that revision on it, by status: one grouped query. Jobs of
    the revision written before experiments existed (no arm) count as the primary's."""
    revision = await get_active(session, scope, domain_id, service_id, key)
    arm = func.coalesce(Job.arm, arms.PRIMARY)
    stmt = (
        select(arm.label("arm"), Job.model_id, Job.model_version, Job.status, func.count().label("n"))
        .where(Job.assignment_id == revision.assignment_id)
        .group_by(arm, Job.model_id, Job.model_version, Job.status)
    )
    counts: dict[tuple[str, str, str], dict[str, int]] = {}
    for row in (await session.execute(stmt)).all():
        counts.setdefault((row.arm, row.model_id, row.model_version), {})[row.status] = row.n
    out = []
    for entry in arms.arms_of(revision):
        by_status = counts.get((entry.arm, entry.model_id, entry.model_version), {})
        out.append(
            {
                "arm": entry.arm,
                "model_id": entry.model_id,
                "model_version": entry.model_version,
                "percent": entry.percent,
                "jobs": sum(by_status.values()),
                **{status: by_status.get(status, 0) for status in ("pending", "started", "success", "failure")},
            }
        )
    return {"assignment_id": revision.assignment_id, "assignment_key": revision.assignment_key, "arms": out}


async def recent_shadow_jobs(session: AsyncSession, assignment_id: Any, limit: int = 10) -> list[Job]:
    """The newest shadow jobs launched through a revision (the console's experiment panel)."""
    stmt = (
        select(Job)
        .where(Job.assignment_id == assignment_id, Job.arm == arms.SHADOW)
        .order_by(Job.job_id.desc())
        .limit(limit)
    )
    return list((await session.scalars(stmt)).all())
