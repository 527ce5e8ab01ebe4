"""The operator console at ``/console``: server-rendered pages over the same logic functions and
the same permission and tenant rules as the API (``pie.deps.tenant_scope``, ``Principal.require``,
``pie.jobs.logic.visible_jobs``), so a page never shows a caller more than the API would.

Pages are thin: each calls the logic the matching API route calls and renders a template. A
domain exception becomes an HTML error page with the same status the API would answer; a
missing or ended session becomes a redirect to the sign-in page.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pie.assignments import logic as assignments
from pie.assignments.schemas import AssignmentJobRequest, AssignmentUpsert
from pie.audit import context as audit_context
from pie.audit import logic as audit
from pie.audit.routing import new_entry
from pie.clients import logic as clients
from pie.console import signin
from pie.console.signin import ConsoleUser, SignInRequired, console_user
from pie.deps import ClientIdPath, DomainIdPath, ModelIdPath, ModelVersionPath, ServiceIdPath, Session, tenant_scope
from pie.errors import AssignmentBlocked, BadRequest, Conflict, Forbidden, NotFound, PieError
from pie.jobs import logic as jobs
from pie.jobs.summary import queue_summary
from pie.pagination import NEXT_CURSOR_HEADER, PageParams
from pie.registry import logic as registry
from pie.registry import subscriptions
from pie.routing import PieRoute
from pie.schemas import ID_PATTERN, KEY_PATTERN, iso_z
from pie.tenancy import logic as tenancy

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
PAGE_SIZE = 50

templates = Jinja2Templates(directory=str(HERE / "templates"))


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _when(value: datetime | None) -> str:
    return iso_z(value).replace("T", " ")[:19] + "Z" if value is not None else "—"


templates.env.filters["pretty"] = _pretty
templates.env.filters["when"] = _when
templates.env.filters["iso"] = lambda v: iso_z(v) if v is not None else ""

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("user", getattr(request.state, "console_user", None))
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    return response


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    titles = {
        400: "Bad request",
        401: "Not signed in",
        403: "Forbidden",
        404: "Not found",
        409: "Conflict",
        422: "Not possible",
        502: "Sign-in service failed",
        503: "Unavailable",
    }
    return render(
        request,
        "error.html",
        status_code=status_code,
        status=status_code,
        title=titles.get(status_code, "Error"),
        message=message,
    )


# the sign-in page shows only these fixed notices (no text from the URL: no crafted messages)
REASONS = {"session_ended": "Your session ended (the token expired or is no longer valid). Sign in again."}


def _login_redirect(request: Request, ended: bool) -> Response:
    query = {"next": request.url.path + (f"?{request.url.query}" if request.url.query else "")}
    if ended:
        query["reason"] = "session_ended"
    if request.headers.get("hx-request"):  # an htmx poll: reload the whole page to sign in
        return Response(status_code=204, headers={"HX-Redirect": "/console/login?" + urlencode(query)})
    response = RedirectResponse("/console/login?" + urlencode(query), status_code=303)
    signin.clear_session_cookie(response, request)
    return response


class ConsoleRoute(PieRoute):
    """A PieRoute (bounded JSON parse, response hooks) rendering domain errors as HTML pages
    (same status as the API), sign-in as a redirect, and the console's security headers on
    every answer."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def console_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired as exc:
                response = _login_redirect(request, ended=exc.message != exc.default_message)
            except PieError as exc:
                response = error_page(request, exc.status_code, exc.message)
            except RequestValidationError as exc:
                response = error_page(request, 400, _describe(exc.errors()))
            response.headers.update(SECURITY_HEADERS)
            return response

        return console_handler


