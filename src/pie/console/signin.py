"""Console sign-in: the session cookie, CSRF tokens and the Cognito hosted UI (authorization
code + PKCE).

The session cookie holds the caller's bearer token itself (HttpOnly, SameSite=Strict, path
``/console``, Secure over HTTPS, no expiry: it lives for the browser session). Every request
verifies it again with the API's own :class:`~pie.auth.TokenVerifier`, so an expired or revoked
token signs the browser out. The CSRF token of a form is an HMAC of that bearer token: bound to
the session, stable across server processes, unguessable without the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from fastapi import Request
from starlette.responses import Response

from pie.auth import Principal, TokenVerifier, mint_dev_token
from pie.config import Settings
from pie.errors import BadRequest, Forbidden, PieError, Unauthorized

SESSION_COOKIE = "pie_console"
OAUTH_COOKIE = "pie_console_oauth"
COOKIE_PATH = "/console"
CALLBACK_PATH = "/console/auth/callback"
MAX_TOKEN_LENGTH = 8192


class SignInRequired(PieError):
    """No (valid) console session: the console answers with a redirect to the sign-in page."""

    status_code = 401
    default_message = "sign in to use the console"


@dataclass
class ConsoleUser:
    principal: Principal
    token: str

    @property
    def csrf_token(self) -> str:
        return csrf_token_for(self.token)

    @property
    def name(self) -> str:
        p = self.principal
        return p.username or p.subject or p.app_client_id or "unknown"


def csrf_token_for(bearer_token: str) -> str:
    return hmac.new(bearer_token.encode(), b"pie-console-csrf", hashlib.sha256).hexdigest()


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, token, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request)
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request))


async def verify_token(request: Request, token: str) -> Principal:
    """The API's verifier; a malformed, expired or foreign token is a 401."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized("paste a bearer token")
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    verifier: TokenVerifier = request.app.state.verifier
    return await verifier.verify(token)


async def console_user(request: Request) -> ConsoleUser:
    """Dependency: the signed-in caller (SignInRequired without a valid session cookie)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise SignInRequired()
    try:
        principal = await verify_token(request, token)
    except Unauthorized as exc:
        raise SignInRequired(f"your session ended: {exc.message}") from exc
    return ConsoleUser(principal=principal, token=token)


def check_same_origin(request: Request) -> None:
    """A state-changing request must come from a console page: a foreign ``Origin`` is 403."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise Forbidden("cross-origin form submissions are refused")


def check_csrf(request: Request, user: ConsoleUser, submitted: str | None) -> None:
    check_same_origin(request)
    if not submitted or not hmac.compare_digest(submitted, user.csrf_token):
        raise Forbidden("the form's CSRF token is missing or wrong; reload the page and try again")


def safe_next(value: str | None) -> str:
    """Only a console path is a valid place to return to after sign-in (no open redirect)."""
    if value and value.startswith("/console") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console"


# -- Cognito hosted UI ---------------------------------------------------------------------------


def cognito_configured(settings: Settings) -> bool:
    return bool(settings.console_cognito_domain and settings.console_cognito_client_id)


def _redirect_uri(settings: Settings) -> str:
    return settings.public_url.rstrip("/") + CALLBACK_PATH


def _cognito_domain(settings: Settings) -> str:
    """The hosted UI's base URL; only called once ``cognito_configured`` holds (the routes 404 before)."""
    domain = settings.console_cognito_domain
    if not domain:
        raise RuntimeError("Cognito sign-in is not configured")
    return domain.rstrip("/")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def start_cognito(request: Request, settings: Settings, next_path: str) -> tuple[str, str]:
    """(authorize URL, value of the short-lived OAuth cookie holding state, verifier and next)."""
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)
    challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.console_cognito_client_id,
            "redirect_uri": _redirect_uri(settings),
            "scope": settings.console_cognito_scopes,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    url = f"{_cognito_domain(settings)}/oauth2/authorize?{query}"
    cookie = _b64url(json.dumps({"state": state, "verifier": verifier, "next": next_path}).encode())
    return url, cookie


