"""Event subscriptions (spec 8): CRUD, stored-input warnings and ``subscribe: true``.

A subscription belongs to its source model (the path's ``model_id``). Replay subscriptions made
by ``subscribe: true`` on an assignment job carry a tenant scope (``client_id`` ...); callers
see and change only those of tenants they may access (admins: all), others answer 404.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from typing import Any, Literal

from fastapi import Response
from sqlalchemy import ColumnElement, delete, func, null, or_, select, text, true
from sqlalchemy.ext.asyncio import AsyncSession
from uuid6 import uuid7

from pie.audit import context as audit
from pie.auth import Principal
from pie.errors import NotFound, Unprocessable
from pie.jsonschemas import input_schema, validation_error
from pie.pagination import PageParams, paginate
from pie.registry.schemas import SubscriptionCreate, SubscriptionUpdate
from pie.tables.registry import EventSubscription, Model


def json_or_null(value: Any) -> Any:
    """SQL NULL (not JSON ``null``) for an absent JSONB value, so ``IS NULL`` means "not set"."""
    return null() if value is None else value


def new_subscription_id() -> uuid.UUID:
    """UUIDv7: time-ordered, so listing by id lists in creation order."""
    return uuid.UUID(str(uuid7()))


def visible_to(principal: Principal) -> ColumnElement[bool]:
    if principal.is_admin:
        return true()
    return or_(EventSubscription.client_id.is_(None), EventSubscription.client_id.in_(sorted(principal.tenants)))


def input_warnings(target: Model, action: str, value: dict[str, Any] | None) -> list[str]:
    """Warnings (not errors) for a stored input failing the target model's ``input_schema``."""
    schema = input_schema(target.handler_contracts, action)
    if schema is None or value is None:
        return []
    error = validation_error(schema, value)
    if error is None:
        return []
    return [f"stored input does not match the {action} input_schema of model {target.id}: {error}"]