def _describe(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "form"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


async def signed_in(request: Request) -> ConsoleUser:
    user = await console_user(request)
    request.state.console_user = user
    return user


User = Annotated[ConsoleUser, Depends(signed_in)]


class Pager:
    """One page of a list logic function: its ``PageParams`` and the next page's link."""

    def __init__(self, request: Request, cursor: str | None, limit: int = PAGE_SIZE):
        self.request = request
        self.params = PageParams(limit=limit, cursor=cursor)
        self.response = Response()

    @property
    def next_url(self) -> str | None:
        cursor = self.response.headers.get(NEXT_CURSOR_HEADER)
        if not cursor:
            return None
        query = dict(self.request.query_params)
        query["cursor"] = cursor
        return f"{self.request.url.path}?{urlencode(query)}"


Cursor = Annotated[str | None, Query(max_length=2048)]
KeyPath = Annotated[str, PathParam(pattern=KEY_PATTERN)]
JobIdPath = Annotated[str, PathParam(pattern=ID_PATTERN)]


# -- sign-in ---------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str | None = None, reason: str | None = None):
    settings = request.app.state.settings
    return render(
        request,
        "login.html",
        next=signin.safe_next(next),
        reason=REASONS.get(reason or ""),
        user=None,
        cognito=signin.cognito_configured(settings),
    )


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    token: Annotated[str, Form(max_length=signin.MAX_TOKEN_LENGTH)] = "",
    next: Annotated[str, Form()] = "/console",
):
    signin.check_same_origin(request)
    settings = request.app.state.settings
    try:
        await signin.verify_token(request, token)
    except PieError as exc:
        return render(
            request,
            "login.html",
            status_code=exc.status_code,
            next=signin.safe_next(next),
            error=exc.message,
            user=None,
            cognito=signin.cognito_configured(settings),
        )
    response = RedirectResponse(signin.safe_next(next), status_code=303)
    signin.set_session_cookie(response, request, token.strip().removeprefix("Bearer ").strip())
    return response


@router.post("/logout")
async def logout(request: Request, user: User, csrf_token: Annotated[str, Form()] = ""):
    signin.check_csrf(request, user, csrf_token)
    response = RedirectResponse("/console/login", status_code=303)
    signin.clear_session_cookie(response, request)
    return response


@router.get("/login/once", response_class=HTMLResponse)
async def login_once(request: Request, code: Annotated[str | None, Query(max_length=128)] = None):
    """The one-time link `pie serve` prints in zero-setup local mode: an admin session."""
    token = signin.redeem_signin_code(request.app.state.settings, code)
    if token is None:
        raise Forbidden(
            "this sign-in link was already used or has expired: paste a token from `pie token --admin`, "
            "or restart `pie serve` for a new link"
        )
    response = render(request, "continue.html", next="/console", user=None)
    signin.set_session_cookie(response, request, token)
    return response


@router.get("/login/cognito")
async def login_cognito(request: Request, next: str | None = None):
    settings = request.app.state.settings
    if not signin.cognito_configured(settings):
        raise NotFound("Cognito sign-in is not configured (PIE_CONSOLE_COGNITO_DOMAIN, PIE_CONSOLE_COGNITO_CLIENT_ID)")
    url, cookie = signin.start_cognito(request, settings, signin.safe_next(next))
    response = RedirectResponse(url, status_code=302)
    signin.set_oauth_cookie(response, request, cookie)
    return response


@router.get("/auth/callback", response_class=HTMLResponse)
async def cognito_callback(
    request: Request, code: str | None = None, state: str | None = None, error: str | None = None
):
    settings = request.app.state.settings
    if not signin.cognito_configured(settings):
        raise NotFound("Cognito sign-in is not configured")
    if error:
        raise BadRequest(f"sign-in failed: {error[:200]}")
    attempt = signin.read_oauth_cookie(request, state)
    if not code:
        raise BadRequest("the sign-in answer has no authorization code")
    token = await signin.exchange_code(settings, code, attempt["verifier"])
    await signin.verify_token(request, token)
    # a page (not a redirect) continues to the console: the SameSite=Strict cookie set here is
    # sent on that same-site navigation, not on a redirect chain started by the Cognito domain
    response = render(request, "continue.html", next=signin.safe_next(attempt["next"]), user=None)
    signin.set_session_cookie(response, request, token)
    signin.clear_oauth_cookie(response, request)
    return response


# -- overview, tenants -------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def home(request: Request, user: User, session: Session):
    summary = None
    if user.principal.has("read_models") or user.principal.has("run_inference"):
        summary = await _summary(session, user)
    return render(request, "home.html", summary=summary)


@router.get("/clients", response_class=HTMLResponse)
async def clients_page(request: Request, user: User, session: Session, cursor: Cursor = None):
    user.principal.require("read_domains")
    pager = Pager(request, cursor)
    rows = await clients.list_clients(session, user.principal, pager.params, pager.response)
    return render(request, "clients.html", clients=rows, next_url=pager.next_url)


@router.get("/clients/{client_id}", response_class=HTMLResponse)
async def client_page(request: Request, client_id: ClientIdPath, user: User, session: Session, cursor: Cursor = None):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    pager = Pager(request, cursor)
    domains = await tenancy.list_domains(session, scope, pager.params, pager.response)
    return render(request, "client.html", client=scope.client, domains=domains, next_url=pager.next_url)


