"""What every console page shares: the templates and their filters, rendering (pages and error
pages), the route class (domain errors as HTML pages, sign-in as a redirect, security headers),
the signed-in user dependency, paging, and the audit entry of a console write."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pie.audit import context as audit_context
from pie.audit import logic as audit
from pie.audit.routing import new_entry
from pie.console import readable, signin
from pie.console.signin import ConsoleUser, SignInRequired, console_user
from pie.errors import BadRequest, PieError
from pie.http.routing import PieRoute
from pie.pagination import NEXT_CURSOR_HEADER, PageParams
from pie.schemas import ID_PATTERN, KEY_PATTERN, iso_z

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
templates.env.filters["compact"] = readable.compact
templates.env.filters["schema_words"] = readable.describe_schema
templates.env.filters["feature_rows"] = readable.feature_rows
templates.env.filters["handler_rows"] = readable.handler_rows
templates.env.filters["contract_rows"] = readable.contract_rows
templates.env.filters["summary_rows"] = readable.summary_rows
templates.env.filters["action_words"] = readable.action_words

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


def login_redirect(request: Request, ended: bool) -> Response:
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
                response = login_redirect(request, ended=exc.message != exc.default_message)
            except PieError as exc:
                response = error_page(request, exc.status_code, exc.message)
            except RequestValidationError as exc:
                response = error_page(request, 400, describe_errors(exc.errors()))
            response.headers.update(SECURITY_HEADERS)
            return response

        return console_handler


def describe_errors(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "form"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


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
# ``?new=...``: a page opens its creation form (no page of its own: any id could be a record's)
NewForm = Annotated[str | None, Query(max_length=16, pattern=r"^[a-z0-9]+$")]
# ``?done=...``: the outcome a page reports after a write redirected to it
Done = Annotated[str | None, Query(max_length=16, pattern=r"^[a-z_]+$")]
KeyPath = Annotated[str, PathParam(pattern=KEY_PATTERN)]
JobIdPath = Annotated[str, PathParam(pattern=ID_PATTERN)]


@asynccontextmanager
async def audited(
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


CsrfField = Annotated[str, Form()]
BodyT = TypeVar("BodyT", bound=BaseModel)


def parse_body(model: type[BodyT], sent: dict[str, Any]) -> BodyT:
    """The API's request body ``model`` of what a form sends (400 with the schema's own
    messages when it does not fit, as the API answers)."""
    try:
        return model.model_validate(sent)
    except ValidationError as exc:
        raise BadRequest(describe_errors(exc.errors())) from exc


async def checked_writer(request: Request, user: User, csrf_token: CsrfField = "") -> ConsoleUser:
    """Dependency of every console write: the signed-in caller, whose form carries this
    session's CSRF token and comes from this origin (403 otherwise, before anything is read)."""
    signin.check_csrf(request, user, csrf_token)
    return user


Writer = Annotated[ConsoleUser, Depends(checked_writer)]
# "yes" once the caller answered a confirmation page (its hidden field)
Confirmed = Annotated[str, Form(max_length=3)]
T = TypeVar("T")


class FormValues:
    """A submitted form's text fields (file parts are ignored)."""

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items

    @classmethod
    async def read(cls, request: Request) -> FormValues:
        form = await request.form()
        return cls([(name, value) for name, value in form.multi_items() if isinstance(value, str)])

    def get(self, name: str, default: str = "") -> str:
        for key, value in self.items:
            if key == name:
                return value
        return default

    def text(self, name: str) -> str:
        return self.get(name).strip()

    def getlist(self, name: str) -> list[str]:
        return [value for key, value in self.items if key == name]

    def as_dict(self) -> dict[str, str]:
        return {key: value for key, value in self.items}

    def echo(self) -> list[tuple[str, str]]:
        """What a confirmation page posts back: every field but the CSRF token and the answer."""
        return [(key, value) for key, value in self.items if key not in ("csrf_token", "confirm")]


@dataclass
class Problem:
    """A refused form: which form, why (the API's own message) and what was typed, so the page
    shows the form again with the reason next to it."""

    form: str
    message: str
    status_code: int
    values: dict[str, str] = field(default_factory=dict)


REFUSALS = (400, 409, 422)  # a refusal shown next to the form; other errors are error pages


def refusal(exc: PieError, form: str, values: FormValues | dict[str, str]) -> Problem:
    """The Problem of a refused write (400, 409, 422); anything else propagates."""
    if exc.status_code not in REFUSALS:
        raise exc
    typed = values.as_dict() if isinstance(values, FormValues) else values
    return Problem(form=form, message=exc.message, status_code=exc.status_code, values=typed)


async def rehearse(session: Any, run: Callable[[], Awaitable[T]]) -> T:
    """Run a write in a savepoint and roll it back: every check of the real write runs now (a
    confirmation page is only shown for a change that would be accepted at this moment) and
    nothing of it stays (rows, audit, job notifications are discarded with the savepoint).
    ``run`` must return plain values: the rows it wrote are gone afterwards."""
    savepoint = await session.begin_nested()
    try:
        return await run()
    finally:
        await savepoint.rollback()


async def rehearse_audited(
    request: Request,
    session: Any,
    user: ConsoleUser,
    action: str,
    path: dict[str, Any],
    body: dict[str, Any],
    run: Callable[[], Awaitable[T]],
) -> tuple[T, dict[str, Any]]:
    """``rehearse`` with the write's audit entry open (never recorded): the logic sees the
    caller as the actor (e.g. "cancelled by alice"), and what it would put in the audit summary
    (``pie.audit.context.describe``: the jobs a service delete cancels, ...) is returned beside
    ``run``'s result, for the confirmation page to say."""
    entry = new_entry(request, user.principal, action, path, body)
    audit_context.begin(session, entry)
    try:
        result = await rehearse(session, run)
    finally:
        audit_context.end(session)
    return result, entry.summary


async def write(
    request: Request,
    session: Any,
    user: ConsoleUser,
    action: str,
    path: dict[str, Any],
    body: dict[str, Any],
    run: Callable[[], Awaitable[T]],
) -> T:
    """A console write: ``run`` (which calls the logic function the API route ``action`` calls)
    inside a savepoint, audited as that API operation (``audited``). A refused write leaves
    neither change nor audit row, and the session stays usable to render the form again."""
    async with session.begin_nested(), audited(request, session, user, action, path, body):
        return await run()


@dataclass
class Confirmation:
    """A confirmation page: what is about to happen (facts and an optional table of changes),
    the button that does it (posting the same form back with ``confirm=yes``), and the way back."""

    title: str
    question: str
    button: str
    action_url: str
    cancel_url: str
    crumbs: list[tuple[str, str]]
    facts: list[tuple[str, str]] = field(default_factory=list)
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (what, now, after)
    notes: list[str] = field(default_factory=list)
    cancel_label: str = "Cancel"  # the way back (e.g. "Back to the job" when the action is a cancel)
    danger: bool = False  # the button of an action that is hard to undo


def confirm_page(request: Request, confirmation: Confirmation, form: FormValues) -> HTMLResponse:
    return render(request, "confirm.html", c=confirmation, fields=form.echo())


def parse_time(name: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: not a date and time ({value!r})") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def console_router() -> APIRouter:
    """A router of console pages (``pie.console.routes`` gathers them): under ``/console``, out of
    the OpenAPI document, every route a :class:`ConsoleRoute`."""
    return APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)
