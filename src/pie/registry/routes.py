"""Model registry routes (spec 7 and 8): models, versions, direct inference, event subscriptions."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from pie.audit import logic as audit_logic
from pie.audit.routing import AuditedRoute
from pie.audit.schemas import StatusChangeOut
from pie.auth import Principal
from pie.deps import ModelIdPath, ModelVersionPath, Session, require
from pie.idempotency import IDEMPOTENT
from pie.pagination import ListParams, PageParams, complete_list
from pie.registry import logic, subscriptions
from pie.registry.models import EventSubscription
from pie.registry.schemas import (
    InferenceRequest,
    InferenceStarted,
    ModelAndVersion,
    ModelCreate,
    ModelOut,
    ModelUpdate,
    ModelUpdated,
    SubscriptionCreate,
    SubscriptionOut,
    SubscriptionUpdate,
    VersionCreate,
    VersionInUseOut,
    VersionOut,
    VersionStatus,
    VersionStatusChanged,
    VersionStatusUpdate,
    error_responses,
)

router = APIRouter(
    prefix="/v2/models", tags=["models"], responses=error_responses(400, 401, 403, 404, 422), route_class=AuditedRoute
)
_CONFLICT = error_responses(409)

Page = Annotated[PageParams, Depends()]
CompleteList = Annotated[ListParams, Depends()]
SubscriptionIdPath = Annotated[uuid.UUID, Path(description="event subscription id (uuid)")]


# ---- models ----------------------------------------------------------------------------------


@router.get("", operation_id="listmodels", response_model=list[ModelOut])
async def list_models(
    session: Session, response: Response, page: CompleteList, principal: Principal = require("read_models")
):
    """All models, oldest first: a bare JSON array of every model, unless `?limit=` (or
    `?cursor=`) asks for a page (the next page's cursor is then in `X-Next-Cursor`)."""
    return await complete_list(session, page, response, ModelOut, logic.list_models)


@router.post(
    "",
    operation_id="createmodel",
    dependencies=[IDEMPOTENT],
    response_model=ModelOut,
    status_code=201,
    responses=_CONFLICT,
)
async def create_model(body: ModelCreate, session: Session, principal: Principal = require("manage_models")):
    """Register a model (status `pending`). `id` is a new UUIDv7 when omitted; 409 if it exists."""
    return await logic.create_model(session, body)


@router.get("/{model_id}", operation_id="getmodel", response_model=ModelOut)
async def get_model(model_id: ModelIdPath, session: Session, principal: Principal = require("read_models")):
    return await logic.get_model(session, model_id)


@router.put("/{model_id}", operation_id="updatemodel", response_model=ModelUpdated)
async def update_model(
    model_id: ModelIdPath, body: ModelUpdate, session: Session, principal: Principal = require("manage_models")
):
    """Replace the model's fields (every field the body omits takes its default; unknown fields
    are a 400, so a misspelt field never erases one).

    When the model is `active`, its versions keep the handlers and contracts they were created
    with: `versions_keeping_old_handlers` lists those that keep the previous ones, and a new
    `pending` version carrying the new ones is generated and returned as `new_version`. When the
    model is `pending` (no version ever active), its versions take the new handlers and contracts
    in place (what they show is what runs): `updated_versions` lists them.

    Staleness (`stale_subscriptions`): subscriptions targeting the model go `stale` when the
    input contract (without contracts: the handler) of their action changes; `trigger_output`
    subscriptions from the model go `stale` when the output contract of the action whose
    completion fires them changes."""
    result = await logic.update_model(session, model_id, body)
    out = ModelUpdated.model_validate(result.model)
    out.new_version = VersionOut.model_validate(result.new_version) if result.new_version is not None else None
    out.versions_keeping_old_handlers = result.versions_keeping_old_handlers
    out.updated_versions = result.updated_versions
    out.stale_subscriptions = result.stale_subscriptions
    return out


# ---- versions --------------------------------------------------------------------------------


@router.post(
    "/{model_id}/new_version",
    operation_id="createmodelversion",
    dependencies=[IDEMPOTENT],
    response_model=ModelAndVersion,
    status_code=201,
    responses=_CONFLICT,
)
async def create_model_version(
    model_id: ModelIdPath, body: VersionCreate, session: Session, principal: Principal = require("manage_models")
):
    """Create a version snapshotting the model's handlers and contracts. Without `version` the
    next free integer is allocated (race-free); 409 if the version exists."""
    model, version = await logic.create_version(session, model_id, body)
    return {"model": ModelOut.model_validate(model), "version": VersionOut.model_validate(version)}


@router.get("/{model_id}/versions", operation_id="listmodelversions", response_model=list[VersionOut])
async def list_model_versions(
    model_id: ModelIdPath,
    session: Session,
    response: Response,
    page: Page,
    status: Annotated[VersionStatus | None, Query(description="only versions in this status")] = None,
    principal: Principal = require("read_models"),
):
    """The model's versions, oldest first (bare array, cursor in `X-Next-Cursor`); `?status=`
    keeps those in one status (e.g. `archived`)."""
    return await logic.list_versions(session, model_id, page, response, status)


@router.get("/{model_id}/versions/{model_version}", operation_id="getmodelversion", response_model=VersionOut)
async def get_model_version(
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    session: Session,
    principal: Principal = require("read_models"),
):
    return await logic.get_model_version(session, model_id, model_version)


@router.get(
    "/{model_id}/versions/{model_version}/status-history",
    operation_id="listmodelversionstatushistory",
    response_model=list[StatusChangeOut],
)
async def list_model_version_status_history(
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    session: Session,
    response: Response,
    page: Page,
    principal: Principal = require("read_models"),
):
    """Every status change of the version, oldest first: who (`changed_by`, null when the
    platform made it), from, to, when. A version's first status (`pending`, at creation) is not
    a change; its creator is the version's `created_by`. Bare array, cursor in `X-Next-Cursor`."""
    await logic.get_model_version(session, model_id, model_version)
    return await audit_logic.list_status_history(session, model_id, model_version, page, response)


@router.post(
    "/{model_id}/versions/{model_version}/new_status",
    operation_id="setmodelversionstatus",
    response_model=VersionStatusChanged,
    responses={
        409: {
            "model": VersionInUseOut,
            "description": "archiving a version that active assignment revisions point at: the envelope "
            "plus `assignments`",
        }
    },
)
async def set_model_version_status(
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    body: VersionStatusUpdate,
    session: Session,
    principal: Principal = require("manage_models"),
):
    """Allowed: pending→training, pending→active, training→active, training→failed,
    failed→training, active→archived, archived→active; the current status again is a no-op.
    `training → active` fires the model's active `training_complete` subscriptions; their
    outcomes are `triggered_events`. `active → archived` retires the version: 409 (with the
    `assignments` pointing at it) while any active assignment revision, in any tenant or scope,
    points at it; an archived version takes no new job and no new assignment (422), and no
    subscription fires on it. `archived → active` restores it."""
    model, version, triggered = await logic.set_version_status(session, model_id, model_version, body.status, principal)
    return {
        "model": ModelOut.model_validate(model),
        "version": VersionOut.model_validate(version),
        "triggered_events": triggered,
    }


@router.post(
    "/{model_id}/versions/{model_version}/inference",
    operation_id="infermodelversion",
    dependencies=[IDEMPOTENT],
    response_model=InferenceStarted,
    status_code=202,
)
async def infer_model_version(
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    body: InferenceRequest,
    session: Session,
    request: Request,
    principal: Principal = require("run_inference"),
):
    """Start an inference job on this version (not `failed`); `input` must match the version's
    inference `input_schema`. `subscribe: true` replays this input after each retraining.
    The job records a tenant: `client_id` when given (the caller must have access to it: 403),
    else the caller's only tenant, else none (a platform job, visible to admins and to machine
    callers without a tenant)."""
    job_id = await logic.run_inference(
        session, model_id, model_version, body, principal, method=request.method, path=request.url.path
    )
    return {"inference_job_id": job_id}


# ---- event subscriptions ---------------------------------------------------------------------


@router.get(
    "/{model_id}/event-subscriptions", operation_id="listmodeleventsubscriptions", response_model=list[SubscriptionOut]
)
async def list_event_subscriptions(
    model_id: ModelIdPath,
    session: Session,
    response: Response,
    page: CompleteList,
    principal: Principal = require("read_models"),
):
    """Subscriptions with this model as source: a bare array of every one, unless `?limit=` (or
    `?cursor=`) asks for a page (cursor in `X-Next-Cursor`)."""

    async def read(s: AsyncSession, p: PageParams, r: Response) -> list[EventSubscription]:
        return await subscriptions.list_subscriptions(s, model_id, principal, p, r)

    return await complete_list(session, page, response, SubscriptionOut, read)


@router.post(
    "/{model_id}/event-subscriptions",
    operation_id="createmodeleventsubscription",
    dependencies=[IDEMPOTENT],
    response_model=SubscriptionOut,
    status_code=201,
)
async def create_event_subscription(
    model_id: ModelIdPath, body: SubscriptionCreate, session: Session, principal: Principal = require("manage_models")
):
    """`input` is required when `input_source` is `stored`; a stored input failing the target's
    `input_schema` for the action is kept with `warnings`. The target model must exist (422). An
    active `inference_complete` → `inference` subscription that would close a loop of such
    subscriptions (each inference firing the next for ever) is 422."""
    return await subscriptions.create_subscription(session, model_id, body)


@router.get(
    "/{model_id}/event-subscriptions/{subscription_id}",
    operation_id="getmodeleventsubscription",
    response_model=SubscriptionOut,
)
async def get_event_subscription(
    model_id: ModelIdPath,
    subscription_id: SubscriptionIdPath,
    session: Session,
    principal: Principal = require("read_models"),
):
    return await subscriptions.get_subscription(session, model_id, subscription_id, principal)


@router.put(
    "/{model_id}/event-subscriptions/{subscription_id}",
    operation_id="updatemodeleventsubscription",
    response_model=SubscriptionOut,
)
async def update_event_subscription(
    model_id: ModelIdPath,
    subscription_id: SubscriptionIdPath,
    body: SubscriptionUpdate,
    session: Session,
    principal: Principal = require("manage_models"),
):
    """Change `input`, `label` and/or `status` (`active` | `paused`; `active` re-activates a stale
    subscription, 422 if that would close an inference loop). Warnings are recomputed against the
    target's current contract."""
    return await subscriptions.update_subscription(session, model_id, subscription_id, body, principal)


@router.delete(
    "/{model_id}/event-subscriptions/{subscription_id}",
    operation_id="deletemodeleventsubscription",
    status_code=204,
    response_class=Response,
)
async def delete_event_subscription(
    model_id: ModelIdPath,
    subscription_id: SubscriptionIdPath,
    session: Session,
    principal: Principal = require("manage_models"),
):
    await subscriptions.delete_subscription(session, model_id, subscription_id, principal)
    return Response(status_code=204)