async def _source_model(session: AsyncSession, model_id: str) -> Model:
    model = await session.get(Model, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


async def _target_model(session: AsyncSession, model_id: str) -> Model:
    model = await session.get(Model, model_id, populate_existing=True)
    if model is None:
        raise Unprocessable(f"target model {model_id} does not exist")
    return model


async def list_subscriptions(
    session: AsyncSession, model_id: str, principal: Principal, page: PageParams, response: Response
) -> list[EventSubscription]:
    await _source_model(session, model_id)
    stmt = select(EventSubscription).where(EventSubscription.source_model_id == model_id, visible_to(principal))
    return await paginate(session, stmt, [EventSubscription.id], page, response)


async def get_subscription(
    session: AsyncSession,
    model_id: str,
    subscription_id: uuid.UUID,
    principal: Principal,
    *,
    for_update: bool | Literal["delete"] = False,
) -> EventSubscription:
    stmt = (
        select(EventSubscription)
        .where(
            EventSubscription.id == subscription_id,
            EventSubscription.source_model_id == model_id,
            visible_to(principal),
        )
        .execution_options(populate_existing=True)
    )
    if for_update:
        # NO KEY UPDATE unless deleting: jobs referencing the row (firings) are not blocked
        stmt = stmt.with_for_update(key_share=for_update != "delete")
    found = await session.scalar(stmt)
    if found is None:
        await _source_model(session, model_id)
        raise NotFound(f"model {model_id} has no event subscription {subscription_id}")
    return found


# serializes every activation of an inference_complete -> inference edge, so two concurrent
# requests cannot each add one half of a loop
_LOOP_LOCK = "pie.registry.inference-loops"

_REACHABLE_EDGES = text(
    """
    WITH RECURSIVE reach(model_id) AS (
        SELECT CAST(:start AS varchar)
        UNION
        SELECT s.target_model_id FROM event_subscriptions AS s JOIN reach AS r ON s.source_model_id = r.model_id
        WHERE s.trigger_event = 'inference_complete' AND s.target_action = 'inference' AND s.status = 'active'
          AND s.id IS DISTINCT FROM :exclude
    )
    SELECT s.source_model_id, s.target_model_id FROM event_subscriptions AS s JOIN reach AS r ON s.source_model_id = r.model_id
    WHERE s.trigger_event = 'inference_complete' AND s.target_action = 'inference' AND s.status = 'active'
      AND s.id IS DISTINCT FROM :exclude
    """
)


def _chains(trigger_event: str, target_action: str, status: str | None) -> bool:
    """Whether an edge re-fires by itself: a successful inference fires inference_complete, whose
    inference job succeeds and fires again (training jobs and training_complete fire nothing)."""
    return trigger_event == "inference_complete" and target_action == "inference" and status == "active"


async def _ensure_no_inference_loop(
    session: AsyncSession, source: str, target: str, exclude: uuid.UUID | None = None
) -> None:
    """422 when an active inference_complete -> inference edge source -> target would close a
    loop of such edges: every inference on it would fire the next for ever (and multiply)."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(_LOOP_LOCK, 0))))
    edges = (await session.execute(_REACHABLE_EDGES, {"start": target, "exclude": exclude})).all()
    successors: dict[str, list[str]] = {}
    for edge in edges:
        successors.setdefault(edge.source_model_id, []).append(edge.target_model_id)
    came_from: dict[str, str | None] = {target: None}  # breadth-first from the new edge's target
    queue = deque([target])
    while queue and source not in came_from:
        model_id = queue.popleft()
        for following in successors.get(model_id, ()):
            if following not in came_from:
                came_from[following] = model_id
                queue.append(following)
    if source not in came_from:
        return
    back = [source]
    while (previous := came_from[back[-1]]) is not None:
        back.append(previous)
    loop = [source, *reversed(back)]
    raise Unprocessable(
        "this subscription would close an inference loop ("
        + " -> ".join(loop)
        + "): every inference_complete would fire the next inference for ever; pause or delete a link first"
    )


def _check_input(input_source: str, value: dict[str, Any] | None) -> None:
    if input_source == "stored" and value is None:
        raise Unprocessable("input is required when input_source is 'stored'")
    if input_source == "trigger_output" and value is not None:
        raise Unprocessable(
            "input must be omitted when input_source is 'trigger_output' (the trigger's output is used)"
        )


async def create_subscription(session: AsyncSession, model_id: str, body: SubscriptionCreate) -> EventSubscription:
    await _source_model(session, model_id)
    _check_input(body.input_source, body.input)
    target = await _target_model(session, body.target_model_id)
    if _chains(body.trigger_event, body.target_action, body.status):
        await _ensure_no_inference_loop(session, model_id, target.id)
    subscription = EventSubscription(
        id=new_subscription_id(),
        source_model_id=model_id,
        trigger_event=body.trigger_event,
        target_model_id=target.id,
        target_action=body.target_action,
        input_source=body.input_source,
        input=json_or_null(body.input),
        label=body.label,
        status=body.status,
        warnings=input_warnings(target, body.target_action, body.input),
        created_by=audit.actor(session),
    )
    session.add(subscription)
    await session.flush()
    await session.refresh(subscription)
    audit.describe(session, target_id=str(subscription.id))
    return subscription


async def update_subscription(
    session: AsyncSession, model_id: str, subscription_id: uuid.UUID, body: SubscriptionUpdate, principal: Principal
) -> EventSubscription:
    """Partial update. Warnings are recomputed against the target's current contract; setting
    ``status: active`` on a stale subscription re-activates it."""
    given = body.model_fields_set  # an explicit null status never gets here: the schema refuses it (400)
    subscription = await get_subscription(session, model_id, subscription_id, principal, for_update=True)
    if "input" in given:
        _check_input(subscription.input_source, body.input)
        subscription.input = json_or_null(body.input)
    if "label" in given:
        subscription.label = body.label
    if "status" in given:
        if subscription.status != "active" and _chains(
            subscription.trigger_event, subscription.target_action, body.status
        ):
            await _ensure_no_inference_loop(
                session, subscription.source_model_id, subscription.target_model_id, exclude=subscription.id
            )
        subscription.status = body.status
    target = await _target_model(session, subscription.target_model_id)
    stored = body.input if "input" in given else subscription.input
    subscription.warnings = input_warnings(target, subscription.target_action, stored)
    await session.flush()
    await session.refresh(subscription)
    return subscription


async def delete_subscription(
    session: AsyncSession, model_id: str, subscription_id: uuid.UUID, principal: Principal
) -> None:
    subscription = await get_subscription(session, model_id, subscription_id, principal, for_update="delete")
    await session.execute(delete(EventSubscription).where(EventSubscription.id == subscription.id))
    session.expunge(subscription)


async def subscribe_inference(
    session: AsyncSession,
    *,
    model_id: str,
    input: dict[str, Any],
    client_id: str | None = None,
    domain_id: str | None = None,
    service_id: str | None = None,
    assignment_key: str | None = None,
    label: str | None = None,
) -> EventSubscription:
    """``subscribe: true``: store ``input`` as a ``training_complete -> inference / stored``
    subscription with source = target = ``model_id``, so the inference is replayed after
    retraining. With an assignment scope (``client_id``, ``domain_id``, ``service_id`` or None for
    domain scope, ``assignment_key``) the replay re-runs through that key's active revision.

    An identical active subscription (same model, input and scope) is reused, so repeating the
    same subscribed call does not multiply replays. Identical concurrent calls serialize on a
    transaction-level advisory lock keyed on that identity, so they cannot both insert."""
    identity = json.dumps(
        ["pie.subscribe", model_id, client_id, domain_id, service_id, assignment_key, input],
        sort_keys=True,
        separators=(",", ":"),
    )
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(identity, 0))))
    existing = await session.scalar(
        select(EventSubscription)
        .where(
            EventSubscription.source_model_id == model_id,
            EventSubscription.target_model_id == model_id,
            EventSubscription.trigger_event == "training_complete",
            EventSubscription.target_action == "inference",
            EventSubscription.input_source == "stored",
            EventSubscription.status == "active",
            EventSubscription.input == input,
            EventSubscription.client_id.is_not_distinct_from(client_id),
            EventSubscription.domain_id.is_not_distinct_from(domain_id),
            EventSubscription.service_id.is_not_distinct_from(service_id),
            EventSubscription.assignment_key.is_not_distinct_from(assignment_key),
        )
        .limit(1)
    )
    if existing is not None:
        return existing
    target = await _target_model(session, model_id)
    subscription = EventSubscription(
        id=new_subscription_id(),
        source_model_id=model_id,
        trigger_event="training_complete",
        target_model_id=model_id,
        target_action="inference",
        input_source="stored",
        input=input,
        label=label,
        status="active",
        warnings=input_warnings(target, "inference", input),
        client_id=client_id,
        domain_id=domain_id,
        service_id=service_id,
        assignment_key=assignment_key,
        created_by=audit.actor(session),
    )
    session.add(subscription)
    await session.flush()
    await session.refresh(subscription)
    return subscription
