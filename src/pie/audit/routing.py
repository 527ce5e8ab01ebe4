"""Wiring: every write route records exactly one audit row, in the request's transaction.

Routers that declare write routes use ``route_class=AuditedRoute``: a non-GET route gets the
``audited`` dependency, which opens the request's audit entry (actor, operation id, request id,
tenant and target from the path) and, when the endpoint returns normally, inserts the row in
the same transaction just before it commits. An endpoint that raises (a 4xx, a blocked upsert,
a rolled-back change) leaves no row; a dry run marks its entry skipped. ``check_routes``
refuses to start an app with a write route that is not audited.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute

from pie.audit import context
from pie.audit.logic import record
from pie.deps import CurrentPrincipal, Session
from pie.routing import PieRoute, flat_routes

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# operation id -> the kind of record it writes (the target of its audit row)
TARGET_TYPES: dict[str, str] = {
    "createclient": "client",
    "updateclient": "client",
    "createdomain": "domain",
    "updatedomain": "domain",
    "updatedomainfeatures": "domain",
    "initdomainservice": "service",
    "initalldomainservices": "domain",
    "updatedomainservice": "service",
    "upsertdomainmodelassignment": "assignment",
    "putdomainmodelassignment": "assignment",
    "rundomainmodelassignmentjob": "job",
    "upsertservicemodelassignment": "assignment",
    "putservicemodelassignment": "assignment",
    "runservicemodelassignmentjob": "job",
    "createmodel": "model",
    "updatemodel": "model",
    "createmodelversion": "model_version",
    "setmodelversionstatus": "model_version",
    "infermodelversion": "job",
    "createmodeleventsubscription": "subscription",
    "updatemodeleventsubscription": "subscription",
    "deletemodeleventsubscription": "subscription",
    "completemodeljob": "job",
    # webhooks (spec 15.6), tenant and platform
    "createwebhook": "webhook",
    "updatewebhook": "webhook",
    "deletewebhook": "webhook",
    "rotatewebhooksecret": "webhook",
    "testwebhook": "webhook",
    "createplatformwebhook": "webhook",
    "updateplatformwebhook": "webhook",
    "deleteplatformwebhook": "webhook",
    "rotateplatformwebhooksecret": "webhook",
    "testplatformwebhook": "webhook",
    "canceljob": "job",
    "retryjob": "job",
    "reinitdomainservice": "service",
    "deletedomainservice": "service",
}

_SUMMARY_TEXT = 200  # characters kept of a text value in the summary
# a scalar field whose name says it is a credential is summarised as "***"
_SECRET_NAMES = re.compile(r"secret|password|token|credential|api_?key", re.IGNORECASE)


def target_id(target_type: str, path: dict[str, Any], body: Any) -> str | None:
    """The target's id from the path (and, for creations that name it, the body). Ids the
    server generates are filled in by the logic (``context.describe``)."""
    given = body if isinstance(body, dict) else {}

    def pick(name: str) -> Any:
        value = path.get(name, given.get(name))
        return value if isinstance(value, str) else None

    domain, service, key = pick("domain_id"), pick("service_id"), pick("assignment_key")
    if target_type == "client":
        return pick("client_id")
    if target_type == "domain":
        return domain
    if target_type == "service":
        return f"{domain}/{service}" if domain and service else None
    if target_type == "assignment":
        if not (domain and key):
            return None
        return f"{domain}/{service}/{key}" if "service_id" in path else f"{domain}/{key}"
    if target_type == "model":
        return path.get("model_id") or (given.get("id") if isinstance(given.get("id"), str) else None)
    if target_type == "model_version":
        version = path.get("model_version") or given.get("version")
        return f"{path['model_id']}/{version}" if isinstance(version, str) else None
    if target_type == "subscription":
        return pick("subscription_id")
    if target_type == "job":
        return pick("job_id")
    if target_type == "webhook":
        return pick("webhook_id")
    return None


def summarize(body: Any) -> dict[str, Any]:
    """What changed, compactly: a body's scalar fields (text cut at 200 characters) and the
    names of its object and array fields (their contents — inputs, features, settings — may be
    large or confidential and stay in the records themselves); credentials are masked."""
    if not isinstance(body, dict):
        return {}
    summary: dict[str, Any] = {}
    nested: list[str] = []
    for name, value in body.items():
        if isinstance(value, (dict, list)):
            nested.append(name)
        elif _SECRET_NAMES.search(name):
            summary[name] = "***"
        elif isinstance(value, str):
            summary[name] = value[:_SUMMARY_TEXT]
        else:
            summary[name] = value
    if nested:
        summary["fields"] = sorted(nested)
    return summary


async def _body(request: Request) -> Any:
    if not await request.body():  # read and cached by FastAPI
        return None
    try:
        return await request.json()  # parsed and cached by FastAPI for a JSON body: no second parse
    except ValueError:
        return None


def new_entry(request: Request, principal: Any, action: str, path: dict[str, Any], body: Any) -> context.AuditEntry:
    """The audit entry of one write by ``principal`` as the operation ``action`` (an operation
    id of ``TARGET_TYPES``) on the target named by ``path`` (and ``body``). The API routes get
    it from ``audited``; the console's actions build theirs with the API's operation id."""
    target_type = TARGET_TYPES.get(action, "other")
    return context.AuditEntry(
        action=action,
        actor=context.actor_of(principal.subject, principal.username, principal.app_client_id),
        request_id=(request.scope.get("state") or {}).get("request_id"),
        client_id=path.get("client_id") if isinstance(path.get("client_id"), str) else None,
        target_type=target_type,
        target_id=target_id(target_type, path, body),
        summary=summarize(body),
    )


async def audited(request: Request, session: Session, principal: CurrentPrincipal) -> AsyncIterator[None]:
    route = request.scope.get("route")
    action = getattr(route, "operation_id", None) or request.scope.get("path", "")
    body = await _body(request)
    entry = new_entry(request, principal, action, dict(request.path_params), body)
    context.begin(session, entry)
    try:
        yield  # an exception from the endpoint propagates: no row
        if not (entry.skipped or entry.recorded):
            await record(session, entry, method=request.method, path=request.url.path)
    finally:
        context.end(session)


class AuditedRoute(PieRoute):
    """A PieRoute (bounded JSON parse, response hooks) whose write methods declare the ``audited`` dependency."""

    def __init__(self, path: str, endpoint: Any, **kwargs: Any):
        methods = {m.upper() for m in (kwargs.get("methods") or ())}
        if methods & WRITE_METHODS:
            dependencies: Sequence[Any] = list(kwargs.get("dependencies") or [])
            kwargs["dependencies"] = [Depends(audited, scope="function"), *dependencies]
        super().__init__(path, endpoint, **kwargs)


def check_routes(app: FastAPI) -> None:
    """Refuse an app with an API write route (one in the OpenAPI document) that would not be
    audited. The console's pages (``include_in_schema=False``) record their data-changing
    actions themselves, through the same entry (``new_entry``/``record``); signing in and out
    change no data."""
    for route in flat_routes(app.routes):
        if isinstance(route, APIRoute) and route.include_in_schema and set(route.methods or ()) & WRITE_METHODS:
            if not isinstance(route, AuditedRoute):
                raise RuntimeError(f"write route {route.path} ({route.operation_id}) is not audited")
            if route.operation_id not in TARGET_TYPES:
                raise RuntimeError(f"write route {route.operation_id} has no audit target type")
