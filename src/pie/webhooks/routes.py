"""Webhook routes (spec 15.6), declared once for both scopes: a tenant's webhooks under
``/v2/clients/{client_id}/webhooks`` (permission ``manage_domains`` on that tenant) and the
platform's under ``/v2/webhooks`` (admins)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response

from pie.audit.routing import AuditedRoute
from pie.auth import Principal
from pie.deps import Session, TenantScope, require, tenant
from pie.errors import error_responses
from pie.pagination import PageParams
from pie.webhooks import logic
from pie.webhooks.schemas import (
    DeliveryOut,
    PingQueued,
    SecretOut,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookUpdate,
)

Page = Annotated[PageParams, Depends()]
WebhookIdPath = Annotated[uuid.UUID, Path(description="webhook id (uuid)")]
_404 = error_responses(e404="no such webhook in this scope (or, on tenant routes, no such client)")
_422 = error_responses(
    e422="the URL is not https, or resolves to a loopback/private/link-local address; an event "
    "type not allowed in this scope; a disabled webhook cannot be tested"
)

tenant_router = APIRouter(prefix="/v2/clients/{client_id}/webhooks", tags=["webhooks"], route_class=AuditedRoute)
platform_router = APIRouter(prefix="/v2/webhooks", tags=["webhooks"], route_class=AuditedRoute)


async def _tenant_owner(scope: TenantScope = tenant("manage_domains")) -> str | None:
    return scope.client_id


async def _platform_owner(principal: Principal = require("admin")) -> str | None:
    return None


def _declare(router: APIRouter, owner: Callable[..., Any], op: Callable[[str], str], whose: str) -> None:
    """The eight webhook routes on ``router``; ``owner`` resolves the scope (tenant id or None)
    after its permission check; ``op`` names each operation for this scope."""
    scope = Depends(owner)

    @router.post(
        "",
        operation_id=op("createwebhook"),
        response_model=WebhookCreated,
        status_code=201,
        responses={**_404, **_422},
        summary=f"Create a {whose} webhook",
    )
    async def create(request: Request, body: WebhookCreate, session: Session, client_id: str | None = scope):
        """201 with the webhook and its `secret` (shown only here, Standard Webhooks `whsec_` form)."""
        webhook, secret = await logic.create_webhook(session, request.app.state.settings, client_id, body)
        return {**WebhookOut.model_validate(webhook).model_dump(), "secret": secret}

    @router.get("", operation_id=op("listwebhooks"), response_model=list[WebhookOut], responses=_404)
    async def list_(session: Session, response: Response, page: Page, client_id: str | None = scope):
        """Oldest first; `?limit=` and `?cursor=` (next page in `X-Next-Cursor`). Secrets are never shown."""
        return await logic.list_webhooks(session, client_id, page, response)

    @router.get("/{webhook_id}", operation_id=op("getwebhook"), response_model=WebhookOut, responses=_404)
    async def get(webhook_id: WebhookIdPath, session: Session, client_id: str | None = scope):
        return await logic.get_webhook(session, client_id, webhook_id)

    @router.patch(
        "/{webhook_id}", operation_id=op("updatewebhook"), response_model=WebhookOut, responses={**_404, **_422}
    )
    async def patch(
        request: Request,
        webhook_id: WebhookIdPath,
        body: WebhookUpdate,
        session: Session,
        client_id: str | None = scope,
    ):
        """Only the fields sent change; `status: active` re-enables the webhook."""
        return await logic.update_webhook(session, request.app.state.settings, client_id, webhook_id, body)

    @router.delete(
        "/{webhook_id}", operation_id=op("deletewebhook"), status_code=204, response_class=Response, responses=_404
    )
    async def delete(webhook_id: WebhookIdPath, session: Session, client_id: str | None = scope):
        await logic.delete_webhook(session, client_id, webhook_id)
        return Response(status_code=204)

    @router.post(
        "/{webhook_id}/rotate_secret", operation_id=op("rotatewebhooksecret"), response_model=SecretOut, responses=_404
    )
    async def rotate(webhook_id: WebhookIdPath, session: Session, client_id: str | None = scope):
        """A new secret (shown only here); for 24 hours deliveries carry signatures with both."""
        return await logic.rotate_secret(session, client_id, webhook_id)

    @router.get(
        "/{webhook_id}/deliveries",
        operation_id=op("listwebhookdeliveries"),
        response_model=list[DeliveryOut],
        responses=_404,
    )
    async def deliveries(
        webhook_id: WebhookIdPath, session: Session, response: Response, page: Page, client_id: str | None = scope
    ):
        """The delivery log, newest first."""
        return await logic.list_deliveries(session, client_id, webhook_id, page, response)

    @router.post(
        "/{webhook_id}/test",
        operation_id=op("testwebhook"),
        response_model=PingQueued,
        status_code=202,
        responses={**_404, **_422},
    )
    async def test(webhook_id: WebhookIdPath, session: Session, client_id: str | None = scope):
        """Queue a `ping` event for this webhook; follow it in the deliveries log."""
        return {"event_id": await logic.send_ping(session, client_id, webhook_id), "type": "ping"}


_declare(tenant_router, _tenant_owner, lambda name: name, "tenant")
_declare(platform_router, _platform_owner, lambda name: name.replace("webhook", "platformwebhook", 1), "platform")
