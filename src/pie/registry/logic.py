"""Models and model versions (spec 7.1-7.3): plain functions over a session; they flush, never
commit (the request's unit of work commits).

Locks: every change that allocates a version number or rewrites a model takes the model row with
``FOR NO KEY UPDATE``; a status change takes the version row the same way. ``NO KEY`` locks
serialize writers of the same row without blocking foreign-key checks (jobs, assignments,
versions referencing the row), so firing subscriptions across models cannot deadlock on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Response
from sqlalchemy import and_, cast, func, null, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from uuid6 import uuid7

from pie.audit import context as audit
from pie.audit.logic import record_status_change
from pie.auth import Principal
from pie.errors import Conflict, NotFound, Unprocessable
from pie.jobs.firing import fire_subscriptions, shown_to
from pie.jobs.hot import launch_inference
from pie.jobs.logic import create_job
from pie.jobs.versions import UNUSABLE, ensure_model_exists, get_model_version, unusable
from pie.jsonschemas import input_problem
from pie.pagination import PageParams, paginate
from pie.registry.handlers import (
    stale_actions,
    stale_output_events,
    validate_contracts,
    validate_handlers,
)
from pie.registry.schemas import InferenceRequest, ModelCreate, ModelUpdate, VersionCreate
from pie.registry.subscriptions import json_or_null, subscribe_inference
from pie.tables.assignments import Assignment
from pie.tables.clients import Client
from pie.tables.jobs import Job
from pie.tables.registry import EventSubscription, Model, ModelVersion
from pie.tenancy.features import validate_feature_definitions
from pie.webhooks import outbox as webhooks

log = logging.getLogger("pie.registry")

# (from, to) pairs allowed by ``new_status`` (spec 7.2); setting the current status is a no-op
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("pending", "training"),
        ("pending", "active"),
        ("training", "active"),
        ("training", "failed"),
        ("failed", "training"),
        # retiring a version (spec 15.4): only when no active assignment revision points at it
        ("active", "archived"),
        ("archived", "active"),
    }
)


# statuses whose version accepts no new job and no new assignment
class VersionInUse(Conflict):
    """409 for archiving a version that active assignment revisions point at: the envelope plus
    ``assignments: [{client_id, domain_id, service_id, assignment_key}]``."""

    def __init__(self, message: str, assignments: list[dict[str, Any]]):
        super().__init__(message)
        self.assignments = assignments

    def body(self) -> dict[str, Any]:
        return {**super().body(), "assignments": self.assignments}


# ---- models ----------------------------------------------------------------------------------


async def get_model(session: AsyncSession, model_id: str, *, for_update: bool = False) -> Model:
    stmt = select(Model).where(Model.id == model_id).execution_options(populate_existing=True)
    if for_update:
        stmt = stmt.with_for_update(key_share=True)
    model = await session.scalar(stmt)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


async def list_models(session: AsyncSession, page: PageParams, response: Response) -> list[Model]:
    return await paginate(session, select(Model), [Model.seq], page, response)


def _checked_handlers(body: ModelCreate | ModelUpdate) -> tuple[dict[str, Any], dict[str, Any] | None]:
    handlers = body.handlers_json()
    validate_handlers(handlers)
    contracts = body.contracts_json() or None
    validate_contracts(contracts)
    return handlers, contracts


async def create_model(session: AsyncSession, body: ModelCreate) -> Model:
    handlers, contracts = _checked_handlers(body)
    model_id = body.id or str(uuid7())
    stmt = (
        insert(Model)
        .values(
            id=model_id,
            name=body.name,
            description=body.description,
            handlers=handlers,
            handler_contracts=json_or_null(contracts),
            metadata_=body.metadata,
        )
        .on_conflict_do_nothing(index_elements=[Model.id])
        .returning(Model)
    )
    model = await session.scalar(stmt)
    if model is None:
        raise Conflict(f"model {model_id} already exists")
    audit.describe(session, target_id=model_id)
    return model


@dataclass
class ModelUpdateResult:
    model: Model
    new_version: ModelVersion | None
    versions_keeping_old_handlers: list[str]
    stale_subscriptions: list[str]
    updated_versions: list[str]


async def update_model(session: AsyncSession, model_id: str, body: ModelUpdate) -> ModelUpdateResult:
    """Full replacement of the model's fields.

    Staleness: subscriptions targeting the model go stale when the input contract (or, without
    contracts, the handler) of their action changes; ``trigger_output`` subscriptions from the
    model go stale when the output contract of the action whose completion fires them changes.

    An active model's versions snapshot handlers and contracts when they are created, so a
    change never alters them: the answer lists those that keep the previous ones, and a new
    pending version carrying the new ones is generated (spec 7.1). A pending model (no version
    ever active) is changed in place: its versions take the new handlers and contracts, so what
    they show is what runs (spec 15.3); the answer lists them as ``updated_versions``.

    The model row lock is taken first (as by ``create_version`` and by a version turning
    ``active``), so the model's status cannot change under this update."""
    model = await get_model(session, model_id, for_update=True)  # 404 before any 422
    handlers, contracts = _checked_handlers(body)
    stale = stale_actions(model.handlers, model.handler_contracts, handlers, contracts)
    stale_events = stale_output_events(model.handler_contracts, contracts)
    runtime_changed = model.handlers != handlers or model.handler_contracts != contracts
    await session.execute(
        update(Model)
        .where(Model.id == model_id)
        .values(
            name=body.name,
            description=body.description,
            handlers=handlers,
            handler_contracts=json_or_null(contracts),
            metadata_=body.metadata,
        )
    )
    went_stale: list[str] = []
    conditions = []
    if stale:
        conditions.append(
            and_(EventSubscription.target_model_id == model_id, EventSubscription.target_action.in_(stale))
        )
    if stale_events:
        conditions.append(
            and_(
                EventSubscription.source_model_id == model_id,
                EventSubscription.trigger_event.in_(stale_events),
                EventSubscription.input_source == "trigger_output",
            )
        )
    if conditions:
        went_stale = sorted(
            str(i)
            for i in (
                await session.scalars(
                    update(EventSubscription)
                    .where(or_(*conditions), EventSubscription.status.in_(("active", "paused")))
                    .values(status="stale")
                    .returning(EventSubscription.id)
                )
            ).all()
        )
    keeping: list[str] = []
    updated: list[str] = []
    if runtime_changed:
        differing = and_(
            ModelVersion.model_id == model_id,
            or_(
                ModelVersion.handlers != handlers,
                ModelVersion.handler_contracts.is_distinct_from(
                    cast(contracts, JSONB) if contracts is not None else null()
                ),
            ),
        )
        if model.status == "active":
            keeping = list(
                (await session.scalars(select(ModelVersion.version).where(differing).order_by(ModelVersion.seq))).all()
            )
        else:
            # in place (row locks in version order: no deadlock with another such update)
            locked = (
                select(ModelVersion.model_id, ModelVersion.version, ModelVersion.seq)
                .where(differing)
                .order_by(ModelVersion.seq)
                .with_for_update(key_share=True)
                .cte("locked")
            )
            rows = await session.execute(
                update(ModelVersion)
                .where(ModelVersion.model_id == locked.c.model_id, ModelVersion.version == locked.c.version)
                .values(handlers=handlers, handler_contracts=json_or_null(contracts), updated_at=func.now())
                .returning(ModelVersion.version, locked.c.seq)
            )
            updated = [row.version for row in sorted(rows.all(), key=lambda row: row.seq)]
            if updated:
                audit.describe(session, updated_versions=updated)
    new_version = None
    status_before = model.status
    model = await get_model(session, model_id)
    if status_before == "active" and runtime_changed:
        new_version = await _insert_version(
            session, model, version=None, description="generated by a model update", metadata={}, features=None
        )
        model = await get_model(session, model_id)
    return ModelUpdateResult(model, new_version, keeping, went_stale, updated)


