"""Sign-in and sign-out: the bearer-token form, the one-time local link, the Cognito hosted UI."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse

from pie.console import signin
from pie.console.common import User, console_router, render
from pie.errors import BadRequest, Forbidden, NotFound, PieError

router = console_router()

# the sign-in page shows only these fixed notices (no text from the URL: no crafted messages)
REASONS = {"session_ended": "Your session ended (the token expired or is no longer valid). Sign in again."}


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
