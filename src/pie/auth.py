"""Bearer-token verification (Cognito RS256 via JWKS, or development HS256) and permissions.

Routes declare what they need with the dependencies in ``pie.deps``; this module only turns a
token into a :class:`Principal` and answers permission and tenant questions about it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from jose import JWTError, jwk, jwt

from pie.config import Settings
from pie.errors import Forbidden, Unauthorized

SCOPE_PREFIX = "streamline/"

PERMISSIONS = (
    "read_models",
    "manage_models",
    "read_domains",
    "manage_domains",
    "init_services",
    "run_inference",
    "complete_jobs",
    "admin",
)
# what membership of any ``client:{id}`` group grants a human
CLIENT_GROUP_PERMISSIONS = frozenset(
    {"read_models", "read_domains", "manage_domains", "init_services", "run_inference"}
)
ADMIN_GROUP = "admin"
CLIENT_GROUP_PREFIX = "client:"


@dataclass(frozen=True)
class Principal:
    subject: str | None
    username: str | None = None
    scopes: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    app_client_id: str | None = None
    permissions: frozenset[str] = frozenset()
    is_admin: bool = False
    # client ids this caller may address (ignored when is_admin)
    tenants: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def has(self, permission: str) -> bool:
        return self.is_admin or permission in self.permissions

    def require(self, permission: str) -> None:
        if not self.has(permission):
            raise Forbidden(f"missing permission {permission}")

    def can_access(self, client_id: str | None) -> bool:
        if self.is_admin:
            return True
        return client_id is not None and client_id in self.tenants

    def require_tenant(self, client_id: str) -> None:
        if not self.can_access(client_id):
            raise Forbidden(f"no access to client {client_id}")


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """Map verified claims to permissions and tenant access (spec 2.2-2.4)."""
    raw_scope = claims.get("scope") or ""
    scopes = frozenset(raw_scope.split()) if isinstance(raw_scope, str) else frozenset()
    raw_groups = claims.get("cognito:groups") or []
    groups = frozenset(g for g in raw_groups if isinstance(g, str)) if isinstance(raw_groups, list) else frozenset()
    app_client_id = claims.get("client_id") if isinstance(claims.get("client_id"), str) else None
    username = claims.get("username") if isinstance(claims.get("username"), str) else None

    permissions: set[str] = set()
    tenants: set[str] = set()
    for scope in scopes:
        if scope.startswith(SCOPE_PREFIX) and scope[len(SCOPE_PREFIX):] in PERMISSIONS:
            permissions.add(scope[len(SCOPE_PREFIX):])
    is_admin = "admin" in permissions or ADMIN_GROUP in groups
    for group in groups:
        if group.startswith(CLIENT_GROUP_PREFIX) and len(group) > len(CLIENT_GROUP_PREFIX):
            tenants.add(group[len(CLIENT_GROUP_PREFIX):])
            permissions |= CLIENT_GROUP_PERMISSIONS
    # A machine token (client-credentials: no username) is scoped to the tenant its client_id
    # claim names. A human token's client_id is the app client, never a tenant.
    if username is None and app_client_id:
        tenants.add(app_client_id)
    if is_admin:
        permissions = set(PERMISSIONS)
    return Principal(
        subject=claims.get("sub") if isinstance(claims.get("sub"), str) else None,
        username=username,
        scopes=scopes,
        groups=groups,
        app_client_id=app_client_id,
        permissions=frozenset(permissions),
        is_admin=is_admin,
        tenants=frozenset(tenants),
        claims=claims,
    )


def dev_secret(settings: Settings) -> str | None:
    """The HS256 secret: PIE_JWT_SECRET, or (zero-setup local mode, no Cognito configured) a
    random secret persisted under PIE_DATA_DIR so `pie serve` and `pie token` agree."""
    if settings.jwt_secret:
        return settings.jwt_secret
    if settings.cognito_jwks_url:
        return None
    path = Path(settings.data_dir) / "dev-jwt-secret"
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(48)
        path.touch(mode=0o600)
        path.write_text(value)
        return value


def mint_dev_token(
    settings: Settings,
    *,
    scopes: list[str] | None = None,
    groups: list[str] | None = None,
    client_id: str | None = None,
    subject: str = "pie-dev-user",
    username: str | None = None,
    ttl: int = 3600,
    admin: bool = False,
) -> str:
    secret = dev_secret(settings)
    if not secret:
        raise RuntimeError("no development secret: set PIE_JWT_SECRET")
    now = int(time.time())
    scope_list = list(scopes or [])
    if admin:
        scope_list.append(SCOPE_PREFIX + "admin")
    claims: dict[str, Any] = {
        "sub": subject,
        "iss": settings.jwt_issuer,
        "iat": now,
        "exp": now + ttl,
        "token_use": "access",
    }
    if scope_list:
        claims["scope"] = " ".join(s if s.startswith(SCOPE_PREFIX) else SCOPE_PREFIX + s for s in scope_list)
    if groups:
        claims["cognito:groups"] = list(groups)
    if client_id:
        claims["client_id"] = client_id
    if username:
        claims["username"] = username
    return jwt.encode(claims, secret, algorithm="HS256")


class JWKSCache:
    """Cognito signing keys, fetched once and refetched when an unknown ``kid`` shows up — at
    most once per cooldown, so a stream of garbage ``kid``s cannot hammer the endpoint."""

    def __init__(self, url: str, cooldown: float):
        self.url = url
        self.cooldown = cooldown
        self.keys: dict[str, dict[str, Any]] = {}
        self.last_fetch: float | None = None
        self.fetch_count = 0
        self._lock = asyncio.Lock()

    async def _fetch(self) -> None:
        self.last_fetch = time.monotonic()
        self.fetch_count += 1
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(self.url)
            response.raise_for_status()
            data = response.json()
        self.keys = {k["kid"]: k for k in data.get("keys", []) if isinstance(k, dict) and "kid" in k}

    async def get(self, kid: str) -> dict[str, Any] | None:
        if kid in self.keys:
            return self.keys[kid]
        async with self._lock:
            if kid in self.keys:
                return self.keys[kid]
            if self.last_fetch is None or time.monotonic() - self.last_fetch >= self.cooldown:
                try:
                    await self._fetch()
                except (httpx.HTTPError, ValueError) as exc:
                    raise Unauthorized(f"cannot fetch signing keys: {exc.__class__.__name__}") from exc
            return self.keys.get(kid)


class TokenVerifier:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.secret = dev_secret(settings)
        jwks_url = settings.cognito_jwks_url
        self.jwks = JWKSCache(jwks_url, settings.jwks_refetch_cooldown_seconds) if jwks_url else None

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except JWTError as exc:
            raise Unauthorized("malformed bearer token") from exc
        alg = header.get("alg")
        if alg == "RS256" and self.jwks is not None:
            claims = await self._verify_rs256(token, header)
        elif alg == "HS256" and self.secret is not None:
            claims = self._verify_hs256(token)
        else:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted")
        return principal_from_claims(claims)

    def _verify_hs256(self, token: str) -> dict[str, Any]:
        assert self.secret is not None
        try:
            return jwt.decode(
                token,
                self.secret,
                algorithms=["HS256"],
                issuer=self.settings.jwt_issuer,
                options={"require_exp": True, "require_iss": True, "verify_aud": False},
            )
        except JWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc

    async def _verify_rs256(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        assert self.jwks is not None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Unauthorized("token has no key id")
        key = await self.jwks.get(kid)
        if key is None:
            raise Unauthorized("unknown signing key")
        try:
            public_key = jwk.construct(key, algorithm="RS256")
            claims = jwt.decode(
                token,
                public_key,
                algorithms=["RS256"],
                issuer=self.settings.cognito_issuer,
                options={"require_exp": True, "require_iss": True, "verify_aud": False},
            )
        except JWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc
        if claims.get("token_use") != "access":
            raise Unauthorized("not an access token")
        allowed = self.settings.cognito_app_client_ids
        if allowed and claims.get("client_id") not in allowed:
            raise Unauthorized("app client not allowed")
        return claims
