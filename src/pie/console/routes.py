"""The operator console at ``/console``: server-rendered pages over the same logic functions and
the same permission and tenant rules as the API (``pie.deps.tenant_scope``, ``Principal.require``,
``pie.jobs.logic.visible_jobs``), so a page never shows a caller more than the API would.

Pages are thin: each calls the logic the matching API route calls and renders a template. A
domain exception becomes an HTML error page with the same status the API would answer; a
missing or ended session becomes a redirect to the sign-in page.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from starlette.responses import HTMLResponse, RedirectResponse, Response

from pie.assignments import logic as assignments
from pie.assignments.schemas import AssignmentJobRequest
from pie.clients import logic as clients
from pie.console import signin
from pie.console.signin import ConsoleUser, SignInRequired, console_user
from pie.routing import PieRoute
from pie.deps import ClientIdPath, DomainIdPath, ModelIdPath, ModelVersionPath, ServiceIdPath, Session, tenant_scope
from pie.errors import BadRequest, Forbidden, NotFound, PieError
from pie.jobs import logic as jobs
from pie.jobs.summary import queue_summary
from pie.pagination import NEXT_CURSOR_HEADER, PageParams
from pie.registry import logic as registry
from pie.registry import subscriptions
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
    titles = {400: "Bad request", 401: "Not signed in", 403: "Forbidden", 404: "Not found", 409: "Conflict",
              422: "Not possible", 502: "Sign-in service failed", 503: "Unavailable"}
    return render(
        request, "error.html", status_code=status_code, status=status_code,
        title=titles.get(status_code, "Error"), message=message,
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
        request, "login.html", next=signin.safe_next(next), reason=REASONS.get(reason or ""), user=None,
        cognito=signin.cognito_configured(settings),
    )


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, token: Annotated[str, Form(max_length=signin.MAX_TOKEN_LENGTH)] = "",
                next: Annotated[str, Form()] = "/console"):
    signin.check_same_origin(request)
    settings = request.app.state.settings
    try:
        await signin.verify_token(request, token)
    except PieError as exc:
        return render(request, "login.html", status_code=exc.status_code, next=signin.safe_next(next),
                      error=exc.message, user=None, cognito=signin.cognito_configured(settings))
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
async def cognito_callback(request: Request, code: str | None = None, state: str | None = None,
                           error: str | None = None):
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
async def domain_page(request: Request, client_id: ClientIdPath, domain_id: DomainIdPath, user: User,
                      session: Session, cursor: Cursor = None):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    pager = Pager(request, cursor)
    services = await tenancy.list_services(session, scope, domain_id, None, pager.params, pager.response)
    active = await assignments.list_assignments(
        session, scope, domain_id, None, "active", PageParams(limit=1000), Response()
    )
    default = await tenancy.active_default(session, scope.client_id, domain_id)
    governing = default[1] if default else None
    return render(
        request, "domain.html", client=scope.client, domain=domain, services=services, assignments=active,
        governing=governing, next_url=pager.next_url,
    )


@router.get("/clients/{client_id}/domains/{domain_id}/services/{service_id}", response_class=HTMLResponse)
async def service_page(request: Request, client_id: ClientIdPath, domain_id: DomainIdPath,
                       service_id: ServiceIdPath, user: User, session: Session):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    service = await tenancy.get_service(session, scope, domain_id, service_id)
    active = await assignments.list_assignments(
        session, scope, domain_id, service_id, "active", PageParams(limit=1000), Response()
    )
    recent_jobs: list[Any] = []
    if user.principal.has("read_models") or user.principal.has("run_inference"):
        recent_jobs = await jobs.list_jobs(
            session, user.principal, PageParams(limit=10), Response(),
            client_id=scope.client_id, domain_id=domain_id, service_id=service_id,
        )
    names = sorted(set(service.provided_features) | set(service.resolved_features))
    return render(
        request, "service.html", client=scope.client, domain_id=domain_id, service=service, assignments=active,
        feature_names=names, jobs=recent_jobs,
    )


async def _assignment(request: Request, user: ConsoleUser, session: Any, client_id: str, domain_id: str,
                      service_id: str | None, key: str, cursor: str | None, *, error: str | None = None,
                      form_input: str | None = None, status_code: int = 200) -> HTMLResponse:
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
    active = next((r for r in revisions if r.status == "active"), None)
    base = f"/console/clients/{client_id}/domains/{domain_id}"
    if service_id:
        base += f"/services/{service_id}"
    return render(
        request, "assignment.html", status_code=status_code, client=scope.client, domain_id=domain_id,
        service_id=service_id, key=key, history=history, active=active, next_url=pager.next_url,
        can_launch=user.principal.has("run_inference"), action=f"{base}/assignments/{key}/jobs",
        error=error, form_input=form_input if form_input is not None else "{}",
    )


@router.get("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}", response_class=HTMLResponse)
async def domain_assignment_page(request: Request, client_id: ClientIdPath, domain_id: DomainIdPath,
                                 assignment_key: KeyPath, user: User, session: Session, cursor: Cursor = None):
    return await _assignment(request, user, session, client_id, domain_id, None, assignment_key, cursor)


@router.get(
    "/clients/{client_id}/domains/{domain_id}/services/{service_id}/assignments/{assignment_key}",
    response_class=HTMLResponse,
)
async def service_assignment_page(request: Request, client_id: ClientIdPath, domain_id: DomainIdPath,
                                  service_id: ServiceIdPath, assignment_key: KeyPath, user: User, session: Session,
                                  cursor: Cursor = None):
    return await _assignment(request, user, session, client_id, domain_id, service_id, assignment_key, cursor)


async def _launch(request: Request, user: ConsoleUser, session: Any, client_id: str, domain_id: str,
                  service_id: str | None, key: str, csrf_token: str, input_text: str) -> Response:
    """The one action of this console: an inference job through an assignment, by the logic the
    API route ``rundomainmodelassignmentjob`` / ``runservicemodelassignmentjob`` calls."""
    signin.check_csrf(request, user, csrf_token)
    scope = await tenant_scope(session, user.principal, client_id, "run_inference")
    try:
        value = json.loads(input_text or "{}")
        body = AssignmentJobRequest.model_validate({"job_type": "inference", "input": value})
    except ValueError as exc:  # json.JSONDecodeError and pydantic's ValidationError
        message = _describe(exc.errors()) if isinstance(exc, ValidationError) else f"input is not valid JSON: {exc}"
        raise BadRequest(message) from exc
    job = await assignments.run_assignment_job(session, scope, domain_id, service_id, key, body)
    return RedirectResponse(f"/console/jobs/{job.job_id}", status_code=303)


async def _launch_or_form(request: Request, user: ConsoleUser, session: Any, client_id: str, domain_id: str,
                          service_id: str | None, key: str, csrf_token: str, input_text: str) -> Response:
    try:
        # a savepoint: a refused launch leaves nothing behind, and the form can still be rendered
        async with session.begin_nested():
            return await _launch(request, user, session, client_id, domain_id, service_id, key, csrf_token, input_text)
    except PieError as exc:
        if exc.status_code not in (400, 422):
            raise
        # the form again, with the reason and what was typed
        return await _assignment(
            request, user, session, client_id, domain_id, service_id, key, None,
            error=exc.message, form_input=input_text, status_code=exc.status_code,
        )


InputField = Annotated[str, Form(alias="input", max_length=1_000_000)]
CsrfField = Annotated[str, Form()]


@router.post("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}/jobs")
async def launch_domain_job(request: Request, client_id: ClientIdPath, domain_id: DomainIdPath, assignment_key: KeyPath,
                            user: User, session: Session, csrf_token: CsrfField = "", input_text: InputField = "{}"):
    return await _launch_or_form(request, user, session, client_id, domain_id, None, assignment_key, csrf_token,
                                 input_text)


@router.post("/clients/{client_id}/domains/{domain_id}/services/{service_id}/assignments/{assignment_key}/jobs")
async def launch_service_job(request: Request, client_id: ClientIdPath, domain_id: DomainIdPath,
                             service_id: ServiceIdPath, assignment_key: KeyPath, user: User, session: Session,
                             csrf_token: CsrfField = "", input_text: InputField = "{}"):
    return await _launch_or_form(request, user, session, client_id, domain_id, service_id, assignment_key,
                                 csrf_token, input_text)


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
async def version_page(request: Request, model_id: ModelIdPath, model_version: ModelVersionPath, user: User,
                       session: Session):
    user.principal.require("read_models")
    version = await registry.get_model_version(session, model_id, model_version)
    return render(request, "version.html", version=version)


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
        session, user.principal, pager.params, pager.response,
        client_id=client or None, status=status or None, model_id=model or None, job_type=job_type or None,
        created_after=_parse_time("created after", created_after),
        created_before=_parse_time("created before", created_before),
    )
    filters = {"status": status or "", "job_type": job_type or "", "model": model or "", "client": client or "",
               "created_after": created_after or "", "created_before": created_before or ""}
    return render(request, "jobs.html", jobs=rows, filters=filters, statuses=JOB_STATUSES, job_types=JOB_TYPES,
                  next_url=pager.next_url)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: JobIdPath, user: User, session: Session):
    job = await jobs.get_job(session, user.principal, job_id)
    return render(request, "job.html", job=job)


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
async def job_fragment(request: Request, job_id: JobIdPath, user: User, session: Session):
    """The job's live part (status, times, output, error): htmx polls it while the job runs."""
    job = await jobs.get_job(session, user.principal, job_id)
    return render(request, "job_live.html", job=job)


async def _summary(session: Any, user: ConsoleUser):
    return await queue_summary(session, where=jobs.visible_jobs(user.principal))


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, user: User, session: Session):
    return render(request, "queue.html", summary=await _summary(session, user))


@router.get("/{unknown:path}", response_class=HTMLResponse)
async def unknown_page(request: Request, unknown: str):
    """Any other console path: the 404 page (not the API's JSON envelope)."""
    raise NotFound(f"no console page {request.url.path}")