@router.get("/clients/{client_id}/domains/{domain_id}", response_class=HTMLResponse)
async def domain_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    pager = Pager(request, cursor)
    services = await tenancy.list_services(session, scope, domain_id, None, pager.params, pager.response)
    active = await assignments.list_assignments(
        session, scope, domain_id, None, "active", PageParams(limit=1000), Response()
    )
    default = await tenancy.active_default(session, scope.client_id, domain_id)
    governing = tenancy.governing(default[0], default[1], domain) if default else None
    return render(
        request,
        "domain.html",
        client=scope.client,
        domain=domain,
        services=services,
        assignments=active,
        governing=governing,
        next_url=pager.next_url,
    )


@router.get("/clients/{client_id}/domains/{domain_id}/services/{service_id}", response_class=HTMLResponse)
async def service_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    user: User,
    session: Session,
):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    service = await tenancy.get_service(session, scope, domain_id, service_id)
    active = await assignments.list_assignments(
        session, scope, domain_id, service_id, "active", PageParams(limit=1000), Response()
    )
    recent_jobs: list[Any] = []
    if user.principal.has("read_models") or user.principal.has("run_inference"):
        recent_jobs = await jobs.list_jobs(
            session,
            user.principal,
            PageParams(limit=10),
            Response(),
            client_id=scope.client_id,
            domain_id=domain_id,
            service_id=service_id,
        )
    names = sorted(set(service.provided_features) | set(service.resolved_features))
    return render(
        request,
        "service.html",
        client=scope.client,
        domain_id=domain_id,
        service=service,
        assignments=active,
        feature_names=names,
        jobs=recent_jobs,
    )


async def _current(session: Any, scope: Any, domain_id: str, service_id: str | None, key: str) -> Any:
    """The key's active revision, or None (a key whose revisions are all archived)."""
    try:
        return await assignments.get_active(session, scope, domain_id, service_id, key)
    except NotFound:
        return None


def _assignment_url(client_id: str, domain_id: str, service_id: str | None, key: str) -> str:
    base = f"/console/clients/{client_id}/domains/{domain_id}"
    if service_id:
        base += f"/services/{service_id}"
    return f"{base}/assignments/{key}"


async def _assignment(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    key: str,
    cursor: str | None,
    *,
    error: str | None = None,
    form_input: str | None = None,
    status_code: int = 200,
    moved: bool = False,
) -> HTMLResponse:
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    pager = Pager(request, cursor)
    revisions = await assignments.list_revisions(
        session, scope, domain_id, service_id, key, pager.params, pager.response
    )
    # "from which version": the revision written just before each one (the next row, newest first)
    history = []
    for index, revision in enumerate(revisions):
        before = revisions[index + 1] if index + 1 < len(revisions) else None
        history.append((revision, before))
    active = await _current(session, scope, domain_id, service_id, key)
    url = _assignment_url(client_id, domain_id, service_id, key)
    # the move action: domain-scope keys (their upsert has the freeze check and its dry run)
    can_move = service_id is None and user.principal.has("manage_domains")
    versions: list[Any] = []
    if can_move and active is not None and user.principal.has("read_models"):
        versions = await registry.list_versions(session, active.model_id, PageParams(limit=200), Response())
    return render(
        request,
        "assignment.html",
        status_code=status_code,
        client=scope.client,
        domain_id=domain_id,
        service_id=service_id,
        key=key,
        history=history,
        active=active,
        next_url=pager.next_url,
        can_launch=user.principal.has("run_inference"),
        action=f"{url}/jobs",
        error=error,
        form_input=form_input if form_input is not None else "{}",
        can_move=can_move,
        move_action=f"{url}/move/preview",
        versions=versions,
        moved=moved,
    )


@router.get("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}", response_class=HTMLResponse)
async def domain_assignment_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
    moved: Annotated[str | None, Query(max_length=1, description="after a move")] = None,
):
    return await _assignment(
        request, user, session, client_id, domain_id, None, assignment_key, cursor, moved=moved == "1"
    )


@router.get(
    "/clients/{client_id}/domains/{domain_id}/services/{service_id}/assignments/{assignment_key}",
    response_class=HTMLResponse,
)
async def service_assignment_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
):
    return await _assignment(request, user, session, client_id, domain_id, service_id, assignment_key, cursor)