def set_oauth_cookie(response: Response, request: Request, value: str) -> None:
    # Lax, not Strict: the callback is a top-level navigation coming back from the Cognito domain
    response.set_cookie(
        OAUTH_COOKIE, value, max_age=600, path=CALLBACK_PATH, httponly=True, samesite="lax", secure=_secure(request)
    )


def clear_oauth_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(OAUTH_COOKIE, path=CALLBACK_PATH, httponly=True, samesite="lax", secure=_secure(request))


def read_oauth_cookie(request: Request, state: str | None) -> dict[str, Any]:
    raw = request.cookies.get(OAUTH_COOKIE)
    if not raw or not state:
        raise BadRequest("the sign-in attempt expired or was started in another browser; sign in again")
    try:
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except ValueError as exc:
        raise BadRequest("the sign-in attempt is unreadable; sign in again") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("state", "verifier", "next")):
        raise BadRequest("the sign-in attempt is unreadable; sign in again")
    if not hmac.compare_digest(data["state"], state):
        raise BadRequest("the sign-in answer does not match this browser's sign-in attempt")
    return data


async def exchange_code(settings: Settings, code: str, verifier: str) -> str:
    """The access token for an authorization code (Cognito's token endpoint)."""
    form = {
        "grant_type": "authorization_code",
        "client_id": settings.console_cognito_client_id,
        "code": code,
        "redirect_uri": _redirect_uri(settings),
        "code_verifier": verifier,
    }
    auth = None
    if settings.console_cognito_client_secret:
        auth = httpx.BasicAuth(settings.console_cognito_client_id or "", settings.console_cognito_client_secret)
    url = f"{_cognito_domain(settings)}/oauth2/token"
    try:
        async with httpx.AsyncClient(timeout=10.0, auth=auth) as client:
            answer = await client.post(url, data=form)
    except httpx.HTTPError as exc:
        raise BadGateway(f"cannot reach the sign-in service: {exc.__class__.__name__}") from exc
    if answer.status_code != 200:
        raise Unauthorized(f"the sign-in service refused the authorization code ({answer.status_code})")
    try:
        token = answer.json().get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise BadGateway("the sign-in service answered without an access token")
    return token


class BadGateway(PieError):
    status_code = 502
    default_message = "the sign-in service failed"


# -- zero-setup local mode: the one-time sign-in link `pie serve` prints -------------------------

ONCE_PREFIX = "console-signin-"
ONCE_TTL_SECONDS = 600
LOCAL_SESSION_SECONDS = 8 * 3600


def local_mode(settings: Settings) -> bool:
    """Zero-setup local mode: neither PIE_JWT_SECRET nor Cognito configured."""
    return not settings.jwt_secret and not settings.cognito_jwks_url


def _once_path(settings: Settings, code: str) -> Path:
    return Path(settings.data_dir) / (ONCE_PREFIX + hashlib.sha256(code.encode()).hexdigest())


def issue_signin_code(settings: Settings) -> str:
    """A one-time code (its hash is a file under PIE_DATA_DIR, so every server process on this
    machine can redeem it, once)."""
    code = secrets.token_urlsafe(32)
    path = _once_path(settings, code)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return code


def redeem_signin_code(settings: Settings, code: str | None) -> str | None:
    """An admin development token for a valid, unused, unexpired code, else None. Removing the
    file is the atomic step: of two concurrent redeems, one wins."""
    if not local_mode(settings) or not code or len(code) > 128:
        return None
    path = _once_path(settings, code)
    try:
        age = time.time() - path.stat().st_mtime
        path.unlink()
    except FileNotFoundError:
        return None
    if age > ONCE_TTL_SECONDS:
        return None
    return mint_dev_token(settings, admin=True, subject="pie-console-local", ttl=LOCAL_SESSION_SECONDS)