# ---- versions --------------------------------------------------------------------------------


async def list_versions(
    session: AsyncSession, model_id: str, page: PageParams, response: Response, status: str | None = None
) -> list[ModelVersion]:
    await ensure_model_exists(session, model_id)
    stmt = select(ModelVersion).where(ModelVersion.model_id == model_id)
    if status is not None:
        stmt = stmt.where(ModelVersion.status == status)
    return await paginate(session, stmt, [ModelVersion.seq], page, response)


async def _next_version_number(session: AsyncSession, model: Model) -> str:
    """The next free integer above the model's counter (caller holds the model row lock)."""
    taken = set(
        (
            await session.scalars(
                select(ModelVersion.version).where(
                    ModelVersion.model_id == model.id, ModelVersion.version.regexp_match(r"^[1-9][0-9]{0,17}$")
                )
            )
        ).all()
    )
    candidate = model.version_counter + 1
    while str(candidate) in taken:
        candidate += 1
    # bookkeeping only: the model's updated_at stays as it was
    await session.execute(
        update(Model).where(Model.id == model.id).values(version_counter=candidate, updated_at=Model.updated_at)
    )
    return str(candidate)


async def _insert_version(
    session: AsyncSession,
    model: Model,
    *,
    version: str | None,
    description: str,
    metadata: dict[str, Any],
    features: list[dict[str, Any]] | None,
) -> ModelVersion:
    """Insert a version snapshotting the model's handlers and contracts (caller holds the lock)."""
    if version is None:
        version = await _next_version_number(session, model)
    stmt = (
        insert(ModelVersion)
        .values(
            model_id=model.id,
            version=version,
            description=description,
            metadata_=metadata,
            handlers=model.handlers,
            handler_contracts=json_or_null(model.handler_contracts),
            features=json_or_null(features),
            created_by=audit.actor(session),
        )
        .on_conflict_do_nothing(index_elements=[ModelVersion.model_id, ModelVersion.version])
        .returning(ModelVersion)
    )
    created = await session.scalar(stmt)
    if created is None:
        raise Conflict(f"model {model.id} already has a version {version}")
    return created


