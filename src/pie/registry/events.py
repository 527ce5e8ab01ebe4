"""Firing event subscriptions (spec 8).

``fire_subscriptions`` is called by ``new_status`` (training_complete, from this package) and by
job completion (inference_complete, from ``pie.jobs``). Each active subscription with the given
source and trigger yields one entry: ``{subscription_id, job_id}`` when its job was recorded, or
``{subscription_id, error}`` when its target could not be triggered. One failing target never
stops the others.

``fire_triggers`` fires for many triggers at once (a batch of completed jobs): subscriptions and
targets are resolved with a fixed number of set-based queries, whatever the number of triggers
and subscriptions, and the jobs are inserted in one statement inside a savepoint; if that insert
fails, every firing is retried in its own savepoint so only the culprit becomes an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Text, and_, cast, func, insert, or_, select, tuple_
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from pie.assignments.models import Assignment
from pie.audit import context as audit
from pie.audit.models import VersionStatusChange
from pie.auth import Principal
from pie.clients.models import Client
from pie.jobs.logic import notify_new_jobs
from pie.jobs.models import Job
from pie.jsonschemas import validation_error
from pie.registry.handlers import input_schema
from pie.registry.models import EventSubscription, ModelVersion
from pie.tenancy.models import Domain, Service

log = logging.getLogger("pie.registry.events")


# internal key of a firing entry: the tenant of a replay subscription (None for the others);
# see ``shown_to``
TENANT_KEY = "_client_id"


@dataclass
class Trigger:
    """One event: ``source_model_id``'s ``trigger_event`` happened with this output."""

    source_model_id: str
    trigger_output: Any
    source_model_version: str | None = None
    # the tenant of the job or status change that fired (None: a platform event); jobs fired
    # by a subscription without a tenant of its own inherit it (spec 14.1)
    client_id: str | None = None


@dataclass
class _Firing:
    subscription: EventSubscription
    job: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


async def _recently_activated_versions(session: AsyncSession, model_ids: set[str]) -> dict[str, ModelVersion]:
    """model id -> its most recently activated ``active`` version (spec 15.3), for every model
    that has one: by the version's latest change to ``active`` in the status history; a version
    with no such record (activated before the history existed, or written directly) counts as
    activated when it was created; ties go to the newest version."""
    if not model_ids:
        return {}
    history = VersionStatusChange
    activated = (
        select(func.max(history.changed_at))
        .where(
            history.model_id == ModelVersion.model_id,
            history.version == ModelVersion.version,
            history.to_status == "active",
        )
        .scalar_subquery()
    )
    stmt = (
        select(ModelVersion)
        .where(ModelVersion.model_id.in_(sorted(model_ids)), ModelVersion.status == "active")
        .order_by(
            ModelVersion.model_id,
            func.coalesce(activated, ModelVersion.created_at).desc(),
            ModelVersion.seq.desc(),
        )
        .ext(distinct_on(ModelVersion.model_id))
    )
    return {v.model_id: v for v in await session.scalars(stmt)}


async def _retrained_versions(
    session: AsyncSession, trigger_event: str, triggers: list[Trigger], subscriptions: list[EventSubscription]
) -> dict[tuple[str, str], ModelVersion]:
    """(model id, version) -> the version, for the triggers whose model's own ``training_complete``
    subscriptions fire on the version just retrained (spec 15.3)."""
    if trigger_event != "training_complete":
        return {}
    own = {
        s.source_model_id for s in subscriptions if s.assignment_key is None and s.target_model_id == s.source_model_id
    }
    keys = sorted(
        {
            (t.source_model_id, t.source_model_version)
            for t in triggers
            if t.source_model_id in own and t.source_model_version is not None
        }
    )
    if not keys:
        return {}
    rows = await session.scalars(
        select(ModelVersion).where(tuple_(ModelVersion.model_id, ModelVersion.version).in_(keys))
    )
    return {(v.model_id, v.version): v for v in rows}


_ScopeKey = tuple[str | None, str | None, str | None, str | None]