@asynccontextmanager
async def _audited(
    request: Request, session: Any, user: ConsoleUser, action: str, path: dict[str, Any], body: dict[str, Any]
) -> AsyncIterator[audit_context.AuditEntry]:
    """A console write as the API audits it (``pie.audit.routing.audited``): one audit row with
    the API's operation id as ``action``, the signed-in caller as actor, inserted in the same
    transaction when the block ends normally (an exception leaves no row). The row's method and
    path are the console request's; ``summary.via`` says it came from the console."""
    entry = new_entry(request, user.principal, action, path, body)
    entry.summary["via"] = "console"
    audit_context.begin(session, entry)
    try:
        yield entry
        if not entry.skipped:
            await audit.record(session, entry, method=request.method, path=request.url.path)
    finally:
        audit_context.end(session)


async def _launch(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    key: str,
    csrf_token: str,
    input_text: str,
) -> Response:
    """Launch an inference job through an assignment, by the logic the API route
    ``rundomainmodelassignmentjob`` / ``runservicemodelassignmentjob`` calls, audited as it."""
    signin.check_csrf(request, user, csrf_token)
    scope = await tenant_scope(session, user.principal, client_id, "run_inference")
    try:
        value = json.loads(input_text or "{}")
        body = AssignmentJobRequest.model_validate({"job_type": "inference", "input": value})
    except ValueError as exc:  # json.JSONDecodeError and pydantic's ValidationError
        message = _describe(exc.errors()) if isinstance(exc, ValidationError) else f"input is not valid JSON: {exc}"
        raise BadRequest(message) from exc
    path = {"client_id": client_id, "domain_id": domain_id, "assignment_key": key}
    if service_id is not None:
        path["service_id"] = service_id
    action = "rundomainmodelassignmentjob" if service_id is None else "runservicemodelassignmentjob"
    async with _audited(request, session, user, action, path, body.model_dump(mode="json")):
        job = await assignments.run_assignment_job(session, scope, domain_id, service_id, key, body)
    return RedirectResponse(f"/console/jobs/{job.job_id}", status_code=303)


async def _launch_or_form(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    key: str,
    csrf_token: str,
    input_text: str,
) -> Response:
    try:
        # a savepoint: a refused launch leaves nothing behind, and the form can still be rendered
        async with session.begin_nested():
            return await _launch(request, user, session, client_id, domain_id, service_id, key, csrf_token, input_text)
    except PieError as exc:
        if exc.status_code not in (400, 422):
            raise
        # the form again, with the reason and what was typed
        return await _assignment(
            request,
            user,
            session,
            client_id,
            domain_id,
            service_id,
            key,
            None,
            error=exc.message,
            form_input=input_text,
            status_code=exc.status_code,
        )


InputField = Annotated[str, Form(alias="input", max_length=1_000_000)]
CsrfField = Annotated[str, Form()]


@router.post("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}/jobs")
async def launch_domain_job(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    input_text: InputField = "{}",
):
    return await _launch_or_form(
        request, user, session, client_id, domain_id, None, assignment_key, csrf_token, input_text
    )


@router.post("/clients/{client_id}/domains/{domain_id}/services/{service_id}/assignments/{assignment_key}/jobs")
async def launch_service_job(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    input_text: InputField = "{}",
):
    return await _launch_or_form(
        request, user, session, client_id, domain_id, service_id, assignment_key, csrf_token, input_text
    )


# -- moving an assignment key: dry-run preview, then the confirmed move --------------------------------

VersionField = Annotated[str, Form(max_length=256)]
MOVE_ACTION = "putdomainmodelassignment"  # the API operation the move is (audit action)


def _move_body(model_id: str, model_version: str) -> AssignmentUpsert:
    """The body of ``PUT .../assignments/{key}`` the move sends: an active revision of that version."""
    try:
        return AssignmentUpsert.model_validate({"model_id": model_id.strip(), "model_version": model_version.strip()})
    except ValidationError as exc:
        raise BadRequest(_describe(exc.errors())) from exc


def _preview(
    request: Request,
    scope: Any,
    domain_id: str,
    key: str,
    current: Any,
    body: AssignmentUpsert,
    *,
    status_code: int = 200,
    dry_run: Any = None,
    blocked: AssignmentBlocked | None = None,
    error: str | None = None,
) -> HTMLResponse:
    url = _assignment_url(scope.client_id, domain_id, None, key)
    return render(
        request,
        "move_preview.html",
        status_code=status_code,
        client=scope.client,
        domain_id=domain_id,
        key=key,
        current=current,
        target=body,
        dry_run=dry_run,
        blocked=blocked,
        error=error,
        assignment_url=url,
        confirm_action=f"{url}/move",
        expected=str(current.assignment_id) if current is not None else "",
    )