async def create_version(session: AsyncSession, model_id: str, body: VersionCreate) -> tuple[Model, ModelVersion]:
    model = await get_model(session, model_id, for_update=True)  # 404 before any 422
    features = validate_feature_definitions(body.features) if body.features is not None else None
    created = await _insert_version(
        session, model, version=body.version, description=body.description, metadata=body.metadata, features=features
    )
    audit.describe(session, target_id=f"{model_id}/{created.version}")
    return await get_model(session, model_id), created


async def latest_training(session: AsyncSession, model_id: str, version: str) -> tuple[Any, str | None, bool]:
    """(output, tenant, found) of the version's latest successful training job; ``({}, None,
    False)`` when there is none."""
    stmt = (
        select(Job.output, Job.client_id)
        .where(
            Job.model_id == model_id,
            Job.model_version == version,
            Job.job_type == "training",
            Job.status == "success",
        )
        .order_by(Job.completed_at.desc().nulls_last(), Job.job_id.desc())
        .limit(1)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return {}, None, False
    return (row.output if row.output is not None else {}), row.client_id, True


def only_tenant(principal: Principal | None) -> str | None:
    """The caller's tenant when it has exactly one (and is not an admin), else None."""
    if principal is None or principal.is_admin or len(principal.tenants) != 1:
        return None
    return next(iter(principal.tenants))


async def set_version_status(
    session: AsyncSession, model_id: str, version: str, status: str, principal: Principal | None = None
) -> tuple[Model, ModelVersion, list[dict[str, Any]]]:
    """Apply a transition; ``training -> active`` fires the model's training_complete
    subscriptions. The triggered events returned are those ``principal`` may see (all for None).

    ``active -> archived`` is a 409 (``VersionInUse``) while an active assignment revision of
    any tenant and scope points at the version. The version row is locked first (``FOR NO KEY
    UPDATE``) and every upsert holds it ``FOR SHARE`` until it commits (``model_reference``), so
    the check sees every revision committed before it and no revision can point at the version
    once it is archived (the upsert then reads ``archived``: 422)."""
    if status == "active":
        # a version turning active may turn its model active: the model row first, as every
        # writer of the model takes it (``update_model`` changes a pending model's versions)
        await get_model(session, model_id, for_update=True)
    found = await get_model_version(session, model_id, version, for_update=True)
    previous = found.status
    if previous == status:
        return await get_model(session, model_id), found, []
    if (previous, status) not in TRANSITIONS:
        allowed = sorted(to for (frm, to) in TRANSITIONS if frm == previous)
        raise Unprocessable(
            f"invalid status transition for model {model_id} version {version}: {previous} -> {status} "
            f"(allowed from {previous}: {', '.join(allowed) or 'none'})"
        )
    if status == "archived":
        await _ensure_unassigned(session, model_id, version)
    await session.execute(
        update(ModelVersion)
        .where(ModelVersion.model_id == model_id, ModelVersion.version == version)
        .values(status=status)
    )
    await record_status_change(session, model_id, version, previous, status)
    await webhooks.versions_status_changed(session, [(model_id, version, previous)])
    audit.describe(session, **{"from": previous, "to": status})
    if status == "active":
        # a model becomes active when one of its versions first becomes active
        await session.execute(
            update(Model).where(Model.id == model_id, Model.status == "pending").values(status="active")
        )
    triggered: list[dict[str, Any]] = []
    if previous == "training" and status == "active":
        # the event's tenant (inherited by the jobs it fires, spec 14.1): that of the training
        # job whose output it carries; without one, the tenant of the caller changing the status
        output, tenant, found_training = await latest_training(session, model_id, version)
        triggered = await fire_subscriptions(
            session,
            source_model_id=model_id,
            trigger_event="training_complete",
            trigger_output=output,
            source_model_version=version,
            client_id=tenant if found_training else only_tenant(principal),
        )
    found = await get_model_version(session, model_id, version)
    triggered = shown_to(principal, triggered)
    return await get_model(session, model_id), found, triggered


async def _ensure_unassigned(session: AsyncSession, model_id: str, version: str) -> None:
    """409 listing the active assignment revisions (any tenant, any scope) that point at the
    version. The caller holds the version row lock."""
    a = Assignment
    rows = (
        await session.execute(
            select(a.client_id, a.domain_id, a.service_id, a.assignment_key)
            .where(
                a.status == "active",
                or_(
                    and_(a.model_id == model_id, a.model_version == version),
                    # a split arm or a shadow of an experiment (spec 15.7)
                    a.split.contains([{"model_id": model_id, "model_version": version}]),
                    a.shadow.contains([{"model_id": model_id, "model_version": version}]),
                ),
            )
            .order_by(a.client_id, a.domain_id, a.service_id.nulls_first(), a.assignment_key)
        )
    ).all()
    if rows:
        raise VersionInUse(
            f"model {model_id} version {version} cannot be archived: {len(rows)} active assignment(s) point at it; "
            "reassign or archive them first",
            [
                {
                    "client_id": r.client_id,
                    "domain_id": r.domain_id,
                    "service_id": r.service_id,
                    "assignment_key": r.assignment_key,
                }
                for r in rows
            ],
        )


# ---- direct inference ------------------------------------------------------------------------


def requested_tenant(principal: Principal, requested: str | None) -> str | None:
    """The tenant a direct-inference job records, before the client row is checked: the named
    ``client_id`` (which the caller must be able to access: 403); else the caller's only tenant;
    else None (a platform job)."""
    if requested is not None:
        principal.require_tenant(requested)
        return requested
    return only_tenant(principal)


def inference_problem(
    model_id: str, version: str, status: str, contracts: dict[str, Any] | None, input: dict[str, Any]
) -> str | None:
    """Why this version cannot run inference on ``input`` (the 422 message), or None: a failed
    version, or an input that does not match the version's inference ``input_schema``."""
    if status in UNUSABLE:
        return f"model {model_id} version {version} {unusable(status)}; it cannot run inference"
    return input_problem(contracts, "inference", input, model_id, version)


async def inference_tenant(session: AsyncSession, principal: Principal, requested: str | None) -> str | None:
    """The tenant a direct-inference job records (spec 14.1): the named ``client_id`` (which the
    caller must be able to access: 403); else the caller's only tenant; else None (a platform
    job). The tenant must exist (404) and be active (422), as for any job launch under it."""
    tenant = requested_tenant(principal, requested)
    if tenant is None:
        return None
    status = await session.scalar(select(Client.status).where(Client.client_id == tenant).with_for_update(read=True))
    if status is None:
        raise NotFound(f"client {tenant} not found")
    if status != "active":
        raise Unprocessable(f"client {tenant} is suspended")
    return tenant


async def run_inference(
    session: AsyncSession,
    model_id: str,
    version: str,
    body: InferenceRequest,
    principal: Principal,
    *,
    method: str = "POST",
    path: str = "",
) -> str:
    """An inference job on this exact version, recording the caller's tenant
    (``inference_tenant``); its id. ``subscribe`` stores the input as a ``training_complete ->
    inference / stored`` subscription on the model, in the same tenant (so only that tenant
    sees the stored input, and its replays are that tenant's jobs). Without ``subscribe``, in a
    request (an audit entry), the job, its audit row (``method``, ``path``) and the NOTIFY are
    one statement: ``pie.jobs.hot.LAUNCH``, the statement of the fast write layer."""
    tenant = await inference_tenant(session, principal, body.client_id)
    found = await get_model_version(session, model_id, version, for_share=True)
    problem = inference_problem(model_id, version, found.status, found.handler_contracts, body.input)
    if problem is not None:
        raise Unprocessable(problem)
    handlers = found.handlers if isinstance(found.handlers, dict) else None
    entry = audit.entry(session)
    if not body.subscribe and entry is not None:
        handler = (handlers or {}).get("inference")
        return await launch_inference(
            session,
            entry,
            model_id=model_id,
            version=version,
            input=body.input,
            client_id=tenant,
            handler=handler if isinstance(handler, dict) else None,
            method=method,
            path=path,
        )
    job = await create_job(
        session,
        job_type="inference",
        model_id=model_id,
        model_version=version,
        input=body.input,
        client_id=tenant,
        handlers=handlers,
    )
    audit.describe(session, target_id=job.job_id, client_id=job.client_id)
    if body.subscribe:
        await subscribe_inference(session, model_id=model_id, input=body.input, client_id=tenant)
    return job.job_id
