"""Webhooks (spec 15.6): a tenant's webhook endpoints (``manage_domains`` on the tenant, as the API)
and the platform's (administrators), each with its recent deliveries; creating one (its secret
shown once, on the page after creation), editing its URL, events and description, disabling and
enabling it, sending a test ping, rotating its secret (the new one shown once) and deleting it.

Every write calls the logic function of its API route (``pie.webhooks.logic``: ``createwebhook``,
``updatewebhook``, ``testwebhook``, ``rotatewebhooksecret``, ``deletewebhook``, or their
``...platformwebhook...`` twins) and is audited as that operation. The routes are declared once
for both scopes (``_declare``), as the API's are.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from starlette.responses import HTMLResponse, RedirectResponse, Response

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
from pie.deps import ClientIdPath, Session, tenant_scope
from pie.errors import BadRequest, PieError
from pie.webhooks import logic as webhooks
from pie.webhooks.events import EVENT_TYPES, PLATFORM_ONLY
from pie.webhooks.schemas import WebhookCreate, WebhookUpdate

RECENT = 10  # deliveries shown per webhook on the list
LOG_PAGE = 25  # deliveries per page of a webhook's log

router = console_router()

WebhookIdPath = Annotated[uuid.UUID, PathParam(description="webhook id (uuid)")]


@dataclass
class Hooks:
    """Whose webhooks a page shows: a tenant's (``client``) or the platform's (``client`` None)."""

    client: Any | None

    @property
    def client_id(self) -> str | None:
        return self.client.client_id if self.client is not None else None

    @property
    def base(self) -> str:
        return f"/console/clients/{self.client_id}/webhooks" if self.client is not None else "/console/webhooks"

    @property
    def api_base(self) -> str:
        return f"/v2/clients/{self.client_id}/webhooks" if self.client is not None else "/v2/webhooks"

    @property
    def events(self) -> list[str]:
        """The event types a webhook of this scope may receive."""
        return [e for e in EVENT_TYPES if self.client is None or e not in PLATFORM_ONLY]

    def op(self, name: str) -> str:
        """The API's operation id in this scope (``createwebhook`` / ``createplatformwebhook``)."""
        return name if self.client is not None else name.replace("webhook", "platformwebhook", 1)

    def path(self, webhook_id: uuid.UUID | None = None) -> dict[str, Any]:
        """The audit entry's path parameters (the tenant, the webhook)."""
        path: dict[str, Any] = {"client_id": self.client_id} if self.client is not None else {}
        if webhook_id is not None:
            path["webhook_id"] = str(webhook_id)
        return path

    def crumbs(self, *more: tuple[str, str]) -> list[tuple[str, str]]:
        if self.client is None:
            return [("Platform webhooks", self.base), *more]
        return [
            ("Clients", "/console/clients"),
            (self.client_id or "", f"/console/clients/{self.client_id}"),
            ("Webhooks", self.base),
            *more,
        ]


async def tenant_hooks(client_id: ClientIdPath, user: User, session: Session) -> Hooks:
    """A tenant's webhooks: the API's rule (``manage_domains`` on the tenant, reads included)."""
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    return Hooks(scope.client)


async def platform_hooks(user: User) -> Hooks:
    """The platform's webhooks: administrators only, as ``/v2/webhooks``."""
    user.principal.require("admin")
    return Hooks(None)


# -- pages -----------------------------------------------------------------------------------------------

LIST_DONE = {"deleted": "Webhook deleted: nothing more is sent to it; its delivery log went with it."}
PAGE_DONE = {
    "updated": "Webhook updated.",
    "disabled": "Webhook disabled: no new event is queued for it; waiting deliveries wait.",
    "active": "Webhook enabled: waiting deliveries are attempted now.",
    "ping": "Test ping queued: it appears in the deliveries below once attempted.",
}


async def _list(
    request: Request,
    session: Any,
    hooks: Hooks,
    cursor: str | None,
    *,
    new: bool = False,
    done: str | None = None,
    problem: Problem | None = None,
) -> HTMLResponse:
    pager = Pager(request, cursor)
    rows = await webhooks.list_webhooks(session, hooks.client_id, pager.params, pager.response)
    deliveries = await webhooks.recent_deliveries(session, [w.id for w in rows], RECENT)
    return render(
        request,
        "webhooks.html",
        status_code=problem.status_code if problem else 200,
        hooks=hooks,
        client=hooks.client,
        webhooks=rows,
        deliveries=deliveries,
        next_url=pager.next_url,
        new=new or problem is not None,
        writable=hooks.client is None or hooks.client.status == "active",
        typed=problem.values if problem else {},
        typed_events=_typed_events(problem),
        done=LIST_DONE.get(done or ""),
        problem=problem,
    )


