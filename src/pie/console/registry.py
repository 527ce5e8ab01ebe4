"""The model registry: models (registering one, with its handlers and contracts as forms), a
model's versions (creating one) and event subscriptions (creating, pausing, resuming, deleting),
a version's page (its status changed along the allowed transitions only).

Every write calls the logic function of its API route (``createmodel``, ``createmodelversion``,
``setmodelversionstatus``, ``createmodeleventsubscription``, ``updatemodeleventsubscription``,
``deletemodeleventsubscription``) and is audited as that operation.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from fastapi import Path as PathParam
from fastapi import Request
from sqlalchemy import func, select
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pie.audit import logic as audit
from pie.console.common import (
    Confirmation,
    Confirmed,
    Cursor,
    Done,
    FormValues,
    NewForm,
    Pager,
    Problem,
    User,
    Writer,
    confirm_page,
    console_router,
    parse_body,
    refusal,
    rehearse,
    render,
    write,
)
from pie.console.signin import ConsoleUser
from pie.deps import ModelIdPath, ModelVersionPath, Session, tenant_scope
from pie.dispatch.inprocess import registered_names
from pie.errors import BadRequest, PieError
from pie.http.body import loads as json_loads_strict  # a repeated key is refused, as in API bodies
from pie.pagination import PageParams
from pie.registry import logic as registry
from pie.registry import subscriptions
from pie.registry.schemas import ModelCreate, SubscriptionCreate, SubscriptionUpdate, VersionCreate
from pie.schemas import ID_PATTERN
from pie.tables.registry import ModelVersion
from pie.tenancy import logic as tenancy

router = console_router()

_ID = re.compile(ID_PATTERN)
SubscriptionIdPath = Annotated[uuid.UUID, PathParam(description="event subscription id (uuid)")]

HANDLER_TYPES = ("in_process", "lambda", "ecs_task")
# the buttons of a version's allowed transitions (``pie.registry.logic.TRANSITIONS``); retiring a
# version (spec 15.4) reads "Archive", and bringing an archived one back "Restore"
TRANSITION_LABELS = {"training": "Start training", "active": "Activate", "failed": "Mark failed", "archived": "Archive"}
RESTORE = ("archived", "active")


def allowed_transitions(status: str) -> list[tuple[str, str]]:
    """(target status, button label) of every transition allowed from ``status``."""
    return [
        (to, "Restore" if (status, to) == RESTORE else TRANSITION_LABELS.get(to, f"Set {to}"))
        for to in sorted({to for (frm, to) in registry.TRANSITIONS if frm == status})
    ]


async def version_counts(session: Any, model_ids: list[str]) -> dict[str, int]:
    """How many versions each model has (one grouped query for a page of models)."""
    if not model_ids:
        return {}
    rows = await session.execute(
        select(ModelVersion.model_id, func.count())
        .where(ModelVersion.model_id.in_(model_ids))
        .group_by(ModelVersion.model_id)
    )
    return {model_id: count for model_id, count in rows.all()}


# -- models ----------------------------------------------------------------------------------------------


def _handler(form: FormValues, action: str) -> dict[str, Any]:
    kind = form.text(f"{action}_type")
    handler: dict[str, Any] = {"type": kind}
    if kind == "lambda":
        handler["arn"] = form.text(f"{action}_arn")
        if form.text(f"{action}_qualifier"):
            handler["version"] = form.text(f"{action}_qualifier")
    else:
        handler["value"] = form.text(f"{action}_value")
    timeout = form.text(f"{action}_timeout")
    if timeout:
        try:
            handler["timeout_seconds"] = json_loads_strict(timeout)
        except ValueError as exc:
            raise BadRequest(f"{action} handler: the time-out must be a number of seconds") from exc
    return handler


def _schema_field(form: FormValues, name: str, label: str) -> Any:
    text = form.text(name)
    if not text:
        return None
    try:
        return json_loads_strict(text)
    except ValueError as exc:
        raise BadRequest(f"{label} is not valid JSON: {exc}") from exc


def model_body(form: FormValues) -> dict[str, Any]:
    """The ``createmodel`` body of the registration form: handlers per action (type and target),
    optional contracts (a JSON Schema per action and direction)."""
    sent: dict[str, Any] = {
        "name": form.text("name"),
        "description": form.get("description").strip(),
        "handlers": {action: _handler(form, action) for action in ("training", "inference")},
    }
    if form.text("id"):
        sent["id"] = form.text("id")
    contracts: dict[str, Any] = {}
    for action in ("training", "inference"):
        contract = {}
        for direction in ("input", "output"):
            schema = _schema_field(form, f"{action}_{direction}_schema", f"{action} {direction} schema")
            if schema is not None:
                contract[f"{direction}_schema"] = schema
        if contract:
            contracts[action] = contract
    if contracts:
        sent["handler_contracts"] = contracts
    return sent


async def _models(
    request: Request,
    user: ConsoleUser,
    session: Any,
    cursor: str | None,
    *,
    new: bool = False,
    problem: Problem | None = None,
) -> HTMLResponse:
    user.principal.require("read_models")
    if new or problem:
        user.principal.require("manage_models")
    pager = Pager(request, cursor)
    rows = await registry.list_models(session, pager.params, pager.response)
    return render(
        request,
        "models.html",
        status_code=problem.status_code if problem else 200,
        models=rows,
        counts=await version_counts(session, [m.id for m in rows]),
        next_url=pager.next_url,
        can_create=user.principal.has("manage_models"),
        new=new or problem is not None,
        handler_types=HANDLER_TYPES,
        in_process=registered_names(),
        typed=problem.values if problem else {},
        problem=problem,
    )


@router.get("/models", response_class=HTMLResponse)
async def models_page(request: Request, user: User, session: Session, cursor: Cursor = None, new: NewForm = None):
    return await _models(request, user, session, cursor, new=new is not None)


@router.post("/models", response_class=HTMLResponse)
async def create_model(request: Request, user: Writer, session: Session):
    """``createmodel``: the form's handlers and contracts, checked by the API's own rules (the
    request schema: 400; ARNs, ECS targets, in-process names, contract schemas: 422)."""
    user.principal.require("manage_models")
    form = await FormValues.read(request)
    try:
        sent = model_body(form)
        body = parse_body(ModelCreate, sent)

        async def run() -> str:
            return (await registry.create_model(session, body)).id

        model_id = await write(request, session, user, "createmodel", {}, sent, run)
    except PieError as exc:
        return await _models(request, user, session, None, problem=refusal(exc, "new-model", form))
    return RedirectResponse(f"/console/models/{model_id}?done=created", status_code=303)


MODEL_DONE = {
    "created": "Model registered. Create its first version below.",
    "version": "Version created.",
    "subscription": "Subscription created.",
    "paused": "Subscription paused.",
    "active": "Subscription resumed.",
    "deleted": "Subscription deleted.",
}


async def _model(
    request: Request,
    user: ConsoleUser,
    session: Any,
    model_id: str,
    cursor: str | None = None,
    *,
    new: str | None = None,
    done: str | None = None,
    problem: Problem | None = None,
) -> HTMLResponse:
    user.principal.require("read_models")
    model = await registry.get_model(session, model_id)
    pager = Pager(request, cursor)
    versions = await registry.list_versions(session, model_id, pager.params, pager.response)
    subs = await subscriptions.list_subscriptions(session, model_id, user.principal, PageParams(limit=200), Response())
    can_manage = user.principal.has("manage_models")
    opened = (
        problem.form if problem is not None else {"version": "new-version", "subscription": "new-sub"}.get(new or "")
    )
    model_ids = []
    if can_manage:  # the target models a new subscription may name
        model_ids = [m.id for m in await registry.list_models(session, PageParams(limit=1000), Response())]
    return render(
        request,
        "model.html",
        status_code=problem.status_code if problem else 200,
        model=model,
        versions=versions,
        subscriptions=subs,
        next_url=pager.next_url,
        can_manage=can_manage,
        opened=opened if can_manage else None,
        model_ids=model_ids,
        typed=problem.values if problem else {},
        done=MODEL_DONE.get(done or ""),
        problem=problem,
    )


@router.get("/models/{model_id}", response_class=HTMLResponse)
async def model_page(
    request: Request,
    model_id: ModelIdPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
    new: NewForm = None,
    done: Done = None,
):
    return await _model(request, user, session, model_id, cursor, new=new, done=done)


# -- versions ------------------------------------------------------------------------------------------------


@router.post("/models/{model_id}/versions", response_class=HTMLResponse)
async def create_version(request: Request, model_id: ModelIdPath, user: Writer, session: Session):
    """``createmodelversion``: an optional version (the next integer when empty), a description,
    and optionally a frozen feature schema copied from a domain's live features (a domain the
    caller may read, named ``client_id/domain_id``)."""
    user.principal.require("manage_models")
    form = await FormValues.read(request)
    sent: dict[str, Any] = {"description": form.get("description").strip()}
    if form.text("version"):
        sent["version"] = form.text("version")
    try:
        source = form.text("features_from")
        if source:
            client_id, _, domain_id = source.partition("/")
            if not (client_id and domain_id) or "/" in domain_id:
                raise BadRequest("frozen features: name the domain as client_id/domain_id")
            for part in (client_id, domain_id):
                if not _ID.fullmatch(part):
                    raise BadRequest(f"frozen features: {part!r} is not a valid id")
            scope = await tenant_scope(session, user.principal, client_id, "read_domains")
            sent["features"] = (await tenancy.load_domain(session, scope.client_id, domain_id)).features
        body = parse_body(VersionCreate, sent)

        async def run() -> str:
            _model_row, version = await registry.create_version(session, model_id, body)
            return version.version

        version = await write(request, session, user, "createmodelversion", {"model_id": model_id}, sent, run)
    except PieError as exc:
        return await _model(request, user, session, model_id, problem=refusal(exc, "new-version", form))
    return RedirectResponse(f"/console/models/{model_id}/versions/{version}?done=created", status_code=303)


VERSION_DONE = {"created": "Version created (status pending)."}


async def _version(
    request: Request,
    user: ConsoleUser,
    session: Any,
    model_id: str,
    model_version: str,
    *,
    done: str | None = None,
    changed: dict[str, Any] | None = None,
    problem: Problem | None = None,
    in_use: list[dict[str, Any]] | None = None,
) -> HTMLResponse:
    user.principal.require("read_models")
    version = await registry.get_model_version(session, model_id, model_version)
    history = await audit.list_status_history(session, model_id, model_version, PageParams(limit=200), Response())
    return render(
        request,
        "version.html",
        status_code=problem.status_code if problem else 200,
        version=version,
        history=history,
        transitions=allowed_transitions(version.status) if user.principal.has("manage_models") else [],
        done=VERSION_DONE.get(done or ""),
        changed=changed,
        problem=problem,
        in_use=in_use,
    )


@router.get("/models/{model_id}/versions/{model_version}", response_class=HTMLResponse)
async def version_page(
    request: Request,
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    user: User,
    session: Session,
    done: Done = None,
):
    return await _version(request, user, session, model_id, model_version, done=done)


@router.post("/models/{model_id}/versions/{model_version}/status", response_class=HTMLResponse)
async def set_version_status(
    request: Request,
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    user: Writer,
    session: Session,
    confirm: Confirmed = "",
) -> Response:
    """``setmodelversionstatus`` along an allowed transition, after a confirmation page saying
    what it fires (shown only when the change would be accepted now)."""
    user.principal.require("manage_models")
    form = await FormValues.read(request)
    status = form.text("status")
    current = (await registry.get_model_version(session, model_id, model_version)).status
    sent = {"status": status}
    try:
        if status not in {to for to, _label in allowed_transitions(current)}:
            allowed = ", ".join(to for to, _label in allowed_transitions(current)) or "none"
            raise BadRequest(f"version {model_version} is {current}: it may move to {allowed}, not {status or '?'}")

        async def run() -> list[dict[str, Any]]:
            _model_row, _version_row, triggered = await registry.set_version_status(
                session, model_id, model_version, status, user.principal
            )
            return triggered

        if confirm != "yes":
            fired = await rehearse(session, run)
            notes = []
            if fired:
                notes.append(
                    f"It fires {len(fired)} training_complete subscription{'s' if len(fired) != 1 else ''} "
                    "of this model (new jobs)."
                )
            if status == "active":
                notes.append("An active version can be assigned to keys and run jobs.")
            if status == "failed":
                notes.append("A failed version accepts no job and no new assignment.")
            if status == "archived":
                notes.append(
                    "An archived version takes no new job and no new assignment, and no subscription fires on "
                    "it; jobs already queued or running finish. Restore makes it active again."
                )
            if (current, status) == RESTORE:
                notes = ["It becomes active again: it can be assigned to keys and run jobs."]
            label = dict(allowed_transitions(current))[status]
            vurl = f"/console/models/{model_id}/versions/{model_version}"
            return confirm_page(
                request,
                Confirmation(
                    title=f"{label}: {model_id} v{model_version}",
                    question=f"Set version {model_version} of {model_id} from {current} to {status}?",
                    button=f"{label} v{model_version}",
                    action_url=f"{vurl}/status",
                    cancel_url=vurl,
                    crumbs=[
                        ("Models", "/console/models"),
                        (model_id, f"/console/models/{model_id}"),
                        (f"v{model_version}", vurl),
                    ],
                    changes=[("Status", current, status)],
                    notes=notes,
                ),
                form,
            )
        path = {"model_id": model_id, "model_version": model_version}
        fired = await write(request, session, user, "setmodelversionstatus", path, sent, run)
    except PieError as exc:
        # archiving an assigned version: the 409 names the active assignments, shown as a table
        in_use = exc.assignments if isinstance(exc, registry.VersionInUse) else None
        return await _version(
            request, user, session, model_id, model_version, problem=refusal(exc, "status", form), in_use=in_use
        )
    changed = {"from": current, "to": status, "triggered": fired}
    return await _version(request, user, session, model_id, model_version, changed=changed)


# -- event subscriptions ----------------------------------------------------------------------------------------


@router.post("/models/{model_id}/subscriptions", response_class=HTMLResponse)
async def create_subscription(request: Request, model_id: ModelIdPath, user: Writer, session: Session):
    """``createmodeleventsubscription``: trigger, target model and action, input source, the
    stored input (a JSON object) when the source is ``stored``, label, status."""
    user.principal.require("manage_models")
    form = await FormValues.read(request)
    try:
        sent: dict[str, Any] = {
            "trigger_event": form.text("trigger_event"),
            "target_model_id": form.text("target_model_id"),
            "target_action": form.text("target_action"),
            "input_source": form.text("input_source"),
            "status": form.text("status") or "active",
        }
        if form.text("input"):
            sent["input"] = _schema_field(form, "input", "the stored input")
        if form.text("label"):
            sent["label"] = form.text("label")
        body = parse_body(SubscriptionCreate, sent)

        async def run() -> None:
            await subscriptions.create_subscription(session, model_id, body)

        await write(request, session, user, "createmodeleventsubscription", {"model_id": model_id}, sent, run)
    except PieError as exc:
        return await _model(request, user, session, model_id, problem=refusal(exc, "new-sub", form))
    return RedirectResponse(f"/console/models/{model_id}?done=subscription#subscriptions", status_code=303)


@router.post("/models/{model_id}/subscriptions/{subscription_id}/status", response_class=HTMLResponse)
async def set_subscription_status(
    request: Request, model_id: ModelIdPath, subscription_id: SubscriptionIdPath, user: Writer, session: Session
):
    """``updatemodeleventsubscription`` ``{status}``: pause, or resume (``active``, which also
    re-activates a stale subscription)."""
    user.principal.require("manage_models")
    form = await FormValues.read(request)
    sent = {"status": form.text("status")}
    path = {"model_id": model_id, "subscription_id": str(subscription_id)}
    try:
        body = parse_body(SubscriptionUpdate, sent)

        async def run() -> None:
            await subscriptions.update_subscription(session, model_id, subscription_id, body, user.principal)

        await write(request, session, user, "updatemodeleventsubscription", path, sent, run)
    except PieError as exc:
        return await _model(request, user, session, model_id, problem=refusal(exc, "subscriptions", form))
    return RedirectResponse(f"/console/models/{model_id}?done={body.status}#subscriptions", status_code=303)


@router.post("/models/{model_id}/subscriptions/{subscription_id}/delete", response_class=HTMLResponse)
async def delete_subscription(
    request: Request,
    model_id: ModelIdPath,
    subscription_id: SubscriptionIdPath,
    user: Writer,
    session: Session,
    confirm: Confirmed = "",
) -> Response:
    """``deletemodeleventsubscription``, after a confirmation."""
    user.principal.require("manage_models")
    form = await FormValues.read(request)
    found = await subscriptions.get_subscription(session, model_id, subscription_id, user.principal)
    if confirm != "yes":
        described = f"{found.trigger_event} → {found.target_action} of {found.target_model_id} ({found.input_source})"
        return confirm_page(
            request,
            Confirmation(
                title="Delete an event subscription",
                question=f"Delete the subscription {found.label or subscription_id} of {model_id}? It will not "
                "fire again; the jobs it fired stay.",
                button="Delete subscription",
                action_url=f"/console/models/{model_id}/subscriptions/{subscription_id}/delete",
                cancel_url=f"/console/models/{model_id}#subscriptions",
                crumbs=[("Models", "/console/models"), (model_id, f"/console/models/{model_id}")],
                facts=[("Subscription", described), ("Status", found.status)],
            ),
            form,
        )
    path = {"model_id": model_id, "subscription_id": str(subscription_id)}

    async def run() -> None:
        await subscriptions.delete_subscription(session, model_id, subscription_id, user.principal)

    await write(request, session, user, "deletemodeleventsubscription", path, {}, run)
    return RedirectResponse(f"/console/models/{model_id}?done=deleted#subscriptions", status_code=303)
