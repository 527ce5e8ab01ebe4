"""Clients (tenants): the list and a client's page; for administrators, creating a client,
renaming it, suspending or reactivating it and managing its ``app_client_ids`` (the logic of
``createclient`` / ``updateclient``, audited as those operations)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pie.clients import logic as clients
from pie.clients.schemas import ClientCreate, ClientUpdate
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
from pie.tenancy import logic as tenancy

router = console_router()


def lines(text: str) -> list[str]:
    """Non-empty lines (or comma-separated items) of a text field, stripped."""
    return [item.strip() for item in text.replace(",", "\n").splitlines() if item.strip()]


async def _clients(
    request: Request,
    user: ConsoleUser,
    session: Any,
    cursor: str | None,
    *,
    new: bool = False,
    problem: Problem | None = None,
) -> HTMLResponse:
    user.principal.require("read_domains")
    if new or problem:
        user.principal.require("admin")  # createclient is admin only
    pager = Pager(request, cursor)
    rows = await clients.list_clients(session, user.principal, pager.params, pager.response)
    return render(
        request,
        "clients.html",
        status_code=problem.status_code if problem else 200,
        clients=rows,
        next_url=pager.next_url,
        can_create=user.principal.has("admin"),
        new=new or problem is not None,
        problem=problem,
    )


@router.get("/clients", response_class=HTMLResponse)
async def clients_page(request: Request, user: User, session: Session, cursor: Cursor = None, new: NewForm = None):
    return await _clients(request, user, session, cursor, new=new is not None)


@router.post("/clients", response_class=HTMLResponse)
async def create_client(request: Request, user: Writer, session: Session):
    """``createclient`` (admin only): a client id, a name, optional app client ids."""
    user.principal.require("admin")
    form = await FormValues.read(request)
    sent: dict[str, Any] = {"client_id": form.text("client_id"), "name": form.text("name")}
    if apps := lines(form.get("app_client_ids")):
        sent["app_client_ids"] = apps
    try:
        body = parse_body(ClientCreate, sent)
        await write(request, session, user, "createclient", {}, sent, lambda: clients.create_client(session, body))
    except PieError as exc:
        return await _clients(request, user, session, None, problem=refusal(exc, "new-client", form))
    return RedirectResponse(f"/console/clients/{body.client_id}?done=created", status_code=303)


DONE = {
    "created": "Client created.",
    "renamed": "Name saved.",
    "suspended": "Client suspended: its records can be read, every write and job launch under it is refused.",
    "active": "Client reactivated.",
    "apps": "App client ids saved.",
    "domain": "Domain created.",
}


async def client_view(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    cursor: str | None = None,
    *,
    new: str | None = None,
    done: str | None = None,
    problem: Problem | None = None,
) -> HTMLResponse:
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    client = await clients.get_client(session, scope.client_id)  # with its app client ids
    pager = Pager(request, cursor)
    domains = await tenancy.list_domains(session, scope, pager.params, pager.response)
    can_manage_domains = user.principal.has("manage_domains")
    new_domain = can_manage_domains and (new == "domain" or (problem is not None and problem.form == "new-domain"))
    return render(
        request,
        "client.html",
        status_code=problem.status_code if problem else 200,
        client=client,
        domains=domains,
        next_url=pager.next_url,
        is_admin=user.principal.has("admin"),
        can_manage_domains=can_manage_domains,
        new_domain=new_domain,
        done=DONE.get(done or ""),
        problem=problem,
    )


@router.get("/clients/{client_id}", response_class=HTMLResponse)
async def client_page(
    request: Request,
    client_id: ClientIdPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
    new: NewForm = None,
    done: Done = None,
):
    return await client_view(request, user, session, client_id, cursor, new=new, done=done)


async def _update(request: Request, user: ConsoleUser, session: Any, client_id: str, sent: dict[str, Any]) -> None:
    body = parse_body(ClientUpdate, sent)
    await write(
        request,
        session,
        user,
        "updateclient",
        {"client_id": client_id},
        sent,
        lambda: clients.update_client(session, client_id, body),
    )


@router.post("/clients/{client_id}/name", response_class=HTMLResponse)
async def rename_client(request: Request, client_id: ClientIdPath, user: Writer, session: Session):
    """``updateclient`` ``{name}`` (admin only)."""
    user.principal.require("admin")
    form = await FormValues.read(request)
    try:
        await clients.get_client(session, client_id)  # 404 before the form is judged
        await _update(request, user, session, client_id, {"name": form.text("name")})
    except PieError as exc:
        return await client_view(request, user, session, client_id, problem=refusal(exc, "rename", form))
    return RedirectResponse(f"/console/clients/{client_id}?done=renamed", status_code=303)


@router.post("/clients/{client_id}/status", response_class=HTMLResponse)
async def set_client_status(
    request: Request, client_id: ClientIdPath, user: Writer, session: Session, confirm: Confirmed = ""
) -> Response:
    """``updateclient`` ``{status}``: suspend or reactivate (admin only), after a confirmation."""
    user.principal.require("admin")
    form = await FormValues.read(request)
    status = form.text("status")
    now = (await clients.get_client(session, client_id)).status  # read before the rehearsal expires the row
    try:
        if status not in ("active", "suspended"):
            raise BadRequest("status must be active or suspended")
        if confirm != "yes":
            await rehearse(session, lambda: _update(request, user, session, client_id, {"status": status}))
            suspend = status == "suspended"
            return confirm_page(
                request,
                Confirmation(
                    title=f"{'Suspend' if suspend else 'Reactivate'} client {client_id}",
                    question=(
                        f"Suspend {client_id}? Its records stay readable; every write and job launch under it "
                        "will be refused (422) until it is reactivated."
                        if suspend
                        else f"Reactivate {client_id}? Writes and job launches under it are accepted again."
                    ),
                    button=f"{'Suspend' if suspend else 'Reactivate'} {client_id}",
                    action_url=f"/console/clients/{client_id}/status",
                    cancel_url=f"/console/clients/{client_id}",
                    crumbs=[("Clients", "/console/clients"), (client_id, f"/console/clients/{client_id}")],
                    changes=[("Status", now, status)],
                ),
                form,
            )
        await _update(request, user, session, client_id, {"status": status})
    except PieError as exc:
        return await client_view(request, user, session, client_id, problem=refusal(exc, "status", form))
    return RedirectResponse(f"/console/clients/{client_id}?done={status}", status_code=303)


@router.post("/clients/{client_id}/app-clients", response_class=HTMLResponse)
async def change_app_clients(
    request: Request, client_id: ClientIdPath, user: Writer, session: Session, confirm: Confirmed = ""
) -> Response:
    """``updateclient`` ``{app_client_ids}`` (admin only): add one (``add``), or remove one
    (``remove``, after a confirmation). The list is read under the client's row lock, so two
    concurrent edits do not lose one another."""
    user.principal.require("admin")
    form = await FormValues.read(request)
    added, removed = form.text("add"), form.text("remove")
    try:
        if bool(added) == bool(removed):
            raise BadRequest("give one app client id to add or to remove")
        client = await clients.get_client(session, client_id, for_update=True)
        current = list(client.app_client_ids)
        if removed:
            if removed not in current:
                raise BadRequest(f"{removed} is not an app client id of client {client_id}")
            wanted = [a for a in current if a != removed]
            if confirm != "yes":
                return confirm_page(
                    request,
                    Confirmation(
                        title=f"Remove app client id {removed}",
                        question=f"Remove {removed} from client {client_id}? Machine tokens of that app client "
                        f"will no longer act for {client_id}.",
                        button=f"Remove {removed}",
                        action_url=f"/console/clients/{client_id}/app-clients",
                        cancel_url=f"/console/clients/{client_id}",
                        crumbs=[("Clients", "/console/clients"), (client_id, f"/console/clients/{client_id}")],
                        changes=[("App client ids", ", ".join(current), ", ".join(wanted) or "none")],
                    ),
                    form,
                )
        else:
            if added in current:
                raise BadRequest(f"{added} is already an app client id of client {client_id}")
            wanted = [*current, added]
        await _update(request, user, session, client_id, {"app_client_ids": wanted})
    except PieError as exc:
        return await client_view(request, user, session, client_id, problem=refusal(exc, "apps", form))
    return RedirectResponse(f"/console/clients/{client_id}?done=apps", status_code=303)