def _typed_events(problem: Problem | None) -> list[str] | None:
    if problem is None:
        return None
    return [e for e in problem.values.get("events", "").split(",") if e]


async def _page(
    request: Request,
    session: Any,
    hooks: Hooks,
    webhook_id: uuid.UUID,
    cursor: str | None = None,
    *,
    done: str | None = None,
    secret: str | None = None,
    secret_note: str | None = None,
    problem: Problem | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    webhook = await webhooks.get_webhook(session, hooks.client_id, webhook_id)
    pager = Pager(request, cursor, limit=LOG_PAGE)
    log = await webhooks.list_deliveries(session, hooks.client_id, webhook_id, pager.params, pager.response)
    typed = problem.values if problem is not None and problem.form == "edit" else None
    return render(
        request,
        "webhook.html",
        status_code=problem.status_code if problem else status_code,
        hooks=hooks,
        client=hooks.client,
        webhook=webhook,
        deliveries=log,
        next_url=pager.next_url,
        writable=hooks.client is None or hooks.client.status == "active",
        typed=typed,
        typed_events=_typed_events(problem) if typed is not None else None,
        done=PAGE_DONE.get(done or ""),
        secret=secret,
        secret_note=secret_note,
        problem=problem,
    )


# -- writes --------------------------------------------------------------------------------------------


@dataclass
class Shown:
    """A webhook's fields as read before a rehearsal (whose rollback expires the loaded row)."""

    url: str
    events: list[str]
    description: str | None
    status: str
    previous_secret_expires_at: Any


async def _shown(session: Any, hooks: Hooks, webhook_id: uuid.UUID) -> Shown:
    w = await webhooks.get_webhook(session, hooks.client_id, webhook_id)
    return Shown(w.url, list(w.events), w.description, w.status, w.previous_secret_expires_at)


def _remembered(form: FormValues) -> dict[str, str]:
    """What was typed, to show a refused form again (the ticked events as one comma list)."""
    values = {k: v for k, v in form.as_dict().items() if k != "events"}
    values["events"] = ",".join(form.getlist("events"))
    return values


async def _create(request: Request, session: Any, user: ConsoleUser, hooks: Hooks) -> Response:
    """``createwebhook``: URL, events, description; the page after creation shows the secret once."""
    form = await FormValues.read(request)
    sent: dict[str, Any] = {"url": form.text("url"), "events": form.getlist("events")}
    if form.text("description"):
        sent["description"] = form.get("description").strip()
    settings = request.app.state.settings
    try:
        body = parse_body(WebhookCreate, sent)

        async def run() -> tuple[uuid.UUID, str]:
            webhook, secret = await webhooks.create_webhook(session, settings, hooks.client_id, body)
            return webhook.id, secret

        webhook_id, secret = await write(request, session, user, hooks.op("createwebhook"), hooks.path(), sent, run)
    except PieError as exc:
        problem = refusal(exc, "new-webhook", _remembered(form))
        return await _list(request, session, hooks, None, problem=problem)
    return await _page(
        request,
        session,
        hooks,
        webhook_id,
        secret=secret,
        secret_note="Webhook created. Its signing secret is shown only now: copy it to your receiver.",
        status_code=201,
    )


def _changes(webhook: Shown, sent: dict[str, Any]) -> list[tuple[str, str, str]]:
    changes = []
    if "url" in sent:
        changes.append(("URL", webhook.url, sent["url"]))
    if "events" in sent:
        changes.append(("Events", ", ".join(webhook.events), ", ".join(sorted(set(sent["events"])))))
    if "description" in sent:
        changes.append(("Description", webhook.description or "—", sent["description"] or "—"))
    return changes


async def _edit(
    request: Request, session: Any, user: ConsoleUser, hooks: Hooks, webhook_id: uuid.UUID, confirm: str
) -> Response:
    """``updatewebhook`` of the URL, events and description (only what changed is sent), after a
    confirmation listing the changes (shown only when the update would be accepted now)."""
    form = await FormValues.read(request)
    webhook = await _shown(session, hooks, webhook_id)
    url = form.text("url")
    events = sorted(set(form.getlist("events")))
    description = form.get("description").strip() or None
    sent: dict[str, Any] = {}
    if url != webhook.url:
        sent["url"] = url
    if events != list(webhook.events):
        sent["events"] = events
    if description != webhook.description:
        sent["description"] = description
    page = f"{hooks.base}/{webhook_id}"
    settings = request.app.state.settings
    try:
        if not sent:
            raise BadRequest("nothing to update: change the URL, the events or the description first")
        body = parse_body(WebhookUpdate, sent)

        async def run() -> None:
            await webhooks.update_webhook(session, settings, hooks.client_id, webhook_id, body)

        if confirm != "yes":
            await rehearse(session, run)
            return confirm_page(
                request,
                Confirmation(
                    title="Update a webhook",
                    question=f"Update the webhook {webhook.url}? Events already queued keep going to it.",
                    button="Update webhook",
                    action_url=page,
                    cancel_url=page,
                    crumbs=hooks.crumbs((webhook.url, page)),
                    changes=_changes(webhook, sent),
                ),
                form,
            )
        await write(request, session, user, hooks.op("updatewebhook"), hooks.path(webhook_id), sent, run)
    except PieError as exc:
        return await _page(request, session, hooks, webhook_id, problem=refusal(exc, "edit", _remembered(form)))
    return RedirectResponse(f"{page}?done=updated", status_code=303)


async def _status(
    request: Request, session: Any, user: ConsoleUser, hooks: Hooks, webhook_id: uuid.UUID, confirm: str
) -> Response:
    """``updatewebhook {status}``: disable (nothing new is queued; waiting deliveries wait) or
    enable (waiting deliveries become due at once), after a confirmation."""
    form = await FormValues.read(request)
    webhook = await _shown(session, hooks, webhook_id)
    sent = {"status": form.text("status")}
    page = f"{hooks.base}/{webhook_id}"
    settings = request.app.state.settings
    try:
        body = parse_body(WebhookUpdate, sent)

        async def run() -> None:
            await webhooks.update_webhook(session, settings, hooks.client_id, webhook_id, body)

        if confirm != "yes":
            await rehearse(session, run)
            enabling = body.status == "active"
            return confirm_page(
                request,
                Confirmation(
                    title=f"{'Enable' if enabling else 'Disable'} a webhook",
                    question=f"{'Enable' if enabling else 'Disable'} the webhook {webhook.url}?",
                    button="Enable webhook" if enabling else "Disable webhook",
                    action_url=f"{page}/status",
                    cancel_url=page,
                    crumbs=hooks.crumbs((webhook.url, page)),
                    changes=[("Status", webhook.status, str(body.status))],
                    notes=[
                        "Deliveries that waited while it was disabled are attempted at once."
                        if enabling
                        else "No new event is queued for it while it is disabled; its pending deliveries wait."
                    ],
                    danger=not enabling,
                ),
                form,
            )
        await write(request, session, user, hooks.op("updatewebhook"), hooks.path(webhook_id), sent, run)
    except PieError as exc:
        return await _page(request, session, hooks, webhook_id, problem=refusal(exc, "actions", form))
    return RedirectResponse(f"{page}?done={body.status}", status_code=303)


async def _test(request: Request, session: Any, user: ConsoleUser, hooks: Hooks, webhook_id: uuid.UUID) -> Response:
    """``testwebhook``: a ``ping`` queued for this webhook only (nothing else changes: no confirmation)."""
    form = await FormValues.read(request)
    page = f"{hooks.base}/{webhook_id}"

    async def run() -> None:
        await webhooks.send_ping(session, hooks.client_id, webhook_id)

    try:
        await write(request, session, user, hooks.op("testwebhook"), hooks.path(webhook_id), {}, run)
    except PieError as exc:
        return await _page(request, session, hooks, webhook_id, problem=refusal(exc, "actions", form))
    return RedirectResponse(f"{page}?done=ping#deliveries", status_code=303)


async def _rotate(
    request: Request, session: Any, user: ConsoleUser, hooks: Hooks, webhook_id: uuid.UUID, confirm: str
) -> Response:
    """``rotatewebhooksecret``, after a confirmation; the new secret is shown once, on the page
    the rotation answers."""
    form = await FormValues.read(request)
    webhook = await _shown(session, hooks, webhook_id)
    page = f"{hooks.base}/{webhook_id}"

    async def run() -> webhooks.Rotated:
        return await webhooks.rotate_secret(session, hooks.client_id, webhook_id)

    try:
        if confirm != "yes":
            await rehearse(session, run)
            notes = [
                "For 24 hours every delivery carries two signatures, one with each secret, so the receiver "
                "can switch at its own pace; then only the new secret signs."
            ]
            if webhook.previous_secret_expires_at is not None:
                notes.append("A rotation is still overlapping: the oldest secret stops signing at once.")
            return confirm_page(
                request,
                Confirmation(
                    title="Rotate a webhook's secret",
                    question=f"Rotate the signing secret of {webhook.url}? The new secret is shown once, on the next "
                    "page.",
                    button="Rotate secret",
                    action_url=f"{page}/rotate",
                    cancel_url=page,
                    crumbs=hooks.crumbs((webhook.url, page)),
                    notes=notes,
                    danger=True,
                ),
                form,
            )
        rotated = await write(request, session, user, hooks.op("rotatewebhooksecret"), hooks.path(webhook_id), {}, run)
    except PieError as exc:
        return await _page(request, session, hooks, webhook_id, problem=refusal(exc, "actions", form))
    expires = rotated.previous_secret_expires_at.strftime("%Y-%m-%d %H:%M:%SZ")
    return await _page(
        request,
        session,
        hooks,
        webhook_id,
        secret=rotated.secret,
        secret_note=f"Secret rotated. The new secret is shown only now; the previous one also signs until {expires}.",
    )


async def _delete(
    request: Request, session: Any, user: ConsoleUser, hooks: Hooks, webhook_id: uuid.UUID, confirm: str
) -> Response:
    """``deletewebhook``, after a confirmation."""
    form = await FormValues.read(request)
    webhook = await _shown(session, hooks, webhook_id)
    page = f"{hooks.base}/{webhook_id}"

    async def run() -> None:
        await webhooks.delete_webhook(session, hooks.client_id, webhook_id)

    try:
        if confirm != "yes":
            await rehearse(session, run)
            return confirm_page(
                request,
                Confirmation(
                    title="Delete a webhook",
                    question=f"Delete the webhook {webhook.url}? Nothing more is sent to it, pending deliveries "
                    "included; its delivery log is deleted with it.",
                    button="Delete webhook",
                    action_url=f"{page}/delete",
                    cancel_url=page,
                    crumbs=hooks.crumbs((webhook.url, page)),
                    facts=[("Events", ", ".join(webhook.events)), ("Status", webhook.status)],
                    danger=True,
                ),
                form,
            )
        await write(request, session, user, hooks.op("deletewebhook"), hooks.path(webhook_id), {}, run)
    except PieError as exc:
        return await _page(request, session, hooks, webhook_id, problem=refusal(exc, "actions", form))
    return RedirectResponse(f"{hooks.base}?done=deleted", status_code=303)


# -- the routes, declared once for both scopes -------------------------------------------------------------


def _declare(router: APIRouter, prefix: str, resolve: Callable[..., Any]) -> None:
    """The webhook pages and forms under ``prefix``; ``resolve`` checks the caller's right to
    the scope (after the CSRF check of a write: ``Writer`` comes first)."""
    scope = Depends(resolve)  # a default value: evaluated here (annotations resolve in module globals)

    @router.get(prefix, response_class=HTMLResponse)
    async def list_page(
        request: Request,
        session: Session,
        cursor: Cursor = None,
        new: NewForm = None,
        done: Done = None,
        hooks: Hooks = scope,
    ):
        return await _list(request, session, hooks, cursor, new=new is not None, done=done)

    @router.post(prefix, response_class=HTMLResponse)
    async def create(request: Request, user: Writer, session: Session, hooks: Hooks = scope):
        return await _create(request, session, user, hooks)

    @router.get(prefix + "/{webhook_id}", response_class=HTMLResponse)
    async def page(
        request: Request,
        webhook_id: WebhookIdPath,
        session: Session,
        cursor: Cursor = None,
        done: Done = None,
        hooks: Hooks = scope,
    ):
        return await _page(request, session, hooks, webhook_id, cursor, done=done)

    @router.post(prefix + "/{webhook_id}", response_class=HTMLResponse)
    async def edit(
        request: Request,
        webhook_id: WebhookIdPath,
        user: Writer,
        session: Session,
        confirm: Confirmed = "",
        hooks: Hooks = scope,
    ):
        return await _edit(request, session, user, hooks, webhook_id, confirm)

    @router.post(prefix + "/{webhook_id}/status", response_class=HTMLResponse)
    async def status(
        request: Request,
        webhook_id: WebhookIdPath,
        user: Writer,
        session: Session,
        confirm: Confirmed = "",
        hooks: Hooks = scope,
    ):
        return await _status(request, session, user, hooks, webhook_id, confirm)

    @router.post(prefix + "/{webhook_id}/test", response_class=HTMLResponse)
    async def test(request: Request, webhook_id: WebhookIdPath, user: Writer, session: Session, hooks: Hooks = scope):
        return await _test(request, session, user, hooks, webhook_id)

    @router.post(prefix + "/{webhook_id}/rotate", response_class=HTMLResponse)
    async def rotate(
        request: Request,
        webhook_id: WebhookIdPath,
        user: Writer,
        session: Session,
        confirm: Confirmed = "",
        hooks: Hooks = scope,
    ):
        return await _rotate(request, session, user, hooks, webhook_id, confirm)

    @router.post(prefix + "/{webhook_id}/delete", response_class=HTMLResponse)
    async def delete(
        request: Request,
        webhook_id: WebhookIdPath,
        user: Writer,
        session: Session,
        confirm: Confirmed = "",
        hooks: Hooks = scope,
    ):
        return await _delete(request, session, user, hooks, webhook_id, confirm)


_declare(router, "/clients/{client_id}/webhooks", tenant_hooks)
_declare(router, "/webhooks", platform_hooks)