def _refused(
    request: Request, scope: Any, domain_id: str, key: str, current: Any, body: AssignmentUpsert, exc: PieError
) -> HTMLResponse:
    """The preview page of a refused move: the blocking services (422), or the reason (409: the
    key moved since the preview; 422: e.g. an unknown or failed version). Other errors propagate
    (the error page)."""
    if isinstance(exc, AssignmentBlocked):
        return _preview(request, scope, domain_id, key, current, body, status_code=422, blocked=exc)
    if exc.status_code not in (409, 422):
        raise exc
    return _preview(request, scope, domain_id, key, current, body, status_code=exc.status_code, error=exc.message)


@router.post(
    "/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}/move/preview", response_class=HTMLResponse
)
async def move_preview(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    model_id: VersionField = "",
    model_version: VersionField = "",
):
    """The dry run (``PUT ...?dry_run=true``): every check of the move, nothing written; the
    answer is the page that asks to confirm (or lists the services that block it)."""
    signin.check_csrf(request, user, csrf_token)
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    body = _move_body(model_id, model_version)
    current = await _current(session, scope, domain_id, None, assignment_key)
    try:
        dry_run = await assignments.upsert_domain_assignment(
            session, scope, domain_id, assignment_key, body, dry_run=True
        )
    except PieError as exc:
        return _refused(request, scope, domain_id, assignment_key, current, body, exc)
    return _preview(request, scope, domain_id, assignment_key, current, body, dry_run=dry_run)


@router.post("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}/move", response_class=HTMLResponse)
async def move(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    model_id: VersionField = "",
    model_version: VersionField = "",
    expected: Annotated[str, Form(max_length=64)] = "",
):
    """The confirmed move: the logic of ``PUT .../assignments/{key}`` (same checks, same writes),
    audited as that operation. ``expected`` is the active revision the preview showed: if the
    key moved since, nothing is written and the preview is shown again (409)."""
    signin.check_csrf(request, user, csrf_token)
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    body = _move_body(model_id, model_version)
    path = {"client_id": client_id, "domain_id": domain_id, "assignment_key": assignment_key}
    current = None
    try:
        async with session.begin_nested():  # a refused move leaves nothing behind
            # the row lock the upsert takes, taken first: the key cannot move between this
            # comparison with the preview and the write
            await tenancy.load_domain(session, scope.client_id, domain_id, lock="update")
            current = await _current(session, scope, domain_id, None, assignment_key)
            if expected != (str(current.assignment_id) if current is not None else ""):
                raise Conflict(f"assignment {assignment_key} changed since the preview: check the new preview")
            async with _audited(
                request,
                session,
                user,
                MOVE_ACTION,
                path,
                body.model_dump(mode="json", include={"model_id", "model_version", "status"}),
            ):
                await assignments.upsert_domain_assignment(session, scope, domain_id, assignment_key, body)
    except PieError as exc:
        return _refused(request, scope, domain_id, assignment_key, current, body, exc)
    return RedirectResponse(_assignment_url(client_id, domain_id, None, assignment_key) + "?moved=1", status_code=303)


# -- models ------------------------------------------------------------------------------------------


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


# -- jobs ----------------------------------------------------------------------------------------------

JOB_STATUSES = ("pending", "started", "success", "failure")
JOB_TYPES = ("inference", "training")


def _parse_time(name: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: not a date and time ({value!r})") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(
    request: Request,
    user: User,
    session: Session,
    status: Annotated[str | None, Query(max_length=16)] = None,
    job_type: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    client: Annotated[str | None, Query(max_length=128)] = None,
    created_after: Annotated[str | None, Query(max_length=40)] = None,
    created_before: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Cursor = None,
):
    if status and status not in JOB_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(JOB_STATUSES)}")
    if job_type and job_type not in JOB_TYPES:
        raise BadRequest(f"job type must be one of {', '.join(JOB_TYPES)}")
    pager = Pager(request, cursor)
    rows = await jobs.list_jobs(
        session,
        user.principal,
        pager.params,
        pager.response,
        client_id=client or None,
        status=status or None,
        model_id=model or None,
        job_type=job_type or None,
        created_after=_parse_time("created after", created_after),
        created_before=_parse_time("created before", created_before),
    )
    filters = {
        "status": status or "",
        "job_type": job_type or "",
        "model": model or "",
        "client": client or "",
        "created_after": created_after or "",
        "created_before": created_before or "",
    }
    return render(
        request,
        "jobs.html",
        jobs=rows,
        filters=filters,
        statuses=JOB_STATUSES,
        job_types=JOB_TYPES,
        next_url=pager.next_url,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: JobIdPath, user: User, session: Session):
    job = await jobs.get_job(session, user.principal, job_id)
    return render(request, "job.html", job=job)


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
async def job_fragment(request: Request, job_id: JobIdPath, user: User, session: Session):
    """The job's live part (status, times, output, error): htmx polls it while the job runs."""
    job = await jobs.get_job(session, user.principal, job_id)
    return render(request, "job_live.html", job=job)