async def _active_assignments(session: AsyncSession, subscriptions: list[EventSubscription]) -> dict[_ScopeKey, Any]:
    """(client, domain, service|None, key) -> row (assignment, version, domain/client status,
    service features) for the active revision of each replay subscription's key (exactly those
    scopes: a service key is not looked up in every service of the domain)."""
    domain_keys = {(s.client_id, s.domain_id, s.assignment_key) for s in subscriptions if s.service_id is None}
    service_keys = {
        (s.client_id, s.domain_id, s.service_id, s.assignment_key) for s in subscriptions if s.service_id is not None
    }
    scopes = []
    if domain_keys:
        scopes.append(
            and_(
                Assignment.service_id.is_(None),
                tuple_(Assignment.client_id, Assignment.domain_id, Assignment.assignment_key).in_(sorted(domain_keys)),
            )
        )
    if service_keys:
        scopes.append(
            tuple_(Assignment.client_id, Assignment.domain_id, Assignment.service_id, Assignment.assignment_key).in_(
                sorted(service_keys)
            )
        )
    if not scopes:
        return {}
    stmt = (
        select(
            Assignment,
            ModelVersion.status.label("version_status"),
            ModelVersion.handler_contracts.label("contracts"),
            Domain.status.label("domain_status"),
            Client.status.label("client_status"),
            Service.resolved_features.label("features"),
        )
        .join(
            ModelVersion,
            (ModelVersion.model_id == Assignment.model_id) & (ModelVersion.version == Assignment.model_version),
        )
        .join(Domain, (Domain.client_id == Assignment.client_id) & (Domain.domain_id == Assignment.domain_id))
        .join(Client, Client.client_id == Assignment.client_id)
        .outerjoin(
            Service,
            (Service.client_id == Assignment.client_id)
            & (Service.domain_id == Assignment.domain_id)
            & (Service.service_id == Assignment.service_id),
        )
        .where(Assignment.status == "active", or_(*scopes))
    )
    found: dict[_ScopeKey, Any] = {}
    for row in (await session.execute(stmt)).all():
        a = row.Assignment
        found[(a.client_id, a.domain_id, a.service_id, a.assignment_key)] = row
    return found


def _input_warnings(contracts: dict[str, Any] | None, action: str, value: dict[str, Any]) -> list[str]:
    schema = input_schema(contracts, action)
    if schema is None:
        return []
    error = validation_error(schema, value)
    return [] if error is None else [f"input does not match the {action} input_schema: {error}"]


def _scope_label(s: EventSubscription) -> str:
    where = f"client {s.client_id} domain {s.domain_id}"
    return where + (f" service {s.service_id}" if s.service_id is not None else "")


def _plan(
    subscription: EventSubscription,
    trigger: Trigger,
    versions: dict[str, ModelVersion],
    retrained: dict[tuple[str, str], ModelVersion],
    assignments: dict[_ScopeKey, Any],
) -> _Firing:
    firing = _Firing(subscription)
    trigger_output = trigger.trigger_output
    if subscription.input_source == "stored":
        job_input = subscription.input if subscription.input is not None else {}
    else:
        job_input = trigger_output if trigger_output is not None else {}
    if not isinstance(job_input, dict):
        firing.error = (
            f"the trigger output is a JSON {type(job_input).__name__}, not an object; it cannot be a job input"
        )
        return firing
    job: dict[str, Any] = {
        "job_type": subscription.target_action,
        "input": job_input,
        "subscription_id": subscription.id,
        "assignment_id": None,
        # a subscription's own tenant (replay subscriptions) wins; else the trigger's
        "client_id": subscription.client_id if subscription.client_id is not None else trigger.client_id,
        "domain_id": None,
        "service_id": None,
        "features": None,
        "arm": None,
    }
    if subscription.assignment_key is None:
        # a model's own training_complete subscription: the version whose training completed;
        # every other firing: the target's most recently activated version
        version = None
        if subscription.source_model_id == subscription.target_model_id and trigger.source_model_version:
            version = retrained.get((subscription.target_model_id, trigger.source_model_version))
        if version is None or version.status != "active":
            version = versions.get(subscription.target_model_id)
        if version is None:
            firing.error = f"model {subscription.target_model_id} has no active version"
            return firing
        job.update(model_id=version.model_id, model_version=version.version)
        contracts = version.handler_contracts
    else:
        key = (subscription.client_id, subscription.domain_id, subscription.service_id, subscription.assignment_key)
        row = assignments.get(key)
        if row is None:
            firing.error = (
                f"assignment key {subscription.assignment_key} has no active revision in {_scope_label(subscription)}"
            )
            return firing
        a: Assignment = row.Assignment
        if row.client_status != "active":
            firing.error = f"client {a.client_id} is suspended"
            return firing
        if row.domain_status != "active":
            firing.error = f"domain {a.domain_id} is inactive"
            return firing
        if row.version_status in ("failed", "archived"):
            state = "failed" if row.version_status == "failed" else "is archived"
            firing.error = f"assignment key {a.assignment_key} points to model {a.model_id} version {a.model_version}, which {state}"
            return firing
        job.update(
            model_id=a.model_id,
            model_version=a.model_version,
            assignment_id=a.assignment_id,
            client_id=a.client_id,
            domain_id=a.domain_id,
            service_id=a.service_id,
            features=row.features if a.service_id is not None else None,
            # a replay through a key runs on its primary version: experiments split and shadow
            # the launches of callers, not subscription replays (docs/experiments.md)
            arm="primary",
        )
        contracts = row.contracts
    job["warnings"] = _input_warnings(contracts, subscription.target_action, job_input)
    firing.job = job
    return firing


