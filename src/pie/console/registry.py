"""The model registry: models, a model's versions and subscriptions, a version's page."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import HTMLResponse, Response

from pie.audit import logic as audit
from pie.console.common import Cursor, Pager, User, console_router, render
from pie.deps import ModelIdPath, ModelVersionPath, Session
from pie.pagination import PageParams
from pie.registry import logic as registry
from pie.registry import subscriptions

router = console_router()


@router.get("/models", response_class=HTMLResponse)
async def models_page(request: Request, user: User, session: Session, cursor: Cursor = None):
    user.principal.require("read_models")
    pager = Pager(request, cursor)
    rows = await registry.list_models(session, pager.params, pager.response)
    return render(request, "models.html", models=rows, next_url=pager.next_url)


@router.get("/models/{model_id}", response_class=HTMLResponse)
async def model_page(request: Request, model_id: ModelIdPath, user: User, session: Session, cursor: Cursor = None):
    user.principal.require("read_models")
    model = await registry.get_model(session, model_id)
    pager = Pager(request, cursor)
    versions = await registry.list_versions(session, model_id, pager.params, pager.response)
    subs = await subscriptions.list_subscriptions(session, model_id, user.principal, PageParams(limit=200), Response())
    return render(request, "model.html", model=model, versions=versions, subscriptions=subs, next_url=pager.next_url)


@router.get("/models/{model_id}/versions/{model_version}", response_class=HTMLResponse)
async def version_page(
    request: Request, model_id: ModelIdPath, model_version: ModelVersionPath, user: User, session: Session
):
    user.principal.require("read_models")
    version = await registry.get_model_version(session, model_id, model_version)
    history = await audit.list_status_history(session, model_id, model_version, PageParams(limit=200), Response())
    return render(request, "version.html", version=version, history=history)