# -- the audit log ---------------------------------------------------------------------------------------

AUDIT_TARGET_TYPES = ("client", "domain", "service", "assignment", "model", "model_version", "subscription", "job")
AUDIT_FILTERS = {  # name -> (pattern of GET /v2/audit, label in messages)
    "client": (ID_PATTERN, "client"),
    "target_type": (r"^[a-z_]{1,32}$", "target type"),
    "target_id": (r"^.{1,512}$", "target id"),
    "actor": (r"^.{1,512}$", "actor"),
    "action": (r"^[a-z]{1,64}$", "action"),
}
FilterText = Annotated[str | None, Query(max_length=512)]


def target_url(record: Any) -> str | None:
    """The console page of an audit row's target, when it has one."""
    kind, target, tenant = record.target_type, record.target_id, record.client_id
    if not target:
        return "/console/clients/" + tenant if kind == "client" and tenant else None
    parts = target.split("/")
    if kind == "client":
        return f"/console/clients/{target}"
    if kind == "model":
        return f"/console/models/{target}"
    if kind == "model_version" and len(parts) == 2:
        return f"/console/models/{parts[0]}/versions/{parts[1]}"
    if kind == "job":
        return f"/console/jobs/{target}"
    if tenant is None:
        return None
    base = f"/console/clients/{tenant}/domains/{parts[0]}"
    if kind == "domain":
        return base
    if kind == "service" and len(parts) == 2:
        return f"{base}/services/{parts[1]}"
    if kind == "assignment" and len(parts) == 2:
        return f"{base}/assignments/{parts[1]}"
    if kind == "assignment" and len(parts) == 3:
        return f"{base}/services/{parts[1]}/assignments/{parts[2]}"
    return None


templates.env.filters["target_url"] = target_url


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(
    request: Request,
    user: User,
    session: Session,
    client: FilterText = None,
    target_type: FilterText = None,
    target_id: FilterText = None,
    actor: FilterText = None,
    action: FilterText = None,
    occurred_after: Annotated[str | None, Query(max_length=40)] = None,
    occurred_before: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Cursor = None,
):
    """``GET /v2/audit`` as a page: the same permission (``read_domains``) and tenant rules
    (admins every row; others the rows of their tenants; 403 for a caller without any)."""
    user.principal.require("read_domains")
    given = {"client": client, "target_type": target_type, "target_id": target_id, "actor": actor, "action": action}
    values: dict[str, str | None] = {}
    for name, value in given.items():
        value = (value or "").strip() or None
        pattern, label = AUDIT_FILTERS[name]
        if value is not None and not re.fullmatch(pattern, value):
            raise BadRequest(f"{label}: not a valid value ({value[:80]!r})")
        values[name] = value
    pager = Pager(request, cursor)
    rows = await audit.list_audit(
        session,
        user.principal,
        pager.params,
        pager.response,
        client_id=values["client"],
        target_type=values["target_type"],
        target_id=values["target_id"],
        actor=values["actor"],
        action=values["action"],
        after=_parse_time("occurred after", occurred_after),
        before=_parse_time("occurred before", occurred_before),
    )
    filters = {name: value or "" for name, value in values.items()}
    filters.update(occurred_after=occurred_after or "", occurred_before=occurred_before or "")
    return render(
        request, "audit.html", records=rows, filters=filters, target_types=AUDIT_TARGET_TYPES, next_url=pager.next_url
    )


async def _summary(session: Any, user: ConsoleUser):
    return await queue_summary(session, where=jobs.visible_jobs(user.principal))


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, user: User, session: Session):
    return render(request, "queue.html", summary=await _summary(session, user))


@router.get("/{unknown:path}", response_class=HTMLResponse)
async def unknown_page(request: Request, unknown: str):
    """Any other console path: the 404 page (not the API's JSON envelope)."""
    raise NotFound(f"no console page {request.url.path}")