async def fire_subscriptions(
    session: AsyncSession,
    *,
    source_model_id: str,
    trigger_event: str,
    trigger_output: Any,
    source_model_version: str | None = None,
    client_id: str | None = None,
) -> list[dict]:
    """Fire every ACTIVE subscription with this source and trigger; return one entry per firing:
    {"subscription_id": str, "job_id": str} or {"subscription_id": str, "error": str}, plus the
    internal TENANT_KEY (pass entries through ``shown_to`` before answering a caller).
    One failing target never stops the others (each firing is isolated in a savepoint)."""
    (entries,) = await fire_triggers(
        session, trigger_event, [Trigger(source_model_id, trigger_output, source_model_version, client_id)]
    )
    return entries


async def fire_triggers(session: AsyncSession, trigger_event: str, triggers: list[Trigger]) -> list[list[dict]]:
    """``fire_subscriptions`` for many triggers of one kind at once (e.g. a batch of completed
    inference jobs): the entries of each trigger, in the order of ``triggers``. The number of
    queries does not grow with the number of triggers or subscriptions."""
    results: list[list[dict]] = [[] for _ in triggers]
    if not triggers:
        return results
    subscriptions = list(
        (
            await session.scalars(
                select(EventSubscription)
                .where(
                    EventSubscription.source_model_id.in_(sorted({t.source_model_id for t in triggers})),
                    EventSubscription.trigger_event == trigger_event,
                    EventSubscription.status == "active",
                )
                .order_by(EventSubscription.created_at, EventSubscription.id)
            )
        ).all()
    )
    if not subscriptions:
        return results
    by_source: dict[str, list[EventSubscription]] = {}
    for subscription in subscriptions:
        by_source.setdefault(subscription.source_model_id, []).append(subscription)
    versions = await _recently_activated_versions(
        session, {s.target_model_id for s in subscriptions if s.assignment_key is None}
    )
    retrained = await _retrained_versions(session, trigger_event, triggers, subscriptions)
    assignments = await _active_assignments(session, [s for s in subscriptions if s.assignment_key is not None])
    firings = [
        (index, _plan(subscription, trigger, versions, retrained, assignments))
        for index, trigger in enumerate(triggers)
        for subscription in by_source.get(trigger.source_model_id, ())
    ]
    ready = [f for _, f in firings if f.error is None]

    recorded: set[str] = set()
    if ready:
        # job ids from the jobs table's own generator, known before the insert so that one
        # multi-row INSERT (no RETURNING order to rely on) records every firing
        job_ids = await session.scalars(
            select(cast(func.pie_uuid7(), Text)).select_from(func.generate_series(1, len(ready)))
        )
        actor = audit.actor(session)  # the triggering write's actor (None in the dispatcher)
        for firing, job_id in zip(ready, job_ids):
            firing.job["job_id"] = job_id
            firing.job["created_by"] = actor
        try:
            async with session.begin_nested():
                # Core, not ORM bulk: one executemany for all rows (the ORM splits a batch
                # wherever the set of non-null values changes)
                await session.execute(insert(Job.__table__), [f.job for f in ready])  # type: ignore[arg-type]  # __table__: a Table
            recorded = {f.job["job_id"] for f in ready}
        except SQLAlchemyError as exc:
            log.warning("bulk firing of %d subscriptions failed (%s); firing one by one", len(ready), exc)
            for firing in ready:
                try:
                    async with session.begin_nested():
                        await session.execute(insert(Job.__table__).values(**firing.job))  # type: ignore[arg-type]  # __table__: a Table
                    recorded.add(firing.job["job_id"])
                except SQLAlchemyError as single:
                    firing.error = f"could not record the job: {getattr(single, 'orig', None) or single}"
        if recorded:
            await notify_new_jobs(session)

    for index, firing in firings:
        sid = str(firing.subscription.id)
        tenant = firing.subscription.client_id
        if firing.error is None and firing.job.get("job_id") in recorded:
            results[index].append({"subscription_id": sid, "job_id": firing.job["job_id"], TENANT_KEY: tenant})
        else:
            error = firing.error or "the job was not recorded"
            trigger = triggers[index]
            log.info(
                "subscription %s (%s of model %s%s) not triggered: %s",
                sid,
                trigger_event,
                trigger.source_model_id,
                f" version {trigger.source_model_version}" if trigger.source_model_version else "",
                error,
            )
            results[index].append({"subscription_id": sid, "error": error, TENANT_KEY: tenant})
    return results


def shown_to(principal: Principal | None, entries: list[dict]) -> list[dict]:
    """The entries a caller may see, as response bodies: those of replay subscriptions of tenants
    the caller cannot access are left out (they name the tenant's domain, service and key; the
    subscriptions themselves are 404 for that caller), and the internal tenant key is dropped.
    ``principal`` None: every entry (internal callers)."""
    return [
        {k: v for k, v in entry.items() if k != TENANT_KEY}
        for entry in entries
        if principal is None or entry.get(TENANT_KEY) is None or principal.can_access(entry[TENANT_KEY])
    ]
